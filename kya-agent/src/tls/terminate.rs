//! Terminate the agent's TLS with a leaf minted for the name it asked for,
//! speaking exactly the application protocol the upstream agreed.
//!
//! Order of a terminated connection (the interceptor drives it):
//! 1. [`read_client_hello`](super::client_hello::read_client_hello): SNI + ALPN;
//! 2. `UpstreamConnector::connect` (`upstream.rs`) with the agent's ALPN: the real server picks h2 or http/1.1 (or none);
//! 3. [`Terminator::terminate`] with that choice: the agent gets the same one.
//!
//! Upstream first, because a refused upstream certificate must not be hidden
//! behind a successful handshake with kya's leaf, and because only the
//! upstream knows which HTTP version both legs can share.

use super::client_hello::PeekedHello;
use super::leaf_cache::LeafCache;
use crate::ca::{CaError, LeafName};
use rustls::crypto::CryptoProvider;
use rustls::server::{ServerConfig, ServerSessionMemoryCache, StoresServerSessions};
use rustls::sign::SingleCertAndKey;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_rustls::server::TlsStream;
use tokio_rustls::StartHandshake;

/// Refuse a connection whose ClientHello was read but which will not be
/// terminated (e.g. the upstream's certificate was refused): send one fatal
/// plaintext TLS alert, so the agent reports *why* (`alert bad certificate`)
/// instead of an unexplained EOF, then shut the stream down. Best effort:
/// write errors are ignored (the peer may already be gone).
pub async fn refuse<S>(mut stream: S, alert: rustls::AlertDescription)
where
    S: AsyncWrite + Unpin,
{
    // TLSPlaintext { type = alert(21), version = TLS 1.2, length = 2 }, Alert { fatal(2), description }.
    let record = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, u8::from(alert)];
    let _ = stream.write_all(&record).await;
    let _ = stream.flush().await;
    let _ = stream.shutdown().await;
}

/// The alert that tells an agent kya refused the upstream's certificate.
pub const UPSTREAM_CERT_ALERT: rustls::AlertDescription = rustls::AlertDescription::BadCertificate;

/// Errors terminating the agent's TLS.
#[derive(Debug, thiserror::Error)]
pub enum TerminateError {
    #[error("minting a certificate for {name}: {source}")]
    Mint { name: String, source: CaError },
    /// The ALPN to serve is not one the agent offered (a bug in the caller:
    /// the upstream was offered something else). Refused rather than served.
    #[error("upstream agreed ALPN {agreed:?}, which the client did not offer")]
    AlpnNotOffered { agreed: String },
    #[error("TLS configuration: {0}")]
    Config(rustls::Error),
    #[error("TLS handshake with the client failed: {0}")]
    Handshake(std::io::Error),
    #[error("no TLS handshake with the client within {0:?}")]
    Timeout(Duration),
    /// Defence in depth: after the handshake the negotiated ALPN is re-checked.
    #[error("client negotiated ALPN {got:?}, expected {want:?}")]
    AlpnMismatch { got: String, want: String },
}

/// Serves minted leaves; one per daemon, shared.
#[derive(Clone)]
pub struct Terminator {
    cache: LeafCache,
    provider: Arc<CryptoProvider>,
    /// Shared by every per-connection config, so an agent reconnecting
    /// resumes its session (no certificate, no signature) instead of a full
    /// handshake. rustls only resumes for the same SNI and ALPN.
    sessions: Arc<dyn StoresServerSessions>,
    handshake_timeout: Duration,
}

impl std::fmt::Debug for Terminator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Terminator")
            .field("cache", &self.cache)
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

/// Sessions kept for resumption on the agent leg (bounded; oldest dropped).
pub const SESSION_CACHE_SIZE: usize = 4096;

/// Default time allowed for the client's side of the handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn lossy(p: Option<&[u8]>) -> String {
    p.map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_else(|| "(none)".into())
}

impl Terminator {
    pub fn new(cache: LeafCache) -> Self {
        Terminator {
            cache,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            sessions: ServerSessionMemoryCache::new(SESSION_CACHE_SIZE),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }

    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    pub fn cache(&self) -> &LeafCache {
        &self.cache
    }

    /// The server config for one connection: the leaf for `name`, and ALPN
    /// `upstream_alpn` only (so the client can agree to nothing else).
    pub fn server_config(
        &self,
        name: &LeafName,
        upstream_alpn: Option<&[u8]>,
    ) -> Result<Arc<ServerConfig>, TerminateError> {
        let leaf = self
            .cache
            .get_or_mint(name)
            .map_err(|source| TerminateError::Mint {
                name: name.to_string(),
                source,
            })?;
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TerminateError::Config)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(leaf)));
        config.alpn_protocols = upstream_alpn.map(|p| vec![p.to_vec()]).unwrap_or_default();
        // No TLS 1.3 early data: 0-RTT requests are replayable and would be
        // forwarded before kya could decide on them.
        config.max_early_data_size = 0;
        config.session_storage = self.sessions.clone();
        Ok(Arc::new(config))
    }

    /// Complete the handshake on `stream` (whose ClientHello was already read
    /// into `hello`) with a leaf for `name`, negotiating `upstream_alpn`.
    pub async fn terminate<S>(
        &self,
        stream: S,
        hello: PeekedHello,
        name: &LeafName,
        upstream_alpn: Option<&[u8]>,
    ) -> Result<TlsStream<S>, TerminateError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        if let Some(agreed) = upstream_alpn {
            if !hello.info.alpn.iter().any(|p| p.as_slice() == agreed) {
                return Err(TerminateError::AlpnNotOffered {
                    agreed: lossy(Some(agreed)),
                });
            }
        }
        let config = self.server_config(name, upstream_alpn)?;
        let accept = StartHandshake::from_parts(hello.accepted, stream).into_stream(config);
        let tls = match tokio::time::timeout(self.handshake_timeout, accept).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return Err(TerminateError::Handshake(e)),
            Err(_) => return Err(TerminateError::Timeout(self.handshake_timeout)),
        };
        let got = tls.get_ref().1.alpn_protocol();
        if got != upstream_alpn {
            return Err(TerminateError::AlpnMismatch {
                got: lossy(got),
                want: lossy(upstream_alpn),
            });
        }
        Ok(tls)
    }
}
