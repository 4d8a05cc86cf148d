//! What happens to a connection once its origin is known: look at its first
//! bytes and choose a path.
//!
//! * TLS to a `passthrough` host whose name resolves to the original
//!   destination → spliced unchanged (the ClientHello replayed). A passthrough
//!   name on any other address is refused: the name is the agent's word only.
//! * TLS otherwise → upstream TLS to the original destination, verifying its
//!   real certificate, then the agent's TLS terminated with a leaf from kya's
//!   CA speaking the ALPN the upstream agreed, then the HTTP/MCP proxy. An ALPN
//!   offer with nothing kya speaks (h2, http/1.1) is refused.
//! * Plaintext HTTP → the HTTP/MCP proxy.
//! * Anything else, or silence until the first-bytes timeout → refused
//!   (reset, audited with the process). Only on a port the configuration names
//!   in `splice_ports` is such traffic spliced unchanged; there a client that
//!   stays silent for [`SERVER_FIRST_WAIT`] is taken for a server-speaks-first
//!   protocol.
//!
//! An upstream certificate that fails verification is never bypassed: the
//! refusal is audited and the agent gets a fatal TLS alert, or, when both
//! handshakes ran at once for an upstream met before, a reset before any of
//! its bytes is read ([`crate::tls::agreed_alpn`]).
//!
//! A followed `CONNECT` tunnel ([`super::tunnel`]) takes the same path, with
//! the tunnel as the server side and its target (the CONNECT authority) as
//! the destination: the TLS name must be the target's (a passthrough name is
//! refused there: kya cannot check where the proxy takes it), and splice
//! rules look at the target's port.

use super::http::{self, ConnFacts, Governor, HttpVersion, Limits, TunnelTarget};
use super::names::NameResolver;
use super::origin::ConnOrigin;
use super::tunnel::Follower;
use super::{splice, upstream};
use crate::tls::agreed_alpn::AlpnKey;
use crate::tls::client_hello::{self, ClientHelloError, FirstBytes, HelloLimits, PeekError};
use crate::tls::terminate::{refuse, UPSTREAM_CERT_ALERT};
use crate::tls::upstream::{alpn_to_offer, UpstreamError};
use crate::tls::TlsContext;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// On a splice port: how long a silent client is waited for before the
/// connection is taken for a server-speaks-first protocol and spliced.
pub const SERVER_FIRST_WAIT: Duration = Duration::from_secs(3);

/// What to do with traffic that is neither TLS nor HTTP.
#[derive(Debug, Clone)]
pub struct Unclassified {
    /// Ports where it is spliced (an explicit choice); refused elsewhere.
    pub splice_ports: BTreeSet<u16>,
    /// Longest silence before the first bytes; then the connection is refused.
    pub first_bytes_timeout: Duration,
}

impl Default for Unclassified {
    fn default() -> Self {
        Self {
            splice_ports: BTreeSet::new(),
            first_bytes_timeout: crate::config::DEFAULT_FIRST_BYTES_TIMEOUT,
        }
    }
}

impl Unclassified {
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        Self {
            splice_ports: cfg.splice_ports.iter().copied().collect(),
            first_bytes_timeout: cfg.first_bytes_timeout,
        }
    }
}

/// Everything inspection needs, shared by all connections.
pub struct Inspection {
    pub tls: TlsContext,
    pub governor: Arc<dyn Governor>,
    pub limits: Limits,
    pub unclassified: Unclassified,
    pub names: Arc<NameResolver>,
    next_conn: AtomicU64,
}

impl Inspection {
    pub fn new(
        tls: TlsContext,
        governor: Arc<dyn Governor>,
        limits: Limits,
        unclassified: Unclassified,
        names: Arc<NameResolver>,
    ) -> Self {
        Self {
            tls,
            governor,
            limits,
            unclassified,
            names,
            next_conn: AtomicU64::new(1),
        }
    }

    /// A new connection number (also for each followed tunnel).
    pub(crate) fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }
}

/// The agent's side of a connection: the redirected socket, or the agent's
/// side of a followed tunnel.
pub(crate) trait AgentStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Make the coming close a reset where the transport allows it.
    fn reset(&self) {}
}

impl AgentStream for TcpStream {
    fn reset(&self) {
        let _ = self.set_zero_linger();
    }
}

/// A server side, whatever carries it.
pub(crate) trait ServerStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ServerStream for T {}

/// How the server side is reached once kya goes on.
pub(crate) enum Server {
    /// A new TCP connection to the original destination.
    Direct,
    /// The tunnel a proxy opened, already connected.
    Tunnel(Box<dyn ServerStream>),
}

/// One connection being dispatched: who, where, and through what.
pub(crate) struct Conn<'a> {
    pub insp: &'a Arc<Inspection>,
    /// The process, and the destination its TCP connection went to (for a
    /// tunnel: the proxy).
    pub origin: &'a ConnOrigin,
    pub conn_id: u64,
    /// For a followed tunnel: its target.
    pub tunnel: Option<TunnelTarget>,
}

impl Conn<'_> {
    fn facts(&self, sni: Option<String>, tls: bool) -> Arc<ConnFacts> {
        Arc::new(ConnFacts {
            process: self.origin.process.clone(),
            dst: self.origin.dst,
            sni,
            tls,
            conn_id: self.conn_id,
            tunnel: self.tunnel.clone(),
        })
    }

    /// The port splice rules look at: the destination's, or the tunnel target's.
    pub(crate) fn port(&self) -> u16 {
        match &self.tunnel {
            Some(t) => t.port,
            None => self.origin.dst.port(),
        }
    }

    /// Where the bytes were headed, for refusal reasons.
    fn place(&self) -> String {
        match &self.tunnel {
            Some(t) => format!("the CONNECT tunnel to {t}"),
            None => format!("guarded port {}", self.origin.dst.port()),
        }
    }

    pub(crate) fn splice_port(&self) -> bool {
        self.insp.unclassified.splice_ports.contains(&self.port())
    }

    /// How long the first bytes are waited for.
    pub(crate) fn first_bytes_wait(&self) -> Duration {
        if self.splice_port() {
            SERVER_FIRST_WAIT
        } else {
            self.insp.unclassified.first_bytes_timeout
        }
    }

    /// What follows `CONNECT` on an HTTP connection of this one.
    fn follower(&self) -> Arc<Follower> {
        Arc::new(Follower::new(self.insp.clone(), self.origin.clone()))
    }
}

/// Handle one redirected connection to its end.
pub async fn handle(agent: TcpStream, origin: ConnOrigin, insp: &Arc<Inspection>) {
    // Both legs carry small writes (frames, SSE events): never wait for an ACK.
    let _ = agent.set_nodelay(true);
    let conn = Conn {
        insp,
        conn_id: insp.next_conn_id(),
        origin: &origin,
        tunnel: None,
    };
    // The executable's digest (credential evidence, `exe_sha256` selectors)
    // and the process facts the first decision records, read while the
    // handshake and the first request arrive, not during that decision.
    crate::decision::prewarm_connection(conn.conn_id, &origin.process);
    let first = client_hello::peek_classify(&agent, conn.first_bytes_wait()).await;
    route(agent, first, Server::Direct, &conn).await;
}

/// Refuse a redirected connection before looking at its bytes (a connection
/// limit is reached): audited with its process (the record written first),
/// then reset.
pub(crate) async fn refuse_unserved(
    agent: TcpStream,
    origin: &ConnOrigin,
    insp: &Arc<Inspection>,
    reason: &str,
) {
    let conn = Conn {
        insp,
        conn_id: insp.next_conn_id(),
        origin,
        tunnel: None,
    };
    refuse_connection(agent, &conn, &conn.facts(None, false), reason).await;
}

/// Take the path the first bytes say (see the module documentation). `agent`
/// still holds those bytes (peeked, or put back in front).
pub(crate) async fn route<A: AgentStream>(
    agent: A,
    first: Result<FirstBytes, PeekError>,
    server: Server,
    conn: &Conn<'_>,
) {
    let (conn_id, pid, dst) = (conn.conn_id, conn.origin.process.pid, conn.origin.dst);
    let splice_port = conn.splice_port();
    let refusal = match first {
        Ok(FirstBytes::Tls) => return tls_path(agent, server, conn, splice_port).await,
        Ok(FirstBytes::Http) => {
            // A tunnel cannot be reopened: only a direct connection reconnects.
            let direct = matches!(server, Server::Direct);
            let Some(up) = server.open(conn.origin).await else {
                agent.reset();
                return;
            };
            let tunnels = conn.follower();
            let reconnect = direct.then(|| plain_reconnect(dst, conn.origin.netns.clone()));
            // Boxed, as in `tls_path`: this task's other states stay small.
            if let Err(e) = Box::pin(http::serve_http_with(
                agent,
                up,
                HttpVersion::Detect,
                conn.facts(None, false),
                conn.insp.governor.clone(),
                &conn.insp.limits,
                conn.insp.names.clone(),
                reconnect,
                Some(tunnels.clone()),
            ))
            .await
            {
                tracing::debug!(conn_id, pid, %dst, error = %e, "plaintext HTTP connection ended with an error");
            }
            tunnels.join().await;
            return;
        }
        Ok(FirstBytes::Other) | Ok(FirstBytes::NeedMore) if splice_port => {
            tracing::debug!(conn_id, pid, %dst, place = conn.place(), "neither TLS nor HTTP on a splice port: splicing unchanged");
            return splice_plain(agent, server, conn.origin, &[]).await;
        }
        Err(PeekError::Timeout { .. }) if splice_port => {
            tracing::debug!(conn_id, pid, %dst, place = conn.place(), "silent client on a splice port: splicing unchanged");
            return splice_plain(agent, server, conn.origin, &[]).await;
        }
        Ok(FirstBytes::Other) | Ok(FirstBytes::NeedMore) => {
            format!("neither TLS nor HTTP on {}", conn.place())
        }
        Err(PeekError::Timeout { timeout, peeked }) => format!(
            "no TLS or HTTP within {timeout:?} on {} ({peeked} bytes seen)",
            conn.place()
        ),
        Err(e) => {
            tracing::debug!(conn_id, pid, %dst, error = %e, "connection closed before its first bytes");
            return;
        }
    };
    refuse_connection(agent, conn, &conn.facts(None, false), &refusal).await;
}

/// Refuse a connection kya cannot judge: audited with its process (the record
/// written first), then reset.
async fn refuse_connection<A: AgentStream>(
    agent: A,
    conn: &Conn<'_>,
    facts: &Arc<ConnFacts>,
    reason: &str,
) {
    tracing::info!(pid = conn.origin.process.pid, dst = %conn.origin.dst, reason, "refusing a connection kya cannot inspect");
    conn.insp.governor.refused_on_record(facts, reason).await;
    agent.reset();
    drop(agent);
}

/// Refuse a TLS connection with `alert` (audited: the record written first).
async fn refuse_tls<A: AgentStream>(
    agent: A,
    conn: &Conn<'_>,
    facts: &Arc<ConnFacts>,
    reason: &str,
    alert: rustls::AlertDescription,
) {
    tracing::info!(pid = conn.origin.process.pid, dst = %conn.origin.dst, reason, "refusing a connection kya cannot inspect");
    conn.insp.governor.refused_on_record(facts, reason).await;
    refuse(agent, alert).await;
}

/// Inside a tunnel the agent's TLS name must be the tunnel's target (or,
/// for a target written as an address, no name at all): the name the leaf
/// is minted for and the upstream certificate is verified against.
fn tunnel_name(target: &TunnelTarget, sni: Option<&str>) -> Result<String, String> {
    match sni {
        Some(n) if crate::mcp::headers::normalize_host(n).ok().as_deref() == Some(&target.host) => {
            Ok(target.host.clone())
        }
        None if target.host.parse::<IpAddr>().is_ok() => Ok(target.host.clone()),
        Some(n) => Err(format!(
            "TLS server name {n} is not the target of the CONNECT tunnel ({target})"
        )),
        None => Err(format!(
            "TLS without a server name in the CONNECT tunnel to {target}"
        )),
    }
}

/// A TLS connection: judged and proxied, spliced (passthrough, or a non-HTTP
/// protocol on a splice port) or refused.
///
/// The connection's task lives as long as the agent keeps it open, mostly
/// idle, and a task's size is that of its largest state. So what runs only
/// before the proxy starts (the ClientHello, both handshakes) runs boxed and
/// is freed once done, and the proxy runs boxed too, holding only its own
/// state: an idle connection does not keep ≈10 KiB of handshake state.
async fn tls_path<A: AgentStream>(agent: A, server: Server, conn: &Conn<'_>, splice_port: bool) {
    let insp = conn.insp;
    let (serve, tunnels, conn_id) =
        match Box::pin(tls_handshakes(agent, server, conn, splice_port)).await {
            Some(legs) => {
                let tunnels = conn.follower();
                let conn_id = legs.facts.conn_id;
                let serve = Box::pin(http::serve_http_with(
                    legs.agent,
                    legs.upstream,
                    legs.version,
                    legs.facts,
                    insp.governor.clone(),
                    &insp.limits,
                    insp.names.clone(),
                    legs.reconnect,
                    Some(tunnels.clone()),
                ));
                (serve, tunnels, conn_id)
            }
            None => return,
        };
    if let Err(e) = serve.await {
        let (pid, dst) = (conn.origin.process.pid, conn.origin.dst);
        tracing::debug!(conn_id, pid, %dst, error = %e, "TLS connection ended with an error");
    }
    tunnels.join().await;
}

/// Both legs of an inspected TLS connection, ready for the HTTP proxy.
struct TlsLegs<A: AgentStream> {
    agent: tokio_rustls::server::TlsStream<A>,
    upstream: tokio_rustls::client::TlsStream<Box<dyn ServerStream>>,
    version: HttpVersion,
    facts: Arc<ConnFacts>,
    reconnect: Option<http::client::Reconnect>,
}

/// [`tls_path`] up to the proxy: read the ClientHello, then splice, refuse,
/// or complete both handshakes. `None`: the connection was handled here
/// (spliced, refused, or it ended).
async fn tls_handshakes<A: AgentStream>(
    mut agent: A,
    server: Server,
    conn: &Conn<'_>,
    splice_port: bool,
) -> Option<TlsLegs<A>> {
    let dst = conn.origin.dst;
    let pid = conn.origin.process.pid;
    let insp = conn.insp;
    let hello = match client_hello::read_client_hello(&mut agent, HelloLimits::default()).await {
        Ok(h) => h,
        Err(e @ (ClientHelloError::Io(_) | ClientHelloError::Closed { .. })) => {
            tracing::debug!(pid, %dst, error = %e, "connection ended before a complete ClientHello");
            return None;
        }
        Err(e) => {
            // Nothing was sent upstream: the connection ends here, on the record.
            let reason = format!("no usable TLS ClientHello: {e}");
            refuse_connection(agent, conn, &conn.facts(None, true), &reason).await;
            return None;
        }
    };
    let sni = hello.info.sni.clone();
    // The name the server is known by: the SNI, or inside a tunnel its
    // target (which the SNI must be).
    let (sni, leaf_ip) = match &conn.tunnel {
        None => (sni, dst.ip()),
        Some(t) => match tunnel_name(t, sni.as_deref()) {
            Ok(name) => {
                let ip = name.parse::<IpAddr>().unwrap_or(dst.ip());
                (Some(name), ip)
            }
            Err(reason) => {
                let facts = conn.facts(sni, true);
                refuse_tls(
                    agent,
                    conn,
                    &facts,
                    &reason,
                    rustls::AlertDescription::UnrecognisedName,
                )
                .await;
                return None;
            }
        },
    };
    if let Some(name) = sni.as_deref() {
        if let Some(pattern) = insp.tls.passthrough.matching(name) {
            let facts = conn.facts(sni.clone(), true);
            if let Some(t) = &conn.tunnel {
                let reason = format!("passthrough name {name} in the CONNECT tunnel to {t}: kya cannot check where the proxy takes it");
                refuse_connection(agent, conn, &facts, &reason).await;
                return None;
            }
            match insp.names.resolves_to(name, dst.ip()).await {
                Ok(true) => {
                    tracing::info!(pid, %dst, sni = name, pattern, "passthrough host: splicing without decryption");
                    let raw = hello.into_raw();
                    splice_plain(agent, server, conn.origin, &raw).await;
                }
                Ok(false) => {
                    let reason =
                        format!("passthrough name {name} does not resolve to {}", dst.ip());
                    refuse_connection(agent, conn, &facts, &reason).await;
                }
                Err(e) => {
                    let reason = format!("passthrough name {name} cannot be checked: {e}");
                    refuse_connection(agent, conn, &facts, &reason).await;
                }
            }
            return None;
        }
    }
    if let Err(UpstreamError::UninspectableAlpn { offered }) = alpn_to_offer(&hello.info.alpn) {
        if splice_port {
            tracing::info!(pid, %dst, offered, place = conn.place(), "TLS with a non-HTTP ALPN on a splice port: splicing unchanged");
            let raw = hello.into_raw();
            splice_plain(agent, server, conn.origin, &raw).await;
            return None;
        }
        let reason = format!("TLS offering only protocols kya cannot inspect ({offered})");
        let facts = conn.facts(sni, true);
        refuse_tls(
            agent,
            conn,
            &facts,
            &reason,
            rustls::AlertDescription::NoApplicationProtocol,
        )
        .await;
        return None;
    }
    let info = client_hello::ClientHelloInfo {
        sni: sni.clone(),
        alpn: hello.info.alpn.clone(),
    };
    let name = match info.leaf_name(leaf_ip) {
        Ok(n) => n,
        Err(e) => {
            let reason = format!("unusable TLS server name: {e}");
            let facts = conn.facts(sni, true);
            refuse_tls(
                agent,
                conn,
                &facts,
                &reason,
                rustls::AlertDescription::UnrecognisedName,
            )
            .await;
            return None;
        }
    };
    let direct = matches!(server, Server::Direct);
    let hello_alpn = hello.info.alpn.clone();
    let key = AlpnKey {
        netns: conn.origin.netns.as_ref().map_or(0, |n| n.cookie()),
        dst,
        name: name.clone(),
        offer: alpn_to_offer(&hello_alpn).unwrap_or_default(),
    };
    let (up, agent_tls) = match insp.tls.agreed_alpn.recall(&key) {
        Some(expected) => {
            both_handshakes(agent, hello, server, conn, &key, sni.clone(), expected).await
        }
        None => handshakes_in_turn(agent, hello, server, conn, &key, sni.clone()).await,
    }?;
    let version = match up.alpn.as_deref() {
        Some(b"h2") => HttpVersion::H2,
        _ => HttpVersion::H1,
    };
    let reconnect = direct.then(|| {
        let netns = conn.origin.netns.clone();
        tls_reconnect(insp, dst, netns, name, hello_alpn, up.alpn.clone())
    });
    Some(TlsLegs {
        agent: agent_tls,
        upstream: up.stream,
        version,
        facts: conn.facts(sni, true),
        reconnect,
    })
}

/// The two legs of an inspected TLS connection, verified and agreeing on ALPN.
type Handshaken<A> = (
    crate::tls::upstream::Upstream<Box<dyn ServerStream>>,
    tokio_rustls::server::TlsStream<A>,
);

/// The upstream's handshake first, then the agent's speaking what the
/// upstream agreed (an upstream kya has not connected to before). A failed
/// upstream is refused to the agent with a TLS alert, on the record. `None`:
/// the connection has ended.
async fn handshakes_in_turn<A: AgentStream>(
    agent: A,
    hello: client_hello::PeekedHello,
    server: Server,
    conn: &Conn<'_>,
    key: &AlpnKey,
    sni: Option<String>,
) -> Option<Handshaken<A>> {
    let (insp, pid, dst) = (conn.insp, conn.origin.process.pid, conn.origin.dst);
    let Some(io) = server.open(conn.origin).await else {
        agent.reset();
        return None;
    };
    let up = match insp
        .tls
        .upstream
        .connect(io, &key.name, &hello.info.alpn)
        .await
    {
        Ok(up) => up,
        Err(e) => {
            let reason = upstream_refused(&key.name, &e);
            tracing::warn!(pid, %dst, error = %e, "upstream TLS failed; refusing the agent");
            let facts = conn.facts(sni, true);
            refuse_tls(agent, conn, &facts, &reason, UPSTREAM_CERT_ALERT).await;
            return None;
        }
    };
    insp.tls.agreed_alpn.learn(key.clone(), up.alpn.clone());
    match insp
        .tls
        .terminator
        .terminate(agent, hello, &key.name, up.alpn.as_deref())
        .await
    {
        Ok(agent_tls) => Some((up, agent_tls)),
        Err(e) => {
            tracing::info!(pid, %dst, error = %e, "agent TLS handshake failed");
            None
        }
    }
}

/// Both handshakes at once, the agent's speaking `expected`, what this
/// upstream agreed last time. The connection goes on only if the upstream's
/// certificate verified and it agreed `expected` again; otherwise the agent's
/// connection is reset before kya reads a byte of it, the reason is on the
/// record, and the memory is corrected for the next connection. `None`: the
/// connection has ended.
async fn both_handshakes<A: AgentStream>(
    agent: A,
    hello: client_hello::PeekedHello,
    server: Server,
    conn: &Conn<'_>,
    key: &AlpnKey,
    sni: Option<String>,
    expected: Option<Vec<u8>>,
) -> Option<Handshaken<A>> {
    let (insp, pid, dst) = (conn.insp, conn.origin.process.pid, conn.origin.dst);
    let offered = hello.info.alpn.clone();
    let upstream = async {
        let io = server.open(conn.origin).await?;
        Some(insp.tls.upstream.connect(io, &key.name, &offered).await)
    };
    let agent_side = insp
        .tls
        .terminator
        .terminate(agent, hello, &key.name, expected.as_deref());
    let (up, agent_tls) = tokio::join!(upstream, agent_side);
    let agent_tls = match agent_tls {
        Ok(t) => t,
        Err(e) => {
            tracing::info!(pid, %dst, error = %e, "agent TLS handshake failed");
            if !matches!(up, Some(Ok(_))) {
                insp.tls.agreed_alpn.forget(key);
            }
            // An upstream refused for its certificate is on the record as
            // when the handshakes run in turn, whatever the agent's did.
            if let Some(Err(e)) = up {
                tracing::warn!(pid, %dst, error = %e, "upstream TLS failed; refusing the agent");
                let reason = upstream_refused(&key.name, &e);
                conn.insp
                    .governor
                    .refused_on_record(&conn.facts(sni, true), &reason)
                    .await;
            }
            return None;
        }
    };
    let reason = match up {
        Some(Ok(up)) if up.alpn == expected => return Some((up, agent_tls)),
        Some(Ok(up)) => {
            insp.tls.agreed_alpn.learn(key.clone(), up.alpn.clone());
            format!(
                "upstream {} agreed ALPN {} where it agreed {} before; the connection is closed so that the agent's next one speaks it",
                key.name,
                alpn_label(up.alpn.as_deref()),
                alpn_label(expected.as_deref()),
            )
        }
        Some(Err(e)) => {
            insp.tls.agreed_alpn.forget(key);
            tracing::warn!(pid, %dst, error = %e, "upstream TLS failed; refusing the agent");
            upstream_refused(&key.name, &e)
        }
        None => {
            insp.tls.agreed_alpn.forget(key);
            format!("upstream {dst} unreachable")
        }
    };
    let facts = conn.facts(sni, true);
    conn.insp.governor.refused_on_record(&facts, &reason).await;
    agent_tls.get_ref().0.reset();
    None
}

/// Why an agent is refused when its upstream's TLS failed.
fn upstream_refused(name: &crate::ca::LeafName, e: &UpstreamError) -> String {
    format!("upstream TLS to {name} refused: {e}")
}

fn alpn_label(alpn: Option<&[u8]>) -> String {
    alpn.map_or_else(
        || "none".into(),
        |p| String::from_utf8_lossy(p).into_owned(),
    )
}

impl Server {
    /// The server side as a stream: a new connection to the original
    /// destination, or the tunnel. `None`: unreachable (the caller resets
    /// the agent).
    async fn open(self, origin: &ConnOrigin) -> Option<Box<dyn ServerStream>> {
        match self {
            Server::Tunnel(s) => Some(s),
            Server::Direct => {
                match upstream::connect_from(origin.dst, origin.netns.as_deref()).await {
                    Ok(s) => Some(Box::new(s)),
                    Err(e) => {
                        tracing::warn!(pid = origin.process.pid, dst = %origin.dst, error = %e, "upstream unreachable; resetting the agent's connection");
                        None
                    }
                }
            }
        }
    }
}

/// A new verified TLS connection to the same destination, name and ALPN (the
/// proxy's upstream leg after the server ended the first one). A different
/// protocol agreed this time is a failure: the agent's leg speaks the first.
fn tls_reconnect(
    insp: &Inspection,
    dst: std::net::SocketAddr,
    netns: Option<Arc<crate::netns::Namespace>>,
    name: crate::ca::LeafName,
    alpn: Vec<Vec<u8>>,
    agreed: Option<Vec<u8>>,
) -> http::client::Reconnect {
    let connector = insp.tls.upstream.clone();
    Arc::new(move || {
        let (connector, name, alpn, agreed, netns) = (
            connector.clone(),
            name.clone(),
            alpn.clone(),
            agreed.clone(),
            netns.clone(),
        );
        Box::pin(async move {
            let tcp = upstream::connect_from(dst, netns.as_deref())
                .await
                .map_err(|e| e.to_string())?;
            let up = connector
                .connect(tcp, &name, &alpn)
                .await
                .map_err(|e| format!("upstream TLS to {name}: {e}"))?;
            if up.alpn != agreed {
                return Err(format!("upstream {name} agreed another protocol this time"));
            }
            Ok(Box::new(up.stream) as Box<dyn http::client::Io>)
        })
    })
}

/// A new TCP connection to the original destination (the proxy's upstream
/// leg after the server ended the first one).
fn plain_reconnect(
    dst: std::net::SocketAddr,
    netns: Option<Arc<crate::netns::Namespace>>,
) -> http::client::Reconnect {
    Arc::new(move || {
        let netns = netns.clone();
        Box::pin(async move {
            upstream::connect_from(dst, netns.as_deref())
                .await
                .map(|s| Box::new(s) as Box<dyn http::client::Io>)
                .map_err(|e| e.to_string())
        })
    })
}

/// Splice to the server side, first replaying `already_read`.
async fn splice_plain<A: AgentStream>(
    mut agent: A,
    server: Server,
    origin: &ConnOrigin,
    already_read: &[u8],
) {
    let Some(mut up) = server.open(origin).await else {
        agent.reset();
        return;
    };
    if !already_read.is_empty() {
        if let Err(e) = up.write_all(already_read).await {
            tracing::debug!(dst = %origin.dst, error = %e, "replaying the first bytes upstream failed");
            return;
        }
    }
    match splice::splice(&mut agent, &mut up).await {
        Ok(moved) => {
            tracing::debug!(pid = origin.process.pid, dst = %origin.dst, to_upstream = moved.to_upstream, to_agent = moved.to_agent, "spliced connection closed")
        }
        Err(e) => {
            tracing::debug!(pid = origin.process.pid, dst = %origin.dst, error = %e, "spliced connection ended with an error")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(host: &str) -> TunnelTarget {
        TunnelTarget {
            host: host.into(),
            port: 443,
        }
    }

    #[test]
    fn inside_a_tunnel_the_tls_name_is_the_target() {
        let t = target("mcp.example.com");
        assert_eq!(
            tunnel_name(&t, Some("mcp.example.com")).unwrap(),
            "mcp.example.com"
        );
        assert_eq!(
            tunnel_name(&t, Some("MCP.example.com.")).unwrap(),
            "mcp.example.com"
        );
        for bad in [
            Some("trusted.example.com"),
            Some("example.com"),
            Some(""),
            None,
        ] {
            assert!(tunnel_name(&t, bad).is_err(), "{bad:?}");
        }
        // An address as the target: no SNI (clients send none for an
        // address) or the address itself.
        let ip = target("127.0.0.2");
        assert_eq!(tunnel_name(&ip, None).unwrap(), "127.0.0.2");
        assert_eq!(tunnel_name(&ip, Some("127.0.0.2")).unwrap(), "127.0.0.2");
        assert!(tunnel_name(&ip, Some("mcp.example.com")).is_err());
        let v6 = target("::1");
        assert_eq!(tunnel_name(&v6, None).unwrap(), "::1");
    }
}
