//! The HTTP/MCP proxy: what the interceptor runs on a connection once it knows the
//! origin and holds both legs (TLS-terminated or plain).
//!
//! The agent side is served by hyper (HTTP/1.1 keep-alive, chunked and pipelining,
//! or HTTP/2), each request is forwarded over one hyper client connection on the
//! upstream leg in the same version. Every JSON-RPC message in either direction goes
//! through [`Governor`]; see [`exchange`] for the request path, [`filter`] and
//! [`stream`] for what the server sends back.
//!
//! Wiring (the listener's side): once the origin is known and both legs exist, call
//! [`serve_http`] with the TLS streams (the ALPN the upstream agreed: `H1`/`H2`) or
//! the plain TCP streams (`Detect`: the h2 preface is sniffed). Set `TCP_NODELAY` on
//! both sockets first: the proxy writes small frames (the listener's accepted
//! socket and [`crate::intercept::upstream::connect`] both do). Denials of server→client
//! requests drop the event (recorded by the governor, not answered to the server).
//!
//! * [`governor`]: the seam to policy, approvals and audit.
//! * [`limits`]: every bound.
//! * [`listed`]: which ids name the agent's `tools/list` requests, per session.
//! * [`inspect`]: server name (Host vs SNI) and JSON-RPC recognition by content.
//! * [`body`]: bounded body reading and the proxy's body type.
//! * [`deny`]: the denials (built by [`crate::mcp::deny`]).
//! * [`sessions`]: legacy SSE sessions and held calls, across connections.
//! * [`client`]: the upstream hyper connection.
//! * [`connect`]: `CONNECT` forwarded to the proxy and the tunnel handed on.
//! * [`sniff`]: the plaintext HTTP/2 preface check.

pub(crate) mod body;
pub mod client;
pub(crate) mod connect;
pub(crate) mod deny;
pub(crate) mod exchange;
pub mod filter;
pub(crate) mod governor;
pub mod inspect;
pub(crate) mod limits;
pub mod listed;
pub mod load;
pub(crate) mod sessions;
pub(crate) mod sniff;
pub(crate) mod stream;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

pub use governor::{
    BoxFuture, CallFacts, ConnFacts, Direction, Governor, Grant, ProofRequest, Ruling, TunnelTarget,
};
pub use limits::Limits;

/// The HTTP version on both legs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    /// HTTP/1.1 (ALPN `http/1.1`, or none).
    H1,
    /// HTTP/2 (ALPN `h2`).
    H2,
    /// Plaintext: read the first bytes and look for the HTTP/2 connection preface
    /// (prior-knowledge h2); otherwise HTTP/1.1.
    Detect,
}

/// Why a proxied connection ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Upstream(#[from] client::UpstreamError),
    #[error("reading the agent's first bytes: {0}")]
    Sniff(#[source] std::io::Error),
    #[error("serving the agent connection: {0}")]
    Serve(#[source] hyper::Error),
}

/// Proxy one connection until the agent closes it. `reconnect` opens a new
/// upstream connection for a request that could not be sent on an ended one
/// (e.g. a call approved after the server timed the idle connection out).
/// Without it (a tunnel cannot be reopened), or over HTTP/2, the agent's
/// connection ends once the upstream's first connection has ended and the
/// response in flight is finished, as it would have ended direct. Over
/// HTTP/1.1 with `reconnect`, a server ending an idle connection does not end
/// the agent's: closing it would race the agent's next request, which a
/// direct connection loses only in the microseconds before the server's FIN
/// arrives, but which kya's relay of that FIN would widen. The next request
/// goes over a new connection instead; a `Connection: close` answer is still
/// forwarded and ends the agent's connection after it. `CONNECT` is refused.
#[allow(clippy::too_many_arguments)]
pub async fn serve_http<A, U>(
    agent: A,
    upstream: U,
    alpn: HttpVersion,
    conn: Arc<ConnFacts>,
    gov: Arc<dyn Governor>,
    limits: &Limits,
    names: Arc<crate::intercept::names::NameResolver>,
    reconnect: Option<client::Reconnect>,
) -> Result<(), ProxyError>
where
    A: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    serve_http_with(
        agent, upstream, alpn, conn, gov, limits, names, reconnect, None,
    )
    .await
}

/// [`serve_http`], with `tunnels` following what `CONNECT` opens.
#[allow(clippy::too_many_arguments)]
pub async fn serve_http_with<A, U>(
    agent: A,
    upstream: U,
    alpn: HttpVersion,
    conn: Arc<ConnFacts>,
    gov: Arc<dyn Governor>,
    limits: &Limits,
    names: Arc<crate::intercept::names::NameResolver>,
    reconnect: Option<client::Reconnect>,
    tunnels: Option<Arc<dyn connect::Tunnels>>,
) -> Result<(), ProxyError>
where
    A: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // What runs once, before the connection's long and mostly idle life,
    // runs boxed (freed once done): this future's size is that of its largest
    // state, held for as long as the agent keeps the connection.
    let (version, agent) = match alpn {
        HttpVersion::Detect => Box::pin(sniff::sniff(agent, limits.body_timeout))
            .await
            .map_err(ProxyError::Sniff)?,
        v => (v, sniff::Prefixed::new(Vec::new(), agent)),
    };
    let reconnects = reconnect.is_some();
    let (upstream, mut upstream_ended) = Box::pin(client::connect(
        upstream,
        version,
        limits.max_header_bytes,
        reconnect,
    ))
    .await?;
    let conn_id = conn.conn_id;
    tracing::debug!(conn = conn_id, ?version, "proxying HTTP");
    let ex = Arc::new(exchange::Exchange {
        gov,
        conn,
        limits: limits.clone(),
        upstream,
        held: Arc::new(AtomicUsize::new(0)),
        names,
        tunnels,
    });
    let svc = service_fn(move |req| ex.clone().handle(req));
    let io = TokioIo::new(agent);
    // When the upstream ends its connection, end the agent's the same way:
    // after the response in flight (HTTP/1.1), or with GOAWAY (HTTP/2). Not
    // over HTTP/1.1 with `reconnect` (see above): the next request reconnects.
    let mirror_end = !(reconnects && version != HttpVersion::H2);
    let ended = async move {
        if !mirror_end {
            return std::future::pending().await;
        }
        while !*upstream_ended.borrow_and_update() {
            if upstream_ended.changed().await.is_err() {
                break;
            }
        }
    };
    let result = match version {
        HttpVersion::H2 => {
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
                .max_concurrent_streams(limits.max_h2_streams)
                .serve_connection(io, svc);
            // Boxed: an HTTP/2 connection's state is the largest, and an
            // HTTP/1.1 connection need not carry room for it.
            Box::pin(serve_until(conn, ended, conn_id, |c| c.graceful_shutdown())).await
        }
        HttpVersion::H1 | HttpVersion::Detect => {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.body_timeout)
                .max_headers(limits.max_headers)
                // The read buffer's bound alone lets through headers whose
                // end arrives in the read that crosses it: the head's size is
                // checked once parsed too.
                .max_header_size(limits.max_header_bytes)
                .max_buf_size(limits.max_header_bytes.max(8192))
                .serve_connection(io, svc)
                .with_upgrades();
            serve_until(conn, ended, conn_id, |c| c.graceful_shutdown()).await
        }
    };
    if let Err(e) = &result {
        if e.is_timeout() {
            tracing::debug!(
                conn = conn_id,
                "agent connection closed: no request headers within the timeout"
            );
            load::LimitRefusals::count(&limits.refusals.slow_headers);
        } else if e.is_parse_too_large() {
            // HTTP/1.1: too many header fields, or too many header bytes
            // (hyper answered 431).
            tracing::debug!(conn = conn_id, "agent request headers over the limit");
            load::LimitRefusals::count(&limits.refusals.headers);
        }
    }
    result.map_err(ProxyError::Serve)
}

/// Drive the agent's connection `conn` to its end; once `ended` (the
/// upstream's connection is over), `shutdown` it gracefully, so it ends the
/// way the server ended its own.
async fn serve_until<C: std::future::Future>(
    conn: C,
    ended: impl std::future::Future<Output = ()>,
    conn_id: u64,
    shutdown: impl FnOnce(std::pin::Pin<&mut C>),
) -> C::Output {
    tokio::pin!(conn, ended);
    let mut shutdown = Some(shutdown);
    loop {
        tokio::select! {
            r = conn.as_mut() => break r,
            () = &mut ended, if shutdown.is_some() => {
                tracing::debug!(conn = conn_id, "upstream connection ended: ending the agent's");
                if let Some(shutdown) = shutdown.take() {
                    shutdown(conn.as_mut());
                }
            }
        }
    }
}
