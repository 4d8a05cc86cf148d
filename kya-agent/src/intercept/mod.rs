//! The interceptor: accepts the connections the eBPF redirect sends it,
//! attributes each to the process that made it, and carries it to the original
//! destination.
//!
//! * [`origin`]: the seam to the kernel side (who connected, to where).
//! * [`listener`]: the accept loops on 127.0.0.1 and ::1.
//! * [`upstream`]: connecting to the original destination without being redirected again.
//! * [`splice`]: copying bytes both ways, unchanged.
//! * [`http`]: the HTTP/MCP proxy for inspected connections.
//! * [`dispatch`]: the path a connection takes after its first bytes.
//! * [`tunnel`]: a followed `CONNECT` tunnel, dispatched as a connection of its own.

pub mod dispatch;
pub mod http;
pub(crate) mod kernel_origin;
pub(crate) mod listener;
pub mod names;
pub mod origin;
pub(crate) mod splice;
pub(crate) mod tunnel;
pub(crate) mod upstream;

pub use listener::{InterceptStats, Interceptor, InterceptorConfig};
pub use origin::{ConnOrigin, OriginSource};
