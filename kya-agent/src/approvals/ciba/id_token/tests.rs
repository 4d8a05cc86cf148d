//! Hostile-input tests: every way an ID token can be wrong is refused.

use super::*;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use jsonwebtoken::{EncodingKey, Header};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ED25519};
use serde_json::{json, Value};

const ISS: &str = "https://op.example.com";
const RSA_DER: &[u8] = include_bytes!("test_rsa.der");
const RSA_N: &str = include_str!("test_rsa_n.txt");

struct Keys {
    jwks: Vec<Jwk>,
    rsa: EncodingKey,
    ec: EncodingKey,
    ed: EncodingKey,
    other_ec: EncodingKey,
}

fn jwk(v: Value) -> Jwk {
    serde_json::from_value(v).unwrap()
}

fn ec_key() -> (EncodingKey, Vec<u8>) {
    let k = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    (
        EncodingKey::from_ec_der(&k.serialize_der()),
        k.public_key_raw().to_vec(),
    )
}

fn keys() -> Keys {
    let (ec, ec_pub) = ec_key();
    let (other_ec, _) = ec_key();
    let ed_pair = KeyPair::generate_for(&PKCS_ED25519).unwrap();
    let ed = EncodingKey::from_ed_der(&ed_pair.serialize_der());
    let jwks = vec![
        jwk(
            json!({"kty": "RSA", "kid": "rsa1", "use": "sig", "alg": "RS256", "n": RSA_N.trim(), "e": "AQAB"}),
        ),
        jwk(json!({"kty": "EC", "kid": "ec1", "crv": "P-256",
                   "x": B64.encode(&ec_pub[1..33]), "y": B64.encode(&ec_pub[33..65])})),
        jwk(
            json!({"kty": "OKP", "kid": "ed1", "crv": "Ed25519", "x": B64.encode(ed_pair.public_key_raw())}),
        ),
    ];
    Keys {
        jwks,
        rsa: EncodingKey::from_rsa_der(RSA_DER),
        ec,
        ed,
        other_ec,
    }
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn claims() -> Value {
    json!({"iss": ISS, "aud": "kya", "sub": "alice", "exp": now() + 300, "iat": now(),
           "urn:openid:params:jwt:claim:auth_req_id": "req1"})
}

fn expect() -> Expect<'static> {
    Expect {
        issuer: ISS,
        client_id: "kya",
        subject: "alice",
        auth_req_id: "req1",
    }
}

fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&h, claims, key).unwrap()
}

fn with(f: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
    let mut c = claims();
    f(c.as_object_mut().unwrap());
    c
}

#[test]
fn good_tokens_of_each_algorithm_are_accepted() {
    let k = keys();
    for (alg, kid, key) in [
        (Algorithm::RS256, "rsa1", &k.rsa),
        (Algorithm::ES256, "ec1", &k.ec),
        (Algorithm::EdDSA, "ed1", &k.ed),
    ] {
        let t = sign(alg, Some(kid), &claims(), key);
        let v = verify_with(&k.jwks, &t, &expect()).unwrap_or_else(|e| panic!("{alg:?}: {e}"));
        assert_eq!(v.sub, "alice");
        assert_eq!(v.iss, ISS);
        assert_eq!(v.sha256, hex::encode(Sha256::digest(t.as_bytes())));
    }
    // No kid: each fitting key is tried.
    let t = sign(Algorithm::ES256, None, &claims(), &k.ec);
    assert!(verify_with(&k.jwks, &t, &expect()).is_ok());
    // An audience list with kya and a matching azp.
    let c = with(|c| {
        c.insert("aud".into(), json!(["kya", "other"]));
        c.insert("azp".into(), json!("kya"));
    });
    assert!(verify_with(
        &k.jwks,
        &sign(Algorithm::RS256, Some("rsa1"), &c, &k.rsa),
        &expect()
    )
    .is_ok());
}

fn refused(k: &Keys, token: &str) -> IdTokenError {
    match verify_with(&k.jwks, token, &expect()) {
        Ok(v) => panic!("accepted a bad token: {v:?}"),
        Err(e) => e,
    }
}

#[test]
fn wrong_signatures_and_keys_are_refused() {
    let k = keys();
    // Signed by another key, claiming the real key's kid.
    let t = sign(Algorithm::ES256, Some("ec1"), &claims(), &k.other_ec);
    assert!(matches!(refused(&k, &t), IdTokenError::Invalid(_)));
    // Another key's kid.
    let t = sign(Algorithm::ES256, Some("evil"), &claims(), &k.other_ec);
    assert!(matches!(refused(&k, &t), IdTokenError::UnknownKey(Some(_))));
    // The right kid but an algorithm that does not fit the key type.
    let t = sign(Algorithm::ES256, Some("rsa1"), &claims(), &k.ec);
    assert!(matches!(refused(&k, &t), IdTokenError::UnknownKey(_)));
    // The RSA JWK says alg RS256: a PS256 token under it is refused.
    let t = sign(Algorithm::PS256, Some("rsa1"), &claims(), &k.rsa);
    assert!(matches!(refused(&k, &t), IdTokenError::UnknownKey(_)));
    // A payload byte flipped after signing.
    let t = sign(Algorithm::RS256, Some("rsa1"), &claims(), &k.rsa);
    let mut parts: Vec<String> = t.split('.').map(str::to_string).collect();
    let mut payload: Value = serde_json::from_slice(&B64.decode(&parts[1]).unwrap()).unwrap();
    payload["sub"] = json!("alicf");
    parts[1] = B64.encode(serde_json::to_vec(&payload).unwrap());
    let forged = parts.join(".");
    assert!(matches!(refused(&k, &forged), IdTokenError::Invalid(_)));
    // An encryption key is never used to verify.
    let mut enc = k.jwks.clone();
    enc[1].common.public_key_use = Some(PublicKeyUse::Encryption);
    let t = sign(Algorithm::ES256, Some("ec1"), &claims(), &k.ec);
    assert!(verify_with(&enc, &t, &expect()).is_err());
}

#[test]
fn alg_none_and_hmac_with_the_public_key_are_refused() {
    let k = keys();
    let none = format!(
        "{}.{}.",
        B64.encode(br#"{"alg":"none","kid":"rsa1"}"#),
        B64.encode(serde_json::to_vec(&claims()).unwrap())
    );
    let e = refused(&k, &none);
    assert!(
        matches!(e, IdTokenError::Malformed(_) | IdTokenError::Algorithm(_)),
        "{e}"
    );
    // The classic key-confusion attack: HS256 keyed with the public key bytes.
    for secret in [
        RSA_N.trim().as_bytes().to_vec(),
        B64.decode(RSA_N.trim()).unwrap(),
    ] {
        let t = sign(
            Algorithm::HS256,
            Some("rsa1"),
            &claims(),
            &EncodingKey::from_secret(&secret),
        );
        assert!(matches!(refused(&k, &t), IdTokenError::Algorithm(a) if a == "HS256"));
    }
}

#[test]
fn wrong_claims_are_refused() {
    let k = keys();
    let cases: Vec<(&str, Value)> = vec![
        (
            "iss",
            with(|c| {
                c.insert("iss".into(), json!("https://evil.example.com"));
            }),
        ),
        (
            "iss prefix",
            with(|c| {
                c.insert("iss".into(), json!("https://op.example.com/"));
            }),
        ),
        (
            "aud",
            with(|c| {
                c.insert("aud".into(), json!("other-client"));
            }),
        ),
        (
            "aud list",
            with(|c| {
                c.insert("aud".into(), json!(["a", "b"]));
            }),
        ),
        (
            "azp",
            with(|c| {
                c.insert("aud".into(), json!(["kya", "other"]));
                c.insert("azp".into(), json!("other"));
            }),
        ),
        (
            "azp missing",
            with(|c| {
                c.insert("aud".into(), json!(["kya", "other"]));
            }),
        ),
        (
            "expired",
            with(|c| {
                c.insert("exp".into(), json!(now() - 3600));
            }),
        ),
        (
            "nbf",
            with(|c| {
                c.insert("nbf".into(), json!(now() + 3600));
            }),
        ),
        (
            "iat",
            with(|c| {
                c.insert("iat".into(), json!(now() + 3600));
            }),
        ),
        (
            "sub",
            with(|c| {
                c.insert("sub".into(), json!("mallory"));
            }),
        ),
        (
            "sub case",
            with(|c| {
                c.insert("sub".into(), json!("Alice"));
            }),
        ),
        (
            "auth_req_id",
            with(|c| {
                c.insert(
                    "urn:openid:params:jwt:claim:auth_req_id".into(),
                    json!("other"),
                );
            }),
        ),
        (
            "no exp",
            with(|c| {
                c.remove("exp");
            }),
        ),
        (
            "no sub",
            with(|c| {
                c.remove("sub");
            }),
        ),
        (
            "no aud",
            with(|c| {
                c.remove("aud");
            }),
        ),
        (
            "no iss",
            with(|c| {
                c.remove("iss");
            }),
        ),
        (
            "exp as text",
            with(|c| {
                c.insert("exp".into(), json!("tomorrow"));
            }),
        ),
        (
            "sub as number",
            with(|c| {
                c.insert("sub".into(), json!(7));
            }),
        ),
    ];
    for (what, c) in cases {
        let t = sign(Algorithm::RS256, Some("rsa1"), &c, &k.rsa);
        assert!(
            verify_with(&k.jwks, &t, &expect()).is_err(),
            "{what} accepted"
        );
    }
}

#[test]
fn garbage_and_huge_tokens_are_refused() {
    let k = keys();
    let huge = sign(
        Algorithm::RS256,
        Some("rsa1"),
        &with(|c| {
            c.insert("pad".into(), json!("x".repeat(MAX_ID_TOKEN)));
        }),
        &k.rsa,
    );
    assert!(matches!(refused(&k, &huge), IdTokenError::TooLarge));
    for bad in [
        "",
        ".",
        "..",
        "a.b.c",
        "a.b",
        "a.b.c.d.e",
        "eyJhbGciOiJSUzI1NiJ9.%%%.sig",
        "eyJhbGciOiJSUzI1NiJ9..",
        "\u{0}\u{0}.\u{0}.\u{0}",
    ] {
        assert!(verify_with(&k.jwks, bad, &expect()).is_err(), "{bad:?}");
    }
    assert!(verify_with(
        &[],
        &sign(Algorithm::RS256, Some("rsa1"), &claims(), &k.rsa),
        &expect()
    )
    .is_err());
}

#[test]
fn jwks_parsing_skips_keys_it_cannot_use() {
    let body = json!({"keys": [
        {"kty": "RSA", "kid": "a", "n": RSA_N.trim(), "e": "AQAB"},
        {"kty": "XYZ", "kid": "b"},
        {"kty": "RSA", "kid": "c", "alg": "RSA-OAEP-512", "n": "x", "e": "AQAB"},
        "junk"
    ]});
    let keys = parse_jwks(&serde_json::to_vec(&body).unwrap()).unwrap();
    assert_eq!(keys.len(), 1);
    assert!(parse_jwks(b"{}").is_err());
    assert!(parse_jwks(b"[1,2]").is_err());
}
