//! Filtering `tools/list` results: the model should not even see tools its agent
//! may never call, so it neither tries them nor learns they exist.

use serde_json::{json, Map, Value};

use super::jsonrpc::Response;

/// The filtered result and what was hidden.
#[derive(Debug, Clone, PartialEq)]
pub struct FilteredTools {
    /// The `tools/list` result with hidden tools removed (other members unchanged,
    /// including `nextCursor`, so pagination keeps working).
    pub result: Map<String, Value>,
    /// Names of the tools removed, in listing order.
    pub hidden: Vec<String>,
}

/// Why a `tools/list` result cannot be filtered (the caller refuses to forward it:
/// a listing kya cannot read might reveal tools it would have hidden).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ToolsListError {
    #[error("the tools/list result has no `tools` array")]
    NoTools,
    #[error("tools[{0}] is not an object")]
    NotAnObject(usize),
    #[error("tools[{0}] has no string `name`")]
    NoName(usize),
}

/// Keep only the tools for which `may_call(name)` is true.
pub fn filter_tools_list(
    result: &Map<String, Value>,
    mut may_call: impl FnMut(&str) -> bool,
) -> Result<FilteredTools, ToolsListError> {
    let tools = result
        .get("tools")
        .and_then(Value::as_array)
        .ok_or(ToolsListError::NoTools)?;
    let mut kept = Vec::with_capacity(tools.len());
    let mut hidden = Vec::new();
    for (i, tool) in tools.iter().enumerate() {
        let obj = tool.as_object().ok_or(ToolsListError::NotAnObject(i))?;
        let name = obj
            .get("name")
            .and_then(Value::as_str)
            .ok_or(ToolsListError::NoName(i))?;
        if may_call(name) {
            kept.push(tool.clone());
        } else {
            hidden.push(name.to_string());
        }
    }
    let mut out = result.clone();
    out.insert("tools".to_string(), Value::Array(kept));
    Ok(FilteredTools {
        result: out,
        hidden,
    })
}

/// Filter a whole `tools/list` response message (the caller matched its id to a
/// `tools/list` request); returns the JSON-RPC message to forward and the hidden names.
pub fn filter_tools_list_response(
    response: &Response,
    may_call: impl FnMut(&str) -> bool,
) -> Result<(Value, Vec<String>), ToolsListError> {
    let filtered = filter_tools_list(&response.result, may_call)?;
    Ok((
        json!({"jsonrpc": "2.0", "id": response.id.to_value(), "result": filtered.result}),
        filtered.hidden,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn hides_tools_and_keeps_the_rest() {
        let r = obj(json!({"tools":[
            {"name":"search_docs","description":"d","inputSchema":{"type":"object"}},
            {"name":"delete_db","inputSchema":{"type":"object"}},
            {"name":"search_web","inputSchema":{"type":"object"}}],
            "nextCursor":"c2"}));
        let f = filter_tools_list(&r, |n| n.starts_with("search_")).unwrap();
        assert_eq!(f.hidden, vec!["delete_db".to_string()]);
        assert_eq!(
            f.result,
            obj(json!({"tools":[
                {"name":"search_docs","description":"d","inputSchema":{"type":"object"}},
                {"name":"search_web","inputSchema":{"type":"object"}}],
                "nextCursor":"c2"}))
        );
        let none = filter_tools_list(&r, |_| false).unwrap();
        assert_eq!(none.result["tools"], json!([]));
        assert_eq!(none.hidden.len(), 3);
        let all = filter_tools_list(&r, |_| true).unwrap();
        assert_eq!(all.result, r);
        assert!(all.hidden.is_empty());
    }

    #[test]
    fn malformed_listings_are_errors() {
        assert_eq!(
            filter_tools_list(&obj(json!({})), |_| true),
            Err(ToolsListError::NoTools)
        );
        assert_eq!(
            filter_tools_list(&obj(json!({"tools":{}})), |_| true),
            Err(ToolsListError::NoTools)
        );
        assert_eq!(
            filter_tools_list(&obj(json!({"tools":[{"name":"a"},"b"]})), |_| true),
            Err(ToolsListError::NotAnObject(1))
        );
        assert_eq!(
            filter_tools_list(&obj(json!({"tools":[{"name":1}]})), |_| true),
            Err(ToolsListError::NoName(0))
        );
        assert_eq!(
            filter_tools_list(&obj(json!({"tools":[{"title":"x"}]})), |_| true),
            Err(ToolsListError::NoName(0))
        );
    }

    #[test]
    fn whole_response_message() {
        use crate::mcp::jsonrpc::{parse_message, Id, Message};
        let Message::Response(r) = parse_message(&json!({"jsonrpc":"2.0","id":"l1",
            "result":{"tools":[{"name":"keep"},{"name":"drop"}]}}))
        .unwrap() else {
            panic!()
        };
        let (v, hidden) = filter_tools_list_response(&r, |n| n == "keep").unwrap();
        assert_eq!(hidden, vec!["drop"]);
        assert_eq!(
            v,
            json!({"jsonrpc":"2.0","id":"l1","result":{"tools":[{"name":"keep"}]}})
        );
        let Message::Response(back) = parse_message(&v).unwrap() else {
            panic!()
        };
        assert_eq!(back.id, Id::Str("l1".into()));
    }

    #[test]
    fn predicate_sees_exact_names() {
        let r = obj(json!({"tools":[{"name":"Delete"},{"name":"delete"}]}));
        let mut seen = Vec::new();
        let f = filter_tools_list(&r, |n| {
            seen.push(n.to_string());
            n == "delete"
        })
        .unwrap();
        assert_eq!(seen, vec!["Delete", "delete"]);
        assert_eq!(f.hidden, vec!["Delete"]);
    }
}
