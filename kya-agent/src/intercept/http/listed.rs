//! Which JSON-RPC ids name a `tools/list` request the agent actually sent.
//!
//! A server's answer is a `tools/list` result because it answers a `tools/list`
//! request, not because of its shape: kya notes the id of every request it
//! forwards, per MCP session, and [`filter`](super::filter) filters the tools
//! of an answer only when its id is one of a `tools/list` request of that
//! session. An answer can reach the client on any stream of the session (the
//! POST's own answer, its event stream, the GET stream, a legacy session's
//! stream), so the ids are kept per session, across connections:
//!
//! * the latest request with an id decides what the id names: an id reused for
//!   another method is no longer a `tools/list` id (its answer is that
//!   method's, and is not rewritten);
//! * an id is not forgotten when it is answered: a second answer with the same
//!   id, on whichever stream, is filtered too;
//! * `"1"` and `1` are different ids, as they are to a JSON-RPC client.
//!
//! The table is process-wide and bounded: at most [`MAX_IDS`] `tools/list` ids
//! per session (the oldest is forgotten first) and [`MAX_SESSIONS`] sessions
//! (the one unused longest is forgotten first). Only requests the agent sends
//! add entries; nothing the server sends does.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{LazyLock, Mutex};

use crate::mcp::jsonrpc::{Id, Message};

/// Most `tools/list` ids remembered per session.
pub const MAX_IDS: usize = 1024;
/// Most sessions remembered.
pub const MAX_SESSIONS: usize = 16384;

#[derive(Default)]
struct Session {
    ids: HashSet<Id>,
    /// The `tools/list` ids whose request asked for a later page (`cursor`):
    /// their answers are not the whole list.
    later: HashSet<Id>,
    /// Insertion order, for forgetting the oldest id first.
    order: VecDeque<Id>,
    used: u64,
}

#[derive(Default)]
struct Table {
    sessions: HashMap<String, Session>,
    clock: u64,
}

static TABLE: LazyLock<Mutex<Table>> = LazyLock::new(|| Mutex::new(Table::default()));

fn with<T>(f: impl FnOnce(&mut Table) -> T) -> T {
    // A poisoned lock only means another task panicked mid-update of a set of
    // ids; the table is still usable.
    let mut guard = TABLE.lock().unwrap_or_else(|p| p.into_inner());
    f(&mut guard)
}

/// The session key: destination, server name, and the client session (the
/// `Mcp-Session-Id`, or without one the calling process and message URL).
pub fn scope(dst: &std::net::SocketAddr, server: &str, session: &str) -> String {
    format!("{dst}|{server}|{session}")
}

/// The client session of a request: its `Mcp-Session-Id`, or without one
/// (legacy transport, stateless servers) the calling process and the message
/// URL, so one process never shares a session with another.
pub fn client_session(session_id: Option<&str>, pid: u32, path_and_query: &str) -> String {
    match session_id {
        Some(s) => format!("sid:{s}"),
        None => format!("url:{pid}:{path_and_query}"),
    }
}

/// The agent sent `messages` to the server in session `scope`: remember the ids
/// of its `tools/list` requests, and forget those its other requests reuse.
pub fn sent(scope: &str, messages: &[Message]) {
    let requests: Vec<(&Id, bool, bool)> = messages
        .iter()
        .filter(|m| matches!(m, Message::ToolCall(_) | Message::Request(_)))
        .filter_map(|m| {
            let paged = match m {
                Message::Request(r) => r
                    .params
                    .as_ref()
                    .is_some_and(|p| p.get("cursor").is_some_and(|c| !c.is_null())),
                _ => false,
            };
            Some((m.id()?, m.method() == Some("tools/list"), paged))
        })
        .collect();
    if requests.is_empty() {
        return;
    }
    with(|t| {
        t.clock += 1;
        let clock = t.clock;
        if !t.sessions.contains_key(scope) {
            if !requests.iter().any(|(_, list, _)| *list) {
                return;
            }
            if t.sessions.len() >= MAX_SESSIONS {
                let oldest = t
                    .sessions
                    .iter()
                    .min_by_key(|(_, s)| s.used)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    t.sessions.remove(&k);
                }
            }
            t.sessions.insert(scope.to_string(), Session::default());
        }
        let Some(s) = t.sessions.get_mut(scope) else {
            return;
        };
        s.used = clock;
        for (id, list, paged) in requests {
            if list {
                if s.ids.insert(id.clone()) {
                    s.order.push_back(id.clone());
                }
                if paged {
                    s.later.insert(id.clone());
                } else {
                    s.later.remove(id);
                }
                while s.ids.len() > MAX_IDS {
                    match s.order.pop_front() {
                        Some(old) => {
                            s.ids.remove(&old);
                            s.later.remove(&old);
                        }
                        None => break,
                    }
                }
            } else if s.ids.remove(id) {
                s.later.remove(id);
                s.order.retain(|x| x != id);
            }
        }
        if s.ids.is_empty() {
            t.sessions.remove(scope);
        }
    })
}

/// Whether `id` names a `tools/list` request the agent sent in session `scope`.
pub fn is_tools_list(scope: &str, id: &Id) -> bool {
    with(|t| t.sessions.get(scope).is_some_and(|s| s.ids.contains(id)))
}

/// Whether the `tools/list` request `id` of session `scope` asked for the
/// first page (no `cursor`): its answer, without a `nextCursor`, is the
/// server's whole list.
pub fn is_first_page(scope: &str, id: &Id) -> bool {
    with(|t| {
        t.sessions
            .get(scope)
            .is_some_and(|s| s.ids.contains(id) && !s.later.contains(id))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mcp::jsonrpc::parse_payload;
    use serde_json::json;

    fn send(scope: &str, v: serde_json::Value) {
        let p = parse_payload(&v, 16).unwrap();
        sent(scope, &p.messages);
    }

    #[test]
    fn latest_request_with_an_id_decides() {
        let s = "test|reuse";
        send(s, json!({"jsonrpc":"2.0","id":7,"method":"tools/list"}));
        assert!(is_tools_list(s, &Id::Int(7)));
        // Answered: still a tools/list id (a duplicate answer is filtered too).
        assert!(is_tools_list(s, &Id::Int(7)));
        send(
            s,
            json!({"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"x"}}),
        );
        assert!(!is_tools_list(s, &Id::Int(7)));
        send(s, json!({"jsonrpc":"2.0","id":7,"method":"tools/list"}));
        assert!(is_tools_list(s, &Id::Int(7)));
    }

    #[test]
    fn later_pages_are_told_apart() {
        let s = "test|pages";
        send(s, json!({"jsonrpc":"2.0","id":1,"method":"tools/list"}));
        send(
            s,
            json!({"jsonrpc":"2.0","id":2,"method":"tools/list","params":{"cursor":"c"}}),
        );
        assert!(is_first_page(s, &Id::Int(1)));
        assert!(is_tools_list(s, &Id::Int(2)));
        assert!(!is_first_page(s, &Id::Int(2)));
        assert!(!is_first_page(s, &Id::Int(3)));
        send(s, json!({"jsonrpc":"2.0","id":2,"method":"tools/list"}));
        assert!(is_first_page(s, &Id::Int(2)));
    }

    #[test]
    fn string_and_number_ids_differ() {
        let s = "test|types";
        send(s, json!({"jsonrpc":"2.0","id":"1","method":"tools/list"}));
        assert!(is_tools_list(s, &Id::Str("1".into())));
        assert!(!is_tools_list(s, &Id::Int(1)));
    }

    #[test]
    fn batches_and_sessions() {
        send(
            "test|a",
            json!([
                {"jsonrpc":"2.0","id":1,"method":"tools/list"},
                {"jsonrpc":"2.0","id":2,"method":"resources/list"},
                {"jsonrpc":"2.0","method":"tools/list"}
            ]),
        );
        assert!(is_tools_list("test|a", &Id::Int(1)));
        assert!(!is_tools_list("test|a", &Id::Int(2)));
        assert!(!is_tools_list("test|b", &Id::Int(1)));
        // Responses and notifications the agent sends do not touch the ids.
        send("test|a", json!({"jsonrpc":"2.0","id":1,"result":{}}));
        assert!(is_tools_list("test|a", &Id::Int(1)));
    }

    #[test]
    fn bounded_oldest_forgotten_first() {
        let s = "test|bound";
        for i in 0..(MAX_IDS as i64 + 2) {
            send(s, json!({"jsonrpc":"2.0","id":i,"method":"tools/list"}));
        }
        assert!(!is_tools_list(s, &Id::Int(0)));
        assert!(!is_tools_list(s, &Id::Int(1)));
        assert!(is_tools_list(s, &Id::Int(2)));
        assert!(is_tools_list(s, &Id::Int(MAX_IDS as i64 + 1)));
    }
}
