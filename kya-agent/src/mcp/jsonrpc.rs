//! The JSON-RPC 2.0 message model MCP uses, read strictly from a parsed [`Value`].
//!
//! Every message is classified into exactly one [`Message`] kind; anything that
//! could be read two ways (a member both a request and a response, an id that is a
//! float or null, a `tools/call` without an id, `params` that is not an object, a
//! method spelled `Tools/Call`) is an error, so the caller denies it rather than
//! guessing what the upstream will make of it. `tools/call` requests are extracted
//! into [`ToolCall`], which is what the policy decides on.

use serde_json::{Map, Value};
use std::collections::HashSet;

use super::json::fold_case;

/// The method that runs a tool: the one the policy decides on.
pub const TOOLS_CALL: &str = "tools/call";

/// MCP method names. A method that equals one of these after trimming and case
/// folding but is not spelled exactly so is rejected as ambiguous: a server that
/// dispatches case-insensitively would run what the policy saw as an unknown method.
const KNOWN_METHODS: &[&str] = &[
    "initialize",
    "ping",
    "tools/call",
    "tools/list",
    "resources/list",
    "resources/templates/list",
    "resources/read",
    "resources/subscribe",
    "resources/unsubscribe",
    "prompts/list",
    "prompts/get",
    "completion/complete",
    "logging/setLevel",
    "sampling/createMessage",
    "elicitation/create",
    "roots/list",
    "tasks/get",
    "tasks/result",
    "tasks/list",
    "tasks/cancel",
    "notifications/initialized",
    "notifications/cancelled",
    "notifications/progress",
    "notifications/message",
    "notifications/resources/updated",
    "notifications/resources/list_changed",
    "notifications/tools/list_changed",
    "notifications/prompts/list_changed",
    "notifications/roots/list_changed",
];

/// Members a JSON-RPC 2.0 message may have. Anything else is rejected: it has no
/// meaning the policy could have judged.
const ALLOWED_MEMBERS: &[&str] = &["jsonrpc", "id", "method", "params", "result", "error"];

/// A JSON-RPC id (and the type of an MCP `progressToken`): a string or an integer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Id {
    Str(String),
    Int(i64),
    /// Only for integers above `i64::MAX`.
    UInt(u64),
}

impl Id {
    /// The JSON form, for answers that must echo the id.
    pub fn to_value(&self) -> Value {
        match self {
            Id::Str(s) => Value::String(s.clone()),
            Id::Int(i) => Value::from(*i),
            Id::UInt(u) => Value::from(*u),
        }
    }

    fn from_value(v: &Value) -> Option<Id> {
        match v {
            Value::String(s) => Some(Id::Str(s.clone())),
            Value::Number(n) => n.as_i64().map(Id::Int).or_else(|| n.as_u64().map(Id::UInt)),
            _ => None,
        }
    }
}

impl std::fmt::Display for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Id::Str(s) => write!(f, "{s:?}"),
            Id::Int(i) => write!(f, "{i}"),
            Id::UInt(u) => write!(f, "{u}"),
        }
    }
}

/// A `tools/call` request: what the policy needs to decide.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: Id,
    /// `params.name`.
    pub name: String,
    /// `params.arguments` (`{}` when absent).
    pub arguments: Map<String, Value>,
    /// `params._meta.progressToken`, where kya may send progress while holding.
    pub progress_token: Option<Id>,
}

/// A request other than `tools/call`.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub id: Id,
    pub method: String,
    pub params: Option<Map<String, Value>>,
}

/// A notification (a message with a method and no id).
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    pub method: String,
    pub params: Option<Map<String, Value>>,
}

/// A successful response.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub id: Id,
    pub result: Map<String, Value>,
}

/// An error response; the id is `None` only when the peer could not read one.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorResponse {
    pub id: Option<Id>,
    pub code: i64,
    pub message: String,
    pub data: Option<Value>,
}

/// One JSON-RPC message, classified.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    ToolCall(ToolCall),
    Request(Request),
    Notification(Notification),
    Response(Response),
    Error(ErrorResponse),
}

impl Message {
    /// The method, for requests and notifications.
    pub fn method(&self) -> Option<&str> {
        match self {
            Message::ToolCall(_) => Some(TOOLS_CALL),
            Message::Request(r) => Some(&r.method),
            Message::Notification(n) => Some(&n.method),
            Message::Response(_) | Message::Error(_) => None,
        }
    }

    /// The id, for everything but notifications (and id-less errors).
    pub fn id(&self) -> Option<&Id> {
        match self {
            Message::ToolCall(t) => Some(&t.id),
            Message::Request(r) => Some(&r.id),
            Message::Response(r) => Some(&r.id),
            Message::Error(e) => e.id.as_ref(),
            Message::Notification(_) => None,
        }
    }

    /// `params` of a request or notification other than `tools/call` (whose parts
    /// are in [`ToolCall`]).
    pub fn params(&self) -> Option<&Map<String, Value>> {
        match self {
            Message::Request(r) => r.params.as_ref(),
            Message::Notification(n) => n.params.as_ref(),
            _ => None,
        }
    }
}

/// A body: one message, or a batch (a non-empty array of messages).
#[derive(Debug, Clone, PartialEq)]
pub struct Payload {
    pub messages: Vec<Message>,
    /// Whether the body was an array (the answer must then be an array too).
    pub batch: bool,
}

/// Why a JSON value is not an acceptable JSON-RPC message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonRpcError {
    #[error("a message must be a JSON object")]
    NotAnObject,
    #[error("`jsonrpc` must be the string \"2.0\"")]
    BadVersion,
    #[error("unknown member {0:?} in a JSON-RPC message")]
    UnknownMember(String),
    #[error("`method` must be a non-empty string without control characters")]
    BadMethod,
    #[error("method {0:?} is a case or whitespace variant of a known MCP method")]
    AmbiguousMethod(String),
    #[error("`id` must be a string or an integer")]
    BadId,
    #[error("`params` must be an object")]
    ParamsNotObject,
    #[error("a message must have `method`, `result` or `error`")]
    NoKind,
    #[error("a message has both {0} and {1}")]
    ConflictingKinds(&'static str, &'static str),
    #[error("a response has no `id`")]
    ResponseWithoutId,
    #[error("`result` must be an object")]
    ResultNotObject,
    #[error("`error` must be an object with an integer `code` and a string `message`, and nothing else but `data`")]
    BadErrorObject,
    #[error("tools/call sent as a notification (no id)")]
    ToolCallWithoutId,
    #[error("tools/call without `params`")]
    ToolCallWithoutParams,
    #[error("tools/call `params.name` must be a non-empty string without control characters")]
    BadToolName,
    #[error("tools/call `params.arguments` must be an object")]
    ArgumentsNotObject,
    #[error("`params._meta` must be an object")]
    MetaNotObject,
    #[error("`params._meta.progressToken` must be a string or an integer")]
    BadProgressToken,
    #[error("an empty batch")]
    EmptyBatch,
    #[error("a batch of {size} messages exceeds the limit of {limit}")]
    BatchTooLarge { size: usize, limit: usize },
    #[error("id {0} used by more than one request in a batch")]
    DuplicateId(String),
    #[error("batch member {index}: {source}")]
    InBatch {
        index: usize,
        #[source]
        source: Box<JsonRpcError>,
    },
}

/// Read a body: a single message or a batch of at most `max_batch` messages.
pub fn parse_payload(value: &Value, max_batch: usize) -> Result<Payload, JsonRpcError> {
    match value {
        Value::Array(items) => {
            if items.is_empty() {
                return Err(JsonRpcError::EmptyBatch);
            }
            if items.len() > max_batch {
                return Err(JsonRpcError::BatchTooLarge {
                    size: items.len(),
                    limit: max_batch,
                });
            }
            let mut messages = Vec::with_capacity(items.len());
            let mut request_ids = HashSet::new();
            for (index, item) in items.iter().enumerate() {
                let m = parse_message(item).map_err(|e| JsonRpcError::InBatch {
                    index,
                    source: Box::new(e),
                })?;
                // Two requests with one id: their answers could not be told apart.
                if matches!(m, Message::ToolCall(_) | Message::Request(_)) {
                    if let Some(id) = m.id() {
                        if !request_ids.insert(id.clone()) {
                            return Err(JsonRpcError::DuplicateId(id.to_string()));
                        }
                    }
                }
                messages.push(m);
            }
            Ok(Payload {
                messages,
                batch: true,
            })
        }
        other => Ok(Payload {
            messages: vec![parse_message(other)?],
            batch: false,
        }),
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && !s.chars().any(char::is_control)
}

fn check_method(method: &str) -> Result<(), JsonRpcError> {
    if !valid_name(method) {
        return Err(JsonRpcError::BadMethod);
    }
    let folded = fold_case(method.trim());
    if KNOWN_METHODS
        .iter()
        .any(|known| *known != method && fold_case(known) == folded)
    {
        return Err(JsonRpcError::AmbiguousMethod(method.to_string()));
    }
    Ok(())
}

fn params_of(obj: &Map<String, Value>) -> Result<Option<Map<String, Value>>, JsonRpcError> {
    match obj.get("params") {
        None => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m.clone())),
        Some(_) => Err(JsonRpcError::ParamsNotObject),
    }
}

/// Read one message.
pub fn parse_message(value: &Value) -> Result<Message, JsonRpcError> {
    let obj = value.as_object().ok_or(JsonRpcError::NotAnObject)?;
    if let Some(k) = obj.keys().find(|k| !ALLOWED_MEMBERS.contains(&k.as_str())) {
        return Err(JsonRpcError::UnknownMember(k.clone()));
    }
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(JsonRpcError::BadVersion);
    }
    let id = match obj.get("id") {
        None => None,
        Some(Value::Null) => Some(None),
        Some(v) => Some(Some(Id::from_value(v).ok_or(JsonRpcError::BadId)?)),
    };
    let has = |k: &str| obj.contains_key(k);

    if let Some(method) = obj.get("method") {
        if has("result") {
            return Err(JsonRpcError::ConflictingKinds("`method`", "`result`"));
        }
        if has("error") {
            return Err(JsonRpcError::ConflictingKinds("`method`", "`error`"));
        }
        let method = method.as_str().ok_or(JsonRpcError::BadMethod)?;
        check_method(method)?;
        let params = params_of(obj)?;
        let id = match id {
            None => None,
            Some(None) => return Err(JsonRpcError::BadId),
            Some(Some(id)) => Some(id),
        };
        return match (method, id) {
            (TOOLS_CALL, None) => Err(JsonRpcError::ToolCallWithoutId),
            (TOOLS_CALL, Some(id)) => tool_call(id, params).map(Message::ToolCall),
            (_, Some(id)) => Ok(Message::Request(Request {
                id,
                method: method.to_string(),
                params,
            })),
            (_, None) => Ok(Message::Notification(Notification {
                method: method.to_string(),
                params,
            })),
        };
    }
    if has("params") {
        return Err(JsonRpcError::UnknownMember("params".to_string()));
    }
    match (obj.get("result"), obj.get("error")) {
        (Some(_), Some(_)) => Err(JsonRpcError::ConflictingKinds("`result`", "`error`")),
        (Some(result), None) => {
            let id = match id {
                Some(Some(id)) => id,
                Some(None) => return Err(JsonRpcError::BadId),
                None => return Err(JsonRpcError::ResponseWithoutId),
            };
            let result = result
                .as_object()
                .ok_or(JsonRpcError::ResultNotObject)?
                .clone();
            Ok(Message::Response(Response { id, result }))
        }
        (None, Some(error)) => {
            let id = match id {
                Some(id) => id,
                None => return Err(JsonRpcError::ResponseWithoutId),
            };
            let e = error.as_object().ok_or(JsonRpcError::BadErrorObject)?;
            if e.keys()
                .any(|k| !["code", "message", "data"].contains(&k.as_str()))
            {
                return Err(JsonRpcError::BadErrorObject);
            }
            let code = e
                .get("code")
                .and_then(Value::as_i64)
                .ok_or(JsonRpcError::BadErrorObject)?;
            let message = e
                .get("message")
                .and_then(Value::as_str)
                .ok_or(JsonRpcError::BadErrorObject)?
                .to_string();
            Ok(Message::Error(ErrorResponse {
                id,
                code,
                message,
                data: e.get("data").cloned(),
            }))
        }
        (None, None) => Err(JsonRpcError::NoKind),
    }
}

fn tool_call(id: Id, params: Option<Map<String, Value>>) -> Result<ToolCall, JsonRpcError> {
    let mut params = params.ok_or(JsonRpcError::ToolCallWithoutParams)?;
    let name = match params.get("name") {
        Some(Value::String(s)) if valid_name(s) => s.clone(),
        _ => return Err(JsonRpcError::BadToolName),
    };
    let arguments = match params.remove("arguments") {
        None => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(JsonRpcError::ArgumentsNotObject),
    };
    let progress_token = match params.get("_meta") {
        None => None,
        Some(Value::Object(meta)) => match meta.get("progressToken") {
            None => None,
            Some(t) => Some(Id::from_value(t).ok_or(JsonRpcError::BadProgressToken)?),
        },
        Some(_) => return Err(JsonRpcError::MetaNotObject),
    };
    Ok(ToolCall {
        id,
        name,
        arguments,
        progress_token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mcp::json::{parse, JsonLimits};
    use proptest::prelude::*;
    use serde_json::json;

    fn msg(v: Value) -> Result<Message, JsonRpcError> {
        parse_message(&v)
    }

    fn payload(s: &str) -> Result<Payload, JsonRpcError> {
        parse_payload(&parse(s.as_bytes(), &JsonLimits::default()).unwrap(), 16)
    }

    #[test]
    fn extracts_a_tool_call() {
        let m = msg(json!({"jsonrpc":"2.0","id":7,"method":"tools/call",
            "params":{"name":"transfer","arguments":{"amount":5000,"to":"bob"},
                      "_meta":{"progressToken":"p1"}}}))
        .unwrap();
        assert_eq!(
            m,
            Message::ToolCall(ToolCall {
                id: Id::Int(7),
                name: "transfer".into(),
                arguments: json!({"amount":5000,"to":"bob"})
                    .as_object()
                    .unwrap()
                    .clone(),
                progress_token: Some(Id::Str("p1".into())),
            })
        );
        assert_eq!(m.method(), Some("tools/call"));
        assert_eq!(m.id(), Some(&Id::Int(7)));
    }

    #[test]
    fn tool_call_arguments_default_to_empty_and_tokens_may_be_integers() {
        let Message::ToolCall(t) = msg(json!({"jsonrpc":"2.0","id":"a","method":"tools/call",
            "params":{"name":"x","_meta":{"progressToken":3}}}))
        .unwrap() else {
            panic!("not a tool call")
        };
        assert!(t.arguments.is_empty());
        assert_eq!(t.progress_token, Some(Id::Int(3)));
        assert_eq!(t.id, Id::Str("a".into()));
    }

    #[test]
    fn escaped_method_is_decided_as_tools_call() {
        let p = payload(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools\u002fcall","params":{"name":"rm"}}"#,
        )
        .unwrap();
        assert!(matches!(&p.messages[0], Message::ToolCall(t) if t.name == "rm"));
    }

    #[test]
    fn other_methods_keep_method_and_params() {
        let m = msg(
            json!({"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"file:///x"}}),
        )
        .unwrap();
        assert_eq!(m.method(), Some("resources/read"));
        assert_eq!(m.params().unwrap()["uri"], "file:///x");
        let n = msg(
            json!({"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":1}}),
        )
        .unwrap();
        assert!(matches!(n, Message::Notification(_)));
        assert_eq!(n.id(), None);
        // Unknown methods are fine; policy decides them.
        assert!(msg(json!({"jsonrpc":"2.0","id":1,"method":"x/custom"})).is_ok());
    }

    #[test]
    fn responses_and_errors() {
        assert!(matches!(
            msg(json!({"jsonrpc":"2.0","id":1,"result":{"tools":[]}})).unwrap(),
            Message::Response(Response { id: Id::Int(1), .. })
        ));
        let e = msg(json!({"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"parse"}}))
            .unwrap();
        assert_eq!(
            e,
            Message::Error(ErrorResponse {
                id: None,
                code: -32700,
                message: "parse".into(),
                data: None
            })
        );
    }

    #[test]
    fn hostile_messages_are_rejected() {
        use JsonRpcError as E;
        let cases: Vec<(Value, E)> = vec![
            (json!([1]), E::NotAnObject),
            (json!("x"), E::NotAnObject),
            (json!({"id":1,"method":"ping"}), E::BadVersion),
            (
                json!({"jsonrpc":"2.1","id":1,"method":"ping"}),
                E::BadVersion,
            ),
            (json!({"jsonrpc":2.0,"id":1,"method":"ping"}), E::BadVersion),
            (
                json!({"jsonrpc":"2.0","id":1,"method":"ping","extra":1}),
                E::UnknownMember("extra".into()),
            ),
            (json!({"jsonrpc":"2.0","id":1.5,"method":"ping"}), E::BadId),
            (json!({"jsonrpc":"2.0","id":true,"method":"ping"}), E::BadId),
            (json!({"jsonrpc":"2.0","id":[1],"method":"ping"}), E::BadId),
            (json!({"jsonrpc":"2.0","id":null,"method":"ping"}), E::BadId),
            (json!({"jsonrpc":"2.0","id":1,"method":7}), E::BadMethod),
            (json!({"jsonrpc":"2.0","id":1,"method":""}), E::BadMethod),
            (
                json!({"jsonrpc":"2.0","id":1,"method":"tools/call\u{0}"}),
                E::BadMethod,
            ),
            (
                json!({"jsonrpc":"2.0","id":1,"method":"Tools/Call","params":{"name":"x"}}),
                E::AmbiguousMethod("Tools/Call".into()),
            ),
            (
                json!({"jsonrpc":"2.0","id":1,"method":" tools/call","params":{"name":"x"}}),
                E::AmbiguousMethod(" tools/call".into()),
            ),
            (
                json!({"jsonrpc":"2.0","id":1,"method":"ping","params":[1]}),
                E::ParamsNotObject,
            ),
            (
                json!({"jsonrpc":"2.0","id":1,"method":"ping","params":null}),
                E::ParamsNotObject,
            ),
            (
                json!({"jsonrpc":"2.0","id":1,"method":"ping","result":{}}),
                E::ConflictingKinds("`method`", "`result`"),
            ),
            (
                json!({"jsonrpc":"2.0","id":1,"result":{},"error":{"code":1,"message":"m"}}),
                E::ConflictingKinds("`result`", "`error`"),
            ),
            (json!({"jsonrpc":"2.0","id":1}), E::NoKind),
            (
                json!({"jsonrpc":"2.0","id":1,"params":{}}),
                E::UnknownMember("params".into()),
            ),
            (json!({"jsonrpc":"2.0","result":{}}), E::ResponseWithoutId),
            (json!({"jsonrpc":"2.0","id":null,"result":{}}), E::BadId),
            (
                json!({"jsonrpc":"2.0","id":1,"result":[1]}),
                E::ResultNotObject,
            ),
            (
                json!({"jsonrpc":"2.0","error":{"code":1,"message":"m"}}),
                E::ResponseWithoutId,
            ),
            (
                json!({"jsonrpc":"2.0","id":1,"error":{"code":"1","message":"m"}}),
                E::BadErrorObject,
            ),
            (
                json!({"jsonrpc":"2.0","id":1,"error":{"code":1.5,"message":"m"}}),
                E::BadErrorObject,
            ),
            (
                json!({"jsonrpc":"2.0","id":1,"error":{"code":1}}),
                E::BadErrorObject,
            ),
            (
                json!({"jsonrpc":"2.0","id":1,"error":{"code":1,"message":"m","x":1}}),
                E::BadErrorObject,
            ),
            (
                json!({"jsonrpc":"2.0","method":"tools/call","params":{"name":"x"}}),
                E::ToolCallWithoutId,
            ),
            (
                json!({"jsonrpc":"2.0","id":1,"method":"tools/call"}),
                E::ToolCallWithoutParams,
            ),
            (
                json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{}}),
                E::BadToolName,
            ),
            (
                json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":5}}),
                E::BadToolName,
            ),
            (
                json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":["x"]}}),
                E::BadToolName,
            ),
            (
                json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":""}}),
                E::BadToolName,
            ),
            (
                json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"rm\n"}}),
                E::BadToolName,
            ),
            (
                json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":"{}"}}),
                E::ArgumentsNotObject,
            ),
            (
                json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":null}}),
                E::ArgumentsNotObject,
            ),
            (
                json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":[1]}}),
                E::ArgumentsNotObject,
            ),
            (
                json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","_meta":1}}),
                E::MetaNotObject,
            ),
            (
                json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","_meta":{"progressToken":1.5}}}),
                E::BadProgressToken,
            ),
        ];
        for (v, want) in cases {
            assert_eq!(msg(v.clone()), Err(want), "{v}");
        }
    }

    #[test]
    fn batches() {
        let p = payload(
            r#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a"}},
                {"jsonrpc":"2.0","method":"notifications/initialized"},
                {"jsonrpc":"2.0","id":2,"result":{}}]"#,
        )
        .unwrap();
        assert!(p.batch);
        assert_eq!(p.messages.len(), 3);
        assert_eq!(payload("[]"), Err(JsonRpcError::EmptyBatch));
        let many = format!(
            "[{}]",
            vec![r#"{"jsonrpc":"2.0","method":"ping"}"#; 17].join(",")
        );
        assert_eq!(
            payload(&many),
            Err(JsonRpcError::BatchTooLarge {
                size: 17,
                limit: 16
            })
        );
        assert!(matches!(
            payload(r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},[]]"#),
            Err(JsonRpcError::InBatch { index: 1, .. })
        ));
        assert!(matches!(
            payload(r#"[[{"jsonrpc":"2.0","id":1,"method":"ping"}]]"#),
            Err(JsonRpcError::InBatch { index: 0, .. })
        ));
        assert_eq!(
            payload(
                r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},
                    {"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"rm"}}]"#
            ),
            Err(JsonRpcError::DuplicateId("1".into()))
        );
        // A string id "1" and an integer id 1 are different ids.
        assert!(payload(
            r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":"1","method":"ping"}]"#
        )
        .is_ok());
    }

    #[test]
    fn large_ids() {
        assert_eq!(
            msg(json!({"jsonrpc":"2.0","id":u64::MAX,"method":"ping"}))
                .unwrap()
                .id(),
            Some(&Id::UInt(u64::MAX))
        );
        assert_eq!(Id::UInt(u64::MAX).to_value(), json!(u64::MAX));
        assert_eq!(Id::Int(-3).to_value(), json!(-3));
    }

    proptest! {
        #[test]
        fn random_json_never_panics(s in "[\\[\\]{}\",:0-9a-z/_ ]{0,80}") {
            if let Ok(v) = parse(s.as_bytes(), &JsonLimits::default()) {
                let _ = parse_payload(&v, 8);
            }
        }

        #[test]
        fn any_tool_name_round_trips(name in "[^\\p{Cc}]{1,40}", id in any::<i64>()) {
            let v = json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":name}});
            let Message::ToolCall(t) = parse_message(&v).unwrap() else { panic!() };
            prop_assert_eq!(t.name, name);
            prop_assert_eq!(t.id, Id::Int(id));
        }
    }
}
