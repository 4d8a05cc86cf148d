//! Facts about the host the redirect needs: where cgroup2 and bpffs are
//! mounted, a cgroup's id, a process's cgroup. Parsers are split from the
//! file reads so they can be tested on hostile input.

use super::BpfError;
use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

/// Where kya mounts bpffs when no bpffs is mounted there (as Cilium does).
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";
/// Bound on files kya reads from /proc and /sys (they are small; a huge one
/// is not a real mountinfo / cgroup file).
const MAX_PROC_FILE: u64 = 4 << 20;

/// One line of `/proc/self/mountinfo`: (mount point, filesystem type).
fn parse_mountinfo_line(line: &str) -> Option<(PathBuf, String)> {
    // id parent maj:min root mountpoint options [optional...] - fstype source superopts
    let (pre, post) = line.split_once(" - ")?;
    let mountpoint = pre.split(' ').nth(4)?;
    let fstype = post.split(' ').next()?;
    if fstype.is_empty() || !mountpoint.starts_with('/') {
        return None;
    }
    Some((
        PathBuf::from(unescape_octal(mountpoint)?),
        fstype.to_string(),
    ))
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            let oct = b.get(i + 1..i + 4)?;
            if !oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                return None;
            }
            let v =
                (oct[0] - b'0') as u32 * 64 + (oct[1] - b'0') as u32 * 8 + (oct[2] - b'0') as u32;
            out.push(u8::try_from(v).ok()?);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Mount points of `fstype` in a mountinfo text, in order.
pub(super) fn mounts_of_type(mountinfo: &str, fstype: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(parse_mountinfo_line)
        .filter(|(_, t)| t == fstype)
        .map(|(p, _)| p)
        .collect()
}

fn read_small(path: &Path) -> Result<String, BpfError> {
    use std::io::Read;
    let f = std::fs::File::open(path)
        .map_err(|e| BpfError::io(format!("opening {}", path.display()), e))?;
    let mut s = String::new();
    f.take(MAX_PROC_FILE)
        .read_to_string(&mut s)
        .map_err(|e| BpfError::io(format!("reading {}", path.display()), e))?;
    Ok(s)
}

/// The cgroup v2 mount (`/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones), from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Result<PathBuf, BpfError> {
    let info = read_small(Path::new("/proc/self/mountinfo"))?;
    mounts_of_type(&info, "cgroup2")
        .into_iter()
        .next()
        .ok_or(BpfError::NoCgroup2)
}

/// The cgroup v2 path of a process, from the `0::/x/y` line of
/// `/proc/PID/cgroup`.
pub fn cgroup_path_of_pid(pid: u32) -> Result<String, BpfError> {
    let text = read_small(&PathBuf::from(format!("/proc/{pid}/cgroup")))?;
    parse_cgroup_v2_line(&text).ok_or(BpfError::NoCgroupV2Line { pid })
}

fn parse_cgroup_v2_line(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .filter(|p| p.starts_with('/'))
        .map(|p| p.trim_end_matches(" (deleted)").to_string())
}

/// Resolves a selection path (relative to the cgroup2 mount, e.g.
/// `/agents/billing`) to a directory, refusing `..` and other escapes.
pub(super) fn cgroup_dir(mount: &Path, rel: &str) -> Result<PathBuf, BpfError> {
    let bad = || BpfError::BadCgroupPath(rel.to_string());
    if rel.is_empty() || rel.len() > 4096 || rel.contains('\0') {
        return Err(bad());
    }
    let mut dir = mount.to_path_buf();
    for c in Path::new(rel).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => dir.push(n),
            Component::ParentDir | Component::Prefix(_) => return Err(bad()),
        }
    }
    Ok(dir)
}

/// The cgroup id the kernel reports (`bpf_get_current_cgroup_id`) is the
/// inode number of the cgroup's directory in cgroup2 (kernfs node id).
pub(super) fn cgroup_id(mount: &Path, rel: &str) -> Result<u64, BpfError> {
    let dir = cgroup_dir(mount, rel)?;
    let md = std::fs::metadata(&dir).map_err(|source| BpfError::CgroupNotFound {
        path: rel.to_string(),
        source,
    })?;
    if !md.is_dir() {
        return Err(BpfError::BadCgroupPath(rel.to_string()));
    }
    Ok(md.ino())
}

/// Bound on the cgroup directories [`cgroup_path_of_id`] visits.
const MAX_CGROUP_WALK: usize = 100_000;

/// The path (relative to the cgroup2 mount, e.g. `/agents/x`) of the cgroup
/// with this id, by a bounded walk of the hierarchy. `Ok(None)`: no such
/// cgroup (removed since). The id is what the kernel recorded at connect
/// time, so unlike `/proc/PID/cgroup` this still answers after the process
/// exited or moved.
pub fn cgroup_path_of_id(id: u64) -> Result<Option<String>, BpfError> {
    let mount = cgroup2_mount()?;
    Ok(find_cgroup(&mount, id))
}

fn find_cgroup(mount: &Path, id: u64) -> Option<String> {
    let mut stack = vec![mount.to_path_buf()];
    let mut visited = 0usize;
    while let Some(dir) = stack.pop() {
        visited += 1;
        if visited > MAX_CGROUP_WALK {
            tracing::warn!(id, "cgroup walk stopped at {MAX_CGROUP_WALK} directories");
            return None;
        }
        let Ok(md) = std::fs::symlink_metadata(&dir) else {
            continue;
        };
        if md.ino() == id {
            let rel = dir.strip_prefix(mount).ok()?;
            return Some(format!("/{}", rel.to_string_lossy()));
        }
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(e.path());
            }
        }
    }
    None
}

/// The cookie of the network namespace this process runs in (where the
/// interceptor listens), or 0 when the kernel cannot tell (before 5.14), in
/// which case the kernel side does not check namespaces.
pub(super) fn netns_cookie() -> u64 {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let Ok(sock) = std::net::UdpSocket::bind("127.0.0.1:0") else {
        return 0;
    };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid socket fd, out-pointer to a u64 with its length.
    let r = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    if r != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "no SO_NETNS_COOKIE: sockets in other network namespaces are not told apart");
        return 0;
    }
    cookie
}

/// Mounts bpffs at [`BPFFS_MOUNT`] unless a bpffs is already mounted there.
pub(super) fn ensure_bpffs() -> Result<(), BpfError> {
    let info = read_small(Path::new("/proc/self/mountinfo"))?;
    if mounts_of_type(&info, "bpf")
        .iter()
        .any(|p| p == Path::new(BPFFS_MOUNT))
    {
        return Ok(());
    }
    std::fs::create_dir_all(BPFFS_MOUNT)
        .map_err(|e| BpfError::io(format!("creating {BPFFS_MOUNT}"), e))?;
    let target = CString::new(BPFFS_MOUNT).map_err(|_| BpfError::BadPinDir(BPFFS_MOUNT.into()))?;
    // SAFETY: NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr() as *const libc::c_void,
        )
    };
    if r != 0 {
        return Err(BpfError::io(
            format!("mounting bpffs at {BPFFS_MOUNT}"),
            std::io::Error::last_os_error(),
        ));
    }
    tracing::info!(path = BPFFS_MOUNT, "mounted bpffs");
    Ok(())
}

/// Whether `path` lies on a bpffs (pins can only live there).
pub(super) fn on_bpffs(path: &Path) -> Result<bool, BpfError> {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| BpfError::BadPinDir(path.into()))?;
    // SAFETY: zeroed statfs is a valid out-buffer; c is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if r != 0 {
        return Err(BpfError::io(
            format!("statfs {}", path.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
40 30 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
50 22 0:40 / /mnt/with\\040space rw - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_cgroup2_on_a_hybrid_host_first() {
        let m = mounts_of_type(HYBRID, "cgroup2");
        assert_eq!(
            m,
            [
                PathBuf::from("/sys/fs/cgroup/unified"),
                PathBuf::from("/mnt/with space")
            ]
        );
        assert!(mounts_of_type(HYBRID, "bpf").is_empty());
    }

    #[test]
    fn malformed_mountinfo_lines_are_skipped() {
        let bad = "garbage\n1 2 3\n1 2 3:4 / relative rw - cgroup2 x rw\n1 2 3:4 / /x rw -  \n\
                   1 2 3:4 / /bad\\09 rw - cgroup2 x rw\n1 2 3:4 / /trunc\\04 rw - cgroup2 x rw\n";
        assert!(mounts_of_type(bad, "cgroup2").is_empty());
        let huge = "x".repeat(1 << 20);
        assert!(mounts_of_type(&huge, "cgroup2").is_empty());
    }

    #[test]
    fn cgroup_file_parsing() {
        assert_eq!(
            parse_cgroup_v2_line("12:cpu:/a\n0::/agents/x\n"),
            Some("/agents/x".into())
        );
        assert_eq!(parse_cgroup_v2_line("0::/\n"), Some("/".into()));
        assert_eq!(
            parse_cgroup_v2_line("0::/gone (deleted)\n"),
            Some("/gone".into())
        );
        assert_eq!(parse_cgroup_v2_line("1:name=systemd:/x\n"), None);
        assert_eq!(parse_cgroup_v2_line("0::relative\n"), None);
        assert_eq!(parse_cgroup_v2_line(""), None);
    }

    #[test]
    fn cgroup_paths_cannot_escape_the_mount() {
        let m = Path::new("/sys/fs/cgroup");
        assert_eq!(
            cgroup_dir(m, "/agents/a").unwrap(),
            PathBuf::from("/sys/fs/cgroup/agents/a")
        );
        assert_eq!(
            cgroup_dir(m, "agents/./a").unwrap(),
            PathBuf::from("/sys/fs/cgroup/agents/a")
        );
        assert_eq!(cgroup_dir(m, "/").unwrap(), PathBuf::from("/sys/fs/cgroup"));
        for bad in ["", "/../etc", "/a/../../b", "/a\0b", &"a/".repeat(3000)] {
            assert!(
                matches!(cgroup_dir(m, bad), Err(BpfError::BadCgroupPath(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn this_netns_has_a_stable_cookie() {
        let c = netns_cookie();
        assert_ne!(c, 0, "kernel 5.14+ reports SO_NETNS_COOKIE");
        assert_eq!(c, netns_cookie());
    }

    #[test]
    fn the_running_process_has_a_cgroup_and_a_cgroup2_mount() {
        let mount = cgroup2_mount().unwrap();
        let path = cgroup_path_of_pid(std::process::id()).unwrap();
        assert!(path.starts_with('/'));
        assert!(cgroup_id(&mount, &path).unwrap() > 0);
        assert!(cgroup_path_of_pid(u32::MAX).is_err());
        let id = cgroup_id(&mount, &path).unwrap();
        assert_eq!(cgroup_path_of_id(id).unwrap(), Some(path.clone()));
        assert_eq!(cgroup_path_of_id(0).unwrap(), None);
        assert_eq!(cgroup_path_of_id(u64::MAX).unwrap(), None);
        assert!(matches!(
            cgroup_id(&mount, "/kya-no-such-cgroup-xyz"),
            Err(BpfError::CgroupNotFound { .. })
        ));
    }
}
