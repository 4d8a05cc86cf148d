//! The outbound HTTP client of the approval backchannels: the OpenID Provider
//! (CIBA) and approval webhooks.
//!
//! One request per connection (the exchanges are rare: discovery, one
//! authentication request and a few token polls, or one webhook POST, per held
//! call), HTTP/1.1 over
//! tokio-rustls, so no connection pool or extra client crate is needed.
//! Every request has a deadline covering connect, TLS, request and the whole
//! response body; bodies are bounded ([`MAX_BODY`]). The provider's certificate
//! (or webhook receiver's) certificate is verified against the system trust
//! store plus an optional `ca_file`. Plain `http://` is accepted only for
//! loopback hosts (tests, a provider on the same machine): anything else would
//! send the client secret, ID tokens and what agents are about to do in clear.

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Largest response body kya reads from the provider.
pub const MAX_BODY: usize = 64 * 1024;
/// Default deadline for one whole exchange.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

/// Errors of one HTTP exchange (or of building the client).
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("invalid URL {url:?}: {why}")]
    Url { url: String, why: &'static str },
    #[error("refusing plain http:// to {0}: only loopback hosts may be reached without TLS")]
    PlainHttp(String),
    #[error("{url}: connect: {source}")]
    Connect { url: String, source: std::io::Error },
    #[error("{url}: TLS: {source}")]
    Tls { url: String, source: std::io::Error },
    #[error("{url}: HTTP: {source}")]
    Http { url: String, source: hyper::Error },
    #[error("{url}: no answer within {0:?}", .timeout)]
    Timeout { url: String, timeout: Duration },
    #[error("{url}: response body larger than {limit} bytes")]
    TooLarge { url: String, limit: usize },
    #[error("{url}: reading the response: {message}")]
    Body { url: String, message: String },
    #[error("trust for the provider ({path}): {message}")]
    Trust { path: PathBuf, message: String },
    #[error("TLS configuration: {0}")]
    Config(rustls::Error),
}

/// A parsed `http(s)://` URL kya may talk to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub https: bool,
    /// Host without IPv6 brackets.
    pub host: String,
    pub port: u16,
    /// `host[:port]` as it goes in the `Host` header.
    pub authority: String,
    pub path_and_query: String,
}

/// True for `localhost` and loopback IP literals.
pub fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

/// Parse `url`: `https://` anywhere, `http://` only to a loopback host; no
/// user info, no fragment.
pub fn parse_url(url: &str) -> Result<Target, HttpError> {
    let bad = |why| HttpError::Url {
        url: url.chars().take(300).collect(),
        why,
    };
    let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(bad("the scheme must be https (or http to a loopback host)")),
    };
    let authority = uri.authority().ok_or_else(|| bad("no host"))?;
    if authority.as_str().contains('@') {
        return Err(bad("user info is not allowed"));
    }
    if url.contains('#') {
        return Err(bad("a fragment is not allowed"));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if host.is_empty() {
        return Err(bad("no host"));
    }
    if !https && !is_loopback_host(&host) {
        return Err(HttpError::PlainHttp(host));
    }
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let path_and_query = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "/".into());
    Ok(Target {
        https,
        host,
        port,
        authority: authority.as_str().to_string(),
        path_and_query,
    })
}

/// A response: status and the (bounded) body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: StatusCode,
    pub body: Bytes,
}

/// The client. Cheap to clone.
#[derive(Clone)]
pub struct HttpClient {
    tls: Arc<ClientConfig>,
    timeout: Duration,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl HttpClient {
    /// Trust the system store (honouring `SSL_CERT_FILE`/`SSL_CERT_DIR`) plus
    /// every certificate in `ca_file`.
    pub fn new(ca_file: Option<&Path>, timeout: Duration) -> Result<Self, HttpError> {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for err in &native.errors {
            tracing::debug!(error = %err, "reading the system trust store");
        }
        roots.add_parsable_certificates(native.certs);
        if let Some(path) = ca_file {
            let certs =
                crate::tls::upstream::read_pem_certs(path).map_err(|e| HttpError::Trust {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?;
            for cert in certs {
                roots.add(cert).map_err(|e| HttpError::Trust {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(HttpError::Config)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(HttpClient {
            tls: Arc::new(config),
            timeout,
        })
    }

    /// `GET url`, accepting JSON.
    pub async fn get(&self, url: &str) -> Result<Response, HttpError> {
        let target = parse_url(url)?;
        let req = Request::builder()
            .method(Method::GET)
            .uri(target.path_and_query.as_str())
            .header(http::header::HOST, target.authority.as_str())
            .header(http::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|_| HttpError::Url {
                url: url.chars().take(300).collect(),
                why: "cannot build a request for it",
            })?;
        self.send(url, &target, req).await
    }

    /// `POST url` with an `application/x-www-form-urlencoded` body and an
    /// optional `Authorization` header value.
    pub async fn post_form(
        &self,
        url: &str,
        form: &[(&str, &str)],
        authorization: Option<&str>,
    ) -> Result<Response, HttpError> {
        let target = parse_url(url)?;
        let body = form_encode(form);
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(target.path_and_query.as_str())
            .header(http::header::HOST, target.authority.as_str())
            .header(http::header::ACCEPT, "application/json")
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            );
        if let Some(value) = authorization {
            builder = builder.header(http::header::AUTHORIZATION, value);
        }
        let req = builder
            .body(Full::new(Bytes::from(body)))
            .map_err(|_| HttpError::Url {
                url: url.chars().take(300).collect(),
                why: "cannot build a request for it",
            })?;
        self.send(url, &target, req).await
    }

    /// `POST url` with a JSON body and extra headers (names lowercase ASCII).
    pub async fn post_json(
        &self,
        url: &str,
        body: Vec<u8>,
        headers: &[(&str, &str)],
    ) -> Result<Response, HttpError> {
        let target = parse_url(url)?;
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(target.path_and_query.as_str())
            .header(http::header::HOST, target.authority.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(
                http::header::USER_AGENT,
                concat!("kya/", env!("CARGO_PKG_VERSION")),
            );
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let req = builder
            .body(Full::new(Bytes::from(body)))
            .map_err(|_| HttpError::Url {
                url: url.chars().take(300).collect(),
                why: "cannot build a request for it",
            })?;
        self.send(url, &target, req).await
    }

    async fn send(
        &self,
        url: &str,
        target: &Target,
        req: Request<Full<Bytes>>,
    ) -> Result<Response, HttpError> {
        let label: String = url.chars().take(300).collect();
        match tokio::time::timeout(self.timeout, self.exchange(&label, target, req)).await {
            Ok(r) => r,
            Err(_) => Err(HttpError::Timeout {
                url: label,
                timeout: self.timeout,
            }),
        }
    }

    async fn exchange(
        &self,
        url: &str,
        target: &Target,
        req: Request<Full<Bytes>>,
    ) -> Result<Response, HttpError> {
        let tcp = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|source| HttpError::Connect {
                url: url.to_string(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        if !target.https {
            return exchange_on(url, tcp, req).await;
        }
        let name = ServerName::try_from(target.host.clone()).map_err(|_| HttpError::Url {
            url: url.to_string(),
            why: "the host is not a valid TLS server name",
        })?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|source| HttpError::Tls {
                url: url.to_string(),
                source,
            })?;
        exchange_on(url, tls, req).await
    }
}

async fn exchange_on<S>(url: &str, io: S, req: Request<Full<Bytes>>) -> Result<Response, HttpError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let http_err = |source| HttpError::Http {
        url: url.to_string(),
        source,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(http_err)?;
    // The connection task ends with the exchange (or with the caller's deadline).
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let result = async {
        let resp = sender.send_request(req).await.map_err(http_err)?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    HttpError::TooLarge {
                        url: url.to_string(),
                        limit: MAX_BODY,
                    }
                } else {
                    HttpError::Body {
                        url: url.to_string(),
                        message: e.to_string(),
                    }
                }
            })?
            .to_bytes();
        Ok(Response { status, body })
    }
    .await;
    driver.abort();
    result
}

/// `application/x-www-form-urlencoded` (every byte but ASCII alphanumerics and
/// `-._~` percent-encoded, which every form decoder accepts).
pub fn form_encode(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Percent-encode one form component.
pub fn enc(s: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(s, SET).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_https_anywhere_http_only_on_loopback() {
        let t = parse_url("https://login.example.com/realms/x?a=b").unwrap();
        assert!(t.https);
        assert_eq!(t.port, 443);
        assert_eq!(t.path_and_query, "/realms/x?a=b");
        let t = parse_url("http://127.0.0.1:18300").unwrap();
        assert!(!t.https && t.port == 18300 && t.path_and_query == "/");
        assert!(parse_url("http://[::1]:80/x").is_ok());
        assert!(parse_url("http://localhost/x").is_ok());
        assert!(matches!(
            parse_url("http://login.example.com/"),
            Err(HttpError::PlainHttp(_))
        ));
        assert!(matches!(
            parse_url("http://127.0.0.1.evil.com/"),
            Err(HttpError::PlainHttp(_))
        ));
        for bad in [
            "ftp://x/",
            "https://user:pw@x/",
            "https://x/#frag",
            "/relative",
            "",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn form_encoding_escapes_everything_special() {
        assert_eq!(
            form_encode(&[("a b", "x&y=z"), ("k", "KYA-AB.C_~")]),
            "a%20b=x%26y%3Dz&k=KYA-AB.C_~"
        );
    }
}
