//! The loader: puts kya's BPF object (`kya_ebpf::OBJECT`) into the kernel,
//! fills its selection maps, attaches it to the cgroup v2 root and hands the
//! interceptor the origin of every redirected connection.
//!
//! * [`Redirector`]: one instance's loaded object, links and maps.
//! * [`OriginTable`]: `take(peer, local)` → [`Origin`] for an accepted socket.
//! * [`mark_socket`]: the interceptor marks its upstream sockets so they are
//!   never redirected (loop avoidance).
//! * [`cgroup2_mount`], [`cgroup_path_of_pid`], [`cgroup_path_of_id`]: host facts.
//!
//! Fail closed: links are pinned under the instance's pin directory, so if
//! the daemon dies they keep redirecting selected processes to the dead
//! listen port (connections refused) until a restart replaces them or an
//! operator removes the pins. `fail_open` pins nothing.

mod host;
mod mark;
mod origins;
mod probe;
mod redirector;
mod selection;
mod stats;
mod sys;

pub use host::{cgroup2_mount, cgroup_path_of_id, cgroup_path_of_pid, BPFFS_MOUNT};
pub use kya_common::maps::KYA_SKIP_MARK;
pub use mark::{mark_socket, socket_mark};
pub use origins::{Origin, OriginTable};
pub use probe::{kernel_release, KernelSupport};
pub use redirector::{RedirectConfig, Redirector};
pub use stats::KernelStats;

use std::path::PathBuf;

/// Why the redirect could not be set up or queried.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no cgroup2 filesystem is mounted (see /proc/self/mountinfo)")]
    NoCgroup2,
    #[error("/proc/{pid}/cgroup has no cgroup v2 (0::) line")]
    NoCgroupV2Line { pid: u32 },
    #[error("cgroup path {0:?} must be a path under the cgroup2 mount, without '..'")]
    BadCgroupPath(String),
    #[error("selected cgroup {path:?} not found: {source}")]
    CgroupNotFound {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("exe {0:?} must be an absolute path or glob")]
    BadExe(String),
    #[error("exe glob {pattern:?}: {source}")]
    Glob {
        pattern: String,
        #[source]
        source: globset::Error,
    },
    #[error(
        "listen port {0} must be between 1 and 1023 (no unprivileged process may take it over)"
    )]
    BadListenPort(u16),
    #[error("guarded port 0 is not a port")]
    BadPort,
    #[error("no guarded ports: nothing would be redirected")]
    NoPorts,
    #[error("too many {what}: {got} (at most {max})")]
    TooMany {
        what: &'static str,
        got: usize,
        max: u32,
    },
    #[error("pin directory {0:?} must be a dedicated directory on a bpffs (not the bpffs root)")]
    BadPinDir(PathBuf),
    #[error("loading the BPF object: {0}")]
    Load(#[from] Box<aya::EbpfError>),
    #[error(
        "kernel {kernel} lacks {feature}, which kya needs for {needed_for} ({detail}); \
         kya does not run with a weaker guarantee (README: Supported kernels)"
    )]
    KernelLacks {
        kernel: String,
        feature: &'static str,
        needed_for: &'static str,
        detail: String,
    },
    #[error("kernel {kernel} refused BPF program {name}: {source}")]
    Refused {
        kernel: String,
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("BPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("BPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("the BPF object has no {0}")]
    Missing(&'static str),
    #[error("{call}: {source}")]
    Syscall {
        call: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the event reader needs a tokio runtime")]
    NoRuntime,
    #[error("the event reader is already running")]
    ReaderRunning,
}

impl BpfError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> BpfError {
        BpfError::Io {
            context: context.into(),
            source,
        }
    }
}
