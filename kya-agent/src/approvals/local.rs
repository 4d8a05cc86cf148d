//! The local approval channel: `kya approvals` over the control socket.
//!
//! The approver is the Unix user the kernel reports for the socket's peer
//! (`SO_PEERCRED`); nothing the client sends can change that. Only the call's
//! owner, or someone its policy names in `approvers` (a user, or `group:NAME`),
//! may answer; everyone else gets a clear refusal and the call stays held.
//!
//! An answer is state-changing: it reaches this channel only through the
//! control socket's gate (the answering process must be neither selected nor
//! a descendant of a selected process: an agent never answers for its human).
//! With separation of duties on, the approver's uid must also differ from the
//! uid of the agent process that made the held call.

use super::answer::{Answer, ApprovalError};
use super::pending::Approvals;
use super::request::ActionRequest;
use crate::control::guard::Unselected;
use crate::control::protocol::{Caller, ErrorCode, Request, Response};
use crate::control::server::{Handler, Reply, ReplyFuture};
use crate::host::user_name;
use serde_json::json;
use std::sync::Arc;

/// Serves `approvals.list`, `approvals.approve`, `approvals.deny`.
pub(crate) struct LocalChannel {
    approvals: Arc<Approvals>,
    separate_duties: bool,
}

impl LocalChannel {
    /// `separate_duties`: an approval must come from a uid other than the
    /// held call's agent process's.
    pub(crate) fn new(approvals: Arc<Approvals>, separate_duties: bool) -> Self {
        Self {
            approvals,
            separate_duties,
        }
    }

    fn answer(
        &self,
        caller: Caller,
        _cleared: Unselected,
        request: &Request,
        approve: bool,
    ) -> Response {
        let Some(id) = request.args.get("id").and_then(|v| v.as_str()) else {
            return Response::error(ErrorCode::BadRequest, "missing approval id");
        };
        let reason = match request.args.get("reason") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) if s.len() <= 1024 => Some(s.clone()),
            Some(_) => {
                return Response::error(
                    ErrorCode::BadRequest,
                    "reason must be a string of at most 1024 bytes",
                )
            }
        };
        // "This tool for an hour": a wider, standing scope chosen by the approver.
        let standing_for = match request.args.get("standing_for") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) if approve => {
                match crate::credential::validity::parse_valid_for(s) {
                    Ok(d) => Some(d.as_secs()),
                    Err(e) => return Response::error(ErrorCode::BadRequest, format!("--for: {e}")),
                }
            }
            Some(_) => {
                return Response::error(
                    ErrorCode::BadRequest,
                    "standing_for is a duration, and only for approvals",
                )
            }
        };
        let Some(action) = self.approvals.request(id) else {
            return Response::error(ErrorCode::NotFound, format!("no pending approval {id}"));
        };
        let Some(user) = user_name(caller.uid) else {
            return Response::error(
                ErrorCode::Forbidden,
                format!("uid {} has no user name; cannot be an approver", caller.uid),
            );
        };
        if !may_answer(&user, caller.uid, &action) {
            tracing::warn!(id, user, owner = %action.owner, "approval answer refused: not the owner or an approver");
            return Response::error(
                ErrorCode::Forbidden,
                format!(
                    "{user} may not answer {id}: only its owner {} or a listed approver may",
                    action.owner
                ),
            );
        }
        if approve && self.separate_duties && caller.uid == action.process.uid {
            tracing::warn!(
                id,
                user,
                uid = caller.uid,
                "approval refused: separation of duties"
            );
            return Response::error(
                ErrorCode::Forbidden,
                format!(
                    "{user} may not approve {id}: separation of duties is on and uid {} also runs \
                     the agent process (pid {}) that made this call; another user must approve \
                     (denying is still allowed)",
                    caller.uid, action.process.pid
                ),
            );
        }
        let answer = Answer {
            approve,
            approver: user.clone(),
            channel: "local".into(),
            reason,
            evidence: Some(
                json!({"uid": caller.uid, "pid": caller.pid, "standing_for_secs": standing_for}),
            ),
        };
        match self.approvals.answer(id, answer) {
            Ok(()) => {
                tracing::info!(id, user, approve, "approval answered on the local channel");
                Response::ok(json!({"id": id, "approved": approve, "approver": user}))
            }
            Err(ApprovalError::AlreadyAnswered(_)) => {
                Response::error(ErrorCode::Conflict, format!("{id} was already answered"))
            }
            Err(ApprovalError::NotFound(_)) => {
                Response::error(ErrorCode::NotFound, format!("no pending approval {id}"))
            }
            Err(e) => Response::error(ErrorCode::Internal, e.to_string()),
        }
    }

    fn list(&self, caller: Caller) -> Response {
        let user = user_name(caller.uid);
        let visible: Vec<_> = self
            .approvals
            .list()
            .into_iter()
            .filter(|v| {
                caller.uid == 0
                    || match (&user, self.approvals.request(&v.id)) {
                        (Some(u), Some(action)) => may_answer(u, caller.uid, &action),
                        _ => false,
                    }
            })
            .collect();
        Response::ok(json!(visible))
    }
}

impl Handler for LocalChannel {
    fn read_only(&self, op: &str) -> bool {
        op == "approvals.list"
    }

    fn handle(&self, caller: Caller, request: Request) -> ReplyFuture {
        let resp = match request.op.as_str() {
            "approvals.list" => self.list(caller),
            op @ ("approvals.approve" | "approvals.deny") => match caller.cleared() {
                Ok(cleared) => self.answer(caller, cleared, &request, op == "approvals.approve"),
                Err(refused) => refused,
            },
            other => Response::error(ErrorCode::UnknownOp, format!("unknown operation {other:?}")),
        };
        Box::pin(async move { Reply::Once(resp) })
    }
}

/// May `user` answer for `action`: its owner, a listed approver, or a member
/// of a listed `group:NAME`.
pub(crate) fn may_answer(user: &str, uid: u32, action: &ActionRequest) -> bool {
    if user == action.owner {
        return true;
    }
    action
        .approvers
        .iter()
        .any(|a| match a.strip_prefix("group:") {
            Some(group) => in_group(user, uid, group),
            None => a == user,
        })
}

fn in_group(user: &str, uid: u32, group: &str) -> bool {
    let Ok(Some(g)) = nix::unistd::Group::from_name(group) else {
        return false;
    };
    if g.mem.iter().any(|m| m == user) {
        return true;
    }
    // Primary group membership is not listed in /etc/group's member list.
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.gid == g.gid)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::approvals::pending::tests::action;

    #[test]
    fn owner_and_listed_approvers_only() {
        let mut a = action("bot", "alice");
        assert!(may_answer("alice", 1000, &a));
        assert!(!may_answer("mallory", 1001, &a));
        assert!(!may_answer("root", 0, &a), "root is not the owner");
        a.approvers = vec!["bob".into(), "group:root".into()];
        assert!(may_answer("bob", 1002, &a));
        // uid 0's primary group is root.
        assert!(may_answer("root", 0, &a));
        a.approvers = vec!["group:no-such-group-kya".into()];
        assert!(!may_answer("root", 0, &a));
    }

    #[tokio::test]
    async fn answers_from_others_are_refused_and_the_call_stays_held() {
        let approvals = Approvals::new(4, None);
        let h = approvals
            .submit(
                action("bot", "owner-not-a-user"),
                std::time::Duration::from_secs(5),
            )
            .unwrap();
        let ch = LocalChannel::new(approvals.clone(), false);
        let me = Caller {
            uid: nix::unistd::getuid().as_raw(),
            gid: 0,
            pid: Some(1),
            clearance: None,
        };
        let ok = Unselected::for_tests();
        let req = Request::new("approvals.approve", json!({"id": h.id}));
        match ch.answer(me, ok, &req, true) {
            Response::Error {
                code: ErrorCode::Forbidden,
                error,
            } => assert!(error.contains("only its owner")),
            other => panic!("{other:?}"),
        }
        assert_eq!(approvals.list().len(), 1, "still held");
        for bad in [
            json!({}),
            json!({"id": 5}),
            json!({"id": h.id, "reason": 7}),
            json!({"id": "apr_nope"}),
        ] {
            let r = ch.answer(me, ok, &Request::new("approvals.approve", bad), true);
            assert!(matches!(r, Response::Error { .. }), "{r:?}");
        }
    }

    #[tokio::test]
    async fn separation_of_duties_refuses_the_agents_own_uid() {
        let approvals = Approvals::new(4, None);
        // The agent process runs as root, root's name owns it, nobody may approve too.
        let mut a = action("bot", "root");
        a.process.uid = 0;
        a.approvers = vec!["nobody".into()];
        let ok = Unselected::for_tests();
        let caller = |uid| Caller {
            uid,
            gid: uid,
            pid: Some(1),
            clearance: None,
        };
        // Off (the default): the owner running its own agent may approve.
        let off = LocalChannel::new(approvals.clone(), false);
        let h = approvals
            .submit(a.clone(), std::time::Duration::from_secs(5))
            .unwrap();
        let req = Request::new("approvals.approve", json!({"id": h.id}));
        assert!(matches!(
            off.answer(caller(0), ok, &req, true),
            Response::Ok { .. }
        ));

        let on = LocalChannel::new(approvals.clone(), true);
        let h = approvals
            .submit(a.clone(), std::time::Duration::from_secs(5))
            .unwrap();
        let req = Request::new("approvals.approve", json!({"id": h.id}));
        match on.answer(caller(0), ok, &req, true) {
            Response::Error {
                code: ErrorCode::Forbidden,
                error,
            } => assert!(error.contains("separation of duties"), "{error}"),
            other => panic!("{other:?}"),
        }
        assert!(approvals.is_pending(&h.id), "still held");
        if user_name(65534).as_deref() == Some("nobody") {
            assert!(matches!(
                on.answer(caller(65534), ok, &req, true),
                Response::Ok { .. }
            ));
        }
        // Denying one's own agent's call stays possible.
        let h = approvals
            .submit(a, std::time::Duration::from_secs(5))
            .unwrap();
        let req = Request::new("approvals.deny", json!({"id": h.id}));
        assert!(matches!(
            on.answer(caller(0), ok, &req, false),
            Response::Ok { .. }
        ));
    }

    #[tokio::test]
    async fn a_wider_scope_is_a_checked_duration_and_only_for_approvals() {
        let approvals = Approvals::new(4, None);
        // root's own name is the owner here, so the answer is authorised.
        let h = approvals
            .submit(action("bot", "root"), std::time::Duration::from_secs(5))
            .unwrap();
        let ch = LocalChannel::new(approvals.clone(), false);
        let root = Caller {
            uid: 0,
            gid: 0,
            pid: Some(1),
            clearance: None,
        };
        let ok = Unselected::for_tests();
        for (approve, args) in [
            (true, json!({"id": h.id, "standing_for": "0s"})),
            (true, json!({"id": h.id, "standing_for": "400days"})),
            (true, json!({"id": h.id, "standing_for": 3600})),
            (false, json!({"id": h.id, "standing_for": "1h"})),
        ] {
            let req = Request::new("approvals.x", args.clone());
            assert!(
                matches!(
                    ch.answer(root, ok, &req, approve),
                    Response::Error {
                        code: ErrorCode::BadRequest,
                        ..
                    }
                ),
                "{args}"
            );
        }
        assert!(
            approvals.is_pending(&h.id),
            "refused requests answer nothing"
        );
        let req = Request::new(
            "approvals.approve",
            json!({"id": h.id, "standing_for": "1h"}),
        );
        assert!(matches!(
            ch.answer(root, ok, &req, true),
            Response::Ok { .. }
        ));
        match h.wait().await {
            crate::approvals::Outcome::Approved(a) => {
                assert_eq!(a.evidence.unwrap()["standing_for_secs"], 3600)
            }
            other => panic!("{other:?}"),
        }
    }
}
