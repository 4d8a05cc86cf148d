//! The whole pipeline in one call per body: decode → strict parse → JSON-RPC model
//! → header agreement → canonical bytes. The interceptor gets one typed answer: the
//! messages (each with what policy needs) and the exact bytes to forward, or a
//! [`Refusal`] naming why the body must be denied. There is deliberately no way to
//! get the messages without the forward bytes or vice versa: what is forwarded is
//! what was judged.
//!
//! The forward bytes are *decoded* canonical JSON (or a re-encoded event stream): the
//! caller forwards them without `Content-Encoding` and with their own length. To
//! keep streamed responses decodable chunk by chunk, the caller should drop
//! `Accept-Encoding` from requests so upstreams answer uncompressed; a compressed
//! stream is decoded whole by [`inspect_response`] or refused by [`ResponseStream`].

use http::header::CONTENT_TYPE;
use http::{HeaderMap, Uri};
use serde_json::Value;

use super::encoding::{self, EncodingError};
use super::headers::{self, HeaderError, McpHeaders};
use super::json::{self, JsonError, JsonLimits};
use super::jsonrpc::{self, JsonRpcError, Message, Payload, ToolCall};
use super::sse::{self, EndpointError, SseError, SseEvent, SseItem, SseLimits, SseParser};

/// Every bound the pipeline applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest body in bytes, both as received and after decoding (`intercept.max_body`).
    pub max_body: usize,
    /// Deepest JSON nesting.
    pub max_depth: usize,
    /// Most messages in one batch.
    pub max_batch: usize,
    /// Largest single SSE event in bytes.
    pub max_event: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body: 4 * 1024 * 1024,
            max_depth: 64,
            max_batch: 64,
            max_event: 4 * 1024 * 1024,
        }
    }
}

impl Limits {
    fn json(&self) -> JsonLimits {
        JsonLimits {
            max_bytes: self.max_body,
            max_depth: self.max_depth,
        }
    }
}

/// Why a body is denied without being judged further. `Display` is the reason
/// given to the agent and the audit log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("body of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("cannot decode body: {0}")]
    Encoding(#[from] EncodingError),
    #[error("not canonical JSON: {0}")]
    Json(#[from] JsonError),
    #[error("not a valid JSON-RPC message: {0}")]
    JsonRpc(#[from] JsonRpcError),
    #[error("MCP headers: {0}")]
    Headers(#[from] HeaderError),
    #[error("event stream: {0}")]
    Sse(#[from] SseError),
    #[error("legacy SSE endpoint: {0}")]
    Endpoint(#[from] EndpointError),
    #[error("unsupported response content type {0:?}")]
    ContentType(String),
    #[error("an `endpoint` event outside a legacy SSE stream")]
    UnexpectedEndpoint,
}

/// A request body, judged-ready.
#[derive(Debug, Clone, PartialEq)]
pub struct InspectedRequest {
    pub messages: Vec<Message>,
    /// The body was a JSON array: answers must be an array too.
    pub batch: bool,
    /// Session, protocol version, and the (body-agreeing) method/name headers.
    pub headers: McpHeaders,
    /// What to forward: the canonical serialisation of what was parsed.
    pub forward: Vec<u8>,
}

impl InspectedRequest {
    /// The `tools/call` requests, which the policy decides.
    pub fn tool_calls(&self) -> impl Iterator<Item = &ToolCall> {
        self.messages.iter().filter_map(|m| match m {
            Message::ToolCall(t) => Some(t),
            _ => None,
        })
    }
}

/// One JSON body: strict parse, model, canonical bytes.
fn inspect_json(bytes: &[u8], limits: &Limits) -> Result<(Payload, Vec<u8>), Refusal> {
    let value: Value = json::parse(bytes, &limits.json())?;
    let payload = jsonrpc::parse_payload(&value, limits.max_batch)?;
    Ok((payload, json::to_canonical_bytes(&value)))
}

fn decode(body: &[u8], h: &HeaderMap, limits: &Limits) -> Result<Vec<u8>, Refusal> {
    if body.len() > limits.max_body {
        return Err(Refusal::TooLarge {
            size: body.len(),
            limit: limits.max_body,
        });
    }
    Ok(encoding::decode_body(h, body, limits.max_body)?)
}

/// Inspect a client→server POST body (Streamable HTTP or the legacy message URL).
/// The content type is not trusted either way: MCP is recognised by content.
pub fn inspect_request(
    body: &[u8],
    h: &HeaderMap,
    limits: &Limits,
) -> Result<InspectedRequest, Refusal> {
    let mcp_headers = headers::read_mcp_headers(h)?;
    let decoded = decode(body, h, limits)?;
    let (payload, forward) = inspect_json(&decoded, limits)?;
    headers::check_agreement(&mcp_headers, &payload.messages)?;
    Ok(InspectedRequest {
        messages: payload.messages,
        batch: payload.batch,
        headers: mcp_headers,
        forward,
    })
}

/// What an SSE event carried, once inspected.
#[derive(Debug, Clone, PartialEq)]
pub enum EventContent {
    /// JSON-RPC message(s) (a `message` event).
    Messages(Payload),
    /// The legacy transport's `endpoint` event, resolved and same-origin.
    Endpoint(Uri),
    /// No data (an id/retry-only block, or a priming event's empty `data`) or a
    /// comment: nothing to judge.
    Nothing,
    /// An event of another type: no MCP client acts on it and kya does not judge it,
    /// so it is not forwarded.
    Dropped,
}

/// One inspected SSE item.
#[derive(Debug, Clone, PartialEq)]
pub struct InspectedEvent {
    pub content: EventContent,
    /// The bytes to forward for this item (empty when dropped): the event re-encoded,
    /// with its data replaced by the canonical JSON that was judged.
    pub forward: Vec<u8>,
}

impl InspectedEvent {
    pub fn messages(&self) -> &[Message] {
        match &self.content {
            EventContent::Messages(p) => &p.messages,
            _ => &[],
        }
    }
}

/// Inspect one SSE item. `legacy_sse_url` is the URL of a legacy HTTP+SSE stream,
/// where an `endpoint` event is expected; elsewhere such an event is refused.
pub fn inspect_event(
    item: &SseItem,
    legacy_sse_url: Option<&Uri>,
    limits: &Limits,
) -> Result<InspectedEvent, Refusal> {
    let event = match item {
        SseItem::Comment(_) => {
            return Ok(InspectedEvent {
                content: EventContent::Nothing,
                forward: sse::encode(item)?,
            })
        }
        SseItem::Event(e) => e,
    };
    // No data, or the empty `data:` of a priming event (an id for resumption that
    // servers send first, SEP-1699): clients skip it, so there is nothing to judge.
    let Some(data) = event.data.as_ref().filter(|d| !d.is_empty()) else {
        return Ok(InspectedEvent {
            content: EventContent::Nothing,
            forward: sse::encode(item)?,
        });
    };
    match event.event_type() {
        "message" => {
            let (payload, canonical) = inspect_json(data.as_bytes(), limits)?;
            // Canonical JSON is ASCII-escaped for control characters, so it has no
            // line breaks and fits one `data:` line.
            let text = String::from_utf8(canonical).map_err(|_| SseError::InvalidUtf8)?;
            let forwarded = SseItem::Event(SseEvent {
                data: Some(text),
                ..event.clone()
            });
            Ok(InspectedEvent {
                content: EventContent::Messages(payload),
                forward: sse::encode(&forwarded)?,
            })
        }
        "endpoint" => {
            let base = legacy_sse_url.ok_or(Refusal::UnexpectedEndpoint)?;
            let uri = sse::resolve_endpoint(base, data)?;
            Ok(InspectedEvent {
                content: EventContent::Endpoint(uri),
                forward: sse::encode(item)?,
            })
        }
        _ => Ok(InspectedEvent {
            content: EventContent::Dropped,
            forward: Vec::new(),
        }),
    }
}

/// The media type of a `Content-Type` (parameters dropped, lower case).
fn media_type(h: &HeaderMap) -> Result<Option<String>, Refusal> {
    let mut values = h.get_all(CONTENT_TYPE).iter();
    let Some(v) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(Refusal::ContentType("several Content-Type headers".into()));
    }
    let s = v
        .to_str()
        .map_err(|_| Refusal::ContentType("non-ASCII".into()))?;
    Ok(Some(
        s.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase(),
    ))
}

/// A response body, judged-ready.
#[derive(Debug, Clone, PartialEq)]
pub enum InspectedResponse {
    /// An `application/json` body.
    Json { payload: Payload, forward: Vec<u8> },
    /// A complete `text/event-stream` body.
    EventStream { events: Vec<InspectedEvent> },
    /// An empty body (e.g. `202 Accepted` for a notification).
    Empty,
}

impl InspectedResponse {
    /// Every message, in order (server→client requests included).
    pub fn messages(&self) -> Vec<&Message> {
        match self {
            InspectedResponse::Json { payload, .. } => payload.messages.iter().collect(),
            InspectedResponse::EventStream { events } => {
                events.iter().flat_map(|e| e.messages()).collect()
            }
            InspectedResponse::Empty => Vec::new(),
        }
    }

    /// The bytes to forward.
    pub fn forward(&self) -> Vec<u8> {
        match self {
            InspectedResponse::Json { forward, .. } => forward.clone(),
            InspectedResponse::EventStream { events } => events
                .iter()
                .flat_map(|e| e.forward.iter().copied())
                .collect(),
            InspectedResponse::Empty => Vec::new(),
        }
    }
}

/// Inspect a complete server→client body: `application/json` or `text/event-stream`
/// (Streamable HTTP; pass `legacy_sse_url` for a legacy HTTP+SSE stream).
pub fn inspect_response(
    body: &[u8],
    h: &HeaderMap,
    legacy_sse_url: Option<&Uri>,
    limits: &Limits,
) -> Result<InspectedResponse, Refusal> {
    let decoded = decode(body, h, limits)?;
    if decoded.is_empty() {
        return Ok(InspectedResponse::Empty);
    }
    match media_type(h)?.as_deref() {
        Some("application/json") => {
            let (payload, forward) = inspect_json(&decoded, limits)?;
            Ok(InspectedResponse::Json { payload, forward })
        }
        Some("text/event-stream") => {
            let items = sse::parse_all(
                &decoded,
                SseLimits {
                    max_event_bytes: limits.max_event,
                },
            )?;
            let events = items
                .iter()
                .map(|i| inspect_event(i, legacy_sse_url, limits))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(InspectedResponse::EventStream { events })
        }
        other => Err(Refusal::ContentType(other.unwrap_or("none").to_string())),
    }
}

/// A streamed `text/event-stream` response (a POST answer, the GET stream, or the
/// legacy `/sse` stream), inspected event by event as chunks arrive.
#[derive(Debug)]
pub struct ResponseStream {
    parser: SseParser,
    legacy_sse_url: Option<Uri>,
    limits: Limits,
}

impl ResponseStream {
    /// Refuses a compressed stream (see the module docs).
    pub fn new(
        h: &HeaderMap,
        legacy_sse_url: Option<Uri>,
        limits: Limits,
    ) -> Result<Self, Refusal> {
        if !encoding::codings(h)?.is_empty() {
            return Err(Refusal::Encoding(EncodingError::Unsupported(
                "compressed event stream".into(),
            )));
        }
        Ok(Self {
            parser: SseParser::new(SseLimits {
                max_event_bytes: limits.max_event,
            }),
            legacy_sse_url,
            limits,
        })
    }

    /// Feed a chunk; returns the events it completed, inspected.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<InspectedEvent>, Refusal> {
        self.parser
            .push(chunk)?
            .iter()
            .map(|i| inspect_event(i, self.legacy_sse_url.as_ref(), &self.limits))
            .collect()
    }

    /// End of stream; an event cut off mid-way is reported.
    pub fn finish(self) -> Result<(), Refusal> {
        Ok(self.parser.finish()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mcp::jsonrpc::Id;
    use http::HeaderValue;
    use proptest::prelude::*;
    use std::io::Write;

    fn h(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, HeaderValue::from_str(v).unwrap());
        }
        m
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    const CALL: &str = r#"{"jsonrpc": "2.0", "id": 5, "method": "tools/call",
        "params": {"name": "transfer", "arguments": {"to": "bob", "amount": 5000}}}"#;

    #[test]
    fn a_tool_call_request() {
        let r = inspect_request(
            CALL.as_bytes(),
            &h(&[
                ("mcp-session-id", "s-1"),
                ("mcp-protocol-version", "2025-06-18"),
                ("mcp-method", "tools/call"),
                ("mcp-name", "transfer"),
            ]),
            &Limits::default(),
        )
        .unwrap();
        assert!(!r.batch);
        let calls: Vec<_> = r.tool_calls().collect();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].name, "transfer");
        assert_eq!(calls[0].arguments["amount"], 5000);
        assert_eq!(r.headers.session_id.as_deref(), Some("s-1"));
        assert_eq!(
            String::from_utf8(r.forward).unwrap(),
            r#"{"id":5,"jsonrpc":"2.0","method":"tools/call","params":{"arguments":{"amount":5000,"to":"bob"},"name":"transfer"}}"#
        );
    }

    #[test]
    fn a_gzip_request_is_decoded_and_forwarded_plain() {
        let r = inspect_request(
            &gzip(CALL.as_bytes()),
            &h(&[("content-encoding", "gzip")]),
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(r.tool_calls().next().unwrap().name, "transfer");
        assert!(r.forward.starts_with(b"{\"id\":5"));
    }

    #[test]
    fn hostile_requests_are_refused() {
        let l = Limits::default();
        let none = HeaderMap::new();
        let cases: Vec<(&[u8], HeaderMap)> = vec![
            (br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","name":"b"}}"#, none.clone()),
            (br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","Name":"b"}}"#, none.clone()),
            (br#"[]"#, none.clone()),
            (br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a"}} x"#, none.clone()),
            (b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\",\"params\":{\"a\":\"\xff\"}}", none.clone()),
            (br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":{"n":1e400}}}"#, none.clone()),
            (CALL.as_bytes(), h(&[("mcp-name", "search")])),
            (CALL.as_bytes(), h(&[("mcp-method", "tools/list")])),
            (CALL.as_bytes(), h(&[("content-encoding", "zstd")])),
            (CALL.as_bytes(), h(&[("content-encoding", "gzip")])),
        ];
        for (body, headers) in cases {
            assert!(
                inspect_request(body, &headers, &l).is_err(),
                "{} {headers:?}",
                String::from_utf8_lossy(body)
            );
        }
        let small = Limits { max_body: 16, ..l };
        assert!(matches!(
            inspect_request(CALL.as_bytes(), &none, &small),
            Err(Refusal::TooLarge { .. })
        ));
        // A tiny gzip body that inflates past the limit.
        let bomb = gzip(&vec![b' '; 1 << 20]);
        assert!(matches!(
            inspect_request(
                &bomb,
                &h(&[("content-encoding", "gzip")]),
                &Limits {
                    max_body: 64 * 1024,
                    ..l
                }
            ),
            Err(Refusal::Encoding(EncodingError::TooLarge { .. }))
        ));
    }

    #[test]
    fn batch_with_a_hidden_call_is_fully_visible() {
        let body = br#"[{"jsonrpc":"2.0","id":1,"method":"tools/list"},
                        {"jsonrpc":"2.0","id":2,"method":"tools\u002fcall","params":{"name":"delete_db"}}]"#;
        let r = inspect_request(body, &HeaderMap::new(), &Limits::default()).unwrap();
        assert!(r.batch);
        assert_eq!(
            r.tool_calls().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            vec!["delete_db"]
        );
        assert!(!r.forward.windows(6).any(|w| w == b"\\u002f"));
    }

    #[test]
    fn json_responses() {
        let body = br#"{"id":1,"jsonrpc":"2.0","result":{"tools":[{"name":"a"}]}}"#;
        let r = inspect_response(
            body,
            &h(&[("content-type", "application/json; charset=utf-8")]),
            None,
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(r.messages().len(), 1);
        assert_eq!(r.forward(), body.to_vec());
        assert_eq!(
            inspect_response(b"", &HeaderMap::new(), None, &Limits::default()).unwrap(),
            InspectedResponse::Empty
        );
        assert!(matches!(
            inspect_response(
                body,
                &h(&[("content-type", "text/html")]),
                None,
                &Limits::default()
            ),
            Err(Refusal::ContentType(_))
        ));
        assert!(matches!(
            inspect_response(body, &HeaderMap::new(), None, &Limits::default()),
            Err(Refusal::ContentType(_))
        ));
        assert!(matches!(
            inspect_response(
                body,
                &h(&[
                    ("content-type", "application/json"),
                    ("content-type", "text/event-stream")
                ]),
                None,
                &Limits::default()
            ),
            Err(Refusal::ContentType(_))
        ));
    }

    #[test]
    fn sse_responses_expose_server_to_client_requests() {
        let body = b": ping\n\nevent: message\nid: 1\ndata: {\"jsonrpc\":\"2.0\",\"id\":9,\n\
                     data: \"method\":\"sampling/createMessage\",\"params\":{\"messages\":[]}}\n\n\
                     data: {\"jsonrpc\":\"2.0\",\"id\":5,\"result\":{\"content\":[],\"isError\":false}}\n\n\
                     event: weird\ndata: not json\n\n";
        let r = inspect_response(
            body,
            &h(&[("content-type", "text/event-stream")]),
            None,
            &Limits::default(),
        )
        .unwrap();
        let methods: Vec<_> = r.messages().iter().map(|m| m.method()).collect();
        assert_eq!(methods, vec![Some("sampling/createMessage"), None]);
        let fwd = String::from_utf8(r.forward()).unwrap();
        assert!(fwd.starts_with(": ping\n"), "{fwd}");
        assert!(fwd.contains(
            "event: message\nid: 1\ndata: {\"id\":9,\"jsonrpc\":\"2.0\",\"method\":\"sampling/createMessage\",\"params\":{\"messages\":[]}}\n\n"
        ), "{fwd}");
        assert!(!fwd.contains("weird"), "unjudged events are not forwarded");
        // Forwarded bytes are themselves a valid stream with the same messages.
        let again = inspect_response(
            fwd.as_bytes(),
            &h(&[("content-type", "text/event-stream")]),
            None,
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(again.messages(), r.messages());
    }

    #[test]
    fn priming_events_pass_unjudged() {
        let body = b"id: 0\ndata:\n\nretry: 1000\n\ndata: {\"id\":1,\"jsonrpc\":\"2.0\",\"result\":{}}\n\n";
        let r = inspect_response(
            body,
            &h(&[("content-type", "text/event-stream")]),
            None,
            &Limits::default(),
        )
        .unwrap();
        let InspectedResponse::EventStream { events } = &r else {
            panic!()
        };
        assert_eq!(events[0].content, EventContent::Nothing);
        assert_eq!(events[0].forward, b"id: 0\ndata: \n\n");
        assert_eq!(events[1].content, EventContent::Nothing);
        assert_eq!(r.messages().len(), 1);
        // Whitespace is not empty: it is data no client can read as JSON.
        assert!(inspect_response(
            b"data:  \n\n",
            &h(&[("content-type", "text/event-stream")]),
            None,
            &Limits::default()
        )
        .is_err());
    }

    #[test]
    fn hostile_sse_responses() {
        let ct = h(&[("content-type", "text/event-stream")]);
        let l = Limits::default();
        for body in [
            &b"data: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{},\"result\":{}}\n\n"[..],
            b"data: not json\n\n",
            b"data: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\n",
            b"event: endpoint\ndata: /messages?s=1\n\n",
            b"data: \xff\n\n",
        ] {
            assert!(
                inspect_response(body, &ct, None, &l).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let small = Limits { max_event: 32, ..l };
        assert!(matches!(
            inspect_response(
                b"data: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"a\":1}}\n\n",
                &ct,
                None,
                &small
            ),
            Err(Refusal::Sse(SseError::EventTooLarge { .. }))
        ));
    }

    #[test]
    fn legacy_stream_endpoint_and_messages() {
        let url: Uri = "http://127.0.0.1:8000/sse".parse().unwrap();
        let mut s =
            ResponseStream::new(&HeaderMap::new(), Some(url.clone()), Limits::default()).unwrap();
        let mut events = s
            .push(b"event: endpoint\ndata: /messages/?session_id=ab")
            .unwrap();
        events.extend(s.push(b"c\n\nevent: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":\"x\",\"method\":\"elicitation/create\",\"params\":{}}\r\n\r\n").unwrap());
        assert_eq!(events.len(), 2);
        assert_eq!(
            events[0].content,
            EventContent::Endpoint(
                "http://127.0.0.1:8000/messages/?session_id=abc"
                    .parse()
                    .unwrap()
            )
        );
        assert_eq!(events[1].messages()[0].id(), Some(&Id::Str("x".into())));
        s.finish().unwrap();

        let mut s = ResponseStream::new(&HeaderMap::new(), Some(url), Limits::default()).unwrap();
        assert!(matches!(
            s.push(b"event: endpoint\ndata: http://127.0.0.2:8000/messages\n\n"),
            Err(Refusal::Endpoint(EndpointError::CrossOrigin { .. }))
        ));
        assert!(
            ResponseStream::new(&h(&[("content-encoding", "gzip")]), None, Limits::default())
                .is_err()
        );
    }

    proptest! {
        #[test]
        fn random_bodies_never_panic(body in prop::collection::vec(any::<u8>(), 0..300)) {
            let l = Limits::default();
            let _ = inspect_request(&body, &HeaderMap::new(), &l);
            let _ = inspect_response(&body, &h(&[("content-type", "text/event-stream")]), None, &l);
            let _ = inspect_response(&body, &h(&[("content-type", "application/json")]), None, &l);
        }

        #[test]
        fn forwarded_request_reinspects_identically(name in "[a-z_]{1,12}", amount in any::<i64>(), id in any::<i64>()) {
            let body = format!(
                r#"{{ "params": {{"arguments": {{"amount": {amount}}}, "name": "{name}"}}, "method": "tools/call", "id": {id}, "jsonrpc": "2.0" }}"#
            );
            let l = Limits::default();
            let first = inspect_request(body.as_bytes(), &HeaderMap::new(), &l).unwrap();
            let second = inspect_request(&first.forward, &HeaderMap::new(), &l).unwrap();
            prop_assert_eq!(&first.messages, &second.messages);
            prop_assert_eq!(&first.forward, &second.forward);
        }
    }
}
