//! The upstream leg: one hyper client connection per agent connection, speaking
//! the same HTTP version the agent speaks (the ALPN the upstream agreed).

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use super::body::ProxyBody;
use super::HttpVersion;

/// Why the upstream leg failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream HTTP handshake failed: {0}")]
    Handshake(#[source] hyper::Error),
    #[error("upstream request failed: {0}")]
    Request(#[source] hyper::Error),
}

/// A sender on the upstream connection.
#[derive(Clone)]
pub enum Upstream {
    /// HTTP/1.1 carries one exchange at a time; the agent side is HTTP/1.1 too, so
    /// its requests arrive one at a time and the lock is never contended for long.
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

/// Handshake HTTP on the upstream stream.
pub async fn connect<U>(
    io: U,
    version: HttpVersion,
    max_header_bytes: usize,
) -> Result<(Upstream, Driver), UpstreamError>
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
            });
            Ok((Upstream::H2(sender), Driver(task)))
        }
        HttpVersion::H1 | HttpVersion::Detect => {
            let (sender, conn) = http1::Builder::new()
                .max_buf_size(max_header_bytes.max(8192))
                .handshake(io)
                .await
                .map_err(UpstreamError::Handshake)?;
            // with_upgrades: a 2xx to CONNECT hands the socket to the tunnel.
            let task = tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(error = %e, "upstream h1 connection ended");
                }
            });
            Ok((Upstream::H1(Arc::new(Mutex::new(sender))), Driver(task)))
        }
    }
}

impl Upstream {
    /// Send one request and wait for the response head.
    pub async fn send(&self, req: Request<ProxyBody>) -> Result<Response<Incoming>, UpstreamError> {
        match self {
            Upstream::H1(m) => {
                let fut = {
                    let mut s = m.lock().await;
                    s.ready().await.map_err(UpstreamError::Request)?;
                    s.send_request(req)
                };
                fut.await.map_err(UpstreamError::Request)
            }
            Upstream::H2(s) => {
                let mut s = s.clone();
                s.ready().await.map_err(UpstreamError::Request)?;
                s.send_request(req).await.map_err(UpstreamError::Request)
            }
        }
    }

    pub fn is_h2(&self) -> bool {
        matches!(self, Upstream::H2(_))
    }
}
