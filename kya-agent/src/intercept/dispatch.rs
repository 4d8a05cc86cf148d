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
//! agent gets a fatal TLS alert and the refusal is audited.

use super::http::{self, ConnFacts, Governor, HttpVersion, Limits};
use super::names::NameResolver;
use super::origin::ConnOrigin;
use super::{splice, upstream};
use crate::tls::client_hello::{self, ClientHelloError, FirstBytes, HelloLimits, PeekError};
use crate::tls::terminate::{refuse, UPSTREAM_CERT_ALERT};
use crate::tls::upstream::{alpn_to_offer, UpstreamError};
use crate::tls::TlsContext;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// On a splice port: how long a silent client is waited for before the
/// connection is taken for a server-speaks-first protocol and spliced.
pub const SERVER_FIRST_WAIT: Duration = Duration::from_secs(3);

/// What to do with traffic that is neither TLS nor HTTP.
#[derive(Debug, Clone)]
pub struct Unclassified {
    /// Guarded ports where it is spliced (an explicit choice); refused elsewhere.
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
}

/// Handle one redirected connection to its end.
pub async fn handle(agent: TcpStream, origin: ConnOrigin, insp: &Inspection) {
    let conn_id = insp.next_conn.fetch_add(1, Ordering::Relaxed);
    let pid = origin.process.pid;
    let dst = origin.dst;
    // Both legs carry small writes (frames, SSE events): never wait for an ACK.
    let _ = agent.set_nodelay(true);
    // The executable's digest (credential evidence, `exe_sha256` selectors),
    // computed while the handshake and the first request arrive, not during
    // the first decision.
    crate::exe_digest::prewarm(&origin.process);
    let facts = |sni: Option<String>, tls: bool| {
        Arc::new(ConnFacts {
            process: origin.process.clone(),
            dst,
            sni,
            tls,
            conn_id,
        })
    };
    let splice_port = insp.unclassified.splice_ports.contains(&dst.port());
    let wait = if splice_port {
        SERVER_FIRST_WAIT
    } else {
        insp.unclassified.first_bytes_timeout
    };
    let refusal = match client_hello::peek_classify(&agent, wait).await {
        Ok(FirstBytes::Tls) => return tls_path(agent, &origin, insp, facts, splice_port).await,
        Ok(FirstBytes::Http) => {
            let Some(up) = connect_or_reset(&agent, &origin).await else {
                return;
            };
            let conn = facts(None, false);
            let reconnect: http::client::Reconnect = Arc::new(move || {
                Box::pin(async move {
                    upstream::connect(dst)
                        .await
                        .map(|s| Box::new(s) as Box<dyn http::client::Io>)
                        .map_err(|e| e.to_string())
                })
            });
            if let Err(e) = http::serve_http(
                agent,
                up,
                HttpVersion::Detect,
                conn,
                insp.governor.clone(),
                &insp.limits,
                insp.names.clone(),
                Some(reconnect),
            )
            .await
            {
                tracing::debug!(conn_id, pid, %dst, error = %e, "plaintext HTTP connection ended with an error");
            }
            return;
        }
        Ok(FirstBytes::Other) | Ok(FirstBytes::NeedMore) if splice_port => {
            tracing::debug!(conn_id, pid, %dst, "neither TLS nor HTTP on a splice port: splicing unchanged");
            return splice_plain(agent, &origin, &[]).await;
        }
        Err(PeekError::Timeout { .. }) if splice_port => {
            tracing::debug!(conn_id, pid, %dst, "silent client on a splice port: splicing unchanged");
            return splice_plain(agent, &origin, &[]).await;
        }
        Ok(FirstBytes::Other) | Ok(FirstBytes::NeedMore) => {
            format!("neither TLS nor HTTP on guarded port {}", dst.port())
        }
        Err(PeekError::Timeout { timeout, peeked }) => format!(
            "no TLS or HTTP within {timeout:?} on guarded port {} ({peeked} bytes seen)",
            dst.port()
        ),
        Err(e) => {
            tracing::debug!(conn_id, pid, %dst, error = %e, "connection closed before its first bytes");
            return;
        }
    };
    refuse_connection(agent, &origin, insp, &facts(None, false), &refusal);
}

/// Refuse a connection kya cannot judge: audited with its process, then reset.
fn refuse_connection(
    agent: TcpStream,
    origin: &ConnOrigin,
    insp: &Inspection,
    conn: &Arc<ConnFacts>,
    reason: &str,
) {
    tracing::info!(pid = origin.process.pid, dst = %origin.dst, reason, "refusing a connection kya cannot inspect");
    insp.governor.refused(conn, reason);
    let _ = agent.set_zero_linger();
    drop(agent);
}

async fn tls_path(
    mut agent: TcpStream,
    origin: &ConnOrigin,
    insp: &Inspection,
    facts: impl Fn(Option<String>, bool) -> Arc<ConnFacts>,
    splice_port: bool,
) {
    let dst = origin.dst;
    let pid = origin.process.pid;
    let hello = match client_hello::read_client_hello(&mut agent, HelloLimits::default()).await {
        Ok(h) => h,
        Err(e @ (ClientHelloError::Io(_) | ClientHelloError::Closed { .. })) => {
            tracing::debug!(pid, %dst, error = %e, "connection ended before a complete ClientHello");
            return;
        }
        Err(e) => {
            // Nothing was sent upstream: the connection ends here, on the record.
            let reason = format!("no usable TLS ClientHello: {e}");
            return refuse_connection(agent, origin, insp, &facts(None, true), &reason);
        }
    };
    let sni = hello.info.sni.clone();
    if let Some(name) = sni.as_deref() {
        if let Some(pattern) = insp.tls.passthrough.matching(name) {
            match insp.names.resolves_to(name, dst.ip()).await {
                Ok(true) => {
                    tracing::info!(pid, %dst, sni = name, pattern, "passthrough host: splicing without decryption");
                    let raw = hello.into_raw();
                    splice_plain(agent, origin, &raw).await;
                }
                Ok(false) => {
                    let reason =
                        format!("passthrough name {name} does not resolve to {}", dst.ip());
                    refuse_connection(agent, origin, insp, &facts(sni.clone(), true), &reason);
                }
                Err(e) => {
                    let reason = format!("passthrough name {name} cannot be checked: {e}");
                    refuse_connection(agent, origin, insp, &facts(sni.clone(), true), &reason);
                }
            }
            return;
        }
    }
    if let Err(UpstreamError::UninspectableAlpn { offered }) = alpn_to_offer(&hello.info.alpn) {
        if splice_port {
            tracing::info!(pid, %dst, offered, "TLS with a non-HTTP ALPN on a splice port: splicing unchanged");
            let raw = hello.into_raw();
            return splice_plain(agent, origin, &raw).await;
        }
        let reason = format!("TLS offering only protocols kya cannot inspect ({offered})");
        tracing::info!(pid, %dst, reason, "refusing a connection kya cannot inspect");
        insp.governor.refused(&facts(sni, true), &reason);
        refuse(agent, rustls::AlertDescription::NoApplicationProtocol).await;
        return;
    }
    let name = match hello.info.leaf_name(dst.ip()) {
        Ok(n) => n,
        Err(e) => {
            tracing::info!(pid, %dst, error = %e, "unusable server name; refusing");
            insp.governor
                .refused(&facts(sni, true), &format!("unusable TLS server name: {e}"));
            refuse(agent, rustls::AlertDescription::UnrecognisedName).await;
            return;
        }
    };
    let Some(tcp) = connect_or_reset(&agent, origin).await else {
        return;
    };
    let hello_alpn = hello.info.alpn.clone();
    let up = match insp
        .tls
        .upstream
        .connect(tcp, &name, &hello.info.alpn)
        .await
    {
        Ok(up) => up,
        Err(e) => {
            let reason = format!("upstream TLS to {name} refused: {e}");
            tracing::warn!(pid, %dst, error = %e, "upstream TLS failed; refusing the agent");
            insp.governor.refused(&facts(sni, true), &reason);
            refuse(agent, UPSTREAM_CERT_ALERT).await;
            return;
        }
    };
    let version = match up.alpn.as_deref() {
        Some(b"h2") => HttpVersion::H2,
        _ => HttpVersion::H1,
    };
    let agent_tls = match insp
        .tls
        .terminator
        .terminate(agent, hello, &name, up.alpn.as_deref())
        .await
    {
        Ok(t) => t,
        Err(e) => {
            tracing::info!(pid, %dst, error = %e, "agent TLS handshake failed");
            return;
        }
    };
    let conn = facts(sni, true);
    let conn_id = conn.conn_id;
    let reconnect = tls_reconnect(insp, dst, name, hello_alpn, up.alpn.clone());
    if let Err(e) = http::serve_http(
        agent_tls,
        up.stream,
        version,
        conn,
        insp.governor.clone(),
        &insp.limits,
        insp.names.clone(),
        Some(reconnect),
    )
    .await
    {
        tracing::debug!(conn_id, pid, %dst, error = %e, "TLS connection ended with an error");
    }
}

/// A new verified TLS connection to the same destination, name and ALPN (the
/// proxy's upstream leg after the server ended the first one). A different
/// protocol agreed this time is a failure: the agent's leg speaks the first.
fn tls_reconnect(
    insp: &Inspection,
    dst: std::net::SocketAddr,
    name: crate::ca::LeafName,
    alpn: Vec<Vec<u8>>,
    agreed: Option<Vec<u8>>,
) -> http::client::Reconnect {
    let connector = insp.tls.upstream.clone();
    Arc::new(move || {
        let (connector, name, alpn, agreed) = (
            connector.clone(),
            name.clone(),
            alpn.clone(),
            agreed.clone(),
        );
        Box::pin(async move {
            let tcp = upstream::connect(dst).await.map_err(|e| e.to_string())?;
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

/// Connect to the original destination; on failure reset the agent.
async fn connect_or_reset(agent: &TcpStream, origin: &ConnOrigin) -> Option<TcpStream> {
    match upstream::connect(origin.dst).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(pid = origin.process.pid, dst = %origin.dst, error = %e, "upstream unreachable; resetting the agent's connection");
            let _ = agent.set_zero_linger();
            None
        }
    }
}

/// Splice to the original destination, first replaying `already_read`.
pub async fn splice_plain(mut agent: TcpStream, origin: &ConnOrigin, already_read: &[u8]) {
    let Some(mut up) = connect_or_reset(&agent, origin).await else {
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
