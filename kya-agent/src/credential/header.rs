//! The `Kya-Decision` header: how a decision receipt travels to a server, and
//! how anyone verifies it offline with kya's public key.
//!
//! The value is the base64url (RFC 4648 §5, no padding) of the JCS
//! (RFC 8785) bytes of the secured receipt ([`super::receipt`]). Verifying:
//!
//! 1. at most [`MAX_HEADER_LEN`] characters, base64url only, decoding to
//!    strict JSON (no duplicate members) that is exactly its own JCS form
//!    (one receipt has one encoding);
//! 2. the `eddsa-jcs-2022` proof, by the trusted key, carrying only the
//!    members kya writes; the issuer is that key;
//! 3. a well-formed receipt, `validFrom - CLOCK_SKEW <= now < validUntil`;
//! 4. with the body the server received: its SHA-256 is `bodySha256`;
//! 5. each embedded credential verifies with the same key and matches its
//!    call (tool, server, arguments digest, agent, uid) and was valid when
//!    the receipt was issued.
//!
//! Binding the HTTP method and path is the caller's check (the server knows
//! them); [`Verified`] carries them.

use super::action::ActionCredential;
use super::jcs::{self, JcsError};
use super::multikey;
use super::proof::{self, ProofError, ASSERTION_METHOD};
use super::receipt::{Receipt, ReceiptError};
use super::verify::{self, VerifyError};
use base64::Engine as _;
use ed25519_dalek::VerifyingKey;
use sha2::{Digest, Sha256};
use std::time::Duration;
use time::OffsetDateTime;

/// The header's name (HTTP header names are case-insensitive).
pub const HEADER_NAME: &str = "kya-decision";
/// The longest header value accepted (and produced): far above a receipt
/// for a small batch with credentials, far below what costs memory.
pub const MAX_HEADER_LEN: usize = 64 * 1024;
/// How far ahead of the verifier's clock a receipt's `validFrom` may be
/// (clocks of two hosts differ a little); `validUntil` gets no grace.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5);

/// Why a header value is not a valid proof of decision.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("the Kya-Decision header is empty")]
    Empty,
    #[error("the Kya-Decision header is {0} characters, more than {MAX_HEADER_LEN}")]
    TooLong(usize),
    #[error("the Kya-Decision header is not unpadded base64url")]
    NotBase64url,
    #[error("the Kya-Decision header is not JSON: {0}")]
    Json(#[from] JcsError),
    #[error("the receipt is not in its canonical (JCS) form")]
    NotCanonical,
    #[error("proof: {0}")]
    Proof(#[from] ProofError),
    #[error("{0}")]
    Malformed(String),
    #[error("{0}")]
    Receipt(#[from] ReceiptError),
    #[error("receipt signed by {found}, not by the trusted key {trusted}")]
    UntrustedIssuer { found: String, trusted: String },
    #[error("receipt issuer {0} is not the key that signed it")]
    IssuerMismatch(String),
    #[error("receipt not valid before {0}")]
    NotYetValid(String),
    #[error("receipt expired at {0}")]
    Expired(String),
    #[error("the body's SHA-256 is {found}, the receipt is for {expected}")]
    BodyMismatch { found: String, expected: String },
    #[error("call {index}: its credential does not verify: {error}")]
    Credential { index: usize, error: VerifyError },
    #[error("call {index}: its credential does not match the call: {what}")]
    CredentialMismatch { index: usize, what: String },
}

impl HeaderError {
    /// A short stable code for `--json` output and servers' logs.
    pub fn code(&self) -> &'static str {
        match self {
            HeaderError::Empty
            | HeaderError::TooLong(_)
            | HeaderError::NotBase64url
            | HeaderError::Json(_)
            | HeaderError::NotCanonical
            | HeaderError::Malformed(_)
            | HeaderError::Receipt(_) => "malformed",
            HeaderError::Proof(_) => "bad_proof",
            HeaderError::UntrustedIssuer { .. } | HeaderError::IssuerMismatch(_) => {
                "untrusted_issuer"
            }
            HeaderError::NotYetValid(_) => "not_yet_valid",
            HeaderError::Expired(_) => "expired",
            HeaderError::BodyMismatch { .. } => "body_mismatch",
            HeaderError::Credential { .. } | HeaderError::CredentialMismatch { .. } => {
                "credential_invalid"
            }
        }
    }
}

/// The header value for a secured receipt.
pub fn encode(secured: &serde_json::Value) -> Result<String, JcsError> {
    let canonical = jcs::canonicalize(secured)?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(canonical.as_bytes()))
}

/// A header that verified.
#[derive(Debug, Clone)]
pub struct Verified {
    pub receipt: Receipt,
    /// The embedded credentials, by call index.
    pub credentials: Vec<(usize, ActionCredential)>,
    /// Whether the body binding was checked.
    pub body_checked: bool,
}

/// Verify a header value against the trusted key at `now`; with `body`, also
/// its binding to those bytes. See the module documentation for the steps.
pub fn verify(
    value: &str,
    trusted: &VerifyingKey,
    now: OffsetDateTime,
    body: Option<&[u8]>,
) -> Result<Verified, HeaderError> {
    if value.is_empty() {
        return Err(HeaderError::Empty);
    }
    if value.len() > MAX_HEADER_LEN {
        return Err(HeaderError::TooLong(value.len()));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(HeaderError::NotBase64url);
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(value)
        .map_err(|_| HeaderError::NotBase64url)?;
    let doc = jcs::parse_strict(&bytes, MAX_HEADER_LEN)?;
    if jcs::canonicalize(&doc)?.as_bytes() != bytes.as_slice() {
        return Err(HeaderError::NotCanonical);
    }
    let verified = proof::verify_proof(&doc, ASSERTION_METHOD)?;
    verify::check_proof_shape(&doc).map_err(HeaderError::Malformed)?;
    if verified.key != *trusted {
        return Err(HeaderError::UntrustedIssuer {
            found: multikey::did_key(&verified.key),
            trusted: multikey::did_key(trusted),
        });
    }
    let receipt = Receipt::from_verified(&verified.document)?;
    if receipt.issuer != multikey::did_key(&verified.key) {
        return Err(HeaderError::IssuerMismatch(receipt.issuer));
    }
    let show = |t| super::action::format_time(t).unwrap_or_default();
    if now + CLOCK_SKEW < receipt.valid_from {
        return Err(HeaderError::NotYetValid(show(receipt.valid_from)));
    }
    if now >= receipt.valid_until {
        return Err(HeaderError::Expired(show(receipt.valid_until)));
    }
    if let Some(body) = body {
        let found = hex::encode(Sha256::digest(body));
        if found != receipt.subject.request.body_sha256 {
            return Err(HeaderError::BodyMismatch {
                found,
                expected: receipt.subject.request.body_sha256.clone(),
            });
        }
    }
    let credentials = check_credentials(&receipt, trusted)?;
    Ok(Verified {
        receipt,
        credentials,
        body_checked: body.is_some(),
    })
}

/// Each embedded credential: kya's, for exactly its call, valid when the
/// receipt was issued.
fn check_credentials(
    receipt: &Receipt,
    trusted: &VerifyingKey,
) -> Result<Vec<(usize, ActionCredential)>, HeaderError> {
    let s = &receipt.subject;
    let mut out = Vec::new();
    for (index, call) in s.calls.iter().enumerate() {
        let Some(doc) = &call.credential else {
            continue;
        };
        let cred = verify::verify_document(doc, trusted)
            .map_err(|error| HeaderError::Credential { index, error })?;
        let mismatch = |what: String| HeaderError::CredentialMismatch { index, what };
        let scope = &cred.subject.scope;
        if call.method != "tools/call" || call.tool.as_deref() != Some(scope.tool.as_str()) {
            return Err(mismatch(format!(
                "it is for tool {:?}, the call is {} {:?}",
                scope.tool, call.method, call.tool
            )));
        }
        if let Some(server) = &scope.server {
            if !server.eq_ignore_ascii_case(&s.server) {
                return Err(mismatch(format!(
                    "it is for server {server:?}, the receipt for {:?}",
                    s.server
                )));
            }
        }
        if let Some(d) = &scope.args_sha256 {
            if call.args_sha256.as_deref() != Some(d.as_str()) {
                return Err(mismatch("it is for other arguments".into()));
            }
        }
        if cred.subject.agent != s.agent.name {
            return Err(mismatch(format!(
                "it is for agent {:?}, the receipt for {:?}",
                cred.subject.agent, s.agent.name
            )));
        }
        if let Some(uid) = cred.subject.uid {
            if uid != s.agent.uid {
                return Err(mismatch(format!(
                    "it is for uid {uid}, the process runs as {}",
                    s.agent.uid
                )));
            }
        }
        if receipt.valid_from < cred.valid_from || receipt.valid_from >= cred.valid_until {
            return Err(mismatch(
                "it was not valid when the receipt was issued".into(),
            ));
        }
        out.push((index, cred));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credential::action::{self, AgentSubject, Channel, Environment, Evidence, Scope};
    use crate::credential::receipt::{self, tests::sample_subject};
    use ed25519_dalek::SigningKey;
    use serde_json::{json, Value};

    const BODY: &[u8] = br#"{"id":1,"jsonrpc":"2.0","method":"tools/call","params":{"arguments":{"amount":5},"name":"transfer"}}"#;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[5; 32])
    }

    fn header_at(now: OffsetDateTime) -> String {
        let secured =
            receipt::issue(&key(), sample_subject(BODY), now, Duration::from_secs(60)).unwrap();
        encode(&secured).unwrap()
    }

    fn decode(value: &str) -> Value {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(value)
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    fn reencode(doc: &Value) -> String {
        encode(doc).unwrap()
    }

    #[test]
    fn a_fresh_header_verifies_with_and_without_the_body() {
        let now = OffsetDateTime::now_utc();
        let h = header_at(now);
        let v = verify(&h, &key().verifying_key(), now, Some(BODY)).unwrap();
        assert!(v.body_checked);
        assert_eq!(v.receipt.subject.server, "mcp.test");
        assert_eq!(v.receipt.subject.calls[0].tool.as_deref(), Some("transfer"));
        let v = verify(&h, &key().verifying_key(), now, None).unwrap();
        assert!(!v.body_checked);
    }

    #[test]
    fn a_tampered_body_is_refused() {
        let now = OffsetDateTime::now_utc();
        let h = header_at(now);
        let tampered = String::from_utf8_lossy(BODY).replace("5", "50000");
        let e = verify(&h, &key().verifying_key(), now, Some(tampered.as_bytes())).unwrap_err();
        assert_eq!(e.code(), "body_mismatch", "{e}");
        let e = verify(&h, &key().verifying_key(), now, Some(b"")).unwrap_err();
        assert_eq!(e.code(), "body_mismatch", "{e}");
    }

    #[test]
    fn a_tampered_receipt_is_refused() {
        let now = OffsetDateTime::now_utc();
        let doc = decode(&header_at(now));
        let trusted = key().verifying_key();
        for (path, new) in [
            ("/credentialSubject/server", json!("other.test")),
            ("/credentialSubject/request/path", json!("/admin")),
            (
                "/credentialSubject/request/bodySha256",
                json!("0".repeat(64)),
            ),
            ("/credentialSubject/calls/0/tool", json!("delete_records")),
            ("/credentialSubject/agent/uid", json!(0)),
            ("/validUntil", json!("2999-01-01T00:00:00Z")),
        ] {
            let mut d = doc.clone();
            *d.pointer_mut(path).unwrap() = new;
            let e = verify(&reencode(&d), &trusted, now, None).unwrap_err();
            assert_eq!(e.code(), "bad_proof", "{path}: {e}");
        }
        // A call removed from the list.
        let mut d = doc.clone();
        d["credentialSubject"]["calls"] = json!([]);
        assert_eq!(
            verify(&reencode(&d), &trusted, now, None)
                .unwrap_err()
                .code(),
            "bad_proof"
        );
        // An unsigned member added to the proof.
        let mut d = doc.clone();
        d["proof"]["expires"] = json!("2999-01-01T00:00:00Z");
        assert!(verify(&reencode(&d), &trusted, now, None).is_err());
        // Every single-character change of the header is refused.
        let h = header_at(now);
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        for pos in (0..h.len()).step_by(7) {
            let mut b = h.clone().into_bytes();
            let i = alphabet.iter().position(|c| *c == b[pos]).unwrap();
            b[pos] = alphabet[(i + 1) % alphabet.len()];
            let changed = String::from_utf8(b).unwrap();
            assert!(
                verify(&changed, &trusted, now, Some(BODY)).is_err(),
                "a change at {pos} was accepted"
            );
        }
    }

    #[test]
    fn another_key_is_refused() {
        let now = OffsetDateTime::now_utc();
        let other = SigningKey::from_bytes(&[6; 32]);
        let e = verify(&header_at(now), &other.verifying_key(), now, None).unwrap_err();
        assert_eq!(e.code(), "untrusted_issuer", "{e}");
        // Signed by another key that claims kya's verification method.
        let secured =
            receipt::issue(&other, sample_subject(BODY), now, Duration::from_secs(60)).unwrap();
        let mut d = secured.clone();
        d["proof"]["verificationMethod"] =
            json!(multikey::verification_method(&key().verifying_key()));
        let e = verify(&reencode(&d), &key().verifying_key(), now, None).unwrap_err();
        assert_eq!(e.code(), "bad_proof", "{e}");
    }

    #[test]
    fn expiry_and_clock_skew() {
        let issued = OffsetDateTime::now_utc();
        let h = header_at(issued);
        let trusted = key().verifying_key();
        let from = action::truncate(issued).unwrap();
        assert!(verify(&h, &trusted, from + Duration::from_secs(59), None).is_ok());
        let e = verify(&h, &trusted, from + Duration::from_secs(60), None).unwrap_err();
        assert_eq!(e.code(), "expired", "{e}");
        assert!(verify(&h, &trusted, from - Duration::from_secs(4), None).is_ok());
        let e = verify(&h, &trusted, from - Duration::from_secs(6), None).unwrap_err();
        assert_eq!(e.code(), "not_yet_valid", "{e}");
    }

    #[test]
    fn hostile_values_are_refused_cheaply() {
        let now = OffsetDateTime::now_utc();
        let trusted = key().verifying_key();
        let huge = "A".repeat(MAX_HEADER_LEN + 1);
        let deep = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode("[".repeat(10_000) + &"]".repeat(10_000));
        let dup = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"a":1,"a":2}"#);
        let padded = header_at(now) + "==";
        let standard_b64 = base64::engine::general_purpose::STANDARD
            .encode(serde_json::to_vec(&decode(&header_at(now))).unwrap());
        let not_canonical = {
            let doc = decode(&header_at(now));
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(serde_json::to_string_pretty(&doc).unwrap())
        };
        let cases: Vec<(&str, String, &str)> = vec![
            ("empty", String::new(), "malformed"),
            ("huge", huge, "malformed"),
            ("space", "abc def".into(), "malformed"),
            ("newline", "abc\r\nX-Evil: 1".into(), "malformed"),
            ("non-ascii", "é".into(), "malformed"),
            ("padded", padded, "malformed"),
            ("not json", "bm90IGpzb24".into(), "malformed"),
            ("one bit", "A".into(), "malformed"),
            ("deep", deep, "malformed"),
            ("duplicate keys", dup, "malformed"),
            ("json null", "bnVsbA".into(), "bad_proof"),
            ("not canonical", not_canonical, "malformed"),
        ];
        for (what, value, code) in cases {
            let e = verify(&value, &trusted, now, None).unwrap_err();
            assert_eq!(e.code(), code, "{what}: {e}");
        }
        // Standard base64 may contain '+' or '/': refused either way.
        assert!(verify(&standard_b64, &trusted, now, None).is_err());
    }

    fn credential_for(tool: &str, args: &Value, uid: u32, now: OffsetDateTime) -> Value {
        let subject = AgentSubject {
            agent: "bot".into(),
            exe_sha256: None,
            uid: Some(uid),
            environment: Environment {
                host: "host-a".into(),
                cgroup: None,
            },
            scope: Scope::exact("mcp.test", tool, args).unwrap(),
        };
        let evidence = Evidence::approval("alice", Channel::Local, now).unwrap();
        action::issue(
            &key(),
            subject,
            now,
            now + Duration::from_secs(120),
            vec![evidence],
        )
        .unwrap()
        .0
    }

    #[test]
    fn embedded_credentials_must_match_their_call() {
        let now = OffsetDateTime::now_utc();
        let trusted = key().verifying_key();
        let args = json!({"amount": 5});
        let with = |cred: Value| {
            let mut s = sample_subject(BODY);
            s.calls[0].credential = Some(cred);
            let secured = receipt::issue(&key(), s, now, Duration::from_secs(60)).unwrap();
            verify(&encode(&secured).unwrap(), &trusted, now, Some(BODY))
        };
        let ok = with(credential_for("transfer", &args, 1001, now)).unwrap();
        assert_eq!(ok.credentials.len(), 1);
        assert_eq!(ok.credentials[0].1.subject.scope.tool, "transfer");
        for (what, cred) in [
            ("tool", credential_for("delete_records", &args, 1001, now)),
            (
                "args",
                credential_for("transfer", &json!({"amount": 6}), 1001, now),
            ),
            ("uid", credential_for("transfer", &args, 0, now)),
            (
                "expired",
                credential_for("transfer", &args, 1001, now - Duration::from_secs(600)),
            ),
        ] {
            let e = with(cred).unwrap_err();
            assert_eq!(e.code(), "credential_invalid", "{what}: {e}");
        }
        // A credential by another key, embedded in a receipt kya signed.
        let mut other = credential_for("transfer", &args, 1001, now);
        other["credentialSubject"]["agent"] = json!("mallory");
        let e = with(other).unwrap_err();
        assert_eq!(e.code(), "credential_invalid", "{e}");
    }
}
