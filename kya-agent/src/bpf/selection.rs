//! Turning the operator's selection (paths, globs, pids) into map contents:
//! executables by (device, inode), and the processes already running when
//! kya starts (the kernel's exec/fork tracepoints cover everything after).

use super::BpfError;
use kya_common::maps::{kernel_dev, ExeKey, KYA_SEL_FORK, KYA_SEL_PID, KYA_SEL_SCAN};
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
pub fn expand_exes(patterns: &[String]) -> Result<BTreeSet<PathBuf>, BpfError> {
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

/// The (device, inode) of each executable, following symlinks, so that
/// `/usr/bin/python3 -> python3.11` selects the one binary. Paths that do
/// not exist are logged and skipped (nothing can exec them right now).
pub fn exe_keys(paths: &BTreeSet<PathBuf>) -> BTreeMap<ExeKey, PathBuf> {
    let mut out = BTreeMap::new();
    for p in paths {
        match std::fs::metadata(p) {
            Ok(md) if md.is_file() => {
                out.insert(
                    ExeKey {
                        dev: kernel_dev(md.dev()),
                        ino: md.ino(),
                    },
                    p.clone(),
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

/// One process seen in /proc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcEntry {
    pub tgid: u32,
    pub ppid: u32,
    pub exe: Option<ExeKey>,
}

/// The parent pid from `/proc/PID/stat` (`pid (comm) state ppid ...`). The
/// comm may contain spaces and parentheses, so parse after the last ')'.
pub fn parse_stat_ppid(stat: &str) -> Option<u32> {
    crate::procinfo::parse_stat_ppid(stat.as_bytes())
}

/// Every process in /proc (threads are not listed at the top level).
pub fn scan_proc() -> Vec<ProcEntry> {
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
        let exe = std::fs::metadata(format!("/proc/{tgid}/exe"))
            .ok()
            .map(|md| ExeKey {
                dev: kernel_dev(md.dev()),
                ino: md.ino(),
            });
        out.push(ProcEntry { tgid, ppid, exe });
    }
    out
}

/// The tgids to select among running processes, with the reason: those
/// running a selected exe (SCAN), the operator's pids (PID), and every
/// descendant of either (FORK), as the fork tracepoint would have done had
/// kya been running when they were forked.
pub fn running_selection(
    procs: &[ProcEntry],
    exes: &BTreeMap<ExeKey, PathBuf>,
    pids: &BTreeSet<u32>,
) -> BTreeMap<u32, u8> {
    let mut sel: BTreeMap<u32, u8> = BTreeMap::new();
    let parent: HashMap<u32, u32> = procs.iter().map(|p| (p.tgid, p.ppid)).collect();
    for p in procs {
        if p.exe.is_some_and(|k| exes.contains_key(&k)) {
            sel.insert(p.tgid, KYA_SEL_SCAN);
        }
    }
    for &pid in pids {
        sel.insert(pid, KYA_SEL_PID);
    }
    let roots: BTreeSet<u32> = sel.keys().copied().collect();
    for p in procs {
        if sel.contains_key(&p.tgid) {
            continue;
        }
        let mut cur = p.ppid;
        for _ in 0..MAX_ANCESTRY {
            if cur == 0 || cur == p.tgid {
                break;
            }
            if roots.contains(&cur) {
                sel.insert(p.tgid, KYA_SEL_FORK);
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

    #[test]
    fn running_selection_follows_descendants_not_strangers() {
        let k = |i| Some(ExeKey { dev: 1, ino: i });
        let procs = [
            ProcEntry {
                tgid: 1,
                ppid: 0,
                exe: k(1),
            },
            ProcEntry {
                tgid: 10,
                ppid: 1,
                exe: k(99),
            }, // agent
            ProcEntry {
                tgid: 11,
                ppid: 10,
                exe: k(2),
            }, // its child
            ProcEntry {
                tgid: 12,
                ppid: 11,
                exe: k(3),
            }, // grandchild
            ProcEntry {
                tgid: 20,
                ppid: 1,
                exe: k(2),
            }, // stranger
            ProcEntry {
                tgid: 30,
                ppid: 1,
                exe: None,
            }, // kernel thread / no exe
            ProcEntry {
                tgid: 40,
                ppid: 41,
                exe: k(2),
            }, // ppid cycle (racy /proc)
            ProcEntry {
                tgid: 41,
                ppid: 40,
                exe: k(2),
            },
            ProcEntry {
                tgid: 50,
                ppid: 7,
                exe: k(2),
            }, // child of pid 7
        ];
        let exes: BTreeMap<ExeKey, PathBuf> =
            [(ExeKey { dev: 1, ino: 99 }, PathBuf::from("/agent"))].into();
        let sel = running_selection(&procs, &exes, &[7].into());
        let want: BTreeMap<u32, u8> = [
            (7, KYA_SEL_PID),
            (10, KYA_SEL_SCAN),
            (11, KYA_SEL_FORK),
            (12, KYA_SEL_FORK),
            (50, KYA_SEL_FORK),
        ]
        .into();
        assert_eq!(sel, want);
    }

    #[test]
    fn scanning_proc_finds_this_process() {
        let me = std::process::id();
        let procs = scan_proc();
        let p = procs.iter().find(|p| p.tgid == me).unwrap();
        assert!(p.exe.is_some());
        assert_eq!(p.ppid, std::os::unix::process::parent_id());
    }
}
