//! One kya instance's redirect: its own copy of the BPF object and maps,
//! its links on the cgroup v2 root, its pins.

use super::probe::{self, KernelSupport};
use super::selection::{
    exe_keys, expand_exes, facts_selected, running_selection, scan_proc, script_names,
    selection_facts, ExeFile, SelectionMaps, Wanted,
};
use super::stats::{log_event, KernelStats};
use super::sys::{self, AttachType};
use super::{host, BpfError, OriginTable};
use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, RingBuf};
use aya::programs::Program;
use aya::{Ebpf, EbpfLoader};
use kya_common::maps::{
    Counter, Event, ExeKey, ExePath, KyaConfig, NetnsEntry, SelEntry, KYA_CFG_ALL_TCP_PORTS,
    KYA_EV_NETNS_UNSERVED, KYA_EV_SELECTED_CGROUP, KYA_EXE_SCRIPT, KYA_KIND_CGROUP, KYA_KIND_EXE,
    KYA_KIND_PID, KYA_KIND_UID, KYA_MAX_EXES, KYA_MAX_PORTS, KYA_MAX_SCRIPT_NAMES,
    KYA_MAX_SEL_CGROUPS, KYA_MAX_SEL_TGIDS, KYA_MAX_SEL_UIDS, KYA_NETNS_READY, KYA_SEL_PID,
    KYA_SKIP_MARK,
};
use kya_ebpf::{maps as m, programs as p};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// What to redirect, and where to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedirectConfig {
    /// cgroup v2 paths relative to the cgroup2 mount; descendants included.
    pub cgroups: Vec<String>,
    pub uids: Vec<u32>,
    /// Absolute executable paths or globs (expanded here, rescanned on update).
    pub exes: Vec<String>,
    /// tgids; their future children are selected too.
    pub pids: Vec<u32>,
    /// Guarded destination ports.
    pub ports: Vec<u16>,
    /// Redirect every TCP connection of a selected process, whatever its
    /// port; `ports` then only names where datagrams are refused.
    pub all_tcp_ports: bool,
    /// The interceptor's port on 127.0.0.1 and ::1 (1..=1023).
    pub listen_port: u16,
    /// This instance's pin directory (on bpffs).
    pub pin_dir: PathBuf,
    /// Pin nothing: if the daemon dies, the redirect dies with it.
    pub fail_open: bool,
}

impl RedirectConfig {
    fn validate(&self) -> Result<(), BpfError> {
        if self.listen_port == 0 || self.listen_port >= 1024 {
            return Err(BpfError::BadListenPort(self.listen_port));
        }
        if self.ports.is_empty() {
            return Err(BpfError::NoPorts);
        }
        if self.ports.contains(&0) {
            return Err(BpfError::BadPort);
        }
        check_len("guarded ports", self.ports.len(), KYA_MAX_PORTS)?;
        check_len("selected cgroups", self.cgroups.len(), KYA_MAX_SEL_CGROUPS)?;
        check_len("selected uids", self.uids.len(), KYA_MAX_SEL_UIDS)?;
        check_len("selected pids", self.pids.len(), KYA_MAX_SEL_TGIDS)?;
        let pd = &self.pin_dir;
        if !pd.is_absolute() || pd == Path::new(host::BPFFS_MOUNT) || pd == Path::new("/") {
            return Err(BpfError::BadPinDir(pd.clone()));
        }
        if pd
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(BpfError::BadPinDir(pd.clone()));
        }
        Ok(())
    }

    fn resolve(&self, cgroup2: &Path) -> Result<Resolved, BpfError> {
        let idx = |i: usize| u32::try_from(i).unwrap_or(u32::MAX);
        let mut cgroups = BTreeMap::new();
        for (i, c) in self.cgroups.iter().enumerate() {
            cgroups
                .entry(host::cgroup_id(cgroup2, c)?)
                .or_insert((c.clone(), idx(i)));
        }
        let mut uids = BTreeMap::new();
        for (i, u) in self.uids.iter().enumerate() {
            uids.entry(*u).or_insert(idx(i));
        }
        // each pattern on its own, so every file knows which selector it is
        let mut exes: BTreeMap<ExeKey, (ExeFile, u32)> = BTreeMap::new();
        let mut exe_files = vec![0usize; self.exes.len()];
        for (i, pat) in self.exes.iter().enumerate() {
            let files = exe_keys(&expand_exes(std::slice::from_ref(pat))?);
            exe_files[i] = files.len();
            for (k, f) in files {
                exes.entry(k).or_insert((f, idx(i)));
            }
        }
        check_len("selected executables", exes.len(), KYA_MAX_EXES)?;
        let script_names = script_names(exes.values().map(|(f, _)| f));
        check_len("script names", script_names.len(), KYA_MAX_SCRIPT_NAMES)?;
        let mut pids = BTreeMap::new();
        for (i, p) in self.pids.iter().enumerate() {
            if pid_exists(*p) {
                pids.entry(*p).or_insert(idx(i));
            }
        }
        Ok(Resolved {
            cgroups,
            uids,
            exes,
            script_names,
            pids,
            ports: self.ports.iter().copied().collect(),
            all_tcp_ports: self.all_tcp_ports,
            listen_port: self.listen_port,
            names: SelectorNames {
                cgroups: self.cgroups.clone(),
                uids: self.uids.clone(),
                exes: self.exes.clone(),
                pids: self.pids.clone(),
                exe_files,
            },
        })
    }
}

/// A pid that does not exist is not selected: a later process reusing the
/// number would otherwise be selected by accident.
fn pid_exists(pid: u32) -> bool {
    let ok = pid != 0 && Path::new(&format!("/proc/{pid}")).exists();
    if !ok {
        tracing::warn!(pid, "selected pid does not exist; ignored");
    }
    ok
}

fn check_len(what: &'static str, got: usize, max: u32) -> Result<(), BpfError> {
    if got > max as usize {
        return Err(BpfError::TooMany { what, got, max });
    }
    Ok(())
}

/// A selection resolved to kernel keys (each with its selector's index in
/// the operator's list); what the maps currently hold.
#[derive(Debug, Clone, Default)]
struct Resolved {
    cgroups: BTreeMap<u64, (String, u32)>,
    uids: BTreeMap<u32, u32>,
    exes: BTreeMap<ExeKey, (ExeFile, u32)>,
    script_names: BTreeSet<u64>,
    pids: BTreeMap<u32, u32>,
    ports: BTreeSet<u16>,
    all_tcp_ports: bool,
    listen_port: u16,
    names: SelectorNames,
}

impl Resolved {
    fn wanted(&self) -> Wanted<'_> {
        Wanted {
            exes: self.exes.iter().map(|(k, (f, i))| (*k, (f, *i))).collect(),
            pids: self.pids.clone(),
            uids: self.uids.clone(),
            cgroups: self
                .cgroups
                .values()
                .map(|(c, i)| (c.as_str(), *i))
                .collect(),
        }
    }
}

/// The operator's selectors as given, in order (the kernel's `kya_sel.index`
/// points into these lists).
#[derive(Debug, Clone, Default)]
struct SelectorNames {
    cgroups: Vec<String>,
    uids: Vec<u32>,
    exes: Vec<String>,
    pids: Vec<u32>,
    /// How many files each exe pattern resolved to.
    exe_files: Vec<usize>,
}

/// How many live processes one selector holds (`kya status`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SelectorCount {
    /// `cgroup`, `uid`, `exe` or `pid`.
    pub kind: &'static str,
    /// The selector as the operator gave it.
    pub selector: String,
    /// Live processes it holds: those that matched it, and their descendants.
    pub processes: usize,
}

struct Maps {
    config: Array<MapData, KyaConfig>,
    ports: HashMap<MapData, u16, u8>,
    cgroups: HashMap<MapData, u64, u32>,
    uids: HashMap<MapData, u32, u32>,
    tgids: HashMap<MapData, u32, SelEntry>,
    skip: HashMap<MapData, u32, u8>,
    exes: HashMap<MapData, ExeKey, u32>,
    tgid_exes: HashMap<MapData, u32, ExeKey>,
    exe_paths: HashMap<MapData, ExeKey, ExePath>,
    script_names: HashMap<MapData, u64, u8>,
    netns: HashMap<MapData, u64, NetnsEntry>,
}

/// A lookup: present, absent, or the map failed (an error, never "absent").
fn contains<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    key: &K,
    name: &'static str,
) -> Result<bool, BpfError> {
    match map.get(key, 0) {
        Ok(_) => Ok(true),
        Err(MapError::KeyNotFound) => Ok(false),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(false)
        }
        Err(e) => Err(map_err(name)(e)),
    }
}

impl SelectionMaps for Maps {
    fn has_tgid(&self, tgid: u32) -> Result<bool, BpfError> {
        contains(&self.tgids, &tgid, m::SEL_TGIDS)
    }
    fn has_uid(&self, uid: u32) -> Result<bool, BpfError> {
        contains(&self.uids, &uid, m::SEL_UIDS)
    }
    fn has_cgroup(&self, id: u64) -> Result<bool, BpfError> {
        contains(&self.cgroups, &id, m::SEL_CGROUPS)
    }
    fn has_exe(&self, key: &ExeKey) -> Result<bool, BpfError> {
        contains(&self.exes, key, m::EXES)
    }
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> BpfError {
    move |e| BpfError::Map {
        name,
        source: Box::new(e),
    }
}

fn take<T: TryFrom<Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, BpfError> {
    let map = ebpf.take_map(name).ok_or(BpfError::Missing(name))?;
    T::try_from(map).map_err(map_err(name))
}

/// Programs attached to the cgroup v2 root, in attach order: sockops first
/// (so every redirected connection gets its 4-tuple published), then
/// getpeername, then the hooks that start redirecting.
const CGROUP_PROGRAMS: [(&str, AttachType); 7] = [
    (p::SOCKOPS, AttachType::SockOps),
    (p::GETPEERNAME4, AttachType::Getpeername4),
    (p::GETPEERNAME6, AttachType::Getpeername6),
    (p::SENDMSG4, AttachType::Sendmsg4),
    (p::SENDMSG6, AttachType::Sendmsg6),
    (p::CONNECT4, AttachType::Connect4),
    (p::CONNECT6, AttachType::Connect6),
];

const TRACEPOINT_PROGRAMS: [(&str, &std::ffi::CStr); 4] = [
    (p::EXIT, c"sched_process_exit"),
    (p::FORK, c"sched_process_fork"),
    (p::EXEC, c"sched_process_exec"),
    (p::CGROUP_ATTACH, c"cgroup_attach_task"),
];

/// The hook that selects interpreters of selected scripts. It runs at the
/// exit of every system call of the host (about 0.1 µs each), so it is only
/// attached once a selected `--exe` is a script.
const SCRIPT_HOOK: (&str, &std::ffi::CStr) = (p::SYS_EXIT, c"sys_exit");

/// Pin file names this code creates (and removes when stale).
fn pin_names() -> impl Iterator<Item = &'static str> {
    TRACEPOINT_PROGRAMS
        .iter()
        .chain(std::iter::once(&SCRIPT_HOOK))
        .map(|(n, _)| *n)
        .chain(CGROUP_PROGRAMS.iter().map(|(n, _)| *n))
}

/// One loaded, attached instance of kya's kernel side.
pub struct Redirector {
    ebpf: Ebpf,
    maps: Maps,
    counters: PerCpuArray<MapData, u64>,
    events: Option<RingBuf<MapData>>,
    reader: Option<tokio::task::JoinHandle<()>>,
    events_read: Arc<AtomicU64>,
    origins: OriginTable,
    links: Vec<(&'static str, OwnedFd)>,
    pinned: Vec<PathBuf>,
    pin_dir: PathBuf,
    fail_open: bool,
    cgroup2: PathBuf,
    netns_cookie: u64,
    applied: Resolved,
    /// (device, inode) -> path of the selected executables, for the event log.
    exe_names: Arc<RwLock<BTreeMap<ExeKey, PathBuf>>>,
    /// The kernel and the features probed on it.
    support: KernelSupport,
    /// Woken when the kernel refused a connect in a network namespace kya
    /// does not serve yet, or selected a process entering a selected cgroup
    /// (the namespace server reconciles at once).
    netns_wake: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for Redirector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redirector")
            .field("pin_dir", &self.pin_dir)
            .field("fail_open", &self.fail_open)
            .field("cgroup2", &self.cgroup2)
            .field("links", &self.links.len())
            .field("pinned", &self.pinned)
            .finish_non_exhaustive()
    }
}

impl Redirector {
    /// Mounts bpffs if absent, finds cgroup2, loads the object, fills the
    /// maps (scanning /proc for running exe/pid-selected processes and their
    /// descendants), attaches at the cgroup2 root (multi-attach: other
    /// programs and other kya instances keep running), and pins the links
    /// under `pin_dir` unless `fail_open`, replacing the pins a crashed run
    /// of the same `pin_dir` left.
    ///
    /// No tracefs is needed: the process tracepoints are raw tracepoints.
    pub fn start(cfg: &RedirectConfig) -> Result<Redirector, BpfError> {
        cfg.validate()?;
        host::ensure_bpffs()?;
        let cgroup2 = host::cgroup2_mount()?;
        let want = cfg.resolve(&cgroup2)?;

        raise_memlock();
        let support = probe::probe()?;
        let mut ebpf = EbpfLoader::new().load(kya_ebpf::OBJECT).map_err(Box::new)?;
        for name in pin_names() {
            load_program(&mut ebpf, name, &support.release)?;
        }
        let maps = Maps {
            config: take(&mut ebpf, m::CONFIG)?,
            ports: take(&mut ebpf, m::PORTS)?,
            cgroups: take(&mut ebpf, m::SEL_CGROUPS)?,
            uids: take(&mut ebpf, m::SEL_UIDS)?,
            tgids: take(&mut ebpf, m::SEL_TGIDS)?,
            skip: take(&mut ebpf, m::SKIP_TGIDS)?,
            exes: take(&mut ebpf, m::EXES)?,
            tgid_exes: take(&mut ebpf, m::TGID_EXES)?,
            exe_paths: take(&mut ebpf, m::EXE_PATHS)?,
            script_names: take(&mut ebpf, m::SCRIPT_NAMES)?,
            netns: take(&mut ebpf, m::NETNS)?,
        };
        let exe_paths_fd = dup_map_fd(&maps.exe_paths, m::EXE_PATHS)?;
        let counters: PerCpuArray<MapData, u64> = take(&mut ebpf, m::COUNTERS)?;
        let events: RingBuf<MapData> = take(&mut ebpf, m::EVENTS)?;
        let conns = ebpf.take_map(m::CONNS).ok_or(BpfError::Missing(m::CONNS))?;
        let conns_fd = match &conns {
            Map::LruHashMap(data) => data
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| BpfError::io("duplicating the kya_conns fd", e))?,
            _ => return Err(BpfError::Missing(m::CONNS)),
        };

        let mut r = Redirector {
            ebpf,
            maps,
            counters,
            events: Some(events),
            reader: None,
            events_read: Arc::new(AtomicU64::new(0)),
            origins: OriginTable::new(conns_fd, exe_paths_fd),
            links: Vec::new(),
            pinned: Vec::new(),
            pin_dir: cfg.pin_dir.clone(),
            fail_open: cfg.fail_open,
            cgroup2: cgroup2.clone(),
            netns_cookie: host::netns_cookie(),
            applied: Resolved::default(),
            exe_names: Arc::default(),
            support,
            netns_wake: Arc::default(),
        };
        // The daemon never redirects itself, even inside a selected cgroup.
        let me = std::process::id();
        r.maps
            .skip
            .insert(me, 1u8, 0)
            .map_err(map_err(m::SKIP_TGIDS))?;
        r.apply(want)?;

        // Tracepoints before the /proc scan: a process that forks or execs
        // while we scan is caught by one or the other.
        for (name, tp) in TRACEPOINT_PROGRAMS {
            let fd = r.prog_fd(name)?;
            let link =
                sys::raw_tracepoint_open(fd.as_fd(), tp).map_err(|source| BpfError::Syscall {
                    call: "BPF_RAW_TRACEPOINT_OPEN",
                    source,
                })?;
            r.links.push((name, link));
        }
        r.ensure_script_hook()?;
        r.select_running()?;
        r.warn_empty_selectors();

        let root = std::fs::File::open(&cgroup2)
            .map_err(|e| BpfError::io(format!("opening {}", cgroup2.display()), e))?;
        for (name, attach) in CGROUP_PROGRAMS {
            let fd = r.prog_fd(name)?;
            let link = sys::link_create(fd.as_fd(), root.as_fd(), attach).map_err(|source| {
                BpfError::Syscall {
                    call: "BPF_LINK_CREATE",
                    source,
                }
            })?;
            r.links.push((name, link));
        }
        // Only now switch redirection on (listen_port 0 = off).
        r.write_config()?;
        if let Err(e) = r.replace_pins() {
            // no half-pinned state: what was pinned goes, the links detach
            for p in r.pinned.drain(..) {
                let _ = std::fs::remove_file(p);
            }
            return Err(e);
        }
        tracing::info!(
            cgroup2 = %cgroup2.display(),
            pin_dir = %r.pin_dir.display(),
            fail_open = r.fail_open,
            listen_port = cfg.listen_port,
            "BPF redirect attached"
        );
        Ok(r)
    }

    fn prog_fd(&self, name: &'static str) -> Result<OwnedFd, BpfError> {
        let prog = self.ebpf.program(name).ok_or(BpfError::Missing(name))?;
        let fd = prog.fd().map_err(|e| BpfError::Program {
            name,
            source: Box::new(e),
        })?;
        fd.as_fd()
            .try_clone_to_owned()
            .map_err(|e| BpfError::io(format!("duplicating the fd of {name}"), e))
    }

    fn write_config(&mut self) -> Result<(), BpfError> {
        let cfg = KyaConfig {
            listen_port: u32::from(self.applied.listen_port),
            skip_mark: KYA_SKIP_MARK,
            flags: if self.applied.all_tcp_ports {
                KYA_CFG_ALL_TCP_PORTS
            } else {
                0
            },
            _reserved: 0,
            netns_cookie: self.netns_cookie,
        };
        self.maps.config.set(0, cfg, 0).map_err(map_err(m::CONFIG))
    }

    /// Brings the maps from `self.applied` to `want` (insert or update new
    /// and changed, then remove gone), so an update never leaves a moment
    /// with an empty selection.
    fn apply(&mut self, want: Resolved) -> Result<(), BpfError> {
        let old = std::mem::take(&mut self.applied);
        let mp = &mut self.maps;
        for port in want.ports.difference(&old.ports) {
            mp.ports.insert(port, 1u8, 0).map_err(map_err(m::PORTS))?;
        }
        for (id, (_, i)) in &want.cgroups {
            mp.cgroups
                .insert(id, i, 0)
                .map_err(map_err(m::SEL_CGROUPS))?;
        }
        for (uid, i) in &want.uids {
            mp.uids.insert(uid, i, 0).map_err(map_err(m::SEL_UIDS))?;
        }
        for (key, (f, i)) in &want.exes {
            let v = if f.script { i | KYA_EXE_SCRIPT } else { *i };
            mp.exes.insert(key, v, 0).map_err(map_err(m::EXES))?;
        }
        for h in want.script_names.difference(&old.script_names) {
            mp.script_names
                .insert(h, 1u8, 0)
                .map_err(map_err(m::SCRIPT_NAMES))?;
        }
        for (pid, i) in &want.pids {
            let e = SelEntry {
                reason: KYA_SEL_PID,
                kind: KYA_KIND_PID,
                _pad: 0,
                index: *i,
            };
            mp.tgids.insert(pid, e, 0).map_err(map_err(m::SEL_TGIDS))?;
        }
        for port in old.ports.difference(&want.ports) {
            remove_if_present(mp.ports.remove(port), m::PORTS)?;
        }
        for id in old.cgroups.keys().filter(|k| !want.cgroups.contains_key(k)) {
            remove_if_present(mp.cgroups.remove(id), m::SEL_CGROUPS)?;
        }
        for uid in old.uids.keys().filter(|k| !want.uids.contains_key(k)) {
            remove_if_present(mp.uids.remove(uid), m::SEL_UIDS)?;
        }
        for key in old.exes.keys().filter(|k| !want.exes.contains_key(k)) {
            remove_if_present(mp.exes.remove(key), m::EXES)?;
        }
        for h in old.script_names.difference(&want.script_names) {
            remove_if_present(mp.script_names.remove(h), m::SCRIPT_NAMES)?;
        }
        for pid in old.pids.keys().filter(|k| !want.pids.contains_key(k)) {
            if mp.tgids.get(pid, 0).ok().map(|e| e.reason) == Some(KYA_SEL_PID) {
                remove_if_present(mp.tgids.remove(pid), m::SEL_TGIDS)?;
            }
        }
        if let Ok(mut names) = self.exe_names.write() {
            *names = want
                .exes
                .iter()
                .map(|(k, (f, _))| (*k, f.path.clone()))
                .collect();
        }
        self.applied = want;
        Ok(())
    }

    /// Selects running processes that match a selector now, and their
    /// descendants (the kernel's hooks handle everything started later), and
    /// tells the kernel which image each running process runs (it only sees
    /// the execs that happen while kya runs).
    fn select_running(&mut self) -> Result<(), BpfError> {
        let procs = scan_proc(self.applied.exes.values().any(|(f, _)| f.script));
        let sel = running_selection(&procs, &self.applied.wanted());
        let me = std::process::id();
        for (tgid, entry) in sel {
            if tgid == me || self.maps.tgids.get(&tgid, 0).is_ok() {
                continue;
            }
            self.maps
                .tgids
                .insert(tgid, entry, 0)
                .map_err(map_err(m::SEL_TGIDS))?;
            tracing::debug!(tgid, reason = entry.reason, "selected running process");
        }
        for p in &procs {
            let Some(key) = p.exe else { continue };
            // NOEXIST: an exec the kernel saw meanwhile is fresher than /proc
            let _ = self.maps.tgid_exes.insert(p.tgid, key, BPF_NOEXIST);
            if let Some(path) = &p.exe_path {
                let _ = self
                    .maps
                    .exe_paths
                    .insert(key, ExePath::from_path(path), BPF_NOEXIST);
            }
        }
        Ok(())
    }

    /// How many live processes each selector holds now, in the operator's
    /// order (`kya status`).
    pub fn selector_counts(&self) -> Result<Vec<SelectorCount>, BpfError> {
        let mut held: BTreeMap<(u8, u32), usize> = BTreeMap::new();
        for e in self.selected_processes()?.values() {
            *held.entry((e.kind, e.index)).or_default() += 1;
        }
        let n = &self.applied.names;
        let count = |kind: u8, i: usize| {
            held.get(&(kind, u32::try_from(i).unwrap_or(u32::MAX)))
                .copied()
                .unwrap_or(0)
        };
        let mut out = Vec::new();
        for (i, c) in n.cgroups.iter().enumerate() {
            out.push(SelectorCount {
                kind: "cgroup",
                selector: c.clone(),
                processes: count(KYA_KIND_CGROUP, i),
            });
        }
        for (i, u) in n.uids.iter().enumerate() {
            out.push(SelectorCount {
                kind: "uid",
                selector: u.to_string(),
                processes: count(KYA_KIND_UID, i),
            });
        }
        for (i, e) in n.exes.iter().enumerate() {
            out.push(SelectorCount {
                kind: "exe",
                selector: e.clone(),
                processes: count(KYA_KIND_EXE, i),
            });
        }
        for (i, p) in n.pids.iter().enumerate() {
            out.push(SelectorCount {
                kind: "pid",
                selector: p.to_string(),
                processes: count(KYA_KIND_PID, i),
            });
        }
        Ok(out)
    }

    /// A selector that matches nothing is most likely a mistake: say so (a
    /// warning, not an error: a cgroup may fill up later).
    fn warn_empty_selectors(&self) {
        let counts = match self.selector_counts() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot count the processes each selector holds");
                return;
            }
        };
        let n = &self.applied.names;
        let mut exe_i = 0;
        for c in counts {
            if c.kind == "exe" {
                let files = n.exe_files.get(exe_i).copied().unwrap_or(0);
                exe_i += 1;
                if files == 0 {
                    tracing::warn!(
                        selector = %c.selector,
                        "--exe matches no existing file: no process can be selected by it"
                    );
                }
                continue; // an executable nobody runs yet is the normal case
            }
            if c.processes == 0 {
                tracing::warn!(
                    kind = c.kind,
                    selector = %c.selector,
                    "selector matches no running process now"
                );
            }
        }
    }

    /// Removes stale pins of this pin_dir (a crashed earlier run), then pins
    /// our links unless fail-open. Our links are attached before the stale
    /// ones go, so there is no moment without a redirect.
    fn replace_pins(&mut self) -> Result<(), BpfError> {
        let dir = self.pin_dir.clone();
        if dir.is_dir() {
            for p in stale_pins(&dir)? {
                match std::fs::remove_file(&p) {
                    Ok(()) => {
                        tracing::warn!(pin = %p.display(), "removed a stale pinned link of an earlier run")
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(BpfError::io(
                            format!("removing stale pin {}", p.display()),
                            e,
                        ))
                    }
                }
            }
        }
        if self.fail_open {
            if dir.is_dir() {
                let _ = std::fs::remove_dir(&dir); // only if empty
            }
            return Ok(());
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| BpfError::io(format!("creating {}", dir.display()), e))?;
        if !host::on_bpffs(&dir)? {
            return Err(BpfError::BadPinDir(dir));
        }
        for (name, link) in &self.links {
            let path = dir.join(name);
            let c = CString::new(path.as_os_str().as_encoded_bytes())
                .map_err(|_| BpfError::BadPinDir(path.clone()))?;
            sys::obj_pin(link.as_fd(), &c).map_err(|source| BpfError::Syscall {
                call: "BPF_OBJ_PIN",
                source,
            })?;
            self.pinned.push(path);
        }
        Ok(())
    }

    /// Kernel ids of this instance's programs, by program name (for
    /// `bpftool prog show id N`, status output and tests).
    pub fn program_ids(&self) -> Vec<(&'static str, u32)> {
        pin_names()
            .filter_map(|name| {
                let info = self.ebpf.program(name)?.info().ok()?;
                Some((name, info.id()))
            })
            .collect()
    }

    /// The processes selected right now (the sticky set), with why and by
    /// which selector (`kya_common::maps::SelEntry`). For status output and
    /// tests.
    pub fn selected_processes(&self) -> Result<BTreeMap<u32, SelEntry>, BpfError> {
        let mut out = BTreeMap::new();
        // bounded: a key deleted mid-walk (process exit) makes the kernel
        // restart the walk from the first key
        for key in self.maps.tgids.keys().take(2 * KYA_MAX_SEL_TGIDS as usize) {
            let tgid = key.map_err(map_err(m::SEL_TGIDS))?;
            // an entry can vanish between keys() and get() (process exit)
            if let Ok(reason) = self.maps.tgids.get(&tgid, 0) {
                out.insert(tgid, reason);
            }
        }
        Ok(out)
    }

    /// Is the running process `tgid` selected, as the kernel judges it: in
    /// the sticky selection (it matched a selector, or descends from a process
    /// that did, and has not exited), or matching a selector now (its uids,
    /// its cgroup or an ancestor, its executable) though no hook has seen it
    /// yet. The second check reads `/proc` (blocking); a process that cannot
    /// be read (gone, a kernel thread) is an error, not "unselected".
    pub fn is_selected(&self, tgid: u32) -> Result<bool, BpfError> {
        if self.maps.has_tgid(tgid)? {
            return Ok(true);
        }
        let facts = selection_facts(Path::new("/proc"), &self.cgroup2, tgid)?;
        facts_selected(&facts, &self.maps)
    }

    /// The cookie of the host's network namespace (where the daemon and its
    /// host listener are); 0 when the kernel cannot tell namespaces apart,
    /// in which case no other namespace can be served.
    pub fn host_netns_cookie(&self) -> u64 {
        self.netns_cookie
    }

    /// Woken when the kernel refused a connect in a network namespace kya
    /// does not serve yet, or selected a process entering a selected cgroup.
    pub fn netns_wake(&self) -> Arc<tokio::sync::Notify> {
        self.netns_wake.clone()
    }

    /// Tells the kernel that the network namespace `cookie` has a ready kya
    /// listener: its selected processes are redirected there from now on.
    pub fn serve_netns(&mut self, cookie: u64) -> Result<(), BpfError> {
        let entry = NetnsEntry {
            state: KYA_NETNS_READY,
            _reserved: 0,
        };
        self.maps
            .netns
            .insert(cookie, entry, 0)
            .map_err(map_err(m::NETNS))
    }

    /// Forgets a served network namespace: its selected processes' guarded
    /// connects are refused from now on.
    pub fn unserve_netns(&mut self, cookie: u64) -> Result<(), BpfError> {
        remove_if_present(self.maps.netns.remove(&cookie), m::NETNS)
    }

    /// The running kernel and the features kya uses on it.
    pub fn kernel_support(&self) -> &KernelSupport {
        &self.support
    }

    /// The interceptor's handle on the origins of accepted connections.
    pub fn origins(&self) -> OriginTable {
        self.origins.clone()
    }

    /// The kernel side's counters, summed over CPUs.
    pub fn stats(&self) -> Result<KernelStats, BpfError> {
        let mut s = KernelStats {
            events_read: self.events_read.load(Ordering::Relaxed),
            ..KernelStats::default()
        };
        for c in Counter::ALL {
            let per_cpu = self
                .counters
                .get(&(c as u32), 0)
                .map_err(map_err(m::COUNTERS))?;
            s.set(c, per_cpu.iter().copied().fold(0u64, u64::wrapping_add));
        }
        Ok(s)
    }

    /// Starts a tokio task that logs the kernel's events with `tracing`.
    /// Needs a running tokio runtime; callable once.
    pub fn spawn_event_reader(&mut self) -> Result<(), BpfError> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| BpfError::NoRuntime)?;
        let ring = self.events.take().ok_or(BpfError::ReaderRunning)?;
        let counter = self.events_read.clone();
        let netns_wake = self.netns_wake.clone();
        let exes = self.exe_names.clone();
        let exe_path = move |k: ExeKey| {
            exes.read()
                .ok()
                .and_then(|m| m.get(&k).map(|p| p.display().to_string()))
        };
        let _guard = handle.enter();
        // SAFETY: the RingBuf owns its map fd and is moved into the AsyncFd,
        // so the fd stays open (and is not reused) for the AsyncFd's lifetime.
        let registered = unsafe { tokio::io::unix::AsyncFd::register(ring) };
        let mut afd = match registered {
            Ok(a) => a,
            Err(e) => return Err(BpfError::io("registering the event ring buffer", e.into())),
        };
        self.reader = Some(handle.spawn(async move {
            loop {
                let mut guard = match afd.readable_mut().await {
                    Ok(g) => g,
                    Err(e) => {
                        tracing::error!(error = %e, "kernel event reader stopped");
                        return;
                    }
                };
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    log_event(&item, &exe_path);
                    if matches!(
                        Event::from_bytes(&item).map(|e| e.kind),
                        Some(KYA_EV_NETNS_UNSERVED | KYA_EV_SELECTED_CGROUP)
                    ) {
                        netns_wake.notify_one();
                    }
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                guard.clear_ready();
            }
        }));
        Ok(())
    }

    /// Applies a new selection (exes re-expanded and rescanned, ports and
    /// listen port updated). Pin dir and fail-open cannot change while
    /// running. Processes selected by exec or fork stay selected (selection
    /// only ever widens silently; narrowing it for running processes needs a
    /// restart of those processes).
    pub fn update_selection(&mut self, cfg: &RedirectConfig) -> Result<(), BpfError> {
        cfg.validate()?;
        if cfg.pin_dir != self.pin_dir || cfg.fail_open != self.fail_open {
            tracing::warn!("pin_dir and fail_open changes take effect on restart only");
        }
        let want = cfg.resolve(&self.cgroup2)?;
        let port_changed = want.listen_port != self.applied.listen_port
            || want.all_tcp_ports != self.applied.all_tcp_ports;
        self.apply(want)?;
        if port_changed {
            self.write_config()?;
        }
        self.ensure_script_hook()?;
        self.select_running()
    }

    /// Attaches the script hook once a selected exe is a script (and pins
    /// it if the other links are pinned already). Never detached while
    /// running: it costs time, not correctness.
    fn ensure_script_hook(&mut self) -> Result<(), BpfError> {
        let (name, tp) = SCRIPT_HOOK;
        let wanted = self.applied.exes.values().any(|(f, _)| f.script);
        if !wanted || self.links.iter().any(|(n, _)| *n == name) {
            return Ok(());
        }
        let fd = self.prog_fd(name)?;
        let link =
            sys::raw_tracepoint_open(fd.as_fd(), tp).map_err(|source| BpfError::Syscall {
                call: "BPF_RAW_TRACEPOINT_OPEN",
                source,
            })?;
        if !self.pinned.is_empty() {
            let path = self.pin_dir.join(name);
            let c = CString::new(path.as_os_str().as_encoded_bytes())
                .map_err(|_| BpfError::BadPinDir(path.clone()))?;
            sys::obj_pin(link.as_fd(), &c).map_err(|source| BpfError::Syscall {
                call: "BPF_OBJ_PIN",
                source,
            })?;
            self.pinned.push(path);
        }
        self.links.push((name, link));
        tracing::info!("a selected exe is a script: interpreters that open it are selected");
        Ok(())
    }

    /// Detaches everything and removes the pins and the pin directory: a
    /// clean shutdown leaves nothing in bpffs and nothing attached.
    pub fn shutdown(mut self) -> Result<(), BpfError> {
        if let Some(h) = self.reader.take() {
            h.abort();
        }
        let mut first_err = None;
        for p in self.pinned.drain(..) {
            if let Err(e) = std::fs::remove_file(&p) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    first_err
                        .get_or_insert(BpfError::io(format!("removing pin {}", p.display()), e));
                }
            }
        }
        // closing the last fd of an unpinned link detaches it
        self.links.clear();
        if !self.fail_open {
            match std::fs::remove_dir(&self.pin_dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                // A mount point (the systemd unit binds its pin directory into
                // the service's namespace): its pins are gone, it stays.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => {
                    first_err.get_or_insert(BpfError::io(
                        format!("removing {}", self.pin_dir.display()),
                        e,
                    ));
                }
            }
        }
        tracing::info!(pin_dir = %self.pin_dir.display(), "BPF redirect detached");
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Redirector {
    /// Dropping without [`Redirector::shutdown`] (a panic, an early return)
    /// keeps the pins: that is the fail-closed state, as after a crash.
    fn drop(&mut self) {
        if let Some(h) = self.reader.take() {
            h.abort();
        }
    }
}

/// Pins a kya run left in `dir`: every entry named `kya_*` (the names of
/// this version and of any other, so an upgrade still replaces them), and
/// nothing else, in case `dir` is shared by mistake.
fn stale_pins(dir: &Path) -> Result<Vec<PathBuf>, BpfError> {
    let rd = std::fs::read_dir(dir)
        .map_err(|e| BpfError::io(format!("reading {}", dir.display()), e))?;
    let mut out = Vec::new();
    for entry in rd.flatten() {
        if entry.file_name().to_string_lossy().starts_with("kya_") {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK (newer ones use
/// memcg); raising it is harmless where it no longer matters.
fn raise_memlock() {
    let lim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit struct; failure is only logged.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "could not raise RLIMIT_MEMLOCK");
    }
}

fn remove_if_present(r: Result<(), MapError>, name: &'static str) -> Result<(), BpfError> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(map_err(name)(e)),
    }
}

/// `BPF_NOEXIST` of `bpf_map_update_elem` (UAPI).
const BPF_NOEXIST: u64 = 1;

fn dup_map_fd<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<OwnedFd, BpfError> {
    use aya::maps::IterableMap;
    map.map()
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| BpfError::io(format!("duplicating the {name} fd"), e))
}

/// Loads one program; a verifier refusal names the kernel and carries the
/// verifier's log.
fn load_program(ebpf: &mut Ebpf, name: &'static str, kernel: &str) -> Result<(), BpfError> {
    let prog = ebpf.program_mut(name).ok_or(BpfError::Missing(name))?;
    let r = match prog {
        Program::CgroupSockAddr(p) => p.load(),
        Program::SockOps(p) => p.load(),
        Program::RawTracePoint(p) => p.load(),
        _ => return Err(BpfError::Missing(name)),
    };
    r.map_err(|e| BpfError::Refused {
        kernel: kernel.to_string(),
        name,
        source: Box::new(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> RedirectConfig {
        RedirectConfig {
            ports: vec![443],
            listen_port: 853,
            pin_dir: PathBuf::from("/sys/fs/bpf/kya-unit"),
            ..RedirectConfig::default()
        }
    }

    #[test]
    fn config_validation_refuses_unsafe_settings() {
        assert!(base().validate().is_ok());
        for lp in [0u16, 1024, 8080, u16::MAX] {
            let c = RedirectConfig {
                listen_port: lp,
                ..base()
            };
            assert!(
                matches!(c.validate(), Err(BpfError::BadListenPort(_))),
                "{lp}"
            );
        }
        let c = RedirectConfig {
            ports: vec![],
            ..base()
        };
        assert!(matches!(c.validate(), Err(BpfError::NoPorts)));
        let c = RedirectConfig {
            ports: vec![443, 0],
            ..base()
        };
        assert!(matches!(c.validate(), Err(BpfError::BadPort)));
        let c = RedirectConfig {
            ports: (1..=300).collect(),
            ..base()
        };
        assert!(matches!(c.validate(), Err(BpfError::TooMany { .. })));
        let c = RedirectConfig {
            uids: (0..5000).collect(),
            ..base()
        };
        assert!(matches!(c.validate(), Err(BpfError::TooMany { .. })));
        for pd in ["/sys/fs/bpf", "/", "relative", "/sys/fs/bpf/../bpf"] {
            let c = RedirectConfig {
                pin_dir: pd.into(),
                ..base()
            };
            assert!(matches!(c.validate(), Err(BpfError::BadPinDir(_))), "{pd}");
        }
    }

    #[test]
    fn resolve_refuses_missing_and_escaping_cgroups() {
        let mount = host::cgroup2_mount().unwrap();
        let c = RedirectConfig {
            cgroups: vec!["/kya-no-such-cgroup".into()],
            ..base()
        };
        assert!(matches!(
            c.resolve(&mount),
            Err(BpfError::CgroupNotFound { .. })
        ));
        let c = RedirectConfig {
            cgroups: vec!["/../x".into()],
            ..base()
        };
        assert!(matches!(c.resolve(&mount), Err(BpfError::BadCgroupPath(_))));
        let c = RedirectConfig {
            cgroups: vec!["/".into()],
            uids: vec![5, 5],
            ..base()
        };
        let c = RedirectConfig {
            pids: vec![0, std::process::id(), u32::MAX],
            ..c
        };
        let r = c.resolve(&mount).unwrap();
        assert_eq!(
            r.pids,
            [(std::process::id(), 1)].into(),
            "pids that do not exist are not selected (the index is the position given)"
        );
        assert_eq!(r.cgroups.len(), 1);
        assert_eq!(r.uids.len(), 1, "duplicates collapse");
    }

    #[test]
    fn handles_can_move_across_threads() {
        fn send<T: Send>() {}
        fn send_sync_clone<T: Send + Sync + Clone>() {}
        send::<Redirector>();
        send_sync_clone::<OriginTable>();
        send_sync_clone::<super::super::Origin>();
    }

    #[test]
    fn stale_pins_are_only_kya_entries() {
        let d = tempfile::tempdir().unwrap();
        for f in [
            "kya_connect4",
            "kya_old_renamed_prog",
            "cilium_thing",
            "kyanot",
        ] {
            std::fs::write(d.path().join(f), b"").unwrap();
        }
        let got: Vec<_> = stale_pins(d.path())
            .unwrap()
            .into_iter()
            .map(|p| p.file_name().unwrap().to_owned())
            .collect();
        assert_eq!(got, ["kya_connect4", "kya_old_renamed_prog"]);
        assert!(stale_pins(&d.path().join("missing")).is_err());
    }

    #[test]
    fn pin_names_are_unique() {
        let names: BTreeSet<_> = pin_names().collect();
        assert!(
            names.iter().all(|n| n.starts_with("kya_")),
            "stale_pins finds kya_* only"
        );
        assert_eq!(
            names.len(),
            CGROUP_PROGRAMS.len() + TRACEPOINT_PROGRAMS.len() + 1
        );
    }
}
