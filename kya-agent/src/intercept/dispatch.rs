//! What happens to a connection once its origin is known: look at its first
//! bytes and choose a path.
//!
//! * TLS to a `passthrough` host → spliced unchanged (the ClientHello replayed).
//! * TLS otherwise → upstream TLS to the original destination, verifying its
//!   real certificate, then the agent's TLS terminated with a leaf from kya's
//!   CA speaking the ALPN the upstream agreed, then the HTTP/MCP proxy.
//! * Plaintext HTTP → the HTTP/MCP proxy.
//! * Anything else (or a client that sends nothing: server-speaks-first
//!   protocols) → spliced unchanged.
//!
//! An upstream certificate that fails verification is never bypassed: the
//! agent gets a fatal TLS alert and the refusal is audited.

use super::http::{self, ConnFacts, Governor, HttpVersion, Limits};
use super::origin::ConnOrigin;
use super::{splice, upstream};
use crate::tls::client_hello::{self, FirstBytes, HelloLimits, PeekError};
use crate::tls::terminate::{refuse, UPSTREAM_CERT_ALERT};
use crate::tls::upstream::UpstreamError;
use crate::tls::TlsContext;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// How long to wait for the client's first bytes before treating the
/// connection as server-speaks-first and splicing it.
pub const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(3);

/// Everything inspection needs, shared by all connections.
pub struct Inspection {
    pub tls: TlsContext,
    pub governor: Arc<dyn Governor>,
    pub limits: Limits,
    next_conn: AtomicU64,
}

impl Inspection {
    pub fn new(tls: TlsContext, governor: Arc<dyn Governor>, limits: Limits) -> Self {
        Self {
            tls,
            governor,
            limits,
            next_conn: AtomicU64::new(1),
        }
    }
}

/// Handle one redirected connection to its end.
pub async fn handle(agent: TcpStream, origin: ConnOrigin, insp: &Inspection) {
    let conn_id = insp.next_conn.fetch_add(1, Ordering::Relaxed);
    let pid = origin.process.pid;
    let dst = origin.dst;
    let facts = |sni: Option<String>, tls: bool| {
        Arc::new(ConnFacts {
            process: origin.process.clone(),
            dst,
            sni,
            tls,
            conn_id,
        })
    };
    match client_hello::peek_classify(&agent, FIRST_BYTES_TIMEOUT).await {
        Ok(FirstBytes::Tls) => tls_path(agent, &origin, insp, facts).await,
        Ok(FirstBytes::Http) => {
            let Some(up) = connect_or_reset(&agent, &origin).await else {
                return;
            };
            let conn = facts(None, false);
            if let Err(e) = http::serve_http(
                agent,
                up,
                HttpVersion::Detect,
                conn,
                insp.governor.clone(),
                &insp.limits,
            )
            .await
            {
                tracing::debug!(conn_id, pid, %dst, error = %e, "plaintext HTTP connection ended with an error");
            }
        }
        Ok(FirstBytes::Other) | Ok(FirstBytes::NeedMore) | Err(PeekError::Timeout { .. }) => {
            tracing::debug!(conn_id, pid, %dst, "not TLS or HTTP: splicing unchanged");
            splice_plain(agent, &origin, &[]).await;
        }
        Err(e) => {
            tracing::debug!(conn_id, pid, %dst, error = %e, "connection closed before its first bytes")
        }
    }
}

async fn tls_path(
    mut agent: TcpStream,
    origin: &ConnOrigin,
    insp: &Inspection,
    facts: impl Fn(Option<String>, bool) -> Arc<ConnFacts>,
) {
    let dst = origin.dst;
    let hello = match client_hello::read_client_hello(&mut agent, HelloLimits::default()).await {
        Ok(h) => h,
        Err(e) => {
            tracing::info!(pid = origin.process.pid, %dst, error = %e, "no usable TLS ClientHello; closing");
            return;
        }
    };
    let sni = hello.info.sni.clone();
    if let Some(name) = sni.as_deref() {
        if let Some(pattern) = insp.tls.passthrough.matching(name) {
            tracing::info!(pid = origin.process.pid, %dst, sni = name, pattern, "passthrough host: splicing without decryption");
            let raw = hello.into_raw();
            splice_plain(agent, origin, &raw).await;
            return;
        }
    }
    let name = match hello.info.leaf_name(dst.ip()) {
        Ok(n) => n,
        Err(e) => {
            tracing::info!(pid = origin.process.pid, %dst, error = %e, "unusable server name; refusing");
            insp.governor
                .refused(&facts(sni, true), &format!("unusable TLS server name: {e}"));
            refuse(agent, rustls::AlertDescription::UnrecognisedName).await;
            return;
        }
    };
    let Some(tcp) = connect_or_reset(&agent, origin).await else {
        return;
    };
    let up = match insp
        .tls
        .upstream
        .connect(tcp, &name, &hello.info.alpn)
        .await
    {
        Ok(up) => up,
        Err(UpstreamError::UninspectableAlpn { offered }) => {
            // Not HTTP (e.g. a protocol of its own over TLS): it carries no MCP
            // kya could read, so it is spliced like any non-HTTP traffic.
            tracing::info!(pid = origin.process.pid, %dst, offered, "TLS with a non-HTTP ALPN: splicing unchanged");
            let raw = hello.into_raw();
            splice_plain(agent, origin, &raw).await;
            return;
        }
        Err(e) => {
            let reason = format!("upstream TLS to {name} refused: {e}");
            tracing::warn!(pid = origin.process.pid, %dst, error = %e, "upstream TLS failed; refusing the agent");
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
            tracing::info!(pid = origin.process.pid, %dst, error = %e, "agent TLS handshake failed");
            return;
        }
    };
    let conn = facts(sni, true);
    let conn_id = conn.conn_id;
    if let Err(e) = http::serve_http(
        agent_tls,
        up.stream,
        version,
        conn,
        insp.governor.clone(),
        &insp.limits,
    )
    .await
    {
        tracing::debug!(conn_id, pid = origin.process.pid, %dst, error = %e, "TLS connection ended with an error");
    }
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
