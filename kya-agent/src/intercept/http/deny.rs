//! What the agent sees when kya refuses something: the denial shapes of DESIGN.md.
//!
//! A denial must reach the model, so it is an ordinary JSON-RPC answer to the
//! request's id, never a bare HTTP error when an id is known: MCP clients show a
//! `CallToolResult` with `isError: true` (or a JSON-RPC error) to the model, which can
//! then explain or adapt, while an HTTP 403 would surface as a transport failure.

use serde_json::{json, Value};

use crate::config::DenyShape;

/// The JSON-RPC error code kya uses for policy denials.
pub const DENIED_CODE: i64 = -32001;

/// The answer to a batch member that was allowed but not forwarded.
pub const BATCH_REFUSAL: &str = "refused: part of a batch with a denied call";

/// Why and by what a message was denied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// The policy rule; `None` when the default decided or the proxy refused.
    pub rule: Option<String>,
    pub reason: String,
    /// The decision id (`"-"` for a protocol refusal made before any decision).
    pub decision: String,
}

impl Denial {
    /// The text the model reads.
    pub fn text(&self) -> String {
        format!(
            "kya denied this call: {} (rule {}, decision {})",
            self.reason,
            self.rule.as_deref().unwrap_or("default"),
            self.decision
        )
    }
}

/// The answer to a denied request with id `id`. `tool_error` is a `CallToolResult`,
/// which only a `tools/call` can carry; any other method gets the JSON-RPC error
/// shape whatever the configuration says, since a client expecting e.g. a
/// `ListToolsResult` could not read a `CallToolResult`.
pub fn answer(shape: DenyShape, is_tool_call: bool, id: &Value, denial: &Denial) -> Value {
    match (shape, is_tool_call) {
        (DenyShape::ToolError, true) => tool_error(id, denial),
        _ => jsonrpc_error(id, denial),
    }
}

/// A `CallToolResult` with `isError: true`. It carries `resultType: "complete"`:
/// the 2026-07-28 protocol makes `Result.resultType` required (the official Python
/// SDK 2.x rejects a result without it), and older schemas allow extra members in a
/// result, so one shape serves every protocol version.
pub fn tool_error(id: &Value, denial: &Denial) -> Value {
    json!({
        "jsonrpc": "2.0",
        "id": id,
        "result": {
            "content": [{"type": "text", "text": denial.text()}],
            "isError": true,
            "resultType": "complete",
        }
    })
}

/// A JSON-RPC error with code [`DENIED_CODE`] and `data: {rule, reason, decision}`.
pub fn jsonrpc_error(id: &Value, denial: &Denial) -> Value {
    json!({
        "jsonrpc": "2.0",
        "id": id,
        "error": {
            "code": DENIED_CODE,
            "message": denial.text(),
            "data": {"rule": denial.rule, "reason": denial.reason, "decision": denial.decision},
        }
    })
}

/// The `notifications/progress` kya streams while a call waits for approval.
pub fn progress(token: &Value, step: u64, owner: &str, binding: &str) -> Value {
    json!({
        "jsonrpc": "2.0",
        "method": "notifications/progress",
        "params": {
            "progressToken": token,
            "progress": step,
            "message": format!("waiting for approval by {owner}, code {binding}"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d() -> Denial {
        Denial {
            rule: Some("no-destructive-db".into()),
            reason: "destructive".into(),
            decision: "d-1".into(),
        }
    }

    #[test]
    fn tool_error_names_rule_reason_and_decision() {
        let v = answer(DenyShape::ToolError, true, &json!(7), &d());
        assert_eq!(v["id"], json!(7));
        assert_eq!(v["result"]["isError"], json!(true));
        assert_eq!(v["result"]["resultType"], json!("complete"));
        assert_eq!(
            v["result"]["content"][0]["text"],
            json!("kya denied this call: destructive (rule no-destructive-db, decision d-1)")
        );
    }

    #[test]
    fn jsonrpc_error_carries_data() {
        let v = answer(DenyShape::JsonrpcError, true, &json!("a"), &d());
        assert_eq!(v["error"]["code"], json!(-32001));
        assert_eq!(v["error"]["data"]["rule"], json!("no-destructive-db"));
        assert_eq!(v["error"]["data"]["decision"], json!("d-1"));
        assert!(v.get("result").is_none());
    }

    #[test]
    fn non_tool_calls_always_get_an_error_object() {
        let v = answer(DenyShape::ToolError, false, &json!(1), &d());
        assert_eq!(v["error"]["code"], json!(-32001));
    }

    #[test]
    fn default_rule_is_named() {
        let mut x = d();
        x.rule = None;
        assert!(x.text().contains("rule default"));
    }

    #[test]
    fn progress_message_names_owner_and_code() {
        let v = progress(&json!("tok"), 3, "alice", "ABCD");
        assert_eq!(v["params"]["progressToken"], json!("tok"));
        assert_eq!(
            v["params"]["message"],
            json!("waiting for approval by alice, code ABCD")
        );
    }
}
