//! The few `bpf(2)` commands kya issues itself.
//!
//! aya 0.13 loads the object and owns the maps, but it does not let a cgroup
//! link be converted into a pinnable `FdLink`, and it has no atomic
//! lookup-and-delete. Both are one syscall each, so they live here, with the
//! attribute layouts copied from `linux/bpf.h` (UAPI, stable).

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
const BPF_LINK_CREATE: libc::c_long = 28;

/// `enum bpf_attach_type` values used by kya.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(super) enum AttachType {
    SockOps = 3,
    Connect4 = 10,
    Connect6 = 11,
    Sendmsg4 = 14,
    Sendmsg6 = 15,
    Getpeername4 = 29,
    Getpeername6 = 30,
}

/// Issues `bpf(cmd, attr, sizeof attr)`. The attribute structs below are
/// prefixes of `union bpf_attr`; the kernel zero-fills the rest.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid, initialised repr(C) struct of the size passed;
    // the kernel reads (and for some commands writes) at most that many bytes.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_long,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn owned(fd: libc::c_long) -> io::Result<OwnedFd> {
    let raw = i32::try_from(fd).map_err(|_| io::Error::other("bpf returned an fd out of range"))?;
    // SAFETY: the kernel just returned this new fd to us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    target_btf_id: u32,
    _pad: u32,
    _union: [u64; 4],
}

/// Attaches a program to a cgroup with a BPF link. Cgroup links are always
/// multi-attach (they coexist with other programs and other kya instances);
/// the kernel detaches the link when its last fd and pin are gone.
pub(super) fn link_create(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach: AttachType,
) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type: attach as u32,
        flags: 0,
        target_btf_id: 0,
        _pad: 0,
        _union: [0; 4],
    };
    owned(bpf(BPF_LINK_CREATE, &mut attr)?)
}

#[repr(C)]
struct RawTracepointAttr {
    name: u64,
    prog_fd: u32,
    _pad: u32,
    cookie: u64,
}

/// Attaches a raw tracepoint program; the returned fd is a BPF link.
pub(super) fn raw_tracepoint_open(prog: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    let mut attr = RawTracepointAttr {
        name: name.as_ptr() as u64,
        prog_fd: prog.as_raw_fd() as u32,
        _pad: 0,
        cookie: 0,
    };
    owned(bpf(BPF_RAW_TRACEPOINT_OPEN, &mut attr)?)
}

#[repr(C)]
struct ObjPinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// Pins a BPF object (here: a link) at `path` on a bpffs.
pub(super) fn obj_pin(fd: BorrowedFd<'_>, path: &CStr) -> io::Result<()> {
    let mut attr = ObjPinAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

#[repr(C)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    _pad: u32,
}

/// Creates a map (used by the start-up probe only).
pub(super) fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max: u32,
) -> io::Result<OwnedFd> {
    let mut attr = MapCreateAttr {
        map_type,
        key_size,
        value_size,
        max_entries: max,
        map_flags: 0,
        _pad: 0,
    };
    owned(bpf(BPF_MAP_CREATE, &mut attr)?)
}

#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// Loads a raw instruction array (used by the start-up probe only). On
/// failure, the error and the verifier's log.
pub(super) fn prog_load(
    prog_type: u32,
    expected_attach_type: u32,
    insns: &[u64],
) -> Result<OwnedFd, (io::Error, String)> {
    let mut log = vec![0u8; 64 * 1024];
    let insn_cnt = u32::try_from(insns.len())
        .map_err(|_| (io::Error::other("too many instructions"), String::new()))?;
    let license = c"GPL";
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        kern_version: 0,
        prog_flags: 0,
        prog_name: [0; 16],
        prog_ifindex: 0,
        expected_attach_type,
    };
    match bpf(BPF_PROG_LOAD, &mut attr).and_then(owned) {
        Ok(fd) => Ok(fd),
        Err(e) => {
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            Err((e, String::from_utf8_lossy(&log[..end]).into_owned()))
        }
    }
}

/// `BPF_LINK_CREATE` with a raw target fd (the probe passes -1 to learn
/// whether the command exists without attaching anything).
pub(super) fn link_create_raw(
    prog: BorrowedFd<'_>,
    target_fd: i32,
    attach: AttachType,
) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: target_fd as u32,
        attach_type: attach as u32,
        flags: 0,
        target_btf_id: 0,
        _pad: 0,
        _union: [0; 4],
    };
    owned(bpf(BPF_LINK_CREATE, &mut attr)?)
}

#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Atomically looks up and deletes `key`; `Ok(None)` when absent. Atomic so
/// that two accepts can never both claim one origin record.
///
/// `K` and `V` must be the map's exact key and value types (`repr(C)` plain
/// data, every bit pattern valid); the caller guarantees it.
pub(super) fn map_lookup_and_delete<K: Copy, V: Copy + Default>(
    map: BorrowedFd<'_>,
    key: &K,
) -> io::Result<Option<V>> {
    let mut value = V::default();
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: &mut value as *mut V as u64,
        flags: 0,
    };
    match bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut attr) {
        Ok(_) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Looks up `key`; `Ok(None)` when absent. Same contract on `K`/`V` as
/// [`map_lookup_and_delete`].
pub(super) fn map_lookup<K: Copy, V: Copy + Default>(
    map: BorrowedFd<'_>,
    key: &K,
) -> io::Result<Option<V>> {
    let mut value = V::default();
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: &mut value as *mut V as u64,
        flags: 0,
    };
    match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(_) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn attribute_layouts_match_union_bpf_attr() {
        use std::mem::{offset_of, size_of};
        assert_eq!(offset_of!(LinkCreateAttr, attach_type), 8);
        assert_eq!(offset_of!(LinkCreateAttr, flags), 12);
        assert_eq!(offset_of!(RawTracepointAttr, prog_fd), 8);
        assert_eq!(offset_of!(ObjPinAttr, bpf_fd), 8);
        assert_eq!(offset_of!(ObjPinAttr, path_fd), 16);
        assert_eq!(offset_of!(MapElemAttr, key), 8);
        assert_eq!(offset_of!(MapElemAttr, value), 16);
        assert_eq!(size_of::<MapElemAttr>(), 32);
        assert_eq!(offset_of!(MapCreateAttr, map_flags), 16);
        assert_eq!(offset_of!(ProgLoadAttr, license), 16);
        assert_eq!(offset_of!(ProgLoadAttr, log_buf), 32);
        assert_eq!(offset_of!(ProgLoadAttr, prog_name), 48);
        assert_eq!(offset_of!(ProgLoadAttr, expected_attach_type), 68);
    }

    #[test]
    fn syscalls_on_non_bpf_fds_fail_cleanly() {
        // A regular file is neither a program, a cgroup nor a map: each
        // command must return an error, never succeed or crash.
        let f = tempfile::tempfile().unwrap();
        let fd = f.as_fd();
        assert!(link_create(fd, fd, AttachType::Connect4).is_err());
        assert!(raw_tracepoint_open(fd, c"sched_process_exec").is_err());
        assert!(obj_pin(fd, c"/nonexistent/kya-test-pin").is_err());
        assert!(map_lookup_and_delete::<u64, u64>(fd, &0).is_err());
        assert!(map_lookup::<u64, u64>(fd, &0).is_err());
    }
}
