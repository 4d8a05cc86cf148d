//! TLS building blocks of the interceptor: classify and read the agent's
//! ClientHello, decide passthrough, connect upstream with verification, and
//! terminate the agent's TLS with a minted leaf speaking the upstream's ALPN.

pub mod client_hello;
pub mod leaf_cache;
pub mod passthrough;
pub mod terminate;
pub mod upstream;
