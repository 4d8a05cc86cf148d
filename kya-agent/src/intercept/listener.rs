//! Accept loops on 127.0.0.1 and ::1 at the instance's listen port, in the
//! host's network namespace and in every other namespace kya serves
//! ([`Acceptor`]; the namespaces' listeners are opened by `crate::netns`).
//!
//! Every accepted connection is resolved to its origin, looked up under the
//! namespace of the listener that accepted it; one that kya did not redirect
//! (nobody should connect to the listener directly) is refused.
//!
//! Connections are bounded in total and per process. One past either limit
//! is refused at once (audited with its process, then reset), never left
//! waiting for a place: a flood from one process cannot stall the accept
//! loop that serves every other.

use super::dispatch::{self, Inspection};
use super::origin::{ConnOrigin, OriginSource};
use super::{splice, upstream};
use crate::netns::Namespace;
use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

/// Interceptor settings.
#[derive(Debug, Clone)]
pub struct InterceptorConfig {
    /// Port on 127.0.0.1 and ::1.
    pub listen_port: u16,
    /// Connections handled at once, in total; one more is refused (reset,
    /// and audited with its process), never left waiting.
    pub max_connections: usize,
    /// Connections one process (thread group) may have open at once; one
    /// more is refused the same way, so one process cannot take the rest's.
    pub max_connections_per_process: usize,
    /// At shutdown, how long open connections may take to finish (answers
    /// to held calls denied because kya is stopping are written meanwhile)
    /// before they are closed.
    pub drain: std::time::Duration,
}

impl Default for InterceptorConfig {
    fn default() -> Self {
        Self {
            listen_port: crate::config::DEFAULT_LISTEN_PORT,
            max_connections: crate::config::DEFAULT_MAX_CONNECTIONS,
            max_connections_per_process: crate::config::DEFAULT_MAX_CONNECTIONS_PER_PROCESS,
            drain: DEFAULT_DRAIN,
        }
    }
}

/// How long open connections may finish at shutdown.
pub(crate) const DEFAULT_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Errors starting the interceptor.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// How many limit refusals may be waiting for their audit record at once;
/// past that, a refused connection is reset at once and only counted.
const MAX_REFUSING: usize = 256;

/// Counters of what the interceptor did.
#[derive(Debug, Default)]
pub struct InterceptStats {
    pub accepted: AtomicU64,
    pub unknown: AtomicU64,
    pub upstream_failed: AtomicU64,
    pub spliced: AtomicU64,
    /// Connections open now (admitted, not yet ended).
    pub open: AtomicU64,
    /// Connections refused because `max_connections` were open.
    pub refused_total_limit: AtomicU64,
    /// Connections refused because their process had
    /// `max_connections_per_process` open.
    pub refused_process_limit: AtomicU64,
    /// Of the refusals above, those reset without an audit record because
    /// too many refusals were being recorded already.
    pub refused_unrecorded: AtomicU64,
}

/// Open connections per process, bounded.
#[derive(Debug, Default)]
struct ProcessSlots(std::sync::Mutex<HashMap<u32, usize>>);

/// One connection counted against its process; dropping it gives it back.
struct ProcessSlot {
    slots: Arc<ProcessSlots>,
    pid: u32,
}

impl ProcessSlots {
    /// Count one more connection of `pid`, unless it has `limit` open.
    fn enter(self: &Arc<Self>, pid: u32, limit: usize) -> Option<ProcessSlot> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let open = map.entry(pid).or_insert(0);
        if *open >= limit {
            return None;
        }
        *open += 1;
        Some(ProcessSlot {
            slots: self.clone(),
            pid,
        })
    }
}

impl Drop for ProcessSlot {
    fn drop(&mut self) {
        let mut map = self.slots.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(open) = map.get_mut(&self.pid) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                map.remove(&self.pid);
            }
        }
    }
}

/// Whether an accepted connection was admitted under the total limit.
enum Admission {
    /// Served (if its process is under its own limit), holding one of the
    /// `max_connections` permits.
    Serve(OwnedSemaphorePermit),
    /// Refused: the total limit is reached; holds one of the refusal
    /// permits while the refusal is recorded.
    Refuse(OwnedSemaphorePermit),
}

/// What every connection task shares.
struct Shared {
    origins: Arc<dyn OriginSource>,
    inspection: Option<Arc<Inspection>>,
    stats: Arc<InterceptStats>,
    processes: Arc<ProcessSlots>,
    max_connections: usize,
    max_per_process: usize,
}

/// An accepted connection and the namespace of the listener that accepted
/// it (`None`: the host's).
type Accepted = (TcpStream, SocketAddr, Option<Arc<Namespace>>);

/// Feeds connections accepted by more listeners (those kya opens in other
/// network namespaces) into the interceptor.
#[derive(Clone)]
pub struct Acceptor {
    tx: tokio::sync::mpsc::Sender<Accepted>,
}

impl Acceptor {
    /// Accepts on `listener` until the returned task is aborted (or the
    /// interceptor stops); connections are attributed in namespace `netns`.
    /// Needs a tokio runtime.
    pub fn spawn(
        &self,
        listener: TcpListener,
        netns: Option<Arc<Namespace>>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(accept_loop(listener, self.tx.clone(), netns))
    }
}

async fn accept_loop(
    listener: TcpListener,
    tx: tokio::sync::mpsc::Sender<Accepted>,
    netns: Option<Arc<Namespace>>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                if tx.send((stream, peer, netns.clone())).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// The bound listeners, ready to serve.
pub struct Interceptor {
    listeners: Vec<TcpListener>,
    config: InterceptorConfig,
    stats: Arc<InterceptStats>,
    conn_tx: tokio::sync::mpsc::Sender<Accepted>,
    conn_rx: tokio::sync::mpsc::Receiver<Accepted>,
}

impl Interceptor {
    /// Bind 127.0.0.1 and ::1 (IPv6-only, so the two sockets do not collide).
    pub fn bind(config: InterceptorConfig) -> Result<Self, ListenError> {
        let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, config.listen_port));
        let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, config.listen_port));
        let listeners = vec![bind_one(v4)?, bind_one(v6)?];
        let (conn_tx, conn_rx) = tokio::sync::mpsc::channel(64);
        Ok(Self {
            listeners,
            config,
            stats: Arc::default(),
            conn_tx,
            conn_rx,
        })
    }

    /// A handle to add listeners (other network namespaces) to this
    /// interceptor.
    pub fn acceptor(&self) -> Acceptor {
        Acceptor {
            tx: self.conn_tx.clone(),
        }
    }

    /// Shared counters.
    pub fn stats(&self) -> Arc<InterceptStats> {
        self.stats.clone()
    }

    /// The addresses the interceptor listens on (127.0.0.1, then ::1).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Serve until `shutdown` turns true; then stop accepting, give open
    /// connections up to the drain deadline to finish, and end the rest
    /// (returning once they are dropped, so whatever they record on drop is
    /// recorded before the caller closes the audit log). With `inspection`, TLS and HTTP are inspected and
    /// governed; without, every connection is spliced unchanged.
    pub async fn serve(
        self,
        origins: Arc<dyn OriginSource>,
        inspection: Option<Arc<Inspection>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let permits = Arc::new(Semaphore::new(self.config.max_connections));
        let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
        let shared = Arc::new(Shared {
            origins,
            inspection,
            stats: self.stats.clone(),
            processes: Arc::default(),
            max_connections: self.config.max_connections,
            max_per_process: self.config.max_connections_per_process,
        });
        let mut accept_loops = JoinSet::new();
        let mut conn_rx = self.conn_rx;
        for listener in self.listeners {
            accept_loops.spawn(accept_loop(listener, self.conn_tx.clone(), None));
        }
        drop(self.conn_tx);
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                next = conn_rx.recv() => {
                    let Some((stream, peer, netns)) = next else { break };
                    // Never wait for a permit: a flood that holds them all
                    // gets refusals, and the accept loop keeps serving the
                    // connections that end.
                    let admission = match permits.clone().try_acquire_owned() {
                        Ok(p) => Admission::Serve(p),
                        Err(_) => match refusing.clone().try_acquire_owned() {
                            Ok(p) => Admission::Refuse(p),
                            Err(_) => {
                                refuse_unrecorded(stream, peer, netns, &shared);
                                continue;
                            }
                        },
                    };
                    let shared = shared.clone();
                    connections.spawn(async move {
                        handle(stream, peer, netns, admission, &shared).await;
                    });
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        accept_loops.abort_all();
        let open = connections.len();
        let drained = tokio::time::timeout(self.config.drain, async {
            while connections.join_next().await.is_some() {}
        })
        .await
        .is_ok();
        connections.abort_all();
        while connections.join_next().await.is_some() {}
        tracing::info!(open, drained, "interceptor stopped");
    }
}

fn bind_one(addr: SocketAddr) -> Result<TcpListener, ListenError> {
    let err = |source| ListenError::Bind { addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    bind_socket(socket, addr)
}

/// Binds and listens on `socket` (created in whichever network namespace
/// the listener is for) at `addr`; an IPv6 socket is IPv6-only, so the two
/// loopback listeners do not collide. Needs a tokio runtime.
pub(crate) fn bind_socket(socket: TcpSocket, addr: SocketAddr) -> Result<TcpListener, ListenError> {
    let err = |source| ListenError::Bind { addr, source };
    socket.set_reuseaddr(true).map_err(err)?;
    if addr.is_ipv6() {
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Ipv6V6Only, &true)
            .map_err(|e| err(e.into()))?;
    }
    socket.bind(addr).map_err(err)?;
    socket.listen(1024).map_err(err)
}

/// The origin of an accepted connection, taken from `origins` (so its
/// entry is gone however the connection ends); `None` when kya did not
/// redirect it (counted, and the caller resets it).
fn resolve(
    agent: &TcpStream,
    peer: SocketAddr,
    netns: Option<Arc<Namespace>>,
    shared: &Shared,
) -> Option<ConnOrigin> {
    let local = match agent.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "accepted socket has no local address");
            return None;
        }
    };
    let cookie = netns.as_ref().map_or(0, |n| n.cookie());
    match shared.origins.take(peer, local, cookie) {
        Ok(Some(mut o)) => {
            o.process.netns = netns.as_ref().map_or(0, |n| n.inode());
            o.netns = netns;
            Some(o)
        }
        Ok(None) => {
            shared.stats.unknown.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, %local, "connection was not redirected by kya; refusing it");
            None
        }
        Err(e) => {
            shared.stats.unknown.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%peer, error = %e, "cannot resolve connection origin; refusing it");
            None
        }
    }
}

/// Past every limit and with [`MAX_REFUSING`] refusals being recorded: reset
/// at once, counted, not recorded (the flood cannot make kya wait).
fn refuse_unrecorded(
    agent: TcpStream,
    peer: SocketAddr,
    netns: Option<Arc<Namespace>>,
    shared: &Shared,
) {
    shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
    if let Some(origin) = resolve(&agent, peer, netns, shared) {
        shared
            .stats
            .refused_total_limit
            .fetch_add(1, Ordering::Relaxed);
        shared
            .stats
            .refused_unrecorded
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(pid = origin.process.pid, dst = %origin.dst, "connection limit reached; resetting without a record");
    }
    reset(agent);
}

/// Refuse a connection at a connection limit: audited with its process when
/// kya inspects (the record first), then reset.
async fn refuse_at_limit(agent: TcpStream, origin: &ConnOrigin, shared: &Shared, reason: &str) {
    tracing::debug!(pid = origin.process.pid, dst = %origin.dst, reason, "connection limit reached");
    match &shared.inspection {
        Some(insp) => dispatch::refuse_unserved(agent, origin, insp, reason).await,
        None => reset(agent),
    }
}

/// Decrements the open-connections gauge when the connection ends.
struct OpenGuard<'a>(&'a AtomicU64);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn handle(
    agent: TcpStream,
    peer: SocketAddr,
    netns: Option<Arc<Namespace>>,
    admission: Admission,
    shared: &Shared,
) {
    let stats = &shared.stats;
    stats.accepted.fetch_add(1, Ordering::Relaxed);
    let Some(origin) = resolve(&agent, peer, netns, shared) else {
        reset(agent);
        return;
    };
    let _permit = match admission {
        Admission::Serve(p) => p,
        Admission::Refuse(_recording) => {
            stats.refused_total_limit.fetch_add(1, Ordering::Relaxed);
            let reason = format!(
                "kya's connection limit is reached ({} open, intercept.max_connections)",
                shared.max_connections
            );
            refuse_at_limit(agent, &origin, shared, &reason).await;
            return;
        }
    };
    let pid = origin.process.pid;
    let Some(_slot) = shared.processes.enter(pid, shared.max_per_process) else {
        stats.refused_process_limit.fetch_add(1, Ordering::Relaxed);
        let reason = format!(
            "process {pid} has reached its connection limit ({} open, intercept.max_connections_per_process)",
            shared.max_per_process
        );
        refuse_at_limit(agent, &origin, shared, &reason).await;
        return;
    };
    stats.open.fetch_add(1, Ordering::Relaxed);
    let _open = OpenGuard(&stats.open);
    log_connection(&origin, peer);
    let inspection = shared.inspection.as_ref();
    if let Some(insp) = inspection {
        dispatch::handle(agent, origin, insp).await;
        return;
    }
    let mut upstream = match upstream::connect_from(origin.dst, origin.netns.as_deref()).await {
        Ok(s) => s,
        Err(e) => {
            stats.upstream_failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(pid = origin.process.pid, dst = %origin.dst, error = %e, "upstream unreachable; resetting the agent's connection");
            reset(agent);
            return;
        }
    };
    let _ = agent.set_nodelay(true);
    let mut agent = agent;
    match splice::splice(&mut agent, &mut upstream).await {
        Ok(moved) => {
            stats.spliced.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(pid = origin.process.pid, dst = %origin.dst, to_upstream = moved.to_upstream, to_agent = moved.to_agent, "connection closed");
        }
        Err(e) => {
            tracing::debug!(pid = origin.process.pid, dst = %origin.dst, error = %e, "connection ended with an error");
        }
    }
}

fn log_connection(origin: &ConnOrigin, peer: SocketAddr) {
    let p = &origin.process;
    tracing::info!(
        pid = p.pid,
        tid = origin.tid,
        uid = p.uid,
        gid = p.gid,
        comm = %p.comm,
        exe = %p.exe,
        cgroup = %p.cgroup,
        netns = p.netns,
        dst = %origin.dst,
        %peer,
        "intercepted connection"
    );
}

/// Close with RST, so the agent sees a refused/reset connection rather than an
/// orderly empty reply.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[derive(Default)]
    struct Table(Mutex<HashMap<SocketAddr, SocketAddr>>);

    impl OriginSource for Table {
        fn take(
            &self,
            peer: SocketAddr,
            _local: SocketAddr,
            _netns: u64,
        ) -> Result<Option<ConnOrigin>, super::super::origin::OriginError> {
            let dst = self.0.lock().unwrap().remove(&peer);
            Ok(dst.map(|dst| ConnOrigin {
                dst,
                process: kya_common::ProcessIdentity {
                    pid: std::process::id(),
                    ..Default::default()
                },
                tid: 0,
                cgroup_id: 0,
                netns: None,
            }))
        }
    }

    #[tokio::test]
    async fn splices_known_connections_and_resets_unknown_ones() {
        if !kya_testkit::root_or_skip(
            "splices_known_connections_and_resets_unknown_ones",
            "needs root (privileged port, SO_MARK)",
        ) {
            return;
        }
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let interceptor = Interceptor::bind(InterceptorConfig {
            listen_port: 987,
            max_connections: 8,
            max_connections_per_process: 8,
            drain: std::time::Duration::from_millis(100),
        })
        .unwrap();
        let table = Arc::new(Table::default());
        let (stop_tx, stop_rx) = watch::channel(false);
        let server = tokio::spawn(interceptor.serve(table.clone(), None, stop_rx));

        // A known connection: registered before connecting, by its source address.
        let sock = TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let src = sock.local_addr().unwrap();
        table.0.lock().unwrap().insert(src, echo_addr);
        let mut s = sock
            .connect("127.0.0.1:987".parse().unwrap())
            .await
            .unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");

        // An unknown connection is reset: the read fails or returns EOF, never data.
        let mut u = TcpStream::connect("[::1]:987").await.unwrap();
        let _ = u.write_all(b"ping").await;
        let mut buf = [0u8; 4];
        let got = u.read(&mut buf).await;
        assert!(matches!(got, Ok(0) | Err(_)), "{got:?}");

        stop_tx.send(true).unwrap();
        server.await.unwrap();
    }
}
