//! Turning the operator's selection (paths, globs, pids) into map contents:
//! executables and scripts by (device, inode), the names scripts are run by,
//! and the processes already running when kya starts, which the kernel's
//! hooks could not see (they cover everything after).

use super::BpfError;
use kya_common::maps::{
    kernel_dev, name_hash, ExeKey, SelEntry, KYA_KIND_CGROUP, KYA_KIND_EXE, KYA_KIND_PID,
    KYA_KIND_UID, KYA_SEL_CGROUP, KYA_SEL_FORK, KYA_SEL_PID, KYA_SEL_SCAN, KYA_SEL_SCRIPT,
    KYA_SEL_UID,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Bounds on a glob walk (a glob must not make kya walk the whole disk).
const MAX_GLOB_VISITS: usize = 100_000;
const MAX_GLOB_DEPTH: usize = 16;
/// Bound on the ancestry walk (pid namespaces nest, loops cannot exist, but
/// a racing /proc can show anything).
const MAX_ANCESTRY: usize = 128;

fn has_glob_meta(s: &str) -> bool {
    s.contains(['*', '?', '[', '{'])
}

/// Expands exe patterns into existing regular files. A literal path is kept
/// even if it does not exist yet (it is reported by [`exe_keys`]); a glob
/// expands to what matches now (the daemon rescans on reload).
pub(super) fn expand_exes(patterns: &[String]) -> Result<BTreeSet<PathBuf>, BpfError> {
    let mut out = BTreeSet::new();
    for pat in patterns {
        if !pat.starts_with('/') || pat.contains('\0') {
            return Err(BpfError::BadExe(pat.clone()));
        }
        if !has_glob_meta(pat) {
            out.insert(PathBuf::from(pat));
            continue;
        }
        let glob = globset::GlobBuilder::new(pat)
            .literal_separator(true)
            .build()
            .map_err(|source| BpfError::Glob {
                pattern: pat.clone(),
                source,
            })?
            .compile_matcher();
        // walk from the longest literal directory prefix
        let mut base = PathBuf::from("/");
        let comps: Vec<&str> = pat.split('/').filter(|c| !c.is_empty()).collect();
        let mut depth_left = 0;
        for (i, c) in comps.iter().enumerate() {
            if has_glob_meta(c) {
                depth_left = if pat.contains("**") {
                    MAX_GLOB_DEPTH
                } else {
                    comps.len() - i
                };
                break;
            }
            base.push(c);
        }
        let mut visits = 0;
        walk(&base, depth_left, &mut visits, &mut |p| {
            if glob.is_match(p) && p.is_file() {
                out.insert(p.to_path_buf());
            }
        });
        if visits >= MAX_GLOB_VISITS {
            tracing::warn!(pattern = %pat, "exe glob walk stopped at {MAX_GLOB_VISITS} entries");
        }
    }
    Ok(out)
}

fn walk(dir: &Path, depth_left: usize, visits: &mut usize, f: &mut dyn FnMut(&Path)) {
    if depth_left == 0 {
        return;
    }
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in rd.flatten() {
        *visits += 1;
        if *visits >= MAX_GLOB_VISITS {
            return;
        }
        let p = entry.path();
        f(&p);
        // do not follow directory symlinks (loops); files behind symlinks are
        // matched by f through is_file()
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            walk(&p, depth_left - 1, visits, f);
        }
    }
}

/// A selected file: where it was found and whether it is a script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ExeFile {
    pub path: PathBuf,
    /// Not an ELF binary: run by an interpreter that opens it.
    pub script: bool,
}

/// The (device, inode) of each executable, following symlinks, so that
/// `/usr/bin/python3 -> python3.11` selects the one binary. Paths that do
/// not exist are logged and skipped (nothing can exec them right now).
pub(super) fn exe_keys(paths: &BTreeSet<PathBuf>) -> BTreeMap<ExeKey, ExeFile> {
    let mut out = BTreeMap::new();
    for p in paths {
        match std::fs::metadata(p) {
            Ok(md) if md.is_file() => {
                out.insert(
                    ExeKey {
                        dev: kernel_dev(md.dev()),
                        ino: md.ino(),
                    },
                    ExeFile {
                        path: p.clone(),
                        script: is_script(p),
                    },
                );
            }
            Ok(_) => {
                tracing::warn!(path = %p.display(), "selected exe is not a regular file; ignored")
            }
            Err(e) => {
                tracing::warn!(path = %p.display(), error = %e, "selected exe not found; ignored")
            }
        }
    }
    out
}

/// A file that does not start with the ELF magic: a `#!` script, or a
/// source file run as `python3 FILE` / `node FILE`. Unreadable: treated as a
/// script (the script hooks only ever select more).
fn is_script(p: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    match std::fs::File::open(p).and_then(|mut f| f.read_exact(&mut magic)) {
        Ok(()) => &magic != b"\x7fELF",
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => true,
        Err(_) => true,
    }
}

/// The hashes of the names a selected script can be run by: the last
/// component of the path the operator gave (`/usr/local/bin/claude`, a
/// symlink) and of the file it resolves to (`cli.js`).
pub(super) fn script_names<'a>(files: impl Iterator<Item = &'a ExeFile>) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for f in files.filter(|f| f.script) {
        let real = std::fs::canonicalize(&f.path).ok();
        for p in std::iter::once(f.path.as_path()).chain(real.as_deref()) {
            if let Some(name) = p.file_name() {
                out.insert(name_hash(name.as_encoded_bytes()));
            }
        }
    }
    out
}

/// One process seen in /proc.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(super) struct ProcEntry {
    pub tgid: u32,
    pub ppid: u32,
    pub exe: Option<ExeKey>,
    /// `/proc/PID/exe`, for the kernel's exe path table.
    pub exe_path: Option<PathBuf>,
    /// Real uid.
    pub uid: Option<u32>,
    /// cgroup v2 path (`/a/b`).
    pub cgroup: Option<String>,
    /// Files named by its command-line arguments (after argv[0]), resolved
    /// against its working directory: the script an interpreter runs.
    pub args: Vec<ExeKey>,
}

/// The parent pid from `/proc/PID/stat` (`pid (comm) state ppid ...`). The
/// comm may contain spaces and parentheses, so parse after the last ')'.
pub(super) fn parse_stat_ppid(stat: &str) -> Option<u32> {
    crate::procinfo::parse_stat_ppid(stat.as_bytes())
}

/// Command-line arguments looked at for a script (an interpreter's options
/// come first, the script soon after).
const MAX_SCRIPT_ARGS: usize = 8;

fn key_of(md: &std::fs::Metadata) -> ExeKey {
    ExeKey {
        dev: kernel_dev(md.dev()),
        ino: md.ino(),
    }
}

/// Every process in /proc (threads are not listed at the top level).
/// `with_args`: also resolve command-line arguments to files (only needed
/// when a script may be selected).
pub(super) fn scan_proc(with_args: bool) -> Vec<ProcEntry> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in rd.flatten() {
        let Some(tgid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{tgid}/stat")) else {
            continue; // exited meanwhile
        };
        let Some(ppid) = parse_stat_ppid(&stat) else {
            continue;
        };
        let dir = PathBuf::from(format!("/proc/{tgid}"));
        let exe = std::fs::metadata(dir.join("exe"))
            .ok()
            .map(|md| key_of(&md));
        let exe_path = std::fs::read_link(dir.join("exe")).ok();
        let uid = std::fs::read(dir.join("status"))
            .ok()
            .and_then(|b| crate::procinfo::parse_status_uid(&b));
        let cgroup = crate::procinfo::cgroup_of(tgid);
        let args = if with_args {
            script_args(&dir)
        } else {
            Vec::new()
        };
        out.push(ProcEntry {
            tgid,
            ppid,
            exe,
            exe_path,
            uid,
            cgroup,
            args,
        });
    }
    out
}

fn script_args(dir: &Path) -> Vec<ExeKey> {
    let Ok(cmdline) = std::fs::read(dir.join("cmdline")) else {
        return Vec::new();
    };
    let cwd = dir.join("cwd");
    crate::procinfo::parse_cmdline(&cmdline)
        .iter()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .take(MAX_SCRIPT_ARGS)
        .filter_map(|a| {
            let p = Path::new(a);
            let full = if p.is_absolute() {
                p.to_path_buf()
            } else {
                cwd.join(p)
            };
            std::fs::metadata(full)
                .ok()
                .filter(|md| md.is_file())
                .map(|md| key_of(&md))
        })
        .collect()
}

/// The selectors, resolved, with each one's index in the operator's list.
#[derive(Debug, Default, Clone)]
pub(super) struct Wanted<'a> {
    pub exes: BTreeMap<ExeKey, (&'a ExeFile, u32)>,
    pub pids: BTreeMap<u32, u32>,
    pub uids: BTreeMap<u32, u32>,
    /// (cgroup path, index)
    pub cgroups: Vec<(&'a str, u32)>,
}

fn under_cgroup(path: &str, sel: &str) -> bool {
    let sel = sel.trim_end_matches('/');
    sel.is_empty() || path == sel || path.strip_prefix(sel).is_some_and(|r| r.starts_with('/'))
}

/// The tgids to select among running processes, and which selector holds
/// each: the operator's pids (PID), those running a selected executable
/// (SCAN) or a selected script named on their command line (SCRIPT), those
/// with a selected uid (UID) or in a selected cgroup (CGROUP), and every
/// descendant of any of them (FORK, holding its ancestor's selector), as
/// the kernel's hooks would have done had kya been running all along.
pub(super) fn running_selection(procs: &[ProcEntry], want: &Wanted<'_>) -> BTreeMap<u32, SelEntry> {
    let entry = |reason, kind, index| SelEntry {
        reason,
        kind,
        _pad: 0,
        index,
    };
    let mut sel: BTreeMap<u32, SelEntry> = BTreeMap::new();
    let parent: HashMap<u32, u32> = procs.iter().map(|p| (p.tgid, p.ppid)).collect();
    for (&pid, &i) in &want.pids {
        sel.insert(pid, entry(KYA_SEL_PID, KYA_KIND_PID, i));
    }
    for p in procs {
        if sel.contains_key(&p.tgid) {
            continue;
        }
        let found = if let Some((_, i)) = p.exe.and_then(|k| want.exes.get(&k)) {
            Some(entry(KYA_SEL_SCAN, KYA_KIND_EXE, *i))
        } else if let Some((_, i)) = p
            .args
            .iter()
            .find_map(|k| want.exes.get(k).filter(|(f, _)| f.script))
        {
            Some(entry(KYA_SEL_SCRIPT, KYA_KIND_EXE, *i))
        } else if let Some(i) = p.uid.and_then(|u| want.uids.get(&u)) {
            Some(entry(KYA_SEL_UID, KYA_KIND_UID, *i))
        } else {
            p.cgroup.as_deref().and_then(|cg| {
                want.cgroups
                    .iter()
                    .find(|(c, _)| under_cgroup(cg, c))
                    .map(|(_, i)| entry(KYA_SEL_CGROUP, KYA_KIND_CGROUP, *i))
            })
        };
        if let Some(e) = found {
            sel.insert(p.tgid, e);
        }
    }
    let roots = sel.clone();
    for p in procs {
        if sel.contains_key(&p.tgid) {
            continue;
        }
        let mut cur = p.ppid;
        for _ in 0..MAX_ANCESTRY {
            if cur == 0 || cur == p.tgid {
                break;
            }
            if let Some(root) = roots.get(&cur) {
                sel.insert(
                    p.tgid,
                    SelEntry {
                        reason: KYA_SEL_FORK,
                        ..*root
                    },
                );
                break;
            }
            match parent.get(&cur) {
                Some(&pp) => cur = pp,
                None => break,
            }
        }
    }
    sel
}

/// Lookups in the selection maps, as the kernel's `kya_task_selected` makes
/// them (the maps, or sets standing in for them in tests).
pub(crate) trait SelectionMaps {
    fn has_tgid(&self, tgid: u32) -> Result<bool, BpfError>;
    fn has_uid(&self, uid: u32) -> Result<bool, BpfError>;
    fn has_cgroup(&self, id: u64) -> Result<bool, BpfError>;
    fn has_exe(&self, key: &ExeKey) -> Result<bool, BpfError>;
}

/// What the selection maps are asked about one process, read from `/proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SelectionFacts {
    pub tgid: u32,
    /// Real, effective, saved and filesystem uids (`Uid:` of `/proc/PID/status`).
    pub uids: Vec<u32>,
    /// The process's cgroup and every ancestor up to the root, by kernel id.
    pub cgroup_ids: Vec<u64>,
    /// `None` when `/proc/PID/exe` may not be read (ptrace access is denied,
    /// e.g. for pid 1 in a container): a process running a selected
    /// executable is in the tgid map anyway (exec tracepoint, start-up scan).
    pub exe: Option<ExeKey>,
}

/// Read the facts of `tgid` under `proc_root` (`/proc`), resolving its
/// cgroup path against the cgroup2 mount. Anything unreadable is an error:
/// a process kya cannot describe is not "unselected".
pub(crate) fn selection_facts(
    proc_root: &Path,
    cgroup2: &Path,
    tgid: u32,
) -> Result<SelectionFacts, BpfError> {
    let dir = proc_root.join(tgid.to_string());
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read(&path).map_err(|e| BpfError::io(format!("reading {}", path.display()), e))
    };
    let status = read("status")?;
    let uids = parse_status_uids(&status).ok_or_else(|| {
        BpfError::io(
            format!("/proc/{tgid}/status"),
            std::io::Error::new(std::io::ErrorKind::InvalidData, "no Uid: line"),
        )
    })?;
    let cgroup_text = read("cgroup")?;
    let cgroup = crate::procinfo::parse_cgroup_v2(&cgroup_text)
        .filter(|p| p.starts_with('/'))
        .ok_or(BpfError::NoCgroupV2Line { pid: tgid })?;
    let mut cgroup_ids = Vec::new();
    let mut prefix = String::new();
    cgroup_ids.push(super::host::cgroup_id(cgroup2, "/")?);
    for comp in cgroup
        .trim_end_matches(" (deleted)")
        .split('/')
        .filter(|c| !c.is_empty())
    {
        prefix.push('/');
        prefix.push_str(comp);
        cgroup_ids.push(super::host::cgroup_id(cgroup2, &prefix)?);
    }
    let exe_path = dir.join("exe");
    let exe = match std::fs::metadata(&exe_path) {
        Ok(md) => Some(ExeKey {
            dev: kernel_dev(md.dev()),
            ino: md.ino(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => None,
        Err(e) => return Err(BpfError::io(format!("reading {}", exe_path.display()), e)),
    };
    Ok(SelectionFacts {
        tgid,
        uids,
        cgroup_ids,
        exe,
    })
}

/// Is a process with these facts selected: by tgid (pid, exec, fork, scan),
/// by any of its uids, by its cgroup or an ancestor cgroup, or by running a
/// selected executable.
pub(crate) fn facts_selected(
    facts: &SelectionFacts,
    maps: &impl SelectionMaps,
) -> Result<bool, BpfError> {
    if maps.has_tgid(facts.tgid)? {
        return Ok(true);
    }
    if let Some(exe) = &facts.exe {
        if maps.has_exe(exe)? {
            return Ok(true);
        }
    }
    for uid in &facts.uids {
        if maps.has_uid(*uid)? {
            return Ok(true);
        }
    }
    for id in &facts.cgroup_ids {
        if maps.has_cgroup(*id)? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The four uids of the `Uid:` line of `/proc/PID/status`.
fn parse_status_uids(bytes: &[u8]) -> Option<Vec<u32>> {
    let text = std::str::from_utf8(bytes).ok()?;
    let rest = text.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    let uids: Vec<u32> = rest
        .split_ascii_whitespace()
        .map(|n| n.parse().ok())
        .collect::<Option<_>>()?;
    (!uids.is_empty() && uids.len() <= 4).then_some(uids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_ppid_survives_hostile_comms() {
        assert_eq!(parse_stat_ppid("42 (python3) S 7 42 42 0"), Some(7));
        assert_eq!(parse_stat_ppid("42 (a) b) c (d) R 9 1 1"), Some(9));
        assert_eq!(parse_stat_ppid("42 (x\ny) S 3 1"), Some(3));
        assert_eq!(parse_stat_ppid("42 (noclose S 7"), None);
        assert_eq!(parse_stat_ppid("42 (x) S"), None);
        assert_eq!(parse_stat_ppid("42 (x) S -1"), None);
        assert_eq!(parse_stat_ppid(""), None);
    }

    #[test]
    fn globs_expand_to_files_and_literals_stay() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("bin/sub")).unwrap();
        for f in ["bin/agent-a", "bin/agent-b", "bin/other", "bin/sub/agent-c"] {
            std::fs::write(root.join(f), b"#!/bin/sh\n").unwrap();
        }
        std::fs::create_dir(root.join("bin/agent-dir")).unwrap();
        let pat = format!("{}/bin/agent-*", root.display());
        let got = expand_exes(&[pat]).unwrap();
        let want: BTreeSet<PathBuf> = [root.join("bin/agent-a"), root.join("bin/agent-b")].into();
        assert_eq!(got, want, "* must not cross '/' nor match directories");

        let deep = expand_exes(&[format!("{}/**/agent-c", root.display())]).unwrap();
        assert_eq!(deep, [root.join("bin/sub/agent-c")].into());

        let lit = expand_exes(&["/nonexistent/agent".to_string()]).unwrap();
        assert_eq!(lit, [PathBuf::from("/nonexistent/agent")].into());
        assert!(
            exe_keys(&lit).is_empty(),
            "a missing literal selects nothing"
        );
    }

    #[test]
    fn bad_exe_patterns_are_refused() {
        for bad in ["relative/agent", "", "/a\0b"] {
            assert!(
                matches!(expand_exes(&[bad.to_string()]), Err(BpfError::BadExe(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            expand_exes(&["/a/[".to_string()]),
            Err(BpfError::Glob { .. })
        ));
    }

    #[test]
    fn symlinks_resolve_to_one_key() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("python3.11");
        std::fs::write(&real, b"x").unwrap();
        let link = d.path().join("python3");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let keys = exe_keys(&[real, link].into());
        assert_eq!(keys.len(), 1);
    }

    fn proc(tgid: u32, ppid: u32, ino: Option<u64>) -> ProcEntry {
        ProcEntry {
            tgid,
            ppid,
            exe: ino.map(|ino| ExeKey { dev: 1, ino }),
            ..ProcEntry::default()
        }
    }

    #[test]
    fn running_selection_follows_descendants_not_strangers() {
        let procs = [
            proc(1, 0, Some(1)),
            proc(10, 1, Some(99)), // agent
            proc(11, 10, Some(2)), // its child
            proc(12, 11, Some(3)), // grandchild
            proc(20, 1, Some(2)),  // stranger
            proc(30, 1, None),     // kernel thread / no exe
            proc(40, 41, Some(2)), // ppid cycle (racy /proc)
            proc(41, 40, Some(2)),
            proc(50, 7, Some(2)), // child of pid 7
        ];
        let agent = ExeFile {
            path: PathBuf::from("/agent"),
            script: false,
        };
        let want = Wanted {
            exes: [(ExeKey { dev: 1, ino: 99 }, (&agent, 3))].into(),
            pids: [(7, 0)].into(),
            ..Wanted::default()
        };
        let sel = running_selection(&procs, &want);
        let e = |reason, kind, index| SelEntry {
            reason,
            kind,
            _pad: 0,
            index,
        };
        let want: BTreeMap<u32, SelEntry> = [
            (7, e(KYA_SEL_PID, KYA_KIND_PID, 0)),
            (10, e(KYA_SEL_SCAN, KYA_KIND_EXE, 3)),
            (11, e(KYA_SEL_FORK, KYA_KIND_EXE, 3)),
            (12, e(KYA_SEL_FORK, KYA_KIND_EXE, 3)),
            (50, e(KYA_SEL_FORK, KYA_KIND_PID, 0)),
        ]
        .into();
        assert_eq!(sel, want);
    }

    /// Selection maps as sets.
    #[derive(Default)]
    struct Sets {
        tgids: BTreeSet<u32>,
        uids: BTreeSet<u32>,
        cgroups: BTreeSet<u64>,
        exes: BTreeSet<ExeKey>,
    }

    impl SelectionMaps for Sets {
        fn has_tgid(&self, tgid: u32) -> Result<bool, BpfError> {
            Ok(self.tgids.contains(&tgid))
        }
        fn has_uid(&self, uid: u32) -> Result<bool, BpfError> {
            Ok(self.uids.contains(&uid))
        }
        fn has_cgroup(&self, id: u64) -> Result<bool, BpfError> {
            Ok(self.cgroups.contains(&id))
        }
        fn has_exe(&self, key: &ExeKey) -> Result<bool, BpfError> {
            Ok(self.exes.contains(key))
        }
    }

    /// A fake /proc and cgroup2 mount: processes with a parent, uids, a
    /// cgroup path and an executable.
    struct FakeHost {
        proc_root: tempfile::TempDir,
        cgroup2: tempfile::TempDir,
        bin: tempfile::TempDir,
    }

    impl FakeHost {
        fn new() -> Self {
            Self {
                proc_root: tempfile::tempdir().unwrap(),
                cgroup2: tempfile::tempdir().unwrap(),
                bin: tempfile::tempdir().unwrap(),
            }
        }

        fn process(&self, pid: u32, ppid: u32, uid: &str, cgroup: &str, exe: &str) {
            let dir = self.proc_root.path().join(pid.to_string());
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("stat"), format!("{pid} (p) S {ppid} 1 1")).unwrap();
            std::fs::write(
                dir.join("status"),
                format!("Name:\tp\nUid:\t{uid}\nGid:\t0\n"),
            )
            .unwrap();
            std::fs::write(dir.join("cgroup"), format!("0::{cgroup}\n")).unwrap();
            std::fs::create_dir_all(self.cgroup2.path().join(cgroup.trim_start_matches('/')))
                .unwrap();
            let exe_path = self.bin.path().join(exe);
            if !exe_path.exists() {
                std::fs::write(&exe_path, b"x").unwrap();
            }
            std::os::unix::fs::symlink(&exe_path, dir.join("exe")).unwrap();
        }

        fn cgroup_id(&self, rel: &str) -> u64 {
            super::super::host::cgroup_id(self.cgroup2.path(), rel).unwrap()
        }

        fn exe_key(&self, exe: &str) -> ExeKey {
            let md = std::fs::metadata(self.bin.path().join(exe)).unwrap();
            ExeKey {
                dev: kernel_dev(md.dev()),
                ino: md.ino(),
            }
        }

        fn selected(&self, pid: u32, maps: &Sets) -> Result<bool, BpfError> {
            let facts = selection_facts(self.proc_root.path(), self.cgroup2.path(), pid)?;
            facts_selected(&facts, maps)
        }
    }

    #[test]
    fn every_selector_is_asked_about_a_process() {
        let h = FakeHost::new();
        h.process(1, 0, "0\t0\t0\t0", "/init.scope", "init");
        h.process(20, 1, "1000\t1000\t1000\t1000", "/agents/bot/sub", "agent");
        h.process(21, 1, "1000\t0\t0\t0", "/user/shell", "sh");
        let none = Sets::default();
        assert!(!h.selected(20, &none).unwrap());
        let by_tgid = Sets {
            tgids: [20].into(),
            ..Default::default()
        };
        assert!(h.selected(20, &by_tgid).unwrap());
        assert!(!h.selected(21, &by_tgid).unwrap());
        // The cgroup itself or any ancestor of it, as the kernel checks.
        for rel in ["/agents/bot/sub", "/agents/bot", "/agents"] {
            let by_cgroup = Sets {
                cgroups: [h.cgroup_id(rel)].into(),
                ..Default::default()
            };
            assert!(h.selected(20, &by_cgroup).unwrap(), "{rel}");
            assert!(!h.selected(21, &by_cgroup).unwrap(), "{rel}");
        }
        // Any of the real, effective, saved, fs uids (a setuid helper of an agent).
        let by_uid = Sets {
            uids: [1000].into(),
            ..Default::default()
        };
        assert!(h.selected(21, &by_uid).unwrap());
        assert!(!h.selected(1, &by_uid).unwrap());
        let by_exe = Sets {
            exes: [h.exe_key("agent")].into(),
            ..Default::default()
        };
        assert!(h.selected(20, &by_exe).unwrap());
        assert!(!h.selected(21, &by_exe).unwrap());
    }

    #[test]
    fn unreadable_processes_are_errors_not_unselected() {
        let h = FakeHost::new();
        h.process(20, 1, "1000 1000 1000 1000", "/a", "agent");
        let none = Sets::default();
        assert!(h.selected(99, &none).is_err(), "gone");
        let dir = h.proc_root.path().join("20");
        for (file, text) in [
            ("status", "Name: x\n"),
            ("status", "Uid:\tlots\n"),
            ("cgroup", "1:cpu:/x\n"),
            ("cgroup", "0::relative\n"),
            ("cgroup", "0::/not/a/cgroup\n"),
        ] {
            let keep = std::fs::read(dir.join(file)).unwrap();
            std::fs::write(dir.join(file), text).unwrap();
            assert!(h.selected(20, &none).is_err(), "{file}: {text:?}");
            std::fs::write(dir.join(file), keep).unwrap();
        }
        std::fs::remove_file(dir.join("exe")).unwrap();
        assert!(h.selected(20, &none).is_err(), "no exe");
    }

    /// The gate over this selection: a caller in a child cgroup of a selected
    /// cgroup is refused, and so is its descendant that moved out of it.
    #[test]
    fn the_control_gate_refuses_a_selected_cgroup_and_its_descendants() {
        use crate::control::guard::{Gate, Refusal, SelectionOracle, SelectionUnknown};
        struct Oracle(FakeHost, Sets);
        impl SelectionOracle for Oracle {
            fn is_selected(&self, tgid: u32) -> Result<bool, SelectionUnknown> {
                self.0
                    .selected(tgid, &self.1)
                    .map_err(|e| SelectionUnknown(e.to_string()))
            }
        }
        let h = FakeHost::new();
        h.process(1, 0, "0 0 0 0", "/init.scope", "init");
        h.process(10, 1, "1000 1000 1000 1000", "/agents/bot/sub", "agent");
        h.process(11, 10, "1000 1000 1000 1000", "/escaped", "kya");
        h.process(12, 1, "1000 1000 1000 1000", "/user/shell", "kya");
        let maps = Sets {
            cgroups: [h.cgroup_id("/agents")].into(),
            ..Default::default()
        };
        let root = h.proc_root.path().to_path_buf();
        let gate = Gate::new(std::sync::Arc::new(Oracle(h, maps))).with_proc_root(root);
        assert_eq!(
            gate.check(Some(10)),
            Err(Refusal::Selected {
                peer: 10,
                selected: 10
            })
        );
        assert_eq!(
            gate.check(Some(11)),
            Err(Refusal::Selected {
                peer: 11,
                selected: 10
            })
        );
        assert!(gate.check(Some(12)).is_ok());
        assert!(matches!(
            gate.check(Some(13)),
            Err(Refusal::Unresolvable { .. })
        ));
    }

    #[test]
    fn running_selection_covers_uids_cgroups_and_scripts() {
        let script = ExeFile {
            path: PathBuf::from("/opt/agent.py"),
            script: true,
        };
        let binary = ExeFile {
            path: PathBuf::from("/opt/tool"),
            script: false,
        };
        let mut by_uid = proc(100, 1, Some(5));
        by_uid.uid = Some(1001);
        let mut in_cg = proc(101, 1, Some(5));
        in_cg.cgroup = Some("/agents/a/sub".into());
        let mut sibling_cg = proc(102, 1, Some(5));
        sibling_cg.cgroup = Some("/agents/ab".into());
        let mut interp = proc(103, 1, Some(5));
        interp.args = vec![ExeKey { dev: 1, ino: 77 }];
        let mut cat_tool = proc(104, 1, Some(5));
        cat_tool.args = vec![ExeKey { dev: 1, ino: 78 }];
        let kid = proc(105, 100, Some(6));
        let procs = [by_uid, in_cg, sibling_cg, interp, cat_tool, kid];
        let want = Wanted {
            exes: [
                (ExeKey { dev: 1, ino: 77 }, (&script, 0)),
                (ExeKey { dev: 1, ino: 78 }, (&binary, 1)),
            ]
            .into(),
            uids: [(1001, 2)].into(),
            cgroups: vec![("/agents/a", 4)],
            ..Wanted::default()
        };
        let sel = running_selection(&procs, &want);
        let got: Vec<(u32, u8, u8, u32)> = sel
            .iter()
            .map(|(t, e)| (*t, e.reason, e.kind, e.index))
            .collect();
        assert_eq!(
            got,
            [
                (100, KYA_SEL_UID, KYA_KIND_UID, 2),
                (101, KYA_SEL_CGROUP, KYA_KIND_CGROUP, 4),
                (103, KYA_SEL_SCRIPT, KYA_KIND_EXE, 0),
                (105, KYA_SEL_FORK, KYA_KIND_UID, 2),
            ],
            "a binary named on a command line selects nobody; /agents/ab is not under /agents/a"
        );
        assert!(under_cgroup("/x", "/"));
        assert!(under_cgroup("/a", "/a/"));
    }

    #[test]
    fn scripts_are_told_from_binaries_and_named_by_link_and_target() {
        let d = tempfile::tempdir().unwrap();
        let cli = d.path().join("cli.js");
        std::fs::write(&cli, b"#!/usr/bin/env node\n").unwrap();
        let link = d.path().join("claude");
        std::os::unix::fs::symlink(&cli, &link).unwrap();
        let elf = d.path().join("bin");
        std::fs::write(&elf, b"\x7fELF\x02\x01").unwrap();
        let empty = d.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        let keys = exe_keys(&[link.clone(), elf.clone(), empty].into());
        let files: Vec<&ExeFile> = keys.values().collect();
        assert_eq!(files.iter().filter(|f| f.script).count(), 2);
        assert!(files.iter().any(|f| f.path == elf && !f.script));
        let names = script_names(keys.values());
        assert!(names.contains(&name_hash(b"claude")));
        assert!(names.contains(&name_hash(b"cli.js")));
        assert!(names.contains(&name_hash(b"empty")));
        assert!(
            !names.contains(&name_hash(b"bin")),
            "binaries have no script names"
        );
    }

    #[test]
    fn scanning_proc_finds_this_process() {
        let me = std::process::id();
        let procs = scan_proc(true);
        let p = procs.iter().find(|p| p.tgid == me).unwrap();
        assert!(p.exe.is_some());
        assert_eq!(p.uid, Some(nix::unistd::getuid().as_raw()));
        assert!(p.cgroup.as_deref().is_some_and(|c| c.starts_with('/')));
        assert_eq!(p.ppid, std::os::unix::process::parent_id());
    }
}
