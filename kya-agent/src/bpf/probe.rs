//! What the running kernel offers kya's BPF programs, probed at start-up the
//! way `bpftool feature probe` does it: load a two-instruction program of
//! each type kya uses, one calling each helper kya's programs call, and
//! create one map of each type. Every feature listed here carries one of
//! kya's guarantees, so a missing one is a refusal to start that names the
//! feature and the kernel, never a quietly weaker redirect.
//!
//! No program variant depends on the kernel from 6.1 on: the socket-ops
//! program never asks for the current task (it runs in softirq, where that
//! task is a stranger), and the connect hooks take the process identity in
//! the calling process's own context.

use super::sys::{self, AttachType};
use super::BpfError;
use serde::Serialize;
use std::os::fd::AsFd;

const PROG_SOCK_OPS: u32 = 13;
const PROG_RAW_TRACEPOINT: u32 = 17;
const PROG_CGROUP_SOCK_ADDR: u32 = 18;

const MAP_HASH: u32 = 1;
const MAP_ARRAY: u32 = 2;
const MAP_PERCPU_ARRAY: u32 = 6;
const MAP_LRU_HASH: u32 = 9;
const MAP_RINGBUF: u32 = 27;

/// Where the kernel publishes its own BTF (needed for CO-RE relocations).
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// A program context kya's programs run in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctx {
    /// `cgroup/connect4` (and the other sock_addr hooks).
    SockAddr(AttachType),
    SockOps,
    RawTracepoint,
}

impl Ctx {
    fn prog_type(self) -> (u32, u32) {
        match self {
            Ctx::SockAddr(a) => (PROG_CGROUP_SOCK_ADDR, a as u32),
            Ctx::SockOps => (PROG_SOCK_OPS, 0),
            Ctx::RawTracepoint => (PROG_RAW_TRACEPOINT, 0),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Btf,
    Program(Ctx),
    Map {
        ty: u32,
        key: u32,
        value: u32,
        max: u32,
    },
    Helper {
        ctx: Ctx,
        id: i32,
    },
    CgroupLink,
}

/// One thing kya needs from the kernel.
#[derive(Debug, Clone, Copy)]
struct Need {
    /// Short name, shown by `kya status` and in the refusal.
    name: &'static str,
    /// The guarantee that depends on it.
    needed_for: &'static str,
    kind: Kind,
}

const CONNECT4: Ctx = Ctx::SockAddr(AttachType::Connect4);

const NEEDS: &[Need] = &[
    Need {
        name: "kernel BTF (/sys/kernel/btf/vmlinux)",
        needed_for: "reading exec/fork/exit task data portably (selection that follows processes)",
        kind: Kind::Btf,
    },
    Need {
        name: "program type cgroup/connect4,6",
        needed_for: "redirecting a selected process's connects",
        kind: Kind::Program(CONNECT4),
    },
    Need {
        name: "program type cgroup/sendmsg4,6",
        needed_for: "refusing a selected process's unconnected UDP",
        kind: Kind::Program(Ctx::SockAddr(AttachType::Sendmsg4)),
    },
    Need {
        name: "program type cgroup/getpeername4,6",
        needed_for: "showing a redirected process its original peer",
        kind: Kind::Program(Ctx::SockAddr(AttachType::Getpeername4)),
    },
    Need {
        name: "program type sockops",
        needed_for: "attributing each redirected connection to its process",
        kind: Kind::Program(Ctx::SockOps),
    },
    Need {
        name: "program type raw_tracepoint",
        needed_for: "selection that follows exec and fork",
        kind: Kind::Program(Ctx::RawTracepoint),
    },
    Need {
        name: "BPF links on cgroups (BPF_LINK_CREATE)",
        needed_for: "pinned attachments that keep failing closed when the daemon dies",
        kind: Kind::CgroupLink,
    },
    Need {
        name: "map type hash",
        needed_for: "the selection maps",
        kind: Kind::Map {
            ty: MAP_HASH,
            key: 4,
            value: 1,
            max: 1,
        },
    },
    Need {
        name: "map type array",
        needed_for: "the configuration map",
        kind: Kind::Map {
            ty: MAP_ARRAY,
            key: 4,
            value: 8,
            max: 1,
        },
    },
    Need {
        name: "map type lru_hash",
        needed_for: "per-connection origin records",
        kind: Kind::Map {
            ty: MAP_LRU_HASH,
            key: 8,
            value: 8,
            max: 16,
        },
    },
    Need {
        name: "map type percpu_array",
        needed_for: "the kernel side's counters",
        kind: Kind::Map {
            ty: MAP_PERCPU_ARRAY,
            key: 4,
            value: 8,
            max: 1,
        },
    },
    Need {
        name: "map type ringbuf",
        needed_for: "reporting kernel-side failures (never silent)",
        kind: Kind::Map {
            ty: MAP_RINGBUF,
            key: 0,
            value: 0,
            max: 4096,
        },
    },
    Need {
        name: "bpf_get_current_pid_tgid in cgroup/connect",
        needed_for: "selection by pid and the connect-time process identity",
        kind: Kind::Helper {
            ctx: CONNECT4,
            id: 14,
        },
    },
    Need {
        name: "bpf_get_current_uid_gid in cgroup/connect",
        needed_for: "selection by uid and the connect-time identity",
        kind: Kind::Helper {
            ctx: CONNECT4,
            id: 15,
        },
    },
    Need {
        name: "bpf_get_current_comm in cgroup/connect",
        needed_for: "the connect-time process name",
        kind: Kind::Helper {
            ctx: CONNECT4,
            id: 16,
        },
    },
    Need {
        name: "bpf_get_current_cgroup_id in cgroup/connect",
        needed_for: "selection by cgroup",
        kind: Kind::Helper {
            ctx: CONNECT4,
            id: 80,
        },
    },
    Need {
        name: "bpf_get_current_ancestor_cgroup_id in cgroup/connect",
        needed_for: "selection of a cgroup's descendants",
        kind: Kind::Helper {
            ctx: CONNECT4,
            id: 123,
        },
    },
    Need {
        name: "bpf_get_socket_cookie in cgroup/connect",
        needed_for: "the per-socket origin record",
        kind: Kind::Helper {
            ctx: CONNECT4,
            id: 46,
        },
    },
    Need {
        name: "bpf_get_netns_cookie in cgroup/connect",
        needed_for: "redirecting each network namespace to its own listener",
        kind: Kind::Helper {
            ctx: CONNECT4,
            id: 122,
        },
    },
    Need {
        name: "bpf_set_retval in cgroup/connect",
        needed_for: "refusing UDP with EPERM and a connect kya cannot record (fail closed)",
        kind: Kind::Helper {
            ctx: CONNECT4,
            id: 187,
        },
    },
    Need {
        name: "bpf_ringbuf_reserve in cgroup/connect",
        needed_for: "reporting a failed map update from the connect hooks",
        kind: Kind::Helper {
            ctx: CONNECT4,
            id: 131,
        },
    },
    Need {
        name: "bpf_get_socket_cookie in sockops",
        needed_for: "finding the origin of an established connection",
        kind: Kind::Helper {
            ctx: Ctx::SockOps,
            id: 46,
        },
    },
    Need {
        name: "bpf_sock_ops_cb_flags_set in sockops",
        needed_for: "forgetting a connection's record when it closes",
        kind: Kind::Helper {
            ctx: Ctx::SockOps,
            id: 59,
        },
    },
    Need {
        name: "bpf_ringbuf_reserve in sockops",
        needed_for: "reporting a failed map update from sockops",
        kind: Kind::Helper {
            ctx: Ctx::SockOps,
            id: 131,
        },
    },
    Need {
        name: "bpf_get_current_pid_tgid in raw_tracepoint",
        needed_for: "selection that follows exec and fork",
        kind: Kind::Helper {
            ctx: Ctx::RawTracepoint,
            id: 14,
        },
    },
    Need {
        name: "bpf_get_current_task in raw_tracepoint",
        needed_for: "the executable and its path recorded at exec (identity at connect)",
        kind: Kind::Helper {
            ctx: Ctx::RawTracepoint,
            id: 35,
        },
    },
    Need {
        name: "bpf_probe_read_user in raw_tracepoint",
        needed_for: "matching a selected script on the command line of the process that opens it",
        kind: Kind::Helper {
            ctx: Ctx::RawTracepoint,
            id: 112,
        },
    },
    Need {
        name: "bpf_probe_read_kernel_str in raw_tracepoint",
        needed_for: "the path an executable was exec'd by",
        kind: Kind::Helper {
            ctx: Ctx::RawTracepoint,
            id: 115,
        },
    },
    Need {
        name: "bpf_get_current_uid_gid in raw_tracepoint",
        needed_for: "selection by uid that sticks at fork and exec",
        kind: Kind::Helper {
            ctx: Ctx::RawTracepoint,
            id: 15,
        },
    },
    Need {
        name: "bpf_get_current_cgroup_id in raw_tracepoint",
        needed_for: "selection by cgroup that sticks at fork and exec",
        kind: Kind::Helper {
            ctx: Ctx::RawTracepoint,
            id: 80,
        },
    },
    Need {
        name: "bpf_get_current_ancestor_cgroup_id in raw_tracepoint",
        needed_for: "selection of a cgroup's descendants that sticks at fork and exec",
        kind: Kind::Helper {
            ctx: Ctx::RawTracepoint,
            id: 123,
        },
    },
    Need {
        name: "bpf_probe_read_kernel in raw_tracepoint",
        needed_for: "reading the exec'd file and the forked task",
        kind: Kind::Helper {
            ctx: Ctx::RawTracepoint,
            id: 113,
        },
    },
];

/// The running kernel and the features kya found and uses on it.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct KernelSupport {
    /// `uname -r`.
    pub release: String,
    /// Every feature kya's programs use, all present (else kya refused).
    pub features: Vec<&'static str>,
}

/// Probes every feature kya needs; the first missing one is an error that
/// names it, what depends on it, and the kernel.
pub(super) fn probe() -> Result<KernelSupport, BpfError> {
    let release = kernel_release();
    let mut features = Vec::with_capacity(NEEDS.len());
    for need in NEEDS {
        match check(need.kind) {
            Ok(()) => features.push(need.name),
            Err(detail) => {
                return Err(BpfError::KernelLacks {
                    kernel: release,
                    feature: need.name,
                    needed_for: need.needed_for,
                    detail,
                })
            }
        }
    }
    tracing::debug!(kernel = %release, features = features.len(), "kernel features probed");
    Ok(KernelSupport { release, features })
}

/// `uname -r`, or "unknown".
pub fn kernel_release() -> String {
    // SAFETY: utsname is plain data; uname fills it or fails.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return "unknown".into();
    }
    let bytes: Vec<u8> = u
        .release
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// One eBPF instruction, encoded as the kernel reads it (little endian).
const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    (code as u64)
        | (((dst & 0xf) | ((src & 0xf) << 4)) as u64) << 8
        | ((off as u16) as u64) << 16
        | ((imm as u32) as u64) << 32
}

const MOV_R0_1: u64 = insn(0xb7, 0, 0, 0, 1);
const EXIT: u64 = insn(0x95, 0, 0, 0, 0);

fn call(id: i32) -> u64 {
    insn(0x85, 0, 0, 0, id)
}

/// Ok, or what the kernel said.
fn check(kind: Kind) -> Result<(), String> {
    match kind {
        Kind::Btf => std::fs::metadata(VMLINUX_BTF)
            .map(|_| ())
            .map_err(|e| format!("{VMLINUX_BTF}: {e} (the kernel needs CONFIG_DEBUG_INFO_BTF=y)")),
        Kind::Program(ctx) => {
            let (ty, attach) = ctx.prog_type();
            sys::prog_load(ty, attach, &[MOV_R0_1, EXIT])
                .map(drop)
                .map_err(|(e, log)| format!("{e}{}", log_tail(&log)))
        }
        Kind::Map {
            ty,
            key,
            value,
            max,
        } => sys::map_create(ty, key, value, max)
            .map(drop)
            .map_err(|e| e.to_string()),
        Kind::Helper { ctx, id } => {
            let (ty, attach) = ctx.prog_type();
            match sys::prog_load(ty, attach, &[call(id), MOV_R0_1, EXIT]) {
                Ok(_) => Ok(()),
                // Arguments are not set up, so most helpers fail to verify
                // for that reason: only a refusal of the helper itself counts.
                Err((e, log)) if helper_refused(&log) => Err(format!("{e}{}", log_tail(&log))),
                Err(_) => Ok(()),
            }
        }
        Kind::CgroupLink => {
            let (ty, attach) = CONNECT4.prog_type();
            let prog = sys::prog_load(ty, attach, &[MOV_R0_1, EXIT])
                .map_err(|(e, log)| format!("{e}{}", log_tail(&log)))?;
            // fd -1: a kernel with the command rejects the cgroup fd (EBADF);
            // one without it rejects the command (EINVAL).
            match sys::link_create_raw(prog.as_fd(), -1, AttachType::Connect4) {
                Ok(_) => Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Err(e.to_string()),
                Err(_) => Ok(()),
            }
        }
    }
}

/// The verifier's words for "this helper does not exist here" (unknown id)
/// and "not for this program type" (libbpf's probe reads the same three).
fn helper_refused(log: &str) -> bool {
    log.contains("invalid func ")
        || log.contains("unknown func ")
        || log.contains("program of this type cannot use helper ")
}

/// The last line of a verifier log, as `: line`, or nothing.
fn log_tail(log: &str) -> String {
    log.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| format!(": {}", l.chars().take(200).collect::<String>()))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_encode_as_the_kernel_reads_them() {
        // r0 = 1; exit; call 14: as clang emits them.
        assert_eq!(MOV_R0_1.to_le_bytes(), [0xb7, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(EXIT.to_le_bytes(), [0x95, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(call(14).to_le_bytes(), [0x85, 0, 0, 0, 14, 0, 0, 0]);
        assert_eq!(
            insn(0xbf, 1, 10, -8, 0).to_le_bytes(),
            [0xbf, 0xa1, 0xf8, 0xff, 0, 0, 0, 0]
        );
    }

    #[test]
    fn helper_refusals_are_told_from_argument_errors() {
        // What 6.1 and 6.12 said about the socket-ops program.
        assert!(helper_refused(
            "0: R1=ctx(off=0,imm=0) R10=fp0\nunknown func bpf_get_current_pid_tgid#14\n"
        ));
        assert!(helper_refused(
            "program of this type cannot use helper bpf_get_current_comm#16\n"
        ));
        assert!(helper_refused("invalid func unknown#212\n"));
        // An argument error means the helper exists.
        assert!(!helper_refused(
            "0: (85) call bpf_get_current_comm#16\nR1 !read_ok\n"
        ));
        assert!(!helper_refused(""));
        assert!(!helper_refused("\u{0}\u{fffd} garbage \n\n"));
    }

    #[test]
    fn log_tail_is_bounded_and_skips_blank_lines() {
        assert_eq!(log_tail(""), "");
        assert_eq!(log_tail("a\nlast\n\n  \n"), ": last");
        assert_eq!(log_tail(&"x".repeat(10_000)).len(), 202);
    }

    #[test]
    fn every_need_has_a_distinct_name_and_a_reason() {
        let mut names: Vec<_> = NEEDS.iter().map(|n| n.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), NEEDS.len());
        assert!(NEEDS.iter().all(|n| !n.needed_for.is_empty()));
    }

    #[test]
    fn the_kernel_release_is_uname_r() {
        let r = kernel_release();
        assert!(!r.is_empty() && r != "unknown", "{r}");
    }

    #[test]
    fn a_missing_feature_names_itself_and_the_kernel() {
        let e = BpfError::KernelLacks {
            kernel: "5.15.0-91-generic".into(),
            feature: "bpf_set_retval in cgroup/connect",
            needed_for: "refusing UDP",
            detail: "Invalid argument: invalid func unknown#187".into(),
        };
        let text = e.to_string();
        assert!(text.contains("5.15.0-91-generic"), "{text}");
        assert!(text.contains("bpf_set_retval"), "{text}");
        assert!(text.contains("refusing UDP"), "{text}");
    }

    #[test]
    fn this_kernel_has_everything_kya_needs() {
        if !kya_testkit::root_or_skip(
            "this_kernel_has_everything_kya_needs",
            "probing BPF needs root",
        ) {
            return;
        }
        let s = probe().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.features.len(), NEEDS.len());
        assert_eq!(s.release, kernel_release());
        // The probe can say no: a helper id no kernel has, and a program
        // type that does not exist.
        let bogus = check(Kind::Helper {
            ctx: CONNECT4,
            id: 100_000,
        });
        assert!(bogus.is_err(), "{bogus:?}");
        let no_type = sys::prog_load(100_000, 0, &[MOV_R0_1, EXIT]);
        assert!(no_type.is_err());
    }
}
