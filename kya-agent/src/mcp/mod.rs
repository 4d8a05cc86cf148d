//! MCP parsing: the pure library the interceptor calls to read, judge and answer
//! Model Context Protocol traffic. Nothing here does I/O.

pub mod json;
pub mod jsonrpc;
pub mod sse;
