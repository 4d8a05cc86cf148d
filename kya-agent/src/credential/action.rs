//! The kya action credential: a W3C Verifiable Credential (Data Model 2.0)
//! saying "this agent, running as this process identity on this host, may make
//! this tool call (or calls within this scope) until this time, because this
//! human approved it".
//!
//! # Who the issuer is, and why
//!
//! The issuer is **kya's own key** (`did:key` of `STATE_DIR/signing-key.pem`);
//! the approving human's verified identity is recorded as **evidence** (the Unix
//! user kya read from `SO_PEERCRED`, or the CIBA `sub` together with the SHA-256
//! of the ID token that proved it). Reasons:
//! * the humans have no keys kya could use: local approvers are authenticated by
//!   the kernel (peer credentials) and CIBA approvers by their OpenID Provider,
//!   whose ID token signs *its* statement, not a VC; asking every owner to
//!   manage an Ed25519 key would add a key-distribution problem and no security;
//! * kya is the party that verified the human and that enforces the credential,
//!   so a relying party needs exactly one trust anchor (kya's public key), and a
//!   credential can never be more than kya was willing to attest;
//! * the evidence is checkable after the fact: the ID token's SHA-256 is in the
//!   credential and in the audit log's `approved` record, so the provider-signed
//!   token (which the provider, or whoever kept it, can produce) is bound to
//!   exactly this approval.
//!
//! # Shape
//!
//! ```json
//! {"@context": ["https://www.w3.org/ns/credentials/v2"],
//!  "id": "urn:uuid:…", "type": ["VerifiableCredential", "KyaActionCredential"],
//!  "issuer": "did:key:z6Mk…", "validFrom": "…Z", "validUntil": "…Z",
//!  "credentialSubject": {
//!    "agent": "billing-bot", "exeSha256": "…", "uid": 1001,
//!    "environment": {"host": "build-7", "cgroup": "/agents/billing"},
//!    "scope": {"server": "mcp.example.com", "tool": "transfer",
//!              "argsSha256": "…" | "argBounds": [{"arg": "amount", "max": 500}],
//!              "singleUse": true}},
//!  "evidence": [{"type": ["KyaApproval"], "approver": "alice", "approverUid": 1000,
//!                "channel": "local", "approvedAt": "…Z", "idTokenSha256": "…"}],
//!  "proof": {"type": "DataIntegrityProof", "cryptosuite": "eddsa-jcs-2022", …}}
//! ```
//! Optional members are omitted when absent, never `null`. Terms not in the VC
//! v2 context fall under its `@vocab` (issuer-dependent terms), which is fine
//! for a JCS-secured credential: nothing is RDF-canonicalized.

use super::jcs::{self, JcsError};
use super::multikey;
use super::proof::{self, ProofError, ProofOptions, ASSERTION_METHOD};
use ed25519_dalek::SigningKey;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::{Number, Value};
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// The VC Data Model 2.0 base context; kya credentials carry exactly this one.
pub const VC_CONTEXT_V2: &str = "https://www.w3.org/ns/credentials/v2";
/// The VC type that marks a kya action credential.
pub const CREDENTIAL_TYPE: &str = "KyaActionCredential";
/// The evidence type of a human approval.
pub const EVIDENCE_TYPE: &str = "KyaApproval";
/// Longest agent, tool, server, host or cgroup string accepted in a credential.
pub const MAX_NAME_LEN: usize = 512;
/// Most argument bounds one scope may carry.
pub const MAX_BOUNDS: usize = 64;

/// Why a credential could not be issued or is not a well-formed kya credential.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("not a kya action credential: {0}")]
    Malformed(String),
    #[error("invalid scope: {0}")]
    Scope(String),
    #[error("validUntil must be after validFrom")]
    EmptyWindow,
    #[error("timestamp: {0}")]
    Time(String),
    #[error(transparent)]
    Proof(#[from] ProofError),
    #[error(transparent)]
    Jcs(#[from] JcsError),
}

/// What the credential allows: one exact call, or a wider scope an approver chose.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Scope {
    /// MCP server (SNI / Host, compared case-insensitively, port ignored); absent = any.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub server: Option<String>,
    /// The tool name (`params.name`), exact.
    pub tool: String,
    /// SHA-256 (hex) of the JCS form of the call's arguments: exactly these arguments.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub args_sha256: Option<String>,
    /// Numeric bounds on top-level arguments; every bound must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub arg_bounds: Vec<ArgBound>,
    /// Spent by its first use (the default for an approval of one exact call).
    pub single_use: bool,
}

impl Scope {
    /// Exactly one call: this server, this tool, these arguments, once. What an
    /// approval of a held call mints.
    pub fn exact(server: &str, tool: &str, args: &Value) -> Result<Self, JcsError> {
        Ok(Scope {
            server: Some(server.to_owned()),
            tool: tool.to_owned(),
            args_sha256: Some(args_digest(args)?),
            arg_bounds: Vec::new(),
            single_use: true,
        })
    }
}

/// `min <= args[arg] <= max` (either side optional, at least one present). The
/// argument must be present and a JSON number, else the call is not covered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArgBound {
    pub arg: String,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub min: Option<Number>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub max: Option<Number>,
}

/// Where the agent runs: the credential is useless on another host or cgroup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Environment {
    pub host: String,
    /// cgroup v2 path; the calling process must be in it or a descendant.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub cgroup: Option<String>,
}

/// The subject: the agent, bound to the identity kya observes for its process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentSubject {
    /// Registered agent name.
    pub agent: String,
    /// SHA-256 (hex) of the agent's executable.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub exe_sha256: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub uid: Option<u32>,
    pub environment: Environment,
    pub scope: Scope,
}

/// How the human's answer reached kya.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Channel {
    /// `kya approvals approve` over the control socket (SO_PEERCRED).
    Local,
    /// OpenID CIBA (ID token verified).
    Ciba,
    /// `kya credential issue`, offline, by a user who can read kya's key.
    CliIssue,
}

/// Evidence that a verified human approved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Evidence {
    #[serde(rename = "type")]
    pub kind: Vec<String>,
    /// The approver: Unix user name, or the CIBA subject.
    pub approver: String,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub approver_uid: Option<u32>,
    pub channel: Channel,
    /// RFC 3339.
    pub approved_at: String,
    /// SHA-256 (hex) of the CIBA ID token (the compact JWS) when the channel is CIBA.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub id_token_sha256: Option<String>,
    /// The approval request this answers, when there was one.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub approval_id: Option<String>,
    /// The binding message shown to the approver.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub binding_message: Option<String>,
}

impl Evidence {
    /// Evidence of an approval by `approver` over `channel` at `at`.
    pub fn approval(
        approver: &str,
        channel: Channel,
        at: OffsetDateTime,
    ) -> Result<Self, ActionError> {
        Ok(Evidence {
            kind: vec![EVIDENCE_TYPE.to_owned()],
            approver: approver.to_owned(),
            approver_uid: None,
            channel,
            approved_at: format_time(truncate(at)?)?,
            id_token_sha256: None,
            approval_id: None,
            binding_message: None,
        })
    }
}

impl Evidence {
    /// Record the CIBA ID token that proved the approval, by its SHA-256 (the
    /// token itself goes to the audit log, where the digest links to it).
    pub fn with_id_token(mut self, id_token: &str) -> Self {
        self.id_token_sha256 = Some(hex::encode(Sha256::digest(id_token.as_bytes())));
        self
    }
}

/// The credential document without its proof (the JSON layout above).
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
    credential_subject: AgentSubject,
    evidence: Vec<Evidence>,
}

/// A well-formed kya action credential (its proof already checked when it came
/// from [`ActionCredential::from_verified`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ActionCredential {
    /// `urn:uuid:…`: what revocation and the spent list refer to.
    pub id: String,
    /// `did:key:…` of the signing key.
    pub issuer: String,
    pub valid_from: OffsetDateTime,
    pub valid_until: OffsetDateTime,
    pub subject: AgentSubject,
    pub evidence: Vec<Evidence>,
}

impl ActionCredential {
    /// The scope as the policy engine's CEL `credential` variable sees it:
    /// the scope members plus `id`, `validUntil` and `approver`.
    pub fn scope_json(&self) -> Value {
        let mut v = serde_json::to_value(&self.subject.scope).unwrap_or(Value::Null);
        if let Value::Object(m) = &mut v {
            m.insert("id".into(), self.id.clone().into());
            m.insert(
                "validUntil".into(),
                format_time(self.valid_until).unwrap_or_default().into(),
            );
            if let Some(e) = self.evidence.first() {
                m.insert("approver".into(), e.approver.clone().into());
            }
        }
        v
    }

    /// Interpret a document whose proof has been verified (the proof removed).
    /// Strict: unknown members, wrong types, a missing type or context, a
    /// non-did:key issuer and an empty window are all refused.
    pub fn from_verified(document: &Value) -> Result<Self, ActionError> {
        let doc: Document = serde_json::from_value(document.clone())
            .map_err(|e| ActionError::Malformed(e.to_string()))?;
        if doc.context != [VC_CONTEXT_V2] {
            return Err(ActionError::Malformed(format!(
                "@context must be [{VC_CONTEXT_V2:?}]"
            )));
        }
        if doc.types != ["VerifiableCredential", CREDENTIAL_TYPE] {
            return Err(ActionError::Malformed(format!(
                "type must be [\"VerifiableCredential\", {CREDENTIAL_TYPE:?}]"
            )));
        }
        check_uuid_urn(&doc.id)?;
        multikey::resolve_did(&doc.issuer)
            .map_err(|e| ActionError::Malformed(format!("issuer: {e}")))?;
        let valid_from = parse_time(&doc.valid_from)?;
        let valid_until = parse_time(&doc.valid_until)?;
        if valid_until <= valid_from {
            return Err(ActionError::EmptyWindow);
        }
        validate_subject(&doc.credential_subject)?;
        if doc.evidence.is_empty() {
            return Err(ActionError::Malformed("no evidence of an approval".into()));
        }
        for e in &doc.evidence {
            if e.kind != [EVIDENCE_TYPE] {
                return Err(ActionError::Malformed(format!(
                    "evidence type must be [{EVIDENCE_TYPE:?}]"
                )));
            }
            check_name("evidence approver", &e.approver)?;
            parse_time(&e.approved_at)?;
            if let Some(d) = &e.id_token_sha256 {
                check_digest("idTokenSha256", d)?;
            }
        }
        Ok(ActionCredential {
            id: doc.id,
            issuer: doc.issuer,
            valid_from,
            valid_until,
            subject: doc.credential_subject,
            evidence: doc.evidence,
        })
    }
}

/// Issue (sign) a credential with kya's key. Times are truncated to whole
/// seconds so the JSON is plain RFC 3339.
pub fn issue(
    key: &SigningKey,
    subject: AgentSubject,
    valid_from: OffsetDateTime,
    valid_until: OffsetDateTime,
    evidence: Vec<Evidence>,
) -> Result<(Value, ActionCredential), ActionError> {
    let valid_from = truncate(valid_from)?;
    let valid_until = truncate(valid_until)?;
    let doc = Document {
        context: vec![VC_CONTEXT_V2.to_owned()],
        id: new_uuid_urn(),
        types: vec!["VerifiableCredential".into(), CREDENTIAL_TYPE.into()],
        issuer: multikey::did_key(&key.verifying_key()),
        valid_from: format_time(valid_from)?,
        valid_until: format_time(valid_until)?,
        credential_subject: subject,
        evidence,
    };
    let unsecured =
        serde_json::to_value(&doc).map_err(|e| ActionError::Malformed(e.to_string()))?;
    // Validate exactly what a verifier will: never sign what we would refuse.
    let credential = ActionCredential::from_verified(&unsecured)?;
    let options = ProofOptions {
        verification_method: multikey::verification_method(&key.verifying_key()),
        proof_purpose: ASSERTION_METHOD.to_owned(),
        created: Some(format_time(valid_from)?),
    };
    let secured = proof::create_proof(&unsecured, &options, key)?;
    Ok((secured, credential))
}

/// SHA-256 (hex) of the JCS form of a call's arguments: what `argsSha256`
/// pins. Fails for arguments JCS cannot represent exactly (fail closed).
pub fn args_digest(args: &Value) -> Result<String, JcsError> {
    let canonical = jcs::canonicalize(args)?;
    Ok(hex::encode(Sha256::digest(canonical.as_bytes())))
}

/// A JSON number as a double, only when the double is exactly that number:
/// integers beyond 2^53 are refused (`None`) because comparing their rounded
/// value against a bound could let 9007199254740993 pass `max = 9007199254740992`
/// while the server reads the exact integer.
pub fn exact_f64(n: &Number) -> Option<f64> {
    const MAX_SAFE: u64 = 1 << 53;
    if let Some(u) = n.as_u64() {
        return (u <= MAX_SAFE).then_some(u as f64);
    }
    if let Some(i) = n.as_i64() {
        return (i.unsigned_abs() <= MAX_SAFE).then_some(i as f64);
    }
    n.as_f64().filter(|f| f.is_finite())
}

/// RFC 3339 text of a time, UTC.
pub fn format_time(t: OffsetDateTime) -> Result<String, ActionError> {
    t.to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .map_err(|e| ActionError::Time(e.to_string()))
}

/// Parse an RFC 3339 time.
pub fn parse_time(text: &str) -> Result<OffsetDateTime, ActionError> {
    OffsetDateTime::parse(text, &Rfc3339).map_err(|e| ActionError::Time(format!("{text:?}: {e}")))
}

pub(crate) fn truncate(t: OffsetDateTime) -> Result<OffsetDateTime, ActionError> {
    t.replace_nanosecond(0)
        .map_err(|e| ActionError::Time(e.to_string()))
}

/// Deserialize an optional member that, when present, must not be `null`: a
/// signed `null` and an absent member would otherwise mean the same thing.
pub(crate) fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

pub(crate) fn new_uuid_urn() -> String {
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40; // version 4
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    let h = hex::encode(b);
    format!(
        "urn:uuid:{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

pub(crate) fn check_uuid_urn(id: &str) -> Result<(), ActionError> {
    let bad = || {
        ActionError::Malformed(format!(
            "id {:?} is not a urn:uuid",
            id.chars().take(80).collect::<String>()
        ))
    };
    let uuid = id.strip_prefix("urn:uuid:").ok_or_else(bad)?;
    let groups: Vec<&str> = uuid.split('-').collect();
    let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
    if lens != [8, 4, 4, 4, 12]
        || !groups.iter().all(|g| {
            g.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        })
    {
        return Err(bad());
    }
    Ok(())
}

pub(crate) fn check_name(what: &str, s: &str) -> Result<(), ActionError> {
    if s.is_empty() || s.len() > MAX_NAME_LEN || s.chars().any(char::is_control) {
        return Err(ActionError::Malformed(format!(
            "{what} must be 1..={MAX_NAME_LEN} bytes without control characters"
        )));
    }
    Ok(())
}

pub(crate) fn check_digest(what: &str, d: &str) -> Result<(), ActionError> {
    if d.len() != 64
        || !d
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    {
        return Err(ActionError::Malformed(format!(
            "{what} must be 64 lowercase hex digits"
        )));
    }
    Ok(())
}

/// The checks shared by issuing and verifying.
pub fn validate_subject(s: &AgentSubject) -> Result<(), ActionError> {
    check_name("agent", &s.agent)?;
    check_name("environment host", &s.environment.host)?;
    if let Some(c) = &s.environment.cgroup {
        check_name("environment cgroup", c)?;
        if !c.starts_with('/') {
            return Err(ActionError::Malformed(
                "environment cgroup must start with '/'".into(),
            ));
        }
    }
    if let Some(d) = &s.exe_sha256 {
        check_digest("exeSha256", d)?;
    }
    let scope = &s.scope;
    check_name("scope tool", &scope.tool).map_err(|e| ActionError::Scope(e.to_string()))?;
    if let Some(server) = &scope.server {
        check_name("scope server", server).map_err(|e| ActionError::Scope(e.to_string()))?;
    }
    if let Some(d) = &scope.args_sha256 {
        check_digest("argsSha256", d).map_err(|e| ActionError::Scope(e.to_string()))?;
    }
    if scope.arg_bounds.len() > MAX_BOUNDS {
        return Err(ActionError::Scope(format!(
            "more than {MAX_BOUNDS} argument bounds"
        )));
    }
    for b in &scope.arg_bounds {
        check_name("bound arg", &b.arg).map_err(|e| ActionError::Scope(e.to_string()))?;
        let exact = |n: &Option<Number>| match n {
            None => Ok(None),
            Some(n) => exact_f64(n).map(Some).ok_or_else(|| {
                ActionError::Scope(format!("bound on {:?} is not an exact number", b.arg))
            }),
        };
        match (exact(&b.min)?, exact(&b.max)?) {
            (None, None) => {
                return Err(ActionError::Scope(format!(
                    "bound on {:?} has neither min nor max",
                    b.arg
                )))
            }
            (Some(lo), Some(hi)) if lo > hi => {
                return Err(ActionError::Scope(format!(
                    "bound on {:?} has min > max",
                    b.arg
                )))
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    pub(crate) fn sample_subject() -> AgentSubject {
        AgentSubject {
            agent: "billing-bot".into(),
            exe_sha256: Some("ab".repeat(32)),
            uid: Some(1001),
            environment: Environment {
                host: "host-1".into(),
                cgroup: Some("/agents/billing".into()),
            },
            scope: Scope {
                server: Some("mcp.example.com".into()),
                tool: "transfer".into(),
                args_sha256: None,
                arg_bounds: vec![ArgBound {
                    arg: "amount".into(),
                    min: None,
                    max: Some(500.into()),
                }],
                single_use: false,
            },
        }
    }

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[3; 32])
    }

    #[test]
    fn issued_credential_verifies_and_parses_back_to_itself() {
        let from = datetime!(2026-11-26 12:00:00.123 UTC);
        let until = datetime!(2026-11-26 13:00:00 UTC);
        let ev = Evidence::approval("alice", Channel::CliIssue, from).unwrap();
        let (json, cred) = issue(&key(), sample_subject(), from, until, vec![ev]).unwrap();
        assert_eq!(json["validFrom"], "2026-11-26T12:00:00Z");
        assert_eq!(json["proof"]["cryptosuite"], "eddsa-jcs-2022");
        assert!(cred.id.starts_with("urn:uuid:"));
        let verified = proof::verify_proof(&json, ASSERTION_METHOD).unwrap();
        assert_eq!(verified.key, key().verifying_key());
        let parsed = ActionCredential::from_verified(&verified.document).unwrap();
        assert_eq!(parsed, cred);
        assert_eq!(parsed.scope_json()["argBounds"][0]["max"], 500);
        assert_eq!(parsed.scope_json()["approver"], "alice");
        // Two issues never share an id.
        let ev = Evidence::approval("alice", Channel::CliIssue, from).unwrap();
        let (_, other) = issue(&key(), sample_subject(), from, until, vec![ev]).unwrap();
        assert_ne!(other.id, cred.id);
    }

    #[test]
    fn invalid_requests_are_not_signed() {
        let from = datetime!(2026-11-26 12:00:00 UTC);
        let ev = || vec![Evidence::approval("alice", Channel::Local, from).unwrap()];
        assert!(matches!(
            issue(&key(), sample_subject(), from, from, ev()),
            Err(ActionError::EmptyWindow)
        ));
        let until = datetime!(2026-11-26 13:00:00 UTC);
        let mut s = sample_subject();
        s.scope.arg_bounds[0].max = None;
        assert!(matches!(
            issue(&key(), s, from, until, ev()),
            Err(ActionError::Scope(_))
        ));
        let mut s = sample_subject();
        s.scope.tool = String::new();
        assert!(matches!(
            issue(&key(), s, from, until, ev()),
            Err(ActionError::Scope(_))
        ));
        let mut s = sample_subject();
        s.scope.args_sha256 = Some("XYZ".into());
        assert!(matches!(
            issue(&key(), s, from, until, ev()),
            Err(ActionError::Scope(_))
        ));
        let mut s = sample_subject();
        s.agent = "a\nb".into();
        assert!(matches!(
            issue(&key(), s, from, until, ev()),
            Err(ActionError::Malformed(_))
        ));
        assert!(matches!(
            issue(&key(), sample_subject(), from, until, vec![]),
            Err(ActionError::Malformed(_))
        ));
    }

    #[test]
    fn foreign_or_malformed_documents_are_refused() {
        let from = datetime!(2026-11-26 12:00:00 UTC);
        let until = datetime!(2026-11-26 13:00:00 UTC);
        let ev = Evidence::approval("alice", Channel::Local, from).unwrap();
        let (json, _) = issue(&key(), sample_subject(), from, until, vec![ev]).unwrap();
        let doc = proof::verify_proof(&json, ASSERTION_METHOD)
            .unwrap()
            .document;
        let edit = |f: &dyn Fn(&mut Value)| {
            let mut d = doc.clone();
            f(&mut d);
            ActionCredential::from_verified(&d)
        };
        assert!(edit(&|_| {}).is_ok());
        type Edit = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("extra member", Box::new(|d| d["extra"] = 1.into())),
            (
                "extra scope member",
                Box::new(|d| d["credentialSubject"]["scope"]["anyTool"] = true.into()),
            ),
            (
                "uid as string",
                Box::new(|d| d["credentialSubject"]["uid"] = "1001".into()),
            ),
            (
                "negative uid",
                Box::new(|d| d["credentialSubject"]["uid"] = (-1).into()),
            ),
            (
                "uid too big",
                Box::new(|d| d["credentialSubject"]["uid"] = (1u64 << 40).into()),
            ),
            (
                "other type",
                Box::new(|d| d["type"] = serde_json::json!(["VerifiableCredential"])),
            ),
            (
                "other context",
                Box::new(|d| d["@context"] = serde_json::json!(["https://example.com"])),
            ),
            (
                "id not uuid",
                Box::new(|d| d["id"] = "urn:uuid:nope".into()),
            ),
            (
                "issuer not did:key",
                Box::new(|d| d["issuer"] = "https://kya.example".into()),
            ),
            (
                "bad validUntil",
                Box::new(|d| d["validUntil"] = "tomorrow".into()),
            ),
            (
                "window reversed",
                Box::new(|d| d["validUntil"] = "2026-11-26T11:00:00Z".into()),
            ),
            (
                "null server",
                Box::new(|d| d["credentialSubject"]["scope"]["server"] = Value::Null),
            ),
            (
                "no evidence",
                Box::new(|d| d["evidence"] = serde_json::json!([])),
            ),
            (
                "evidence channel",
                Box::new(|d| d["evidence"][0]["channel"] = "telepathy".into()),
            ),
            (
                "subject array",
                Box::new(|d| d["credentialSubject"] = serde_json::json!([])),
            ),
            (
                "no singleUse",
                Box::new(|d| {
                    d["credentialSubject"]["scope"]
                        .as_object_mut()
                        .unwrap()
                        .remove("singleUse");
                }),
            ),
        ];
        for (name, f) in cases {
            assert!(edit(&*f).is_err(), "{name} accepted");
        }
    }

    #[test]
    fn exact_scope_and_ciba_evidence_helpers() {
        let args = serde_json::json!({"amount": 5, "to": "bob"});
        let scope = Scope::exact("mcp.example.com", "transfer", &args).unwrap();
        assert!(scope.single_use);
        assert_eq!(scope.args_sha256, Some(args_digest(&args).unwrap()));
        let at = datetime!(2026-11-26 12:00:00 UTC);
        let ev = Evidence::approval("alice@example.com", Channel::Ciba, at)
            .unwrap()
            .with_id_token("eyJhbGciOiJSUzI1NiJ9.e30.sig");
        assert_eq!(
            ev.id_token_sha256.as_deref(),
            Some(hex::encode(Sha256::digest(b"eyJhbGciOiJSUzI1NiJ9.e30.sig")).as_str())
        );
        let mut subject = sample_subject();
        subject.scope = scope;
        let (json, _) = issue(
            &key(),
            subject,
            at,
            at + time::Duration::minutes(5),
            vec![ev],
        )
        .unwrap();
        assert_eq!(json["evidence"][0]["channel"], "ciba");
        assert_eq!(json["credentialSubject"]["scope"]["singleUse"], true);
    }

    #[test]
    fn args_digest_is_order_and_whitespace_independent() {
        let a = jcs::parse_strict(br#"{"to":"bob","amount":5000}"#, 1024).unwrap();
        let b = jcs::parse_strict(br#"{ "amount" : 5000.0 , "to" : "bob" }"#, 1024).unwrap();
        assert_eq!(args_digest(&a).unwrap(), args_digest(&b).unwrap());
        let c = jcs::parse_strict(br#"{"amount":5001,"to":"bob"}"#, 1024).unwrap();
        assert_ne!(args_digest(&a).unwrap(), args_digest(&c).unwrap());
        let inexact = jcs::parse_strict(b"{\"n\":9007199254740993}", 1024).unwrap();
        assert!(args_digest(&inexact).is_err());
    }
}
