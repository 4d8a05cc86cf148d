//! The interceptor's view of the kernel's records: who made an accepted
//! connection and where it was going.

use super::{host, sys, BpfError};
use kya_common::maps::{kernel_dev, ConnKey, ExeKey, ExePath, OriginRecord};
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
    /// The executable at connect time (device, inode), if the kernel knew it.
    pub exe: Option<ExeKey>,
    /// Its path as the kernel recorded it at exec, if it still has it.
    pub exe_path: Option<String>,
    /// The network namespace (cookie) the connect came from; 0 = the host's.
    pub netns_cookie: u64,
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
            exe: r.exe(),
            exe_path: None,
            netns_cookie: r.netns_cookie,
        })
    }

    /// The process identity, from the kernel's record of the connect: the
    /// cgroup path is that of the recorded cgroup id (empty if the cgroup
    /// was removed since: where the process is now is not where it
    /// connected from), the executable is the recorded one.
    pub fn identity(&self) -> ProcessIdentity {
        let cgroup = host::cgroup_path_of_id(self.cgroup_id)
            .ok()
            .flatten()
            .unwrap_or_default();
        let (exe_dev, exe_ino) = self.exe.map(|k| (k.dev, k.ino)).unwrap_or_default();
        let container = kya_common::container_of_cgroup(&cgroup).map(crate::kube::names::enrich);
        ProcessIdentity {
            pid: self.pid,
            uid: self.uid,
            gid: self.gid,
            exe: self.exe_name(),
            exe_dev,
            exe_ino,
            comm: self.comm.clone(),
            cgroup,
            container,
            netns: 0, // the inode: set by the listener that accepted it
        }
    }

    /// The executable's path. The kernel's when it is absolute. Otherwise
    /// (exec by a relative path, the path table lost it, or the process ran
    /// before kya and the scan missed it) `/proc/PID/exe`, but only when it
    /// is provably the recorded file (same device and inode), or when the
    /// kernel recorded no file at all.
    fn exe_name(&self) -> String {
        if let Some(p) = self.exe_path.as_deref().filter(|p| p.starts_with('/')) {
            return p.to_string();
        }
        let proc_exe = format!("/proc/{}/exe", self.pid);
        let same_file = match self.exe {
            None => true, // the kernel gave nothing: /proc is all there is
            Some(k) => std::fs::metadata(&proc_exe)
                .map(|md| {
                    use std::os::unix::fs::MetadataExt;
                    kernel_dev(md.dev()) == k.dev && md.ino() == k.ino
                })
                .unwrap_or(false),
        };
        if same_file {
            if let Some(p) = crate::procinfo::exe_of(self.pid) {
                return p.to_string_lossy().into_owned();
            }
        }
        self.exe_path.clone().unwrap_or_default()
    }
}

/// Handle on the kernel's table of established redirected connections.
/// Cheap to clone (one shared fd), usable from any thread.
#[derive(Debug, Clone)]
pub struct OriginTable {
    conns: Arc<OwnedFd>,
    exe_paths: Arc<OwnedFd>,
}

impl OriginTable {
    pub(super) fn new(conns: OwnedFd, exe_paths: OwnedFd) -> OriginTable {
        OriginTable {
            conns: Arc::new(conns),
            exe_paths: Arc::new(exe_paths),
        }
    }

    /// Takes (looks up and deletes, atomically) the origin of the connection
    /// with these peer and local addresses accepted by the listener of
    /// network namespace `netns` (0: the host's). `Ok(None)`: not a
    /// connection kya redirected (or already taken): the interceptor should
    /// refuse it, since it cannot attribute it.
    pub fn take(
        &self,
        peer: SocketAddr,
        local: SocketAddr,
        netns: u64,
    ) -> Result<Option<Origin>, BpfError> {
        let Some(key) = ConnKey::from_accepted(peer, local, netns) else {
            return Ok(None);
        };
        let rec: Option<OriginRecord> = sys::map_lookup_and_delete(self.conns.as_fd(), &key)
            .map_err(|source| BpfError::Syscall {
                call: "BPF_MAP_LOOKUP_AND_DELETE_ELEM",
                source,
            })?;
        let Some(mut origin) = rec.as_ref().and_then(Origin::from_record) else {
            return Ok(None);
        };
        if let Some(key) = origin.exe {
            // best effort: an entry aged out of the table leaves the path to
            // the /proc check in `identity`
            let path: Option<ExePath> =
                sys::map_lookup(self.exe_paths.as_fd(), &key).ok().flatten();
            origin.exe_path = path.and_then(|p| p.path());
        }
        Ok(Some(origin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn me(exe: Option<ExeKey>, exe_path: Option<&str>) -> Origin {
        Origin {
            dst: "127.0.0.1:1".parse().unwrap(),
            pid: std::process::id(),
            tid: 0,
            uid: 0,
            gid: 0,
            comm: String::new(),
            cgroup_id: 0,
            exe,
            exe_path: exe_path.map(str::to_string),
            netns_cookie: 0,
        }
    }

    #[test]
    fn the_kernel_exe_wins_and_proc_is_only_a_checked_fallback() {
        let proc_exe = crate::procinfo::exe_of(std::process::id())
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let md = std::fs::metadata(&proc_exe).unwrap();
        let mine = ExeKey {
            dev: kernel_dev(md.dev()),
            ino: md.ino(),
        };
        let other = ExeKey { dev: 1, ino: 2 };
        // the kernel's absolute path, even if /proc says otherwise now
        assert_eq!(
            me(Some(other), Some("/usr/bin/agent")).exe_name(),
            "/usr/bin/agent"
        );
        // a relative kernel path: /proc only if it is the same file
        assert_eq!(me(Some(mine), Some("./agent")).exe_name(), proc_exe);
        assert_eq!(me(Some(other), Some("./agent")).exe_name(), "./agent");
        // the process exec'd since and the kernel lost the path: nothing
        assert_eq!(me(Some(other), None).exe_name(), "");
        // the kernel knew nothing: /proc is all there is
        assert_eq!(me(None, None).exe_name(), proc_exe);
        let id = me(Some(mine), Some("/x")).identity();
        assert_eq!((id.exe_dev, id.exe_ino), (mine.dev, mine.ino));
        assert_eq!(id.cgroup, "", "cgroup id 0 resolves to no cgroup");
    }
}
