//! A followed `CONNECT` tunnel: once the proxy the agent asked opened it
//! ([`super::http::connect`]), the tunnel is a new connection whose
//! destination is the CONNECT authority, and goes down the same path as a
//! redirected connection ([`super::dispatch::route`]): TLS terminated with a
//! leaf for the target and verified upstream, through the tunnel, against the
//! target's name; plaintext HTTP inspected; anything else refused unless the
//! target's port is a splice port. The agent's TLS name (and any `Host`)
//! must be the target's.

use super::dispatch::{self, AgentStream, Conn, Inspection, Server};
use super::http::connect::Tunnels;
use super::http::sniff::Prefixed;
use super::http::{BoxFuture, TunnelTarget};
use super::origin::ConnOrigin;
use crate::tls::client_hello::{self, FirstBytes, PeekError};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::task::JoinHandle;

/// Bytes read to classify a tunnel's first bytes (as many as a peek looks at).
const FIRST_BYTES: usize = 16;

/// The agent's side of a tunnel, with the bytes read to classify it put back.
type TunnelAgent = Prefixed<TokioIo<Upgraded>>;

impl AgentStream for TunnelAgent {}

/// Follows the tunnels opened on one redirected connection, and keeps them
/// accounted to it: the connection's handler waits for them
/// ([`Follower::join`]) before it ends, so a tunnel holds the connection's
/// place under the interceptor's connection limit, and is aborted with it.
pub(crate) struct Follower {
    insp: Arc<Inspection>,
    origin: ConnOrigin,
    running: Mutex<Vec<JoinHandle<()>>>,
}

impl Follower {
    pub(crate) fn new(insp: Arc<Inspection>, origin: ConnOrigin) -> Self {
        Self {
            insp,
            origin,
            running: Mutex::new(Vec::new()),
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait for every tunnel this connection opened to end.
    pub(crate) async fn join(&self) {
        loop {
            let next = self.running().pop();
            let Some(task) = next else { return };
            if let Err(e) = task.await {
                tracing::debug!(error = %e, "a followed tunnel's task failed");
            }
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        for task in self.running().drain(..) {
            task.abort();
        }
    }
}

impl Tunnels for Follower {
    fn follow(
        &self,
        agent: OnUpgrade,
        server: OnUpgrade,
        target: TunnelTarget,
    ) -> BoxFuture<'static, ()> {
        let insp = self.insp.clone();
        let origin = self.origin.clone();
        Box::pin(async move {
            let (agent, server) = match tokio::join!(agent, server) {
                (Ok(a), Ok(s)) => (a, s),
                (a, s) => {
                    let error = a.err().or(s.err()).map(|e| e.to_string());
                    tracing::debug!(pid = origin.process.pid, %target, ?error, "the tunnel closed before it opened");
                    return;
                }
            };
            let conn = Conn {
                conn_id: insp.next_conn_id(),
                insp: &insp,
                origin: &origin,
                tunnel: Some(target),
            };
            let mut agent = TokioIo::new(agent);
            let (seen, first) = read_first(&mut agent, conn.first_bytes_wait()).await;
            let agent: TunnelAgent = Prefixed::new(seen, agent);
            let server = Server::Tunnel(Box::new(TokioIo::new(server)));
            dispatch::route(agent, first, server, &conn).await;
        })
    }

    fn run(&self, task: BoxFuture<'static, ()>) {
        let handle = tokio::spawn(task);
        self.running().push(handle);
    }
}

/// Read the tunnel's first bytes until they are classified, the stream ends
/// or `wait` passes; returns them (to be put back) and the verdict.
async fn read_first<S: AsyncRead + Unpin>(
    io: &mut S,
    wait: Duration,
) -> (Vec<u8>, Result<FirstBytes, PeekError>) {
    let mut buf = Vec::with_capacity(FIRST_BYTES);
    let work = async {
        let mut chunk = [0u8; FIRST_BYTES];
        loop {
            let room = FIRST_BYTES - buf.len();
            let n = io.read(&mut chunk[..room]).await?;
            if n == 0 {
                return if buf.is_empty() {
                    Err(PeekError::Closed)
                } else {
                    Ok(client_hello::classify(&buf))
                };
            }
            buf.extend_from_slice(&chunk[..n]);
            match client_hello::classify(&buf) {
                FirstBytes::NeedMore if buf.len() < FIRST_BYTES => {}
                decided => return Ok(decided),
            }
        }
    };
    let verdict = match tokio::time::timeout(wait, work).await {
        Ok(v) => v,
        Err(_) => Err(PeekError::Timeout {
            timeout: wait,
            peeked: buf.len(),
        }),
    };
    (buf, verdict)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn first_bytes_are_classified_and_kept() {
        let (mut a, mut b) = tokio::io::duplex(64);
        b.write_all(b"POST /mcp HTTP/1.1\r\n").await.unwrap();
        let (seen, first) = read_first(&mut a, Duration::from_secs(5)).await;
        assert!(matches!(first, Ok(FirstBytes::Http)));
        let mut rest = Vec::new();
        drop(b);
        let mut back = Prefixed::new(seen, a);
        back.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"POST /mcp HTTP/1.1\r\n");
    }

    #[tokio::test]
    async fn garbage_silence_and_a_closed_tunnel() {
        let (mut a, mut b) = tokio::io::duplex(64);
        b.write_all(b"SSH-2.0-x\r\n").await.unwrap();
        let (_, first) = read_first(&mut a, Duration::from_secs(5)).await;
        assert!(matches!(first, Ok(FirstBytes::Other)));

        let (mut a, _b) = tokio::io::duplex(64);
        let (seen, first) = read_first(&mut a, Duration::from_millis(20)).await;
        assert!(seen.is_empty());
        assert!(matches!(first, Err(PeekError::Timeout { .. })));

        let (mut a, b) = tokio::io::duplex(64);
        drop(b);
        let (_, first) = read_first(&mut a, Duration::from_secs(5)).await;
        assert!(matches!(first, Err(PeekError::Closed)));
    }
}
