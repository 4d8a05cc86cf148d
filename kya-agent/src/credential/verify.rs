//! Verify a credential for one concrete call: is this call, by this process,
//! now, allowed by this credential?
//!
//! Each check has its own error so a denial (and the audit record) says exactly
//! why a credential did not release a call. Order: the proof and the issuer's
//! key first (nothing else in an unauthenticated document is worth reading),
//! then the window, the binding to the process, the scope, revocation, and
//! last the single-use spend, which is the only check with a side effect.

use super::action::{self, ActionCredential, ActionError};
use super::jcs::{self, JcsError};
use super::multikey;
use super::proof::{self, ProofError, ASSERTION_METHOD};
use super::store::{Covering, CredentialStore, StoreError};
use ed25519_dalek::VerifyingKey;
use serde_json::Value;
use time::OffsetDateTime;

/// The proof members kya writes, and the only ones it accepts.
const KYA_PROOF_MEMBERS: [&str; 7] = [
    "type",
    "cryptosuite",
    "created",
    "verificationMethod",
    "proofPurpose",
    "@context",
    "proofValue",
];

/// The call a credential is checked against, as kya observed it.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// Registered agent name the process resolved to.
    pub agent: String,
    pub uid: u32,
    /// cgroup v2 path of the process.
    pub cgroup: String,
    /// SHA-256 (hex) of the process's executable, when kya could compute it.
    pub exe_sha256: Option<String>,
    /// The host kya runs on.
    pub host: String,
    /// SNI / Host of the MCP server.
    pub server: String,
    /// JSON-RPC method (credentials only cover `tools/call`).
    pub method: String,
    pub tool: String,
    pub args: Value,
}

/// Why a credential does not release a call.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("credential is not valid JSON: {0}")]
    Json(#[from] JcsError),
    #[error("proof: {0}")]
    Proof(#[from] ProofError),
    #[error("{0}")]
    Malformed(#[from] ActionError),
    #[error("credential signed by {found}, not by the trusted key {trusted}")]
    UntrustedIssuer { found: String, trusted: String },
    #[error("credential issuer {issuer} is not the key that signed it")]
    IssuerMismatch { issuer: String },
    #[error("credential not valid before {0}")]
    NotYetValid(String),
    #[error("credential expired at {0}")]
    Expired(String),
    #[error("credentials cover tools/call only, not {0:?}")]
    NotAToolCall(String),
    #[error("credential is for tool {scope:?}, not {call:?}")]
    WrongTool { scope: String, call: String },
    #[error("credential is for server {scope:?}, not {call:?}")]
    WrongServer { scope: String, call: String },
    #[error("the call's arguments are not the ones approved")]
    ArgsMismatch,
    #[error("the call's arguments cannot be canonicalized: {0}")]
    ArgsNotCanonical(JcsError),
    #[error("argument {arg:?} is missing or not a number, and the credential bounds it")]
    ArgNotNumeric { arg: String },
    #[error("argument {arg:?} is outside the credential's bounds")]
    ArgOutOfBounds { arg: String },
    #[error("credential is for agent {scope:?}, not {call:?}")]
    WrongAgent { scope: String, call: String },
    #[error("credential is for uid {scope}, not {call}")]
    WrongUid { scope: u32, call: u32 },
    #[error("credential is for cgroup {scope:?}, the process is in {call:?}")]
    WrongCgroup { scope: String, call: String },
    #[error("credential is for another executable (SHA-256 {scope})")]
    WrongExe { scope: String },
    #[error("credential binds the executable's SHA-256, which is unknown for this process")]
    ExeUnknown,
    #[error("credential is for host {scope:?}, this is {call:?}")]
    WrongHost { scope: String, call: String },
    #[error("credential {0} is revoked")]
    Revoked(String),
    #[error("single-use credential {0} was already used")]
    Replayed(String),
    #[error("credential store: {0}")]
    Store(StoreError),
}

impl VerifyError {
    /// A short stable code for logs, audit records and `--json` output.
    pub fn code(&self) -> &'static str {
        match self {
            VerifyError::Json(_) | VerifyError::Malformed(_) => "malformed",
            VerifyError::Proof(_) => "bad_proof",
            VerifyError::UntrustedIssuer { .. } | VerifyError::IssuerMismatch { .. } => {
                "untrusted_issuer"
            }
            VerifyError::NotYetValid(_) => "not_yet_valid",
            VerifyError::Expired(_) => "expired",
            VerifyError::NotAToolCall(_)
            | VerifyError::WrongTool { .. }
            | VerifyError::WrongServer { .. }
            | VerifyError::ArgsMismatch
            | VerifyError::ArgsNotCanonical(_)
            | VerifyError::ArgNotNumeric { .. }
            | VerifyError::ArgOutOfBounds { .. } => "out_of_scope",
            VerifyError::WrongAgent { .. }
            | VerifyError::WrongUid { .. }
            | VerifyError::WrongCgroup { .. }
            | VerifyError::WrongExe { .. }
            | VerifyError::ExeUnknown
            | VerifyError::WrongHost { .. } => "wrong_binding",
            VerifyError::Revoked(_) => "revoked",
            VerifyError::Replayed(_) => "replayed",
            VerifyError::Store(_) => "store_error",
        }
    }
}

/// Parse (strictly) and verify a credential's proof against the trusted key,
/// and check it is a well-formed kya action credential. No call-specific checks.
pub fn verify_bytes(bytes: &[u8], trusted: &VerifyingKey) -> Result<ActionCredential, VerifyError> {
    let doc = jcs::parse_strict(bytes, jcs::MAX_INPUT_BYTES)?;
    verify_document(&doc, trusted)
}

/// [`verify_bytes`] for an already parsed document.
///
/// Stricter than the cryptosuite alone, because kya issues these and knows
/// their exact shape: the proof carries only the members kya writes (no
/// `expires`, `domain`, `challenge`, `previousProof`… whose semantics this
/// verifier would otherwise silently ignore), and its `@context` equals the
/// document's (the spec only requires a prefix, which would let unsigned
/// contexts ride along).
pub fn verify_document(
    doc: &Value,
    trusted: &VerifyingKey,
) -> Result<ActionCredential, VerifyError> {
    let verified = proof::verify_proof(doc, ASSERTION_METHOD)?;
    check_proof_shape(doc).map_err(|m| VerifyError::Malformed(ActionError::Malformed(m)))?;
    if verified.key != *trusted {
        return Err(VerifyError::UntrustedIssuer {
            found: multikey::did_key(&verified.key),
            trusted: multikey::did_key(trusted),
        });
    }
    let credential = ActionCredential::from_verified(&verified.document)?;
    if credential.issuer != multikey::did_key(&verified.key) {
        return Err(VerifyError::IssuerMismatch {
            issuer: credential.issuer,
        });
    }
    Ok(credential)
}

/// The proof of a document kya signed carries only the members kya writes,
/// and its `@context` equals the document's (see [`verify_document`]).
pub(crate) fn check_proof_shape(doc: &Value) -> Result<(), String> {
    if let Some(p) = doc.get("proof").and_then(Value::as_object) {
        if let Some(extra) = p.keys().find(|k| !KYA_PROOF_MEMBERS.contains(&k.as_str())) {
            return Err(format!(
                "unexpected proof member {:?}",
                extra.chars().take(60).collect::<String>()
            ));
        }
        if p.get("@context").is_none() || p.get("@context") != doc.get("@context") {
            return Err("proof @context must equal the document's @context".into());
        }
    }
    Ok(())
}

/// `validFrom <= now < validUntil`.
pub fn check_window(cred: &ActionCredential, now: OffsetDateTime) -> Result<(), VerifyError> {
    let show = |t| action::format_time(t).unwrap_or_default();
    if now < cred.valid_from {
        return Err(VerifyError::NotYetValid(show(cred.valid_from)));
    }
    if now >= cred.valid_until {
        return Err(VerifyError::Expired(show(cred.valid_until)));
    }
    Ok(())
}

/// The credential is bound to this agent, process identity and host.
pub fn check_binding(cred: &ActionCredential, call: &Call) -> Result<(), VerifyError> {
    let s = &cred.subject;
    if s.agent != call.agent {
        return Err(VerifyError::WrongAgent {
            scope: s.agent.clone(),
            call: call.agent.clone(),
        });
    }
    if let Some(uid) = s.uid {
        if uid != call.uid {
            return Err(VerifyError::WrongUid {
                scope: uid,
                call: call.uid,
            });
        }
    }
    if let Some(want) = &s.exe_sha256 {
        match &call.exe_sha256 {
            None => return Err(VerifyError::ExeUnknown),
            Some(have) if !have.eq_ignore_ascii_case(want) => {
                return Err(VerifyError::WrongExe {
                    scope: want.clone(),
                })
            }
            Some(_) => {}
        }
    }
    if s.environment.host != call.host {
        return Err(VerifyError::WrongHost {
            scope: s.environment.host.clone(),
            call: call.host.clone(),
        });
    }
    if let Some(cg) = &s.environment.cgroup {
        if !cgroup_within(&call.cgroup, cg) {
            return Err(VerifyError::WrongCgroup {
                scope: cg.clone(),
                call: call.cgroup.clone(),
            });
        }
    }
    Ok(())
}

/// The call is inside the credential's scope.
pub fn check_scope(cred: &ActionCredential, call: &Call) -> Result<(), VerifyError> {
    let scope = &cred.subject.scope;
    if call.method != "tools/call" {
        return Err(VerifyError::NotAToolCall(call.method.clone()));
    }
    if scope.tool != call.tool {
        return Err(VerifyError::WrongTool {
            scope: scope.tool.clone(),
            call: call.tool.clone(),
        });
    }
    if let Some(server) = &scope.server {
        if !host_eq(server, &call.server) {
            return Err(VerifyError::WrongServer {
                scope: server.clone(),
                call: call.server.clone(),
            });
        }
    }
    if let Some(want) = &scope.args_sha256 {
        let have = action::args_digest(&call.args).map_err(VerifyError::ArgsNotCanonical)?;
        if &have != want {
            return Err(VerifyError::ArgsMismatch);
        }
    }
    for bound in &scope.arg_bounds {
        let Some(v) = call
            .args
            .get(&bound.arg)
            .and_then(Value::as_number)
            .and_then(action::exact_f64)
        else {
            return Err(VerifyError::ArgNotNumeric {
                arg: bound.arg.clone(),
            });
        };
        // A bound that is not an exact number (never issued, but be sure)
        // counts as violated: fail closed.
        let outside = |limit: &Option<serde_json::Number>, beyond: fn(f64, f64) -> bool| {
            limit
                .as_ref()
                .is_some_and(|n| action::exact_f64(n).is_none_or(|m| beyond(v, m)))
        };
        let below = outside(&bound.min, |v, m| v < m);
        let above = outside(&bound.max, |v, m| v > m);
        if below || above {
            return Err(VerifyError::ArgOutOfBounds {
                arg: bound.arg.clone(),
            });
        }
    }
    Ok(())
}

/// Window, binding and scope: everything but revocation and spending.
pub fn check_call(
    cred: &ActionCredential,
    call: &Call,
    now: OffsetDateTime,
) -> Result<(), VerifyError> {
    check_window(cred, now)?;
    check_binding(cred, call)?;
    check_scope(cred, call)
}

/// Everything, for a credential presented with a call: proof and issuer,
/// window, binding, scope, revocation, and (for a single-use credential)
/// spending it, atomically and persistently, so a replay is refused even
/// after a restart.
pub fn verify_for_call(
    doc: &Value,
    trusted: &VerifyingKey,
    call: &Call,
    now: OffsetDateTime,
    store: &CredentialStore,
) -> Result<ActionCredential, VerifyError> {
    let cred = verify_document(doc, trusted)?;
    check_call(&cred, call, now)?;
    redeem(&cred, now, store)?;
    Ok(cred)
}

/// The first standing credential in `store` signed by `trusted` whose
/// window, binding and scope cover `call` at `now` (not revoked, not spent).
/// Finding one does not spend it: [`redeem`] does.
pub fn find_covering(
    store: &CredentialStore,
    call: &Call,
    now: OffsetDateTime,
    trusted: &VerifyingKey,
) -> Result<Option<Covering>, StoreError> {
    store.find_covering_with(trusted, |c| check_call(c, call, now).is_ok())
}

/// Refuse a revoked credential and spend a single-use one.
pub fn redeem(
    cred: &ActionCredential,
    now: OffsetDateTime,
    store: &CredentialStore,
) -> Result<(), VerifyError> {
    if store.is_revoked(&cred.id).map_err(VerifyError::Store)? {
        return Err(VerifyError::Revoked(cred.id.clone()));
    }
    if cred.subject.scope.single_use {
        match store.spend(&cred.id, cred.valid_until, now) {
            Ok(()) => {}
            Err(StoreError::AlreadySpent(id)) => return Err(VerifyError::Replayed(id)),
            Err(e) => return Err(VerifyError::Store(e)),
        }
    }
    Ok(())
}

/// `/a/b` is within `/a` and `/a/b`, not within `/a/bc`. `/` contains all.
fn cgroup_within(path: &str, scope: &str) -> bool {
    let scope = scope.trim_end_matches('/');
    scope.is_empty()
        || path == scope
        || path
            .strip_prefix(scope)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Server names compare case-insensitively with any port and trailing dot dropped.
fn host_eq(a: &str, b: &str) -> bool {
    fn norm(h: &str) -> String {
        let h = if let Some(rest) = h.strip_prefix('[') {
            rest.split(']').next().unwrap_or(rest)
        } else if h.matches(':').count() == 1 {
            h.split(':').next().unwrap_or(h)
        } else {
            h
        };
        h.trim_end_matches('.').to_ascii_lowercase()
    }
    norm(a) == norm(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credential::action::{
        issue, AgentSubject, ArgBound, Channel, Environment, Evidence, Scope,
    };
    use ed25519_dalek::SigningKey;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-26 12:30:00 UTC);

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[5; 32])
    }

    fn subject(scope: Scope) -> AgentSubject {
        AgentSubject {
            agent: "billing-bot".into(),
            exe_sha256: Some("cd".repeat(32)),
            uid: Some(1001),
            environment: Environment {
                host: "host-1".into(),
                cgroup: Some("/agents/billing".into()),
            },
            scope,
        }
    }

    fn exact_scope() -> Scope {
        Scope {
            server: Some("mcp.example.com".into()),
            tool: "transfer".into(),
            args_sha256: Some(action::args_digest(&call().args).unwrap()),
            arg_bounds: vec![],
            single_use: true,
        }
    }

    fn bounded_scope() -> Scope {
        Scope {
            server: None,
            tool: "transfer".into(),
            args_sha256: None,
            arg_bounds: vec![ArgBound {
                arg: "amount".into(),
                min: Some(0.into()),
                max: Some(500.into()),
            }],
            single_use: false,
        }
    }

    fn call() -> Call {
        Call {
            agent: "billing-bot".into(),
            uid: 1001,
            cgroup: "/agents/billing/worker".into(),
            exe_sha256: Some("cd".repeat(32)),
            host: "host-1".into(),
            server: "MCP.example.com:443".into(),
            method: "tools/call".into(),
            tool: "transfer".into(),
            args: serde_json::json!({"amount": 400, "to": "bob"}),
        }
    }

    fn signed(scope: Scope) -> Value {
        let ev = Evidence::approval("alice", Channel::Local, datetime!(2026-11-26 12:00:00 UTC))
            .unwrap();
        issue(
            &key(),
            subject(scope),
            datetime!(2026-11-26 12:00:00 UTC),
            datetime!(2026-11-26 13:00:00 UTC),
            vec![ev],
        )
        .unwrap()
        .0
    }

    fn store() -> (tempfile::TempDir, CredentialStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = CredentialStore::open(dir.path()).unwrap();
        (dir, store)
    }

    #[test]
    fn exact_credential_releases_its_call_once() {
        let (_d, store) = store();
        let doc = signed(exact_scope());
        let vk = key().verifying_key();
        verify_for_call(&doc, &vk, &call(), NOW, &store).unwrap();
        let again = verify_for_call(&doc, &vk, &call(), NOW, &store).unwrap_err();
        assert!(matches!(again, VerifyError::Replayed(_)), "{again}");
        assert_eq!(again.code(), "replayed");
    }

    #[test]
    fn replay_is_refused_after_a_restart() {
        let (dir, store) = store();
        let doc = signed(exact_scope());
        let vk = key().verifying_key();
        verify_for_call(&doc, &vk, &call(), NOW, &store).unwrap();
        drop(store);
        let reopened = CredentialStore::open(dir.path()).unwrap();
        assert!(matches!(
            verify_for_call(&doc, &vk, &call(), NOW, &reopened),
            Err(VerifyError::Replayed(_))
        ));
    }

    #[test]
    fn bounded_credential_is_reusable_within_bounds() {
        let (_d, store) = store();
        let doc = signed(bounded_scope());
        let vk = key().verifying_key();
        for amount in [0, 1, 499, 500] {
            let mut c = call();
            c.args["amount"] = amount.into();
            verify_for_call(&doc, &vk, &c, NOW, &store).unwrap();
        }
        let mut c = call();
        c.args["amount"] = serde_json::json!(500.5);
        assert!(matches!(
            verify_for_call(&doc, &vk, &c, NOW, &store),
            Err(VerifyError::ArgOutOfBounds { .. })
        ));
        c.args["amount"] = serde_json::json!(-1);
        assert!(matches!(
            verify_for_call(&doc, &vk, &c, NOW, &store),
            Err(VerifyError::ArgOutOfBounds { .. })
        ));
        for bad in [
            serde_json::json!("400"),
            Value::Null,
            serde_json::json!([400]),
        ] {
            c.args["amount"] = bad;
            assert!(matches!(
                verify_for_call(&doc, &vk, &c, NOW, &store),
                Err(VerifyError::ArgNotNumeric { .. })
            ));
        }
        // Integers a double cannot hold exactly are never compared by rounding.
        c.args["amount"] = serde_json::json!(9007199254740993u64);
        assert!(matches!(
            verify_for_call(&doc, &vk, &c, NOW, &store),
            Err(VerifyError::ArgNotNumeric { .. })
        ));
        c.args = serde_json::json!({"to": "bob"});
        assert!(matches!(
            verify_for_call(&doc, &vk, &c, NOW, &store),
            Err(VerifyError::ArgNotNumeric { .. })
        ));
        c.args = serde_json::json!([1, 2]);
        assert!(verify_for_call(&doc, &vk, &c, NOW, &store).is_err());
    }

    #[test]
    fn each_mismatch_has_its_own_error() {
        let (_d, store) = store();
        let doc = signed(exact_scope());
        let vk = key().verifying_key();
        type Edit = Box<dyn Fn(&mut Call)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("wrong_binding", Box::new(|c| c.agent = "other-bot".into())),
            ("wrong_binding", Box::new(|c| c.uid = 0)),
            (
                "wrong_binding",
                Box::new(|c| c.cgroup = "/agents/billing2".into()),
            ),
            ("wrong_binding", Box::new(|c| c.cgroup = "/agents".into())),
            (
                "wrong_binding",
                Box::new(|c| c.exe_sha256 = Some("ce".repeat(32))),
            ),
            ("wrong_binding", Box::new(|c| c.exe_sha256 = None)),
            ("wrong_binding", Box::new(|c| c.host = "host-2".into())),
            ("out_of_scope", Box::new(|c| c.tool = "transfer2".into())),
            ("out_of_scope", Box::new(|c| c.tool = "Transfer".into())),
            (
                "out_of_scope",
                Box::new(|c| c.server = "mcp.example.com.evil".into()),
            ),
            (
                "out_of_scope",
                Box::new(|c| c.method = "resources/read".into()),
            ),
            ("out_of_scope", Box::new(|c| c.args["amount"] = 401.into())),
            ("out_of_scope", Box::new(|c| c.args["extra"] = true.into())),
            ("out_of_scope", Box::new(|c| c.args = Value::Null)),
        ];
        for (code, edit) in cases {
            let mut c = call();
            edit(&mut c);
            let err = verify_for_call(&doc, &vk, &c, NOW, &store).unwrap_err();
            assert_eq!(err.code(), code, "{c:?}: {err}");
        }
        // None of the refused attempts spent it.
        verify_for_call(&doc, &vk, &call(), NOW, &store).unwrap();
    }

    #[test]
    fn window_is_checked_with_the_injected_clock() {
        let (_d, store) = store();
        let doc = signed(bounded_scope());
        let vk = key().verifying_key();
        let err = verify_for_call(
            &doc,
            &vk,
            &call(),
            datetime!(2026-11-26 11:59:59 UTC),
            &store,
        )
        .unwrap_err();
        assert!(matches!(err, VerifyError::NotYetValid(_)));
        verify_for_call(
            &doc,
            &vk,
            &call(),
            datetime!(2026-11-26 12:00:00 UTC),
            &store,
        )
        .unwrap();
        verify_for_call(
            &doc,
            &vk,
            &call(),
            datetime!(2026-11-26 12:59:59 UTC),
            &store,
        )
        .unwrap();
        let err = verify_for_call(
            &doc,
            &vk,
            &call(),
            datetime!(2026-11-26 13:00:00 UTC),
            &store,
        )
        .unwrap_err();
        assert!(matches!(err, VerifyError::Expired(_)));
    }

    #[test]
    fn revoked_credential_is_refused() {
        let (_d, store) = store();
        let doc = signed(bounded_scope());
        let vk = key().verifying_key();
        let cred = verify_for_call(&doc, &vk, &call(), NOW, &store).unwrap();
        store.revoke(&cred.id, NOW).unwrap();
        assert!(matches!(
            verify_for_call(&doc, &vk, &call(), NOW, &store),
            Err(VerifyError::Revoked(_))
        ));
    }

    #[test]
    fn unknown_proof_members_and_context_drift_are_refused_even_if_signed() {
        use crate::credential::multikey;
        use crate::credential::proof::{create_proof, ProofOptions};
        use ed25519_dalek::Signer;
        let (_d, store) = store();
        let vk = key().verifying_key();
        let doc = signed(bounded_scope());
        let mut unsecured = doc.clone();
        unsecured.as_object_mut().unwrap().remove("proof");
        let options = ProofOptions {
            verification_method: multikey::verification_method(&vk),
            proof_purpose: ASSERTION_METHOD.into(),
            created: None,
        };
        let resigned = create_proof(&unsecured, &options, &key()).unwrap();
        verify_for_call(&resigned, &vk, &call(), NOW, &store).unwrap();
        // Signed *with* an `expires` member: the signature is valid, but kya
        // does not implement that semantic, so it refuses rather than ignores it.
        let mut config = proof::proof_config(&unsecured, &options).unwrap();
        config["expires"] = "2020-01-01T00:00:00Z".into();
        let hashes = proof::hash_data(&config, &unsecured).unwrap();
        let sig = key().sign(&hashes.bytes());
        config["proofValue"] = multikey::encode_base58btc(&sig.to_bytes()).into();
        let mut with_expires = unsecured.clone();
        with_expires["proof"] = config;
        proof::verify_proof(&with_expires, ASSERTION_METHOD).unwrap();
        assert!(matches!(
            verify_document(&with_expires, &vk),
            Err(VerifyError::Malformed(_))
        ));
        // A document @context longer than the proof's: the cryptosuite allows
        // the prefix, kya does not.
        let mut drift = doc.clone();
        drift["@context"] = serde_json::json!([action::VC_CONTEXT_V2, "https://evil.example/ctx"]);
        proof::verify_proof(&drift, ASSERTION_METHOD).unwrap();
        assert!(matches!(
            verify_document(&drift, &vk),
            Err(VerifyError::Malformed(_))
        ));
    }

    #[test]
    fn another_key_is_untrusted_even_when_self_consistent() {
        let (_d, store) = store();
        let doc = signed(bounded_scope());
        let other = SigningKey::from_bytes(&[6; 32]).verifying_key();
        assert!(matches!(
            verify_for_call(&doc, &other, &call(), NOW, &store),
            Err(VerifyError::UntrustedIssuer { .. })
        ));
    }

    #[test]
    fn widened_scope_or_changed_window_breaks_the_signature() {
        let (_d, store) = store();
        let vk = key().verifying_key();
        let doc = signed(bounded_scope());
        type Edit = Box<dyn Fn(&mut Value)>;
        let edits: Vec<Edit> = vec![
            Box::new(|d| d["credentialSubject"]["scope"]["argBounds"][0]["max"] = 5000.into()),
            Box::new(|d| d["credentialSubject"]["scope"]["tool"] = "delete_all".into()),
            Box::new(|d| {
                d["credentialSubject"]["scope"]
                    .as_object_mut()
                    .unwrap()
                    .remove("argBounds");
            }),
            Box::new(|d| d["validUntil"] = "2027-11-26T13:00:00Z".into()),
            Box::new(|d| d["credentialSubject"]["agent"] = "other-bot".into()),
            Box::new(|d| {
                d["credentialSubject"]
                    .as_object_mut()
                    .unwrap()
                    .remove("uid");
            }),
        ];
        for edit in edits {
            let mut d = doc.clone();
            edit(&mut d);
            assert!(matches!(
                verify_for_call(&d, &vk, &call(), NOW, &store),
                Err(VerifyError::Proof(ProofError::BadSignature))
            ));
        }
    }

    #[test]
    fn one_changed_byte_anywhere_fails() {
        let vk = key().verifying_key();
        let text = serde_json::to_vec_pretty(&signed(exact_scope())).unwrap();
        let original = jcs::parse_strict(&text, jcs::MAX_INPUT_BYTES).unwrap();
        let mut accepted = Vec::new();
        for pos in 0..text.len() {
            // Flip the low bit: letters stay letters, digits stay digits, so
            // most variants still parse and reach the signature check.
            let mut bytes = text.clone();
            bytes[pos] ^= 0x01;
            if let Ok(doc) = jcs::parse_strict(&bytes, jcs::MAX_INPUT_BYTES) {
                if doc != original && verify_document(&doc, &vk).is_ok() {
                    accepted.push(pos);
                }
            }
        }
        assert!(accepted.is_empty(), "accepted changes at {accepted:?}");
    }

    #[test]
    fn hostile_documents_never_panic() {
        let vk = key().verifying_key();
        let deep = "{\"a\":".repeat(10_000);
        let huge = format!("{{\"x\":\"{}\"}}", "a".repeat(jcs::MAX_INPUT_BYTES));
        let inputs: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"null".to_vec(),
            b"[]".to_vec(),
            b"{\"proof\":{}}".to_vec(),
            b"{\"proof\":{\"proofValue\":\"z\"},\"proof\":{}}".to_vec(),
            deep.into_bytes(),
            huge.into_bytes(),
            vec![0xff; 100],
        ];
        for input in inputs {
            assert!(verify_bytes(&input, &vk).is_err());
        }
    }

    fn arb_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            ".{0,8}".prop_map(Value::from),
            Just(Value::from("amount")),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                proptest::collection::btree_map(
                    prop_oneof![Just("amount".to_owned()), ".{0,6}".prop_map(String::from)],
                    inner,
                    0..8
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// Arbitrary arguments never panic and are only covered when every bound holds.
        #[test]
        fn arbitrary_arguments_never_panic(args in arb_json()) {
            static CREDS: std::sync::OnceLock<(ActionCredential, ActionCredential)> =
                std::sync::OnceLock::new();
            let (cred, exact) = CREDS.get_or_init(|| {
                let vk = key().verifying_key();
                (
                    verify_document(&signed(bounded_scope()), &vk).unwrap(),
                    verify_document(&signed(exact_scope()), &vk).unwrap(),
                )
            });
            let mut c = call();
            c.args = args.clone();
            if check_scope(cred, &c).is_ok() {
                let amount = args.get("amount").and_then(Value::as_f64).unwrap();
                proptest::prop_assert!((0.0..=500.0).contains(&amount));
            }
            let _ = check_scope(exact, &c);
        }
    }

    #[test]
    fn helpers_compare_hosts_and_cgroups_carefully() {
        assert!(host_eq("MCP.example.com", "mcp.example.com:8443"));
        assert!(host_eq("mcp.example.com.", "mcp.example.com"));
        assert!(host_eq("[::1]:443", "::1"));
        assert!(!host_eq("mcp.example.com", "mcp.example.co"));
        assert!(cgroup_within("/a/b", "/a"));
        assert!(cgroup_within("/a", "/a/"));
        assert!(cgroup_within("/x", "/"));
        assert!(!cgroup_within("/ab", "/a"));
        assert!(!cgroup_within("/a", "/a/b"));
    }
}
