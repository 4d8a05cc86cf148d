//! The control connection's peer process, pinned by a pidfd.
//!
//! `SO_PEERCRED` reports a pid number, and a pid number can be reused: a
//! selected process could connect, hand the socket to a child and exit, and
//! once the number belongs to some unselected process the gate would judge
//! that one. A pidfd refers to the process itself, not its number: after the
//! gate read `/proc/PID`, the pidfd says whether the process it read is
//! still the peer (alive, so its pid was not reused in between).

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

/// `SO_PEERPIDFD` (Linux 6.5, asm-generic value); not in every libc.
const SO_PEERPIDFD: libc::c_int = 77;

/// A pidfd of the socket's peer: the kernel's own (`SO_PEERPIDFD`, the
/// process that connected), or on kernels before 6.5 one opened now from
/// the `SO_PEERCRED` pid (the narrow race of that fallback is closed by the
/// gate's liveness check only from here on).
pub(crate) fn peer_pidfd<F: AsFd>(socket: F, pid: Option<i32>) -> Option<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid socket fd, an out-pointer to a c_int with its length.
    let r = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            &mut fd as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    if r == 0 && fd >= 0 {
        // SAFETY: the kernel just gave us this fd; we own it.
        return Some(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    let pid = pid.filter(|p| *p > 0)?;
    // SAFETY: pidfd_open(pid, 0) takes two integers and returns a new fd or -1.
    let raw =
        unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_long, 0 as libc::c_long) };
    let raw = libc::c_int::try_from(raw).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: a new fd the kernel returned; we own it.
    Some(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Has the process behind `pidfd` not been reaped (so its pid still names it)?
/// `ESRCH` says it is gone; `EPERM` says it exists but kya may not signal it
/// (another user's process, and kya keeps no `CAP_KILL`), so it is alive.
pub(crate) fn is_alive(pidfd: &OwnedFd) -> bool {
    // SAFETY: pidfd_send_signal(fd, 0, NULL, 0) only checks that the
    // process exists and may be signalled; signal 0 delivers nothing.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd() as libc::c_long,
            0 as libc::c_long,
            std::ptr::null::<libc::siginfo_t>(),
            0 as libc::c_long,
        )
    };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_of_a_socket_pair_is_this_process_and_a_reaped_child_is_not_alive() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = peer_pidfd(&a, Some(std::process::id() as i32)).expect("a pidfd");
        assert!(is_alive(&fd));

        let mut child = std::process::Command::new("true").spawn().unwrap();
        let fd = peer_pidfd(
            // Not a socket: falls back to pidfd_open of the pid.
            std::fs::File::open("/dev/null").unwrap(),
            Some(child.id() as i32),
        )
        .expect("pidfd_open");
        child.wait().unwrap();
        assert!(!is_alive(&fd), "a reaped process is gone");
        assert!(peer_pidfd(std::fs::File::open("/dev/null").unwrap(), None).is_none());
        assert!(peer_pidfd(std::fs::File::open("/dev/null").unwrap(), Some(0)).is_none());
    }

    const CHILD_PID: &str = "KYA_PEER_ALIVE_PID";

    /// Another user's live process is alive to a daemon that may not signal
    /// it (no `CAP_KILL`): run as root, a child of this test binary checks,
    /// as an unprivileged user, a process of a second one.
    #[test]
    fn another_users_process_that_cannot_be_signalled_is_alive() {
        if let Ok(pid) = std::env::var(CHILD_PID) {
            let pid: i32 = pid.parse().unwrap();
            let fd = peer_pidfd(std::fs::File::open("/dev/null").unwrap(), Some(pid))
                .expect("pidfd_open");
            assert!(is_alive(&fd), "pid {pid} is running");
            println!("peer child: ok");
            return;
        }
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to run processes as two other users");
            return;
        }
        let mut target = std::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "sleep",
                "30",
            ])
            .spawn()
            .unwrap();
        let pid = target.id().to_string();
        let checked = std::panic::catch_unwind(|| {
            crate::test_child::rerun_alone(
                "control::peer::tests::another_users_process_that_cannot_be_signalled_is_alive",
                (CHILD_PID, &pid),
                &[
                    "setpriv",
                    "--reuid=65533",
                    "--regid=65533",
                    "--clear-groups",
                ],
                "peer child: ok",
            )
        });
        let _ = target.kill();
        let _ = target.wait();
        if let Err(e) = checked {
            std::panic::resume_unwind(e);
        }
    }
}
