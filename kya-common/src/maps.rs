//! `#[repr(C)]` mirrors of the BPF map keys and values declared in
//! `kya-ebpf/src/kya.h`.
//!
//! The C header is the source of truth. The tests at the bottom parse its
//! `_Static_assert` lines (sizes and offsets) and its `#define`s, and compare
//! them with `size_of` / `offset_of!` and the constants here, so a change on
//! one side that is not made on the other fails the build's tests instead of
//! corrupting map data silently.
//!
//! With the `aya` feature these types implement `aya::Pod`, so the loader can
//! use them as typed map keys and values.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// `SO_MARK` that kya's interceptor puts on its upstream sockets: the kernel
/// side never redirects a socket carrying it (loop avoidance; an exact
/// match). Its bits stay clear of the masks other software tests marks
/// with, so no firewall rule of theirs takes kya's connections for its own:
/// kube-proxy (0x4000 masquerade, 0x8000 drop), Podman's netavark (0x2000
/// masquerade), Cilium (0x0f00, 0xffff0000), Calico (0xffff0000), Weave and
/// Tailscale (0xff0000), and the 0x1 of ad-hoc policy routing.
pub const KYA_SKIP_MARK: u32 = 0x0000_106a;
/// Length of the kernel's `comm` (including the NUL).
pub const KYA_COMM_LEN: usize = 16;
/// Bytes of an executable's path kept by the kernel side (with the NUL).
pub const KYA_PATH_LEN: usize = 256;
/// Deepest cgroup level whose ancestors are checked against the selection.
pub const KYA_MAX_CGROUP_DEPTH: u32 = 32;

/// Map capacities (bounded everything); userspace refuses larger selections.
pub const KYA_MAX_PORTS: u32 = 256;
pub const KYA_MAX_SEL_CGROUPS: u32 = 1024;
pub const KYA_MAX_SEL_UIDS: u32 = 1024;
pub const KYA_MAX_SEL_TGIDS: u32 = 65536;
pub const KYA_MAX_SKIP_TGIDS: u32 = 64;
pub const KYA_MAX_EXES: u32 = 4096;
pub const KYA_MAX_SOCKETS: u32 = 65536;
pub const KYA_MAX_TGID_EXES: u32 = 65536;
pub const KYA_MAX_EXE_PATHS: u32 = 8192;
pub const KYA_MAX_SCRIPT_NAMES: u32 = 8192;
pub const KYA_MAX_NETNS: u32 = 1024;

/// `kya_netns.state`: the namespace has a ready kya listener.
pub const KYA_NETNS_READY: u32 = 1;

/// Value of `kya_netns` (key: a netns cookie): a network namespace other
/// than the host's that kya serves with a listener of its own.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetnsEntry {
    /// `KYA_NETNS_*`.
    pub state: u32,
    pub _reserved: u32,
}

/// Why a tgid is selected ([`SelEntry::reason`]).
pub const KYA_SEL_PID: u8 = 1;
pub const KYA_SEL_EXEC: u8 = 2;
pub const KYA_SEL_FORK: u8 = 3;
pub const KYA_SEL_SCAN: u8 = 4;
pub const KYA_SEL_CGROUP: u8 = 5;
pub const KYA_SEL_UID: u8 = 6;
pub const KYA_SEL_SCRIPT: u8 = 7;

/// Which kind of selector holds a selected tgid ([`SelEntry::kind`]).
pub const KYA_KIND_PID: u8 = 1;
pub const KYA_KIND_CGROUP: u8 = 2;
pub const KYA_KIND_UID: u8 = 3;
pub const KYA_KIND_EXE: u8 = 4;
/// Flag in a `kya_exes` value: the file is a script (see `kya.h`).
pub const KYA_EXE_SCRIPT: u32 = 0x8000_0000;

/// Value of `kya_sel_tgids`: why the process is selected and which selector
/// (kind, index in the operator's list of that kind) holds it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SelEntry {
    pub reason: u8,
    pub kind: u8,
    pub _pad: u16,
    pub index: u32,
}

/// Value of `kya_exe_paths`: the path an executable was last exec'd by.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExePath {
    pub path: [u8; KYA_PATH_LEN],
}

impl Default for ExePath {
    fn default() -> Self {
        ExePath {
            path: [0; KYA_PATH_LEN],
        }
    }
}

impl ExePath {
    /// From a path (truncated to fit, always NUL-terminated).
    pub fn from_path(p: &std::path::Path) -> ExePath {
        let mut out = ExePath::default();
        let b = p.as_os_str().as_encoded_bytes();
        let n = b.len().min(KYA_PATH_LEN - 1);
        out.path[..n].copy_from_slice(&b[..n]);
        out
    }

    /// The path up to its NUL (lossily decoded); `None` when empty.
    pub fn path(&self) -> Option<String> {
        let end = self
            .path
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(KYA_PATH_LEN);
        (end > 0).then(|| String::from_utf8_lossy(&self.path[..end]).into_owned())
    }
}

/// FNV-1a (64 bits) of a file name, as the kernel side hashes the last path
/// component of each command-line argument (`kya_script_names` keys).
pub fn name_hash(name: &[u8]) -> u64 {
    name.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Address families as the maps store them (not `AF_*`).
pub const KYA_FAMILY_INET: u8 = 4;
pub const KYA_FAMILY_INET6: u8 = 6;

/// Ring buffer event kinds.
pub const KYA_EV_MAP_UPDATE_FAILED: u32 = 1;
pub const KYA_EV_EXE_SELECTED: u32 = 2;
pub const KYA_EV_REFUSED_DGRAM: u32 = 3;
/// A selected process's connect in a netns kya does not serve (yet) was
/// refused: `arg0` = netns cookie, `arg1` = destination port.
pub const KYA_EV_NETNS_UNSERVED: u32 = 4;
/// A task moved into a selected cgroup was selected: `arg0` = its tgid.
pub const KYA_EV_SELECTED_CGROUP: u32 = 5;

/// Map ids reported by [`KYA_EV_MAP_UPDATE_FAILED`].
pub const KYA_MAP_SOCKETS: u64 = 1;
pub const KYA_MAP_CONNS: u64 = 2;
pub const KYA_MAP_SEL_TGIDS: u64 = 3;

/// `kya_config.flags`: redirect every TCP connection of a selected task,
/// whatever its port (`kya_ports` then only names where datagrams are refused).
pub const KYA_CFG_ALL_TCP_PORTS: u32 = 0x1;

/// `kya_config[0]`: per-instance settings.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KyaConfig {
    /// Interceptor port on 127.0.0.1 / ::1 (host order); 0 disables redirection.
    pub listen_port: u32,
    /// Sockets with this `SO_MARK` are never redirected.
    pub skip_mark: u32,
    /// `KYA_CFG_*` bits.
    pub flags: u32,
    pub _reserved: u32,
    /// The host netns (`SO_NETNS_COOKIE`); sockets elsewhere are not
    /// redirected. 0 disables the check.
    pub netns_cookie: u64,
}

/// Key of `kya_exes`: an executable by (device, inode). `dev` is the
/// kernel's encoding (`major << 20 | minor`), see [`kernel_dev`].
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExeKey {
    pub dev: u64,
    pub ino: u64,
}

/// Converts a userspace `st_dev` (glibc's `makedev` encoding) into the
/// kernel-internal `dev_t` (`MKDEV(major, minor)`) that `super_block.s_dev`
/// holds, which is what the exec tracepoint reads.
pub fn kernel_dev(st_dev: u64) -> u64 {
    let major = ((st_dev >> 32) & 0xffff_f000) | ((st_dev >> 8) & 0x0000_0fff);
    let minor = ((st_dev >> 12) & 0xffff_ff00) | (st_dev & 0x0000_00ff);
    (major << 20) | (minor & 0xf_ffff)
}

/// The origin of a redirected connection (values of `kya_sockets` and
/// `kya_conns`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OriginRecord {
    pub cgroup_id: u64,
    /// tgid
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Network order; IPv4 in the first 4 bytes.
    pub dst_addr: [u8; 16],
    /// Host order.
    pub dst_port: u16,
    pub dst_family: u8,
    pub _pad0: u8,
    pub comm: [u8; KYA_COMM_LEN],
    pub _pad1: u32,
    /// The image the process ran at connect (kernel dev encoding); 0/0 when
    /// the kernel did not know it.
    pub exe_dev: u64,
    pub exe_ino: u64,
    /// The connecting socket's netns cookie; 0 for the host's.
    pub netns_cookie: u64,
}

impl OriginRecord {
    /// The destination the agent asked for; `None` for an unknown family
    /// (a record that did not come from kya's programs).
    pub fn dst(&self) -> Option<SocketAddr> {
        let ip = addr_from(self.dst_family, &self.dst_addr)?;
        Some(SocketAddr::new(ip, self.dst_port))
    }

    /// `comm` up to its NUL, lossily decoded (a process chooses its comm).
    pub fn comm(&self) -> String {
        comm_str(&self.comm)
    }

    /// The executable at connect time, if the kernel knew it.
    pub fn exe(&self) -> Option<ExeKey> {
        (self.exe_ino != 0).then_some(ExeKey {
            dev: self.exe_dev,
            ino: self.exe_ino,
        })
    }
}

/// Key of `kya_conns`: the redirected connection as the interceptor sees the
/// accepted socket (src = its peer, dst = its local address) in the network
/// namespace whose listener accepted it (cookie; 0 = the host's). IPv4-mapped
/// IPv6 addresses are keyed as IPv4.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub family: u8,
    pub _pad: [u8; 3],
    pub netns_cookie: u64,
}

impl ConnKey {
    /// The key for a socket with this peer and local address accepted by the
    /// listener of network namespace `netns` (0: the host's). A v4-mapped
    /// address is normalised to IPv4 (as the kernel side does); `None` when
    /// peer and local disagree on the family.
    pub fn from_accepted(peer: SocketAddr, local: SocketAddr, netns: u64) -> Option<ConnKey> {
        let (src, dst) = (peer.ip().to_canonical(), local.ip().to_canonical());
        let mut key = ConnKey {
            src_port: peer.port(),
            dst_port: local.port(),
            netns_cookie: netns,
            ..ConnKey::default()
        };
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                key.family = KYA_FAMILY_INET;
                key.src_addr[..4].copy_from_slice(&s.octets());
                key.dst_addr[..4].copy_from_slice(&d.octets());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                key.family = KYA_FAMILY_INET6;
                key.src_addr = s.octets();
                key.dst_addr = d.octets();
            }
            _ => return None,
        }
        Some(key)
    }
}

/// Indexes of the per-CPU counter array `kya_counters`.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    Redirected4 = 0,
    Redirected6 = 1,
    RedirectedV4Mapped = 2,
    RefusedDgram = 3,
    SkippedMark = 4,
    SkippedTgid = 5,
    SelectedExec = 6,
    SelectedFork = 7,
    TgidExited = 8,
    MapFull = 9,
    Established = 10,
    Getpeername = 11,
    EventsLost = 12,
    RefusedNetns = 13,
    SelectedSticky = 14,
    SelectedScript = 15,
}

/// Number of slots of `kya_counters` (room to grow without a layout change).
pub const KYA_CNT_MAX: u32 = 16;

impl Counter {
    pub const ALL: [Counter; 16] = [
        Counter::Redirected4,
        Counter::Redirected6,
        Counter::RedirectedV4Mapped,
        Counter::RefusedDgram,
        Counter::SkippedMark,
        Counter::SkippedTgid,
        Counter::SelectedExec,
        Counter::SelectedFork,
        Counter::TgidExited,
        Counter::MapFull,
        Counter::Established,
        Counter::Getpeername,
        Counter::EventsLost,
        Counter::RefusedNetns,
        Counter::SelectedSticky,
        Counter::SelectedScript,
    ];

    /// The C enumerator's name (`KYA_CNT_...`).
    pub fn c_name(self) -> &'static str {
        match self {
            Counter::Redirected4 => "KYA_CNT_REDIRECTED4",
            Counter::Redirected6 => "KYA_CNT_REDIRECTED6",
            Counter::RedirectedV4Mapped => "KYA_CNT_REDIRECTED_V4MAPPED",
            Counter::RefusedDgram => "KYA_CNT_REFUSED_DGRAM",
            Counter::SkippedMark => "KYA_CNT_SKIPPED_MARK",
            Counter::SkippedTgid => "KYA_CNT_SKIPPED_TGID",
            Counter::SelectedExec => "KYA_CNT_SELECTED_EXEC",
            Counter::SelectedFork => "KYA_CNT_SELECTED_FORK",
            Counter::TgidExited => "KYA_CNT_TGID_EXITED",
            Counter::MapFull => "KYA_CNT_MAP_FULL",
            Counter::Established => "KYA_CNT_ESTABLISHED",
            Counter::Getpeername => "KYA_CNT_GETPEERNAME",
            Counter::EventsLost => "KYA_CNT_EVENTS_LOST",
            Counter::RefusedNetns => "KYA_CNT_REFUSED_NETNS",
            Counter::SelectedSticky => "KYA_CNT_SELECTED_STICKY",
            Counter::SelectedScript => "KYA_CNT_SELECTED_SCRIPT",
        }
    }
}

/// A typed event from the `kya_events` ring buffer.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Event {
    pub kind: u32,
    pub pid: u32,
    pub tid: u32,
    pub err: i32,
    pub arg0: u64,
    pub arg1: u64,
    pub comm: [u8; KYA_COMM_LEN],
}

impl Event {
    /// Decodes a ring buffer record; `None` unless it is exactly one event
    /// (a short or oversized record is not trusted).
    pub fn from_bytes(bytes: &[u8]) -> Option<Event> {
        if bytes.len() != std::mem::size_of::<Event>() {
            return None;
        }
        let u32_at =
            |o: usize| u32::from_ne_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[o..o + 8]);
            u64::from_ne_bytes(b)
        };
        let mut comm = [0u8; KYA_COMM_LEN];
        comm.copy_from_slice(&bytes[32..48]);
        Some(Event {
            kind: u32_at(0),
            pid: u32_at(4),
            tid: u32_at(8),
            err: u32_at(12) as i32,
            arg0: u64_at(16),
            arg1: u64_at(24),
            comm,
        })
    }

    pub fn comm(&self) -> String {
        comm_str(&self.comm)
    }
}

fn addr_from(family: u8, bytes: &[u8; 16]) -> Option<IpAddr> {
    match family {
        KYA_FAMILY_INET => Some(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        KYA_FAMILY_INET6 => Some(IpAddr::V6(Ipv6Addr::from(*bytes))),
        _ => None,
    }
}

fn comm_str(comm: &[u8; KYA_COMM_LEN]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

// SAFETY: plain-old-data: repr(C), only integers and byte arrays, explicit
// padding fields, so every bit pattern is valid and there is no uninit padding.
#[cfg(feature = "aya")]
unsafe impl aya::Pod for KyaConfig {}
#[cfg(feature = "aya")]
unsafe impl aya::Pod for ExeKey {}
#[cfg(feature = "aya")]
unsafe impl aya::Pod for OriginRecord {}
#[cfg(feature = "aya")]
unsafe impl aya::Pod for ConnKey {}
#[cfg(feature = "aya")]
unsafe impl aya::Pod for Event {}
#[cfg(feature = "aya")]
unsafe impl aya::Pod for SelEntry {}
#[cfg(feature = "aya")]
unsafe impl aya::Pod for ExePath {}
#[cfg(feature = "aya")]
unsafe impl aya::Pod for NetnsEntry {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::mem::{offset_of, size_of};

    const HEADER: &str = include_str!("../../kya-ebpf/src/kya.h");

    /// struct name -> (size, field -> offset) as the header asserts them.
    fn header_layouts(header: &str) -> BTreeMap<String, (Option<usize>, BTreeMap<String, usize>)> {
        let mut out: BTreeMap<String, (Option<usize>, BTreeMap<String, usize>)> = BTreeMap::new();
        for line in header.lines().map(str::trim) {
            let Some(rest) = line.strip_prefix("_Static_assert(") else {
                continue;
            };
            if let Some(r) = rest.strip_prefix("sizeof(struct ") {
                let (name, r) = r.split_once(')').expect("sizeof(struct NAME)");
                let n = r
                    .trim_start()
                    .strip_prefix("==")
                    .expect("== N")
                    .trim_start();
                let n: usize = n
                    .split(',')
                    .next()
                    .unwrap()
                    .trim()
                    .parse()
                    .expect("size number");
                out.entry(name.to_string()).or_default().0 = Some(n);
            } else if let Some(r) = rest.strip_prefix("__builtin_offsetof(struct ") {
                let (name, r) = r.split_once(',').expect("offsetof(struct NAME, FIELD)");
                let (field, r) = r.split_once(')').expect("FIELD)");
                let n = r
                    .trim_start()
                    .strip_prefix("==")
                    .expect("== N")
                    .trim_start();
                let n: usize = n
                    .split(',')
                    .next()
                    .unwrap()
                    .trim()
                    .parse()
                    .expect("offset number");
                out.entry(name.to_string())
                    .or_default()
                    .1
                    .insert(field.trim().to_string(), n);
            } else {
                panic!("unrecognised _Static_assert form in kya.h: {line}");
            }
        }
        out
    }

    fn rust_layout(name: &str) -> (usize, BTreeMap<&'static str, usize>) {
        let m = |v: &[(&'static str, usize)]| v.iter().copied().collect::<BTreeMap<_, _>>();
        match name {
            "kya_config" => (
                size_of::<KyaConfig>(),
                m(&[
                    ("listen_port", offset_of!(KyaConfig, listen_port)),
                    ("skip_mark", offset_of!(KyaConfig, skip_mark)),
                    ("flags", offset_of!(KyaConfig, flags)),
                    ("netns_cookie", offset_of!(KyaConfig, netns_cookie)),
                ]),
            ),
            "kya_exe_key" => (
                size_of::<ExeKey>(),
                m(&[
                    ("dev", offset_of!(ExeKey, dev)),
                    ("ino", offset_of!(ExeKey, ino)),
                ]),
            ),
            "kya_origin" => (
                size_of::<OriginRecord>(),
                m(&[
                    ("cgroup_id", offset_of!(OriginRecord, cgroup_id)),
                    ("pid", offset_of!(OriginRecord, pid)),
                    ("tid", offset_of!(OriginRecord, tid)),
                    ("uid", offset_of!(OriginRecord, uid)),
                    ("gid", offset_of!(OriginRecord, gid)),
                    ("dst_addr", offset_of!(OriginRecord, dst_addr)),
                    ("dst_port", offset_of!(OriginRecord, dst_port)),
                    ("dst_family", offset_of!(OriginRecord, dst_family)),
                    ("comm", offset_of!(OriginRecord, comm)),
                    ("exe_dev", offset_of!(OriginRecord, exe_dev)),
                    ("exe_ino", offset_of!(OriginRecord, exe_ino)),
                    ("netns_cookie", offset_of!(OriginRecord, netns_cookie)),
                ]),
            ),
            "kya_conn_key" => (
                size_of::<ConnKey>(),
                m(&[
                    ("src_addr", offset_of!(ConnKey, src_addr)),
                    ("dst_addr", offset_of!(ConnKey, dst_addr)),
                    ("src_port", offset_of!(ConnKey, src_port)),
                    ("dst_port", offset_of!(ConnKey, dst_port)),
                    ("family", offset_of!(ConnKey, family)),
                    ("netns_cookie", offset_of!(ConnKey, netns_cookie)),
                ]),
            ),
            "kya_netns" => (
                size_of::<NetnsEntry>(),
                m(&[("state", offset_of!(NetnsEntry, state))]),
            ),
            "kya_event" => (
                size_of::<Event>(),
                m(&[
                    ("kind", offset_of!(Event, kind)),
                    ("pid", offset_of!(Event, pid)),
                    ("tid", offset_of!(Event, tid)),
                    ("err", offset_of!(Event, err)),
                    ("arg0", offset_of!(Event, arg0)),
                    ("arg1", offset_of!(Event, arg1)),
                    ("comm", offset_of!(Event, comm)),
                ]),
            ),
            "kya_sel" => (
                size_of::<SelEntry>(),
                m(&[
                    ("reason", offset_of!(SelEntry, reason)),
                    ("kind", offset_of!(SelEntry, kind)),
                    ("index", offset_of!(SelEntry, index)),
                ]),
            ),
            "kya_exe_path" => (
                size_of::<ExePath>(),
                m(&[("path", offset_of!(ExePath, path))]),
            ),
            other => panic!("kya.h declares struct {other} which has no Rust mirror in maps.rs"),
        }
    }

    #[test]
    fn every_struct_in_the_header_matches_its_rust_mirror() {
        let layouts = header_layouts(HEADER);
        let names: Vec<_> = layouts.keys().cloned().collect();
        assert_eq!(
            names,
            [
                "kya_config",
                "kya_conn_key",
                "kya_event",
                "kya_exe_key",
                "kya_exe_path",
                "kya_netns",
                "kya_origin",
                "kya_sel"
            ]
        );
        for (name, (size, fields)) in &layouts {
            let (rsize, rfields) = rust_layout(name);
            assert_eq!(*size, Some(rsize), "size of struct {name}");
            assert!(!fields.is_empty(), "struct {name} has no offset asserts");
            for (field, off) in fields {
                assert_eq!(
                    rfields.get(field.as_str()),
                    Some(off),
                    "offset of {name}.{field}"
                );
            }
            // every Rust field we map is also pinned by the header
            for field in rfields.keys() {
                assert!(
                    fields.contains_key(*field),
                    "{name}.{field} has no _Static_assert in kya.h"
                );
            }
        }
    }

    /// `#define NAME VALUE` (numeric) and `NAME = VALUE,` enum lines.
    fn header_constants(header: &str) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for line in header.lines().map(str::trim) {
            let (name, value) = if let Some(r) = line.strip_prefix("#define ") {
                let mut it = r.split_whitespace();
                match (it.next(), it.next()) {
                    (Some(n), Some(v)) => (n, v),
                    _ => continue,
                }
            } else if line.starts_with("KYA_CNT_") {
                match line.trim_end_matches(',').split_once('=') {
                    Some((n, v)) => (n.trim(), v.trim()),
                    None => continue,
                }
            } else {
                continue;
            };
            let parsed = if let Some(hex) = value.strip_prefix("0x") {
                u64::from_str_radix(hex, 16).ok()
            } else {
                value.parse().ok()
            };
            if let Some(v) = parsed {
                out.insert(name.to_string(), v);
            }
        }
        out
    }

    #[test]
    fn the_skip_mark_avoids_the_mark_bits_other_firewalls_test() {
        // kube-proxy, netavark, Cilium, Calico/Weave/Tailscale, policy routing
        const FOREIGN: u32 = 0x4000 | 0x8000 | 0x2000 | 0x0f00 | 0xffff_0000 | 0x1;
        assert_ne!(KYA_SKIP_MARK, 0);
        assert_eq!(KYA_SKIP_MARK & FOREIGN, 0, "{KYA_SKIP_MARK:#x}");
    }

    #[test]
    fn constants_match_the_header() {
        let c = header_constants(HEADER);
        let expect: &[(&str, u64)] = &[
            ("KYA_SKIP_MARK", KYA_SKIP_MARK.into()),
            ("KYA_CFG_ALL_TCP_PORTS", KYA_CFG_ALL_TCP_PORTS.into()),
            ("KYA_COMM_LEN", KYA_COMM_LEN as u64),
            ("KYA_MAX_CGROUP_DEPTH", KYA_MAX_CGROUP_DEPTH.into()),
            ("KYA_MAX_PORTS", KYA_MAX_PORTS.into()),
            ("KYA_MAX_SEL_CGROUPS", KYA_MAX_SEL_CGROUPS.into()),
            ("KYA_MAX_SEL_UIDS", KYA_MAX_SEL_UIDS.into()),
            ("KYA_MAX_SEL_TGIDS", KYA_MAX_SEL_TGIDS.into()),
            ("KYA_MAX_SKIP_TGIDS", KYA_MAX_SKIP_TGIDS.into()),
            ("KYA_MAX_EXES", KYA_MAX_EXES.into()),
            ("KYA_MAX_SOCKETS", KYA_MAX_SOCKETS.into()),
            ("KYA_SEL_PID", KYA_SEL_PID.into()),
            ("KYA_SEL_EXEC", KYA_SEL_EXEC.into()),
            ("KYA_SEL_FORK", KYA_SEL_FORK.into()),
            ("KYA_SEL_SCAN", KYA_SEL_SCAN.into()),
            ("KYA_SEL_CGROUP", KYA_SEL_CGROUP.into()),
            ("KYA_SEL_UID", KYA_SEL_UID.into()),
            ("KYA_SEL_SCRIPT", KYA_SEL_SCRIPT.into()),
            ("KYA_KIND_PID", KYA_KIND_PID.into()),
            ("KYA_KIND_CGROUP", KYA_KIND_CGROUP.into()),
            ("KYA_KIND_UID", KYA_KIND_UID.into()),
            ("KYA_KIND_EXE", KYA_KIND_EXE.into()),
            ("KYA_EXE_SCRIPT", KYA_EXE_SCRIPT.into()),
            ("KYA_PATH_LEN", KYA_PATH_LEN as u64),
            ("KYA_MAX_TGID_EXES", KYA_MAX_TGID_EXES.into()),
            ("KYA_MAX_EXE_PATHS", KYA_MAX_EXE_PATHS.into()),
            ("KYA_MAX_SCRIPT_NAMES", KYA_MAX_SCRIPT_NAMES.into()),
            ("KYA_FAMILY_INET", KYA_FAMILY_INET.into()),
            ("KYA_FAMILY_INET6", KYA_FAMILY_INET6.into()),
            ("KYA_EV_MAP_UPDATE_FAILED", KYA_EV_MAP_UPDATE_FAILED.into()),
            ("KYA_EV_EXE_SELECTED", KYA_EV_EXE_SELECTED.into()),
            ("KYA_EV_REFUSED_DGRAM", KYA_EV_REFUSED_DGRAM.into()),
            ("KYA_EV_NETNS_UNSERVED", KYA_EV_NETNS_UNSERVED.into()),
            ("KYA_EV_SELECTED_CGROUP", KYA_EV_SELECTED_CGROUP.into()),
            ("KYA_MAX_NETNS", KYA_MAX_NETNS.into()),
            ("KYA_NETNS_READY", KYA_NETNS_READY.into()),
            ("KYA_MAP_SOCKETS", KYA_MAP_SOCKETS),
            ("KYA_MAP_CONNS", KYA_MAP_CONNS),
            ("KYA_MAP_SEL_TGIDS", KYA_MAP_SEL_TGIDS),
            ("KYA_CNT_MAX", KYA_CNT_MAX.into()),
        ];
        for (name, v) in expect {
            assert_eq!(c.get(*name), Some(v), "{name}");
        }
        for counter in Counter::ALL {
            assert_eq!(
                c.get(counter.c_name()),
                Some(&(counter as u64)),
                "{}",
                counter.c_name()
            );
        }
        // every counter the C side defines has a Rust variant
        let c_counters = c
            .keys()
            .filter(|k| k.starts_with("KYA_CNT_") && *k != "KYA_CNT_MAX")
            .count();
        assert_eq!(c_counters, Counter::ALL.len());
    }

    #[test]
    fn the_layout_parser_rejects_what_it_does_not_understand() {
        let r = std::panic::catch_unwind(|| header_layouts("_Static_assert(1 == 1, \"x\");"));
        assert!(r.is_err());
        let c =
            header_constants("#define A 0x10\n#define B notanumber\n#define C\nKYA_CNT_X = 3,\n");
        assert_eq!(c.get("A"), Some(&16));
        assert_eq!(c.get("B"), None);
        assert_eq!(c.get("KYA_CNT_X"), Some(&3));
    }

    #[test]
    fn name_hash_is_fnv1a_as_the_kernel_computes_it() {
        // FNV-1a 64 reference values
        assert_eq!(name_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(name_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(name_hash(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn exe_paths_are_bounded_and_nul_terminated() {
        let p = ExePath::from_path(std::path::Path::new("/usr/bin/node"));
        assert_eq!(p.path().as_deref(), Some("/usr/bin/node"));
        let long = "/x".repeat(KYA_PATH_LEN);
        let p = ExePath::from_path(std::path::Path::new(&long));
        assert_eq!(p.path[KYA_PATH_LEN - 1], 0);
        assert_eq!(p.path().map(|s| s.len()), Some(KYA_PATH_LEN - 1));
        assert_eq!(ExePath::default().path(), None);
        // garbage after the NUL (a reused kernel buffer) is ignored
        let mut g = ExePath::from_path(std::path::Path::new("/a"));
        g.path[5] = b'z';
        assert_eq!(g.path().as_deref(), Some("/a"));
        let o = OriginRecord::default();
        assert_eq!(o.exe(), None);
        let o = OriginRecord {
            exe_dev: 3,
            exe_ino: 9,
            ..o
        };
        assert_eq!(o.exe(), Some(ExeKey { dev: 3, ino: 9 }));
    }

    #[test]
    fn kernel_dev_encoding() {
        // glibc makedev(8, 1) = 0x801 -> kernel MKDEV(8, 1) = 8 << 20 | 1
        assert_eq!(kernel_dev(0x801), (8 << 20) | 1);
        // big minor: makedev(259, 70000)
        let (maj, min) = (259u64, 70000u64);
        let st =
            ((maj & 0xfff) << 8) | ((maj & !0xfff) << 32) | (min & 0xff) | ((min & !0xff) << 12);
        assert_eq!(kernel_dev(st), (maj << 20) | min);
        assert_eq!(kernel_dev(0), 0);
    }

    #[test]
    fn conn_key_normalises_v4_mapped_and_rejects_mixed_families() {
        let peer: SocketAddr = "[::ffff:127.0.0.1]:40000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:953".parse().unwrap();
        let k = ConnKey::from_accepted(peer, local, 0).unwrap();
        assert_eq!(k.family, KYA_FAMILY_INET);
        assert_eq!(&k.src_addr[..4], &[127, 0, 0, 1]);
        assert!(k.src_addr[4..].iter().all(|&b| b == 0));
        assert_eq!((k.src_port, k.dst_port), (40000, 953));
        let plain = ConnKey::from_accepted("127.0.0.1:40000".parse().unwrap(), local, 0).unwrap();
        assert_eq!(k, plain);
        // the same loopback 4-tuple in another network namespace is another key
        let other = ConnKey::from_accepted(peer, local, 0x1234).unwrap();
        assert_ne!(k, other);
        assert_eq!(other.netns_cookie, 0x1234);

        let v6 =
            ConnKey::from_accepted("[::1]:1".parse().unwrap(), "[::1]:953".parse().unwrap(), 0)
                .unwrap();
        assert_eq!(v6.family, KYA_FAMILY_INET6);
        assert_eq!(v6.dst_addr[15], 1);

        assert!(ConnKey::from_accepted("[::1]:1".parse().unwrap(), local, 0).is_none());
    }

    #[test]
    fn origin_record_decodes_and_refuses_unknown_families() {
        let mut o = OriginRecord {
            dst_port: 8443,
            dst_family: KYA_FAMILY_INET,
            ..OriginRecord::default()
        };
        o.dst_addr[..4].copy_from_slice(&[127, 0, 0, 2]);
        o.comm[..7].copy_from_slice(b"python3");
        assert_eq!(o.dst(), Some("127.0.0.2:8443".parse().unwrap()));
        assert_eq!(o.comm(), "python3");
        o.dst_family = 0;
        assert_eq!(o.dst(), None);
        o.dst_family = 255;
        assert_eq!(o.dst(), None);
        // a comm with no NUL and invalid UTF-8 is still bounded and decoded
        o.comm = [0xff; KYA_COMM_LEN];
        assert_eq!(o.comm().chars().count(), KYA_COMM_LEN);
        o.dst_family = KYA_FAMILY_INET6;
        o.dst_addr = Ipv6Addr::LOCALHOST.octets();
        assert_eq!(o.dst(), Some("[::1]:8443".parse().unwrap()));
    }

    #[test]
    fn event_decoding_requires_the_exact_size() {
        assert_eq!(Event::from_bytes(&[]), None);
        assert_eq!(Event::from_bytes(&[0u8; 47]), None);
        assert_eq!(Event::from_bytes(&[0u8; 49]), None);
        assert_eq!(Event::from_bytes(&vec![0u8; 1 << 20]), None);
        let mut b = [0u8; 48];
        b[0..4].copy_from_slice(&KYA_EV_EXE_SELECTED.to_ne_bytes());
        b[4..8].copy_from_slice(&42u32.to_ne_bytes());
        b[12..16].copy_from_slice(&(-7i32).to_ne_bytes());
        b[16..24].copy_from_slice(&9u64.to_ne_bytes());
        b[32..35].copy_from_slice(b"sh\0");
        let e = Event::from_bytes(&b).unwrap();
        assert_eq!(
            (e.kind, e.pid, e.err, e.arg0),
            (KYA_EV_EXE_SELECTED, 42, -7, 9)
        );
        assert_eq!(e.comm(), "sh");
    }

    mod prop {
        use super::super::*;
        use proptest::prelude::*;

        fn any_ip() -> impl Strategy<Value = IpAddr> {
            prop_oneof![
                any::<[u8; 4]>().prop_map(|b| IpAddr::V4(Ipv4Addr::from(b))),
                any::<[u8; 16]>().prop_map(|b| IpAddr::V6(Ipv6Addr::from(b))),
                // v4-mapped, the ambiguous case
                any::<[u8; 4]>().prop_map(|b| IpAddr::V6(Ipv4Addr::from(b).to_ipv6_mapped())),
            ]
        }

        proptest! {
            #[test]
            fn conn_keys_are_canonical(a in any_ip(), pa: u16, b in any_ip(), pb: u16) {
                let key = ConnKey::from_accepted(SocketAddr::new(a, pa), SocketAddr::new(b, pb), 0);
                let (ca, cb) = (a.to_canonical(), b.to_canonical());
                prop_assert_eq!(key.is_some(), ca.is_ipv4() == cb.is_ipv4());
                if let Some(k) = key {
                    prop_assert_eq!((k.src_port, k.dst_port), (pa, pb));
                    prop_assert_eq!(k._pad, [0; 3]);
                    // the same connection written canonically gives the same key
                    let again = ConnKey::from_accepted(SocketAddr::new(ca, pa), SocketAddr::new(cb, pb), 0);
                    prop_assert_eq!(Some(k), again);
                    if ca.is_ipv4() {
                        prop_assert_eq!(k.family, KYA_FAMILY_INET);
                        prop_assert!(k.src_addr[4..].iter().chain(&k.dst_addr[4..]).all(|&x| x == 0));
                    } else {
                        prop_assert_eq!(k.family, KYA_FAMILY_INET6);
                    }
                }
            }

            #[test]
            fn events_decode_only_at_the_exact_size(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
                let ev = Event::from_bytes(&bytes);
                prop_assert_eq!(ev.is_some(), bytes.len() == std::mem::size_of::<Event>());
                if let Some(e) = ev {
                    prop_assert!(e.comm().chars().count() <= KYA_COMM_LEN);
                }
            }

            #[test]
            fn origin_records_never_panic(bytes: [u8; 16], family: u8, port: u16, comm: [u8; 16]) {
                let o = OriginRecord { dst_addr: bytes, dst_family: family, dst_port: port, comm, ..OriginRecord::default() };
                let dst = o.dst();
                prop_assert_eq!(dst.is_some(), family == KYA_FAMILY_INET || family == KYA_FAMILY_INET6);
                if let Some(d) = dst {
                    prop_assert_eq!(d.port(), port);
                }
                let _ = o.comm();
            }
        }
    }
}
