//! Who made an intercepted connection, and where it was going.
//!
//! The interceptor only sees a peer address (the agent's socket) and its own
//! local address; the redirect's kernel record, keyed by that 4-tuple, holds
//! the original destination and the process. [`OriginSource`] is the seam: the
//! daemon plugs the BPF map lookup in; tests plug a table in.

use crate::netns::Namespace;
use kya_common::ProcessIdentity;
use std::net::SocketAddr;
use std::sync::Arc;

/// The original destination and the identity of the process behind a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnOrigin {
    /// Where the agent meant to connect.
    pub dst: SocketAddr,
    /// The process (tgid) as recorded in the kernel at connect time, completed from `/proc`.
    pub process: ProcessIdentity,
    /// The thread that called `connect`.
    pub tid: u32,
    /// Kernel cgroup id at connect time.
    pub cgroup_id: u64,
    /// The network namespace the agent connected from, when not the host's:
    /// kya's connection to the destination is made from there too.
    pub netns: Option<Arc<Namespace>>,
}

/// Errors resolving a connection's origin.
#[derive(Debug, thiserror::Error)]
#[error("origin lookup failed: {0}")]
pub struct OriginError(pub String);

/// Resolves an accepted connection to its origin.
pub trait OriginSource: Send + Sync + 'static {
    /// Look up (and forget) the record of the connection `peer → local`
    /// accepted in network namespace `netns` (its cookie; 0 = the host's).
    /// `Ok(None)`: the connection was not redirected by kya (someone connected to
    /// the listener directly); the interceptor refuses it.
    fn take(
        &self,
        peer: SocketAddr,
        local: SocketAddr,
        netns: u64,
    ) -> Result<Option<ConnOrigin>, OriginError>;
}
