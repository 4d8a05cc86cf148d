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
//!   exe-selected processes and their children; cleanup on exit.
//!
//! The map layouts are declared in `src/kya.h` and mirrored in
//! `kya_common::maps`.

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
