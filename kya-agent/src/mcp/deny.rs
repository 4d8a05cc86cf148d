//! The answers kya gives in place of the upstream's: denials, batch refusals,
//! progress while a call is held, and refusals of unreadable requests.
//!
//! The shapes are a contract (chosen by `intercept.deny_shape`): MCP clients show a
//! `CallToolResult` with `isError: true` to the model, so the default denial names
//! the rule, the reason and the decision id in its text; the `jsonrpc_error` shape
//! carries the same facts as structured `data`. Only `tools/call` has a
//! `CallToolResult`, so other methods are always denied with a JSON-RPC error.

use serde_json::{json, Value};

pub(crate) use crate::config::DenyShape;

use super::jsonrpc::Id;

/// The JSON-RPC error code of a policy denial (implementation-defined server range).
pub(crate) const DENIAL_CODE: i64 = -32001;
/// The JSON-RPC "Invalid Request" code, for bodies kya cannot read.
pub(crate) const INVALID_REQUEST_CODE: i64 = -32600;
/// The answer to an allowed member of a batch that is not forwarded.
pub(crate) const BATCH_REFUSAL: &str = "refused: part of a batch with a denied call";

/// What a denial says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Denial<'a> {
    /// The deciding rule; `None` when the policy default decided.
    pub rule: Option<&'a str>,
    pub reason: &'a str,
    /// The decision id (as in the audit log).
    pub decision: &'a str,
}

impl Denial<'_> {
    /// `kya denied this call: <reason> (rule <id>, decision <id>)`; a default
    /// decision names the rule `defaults` (the policy table that decided).
    pub(crate) fn text(&self) -> String {
        format!(
            "kya denied this call: {} (rule {}, decision {})",
            self.reason,
            self.rule.unwrap_or("defaults"),
            self.decision
        )
    }
}

/// A `CallToolResult` with `isError: true` answering request `id`.
pub(crate) fn tool_error(id: &Id, denial: &Denial<'_>) -> Value {
    tool_error_text(id, &denial.text())
}

fn tool_error_text(id: &Id, text: &str) -> Value {
    json!({
        "jsonrpc": "2.0",
        "id": id.to_value(),
        "result": {
            "content": [{"type": "text", "text": text}],
            "isError": true,
        },
    })
}

/// A JSON-RPC error (code -32001, `data: {rule, reason, decision}`) answering `id`.
pub(crate) fn jsonrpc_error(id: &Id, denial: &Denial<'_>) -> Value {
    json!({
        "jsonrpc": "2.0",
        "id": id.to_value(),
        "error": {
            "code": DENIAL_CODE,
            "message": denial.text(),
            "data": {
                "rule": denial.rule,
                "reason": denial.reason,
                "decision": denial.decision,
            },
        },
    })
}

/// The denial of request `id` in the configured shape; `is_tool_call` is whether the
/// request was a `tools/call` (only those can be answered with a `CallToolResult`).
pub(crate) fn denial(shape: DenyShape, id: &Id, is_tool_call: bool, d: &Denial<'_>) -> Value {
    match (shape, is_tool_call) {
        (DenyShape::ToolError, true) => tool_error(id, d),
        _ => jsonrpc_error(id, d),
    }
}

/// The answer to an allowed member of a batch that is not forwarded because another
/// member was not allowed. `decision` is this member's own decision id.
pub(crate) fn batch_refusal(
    shape: DenyShape,
    id: &Id,
    is_tool_call: bool,
    decision: &str,
) -> Value {
    match (shape, is_tool_call) {
        (DenyShape::ToolError, true) => tool_error_text(id, BATCH_REFUSAL),
        _ => json!({
            "jsonrpc": "2.0",
            "id": id.to_value(),
            "error": {
                "code": DENIAL_CODE,
                "message": BATCH_REFUSAL,
                "data": {"rule": null, "reason": BATCH_REFUSAL, "decision": decision},
            },
        }),
    }
}

/// A `notifications/progress` for a held call, so clients that reset their timeout
/// on progress keep waiting and the model sees why. `progress` must increase with
/// every notification for one token (the MCP rule); `message` is
/// `waiting for approval by <owner>, code <binding>`.
pub(crate) fn progress_notification(
    token: &Id,
    progress: u64,
    owner: &str,
    binding: &str,
) -> Value {
    json!({
        "jsonrpc": "2.0",
        "method": "notifications/progress",
        "params": {
            "progressToken": token.to_value(),
            "progress": progress,
            "message": format!("waiting for approval by {owner}, code {binding}"),
        },
    })
}

/// The answer to a body kya could not read canonically (no id is trustworthy, so it
/// is `null`, as JSON-RPC prescribes for unreadable requests).
pub(crate) fn refusal(reason: &str) -> Value {
    json!({
        "jsonrpc": "2.0",
        "id": null,
        "error": {
            "code": INVALID_REQUEST_CODE,
            "message": format!("kya refused this request: {reason}"),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mcp::json::{parse, to_canonical_bytes, JsonLimits};
    use crate::mcp::jsonrpc::{parse_message, Message};

    const D: Denial<'static> = Denial {
        rule: Some("no-destructive-db"),
        reason: "destructive database operations are not allowed from agents",
        decision: "d-42",
    };

    /// Every answer must itself be a valid JSON-RPC message by our own strict rules.
    fn reparse(v: &Value) -> Message {
        let bytes = to_canonical_bytes(v);
        parse_message(&parse(&bytes, &JsonLimits::default()).unwrap()).unwrap()
    }

    #[test]
    fn tool_error_shape() {
        let v = tool_error(&Id::Int(7), &D);
        assert_eq!(
            v,
            json!({"jsonrpc":"2.0","id":7,"result":{"content":[{"type":"text",
                "text":"kya denied this call: destructive database operations are not allowed from agents (rule no-destructive-db, decision d-42)"}],
                "isError":true}})
        );
        assert!(matches!(reparse(&v), Message::Response(r) if r.id == Id::Int(7)));
    }

    #[test]
    fn jsonrpc_error_shape_and_default_rule() {
        let d = Denial {
            rule: None,
            reason: "no rule allows this tool",
            decision: "d-1",
        };
        let v = jsonrpc_error(&Id::Str("abc".into()), &d);
        assert_eq!(v["error"]["code"], -32001);
        assert_eq!(
            v["error"]["data"],
            json!({"rule": null, "reason": "no rule allows this tool", "decision": "d-1"})
        );
        assert_eq!(
            v["error"]["message"],
            "kya denied this call: no rule allows this tool (rule defaults, decision d-1)"
        );
        assert_eq!(v["id"], "abc");
        assert!(matches!(reparse(&v), Message::Error(e) if e.code == DENIAL_CODE));
    }

    #[test]
    fn shape_selection() {
        let id = Id::Int(1);
        assert!(denial(DenyShape::ToolError, &id, true, &D)
            .get("result")
            .is_some());
        assert!(denial(DenyShape::ToolError, &id, false, &D)
            .get("error")
            .is_some());
        assert!(denial(DenyShape::JsonrpcError, &id, true, &D)
            .get("error")
            .is_some());
    }

    #[test]
    fn batch_refusals() {
        let v = batch_refusal(DenyShape::ToolError, &Id::Int(2), true, "d-2");
        assert_eq!(v["result"]["content"][0]["text"], BATCH_REFUSAL);
        assert_eq!(v["result"]["isError"], true);
        let v = batch_refusal(DenyShape::JsonrpcError, &Id::Int(2), true, "d-2");
        assert_eq!(v["error"]["message"], BATCH_REFUSAL);
        assert_eq!(v["error"]["data"]["decision"], "d-2");
        reparse(&v);
        let v = batch_refusal(DenyShape::ToolError, &Id::Int(3), false, "d-3");
        assert_eq!(v["error"]["code"], DENIAL_CODE);
    }

    #[test]
    fn progress() {
        let v = progress_notification(&Id::Str("tok".into()), 3, "alice", "XK-42");
        assert_eq!(
            v,
            json!({"jsonrpc":"2.0","method":"notifications/progress","params":{
                "progressToken":"tok","progress":3,
                "message":"waiting for approval by alice, code XK-42"}})
        );
        assert!(
            matches!(reparse(&v), Message::Notification(n) if n.method == "notifications/progress")
        );
        assert_eq!(
            progress_notification(&Id::Int(9), 1, "a", "b")["params"]["progressToken"],
            9
        );
    }

    #[test]
    fn refusal_has_null_id() {
        let v = refusal("duplicate key \"name\"");
        assert_eq!(v["id"], Value::Null);
        assert_eq!(v["error"]["code"], INVALID_REQUEST_CODE);
        assert!(matches!(reparse(&v), Message::Error(e) if e.id.is_none()));
    }

    #[test]
    fn hostile_reason_text_stays_data() {
        // A reason with quotes, newlines and JSON inside is carried as text.
        let d = Denial {
            rule: Some("r\"1"),
            reason: "a\n\"},{\"isError\":false",
            decision: "d",
        };
        let v = tool_error(&Id::Int(1), &d);
        let Message::Response(r) = reparse(&v) else {
            panic!()
        };
        assert_eq!(r.result["isError"], true);
        assert_eq!(r.result["content"].as_array().unwrap().len(), 1);
    }
}
