//! The decision receipt: kya's signed statement to a server that asked for
//! one (`[proof] servers`) that kya decided and allowed exactly the request
//! it carries.
//!
//! It has the shape of the action credential ([`super::action`]): a W3C
//! Verifiable Credential (Data Model 2.0) issued by kya's key and secured
//! with an `eddsa-jcs-2022` Data Integrity proof, so one verifier reads both.
//!
//! ```json
//! {"@context": ["https://www.w3.org/ns/credentials/v2"],
//!  "id": "urn:uuid:…", "type": ["VerifiableCredential", "KyaDecisionReceipt"],
//!  "issuer": "did:key:z6Mk…", "validFrom": "…Z", "validUntil": "…Z",
//!  "credentialSubject": {
//!    "host": "build-7", "server": "mcp.example.com",
//!    "request": {"method": "POST", "path": "/mcp", "bodySha256": "…"},
//!    "agent": {"name": "billing-bot", "owner": "alice", "pid": 4242, "uid": 1000,
//!              "exe": "/usr/bin/python3.11", "cgroup": "/agents/billing"},
//!    "calls": [{"decision": "dec_…", "method": "tools/call", "tool": "transfer",
//!               "argsSha256": "…", "credential": {…the credential that released it…}}]},
//!  "proof": {"type": "DataIntegrityProof", "cryptosuite": "eddsa-jcs-2022", …}}
//! ```
//!
//! `bodySha256` is the SHA-256 of the exact body bytes kya sends upstream
//! (the canonical JSON of a judged JSON-RPC body), so the server recomputes
//! it over what it received. `calls` lists every decided message of the
//! body, in order (one per batch member; none for a body kya did not read
//! as JSON-RPC). Optional members are omitted when absent, never `null`.

use super::action::{self, ActionError};
use super::jcs::JcsError;
use super::multikey;
use super::proof::{self, ProofError, ProofOptions, ASSERTION_METHOD};
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::time::Duration;
use time::OffsetDateTime;

/// The VC type that marks a decision receipt.
pub const RECEIPT_TYPE: &str = "KyaDecisionReceipt";
/// The longest window a receipt may have: receipts are short-lived.
pub const MAX_TTL: Duration = Duration::from_secs(600);
/// Most calls one receipt lists (a JSON-RPC batch).
pub const MAX_CALLS: usize = 1024;
/// Longest path, executable or cgroup string in a receipt.
const MAX_PATH_LEN: usize = 8192;

/// Why a receipt could not be issued or is not a well-formed receipt.
#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    #[error("not a kya decision receipt: {0}")]
    Malformed(String),
    #[error("receipt window: {0}")]
    Window(String),
    #[error(transparent)]
    Proof(#[from] ProofError),
    #[error(transparent)]
    Jcs(#[from] JcsError),
    #[error(transparent)]
    Action(#[from] ActionError),
}

/// The request the receipt is bound to, as kya sent it upstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestBinding {
    /// HTTP method.
    pub method: String,
    /// Path and query as sent (`/mcp`, `/messages/?session_id=…`).
    pub path: String,
    /// SHA-256 (hex) of the body bytes as sent (empty body: of nothing).
    pub body_sha256: String,
}

/// The agent and the process behind the request, as the decision recorded them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentBinding {
    /// Registered agent name (or `unregistered`).
    pub name: String,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "action::present"
    )]
    pub owner: Option<String>,
    pub pid: u32,
    pub uid: u32,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "action::present"
    )]
    pub exe: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "action::present"
    )]
    pub cgroup: Option<String>,
}

/// One decided message of the request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReceiptCall {
    /// The decision id (as in the audit log).
    pub decision: String,
    /// JSON-RPC method.
    pub method: String,
    /// `params.name` of a `tools/call`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "action::present"
    )]
    pub tool: Option<String>,
    /// SHA-256 (hex) of the JCS form of the arguments (`params` for other
    /// methods), as credentials pin them; absent only when JCS cannot
    /// represent them exactly (an integer beyond 2^53).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "action::present"
    )]
    pub args_sha256: Option<String>,
    /// The secured action credential that released this call (an approval,
    /// or a standing credential).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "action::present"
    )]
    pub credential: Option<Value>,
}

/// What the receipt says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReceiptSubject {
    /// The host kya runs on.
    pub host: String,
    /// The server as policy saw it (SNI, a `Host` that resolves to the
    /// destination, or the destination address).
    pub server: String,
    pub request: RequestBinding,
    pub agent: AgentBinding,
    pub calls: Vec<ReceiptCall>,
}

/// The receipt without its proof (the JSON layout above).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Document {
    #[serde(rename = "@context")]
    context: Vec<String>,
    id: String,
    #[serde(rename = "type")]
    types: Vec<String>,
    issuer: String,
    valid_from: String,
    valid_until: String,
    credential_subject: ReceiptSubject,
}

/// A well-formed receipt (its proof checked when it came from
/// [`Receipt::from_verified`] after a proof verification).
#[derive(Debug, Clone, PartialEq)]
pub struct Receipt {
    pub id: String,
    pub issuer: String,
    pub valid_from: OffsetDateTime,
    pub valid_until: OffsetDateTime,
    pub subject: ReceiptSubject,
}

impl Receipt {
    /// Interpret a document whose proof has been verified (the proof
    /// removed). Strict: unknown members, wrong types, a window longer than
    /// [`MAX_TTL`] and malformed digests are refused.
    pub fn from_verified(document: &Value) -> Result<Self, ReceiptError> {
        let doc: Document = serde_json::from_value(document.clone())
            .map_err(|e| ReceiptError::Malformed(e.to_string()))?;
        if doc.context != [action::VC_CONTEXT_V2] {
            return Err(ReceiptError::Malformed(format!(
                "@context must be [{:?}]",
                action::VC_CONTEXT_V2
            )));
        }
        if doc.types != ["VerifiableCredential", RECEIPT_TYPE] {
            return Err(ReceiptError::Malformed(format!(
                "type must be [\"VerifiableCredential\", {RECEIPT_TYPE:?}]"
            )));
        }
        action::check_uuid_urn(&doc.id)?;
        multikey::resolve_did(&doc.issuer)
            .map_err(|e| ReceiptError::Malformed(format!("issuer: {e}")))?;
        let valid_from = action::parse_time(&doc.valid_from)?;
        let valid_until = action::parse_time(&doc.valid_until)?;
        check_window(valid_from, valid_until)?;
        validate_subject(&doc.credential_subject)?;
        Ok(Receipt {
            id: doc.id,
            issuer: doc.issuer,
            valid_from,
            valid_until,
            subject: doc.credential_subject,
        })
    }
}

fn check_window(from: OffsetDateTime, until: OffsetDateTime) -> Result<(), ReceiptError> {
    if until <= from {
        return Err(ReceiptError::Window(
            "validUntil must be after validFrom".into(),
        ));
    }
    if until - from > MAX_TTL {
        return Err(ReceiptError::Window(format!(
            "longer than {}s: receipts are short-lived",
            MAX_TTL.as_secs()
        )));
    }
    Ok(())
}

fn check_text(what: &str, s: &str, max: usize) -> Result<(), ReceiptError> {
    if s.is_empty() || s.len() > max || s.chars().any(char::is_control) {
        return Err(ReceiptError::Malformed(format!(
            "{what} must be 1..={max} bytes without control characters"
        )));
    }
    Ok(())
}

/// The checks shared by issuing and verifying.
fn validate_subject(s: &ReceiptSubject) -> Result<(), ReceiptError> {
    action::check_name("host", &s.host)?;
    action::check_name("server", &s.server)?;
    let r = &s.request;
    if r.method.is_empty()
        || r.method.len() > 32
        || !r.method.bytes().all(|b| b.is_ascii_alphabetic())
    {
        return Err(ReceiptError::Malformed(
            "request method must be an HTTP method".into(),
        ));
    }
    check_text("request path", &r.path, MAX_PATH_LEN)?;
    action::check_digest("bodySha256", &r.body_sha256)?;
    let a = &s.agent;
    action::check_name("agent name", &a.name)?;
    if let Some(o) = &a.owner {
        action::check_name("agent owner", o)?;
    }
    // File and cgroup names may hold any character but `/` and NUL: only
    // their length is bounded (JSON escapes the rest).
    for (what, p) in [("agent exe", &a.exe), ("agent cgroup", &a.cgroup)] {
        if let Some(p) = p {
            if p.is_empty() || p.len() > MAX_PATH_LEN {
                return Err(ReceiptError::Malformed(format!(
                    "{what} must be 1..={MAX_PATH_LEN} bytes"
                )));
            }
        }
    }
    if s.calls.len() > MAX_CALLS {
        return Err(ReceiptError::Malformed(format!(
            "more than {MAX_CALLS} calls"
        )));
    }
    for c in &s.calls {
        action::check_name("call decision", &c.decision)?;
        action::check_name("call method", &c.method)?;
        if let Some(t) = &c.tool {
            action::check_name("call tool", t)?;
        }
        if let Some(d) = &c.args_sha256 {
            action::check_digest("argsSha256", d)?;
        }
        if let Some(cred) = &c.credential {
            if !cred.is_object() {
                return Err(ReceiptError::Malformed(
                    "a call's credential must be a JSON object".into(),
                ));
            }
        }
    }
    Ok(())
}

/// Issue (sign) a receipt valid from `now` (truncated to the second) for
/// `ttl`. Returns the secured document.
pub fn issue(
    key: &SigningKey,
    subject: ReceiptSubject,
    now: OffsetDateTime,
    ttl: Duration,
) -> Result<Value, ReceiptError> {
    let valid_from = action::truncate(now)?;
    let valid_until = valid_from + ttl;
    let doc = Document {
        context: vec![action::VC_CONTEXT_V2.to_owned()],
        id: action::new_uuid_urn(),
        types: vec!["VerifiableCredential".into(), RECEIPT_TYPE.into()],
        issuer: multikey::did_key(&key.verifying_key()),
        valid_from: action::format_time(valid_from)?,
        valid_until: action::format_time(valid_until)?,
        credential_subject: subject,
    };
    check_window(valid_from, valid_until)?;
    validate_subject(&doc.credential_subject)?;
    let unsecured =
        serde_json::to_value(&doc).map_err(|e| ReceiptError::Malformed(e.to_string()))?;
    let options = ProofOptions {
        verification_method: multikey::verification_method(&key.verifying_key()),
        proof_purpose: ASSERTION_METHOD.to_owned(),
        created: Some(action::format_time(valid_from)?),
    };
    Ok(proof::create_proof(&unsecured, &options, key)?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample_subject(body: &[u8]) -> ReceiptSubject {
        use sha2::{Digest, Sha256};
        ReceiptSubject {
            host: "host-a".into(),
            server: "mcp.test".into(),
            request: RequestBinding {
                method: "POST".into(),
                path: "/mcp".into(),
                body_sha256: hex::encode(Sha256::digest(body)),
            },
            agent: AgentBinding {
                name: "bot".into(),
                owner: Some("alice".into()),
                pid: 42,
                uid: 1001,
                exe: Some("/usr/bin/python3".into()),
                cgroup: Some("/agents/bot".into()),
            },
            calls: vec![ReceiptCall {
                decision: "dec_0123456789abcdef".into(),
                method: "tools/call".into(),
                tool: Some("transfer".into()),
                args_sha256: Some(action::args_digest(&serde_json::json!({"amount": 5})).unwrap()),
                credential: None,
            }],
        }
    }

    #[test]
    fn issued_receipts_verify_and_read_back() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let now = OffsetDateTime::now_utc();
        let secured = issue(&key, sample_subject(b"{}"), now, Duration::from_secs(60)).unwrap();
        let v = proof::verify_proof(&secured, ASSERTION_METHOD).unwrap();
        assert_eq!(v.key, key.verifying_key());
        let r = Receipt::from_verified(&v.document).unwrap();
        assert_eq!(r.subject, sample_subject(b"{}"));
        assert_eq!(r.valid_until - r.valid_from, Duration::from_secs(60));
        assert!(r.valid_from <= now);
        // No `null` anywhere: absent members are omitted.
        assert!(!secured.to_string().contains("null"), "{secured}");
    }

    #[test]
    fn malformed_subjects_and_windows_are_refused() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let now = OffsetDateTime::now_utc();
        let too_long = issue(
            &key,
            sample_subject(b""),
            now,
            MAX_TTL + Duration::from_secs(1),
        );
        assert!(matches!(too_long, Err(ReceiptError::Window(_))));
        let zero = issue(&key, sample_subject(b""), now, Duration::ZERO);
        assert!(matches!(zero, Err(ReceiptError::Window(_))));
        let mut s = sample_subject(b"");
        s.request.body_sha256 = "ABC".into();
        assert!(issue(&key, s, now, Duration::from_secs(60)).is_err());
        let mut s = sample_subject(b"");
        s.request.method = "PO ST".into();
        assert!(issue(&key, s, now, Duration::from_secs(60)).is_err());
        let mut s = sample_subject(b"");
        s.agent.name = "a\nb".into();
        assert!(issue(&key, s, now, Duration::from_secs(60)).is_err());

        let secured = issue(&key, sample_subject(b""), now, Duration::from_secs(60)).unwrap();
        let doc = proof::verify_proof(&secured, ASSERTION_METHOD)
            .unwrap()
            .document;
        let with = |f: &dyn Fn(&mut serde_json::Map<String, Value>)| {
            let mut d = doc.as_object().unwrap().clone();
            f(&mut d);
            Receipt::from_verified(&Value::Object(d))
        };
        assert!(with(&|d| {
            d.insert("extra".into(), 1.into());
        })
        .is_err());
        assert!(with(&|d| {
            d.insert(
                "type".into(),
                serde_json::json!(["VerifiableCredential", "KyaActionCredential"]),
            );
        })
        .is_err());
        assert!(with(&|d| {
            d["credentialSubject"]["agent"]["owner"] = Value::Null;
        })
        .is_err());
        assert!(with(&|d| {
            d["credentialSubject"]["calls"][0]["credential"] = serde_json::json!("a string");
        })
        .is_err());
        assert!(with(&|d| {
            d["credentialSubject"]["calls"][0]["surprise"] = serde_json::json!(true);
        })
        .is_err());
        assert!(with(&|d| {
            d["id"] = serde_json::json!("dec_1");
        })
        .is_err());
        assert!(with(&|d| {
            d.remove("validUntil");
        })
        .is_err());
    }
}
