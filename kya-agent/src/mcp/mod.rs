//! MCP parsing: the pure library the interceptor calls to read, judge and answer
//! Model Context Protocol traffic. Nothing here does I/O.
//!
//! One job per module: [`json`] (strict canonical JSON), [`jsonrpc`] (the message
//! model), [`sse`] (event streams and the legacy endpoint), [`headers`] (MCP headers,
//! Host/SNI), [`encoding`] (Content-Encoding), [`deny`] (the answers kya gives),
//! [`tools_list`] (hiding tools), and [`inspect`], the one entry point per body that
//! runs them in order and returns what policy needs plus the bytes to forward.

pub mod deny;
pub mod encoding;
pub mod headers;
pub mod inspect;
pub mod json;
pub mod jsonrpc;
pub mod sse;
pub mod tools_list;

pub use inspect::{
    inspect_event, inspect_request, inspect_response, EventContent, InspectedEvent,
    InspectedRequest, InspectedResponse, Limits, Refusal, ResponseStream,
};
pub use jsonrpc::{Id, Message, ToolCall};
