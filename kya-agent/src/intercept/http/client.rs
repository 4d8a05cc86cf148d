//! The upstream leg: a hyper client connection per agent connection, speaking
//! the same HTTP version the agent speaks (the ALPN the upstream agreed).
//!
//! The upstream may end its connection at any time: after a response with
//! `Connection: close`, on an idle timeout, on a restart. A request that has
//! not been sent yet then goes over a new connection to the same destination
//! (the same TLS name and ALPN), so the agent never sees a failure a direct
//! connection would not have shown it. A request the upstream may already have
//! read is never sent twice: [`UpstreamError::Gone`] tells the proxy to close
//! the agent's connection, as the server closed its own.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2, TrySendError};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;

use super::body::ProxyBody;
use super::governor::BoxFuture;
use super::HttpVersion;

/// Why the upstream leg failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream HTTP handshake failed: {0}")]
    Handshake(#[source] hyper::Error),
    #[error("upstream request failed: {0}")]
    Request(#[source] hyper::Error),
    /// The upstream connection ended after the request may have been sent.
    #[error("upstream connection ended: {0}")]
    Gone(#[source] hyper::Error),
    #[error("reconnecting upstream failed: {0}")]
    Reconnect(String),
    /// No answer's head within the response timeout.
    #[error("the server sent no answer within {0:?}")]
    NoAnswer(std::time::Duration),
}

impl UpstreamError {
    /// The server's answer head was over the header size bound.
    pub(crate) fn head_too_large(&self) -> bool {
        match self {
            Self::Request(e) | Self::Gone(e) => e.is_parse_too_large(),
            Self::Handshake(_) | Self::Reconnect(_) | Self::NoAnswer(_) => false,
        }
    }
}

/// Any byte stream the upstream leg can run over (TCP or TLS).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Opens a new stream to the same upstream (same destination, TLS name and
/// ALPN); `Err` says why not.
pub type Reconnect = Arc<dyn Fn() -> BoxFuture<'static, Result<Box<dyn Io>, String>> + Send + Sync>;

#[derive(Clone)]
enum Sender {
    H1(Arc<Mutex<http1::SendRequest<ProxyBody>>>),
    H2(http2::SendRequest<ProxyBody>),
}

/// The upstream connection's driver task; aborted when dropped so the upstream
/// socket closes with the agent's.
pub struct Driver(JoinHandle<()>);

impl Drop for Driver {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Senders on the upstream: the current connection, replaced when it ends.
pub struct Upstream {
    version: HttpVersion,
    max_header_bytes: usize,
    current: Mutex<(Sender, Driver)>,
    reconnect: Option<Reconnect>,
}

/// Handshake HTTP on the upstream stream. The receiver turns `true` when this
/// first connection ends (the proxy then ends the agent's connection after
/// the response in flight, as the upstream did, unless it serves HTTP/1.1 with
/// `reconnect`: see [`super::serve_http`]).
pub async fn connect<U>(
    io: U,
    version: HttpVersion,
    max_header_bytes: usize,
    reconnect: Option<Reconnect>,
) -> Result<(Upstream, watch::Receiver<bool>), UpstreamError>
where
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (ended_tx, ended_rx) = watch::channel(false);
    let (sender, driver) = handshake(io, version, max_header_bytes, Some(ended_tx)).await?;
    Ok((
        Upstream {
            version,
            max_header_bytes,
            current: Mutex::new((sender, driver)),
            reconnect,
        },
        ended_rx,
    ))
}

async fn handshake<U>(
    io: U,
    version: HttpVersion,
    max_header_bytes: usize,
    ended: Option<watch::Sender<bool>>,
) -> Result<(Sender, Driver), UpstreamError>
where
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    match version {
        HttpVersion::H2 => {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX))
                .handshake(io)
                .await
                .map_err(UpstreamError::Handshake)?;
            let task = tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream h2 connection ended");
                }
                if let Some(tx) = ended {
                    let _ = tx.send(true);
                }
            });
            Ok((Sender::H2(sender), Driver(task)))
        }
        HttpVersion::H1 | HttpVersion::Detect => {
            // As on the agent's side: the read buffer's bound alone lets a
            // head through whose end arrives in the read that crosses it.
            let (sender, conn) = http1::Builder::new()
                .max_header_size(max_header_bytes)
                .max_buf_size(max_header_bytes.max(8192))
                .handshake(io)
                .await
                .map_err(UpstreamError::Handshake)?;
            // with_upgrades: a 2xx to CONNECT hands the socket to the tunnel.
            let task = tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(error = %e, "upstream h1 connection ended");
                }
                if let Some(tx) = ended {
                    let _ = tx.send(true);
                }
            });
            Ok((Sender::H1(Arc::new(Mutex::new(sender))), Driver(task)))
        }
    }
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            // Not lockable means a request is in flight: the connection is alive.
            Sender::H1(m) => m.try_lock().is_ok_and(|s| s.is_closed()),
            Sender::H2(s) => s.is_closed(),
        }
    }

    /// Send, or hand the request back when it never left.
    async fn try_send(
        &self,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, (UpstreamError, Option<Request<ProxyBody>>)> {
        let unsent = |mut e: TrySendError<Request<ProxyBody>>| {
            let back = e.take_message();
            let err = e.into_error();
            match back {
                Some(req) => (UpstreamError::Request(err), Some(req)),
                None => (classify(err), None),
            }
        };
        match self {
            Sender::H1(m) => {
                let fut = {
                    let mut s = m.lock().await;
                    if s.ready().await.is_err() {
                        // Closed before anything was written: the request is intact.
                        return Err((
                            UpstreamError::Reconnect("upstream connection closed".into()),
                            Some(req),
                        ));
                    }
                    s.try_send_request(req)
                };
                fut.await.map_err(unsent)
            }
            Sender::H2(s) => {
                let mut s = s.clone();
                if s.ready().await.is_err() {
                    return Err((
                        UpstreamError::Reconnect("upstream connection closed".into()),
                        Some(req),
                    ));
                }
                s.try_send_request(req).await.map_err(unsent)
            }
        }
    }
}

/// A failure after the request may have reached the server: the connection is
/// gone (closed, reset, cancelled) or the exchange itself failed.
fn classify(e: hyper::Error) -> UpstreamError {
    if e.is_closed() || e.is_canceled() || e.is_incomplete_message() || is_io(&e) {
        UpstreamError::Gone(e)
    } else {
        UpstreamError::Request(e)
    }
}

fn is_io(e: &hyper::Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if s.is::<std::io::Error>() {
            return true;
        }
        src = s.source();
    }
    false
}

impl Upstream {
    /// Send one request and wait for the response head. A request that never
    /// left goes over a new connection when the current one has ended.
    pub async fn send(&self, req: Request<ProxyBody>) -> Result<Response<Incoming>, UpstreamError> {
        let sender = self.sender().await?;
        match sender.try_send(req).await {
            Ok(r) => Ok(r),
            Err((e, None)) => Err(e),
            Err((e, Some(req))) => {
                let ended = sender.is_closed()
                    || match &e {
                        UpstreamError::Reconnect(_) => true,
                        UpstreamError::Request(h) | UpstreamError::Gone(h) => {
                            h.is_closed() || h.is_canceled()
                        }
                        UpstreamError::Handshake(_) | UpstreamError::NoAnswer(_) => false,
                    };
                if !ended {
                    // Refused before sending for another reason: a new
                    // connection would not change that.
                    return Err(e);
                }
                tracing::debug!(error = %e, "request not sent on the ended upstream connection; reconnecting");
                let sender = self.replace(&sender).await?;
                sender.try_send(req).await.map_err(|(e, _)| e)
            }
        }
    }

    /// The current sender, after replacing it if its connection has ended.
    async fn sender(&self) -> Result<Sender, UpstreamError> {
        let cur = self.current.lock().await.0.clone();
        if cur.is_closed() {
            return self.replace(&cur).await;
        }
        Ok(cur)
    }

    /// Replace `stale` with a new connection (unless another request already did).
    async fn replace(&self, stale: &Sender) -> Result<Sender, UpstreamError> {
        let mut cur = self.current.lock().await;
        let same = match (&cur.0, stale) {
            (Sender::H1(a), Sender::H1(b)) => Arc::ptr_eq(a, b),
            (Sender::H2(_), Sender::H2(_)) => cur.0.is_closed(),
            _ => true,
        };
        if !same {
            return Ok(cur.0.clone());
        }
        let Some(reconnect) = &self.reconnect else {
            return Err(UpstreamError::Reconnect(
                "the upstream connection has ended".into(),
            ));
        };
        let io = reconnect().await.map_err(UpstreamError::Reconnect)?;
        let fresh = handshake(io, self.version, self.max_header_bytes, None).await?;
        tracing::debug!("new upstream connection");
        *cur = fresh;
        Ok(cur.0.clone())
    }

    pub fn is_h2(&self) -> bool {
        self.version == HttpVersion::H2
    }
}
