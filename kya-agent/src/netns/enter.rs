//! A network namespace kya works in: a thread of its own joins the namespace
//! once and makes every socket kya needs there (a socket keeps the namespace
//! it was created in, whichever thread uses it later).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc;

/// Errors joining a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum EnterError {
    #[error("cannot start the namespace thread: {0}")]
    Thread(io::Error),
    #[error("setns into the network namespace failed: {0}")]
    Setns(io::Error),
    #[error("the network namespace has no cookie (SO_NETNS_COOKIE): {0}")]
    Cookie(io::Error),
    #[error("the namespace thread ended")]
    Gone,
}

struct Request {
    v6: bool,
    reply: tokio::sync::oneshot::Sender<io::Result<OwnedFd>>,
}

/// A network namespace other than the host's, joined by a thread that makes
/// sockets in it. The thread ends when the last handle is dropped.
pub struct Namespace {
    cookie: u64,
    inode: u64,
    tx: mpsc::Sender<Request>,
}

impl std::fmt::Debug for Namespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Namespace")
            .field("cookie", &self.cookie)
            .field("inode", &self.inode)
            .finish()
    }
}

impl PartialEq for Namespace {
    fn eq(&self, other: &Self) -> bool {
        self.cookie == other.cookie
    }
}

impl Eq for Namespace {}

impl Namespace {
    /// Joins the network namespace `file` refers to (an open
    /// `/proc/PID/ns/net`, whose inode is `inode`) on a new thread.
    pub fn enter(file: File, inode: u64) -> Result<Namespace, EnterError> {
        let (tx, rx) = mpsc::channel::<Request>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<u64, EnterError>>(1);
        std::thread::Builder::new()
            .name(format!("kya-netns-{inode}"))
            .spawn(move || {
                // SAFETY: a valid namespace fd; CLONE_NEWNET only changes
                // this thread's network namespace.
                let joined = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } == 0;
                let first = if joined {
                    netns_cookie_here().map_err(EnterError::Cookie)
                } else {
                    Err(EnterError::Setns(io::Error::last_os_error()))
                };
                drop(file);
                let ok = first.is_ok();
                let _ = ready_tx.send(first);
                if !ok {
                    return;
                }
                while let Ok(req) = rx.recv() {
                    let _ = req.reply.send(stream_socket(req.v6));
                }
            })
            .map_err(EnterError::Thread)?;
        let cookie = ready_rx.recv().map_err(|_| EnterError::Gone)??;
        Ok(Namespace { cookie, inode, tx })
    }

    /// The kernel's cookie of this namespace (what the BPF side sees).
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// The namespace's inode (`net:[INODE]` in `/proc/PID/ns/net`, `lsns`).
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// A new non-blocking TCP socket in this namespace.
    pub async fn socket(&self, v6: bool) -> io::Result<OwnedFd> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx.send(Request { v6, reply }).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// [`Namespace::socket`] for a thread outside the async runtime.
    pub fn socket_blocking(&self, v6: bool) -> io::Result<OwnedFd> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx.send(Request { v6, reply }).map_err(|_| gone())?;
        rx.blocking_recv().map_err(|_| gone())?
    }
}

fn gone() -> io::Error {
    io::Error::other("the network namespace thread ended")
}

fn stream_socket(v6: bool) -> io::Result<OwnedFd> {
    let domain = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The cookie of the calling thread's network namespace.
fn netns_cookie_here() -> io::Result<u64> {
    let sock = stream_socket(false)?;
    netns_cookie_of(&sock)
}

/// `SO_NETNS_COOKIE` of a socket: the cookie of the namespace it lives in.
pub(super) fn netns_cookie_of(sock: &impl AsRawFd) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid socket fd, out-pointer to a u64 with its length.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn joining_our_own_namespace_gives_its_cookie_and_sockets() {
        if !kya_testkit::root_or_skip(
            "joining_our_own_namespace_gives_its_cookie_and_sockets",
            "needs CAP_SYS_ADMIN for setns",
        ) {
            return;
        }
        let path = "/proc/self/ns/net";
        let inode = std::fs::metadata(path).unwrap().ino();
        let ns = Namespace::enter(File::open(path).unwrap(), inode).unwrap();
        let here = netns_cookie_here().unwrap();
        assert_eq!(ns.cookie(), here);
        assert_eq!(ns.inode(), inode);
        let s = ns.socket_blocking(true).unwrap();
        assert_eq!(netns_cookie_of(&s).unwrap(), here);
    }

    #[test]
    fn a_file_that_is_not_a_namespace_is_refused() {
        let f = File::open("/proc/self/status").unwrap();
        assert!(matches!(Namespace::enter(f, 1), Err(EnterError::Setns(_))));
    }
}
