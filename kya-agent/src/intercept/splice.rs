//! Copy bytes both ways between the agent and the upstream, unchanged.
//!
//! Between two TCP sockets the bytes never enter userspace: each direction
//! moves them socket → pipe → socket with `splice(2)` ([`splice_tcp`]). Any
//! other pair of streams (a CONNECT tunnel, a TLS stream) is copied through a
//! buffer ([`splice`]). A write to a peer that is gone fails with `EPIPE`
//! (Rust programs ignore `SIGPIPE`, which `splice(2)` to a socket raises).

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::fcntl::{splice as splice2, OFlag, SpliceFFlags};
use tokio::io::{AsyncRead, AsyncWrite, Interest};
use tokio::net::TcpStream;

/// Bytes moved in each direction by a finished splice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Spliced {
    pub to_upstream: u64,
    pub to_agent: u64,
}

/// The copy buffer each way. Tokio's default (8 KiB) costs a read and a
/// write per 8 KiB: a bulk download through kya then runs at well under half
/// the speed of a direct one. 64 KiB is what a loopback or LAN segment
/// train delivers per read.
const BUFFER: usize = 64 * 1024;

/// What one `splice(2)` from a socket moves at most: the pipe's default
/// capacity (16 pages), so a read never finds the pipe full.
const PIPE_CHUNK: usize = 64 * 1024;

/// Copy until both sides have closed; half-closes are propagated
/// (`copy_bidirectional` shuts down the write side when the read side ends).
pub(crate) async fn splice<A, U>(agent: &mut A, upstream: &mut U) -> io::Result<Spliced>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (to_upstream, to_agent) =
        tokio::io::copy_bidirectional_with_sizes(agent, upstream, BUFFER, BUFFER).await?;
    Ok(Spliced {
        to_upstream,
        to_agent,
    })
}

/// [`splice`] between two TCP sockets, inside the kernel: the same
/// semantics (until both directions have ended; an end of one direction is
/// passed on as a half-close; the first error ends both).
pub(crate) async fn splice_tcp(agent: &TcpStream, upstream: &TcpStream) -> io::Result<Spliced> {
    let (to_upstream, to_agent) =
        tokio::try_join!(one_way(agent, upstream), one_way(upstream, agent))?;
    Ok(Spliced {
        to_upstream,
        to_agent,
    })
}

/// A pipe both ends of which are non-blocking.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        Ok(Self { read, write })
    }
}

/// Move everything `from` sends to `to` until `from` ends, then half-close
/// `to`. Returns the bytes moved.
async fn one_way(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
    let pipe = Pipe::new()?;
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut moved = 0u64;
    loop {
        // The pipe is empty here: fill it from the socket.
        let n = from
            .async_io(Interest::READABLE, || {
                splice2(
                    from.as_fd(),
                    None,
                    pipe.write.as_fd(),
                    None,
                    PIPE_CHUNK,
                    flags,
                )
                .map_err(io::Error::from)
            })
            .await?;
        if n == 0 {
            // The sender ended its direction: so does kya, as a direct
            // connection would. A peer already gone has nothing to tell.
            if let Err(e) =
                nix::sys::socket::shutdown(to.as_raw_fd(), nix::sys::socket::Shutdown::Write)
            {
                if e != nix::errno::Errno::ENOTCONN {
                    return Err(e.into());
                }
            }
            return Ok(moved);
        }
        // Drain the pipe into the other socket.
        let mut left = n;
        while left > 0 {
            let w = to
                .async_io(Interest::WRITABLE, || {
                    splice2(pipe.read.as_fd(), None, to.as_fd(), None, left, flags)
                        .map_err(io::Error::from)
                })
                .await?;
            if w == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the receiving socket took no bytes",
                ));
            }
            left -= w;
            moved += w as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Client ⇄ (agent socket | kya | upstream socket) ⇄ server, over
    /// loopback; kya's part runs [`splice_tcp`] in a task.
    async fn scene() -> (
        TcpStream,
        TcpStream,
        tokio::task::JoinHandle<io::Result<Spliced>>,
    ) {
        let front = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let back = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(front.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (agent, _) = front.accept().await.expect("accept");
        let upstream = TcpStream::connect(back.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = back.accept().await.expect("accept");
        let task = tokio::spawn(async move { splice_tcp(&agent, &upstream).await });
        (client, server, task)
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[tokio::test]
    async fn bytes_cross_unchanged_both_ways_and_half_closes_pass_on() {
        let (mut client, mut server, task) = scene().await;
        let up = pattern(8 << 20, 1);
        let down = pattern(3 << 20, 7);
        let (up2, down2) = (up.clone(), down.clone());
        // The client sends everything and ends its direction; it still
        // reads the server's answer to the end.
        let c = tokio::spawn(async move {
            client.write_all(&up2).await.expect("client write");
            client.shutdown().await.expect("client shutdown");
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.expect("client read");
            got
        });
        // The server reads to the client's end (the half-close arrived),
        // then answers and closes.
        let s = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.expect("server read");
            server.write_all(&down2).await.expect("server write");
            server.shutdown().await.expect("server shutdown");
            got
        });
        let (to_client, to_server) = (c.await.expect("client"), s.await.expect("server"));
        assert!(to_server == up, "upstream bytes differ");
        assert!(to_client == down, "downstream bytes differ");
        let moved = task.await.expect("task").expect("splice");
        assert_eq!(
            moved,
            Spliced {
                to_upstream: up.len() as u64,
                to_agent: down.len() as u64
            }
        );
    }

    #[tokio::test]
    async fn a_reset_ends_the_splice_and_the_other_side_sees_it_end() {
        let (client, mut server, task) = scene().await;
        client.set_zero_linger().expect("linger");
        drop(client);
        let mut buf = [0u8; 16];
        // The server's read ends (an end or a reset), and the splice returns.
        let n = tokio::time::timeout(std::time::Duration::from_secs(30), server.read(&mut buf))
            .await
            .expect("the server's side ended");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        let done = tokio::time::timeout(std::time::Duration::from_secs(30), task)
            .await
            .expect("the splice ended");
        assert!(done.is_ok());
    }

    #[tokio::test]
    async fn nothing_sent_is_an_empty_splice() {
        let (client, server, task) = scene().await;
        drop(client);
        drop(server);
        // Both ends closed cleanly without a byte: an orderly end, nothing moved.
        let moved = task.await.expect("task").expect("splice");
        assert_eq!(moved, Spliced::default());
    }
}
