//! The interceptor's view of the kernel's records: who made an accepted
//! connection and where it was going.

use super::{host, sys, BpfError};
use kya_common::maps::{ConnKey, OriginRecord};
use kya_common::ProcessIdentity;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

/// Where a redirected connection was going and which process made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The destination the agent connected to (before the redirect).
    pub dst: SocketAddr,
    /// tgid
    pub pid: u32,
    /// The thread that called connect.
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    /// `comm` at connect time (chosen by the process; not an identity).
    pub comm: String,
    /// cgroup v2 id at connect time.
    pub cgroup_id: u64,
}

impl Origin {
    /// From a kernel record; `None` when the record is not well-formed.
    pub fn from_record(r: &OriginRecord) -> Option<Origin> {
        Some(Origin {
            dst: r.dst()?,
            pid: r.pid,
            tid: r.tid,
            uid: r.uid,
            gid: r.gid,
            comm: r.comm(),
            cgroup_id: r.cgroup_id,
        })
    }

    /// The process identity: the kernel's facts, the cgroup path from the
    /// recorded cgroup id (valid after the process exited or moved), and the
    /// exe from `/proc/PID/exe` while the process exists (empty after; best
    /// effort: a pid recycled between connect and this call would give the
    /// wrong exe, which is why policy should prefer cgroup/uid facts).
    pub fn identity(&self) -> ProcessIdentity {
        let cgroup = host::cgroup_path_of_id(self.cgroup_id)
            .ok()
            .flatten()
            .or_else(|| host::cgroup_path_of_pid(self.pid).ok())
            .unwrap_or_default();
        ProcessIdentity {
            pid: self.pid,
            uid: self.uid,
            gid: self.gid,
            exe: crate::procinfo::exe_of(self.pid)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
            comm: self.comm.clone(),
            cgroup,
        }
    }
}

/// Handle on the kernel's table of established redirected connections.
/// Cheap to clone (one shared fd), usable from any thread.
#[derive(Debug, Clone)]
pub struct OriginTable {
    conns: Arc<OwnedFd>,
}

impl OriginTable {
    pub(super) fn new(conns: OwnedFd) -> OriginTable {
        OriginTable {
            conns: Arc::new(conns),
        }
    }

    /// Takes (looks up and deletes, atomically) the origin of the accepted
    /// connection whose peer and local addresses are given. `Ok(None)`: not
    /// a connection kya redirected (or already taken): the interceptor
    /// should refuse it, since it cannot attribute it.
    pub fn take(&self, peer: SocketAddr, local: SocketAddr) -> Result<Option<Origin>, BpfError> {
        let Some(key) = ConnKey::from_accepted(peer, local) else {
            return Ok(None);
        };
        let rec: Option<OriginRecord> = sys::map_lookup_and_delete(self.conns.as_fd(), &key)
            .map_err(|source| BpfError::Syscall {
                call: "BPF_MAP_LOOKUP_AND_DELETE_ELEM",
                source,
            })?;
        Ok(rec.as_ref().and_then(Origin::from_record))
    }
}
