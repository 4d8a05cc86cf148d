//! kya's kernel side: the BPF object, compiled from C by `build.rs` and
//! embedded here so the `kya` binary carries it (no runtime file to lose).
//!
//! Programs (section name → job), all in one object sharing one set of maps:
//! * `cgroup/connect4`, `cgroup/connect6`: redirect a selected task's TCP
//!   connect to a guarded port into the interceptor; refuse its UDP.
//! * `cgroup/sendmsg4`, `cgroup/sendmsg6`: refuse unconnected UDP likewise.
//! * `sockops`: publish the origin under the client 4-tuple on establish.
//! * `cgroup/getpeername4`, `cgroup/getpeername6`: report the original peer.
//! * `raw_tracepoint/sched_process_{exec,fork,exit}`: in-kernel selection of
//!   exe-selected processes and their children, the sticky record of
//!   uid/cgroup-selected ones, the image every process runs; cleanup on exit.
//! * `raw_tracepoint/cgroup_attach_task`: a process moved into a selected
//!   cgroup is recorded (it stays selected when it moves on).
//! * `raw_tracepoint/sys_exit`: an open of a selected script by a process
//!   whose command line names it selects that process (interpreters). It
//!   runs at every system call's exit, so userspace attaches it only when a
//!   selected exe is a script.
//!
//! The map layouts are declared in `src/kya.h` and mirrored in
//! `kya_common::maps`.
//!
//! Design decisions (and why):
//! * **Refused UDP gets `EPERM`** (`bpf_set_retval(-EPERM)` in connect and
//!   sendmsg): the errno a local firewall's OUTPUT drop gives, so it reads as
//!   "policy", not "network"; QUIC/HTTP3 clients fall back to TCP on it,
//!   which is then redirected and inspected. Every non-TCP protocol with
//!   ports (UDP, UDP-Lite, SCTP, MPTCP) is refused the same way; raw and ping
//!   sockets are left alone (their "port" is not a port).
//! * **Exe selection by (device, inode)**, not by path string: symlinks
//!   (`/usr/bin/python3 -> python3.11`), relative exec paths and re-execs via
//!   `/proc/self/exe` all hit the same inode, and no string is copied or
//!   compared in the kernel. The device is the kernel encoding
//!   (`kya_common::maps::kernel_dev`). Known limit: on btrfs subvolumes
//!   `stat` reports a per-subvolume anonymous device that differs from the
//!   superblock's, so an exe on a btrfs subvolume is not matched.
//! * **Sticky selection**: `kya_sel_tgids` holds every process that matched
//!   any selector (cgroup, uid, exe, pid) at fork, exec, connect, a cgroup
//!   move or the start-up scan, and its descendants, until it exits; the
//!   value says which selector holds it (`struct kya_sel`).
//! * **No fentry/kprobes/LSM**: only raw tracepoints, which every supported
//!   kernel has and which need no BPF trampoline (some kernels refuse those).
//! * **Raw tracepoints** for exec/fork/exit: no tracefs mount is needed, and
//!   the task/bprm pointers are read with CO-RE (`preserve_access_index`
//!   structs declared in `process.bpf.c`), relocated by aya against the
//!   running kernel's BTF. Selection is by tgid: a new thread is never
//!   inserted (`child->pid != child->tgid`), and a tgid is forgotten when
//!   its *last* thread exits (`signal->live == 0`).
//! * **Per-socket state in an LRU hash keyed by socket cookie**, not
//!   `sk_storage`: aya 0.13 has no sk_storage map type, and an LRU bounds
//!   the memory of connects that never complete. The record is deleted on
//!   `TCP_CLOSE` (sockops state callback, requested only for redirected
//!   sockets).
//! * **Every network namespace, each to its own listener**: a selected
//!   process's socket in another netns (a container) is redirected to the
//!   kya listener userspace opened inside that namespace, once `kya_netns`
//!   says it is ready; until then its guarded TCP connects are refused
//!   (counted `refused_netns`, reported with `KYA_EV_NETNS_UNSERVED`). The
//!   host netns cookie is in `kya_config`; origins and `kya_conns` keys carry
//!   the namespace's cookie (0 for the host's).
//! * **Loop avoidance**: a socket with `SO_MARK == KYA_SKIP_MARK` is never
//!   redirected (the interceptor marks its upstream sockets), and the
//!   daemon's tgid is in a skip map that wins over every selection.

#![no_std]

/// Aligns the embedded bytes to 8 so the ELF parser can read it in place
/// (the same trick as aya's `include_bytes_aligned!`).
#[repr(C, align(8))]
struct Aligned<B: ?Sized> {
    bytes: B,
}

static ALIGNED: &Aligned<[u8]> = &Aligned {
    bytes: *include_bytes!(concat!(env!("OUT_DIR"), "/kya.bpf.o")),
};

/// The BPF object (ELF, with BTF for CO-RE and BTF-defined maps).
pub static OBJECT: &[u8] = &ALIGNED.bytes;

/// The C header that declares every map key and value (for layout tests).
pub const HEADER: &str = include_str!("kya.h");

/// Program names in [`OBJECT`] (the C function names).
pub mod programs {
    pub const CONNECT4: &str = "kya_connect4";
    pub const CONNECT6: &str = "kya_connect6";
    pub const SENDMSG4: &str = "kya_sendmsg4";
    pub const SENDMSG6: &str = "kya_sendmsg6";
    pub const GETPEERNAME4: &str = "kya_getpeername4";
    pub const GETPEERNAME6: &str = "kya_getpeername6";
    pub const SOCKOPS: &str = "kya_sockops";
    pub const EXEC: &str = "kya_exec";
    pub const FORK: &str = "kya_fork";
    pub const EXIT: &str = "kya_exit";
    pub const CGROUP_ATTACH: &str = "kya_cgroup_attach";
    pub const SYS_EXIT: &str = "kya_sys_exit";
}

/// Map names in [`OBJECT`].
pub mod maps {
    pub const CONFIG: &str = "kya_config";
    pub const PORTS: &str = "kya_ports";
    pub const SEL_CGROUPS: &str = "kya_sel_cgroups";
    pub const SEL_UIDS: &str = "kya_sel_uids";
    pub const SEL_TGIDS: &str = "kya_sel_tgids";
    pub const SKIP_TGIDS: &str = "kya_skip_tgids";
    pub const EXES: &str = "kya_exes";
    pub const SOCKETS: &str = "kya_sockets";
    pub const CONNS: &str = "kya_conns";
    pub const COUNTERS: &str = "kya_counters";
    pub const EVENTS: &str = "kya_events";
    pub const TGID_EXES: &str = "kya_tgid_exes";
    pub const EXE_PATHS: &str = "kya_exe_paths";
    pub const SCRIPT_NAMES: &str = "kya_script_names";
    pub const NETNS: &str = "kya_netns";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_is_an_aligned_bpf_elf() {
        assert_eq!(&OBJECT[..4], b"\x7fELF");
        assert_eq!(OBJECT.as_ptr() as usize % 8, 0);
        // e_machine at offset 18 (little endian): EM_BPF = 247
        assert_eq!(u16::from_le_bytes([OBJECT[18], OBJECT[19]]), 247);
    }

    #[test]
    fn every_named_program_and_map_is_in_the_object() {
        let names = [
            programs::CONNECT4,
            programs::CONNECT6,
            programs::SENDMSG4,
            programs::SENDMSG6,
            programs::GETPEERNAME4,
            programs::GETPEERNAME6,
            programs::SOCKOPS,
            programs::EXEC,
            programs::FORK,
            programs::EXIT,
            programs::CGROUP_ATTACH,
            programs::SYS_EXIT,
            maps::TGID_EXES,
            maps::EXE_PATHS,
            maps::SCRIPT_NAMES,
            maps::NETNS,
            maps::CONFIG,
            maps::PORTS,
            maps::SEL_CGROUPS,
            maps::SEL_UIDS,
            maps::SEL_TGIDS,
            maps::SKIP_TGIDS,
            maps::EXES,
            maps::SOCKETS,
            maps::CONNS,
            maps::COUNTERS,
            maps::EVENTS,
        ];
        for name in names {
            let needle = name.as_bytes();
            let found = OBJECT
                .windows(needle.len() + 1)
                .any(|w| &w[..needle.len()] == needle && w[needle.len()] == 0);
            assert!(found, "{name} missing from the BPF object's string table");
        }
    }
}
