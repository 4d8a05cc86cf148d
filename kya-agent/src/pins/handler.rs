//! `tools.list`, `tools.diff` and `tools.accept` on the control socket.
//!
//! Listing and diffing change nothing. Accepting makes the definitions a
//! server announces now its pins: it passes the control socket's gate (a
//! selected process, or one descended from it, is refused) and reaches only
//! those who may connect to the socket at all (root, the daemon's user and
//! the `[control] group`).

use super::store::PinStore;
use crate::control::protocol::{Caller, ErrorCode, Request, Response};
use crate::control::server::{Handler, Reply, ReplyFuture};
use crate::host::user_name;
use serde_json::{json, Value};
use std::sync::Arc;

/// Serves `tools.*`.
pub(crate) struct ToolsHandler {
    store: Arc<PinStore>,
}

impl ToolsHandler {
    pub(crate) fn new(store: Arc<PinStore>) -> Self {
        Self { store }
    }
}

fn text<'a>(args: &'a Value, key: &str) -> Result<Option<&'a str>, Response> {
    match args.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(Response::error(
            ErrorCode::BadRequest,
            format!("{key} must be a string"),
        )),
    }
}

impl Handler for ToolsHandler {
    fn read_only(&self, op: &str) -> bool {
        matches!(op, "tools.list" | "tools.diff")
    }

    fn handle(&self, caller: Caller, request: Request) -> ReplyFuture {
        let store = self.store.clone();
        Box::pin(async move {
            let args = &request.args;
            let resp = match request.op.as_str() {
                "tools.list" => match text(args, "server") {
                    Ok(server) => Response::ok(json!(store.list(server))),
                    Err(e) => e,
                },
                "tools.diff" => match (text(args, "server"), text(args, "tool")) {
                    (Ok(server), Ok(tool)) => Response::ok(json!(store.diff(server, tool))),
                    (Err(e), _) | (_, Err(e)) => e,
                },
                "tools.accept" => match caller.cleared() {
                    Ok(_cleared) => accept(store, caller, args).await,
                    Err(refused) => refused,
                },
                other => {
                    Response::error(ErrorCode::UnknownOp, format!("unknown operation {other:?}"))
                }
            };
            Reply::Once(resp)
        })
    }
}

async fn accept(store: Arc<PinStore>, caller: Caller, args: &Value) -> Response {
    let server = match text(args, "server") {
        Ok(Some(s)) if !s.is_empty() => s.to_string(),
        Ok(_) => return Response::error(ErrorCode::BadRequest, "missing server"),
        Err(e) => return e,
    };
    let tools: Vec<String> = match args.get("tools") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => {
            let names: Option<Vec<String>> =
                a.iter().map(|t| t.as_str().map(str::to_string)).collect();
            match names {
                Some(n) => n,
                None => return Response::error(ErrorCode::BadRequest, "tools must be strings"),
            }
        }
        Some(_) => return Response::error(ErrorCode::BadRequest, "tools must be an array"),
    };
    let user = user_name(caller.uid).unwrap_or_else(|| format!("uid {}", caller.uid));
    let accepted = match store.accept(&server, &tools) {
        Ok(a) => a,
        Err(e @ crate::pins::PinError::UnknownServer { .. }) => {
            return Response::error(ErrorCode::NotFound, e.to_string())
        }
        Err(e @ crate::pins::PinError::NothingToAccept { .. }) => {
            return Response::error(ErrorCode::Conflict, e.to_string())
        }
        Err(e) => return Response::error(ErrorCode::Internal, e.to_string()),
    };
    let saving = store.clone();
    let saved = tokio::task::spawn_blocking(move || saving.save())
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    if let Err(e) = saved {
        tracing::error!(error = %e, "the accepted tool pins could not be written");
        return Response::error(
            ErrorCode::Internal,
            format!("accepted in memory, but not written to the state directory: {e}"),
        );
    }
    tracing::warn!(%server, tools = ?accepted, by = %user, "tool definitions accepted as the new pins");
    Response::ok(json!({"server": server, "accepted": accepted, "by": user}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::guard::Unselected;

    fn caller(cleared: bool) -> Caller {
        Caller {
            uid: 0,
            gid: 0,
            pid: Some(1),
            clearance: cleared.then(Unselected::for_tests),
        }
    }

    async fn call(h: &ToolsHandler, c: Caller, op: &str, args: Value) -> Response {
        match h.handle(c, Request::new(op, args)).await {
            Reply::Once(r) => r,
            Reply::Stream(_) => panic!("stream"),
        }
    }

    #[tokio::test]
    async fn accept_needs_the_gate_and_good_arguments() {
        let store = Arc::new(PinStore::in_memory());
        let l = |d: &str| {
            crate::pins::listing::read(&json!({"tools": [{"name": "t", "description": d}]}))
                .unwrap()
        };
        store.record("srv", &l("a"), true).unwrap();
        store.record("srv", &l("b"), true).unwrap();
        let h = ToolsHandler::new(store.clone());
        assert!(h.read_only("tools.list") && h.read_only("tools.diff"));
        assert!(!h.read_only("tools.accept") && !h.read_only("tools.other"));
        let r = call(&h, caller(false), "tools.accept", json!({"server": "srv"})).await;
        assert!(matches!(
            r,
            Response::Error {
                code: ErrorCode::Forbidden,
                ..
            }
        ));
        for bad in [
            json!({}),
            json!({"server": 1}),
            json!({"server": "srv", "tools": "t"}),
            json!({"server": "srv", "tools": [1]}),
        ] {
            let r = call(&h, caller(true), "tools.accept", bad.clone()).await;
            assert!(
                matches!(
                    r,
                    Response::Error {
                        code: ErrorCode::BadRequest,
                        ..
                    }
                ),
                "{bad}"
            );
        }
        let r = call(&h, caller(true), "tools.diff", json!({"server": "srv"})).await;
        let Response::Ok { result } = r else { panic!() };
        assert_eq!(result[0]["fields"][0]["new"], "\"b\"");
        let r = call(
            &h,
            caller(true),
            "tools.accept",
            json!({"server": "srv", "tools": ["t"]}),
        )
        .await;
        let Response::Ok { result } = r else {
            panic!("{r:?}")
        };
        assert_eq!(result["accepted"], json!(["t"]));
        let r = call(
            &h,
            caller(true),
            "tools.accept",
            json!({"server": "srv", "tools": ["t"]}),
        )
        .await;
        assert!(matches!(
            r,
            Response::Error {
                code: ErrorCode::Conflict,
                ..
            }
        ));
        let r = call(&h, caller(true), "tools.list", json!({"server": "srv"})).await;
        let Response::Ok { result } = r else { panic!() };
        assert_eq!(result[0]["state"], "unchanged");
    }
}
