//! Marking the interceptor's own sockets so the kernel side never redirects
//! them (loop avoidance, even when the daemon sits in a selected cgroup).

use kya_common::maps::KYA_SKIP_MARK;
use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// Sets `SO_MARK` = [`KYA_SKIP_MARK`] on a socket. Call it on every upstream
/// socket *before* `connect` (the redirect decision is taken in connect).
/// Needs `CAP_NET_ADMIN` (the daemon runs as root).
pub fn mark_socket<F: AsFd>(fd: F) -> io::Result<()> {
    let mark: libc::c_int = KYA_SKIP_MARK as libc::c_int;
    // SAFETY: valid fd, a c_int option value of the size passed.
    let r = unsafe {
        libc::setsockopt(
            fd.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            &mark as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads a socket's `SO_MARK` (for tests and diagnostics).
pub fn socket_mark<F: AsFd>(fd: F) -> io::Result<u32> {
    let mut mark: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid fd, out-pointer to a c_int with its length.
    let r = unsafe {
        libc::getsockopt(
            fd.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            &mut mark as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    if r == 0 {
        Ok(mark as u32)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_a_socket_or_reports_why_not() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        match mark_socket(&s) {
            Ok(()) => assert_eq!(socket_mark(&s).unwrap(), KYA_SKIP_MARK),
            // unprivileged: EPERM, never a silent success
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EPERM)),
        }
    }

    #[test]
    fn a_file_is_not_a_socket() {
        let f = tempfile::tempfile().unwrap();
        let e = mark_socket(&f).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTSOCK));
    }
}
