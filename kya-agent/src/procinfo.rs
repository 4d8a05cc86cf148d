//! Process facts from `/proc`: what the kernel's record of a connection
//! does not carry.
//!
//! The kernel record gives pid, uid, gid, comm, cgroup id and the executable
//! at connect time; `/proc/PID` adds the command line and parent (and the
//! executable only when the kernel had none, see `bpf::Origin`).
//! The process may be gone by the time we look (short-lived agents): every
//! field is then left empty rather than failing the connection, and the kernel's
//! facts stay authoritative.

use std::path::{Path, PathBuf};

/// Facts about one process read from `/proc`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ProcFacts {
    /// `/proc/PID/exe` target; empty when unreadable (process gone, kernel thread).
    pub exe: String,
    /// `/proc/PID/comm` without the newline.
    pub comm: String,
    /// Arguments from `/proc/PID/cmdline`, bounded (see [`MAX_CMDLINE`]).
    pub cmdline: Vec<String>,
    /// Parent pid from `/proc/PID/stat`.
    pub ppid: Option<u32>,
    /// cgroup v2 path from the `0::` line of `/proc/PID/cgroup`.
    pub cgroup: String,
    /// Real uid from `/proc/PID/status`.
    pub uid: Option<u32>,
}

/// Upper bound on the bytes of a command line kept (an agent controls it).
pub(crate) const MAX_CMDLINE: usize = 4096;

/// Read what `/proc` still knows about `pid`; missing pieces are left empty.
pub(crate) fn read(pid: u32) -> ProcFacts {
    read_at(Path::new("/proc"), pid)
}

/// [`read`] against another proc root (tests).
pub(crate) fn read_at(proc_root: &Path, pid: u32) -> ProcFacts {
    let dir = proc_root.join(pid.to_string());
    ProcFacts {
        exe: std::fs::read_link(dir.join("exe"))
            .map(|p| strip_deleted(&p))
            .unwrap_or_default(),
        comm: std::fs::read(dir.join("comm"))
            .map(|b| {
                String::from_utf8_lossy(&b)
                    .trim_end_matches('\n')
                    .to_string()
            })
            .unwrap_or_default(),
        cmdline: std::fs::read(dir.join("cmdline"))
            .map(|b| parse_cmdline(&b))
            .unwrap_or_default(),
        ppid: std::fs::read(dir.join("stat"))
            .ok()
            .and_then(|b| parse_stat_ppid(&b)),
        cgroup: std::fs::read(dir.join("cgroup"))
            .ok()
            .and_then(|b| parse_cgroup_v2(&b))
            .unwrap_or_default(),
        uid: std::fs::read(dir.join("status"))
            .ok()
            .and_then(|b| parse_status_uid(&b)),
    }
}

/// The cgroup v2 path of `pid` (`0::/path` line), if the process exists.
pub(crate) fn cgroup_of(pid: u32) -> Option<String> {
    std::fs::read(format!("/proc/{pid}/cgroup"))
        .ok()
        .and_then(|b| parse_cgroup_v2(&b))
}

fn strip_deleted(p: &Path) -> String {
    let s = p.to_string_lossy();
    s.strip_suffix(" (deleted)").unwrap_or(&s).to_string()
}

/// NUL-separated arguments, bounded to [`MAX_CMDLINE`] bytes.
pub(crate) fn parse_cmdline(bytes: &[u8]) -> Vec<String> {
    let bounded = &bytes[..bytes.len().min(MAX_CMDLINE)];
    bounded
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// The 4th field of `/proc/PID/stat`. The comm (field 2) may contain spaces and
/// parentheses, so parse after the *last* `)`.
pub(crate) fn parse_stat_ppid(bytes: &[u8]) -> Option<u32> {
    let close = bytes.iter().rposition(|b| *b == b')')?;
    let rest = std::str::from_utf8(bytes.get(close + 1..)?).ok()?;
    let mut fields = rest.split_ascii_whitespace();
    let _state = fields.next()?;
    fields.next()?.parse().ok()
}

/// The path of the unified-hierarchy line `0::/path` of `/proc/PID/cgroup`.
pub(crate) fn parse_cgroup_v2(bytes: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(bytes).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim_end().to_string())
}

/// The real uid (first number of the `Uid:` line of `/proc/PID/status`).
pub(crate) fn parse_status_uid(bytes: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(bytes).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_ascii_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Path helper for callers that want the exe of a pid as a `PathBuf`.
pub(crate) fn exe_of(pid: u32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = read(std::process::id());
        assert!(!me.exe.is_empty());
        assert!(!me.comm.is_empty());
        assert!(!me.cmdline.is_empty());
        assert_eq!(me.ppid, Some(std::os::unix::process::parent_id()));
        assert!(me.cgroup.starts_with('/'), "{:?}", me.cgroup);
        assert_eq!(me.uid, Some(nix::unistd::getuid().as_raw()));
    }

    #[test]
    fn vanished_process_gives_empty_facts() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_at(dir.path(), 4242), ProcFacts::default());
    }

    #[test]
    fn hostile_stat_and_cgroup_contents() {
        // A comm with spaces and parentheses must not shift the fields.
        assert_eq!(parse_stat_ppid(b"123 (a) b) (c) S 77 123 123 0"), Some(77));
        assert_eq!(parse_stat_ppid(b"123 (no close S 77"), None);
        assert_eq!(parse_stat_ppid(b""), None);
        assert_eq!(parse_stat_ppid(b"1 (x) S notanumber"), None);
        assert_eq!(
            parse_cgroup_v2(b"12:cpu:/x\n0::/agents/billing\n"),
            Some("/agents/billing".into())
        );
        assert_eq!(parse_cgroup_v2(b"12:cpu:/x\n"), None);
        assert_eq!(parse_cgroup_v2(&[0xff, 0xfe]), None);
        assert_eq!(
            parse_status_uid(b"Name:\tx\nUid:\t1001\t1001\t1001\t1001\n"),
            Some(1001)
        );
        assert_eq!(parse_status_uid(b"Uid:\n"), None);
        let huge = vec![b'a'; MAX_CMDLINE * 4];
        let args = parse_cmdline(&huge);
        assert_eq!(args.len(), 1);
        assert_eq!(args[0].len(), MAX_CMDLINE);
        assert_eq!(
            parse_cmdline(b"python3\0-c\0\0print(1)\0"),
            vec!["python3", "-c", "print(1)"]
        );
    }
}
