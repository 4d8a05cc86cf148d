//! Process identity: the facts kya attributes a connection and a tool call to.

use serde::{Deserialize, Serialize};

/// The identity of the process behind a connection or a call.
///
/// Filled from the kernel record (pid, tgid, uid, gid, comm, cgroup id) and
/// completed from `/proc` (exe, cgroup path) when the connection is accepted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessIdentity {
    /// Process id (the thread group id, which is what users call "pid").
    #[serde(default)]
    pub pid: u32,
    /// Unix user id.
    #[serde(default)]
    pub uid: u32,
    /// Unix group id.
    #[serde(default)]
    pub gid: u32,
    /// Executable path (`/proc/PID/exe`), empty when unknown.
    #[serde(default)]
    pub exe: String,
    /// Command name (`comm`, at most 15 bytes in the kernel).
    #[serde(default)]
    pub comm: String,
    /// cgroup v2 path relative to the cgroup2 mount, e.g. `/agents/billing`.
    #[serde(default)]
    pub cgroup: String,
}
