//! MCP parsing: the pure library the interceptor calls to read, judge and answer
//! Model Context Protocol traffic. Nothing here does I/O.
//!
//! One job per module: [`json`] (strict canonical JSON), [`jsonrpc`] (the message
//! model), [`sse`] (event streams and the legacy endpoint), [`headers`] (MCP headers,
//! Host/SNI), [`encoding`] (Content-Encoding) and [`deny`] (the answers kya gives).
//! The proxy (`intercept::http`: `inspect` for requests, `filter` and `stream` for
//! what servers send) runs them in order; it is the only pipeline.

pub(crate) mod deny;
pub mod encoding;
pub(crate) mod headers;
pub mod json;
pub mod jsonrpc;
pub mod sse;

pub use jsonrpc::{Id, Message, ToolCall};
