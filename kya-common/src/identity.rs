//! Process identity: the facts kya attributes a connection and a tool call to.

use serde::{Deserialize, Serialize};

/// The identity of the process behind a connection or a call.
///
/// Filled from the kernel's record of the connect: pid, uid, gid, comm, the
/// executable (device, inode, path) and the cgroup, all as they were at
/// `connect`. `/proc` is only a fallback for what the kernel did not record.
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
    /// Executable path at connect time, empty when unknown.
    #[serde(default)]
    pub exe: String,
    /// Device (kernel encoding) and inode of the executable at connect
    /// time; 0 when unknown. The file identity, whatever its path.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub exe_dev: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub exe_ino: u64,
    /// Command name (`comm`, at most 15 bytes in the kernel).
    #[serde(default)]
    pub comm: String,
    /// cgroup v2 path relative to the cgroup2 mount, e.g. `/agents/billing`.
    #[serde(default)]
    pub cgroup: String,
    /// The container the cgroup path names, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<crate::ContainerIdentity>,
    /// The network namespace the process connected from (its inode, as
    /// `net:[INODE]` shows it), when not the host's; 0 for the host's.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub netns: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}
