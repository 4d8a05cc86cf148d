//! ID token verification: the only thing that turns a CIBA token response into
//! an approval.
//!
//! Checked, in this order, and any failure refuses the token:
//! 1. size (at most [`MAX_ID_TOKEN`] bytes) and compact-JWS shape;
//! 2. the header's `alg` is an asymmetric signature algorithm kya allows
//!    (RS256/384/512, PS256/384/512, ES256/384, EdDSA): `none` and the HMAC
//!    family are refused outright, so a token "signed" with the provider's
//!    public key as an HMAC secret cannot pass;
//! 3. a key from the provider's JWKS: the one with the header's `kid` (or, with
//!    no `kid`, each signing key), that is a signing key (`use` absent or
//!    `sig`), whose type and curve fit the `alg` and whose own `alg`, if
//!    given, is the header's; on an unknown `kid` the JWKS is fetched again,
//!    at most once per [`REFETCH_MIN_INTERVAL`] (key rotation, not an
//!    amplifier);
//! 4. the signature (jsonwebtoken, over ring);
//! 5. claims: `iss` is the configured issuer, `aud` contains kya's client_id
//!    (and `azp`, when present or when there are several audiences, is
//!    kya's client_id), `exp` is in the future and `nbf`/`iat` not in the
//!    future (both with [`LEEWAY_SECS`] of clock skew), `sub` is exactly the
//!    owner kya asked about (the `login_hint`), and the CIBA
//!    `urn:openid:params:jwt:claim:auth_req_id` claim, when present, is this
//!    request's.

use crate::approvals::http::{HttpClient, HttpError};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Largest ID token kya looks at.
pub const MAX_ID_TOKEN: usize = 16 * 1024;
/// Clock skew allowed on `exp`, `nbf` and `iat`.
pub const LEEWAY_SECS: u64 = 60;
/// The JWKS is refetched for an unknown `kid` at most this often.
pub const REFETCH_MIN_INTERVAL: Duration = Duration::from_secs(30);
/// At most this many keys are read from a JWKS.
pub const MAX_KEYS: usize = 64;

/// Why an ID token was refused.
#[derive(Debug, thiserror::Error)]
pub enum IdTokenError {
    #[error("ID token larger than {MAX_ID_TOKEN} bytes")]
    TooLarge,
    #[error("ID token is not a compact JWS: {0}")]
    Malformed(String),
    #[error("ID token algorithm {0} is not accepted")]
    Algorithm(String),
    #[error("no usable signing key in the provider's JWKS for kid {0:?}")]
    UnknownKey(Option<String>),
    #[error("ID token signature or claims invalid: {0}")]
    Invalid(String),
    #[error("ID token claim {claim}: {why}")]
    Claim { claim: &'static str, why: String },
    #[error("fetching the provider's JWKS: {0}")]
    Jwks(String),
}

impl From<HttpError> for IdTokenError {
    fn from(e: HttpError) -> Self {
        IdTokenError::Jwks(e.to_string())
    }
}

/// What the token must say.
#[derive(Debug, Clone)]
pub struct Expect<'a> {
    pub issuer: &'a str,
    pub client_id: &'a str,
    /// The owner kya asked about (the `login_hint`).
    pub subject: &'a str,
    pub auth_req_id: &'a str,
}

/// A verified token's facts kya records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub sub: String,
    pub iss: String,
    /// Hex SHA-256 of the compact JWS as received.
    pub sha256: String,
}

#[derive(Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    aud: Audience,
    #[serde(default)]
    azp: Option<String>,
    #[serde(default)]
    iat: Option<i64>,
    #[serde(default, rename = "urn:openid:params:jwt:claim:auth_req_id")]
    auth_req_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn len(&self) -> usize {
        match self {
            Audience::One(_) => 1,
            Audience::Many(v) => v.len(),
        }
    }
}

/// The JSON name of an algorithm (`RS256`, `EdDSA`...).
fn alg_name<T: serde::Serialize>(alg: &T) -> String {
    serde_json::to_value(alg)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Parse a JWKS document, keeping the keys jsonwebtoken understands (a key of
/// another kind, e.g. an encryption key with an exotic `alg`, is skipped, not fatal).
pub fn parse_jwks(body: &[u8]) -> Result<Vec<Jwk>, IdTokenError> {
    #[derive(Deserialize)]
    struct Set {
        keys: Vec<serde_json::Value>,
    }
    let set: Set =
        serde_json::from_slice(body).map_err(|e| IdTokenError::Jwks(format!("not a JWKS: {e}")))?;
    Ok(set
        .keys
        .into_iter()
        .take(MAX_KEYS)
        .filter_map(|k| serde_json::from_value::<Jwk>(k).ok())
        .collect())
}

/// True when `jwk` may verify a signature made with `alg`.
fn key_fits(jwk: &Jwk, alg: Algorithm) -> bool {
    if let Some(u) = &jwk.common.public_key_use {
        if *u != PublicKeyUse::Signature {
            return false;
        }
    }
    if let Some(ka) = &jwk.common.key_algorithm {
        if alg_name(ka) != alg_name(&alg) {
            return false;
        }
    }
    match (&jwk.algorithm, alg) {
        (
            AlgorithmParameters::RSA(_),
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512,
        ) => true,
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES256) => p.curve == EllipticCurve::P256,
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES384) => p.curve == EllipticCurve::P384,
        (AlgorithmParameters::OctetKeyPair(p), Algorithm::EdDSA) => {
            p.curve == EllipticCurve::Ed25519
        }
        _ => false,
    }
}

fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Verify `token` against `keys`. Returns [`IdTokenError::UnknownKey`] when no
/// key fits (the caller may refetch the JWKS once).
pub fn verify_with(keys: &[Jwk], token: &str, expect: &Expect) -> Result<Verified, IdTokenError> {
    if token.len() > MAX_ID_TOKEN {
        return Err(IdTokenError::TooLarge);
    }
    if token.split('.').count() != 3 {
        return Err(IdTokenError::Malformed(
            "not three dot-separated parts".into(),
        ));
    }
    let header =
        jsonwebtoken::decode_header(token).map_err(|e| IdTokenError::Malformed(e.to_string()))?;
    let alg = header.alg;
    match alg {
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512
        | Algorithm::ES256
        | Algorithm::ES384
        | Algorithm::EdDSA => {}
        other => return Err(IdTokenError::Algorithm(alg_name(&other))),
    }
    let candidates: Vec<&Jwk> = keys
        .iter()
        .filter(|k| match &header.kid {
            Some(kid) => k.common.key_id.as_deref() == Some(kid.as_str()),
            None => true,
        })
        .filter(|k| key_fits(k, alg))
        .collect();
    if candidates.is_empty() {
        return Err(IdTokenError::UnknownKey(header.kid.clone()));
    }
    let mut validation = Validation::new(alg);
    validation.algorithms = vec![alg];
    validation.leeway = LEEWAY_SECS;
    validation.validate_exp = true;
    validation.validate_nbf = true;
    validation.set_issuer(&[expect.issuer]);
    validation.set_audience(&[expect.client_id]);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    let mut last = String::from("no key verified the signature");
    let mut claims = None;
    for key in candidates {
        let decoding = match DecodingKey::from_jwk(key) {
            Ok(k) => k,
            Err(e) => {
                last = format!("unusable JWKS key: {e}");
                continue;
            }
        };
        match jsonwebtoken::decode::<Claims>(token, &decoding, &validation) {
            Ok(data) => {
                claims = Some(data.claims);
                break;
            }
            Err(e) => last = e.to_string(),
        }
    }
    let claims = claims.ok_or(IdTokenError::Invalid(last))?;
    // jsonwebtoken checked iss and aud already; these are re-checked cheaply
    // so that a future change of library defaults cannot silently drop them.
    if claims.iss != expect.issuer {
        return Err(IdTokenError::Claim {
            claim: "iss",
            why: "not the configured issuer".into(),
        });
    }
    let aud_ok = match &claims.aud {
        Audience::One(a) => a == expect.client_id,
        Audience::Many(v) => v.iter().any(|a| a == expect.client_id),
    };
    if !aud_ok {
        return Err(IdTokenError::Claim {
            claim: "aud",
            why: "does not contain kya's client_id".into(),
        });
    }
    match &claims.azp {
        Some(azp) if azp != expect.client_id => {
            return Err(IdTokenError::Claim {
                claim: "azp",
                why: "not kya's client_id".into(),
            })
        }
        None if claims.aud.len() > 1 => {
            return Err(IdTokenError::Claim {
                claim: "azp",
                why: "missing with several audiences".into(),
            })
        }
        _ => {}
    }
    if let Some(iat) = claims.iat {
        if iat > now_unix() + LEEWAY_SECS as i64 {
            return Err(IdTokenError::Claim {
                claim: "iat",
                why: "issued in the future".into(),
            });
        }
    }
    if claims.sub != expect.subject {
        return Err(IdTokenError::Claim {
            claim: "sub",
            why: format!(
                "{:?} is not the owner {:?} kya asked about",
                claims.sub.chars().take(100).collect::<String>(),
                expect.subject
            ),
        });
    }
    if let Some(id) = &claims.auth_req_id {
        if id != expect.auth_req_id {
            return Err(IdTokenError::Claim {
                claim: "urn:openid:params:jwt:claim:auth_req_id",
                why: "names another authentication request".into(),
            });
        }
    }
    Ok(Verified {
        sub: claims.sub,
        iss: claims.iss,
        sha256: hex::encode(Sha256::digest(token.as_bytes())),
    })
}

/// The provider's JWKS, fetched lazily and cached.
pub struct Jwks {
    uri: String,
    http: HttpClient,
    cache: Mutex<Option<(Vec<Jwk>, Instant)>>,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks").field("uri", &self.uri).finish()
    }
}

impl Jwks {
    pub fn new(uri: String, http: HttpClient) -> Self {
        Jwks {
            uri,
            http,
            cache: Mutex::new(None),
        }
    }

    async fn fetch(&self) -> Result<Vec<Jwk>, IdTokenError> {
        let resp = self.http.get(&self.uri).await?;
        if !resp.status.is_success() {
            return Err(IdTokenError::Jwks(format!("HTTP status {}", resp.status)));
        }
        let keys = parse_jwks(&resp.body)?;
        *self.cache.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((keys.clone(), Instant::now()));
        Ok(keys)
    }

    fn cached(&self) -> Option<(Vec<Jwk>, Instant)> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Verify `token`; on an unknown key, refetch the JWKS once (rate-limited).
    pub async fn verify(&self, token: &str, expect: &Expect<'_>) -> Result<Verified, IdTokenError> {
        let (keys, fetched) = match self.cached() {
            Some(c) => (c.0, Some(c.1)),
            None => (self.fetch().await?, None),
        };
        match verify_with(&keys, token, expect) {
            Err(IdTokenError::UnknownKey(_))
                if fetched.is_some_and(|at| at.elapsed() >= REFETCH_MIN_INTERVAL) =>
            {
                let keys = self.fetch().await?;
                verify_with(&keys, token, expect)
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests;
