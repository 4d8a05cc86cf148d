//! The denials the proxy sends, built by [`crate::mcp::deny`] (the documented
//! denial shapes) from the owned facts a [`Ruling`](super::Ruling) carries.
//!
//! One addition: every `result` kya writes carries `resultType: "complete"`. The
//! 2026-07-28 protocol makes `Result.resultType` required and the official Python
//! SDK 2.x rejects a `CallToolResult` without it (found by the real-peer tests);
//! older schemas allow extra members in a result, so one shape serves every
//! protocol version. (Reported to the `mcp` module's owner; until its builders add
//! it, it is added here.)

use serde_json::Value;

use crate::config::DenyShape;
use crate::mcp::deny as builders;
use crate::mcp::jsonrpc::Id;

/// Why and by what a message was denied (owned: it outlives the ruling).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Denial {
    /// The policy rule; `None` when the default decided or the proxy refused.
    pub rule: Option<String>,
    pub reason: String,
    /// The decision id (`"-"` for a protocol refusal made before any decision).
    pub decision: String,
}

impl Denial {
    /// A refusal made by the proxy itself, with no policy decision behind it.
    pub(crate) fn refusal(reason: impl Into<String>) -> Self {
        Self {
            rule: None,
            reason: reason.into(),
            decision: "-".into(),
        }
    }

    fn borrowed(&self) -> builders::Denial<'_> {
        builders::Denial {
            rule: self.rule.as_deref(),
            reason: &self.reason,
            decision: &self.decision,
        }
    }
}

fn with_result_type(mut v: Value) -> Value {
    if let Some(result) = v.get_mut("result").and_then(Value::as_object_mut) {
        result
            .entry("resultType")
            .or_insert_with(|| Value::from("complete"));
    }
    v
}

/// The denial of request `id` in the configured shape.
pub(crate) fn answer(shape: DenyShape, is_tool_call: bool, id: &Id, denial: &Denial) -> Value {
    with_result_type(builders::denial(
        shape,
        id,
        is_tool_call,
        &denial.borrowed(),
    ))
}

/// The answer to an allowed batch member that is not forwarded.
pub(crate) fn batch_refusal(
    shape: DenyShape,
    is_tool_call: bool,
    id: &Id,
    decision: &str,
) -> Value {
    with_result_type(builders::batch_refusal(shape, id, is_tool_call, decision))
}

/// `notifications/progress` for a held call.
pub(crate) fn progress(token: &Id, step: u64, owner: &str, binding: &str) -> Value {
    builders::progress_notification(token, step, owner, binding)
}

/// The answer to a request kya could not read (id `null`).
pub(crate) fn refusal(reason: &str) -> Value {
    builders::refusal(reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn d() -> Denial {
        Denial {
            rule: Some("no-destructive-db".into()),
            reason: "destructive".into(),
            decision: "d-1".into(),
        }
    }

    #[test]
    fn tool_error_names_rule_reason_decision_and_result_type() {
        let v = answer(DenyShape::ToolError, true, &Id::Int(7), &d());
        assert_eq!(v["id"], json!(7));
        assert_eq!(v["result"]["isError"], json!(true));
        assert_eq!(v["result"]["resultType"], json!("complete"));
        assert_eq!(
            v["result"]["content"][0]["text"],
            json!("kya denied this call: destructive (rule no-destructive-db, decision d-1)")
        );
    }

    #[test]
    fn jsonrpc_error_has_no_result_type() {
        let v = answer(DenyShape::JsonrpcError, true, &Id::Str("a".into()), &d());
        assert_eq!(v["error"]["code"], json!(-32001));
        assert_eq!(v["error"]["data"]["decision"], json!("d-1"));
        assert!(v.get("result").is_none());
    }

    #[test]
    fn batch_refusal_of_a_tool_call_carries_result_type() {
        let v = batch_refusal(DenyShape::ToolError, true, &Id::Int(1), "d-2");
        assert_eq!(v["result"]["resultType"], json!("complete"));
        assert!(v["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains(builders::BATCH_REFUSAL));
    }

    #[test]
    fn refusal_has_null_id() {
        assert_eq!(refusal("x")["id"], Value::Null);
        assert_eq!(Denial::refusal("r").decision, "-");
    }
}
