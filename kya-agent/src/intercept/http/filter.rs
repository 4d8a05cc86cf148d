//! Judging what the server sends to the agent.
//!
//! Server→client requests (`sampling/createMessage`, `elicitation/create`, any
//! method) and notifications reach the same [`Governor::decide`] as tool calls: a
//! denied one is **not delivered** (the event is dropped and the decision is
//! recorded by the governor); kya does not answer the server on the agent's behalf,
//! so the server sees the request go unanswered, as if the client ignored it. A
//! `tools/list` result is filtered with [`Governor::may_call`] so the model never
//! sees tools it may never call. An answer is a `tools/list` result when its id is
//! that of a `tools/list` request the agent sent in the session
//! ([`listed`](super::listed)), whatever its shape; an answer to any other request
//! is never rewritten. Responses and errors otherwise pass unchanged.

use std::sync::Arc;

use serde_json::Value;

use crate::mcp::json;
use crate::mcp::jsonrpc::{self, Message};

use super::governor::{CallFacts, ConnFacts, Direction, Governor, Ruling};
use super::inspect;
use super::limits::Limits;
use super::listed;

/// Who the server is and what the HTTP exchange said about the session.
#[derive(Clone)]
pub struct Peer {
    pub gov: Arc<dyn Governor>,
    pub conn: Arc<ConnFacts>,
    pub server: String,
    pub session: Option<String>,
    pub protocol_version: Option<String>,
    pub limits: Limits,
    /// The MCP session the answers belong to ([`listed::scope`]): which ids
    /// name `tools/list` requests.
    pub scope: String,
}

/// What became of a server body or event data.
#[derive(Debug, PartialEq)]
pub enum Filtered {
    /// Not JSON-RPC: pass the original bytes.
    Opaque,
    /// JSON-RPC, judged, every message delivered as it was: pass the original
    /// bytes (strict JSON, so any client reads them as kya judged them).
    Unchanged,
    /// JSON-RPC; the canonical bytes to deliver (`None`: nothing left to deliver).
    JsonRpc(Option<Vec<u8>>),
    /// Claims JSON-RPC but failed strict parsing, or may claim it in a form kya
    /// does not judge.
    Refused(String),
}

/// Judge one server body or SSE `data` (decoded). What no client would act on
/// as JSON-RPC passes unchanged ([`inspect::server_data`]); what claims
/// JSON-RPC is strictly parsed and judged, or refused.
pub async fn filter_server_data(peer: &Peer, data: &[u8]) -> Filtered {
    let value = match inspect::server_data(data, &peer.limits.response_json()) {
        inspect::ServerData::Inert => return Filtered::Opaque,
        inspect::ServerData::Ambiguous(reason) => return Filtered::Refused(reason),
        inspect::ServerData::JsonRpc(v) => v,
    };
    let payload = match jsonrpc::parse_payload(&value, peer.limits.max_batch) {
        Ok(p) => p,
        Err(e) => {
            return Filtered::Refused(format!("server message is not acceptable JSON-RPC: {e}"))
        }
    };
    let raws: Vec<Value> = match value {
        Value::Array(items) => items,
        single => vec![single],
    };
    let size = raws.len();
    let mut kept = Vec::with_capacity(size);
    let mut changed = false;
    for (index, (msg, raw)) in payload.messages.into_iter().zip(raws).enumerate() {
        let batch = payload.batch.then_some((index, size));
        match judge(peer, msg, raw, batch).await {
            Some((v, edited)) => {
                changed |= edited;
                kept.push(v);
            }
            None => changed = true,
        }
    }
    if !changed {
        return Filtered::Unchanged;
    }
    if kept.is_empty() {
        return Filtered::JsonRpc(None);
    }
    let out = if payload.batch {
        Value::Array(kept)
    } else {
        kept.swap_remove(0)
    };
    Filtered::JsonRpc(Some(json::to_canonical_bytes(&out)))
}

async fn judge(
    peer: &Peer,
    msg: Message,
    mut raw: Value,
    batch: Option<(usize, usize)>,
) -> Option<(Value, bool)> {
    match &msg {
        Message::Response(r) => {
            if !listed::is_tools_list(&peer.scope, &r.id) {
                return Some((raw, false));
            }
            let complete = listed::is_first_page(&peer.scope, &r.id);
            let listed = match raw.get("result") {
                Some(result) => peer
                    .gov
                    .tools_listed(&peer.conn, &peer.server, result, complete),
                None => Err("the tools/list answer has no result".to_string()),
            };
            if let Err(why) = listed {
                let reason = format!("tools/list answer of {} refused: {why}", peer.server);
                tracing::warn!(conn = peer.conn.conn_id, %reason);
                peer.gov.refused(&peer.conn, &reason);
                return Some((refused_listing(&r.id, &reason), true));
            }
            let edited = filter_tools(peer, &mut raw);
            Some((raw, edited))
        }
        Message::Error(_) => Some((raw, false)),
        Message::ToolCall(_) | Message::Request(_) | Message::Notification(_) => {
            let facts = server_call_facts(peer, &msg, &raw, batch);
            let method = facts.method.clone();
            let mut ruling = peer.gov.decide(facts).await;
            if let Ruling::Hold { wait, .. } = ruling {
                ruling = wait.await;
            }
            match ruling {
                Ruling::Allow { .. } => Some((raw, false)),
                Ruling::Deny {
                    decision_id,
                    reason,
                    ..
                } => {
                    tracing::info!(conn = peer.conn.conn_id, %method, decision = %decision_id, %reason,
                        "server-to-client message denied; not delivered");
                    None
                }
                Ruling::Hold { decision_id, .. } => {
                    tracing::warn!(conn = peer.conn.conn_id, decision = %decision_id, "nested hold treated as denial");
                    None
                }
            }
        }
    }
}

fn server_call_facts(
    peer: &Peer,
    msg: &Message,
    raw: &Value,
    batch: Option<(usize, usize)>,
) -> CallFacts {
    let params = raw
        .get("params")
        .cloned()
        .unwrap_or_else(|| Value::Object(Default::default()));
    let progress_token = params
        .get("_meta")
        .and_then(|m| m.get("progressToken"))
        .cloned();
    let (tool, args) = match msg {
        Message::ToolCall(t) => (Some(t.name.clone()), Value::Object(t.arguments.clone())),
        _ => (None, params),
    };
    CallFacts {
        conn: peer.conn.clone(),
        server: peer.server.clone(),
        direction: Direction::ServerToClient,
        method: msg.method().unwrap_or_default().to_string(),
        tool,
        args,
        jsonrpc_id: msg.id().map(|i| i.to_value()),
        session: peer.session.clone(),
        protocol_version: peer.protocol_version.clone(),
        progress_token,
        batch,
    }
}

/// The JSON-RPC error that replaces a `tools/list` answer kya cannot judge.
fn refused_listing(id: &jsonrpc::Id, reason: &str) -> Value {
    serde_json::json!({
        "jsonrpc": "2.0",
        "id": id.to_value(),
        "error": {
            "code": crate::mcp::deny::DENIAL_CODE,
            "message": format!("kya: {reason}"),
        },
    })
}

/// Remove from the `result.tools` array of a `tools/list` answer every tool the
/// agent may never call. Entries without a string `name` are removed too: the
/// model cannot be shown a tool kya cannot judge. Returns whether any tool was
/// removed.
fn filter_tools(peer: &Peer, response: &mut Value) -> bool {
    let Some(tools) = response
        .get_mut("result")
        .and_then(|r| r.get_mut("tools"))
        .and_then(Value::as_array_mut)
    else {
        return false;
    };
    let before = tools.len();
    tools.retain(|t| {
        t.get("name")
            .and_then(Value::as_str)
            .is_some_and(|name| peer.gov.may_call(&peer.conn, &peer.server, name))
    });
    if tools.len() != before {
        tracing::debug!(
            conn = peer.conn.conn_id,
            hidden = before - tools.len(),
            "tools/list filtered"
        );
    }
    tools.len() != before
}
