//! Standing credentials served by the daemon over its control socket:
//! `credential.issue`, `credential.revoke`, `credential.list`.
//!
//! The owner of an agent cannot read kya's signing key (root's), so issuing
//! goes through the daemon: the issuer is the Unix user the kernel reports for
//! the socket's peer (`SO_PEERCRED`), who must be the registered owner of the
//! agent (or root), and the agent must be registered and not orphaned in the
//! daemon's *live* registry. The registry's selectors (uid, cgroup, exe digest)
//! become the credential's binding where the request gives none, and a request
//! may not contradict them.
//!
//! A credential issued while calls of its agent are held releases the held
//! calls it covers at once (answer channel `credential`): the hold path then
//! re-checks and redeems exactly that credential before forwarding, so a
//! revocation that lands in between still stops the call.

use super::action::{self, AgentSubject, ArgBound, Channel, Environment, Evidence, Scope};
use super::store::CredentialStore;
use super::validity::parse_valid_for;
use super::verify::{self, Call};
use crate::approvals::{Answer, Approvals};
use crate::control::guard::Unselected;
use crate::control::protocol::{Caller, ErrorCode, Request, Response};
use crate::control::server::{Handler, Reply, ReplyFuture};
use crate::host::user_name;
use crate::policy::PolicyEngine;
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use serde_json::{json, Number, Value};
use std::sync::Arc;
use time::OffsetDateTime;

/// The answer channel recorded when a standing credential releases a held call.
pub(crate) const RELEASE_CHANNEL: &str = "credential";

/// What an owner asks for when issuing a standing credential.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct IssueRequest {
    /// Registered agent name.
    pub agent: String,
    /// Tool name (exact).
    pub tool: String,
    /// MCP server (SNI / Host); absent = any.
    #[serde(default)]
    pub server: Option<String>,
    /// Exactly these arguments (hex SHA-256 of their JCS form); makes it single-use.
    #[serde(default)]
    pub args_digest: Option<String>,
    /// `KEY=N` lower bounds on numeric arguments.
    #[serde(default)]
    pub min_args: Vec<String>,
    /// `KEY=N` upper bounds on numeric arguments.
    #[serde(default)]
    pub max_args: Vec<String>,
    /// How long from now, e.g. `15m`, `4days`.
    pub valid_for: String,
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub cgroup: Option<String>,
    #[serde(default)]
    pub exe_sha256: Option<String>,
    /// Host the credential is valid on (default: the daemon's host).
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub single_use: bool,
}

/// Why an issue request is refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum IssueError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Internal(String),
}

impl IssueError {
    fn response(&self) -> Response {
        let code = match self {
            IssueError::BadRequest(_) => ErrorCode::BadRequest,
            IssueError::Forbidden(_) => ErrorCode::Forbidden,
            IssueError::NotFound(_) => ErrorCode::NotFound,
            IssueError::Conflict(_) => ErrorCode::Conflict,
            IssueError::Internal(_) => ErrorCode::Internal,
        };
        Response::error(code, self.to_string())
    }
}

/// Merge `KEY=N` lower and upper bounds into one bound per key.
pub(crate) fn parse_bounds(mins: &[String], maxs: &[String]) -> Result<Vec<ArgBound>, IssueError> {
    let bad = |m: String| IssueError::BadRequest(m);
    let mut bounds: Vec<ArgBound> = Vec::new();
    for (text, is_max) in mins
        .iter()
        .map(|t| (t, false))
        .chain(maxs.iter().map(|t| (t, true)))
    {
        let (key, n) = text
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| bad(format!("bound {text:?} is not KEY=N")))?;
        let n =
            parse_number(n).ok_or_else(|| bad(format!("bound {text:?}: not a finite number")))?;
        let idx = match bounds.iter().position(|b| b.arg == key) {
            Some(i) => i,
            None => {
                bounds.push(ArgBound {
                    arg: key.to_owned(),
                    min: None,
                    max: None,
                });
                bounds.len() - 1
            }
        };
        let slot = if is_max {
            &mut bounds[idx].max
        } else {
            &mut bounds[idx].min
        };
        if slot.is_some() {
            return Err(bad(format!(
                "two {} bounds for argument {key:?}",
                if is_max { "max" } else { "min" }
            )));
        }
        *slot = Some(n);
    }
    Ok(bounds)
}

fn parse_number(text: &str) -> Option<Number> {
    if let Ok(i) = text.parse::<i64>() {
        return Some(i.into());
    }
    text.parse::<f64>().ok().and_then(Number::from_f64)
}

/// A binding given both by the request and the registry must agree: a
/// credential may not bind an identity the registry does not give the agent.
pub(crate) fn merge_binding<T: PartialEq + std::fmt::Debug>(
    what: &str,
    requested: Option<T>,
    registry: Option<T>,
) -> Result<Option<T>, IssueError> {
    match (requested, registry) {
        (Some(f), Some(r)) if f != r => Err(IssueError::BadRequest(format!(
            "{what} {f:?} contradicts the agent registry ({r:?})"
        ))),
        (Some(f), _) => Ok(Some(f)),
        (None, r) => Ok(r),
    }
}

fn hex64(what: &str, text: &str) -> Result<String, IssueError> {
    if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(text.to_ascii_lowercase())
    } else {
        Err(IssueError::BadRequest(format!(
            "{what} must be 64 hex digits"
        )))
    }
}

/// Serves `credential.issue|revoke|list` for the daemon.
pub(crate) struct CredentialService {
    engine: Arc<PolicyEngine>,
    key: Arc<SigningKey>,
    store: Arc<CredentialStore>,
    approvals: Arc<Approvals>,
    host: String,
    separate_duties: bool,
}

impl CredentialService {
    pub(crate) fn new(
        engine: Arc<PolicyEngine>,
        key: Arc<SigningKey>,
        store: Arc<CredentialStore>,
        approvals: Arc<Approvals>,
        host: String,
    ) -> Self {
        Self {
            engine,
            key,
            store,
            approvals,
            host,
            separate_duties: false,
        }
    }

    /// Separation of duties: a credential must be bound to a uid other than
    /// its issuer's, and releases no held call of a process running as the
    /// issuer's uid.
    pub(crate) fn with_separate_duties(mut self, on: bool) -> Self {
        self.separate_duties = on;
        self
    }

    /// Issue a standing credential for `caller`; returns the document and how
    /// many held calls it released.
    pub(crate) fn issue(
        &self,
        caller: Caller,
        _cleared: Unselected,
        req: IssueRequest,
    ) -> Result<Value, IssueError> {
        let user = user_name(caller.uid).ok_or_else(|| {
            IssueError::Forbidden(format!(
                "uid {} has no user name; cannot issue credentials",
                caller.uid
            ))
        })?;
        let now = OffsetDateTime::now_utc();
        let registry = self.engine.registry();
        let agent = registry
            .agents()
            .iter()
            .find(|a| a.name == req.agent)
            .ok_or_else(|| {
                IssueError::NotFound(format!("agent {:?} is not registered", req.agent))
            })?;
        let is_owner = agent.owner.as_deref() == Some(user.as_str());
        if !is_owner && caller.uid != 0 {
            tracing::warn!(user, agent = %req.agent, "credential issue refused: not the owner");
            return Err(IssueError::Forbidden(format!(
                "{user} is not the owner of agent {:?} (owner: {}); only its owner or root may issue credentials for it",
                req.agent,
                agent.owner.as_deref().unwrap_or("none")
            )));
        }
        if registry
            .by_name(&req.agent, now)
            .is_some_and(|i| i.orphaned)
        {
            return Err(IssueError::Conflict(format!(
                "agent {:?} is orphaned (owner gone, not yet valid or expired): no credentials for it",
                req.agent
            )));
        }
        let valid_for =
            parse_valid_for(&req.valid_for).map_err(|e| IssueError::BadRequest(e.to_string()))?;
        if req.tool.is_empty() {
            return Err(IssueError::BadRequest("tool must not be empty".into()));
        }
        let uid = merge_binding("uid", req.uid, agent.uid)?;
        if self.separate_duties && uid.is_none_or(|u| u == caller.uid) {
            return Err(IssueError::Forbidden(format!(
                "separation of duties is on: {user} (uid {}) may issue only a credential bound to \
                 another uid (the agent's registry entry or --uid), so that it never covers \
                 calls of the issuer's own processes",
                caller.uid
            )));
        }
        let cgroup = merge_binding("cgroup", req.cgroup.clone(), agent.cgroup.clone())?;
        let exe_sha256 = match &req.exe_sha256 {
            Some(h) => Some(hex64("exe_sha256", h)?),
            None => None,
        };
        let exe_sha256 = merge_binding("exe_sha256", exe_sha256, agent.exe_sha256.clone())?;
        let args_sha256 = match &req.args_digest {
            Some(h) => Some(hex64("args_digest", h)?),
            None => None,
        };
        if args_sha256.is_some() && !(req.min_args.is_empty() && req.max_args.is_empty()) {
            return Err(IssueError::BadRequest(
                "an exact args_digest and argument bounds exclude each other".into(),
            ));
        }
        let scope = Scope {
            server: req.server.clone(),
            tool: req.tool.clone(),
            single_use: req.single_use || args_sha256.is_some(),
            args_sha256,
            arg_bounds: parse_bounds(&req.min_args, &req.max_args)?,
        };
        let subject = AgentSubject {
            agent: req.agent.clone(),
            exe_sha256,
            uid,
            environment: Environment {
                host: req.host.clone().unwrap_or_else(|| self.host.clone()),
                cgroup,
            },
            scope,
        };
        let mut evidence = Evidence::approval(&user, Channel::Local, now)
            .map_err(|e| IssueError::Internal(e.to_string()))?;
        evidence.approver_uid = Some(caller.uid);
        let (document, credential) =
            action::issue(&self.key, subject, now, now + valid_for, vec![evidence])
                .map_err(|e| IssueError::BadRequest(e.to_string()))?;
        self.store
            .add_standing(&document, &credential, now)
            .map_err(|e| IssueError::Internal(format!("cannot store the credential: {e}")))?;
        tracing::info!(id = %credential.id, agent = %req.agent, tool = %req.tool, by = %user,
            "standing credential issued over the control socket");
        let released = self.release_covered(&credential, &user, caller.uid, now);
        Ok(json!({
            "id": credential.id,
            "credential": document,
            "released": released,
        }))
    }

    /// Answer every held call of the credential's agent that it covers.
    fn release_covered(
        &self,
        credential: &action::ActionCredential,
        by: &str,
        by_uid: u32,
        now: OffsetDateTime,
    ) -> Vec<String> {
        let registry = self.engine.registry();
        let mut released = Vec::new();
        for (id, req) in self.approvals.pending() {
            if req.agent != credential.subject.agent {
                continue;
            }
            if self.separate_duties && req.process.uid == by_uid {
                continue;
            }
            let call = Call {
                agent: req.agent.clone(),
                uid: req.process.uid,
                cgroup: req.process.cgroup.clone(),
                exe_sha256: registry.exe_hash(&req.process),
                host: self.host.clone(),
                server: req.server.clone(),
                method: "tools/call".into(),
                tool: req.tool.clone(),
                args: req.args.clone(),
            };
            if verify::check_call(credential, &call, now).is_err() {
                continue;
            }
            let answer = Answer {
                approve: true,
                approver: by.to_owned(),
                channel: RELEASE_CHANNEL.into(),
                reason: Some(format!("covered by standing credential {}", credential.id)),
                evidence: Some(json!({ "credential_id": credential.id })),
            };
            if self.approvals.answer(&id, answer).is_ok() {
                tracing::info!(approval = %id, credential = %credential.id, "held call released by a standing credential");
                released.push(id);
            }
            if credential.subject.scope.single_use {
                // One use: the first covered call takes it.
                break;
            }
        }
        released
    }

    /// May `caller` manage (revoke, see) this standing credential?
    fn may_manage(
        &self,
        caller: Caller,
        user: Option<&str>,
        cred: &action::ActionCredential,
    ) -> bool {
        if caller.uid == 0 {
            return true;
        }
        let Some(user) = user else {
            return false;
        };
        let registry = self.engine.registry();
        let owns = registry
            .agents()
            .iter()
            .any(|a| a.name == cred.subject.agent && a.owner.as_deref() == Some(user));
        owns || cred.evidence.iter().any(|e| e.approver == user)
    }

    fn revoke(&self, caller: Caller, _cleared: Unselected, request: &Request) -> Response {
        let Some(id) = request.args.get("id").and_then(Value::as_str) else {
            return Response::error(ErrorCode::BadRequest, "missing credential id");
        };
        let user = user_name(caller.uid);
        if caller.uid != 0 {
            let standing = match self.store.standing() {
                Ok(s) => s,
                Err(e) => return Response::error(ErrorCode::Internal, e.to_string()),
            };
            match standing.iter().find(|s| s.credential.id == id) {
                Some(s) if self.may_manage(caller, user.as_deref(), &s.credential) => {}
                Some(_) => {
                    return Response::error(
                        ErrorCode::Forbidden,
                        format!(
                        "{} may not revoke {id}: only root, the agent's owner or its issuer may",
                        user.as_deref().unwrap_or("this user")
                    ),
                    )
                }
                None => {
                    return Response::error(
                        ErrorCode::NotFound,
                        format!("no standing credential {id} (root may revoke any id)"),
                    )
                }
            }
        }
        match self.store.revoke(id, OffsetDateTime::now_utc()) {
            Ok(newly) => {
                tracing::info!(id, by = ?user, "credential revoked over the control socket");
                Response::ok(json!({"id": id, "revoked": true, "already": !newly}))
            }
            Err(e) => Response::error(ErrorCode::BadRequest, e.to_string()),
        }
    }

    fn list(&self, caller: Caller) -> Response {
        let user = user_name(caller.uid);
        let now = OffsetDateTime::now_utc();
        let standing = match self.store.standing() {
            Ok(s) => s,
            Err(e) => return Response::error(ErrorCode::Internal, e.to_string()),
        };
        let mut rows = Vec::new();
        for s in standing {
            let c = &s.credential;
            if !self.may_manage(caller, user.as_deref(), c) {
                continue;
            }
            let revoked = self.store.is_revoked(&c.id).unwrap_or(true);
            let spent = c.subject.scope.single_use && self.store.is_spent(&c.id).unwrap_or(true);
            rows.push(json!({
                "id": c.id,
                "agent": c.subject.agent,
                "tool": c.subject.scope.tool,
                "scope": c.scope_json(),
                "validUntil": action::format_time(c.valid_until).unwrap_or_default(),
                "expired": c.valid_until <= now,
                "revoked": revoked,
                "spent": spent,
                "issuedBy": c.evidence.first().map(|e| e.approver.clone()),
            }));
        }
        Response::ok(Value::Array(rows))
    }
}

impl Handler for CredentialService {
    fn read_only(&self, op: &str) -> bool {
        op == "credential.list"
    }

    fn handle(&self, caller: Caller, request: Request) -> ReplyFuture {
        let resp = match request.op.as_str() {
            "credential.issue" => match (
                caller.cleared(),
                serde_json::from_value::<IssueRequest>(request.args),
            ) {
                (Err(refused), _) => refused,
                (Ok(cleared), Ok(req)) => match self.issue(caller, cleared, req) {
                    Ok(v) => Response::ok(v),
                    Err(e) => e.response(),
                },
                (Ok(_), Err(e)) => {
                    Response::error(ErrorCode::BadRequest, format!("issue request: {e}"))
                }
            },
            "credential.revoke" => match caller.cleared() {
                Ok(cleared) => self.revoke(caller, cleared, &request),
                Err(refused) => refused,
            },
            "credential.list" => self.list(caller),
            other => Response::error(ErrorCode::UnknownOp, format!("unknown operation {other:?}")),
        };
        Box::pin(async move { Reply::Once(resp) })
    }
}

/// Re-check and redeem the standing credential `id` for a held call it
/// released: it must still be kya's, unrevoked, unspent, and cover the call
/// now. Returns its id and the secured document.
pub(crate) fn redeem_standing(
    store: &CredentialStore,
    trusted: &ed25519_dalek::VerifyingKey,
    id: &str,
    call: &Call,
    now: OffsetDateTime,
) -> Result<(String, serde_json::Value), String> {
    let standing = store.standing().map_err(|e| e.to_string())?;
    let s = standing
        .iter()
        .find(|s| s.credential.id == id)
        .ok_or_else(|| format!("standing credential {id} is gone (revoked or expired)"))?;
    if s.signer != *trusted {
        return Err(format!(
            "standing credential {id} is not signed by this daemon"
        ));
    }
    verify::check_call(&s.credential, call, now).map_err(|e| e.to_string())?;
    verify::redeem(&s.credential, now, store).map_err(|e| e.to_string())?;
    Ok((s.credential.id.clone(), s.document.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::approvals::{ActionRequest, Outcome};
    use kya_common::ProcessIdentity;
    use std::time::Duration;

    const NOBODY: u32 = 65534;

    struct Fixture {
        _dir: tempfile::TempDir,
        svc: CredentialService,
        approvals: Arc<Approvals>,
        store: Arc<CredentialStore>,
        key: Arc<SigningKey>,
    }

    /// `bot` owned by `nobody` (uid 65534 exists on every Debian host), bound
    /// to uid 1001; `old` expired; `orphan` with no owner.
    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let agents = dir.path().join("agents.toml");
        std::fs::write(
            &agents,
            "[[agent]]\nname = \"bot\"\nowner = \"nobody\"\nmatch = { uid = 1001, cgroup = \"/agents/bot\" }\n\n\
             [[agent]]\nname = \"old\"\nowner = \"nobody\"\nexpires = \"2020-01-01\"\nmatch = { uid = 1002 }\n\n\
             [[agent]]\nname = \"orphan\"\nmatch = { uid = 1003 }\n",
        )
        .unwrap();
        let engine = Arc::new(PolicyEngine::new(vec![], Some(agents), None).unwrap());
        let key = Arc::new(SigningKey::from_bytes(&[7u8; 32]));
        let store = Arc::new(CredentialStore::open(dir.path()).unwrap());
        let approvals = Approvals::new(16, None);
        let svc = CredentialService::new(
            engine,
            key.clone(),
            store.clone(),
            approvals.clone(),
            "host-a".into(),
        );
        Fixture {
            _dir: dir,
            svc,
            approvals,
            store,
            key,
        }
    }

    fn caller(uid: u32) -> Caller {
        Caller {
            uid,
            gid: uid,
            pid: None,
            clearance: Some(Unselected::for_tests()),
        }
    }

    fn req(agent: &str, tool: &str) -> IssueRequest {
        IssueRequest {
            agent: agent.into(),
            tool: tool.into(),
            valid_for: "1h".into(),
            ..Default::default()
        }
    }

    fn held(agent: &str, tool: &str, amount: i64) -> ActionRequest {
        ActionRequest {
            agent: agent.into(),
            owner: "nobody".into(),
            approvers: vec![],
            process: ProcessIdentity {
                pid: 0,
                uid: 1001,
                cgroup: "/agents/bot/worker".into(),
                ..Default::default()
            },
            server: "mcp.test".into(),
            tool: tool.into(),
            args: json!({ "amount": amount }),
            args_digest: String::new(),
            policy_version: "v".into(),
            rule: Some("r".into()),
            reason: "held".into(),
            decision_id: "dec_1".into(),
            tool_change: None,
        }
    }

    fn code(e: IssueError) -> ErrorCode {
        match e.response() {
            Response::Error { code, .. } => code,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn only_the_owner_or_root_issue_and_the_registry_binds() {
        let f = fixture();
        let out = f
            .svc
            .issue(
                caller(NOBODY),
                Unselected::for_tests(),
                req("bot", "transfer"),
            )
            .unwrap();
        let doc = &out["credential"];
        let cred = verify::verify_document(doc, &f.key.verifying_key()).unwrap();
        assert_eq!(
            cred.subject.uid,
            Some(1001),
            "registry uid becomes the binding"
        );
        assert_eq!(
            cred.subject.environment.cgroup.as_deref(),
            Some("/agents/bot")
        );
        assert_eq!(cred.subject.environment.host, "host-a");
        assert_eq!(cred.evidence[0].approver, "nobody");
        assert_eq!(cred.evidence[0].approver_uid, Some(NOBODY));
        assert_eq!(f.store.standing().unwrap().len(), 1, "stored as standing");
        assert!(
            f.svc
                .issue(caller(0), Unselected::for_tests(), req("bot", "transfer"))
                .is_ok(),
            "root may"
        );

        // Someone else (uid 1: daemon) may not.
        assert_eq!(
            code(
                f.svc
                    .issue(caller(1), Unselected::for_tests(), req("bot", "transfer"))
                    .unwrap_err()
            ),
            ErrorCode::Forbidden
        );
        // A uid without a user name may not even as a claimed owner.
        assert_eq!(
            code(
                f.svc
                    .issue(caller(4_000_000), Unselected::for_tests(), req("bot", "t"))
                    .unwrap_err()
            ),
            ErrorCode::Forbidden
        );
        assert_eq!(
            code(
                f.svc
                    .issue(caller(0), Unselected::for_tests(), req("ghost", "t"))
                    .unwrap_err()
            ),
            ErrorCode::NotFound
        );
        assert_eq!(
            code(
                f.svc
                    .issue(caller(NOBODY), Unselected::for_tests(), req("old", "t"))
                    .unwrap_err()
            ),
            ErrorCode::Conflict
        );
        assert_eq!(
            code(
                f.svc
                    .issue(caller(0), Unselected::for_tests(), req("orphan", "t"))
                    .unwrap_err()
            ),
            ErrorCode::Conflict
        );
    }

    #[test]
    fn hostile_requests_are_refused() {
        let f = fixture();
        let bad = [
            IssueRequest {
                uid: Some(0),
                ..req("bot", "t")
            },
            IssueRequest {
                cgroup: Some("/".into()),
                ..req("bot", "t")
            },
            IssueRequest {
                valid_for: "0s".into(),
                ..req("bot", "t")
            },
            IssueRequest {
                valid_for: "400days".into(),
                ..req("bot", "t")
            },
            IssueRequest {
                valid_for: "soon".into(),
                ..req("bot", "t")
            },
            IssueRequest {
                args_digest: Some("zz".repeat(32)),
                ..req("bot", "t")
            },
            IssueRequest {
                exe_sha256: Some("ab".into()),
                ..req("bot", "t")
            },
            IssueRequest {
                max_args: vec!["amount".into()],
                ..req("bot", "t")
            },
            IssueRequest {
                max_args: vec!["=5".into()],
                ..req("bot", "t")
            },
            IssueRequest {
                max_args: vec!["a=NaN".into()],
                ..req("bot", "t")
            },
            IssueRequest {
                max_args: vec!["a=1".into(), "a=2".into()],
                ..req("bot", "t")
            },
            IssueRequest {
                args_digest: Some("ab".repeat(32)),
                max_args: vec!["a=1".into()],
                ..req("bot", "t")
            },
            req("bot", ""),
        ];
        for r in bad {
            let shown = format!("{r:?}");
            assert_eq!(
                code(
                    f.svc
                        .issue(caller(NOBODY), Unselected::for_tests(), r)
                        .unwrap_err()
                ),
                ErrorCode::BadRequest,
                "{shown}"
            );
        }
        assert!(f.store.standing().unwrap().is_empty(), "nothing was stored");
        // Unknown fields over the socket are refused by the handler's parser.
        assert!(serde_json::from_value::<IssueRequest>(
            json!({"agent": "bot", "tool": "t", "valid_for": "1h", "admin": true})
        )
        .is_err());
    }

    #[tokio::test]
    async fn issuing_releases_the_held_calls_it_covers_and_nothing_else() {
        let f = fixture();
        let small = f
            .approvals
            .submit(held("bot", "transfer", 400), Duration::from_secs(30))
            .unwrap();
        let large = f
            .approvals
            .submit(held("bot", "transfer", 900), Duration::from_secs(30))
            .unwrap();
        let other_tool = f
            .approvals
            .submit(held("bot", "delete", 1), Duration::from_secs(30))
            .unwrap();
        let r = IssueRequest {
            max_args: vec!["amount=500".into()],
            ..req("bot", "transfer")
        };
        let out = f
            .svc
            .issue(caller(NOBODY), Unselected::for_tests(), r)
            .unwrap();
        assert_eq!(out["released"], json!([small.id.clone()]));
        match small.wait().await {
            Outcome::Approved(a) => {
                assert_eq!(a.channel, RELEASE_CHANNEL);
                assert_eq!(a.approver, "nobody");
                assert_eq!(a.evidence.unwrap()["credential_id"], out["id"]);
            }
            o => panic!("{o:?}"),
        }
        let pending: Vec<String> = f
            .approvals
            .pending()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert!(
            pending.contains(&large.id) && pending.contains(&other_tool.id),
            "out of scope stays held"
        );
    }

    #[tokio::test]
    async fn a_single_use_credential_releases_one_held_call() {
        let f = fixture();
        let a = f
            .approvals
            .submit(held("bot", "transfer", 1), Duration::from_secs(30))
            .unwrap();
        let b = f
            .approvals
            .submit(held("bot", "transfer", 1), Duration::from_secs(30))
            .unwrap();
        let out = f
            .svc
            .issue(
                caller(NOBODY),
                Unselected::for_tests(),
                IssueRequest {
                    single_use: true,
                    ..req("bot", "transfer")
                },
            )
            .unwrap();
        assert_eq!(out["released"].as_array().unwrap().len(), 1);
        assert_eq!(f.approvals.pending().len(), 1);
        drop((a, b));
    }

    #[test]
    fn redeem_standing_rechecks_revocation_scope_and_signer() {
        let f = fixture();
        let out = f
            .svc
            .issue(
                caller(NOBODY),
                Unselected::for_tests(),
                req("bot", "transfer"),
            )
            .unwrap();
        let id = out["id"].as_str().unwrap().to_owned();
        let call = Call {
            agent: "bot".into(),
            uid: 1001,
            cgroup: "/agents/bot".into(),
            exe_sha256: None,
            host: "host-a".into(),
            server: "mcp.test".into(),
            method: "tools/call".into(),
            tool: "transfer".into(),
            args: json!({}),
        };
        let now = OffsetDateTime::now_utc();
        let trusted = f.key.verifying_key();
        assert_eq!(
            redeem_standing(&f.store, &trusted, &id, &call, now)
                .unwrap()
                .0,
            id
        );
        let other_tool = Call {
            tool: "delete".into(),
            ..call.clone()
        };
        assert!(redeem_standing(&f.store, &trusted, &id, &other_tool, now).is_err());
        let other_key = SigningKey::from_bytes(&[9u8; 32]).verifying_key();
        assert!(redeem_standing(&f.store, &other_key, &id, &call, now).is_err());
        f.store.revoke(&id, now).unwrap();
        assert!(
            redeem_standing(&f.store, &trusted, &id, &call, now).is_err(),
            "revoked"
        );
    }

    #[test]
    fn separation_of_duties_needs_a_binding_to_another_uid() {
        let dir = tempfile::tempdir().unwrap();
        let agents = dir.path().join("agents.toml");
        std::fs::write(
            &agents,
            "[[agent]]\nname = \"bot\"\nowner = \"nobody\"\nmatch = { uid = 1001 }\n\n\
             [[agent]]\nname = \"mine\"\nowner = \"nobody\"\nmatch = { uid = 65534 }\n\n\
             [[agent]]\nname = \"anyone\"\nowner = \"nobody\"\nmatch = { cgroup = \"/a\" }\n",
        )
        .unwrap();
        let engine = Arc::new(PolicyEngine::new(vec![], Some(agents), None).unwrap());
        let svc = CredentialService::new(
            engine,
            Arc::new(SigningKey::from_bytes(&[7u8; 32])),
            Arc::new(CredentialStore::open(dir.path()).unwrap()),
            Approvals::new(4, None),
            "host-a".into(),
        )
        .with_separate_duties(true);
        let ok = Unselected::for_tests();
        assert!(svc.issue(caller(NOBODY), ok, req("bot", "t")).is_ok());
        for agent in ["mine", "anyone"] {
            match svc.issue(caller(NOBODY), ok, req(agent, "t")) {
                Err(IssueError::Forbidden(m)) => assert!(m.contains("separation of duties"), "{m}"),
                other => panic!("{agent}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn revoke_and_list_are_for_root_owner_or_issuer() {
        let f = fixture();
        let out = f
            .svc
            .issue(caller(0), Unselected::for_tests(), req("bot", "transfer"))
            .unwrap();
        let id = out["id"].as_str().unwrap().to_owned();
        let run = |uid: u32, op: &str, args: Value| {
            let fut = f.svc.handle(caller(uid), Request::new(op, args));
            async move {
                match fut.await {
                    Reply::Once(r) => r,
                    Reply::Stream(_) => panic!("stream"),
                }
            }
        };
        // uid 1 (daemon) neither owns bot nor issued it.
        match run(1, "credential.list", Value::Null).await {
            Response::Ok { result } => assert_eq!(result, json!([])),
            o => panic!("{o:?}"),
        }
        assert!(matches!(
            run(1, "credential.revoke", json!({"id": id})).await,
            Response::Error {
                code: ErrorCode::Forbidden,
                ..
            }
        ));
        match run(NOBODY, "credential.list", Value::Null).await {
            Response::Ok { result } => assert_eq!(result[0]["id"], json!(id)),
            o => panic!("{o:?}"),
        }
        assert!(matches!(
            run(NOBODY, "credential.revoke", json!({"id": id})).await,
            Response::Ok { .. }
        ));
        assert!(f.store.is_revoked(&id).unwrap());
        assert!(matches!(
            run(NOBODY, "credential.revoke", json!({"id": "urn:uuid:nope"})).await,
            Response::Error {
                code: ErrorCode::NotFound,
                ..
            }
        ));
        assert!(matches!(
            run(0, "credential.revoke", json!({})).await,
            Response::Error {
                code: ErrorCode::BadRequest,
                ..
            }
        ));
        assert!(matches!(
            run(0, "credential.issue", json!({"agent": 5})).await,
            Response::Error {
                code: ErrorCode::BadRequest,
                ..
            }
        ));
    }
}
