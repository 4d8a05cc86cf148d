//! [`OriginSource`] backed by the eBPF redirect's connection table.

use super::origin::{ConnOrigin, OriginError, OriginSource};
use crate::bpf::OriginTable;
use std::net::SocketAddr;

/// The kernel's record of redirected connections.
pub(crate) struct KernelOrigins {
    table: OriginTable,
}

impl KernelOrigins {
    pub(crate) fn new(table: OriginTable) -> Self {
        Self { table }
    }
}

impl OriginSource for KernelOrigins {
    fn take(
        &self,
        peer: SocketAddr,
        local: SocketAddr,
        netns: u64,
    ) -> Result<Option<ConnOrigin>, OriginError> {
        let origin = self
            .table
            .take(peer, local, netns)
            .map_err(|e| OriginError(e.to_string()))?;
        Ok(origin.map(|o| ConnOrigin {
            dst: o.dst,
            process: o.identity(),
            tid: o.tid,
            cgroup_id: o.cgroup_id,
            netns: None, // set by the listener, which knows the namespace
        }))
    }
}
