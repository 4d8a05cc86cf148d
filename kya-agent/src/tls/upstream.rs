//! The interceptor's TLS client to the agent's real destination.
//!
//! kya sits between the agent and the server, so it must do the
//! verification the agent would have done: the real certificate is checked
//! against the system roots (plus `--upstream-ca` for private PKI and tests)
//! for the SNI the agent sent (or the original IP). There is no "insecure"
//! switch: a failure is a typed [`UpstreamError::Certificate`] with a reason
//! the interceptor can show the agent and write to the audit log.
//!
//! ALPN: the agent's own offer, restricted to what kya's HTTP layer inspects
//! (`h2`, `http/1.1`), is offered upstream in the agent's order; what the
//! upstream agrees is then served to the agent (by the terminator), so
//! both legs speak the same HTTP version.

use crate::ca::LeafName;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{CertificateError, ClientConfig, RootCertStore};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// ALPN ids kya can inspect, in no particular order (the agent's order wins).
pub const INSPECTABLE_ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// Why an upstream certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertFailure {
    /// The certificate does not name the host the agent asked for.
    WrongName,
    Expired,
    NotYetValid,
    /// Not signed by any trusted root (self-signed, private CA not given with --upstream-ca...).
    UnknownIssuer,
    Revoked,
    BadSignature,
    /// Not a TLS server certificate (EKU).
    WrongPurpose,
    /// Anything else webpki refuses, with rustls' description.
    Other(String),
}

impl std::fmt::Display for CertFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CertFailure::WrongName => f.write_str("certificate is not valid for this name"),
            CertFailure::Expired => f.write_str("certificate has expired"),
            CertFailure::NotYetValid => f.write_str("certificate is not valid yet"),
            CertFailure::UnknownIssuer => f.write_str("certificate is not issued by a trusted CA"),
            CertFailure::Revoked => f.write_str("certificate is revoked"),
            CertFailure::BadSignature => f.write_str("certificate signature is invalid"),
            CertFailure::WrongPurpose => {
                f.write_str("certificate is not for TLS server authentication")
            }
            CertFailure::Other(text) => write!(f, "certificate refused: {text}"),
        }
    }
}

impl From<&CertificateError> for CertFailure {
    fn from(err: &CertificateError) -> Self {
        match err {
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                CertFailure::WrongName
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                CertFailure::Expired
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                CertFailure::NotYetValid
            }
            CertificateError::UnknownIssuer => CertFailure::UnknownIssuer,
            CertificateError::Revoked => CertFailure::Revoked,
            CertificateError::BadSignature => CertFailure::BadSignature,
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                CertFailure::WrongPurpose
            }
            other => CertFailure::Other(format!("{other:?}")),
        }
    }
}

/// Errors building the connector or connecting upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {name}: {reason}")]
    Certificate { name: String, reason: CertFailure },
    #[error("upstream {name}: TLS handshake failed: {source}")]
    Tls { name: String, source: rustls::Error },
    #[error("upstream {name}: {source}")]
    Io {
        name: String,
        source: std::io::Error,
    },
    #[error("upstream {name}: no TLS handshake within {timeout:?}")]
    Timeout { name: String, timeout: Duration },
    /// The agent offered ALPN, but nothing kya inspects (h2, http/1.1).
    #[error("the client offers only ALPN protocols kya cannot inspect: {offered}")]
    UninspectableAlpn { offered: String },
    #[error("{path}: {message}")]
    Roots { path: PathBuf, message: String },
    #[error("no trusted roots at all (system store empty and no --upstream-ca)")]
    NoRoots,
    #[error("TLS client configuration: {0}")]
    Config(rustls::Error),
    #[error("upstream name: {0}")]
    Name(#[from] crate::ca::LeafNameError),
}

/// A verified TLS connection to the real destination.
pub struct Upstream<IO> {
    pub stream: TlsStream<IO>,
    /// The ALPN protocol the upstream agreed (None: no ALPN, i.e. HTTP/1.1).
    pub alpn: Option<Vec<u8>>,
}

impl<IO> std::fmt::Debug for Upstream<IO> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("alpn", &self.alpn.as_deref().map(String::from_utf8_lossy))
            .finish_non_exhaustive()
    }
}

/// The agent's ALPN offer reduced to what kya inspects, in the agent's order.
/// No ALPN offered → none offered upstream. ALPN offered but none inspectable
/// → an error (terminating would break the agent; the caller splices or refuses).
pub fn alpn_to_offer(agent: &[Vec<u8>]) -> Result<Vec<Vec<u8>>, UpstreamError> {
    if agent.is_empty() {
        return Ok(Vec::new());
    }
    let mut offer: Vec<Vec<u8>> = Vec::new();
    for p in agent {
        if INSPECTABLE_ALPN.contains(&p.as_slice()) && !offer.contains(p) {
            offer.push(p.clone());
        }
    }
    if offer.is_empty() {
        let offered = agent
            .iter()
            .take(16)
            .map(|p| {
                String::from_utf8_lossy(p)
                    .chars()
                    .take(64)
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join(", ");
        return Err(UpstreamError::UninspectableAlpn { offered });
    }
    Ok(offer)
}

/// An ALPN offer and the client config that makes it.
type OfferConfig = (Vec<Vec<u8>>, Arc<ClientConfig>);

/// Builds verified upstream connections; one per daemon, shared.
#[derive(Clone)]
pub struct UpstreamConnector {
    /// One config per possible ALPN offer ([`alpn_to_offer`] yields at most
    /// five distinct lists), built once: no per-connection config clone. All
    /// share one session store, so reconnecting to an upstream resumes.
    configs: Arc<Vec<OfferConfig>>,
    handshake_timeout: Duration,
}

impl std::fmt::Debug for UpstreamConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConnector")
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

/// Default time allowed for the upstream TCP connect plus TLS handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl UpstreamConnector {
    /// A connector trusting exactly `roots`.
    pub fn new(roots: RootCertStore) -> Result<Self, UpstreamError> {
        if roots.is_empty() {
            return Err(UpstreamError::NoRoots);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(UpstreamError::Config)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (h2, h1) = (b"h2".to_vec(), b"http/1.1".to_vec());
        let offers = [
            vec![],
            vec![h2.clone()],
            vec![h1.clone()],
            vec![h2.clone(), h1.clone()],
            vec![h1, h2],
        ];
        let configs = offers
            .into_iter()
            .map(|offer| {
                let mut c = config.clone();
                c.alpn_protocols = offer.clone();
                (offer, Arc::new(c))
            })
            .collect();
        Ok(UpstreamConnector {
            configs: Arc::new(configs),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        })
    }

    /// The system roots (rustls-native-certs: honours `SSL_CERT_FILE` /
    /// `SSL_CERT_DIR`) plus every certificate in `extra_pem` (`--upstream-ca`).
    /// Unparsable system certificates are skipped with a warning; an
    /// unreadable or certificate-less `extra_pem` is an error (the operator asked for it).
    pub fn with_system_roots(extra_pem: Option<&Path>) -> Result<Self, UpstreamError> {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for err in &native.errors {
            tracing::warn!(error = %err, "reading the system trust store");
        }
        let (added, ignored) = roots.add_parsable_certificates(native.certs);
        if ignored > 0 {
            tracing::warn!(ignored, "unparsable certificates in the system trust store");
        }
        tracing::debug!(added, "system roots loaded for upstream verification");
        if let Some(path) = extra_pem {
            for cert in read_pem_certs(path)? {
                roots.add(cert).map_err(|e| UpstreamError::Roots {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?;
            }
        }
        Self::new(roots)
    }

    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// TCP-connect to `addr`, then TLS as [`connect`](Self::connect).
    pub async fn connect_tcp(
        &self,
        addr: SocketAddr,
        name: &LeafName,
        agent_alpn: &[Vec<u8>],
    ) -> Result<Upstream<TcpStream>, UpstreamError> {
        let label = name.to_string();
        let tcp = match tokio::time::timeout(self.handshake_timeout, TcpStream::connect(addr)).await
        {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(source)) => {
                return Err(UpstreamError::Io {
                    name: label,
                    source,
                })
            }
            Err(_) => {
                return Err(UpstreamError::Timeout {
                    name: label,
                    timeout: self.handshake_timeout,
                })
            }
        };
        let _ = tcp.set_nodelay(true);
        self.connect(tcp, name, agent_alpn).await
    }

    /// TLS over `io` for `name` (sent as SNI when it is a DNS name), offering
    /// the inspectable part of the agent's ALPN list, verifying the certificate.
    pub async fn connect<IO>(
        &self,
        io: IO,
        name: &LeafName,
        agent_alpn: &[Vec<u8>],
    ) -> Result<Upstream<IO>, UpstreamError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let label = name.to_string();
        let server_name: ServerName<'static> = name.to_server_name()?;
        let offer = alpn_to_offer(agent_alpn)?;
        let config = match self.configs.iter().find(|(o, _)| *o == offer) {
            Some((_, config)) => config.clone(),
            // Unreachable while INSPECTABLE_ALPN has two entries; correct anyway.
            None => match self.configs.first() {
                Some((_, base)) => {
                    let mut config = (**base).clone();
                    config.alpn_protocols = offer;
                    Arc::new(config)
                }
                None => return Err(UpstreamError::NoRoots),
            },
        };
        let connector = TlsConnector::from(config);
        let handshake = connector.connect(server_name, io);
        let stream = match tokio::time::timeout(self.handshake_timeout, handshake).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) => return Err(classify_handshake_error(label, err)),
            Err(_) => {
                return Err(UpstreamError::Timeout {
                    name: label,
                    timeout: self.handshake_timeout,
                })
            }
        };
        let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        tracing::debug!(upstream = %label, alpn = ?alpn.as_deref().map(String::from_utf8_lossy), "upstream TLS established");
        Ok(Upstream { stream, alpn })
    }
}

fn classify_handshake_error(name: String, err: std::io::Error) -> UpstreamError {
    let tls = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .cloned();
    match tls {
        Some(rustls::Error::InvalidCertificate(cert)) => UpstreamError::Certificate {
            name,
            reason: CertFailure::from(&cert),
        },
        Some(source) => UpstreamError::Tls { name, source },
        None => UpstreamError::Io { name, source: err },
    }
}

/// Every CERTIFICATE in a PEM file; other blocks are ignored, none at all is an error.
pub fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, UpstreamError> {
    let err = |message: String| UpstreamError::Roots {
        path: path.to_path_buf(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let mut reader = std::io::Cursor::new(bytes);
    let certs = rustls_pemfile::certs(&mut reader)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(err("no CERTIFICATE in the file".into()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(list: &[&str]) -> Vec<Vec<u8>> {
        list.iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    #[test]
    fn alpn_offer_keeps_the_agents_order_and_only_what_kya_inspects() {
        assert_eq!(alpn_to_offer(&[]).unwrap(), Vec::<Vec<u8>>::new());
        assert_eq!(
            alpn_to_offer(&v(&["http/1.1", "h2"])).unwrap(),
            v(&["http/1.1", "h2"])
        );
        assert_eq!(
            alpn_to_offer(&v(&["h3", "h2", "spdy/3", "h2"])).unwrap(),
            v(&["h2"])
        );
        assert!(matches!(
            alpn_to_offer(&v(&["acme-tls/1"])),
            Err(UpstreamError::UninspectableAlpn { .. })
        ));
        // Case matters on the wire: "H2" is not h2.
        assert!(alpn_to_offer(&v(&["H2", "HTTP/1.1"])).is_err());
        let huge: Vec<Vec<u8>> = (0..1000).map(|i| vec![b'x'; i % 255 + 1]).collect();
        match alpn_to_offer(&huge) {
            Err(UpstreamError::UninspectableAlpn { offered }) => assert!(offered.len() < 2000),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn extra_roots_file_errors_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        assert!(matches!(
            UpstreamConnector::with_system_roots(Some(&missing)),
            Err(UpstreamError::Roots { .. })
        ));
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no pem here").unwrap();
        assert!(matches!(
            read_pem_certs(&empty),
            Err(UpstreamError::Roots { .. })
        ));
        let bad = dir.path().join("bad.pem");
        std::fs::write(
            &bad,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        assert!(UpstreamConnector::with_system_roots(Some(&bad)).is_err());
        assert!(matches!(
            UpstreamConnector::new(RootCertStore::empty()),
            Err(UpstreamError::NoRoots)
        ));
    }

    #[test]
    fn certificate_errors_map_to_reasons() {
        let cases = [
            (CertificateError::NotValidForName, CertFailure::WrongName),
            (CertificateError::Expired, CertFailure::Expired),
            (CertificateError::NotValidYet, CertFailure::NotYetValid),
            (CertificateError::UnknownIssuer, CertFailure::UnknownIssuer),
            (CertificateError::BadSignature, CertFailure::BadSignature),
            (CertificateError::InvalidPurpose, CertFailure::WrongPurpose),
        ];
        for (err, want) in cases {
            let io = std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::InvalidCertificate(err),
            );
            match classify_handshake_error("h".into(), io) {
                UpstreamError::Certificate { reason, .. } => assert_eq!(reason, want),
                other => panic!("{other:?}"),
            }
        }
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(matches!(
            classify_handshake_error("h".into(), plain),
            UpstreamError::Io { .. }
        ));
    }
}
