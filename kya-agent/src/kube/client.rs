//! The Kubernetes API client of the pod-label selection: the in-cluster
//! settings (the API server from `KUBERNETES_SERVICE_HOST`/`_PORT`, the
//! service account's token and CA, the node from `NODE_NAME`), a bounded
//! list request, and a watch whose answer is read line by line as it comes.
//!
//! HTTP/1.1 over tokio-rustls, one request per connection; `http://` only to
//! a loopback host (tests, a local API proxy), since the token would
//! otherwise travel in clear.

use super::pods::{Change, KubeError, PodIndex};
use super::selector::LabelSelector;
use crate::approvals::http::{parse_url, Target};
use bytes::{Bytes, BytesMut};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// The service account's files in a pod.
pub const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Largest pod list read.
const MAX_LIST: usize = 64 << 20;
/// Longest watch event line.
const MAX_LINE: usize = 4 << 20;
/// Deadline of the connect, TLS, request and list answer.
const TIMEOUT: Duration = Duration::from_secs(30);
/// The server ends a watch after this long (`timeoutSeconds`); kya goes on
/// from the last resourceVersion.
const WATCH_SECONDS: u32 = 300;

/// Why the API cannot be reached or read.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("Kubernetes API settings: {0}")]
    Settings(String),
    #[error("Kubernetes API {url}: {message}")]
    Io { url: String, message: String },
    #[error("Kubernetes API {url}: HTTP {status}")]
    Status { url: String, status: StatusCode },
    #[error(transparent)]
    Kube(#[from] KubeError),
}

/// Where the API is and who kya is there.
#[derive(Debug, Clone)]
pub struct KubeSettings {
    /// `https://HOST:PORT` (no path).
    pub api: String,
    /// Bearer token file (re-read for each request: the kubelet rotates it).
    pub token_file: Option<PathBuf>,
    /// Extra CA for the API server's certificate.
    pub ca_file: Option<PathBuf>,
    /// This node's name (only its pods are watched).
    pub node: String,
    /// Pods whose labels match are selected; without one, the watch only
    /// names pods and their containers' images.
    pub selector: Option<LabelSelector>,
}

impl KubeSettings {
    /// Settings from the config, with the in-cluster defaults for what it
    /// leaves out.
    pub fn resolve(
        selector: Option<&str>,
        node: Option<&str>,
        api: Option<&str>,
        token_file: Option<&Path>,
        ca_file: Option<&Path>,
    ) -> Result<Self, ClientError> {
        let selector = selector
            .map(LabelSelector::parse)
            .transpose()
            .map_err(|e| ClientError::Settings(format!("pod_selector: {e}")))?;
        let node = match node {
            Some(n) => n.to_string(),
            None => std::env::var("NODE_NAME").map_err(|_| {
                ClientError::Settings(
                    "no node: set [kubernetes] node or NODE_NAME (the DaemonSet sets it from spec.nodeName)".into(),
                )
            })?,
        };
        PodIndex::list_path(&node)?;
        let api = match api {
            Some(a) => a.trim_end_matches('/').to_string(),
            None => {
                let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| {
                    ClientError::Settings(
                        "no API server: set [kubernetes] api or run in a pod (KUBERNETES_SERVICE_HOST)"
                            .into(),
                    )
                })?;
                let port =
                    std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
                if host.contains(':') {
                    format!("https://[{host}]:{port}")
                } else {
                    format!("https://{host}:{port}")
                }
            }
        };
        let t = parse_url(&api).map_err(|e| ClientError::Settings(format!("api: {e}")))?;
        if t.path_and_query != "/" {
            return Err(ClientError::Settings(format!(
                "api {api:?} must be a scheme, host and port only"
            )));
        }
        let in_cluster = |f: &str| {
            let p = Path::new(SA_DIR).join(f);
            p.exists().then_some(p)
        };
        Ok(Self {
            api,
            token_file: token_file
                .map(Path::to_path_buf)
                .or_else(|| in_cluster("token")),
            ca_file: ca_file
                .map(Path::to_path_buf)
                .or_else(|| in_cluster("ca.crt")),
            node,
            selector,
        })
    }
}

/// The client.
#[derive(Clone)]
pub struct KubeClient {
    settings: KubeSettings,
    tls: Arc<ClientConfig>,
}

impl KubeClient {
    pub fn new(settings: KubeSettings) -> Result<Self, ClientError> {
        let mut roots = RootCertStore::empty();
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        if let Some(path) = &settings.ca_file {
            let certs = crate::tls::upstream::read_pem_certs(path)
                .map_err(|e| ClientError::Settings(format!("ca_file {}: {e}", path.display())))?;
            for c in certs {
                roots.add(c).map_err(|e| {
                    ClientError::Settings(format!("ca_file {}: {e}", path.display()))
                })?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Settings(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            settings,
            tls: Arc::new(config),
        })
    }

    pub fn settings(&self) -> &KubeSettings {
        &self.settings
    }

    /// The node's pods now.
    pub async fn list(&self) -> Result<PodIndex, ClientError> {
        let path = PodIndex::list_path(&self.settings.node)?;
        let url = format!("{}{path}", self.settings.api);
        let body = tokio::time::timeout(TIMEOUT, async {
            let resp = self.get(&url).await?;
            let mut body = resp.into_body();
            let mut buf = BytesMut::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| io_err(&url, e))?;
                if let Ok(data) = frame.into_data() {
                    if buf.len() + data.len() > MAX_LIST {
                        return Err(io_err(
                            &url,
                            format!("pod list larger than {MAX_LIST} bytes"),
                        ));
                    }
                    buf.extend_from_slice(&data);
                }
            }
            Ok(buf.freeze())
        })
        .await
        .map_err(|_| io_err(&url, "no answer in time"))??;
        let text = std::str::from_utf8(&body).map_err(|e| io_err(&url, e))?;
        Ok(PodIndex::from_list(&self.settings.node, text)?)
    }

    /// Watches from `index`'s resourceVersion, applying each event to it and
    /// calling `changed` after each change, until the server ends the watch
    /// (`Ok`: watch again from where it stopped) or an error (410 Gone:
    /// list again).
    pub async fn watch(
        &self,
        index: &mut PodIndex,
        mut changed: impl FnMut(&PodIndex),
    ) -> Result<(), ClientError> {
        let url = format!(
            "{}{}&timeoutSeconds={WATCH_SECONDS}",
            self.settings.api,
            index.watch_path()
        );
        let resp = tokio::time::timeout(TIMEOUT, self.get(&url))
            .await
            .map_err(|_| io_err(&url, "no answer in time"))??;
        let mut body = resp.into_body();
        let mut buf = BytesMut::new();
        // a connection that died without a word ends the watch too
        let idle = Duration::from_secs(u64::from(WATCH_SECONDS) + 60);
        loop {
            let frame = match tokio::time::timeout(idle, body.frame()).await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(_) => return Err(io_err(&url, "the watch went silent")),
            };
            let frame = frame.map_err(|e| io_err(&url, e))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(end) = buf.iter().position(|b| *b == b'\n') {
                let line = buf.split_to(end + 1);
                let line = std::str::from_utf8(&line).map_err(|e| io_err(&url, e))?;
                if line.trim().is_empty() {
                    continue;
                }
                if index.apply_line(line.trim())? != Change::Nothing {
                    changed(index);
                }
            }
            if buf.len() > MAX_LINE {
                return Err(io_err(
                    &url,
                    format!("watch event longer than {MAX_LINE} bytes"),
                ));
            }
        }
        Ok(())
    }

    /// `GET url` with the token; a non-2xx status is an error.
    async fn get(&self, url: &str) -> Result<hyper::Response<Incoming>, ClientError> {
        let target = parse_url(url).map_err(|e| io_err(url, e))?;
        let mut req = Request::builder()
            .method(Method::GET)
            .uri(target.path_and_query.as_str())
            .header(http::header::HOST, target.authority.as_str())
            .header(http::header::ACCEPT, "application/json")
            .header(
                http::header::USER_AGENT,
                concat!("kya/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(path) = &self.settings.token_file {
            let token = std::fs::read_to_string(path)
                .map_err(|e| io_err(url, format!("token {}: {e}", path.display())))?;
            req = req.header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", token.trim()),
            );
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|e| io_err(url, e))?;
        let resp = self.send(url, &target, req).await?;
        if !resp.status().is_success() {
            return Err(ClientError::Status {
                url: url.to_string(),
                status: resp.status(),
            });
        }
        Ok(resp)
    }

    async fn send(
        &self,
        url: &str,
        target: &Target,
        req: Request<Empty<Bytes>>,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        let tcp = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|e| io_err(url, e))?;
        let _ = tcp.set_nodelay(true);
        if !target.https {
            return exchange(url, tcp, req).await;
        }
        let name = ServerName::try_from(target.host.clone()).map_err(|e| io_err(url, e))?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| io_err(url, e))?;
        exchange(url, tls, req).await
    }
}

async fn exchange<S>(
    url: &str,
    io: S,
    req: Request<Empty<Bytes>>,
) -> Result<hyper::Response<Incoming>, ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| io_err(url, e))?;
    // The connection lives as long as its body is read.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender.send_request(req).await.map_err(|e| io_err(url, e))
}

fn io_err(url: &str, e: impl std::fmt::Display) -> ClientError {
    ClientError::Io {
        url: url.chars().take(300).collect(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked() {
        let ok = KubeSettings::resolve(
            Some("app=agent"),
            Some("node-a"),
            Some("https://10.96.0.1:443/"),
            Some(Path::new("/t")),
            None,
        )
        .unwrap();
        assert_eq!(ok.api, "https://10.96.0.1:443");
        assert_eq!(ok.node, "node-a");
        assert_eq!(ok.token_file.as_deref(), Some(Path::new("/t")));
        for (sel, node, api) in [
            ("app in ()", "node-a", "https://h:443"),
            ("app=agent", "Node_A", "https://h:443"),
            ("app=agent", "node-a", "http://10.96.0.1:80"),
            ("app=agent", "node-a", "https://h:443/api/v1"),
            ("app=agent", "node-a", "https://user@h:443"),
            ("app=agent", "node-a", "ftp://h"),
        ] {
            assert!(
                KubeSettings::resolve(Some(sel), Some(node), Some(api), None, None).is_err(),
                "{sel} {node} {api}"
            );
        }
        // plain http only to loopback (a local API proxy, tests)
        assert!(KubeSettings::resolve(
            Some("app"),
            Some("n"),
            Some("http://127.0.0.1:8001"),
            None,
            None
        )
        .is_ok());
        // no selector: the watch names pods and images, selects none
        let watch_only =
            KubeSettings::resolve(None, Some("n"), Some("https://h:443"), None, None).unwrap();
        assert!(watch_only.selector.is_none());
        // a node is still needed
        assert!(
            KubeSettings::resolve(None, Some("N!"), Some("https://h:443"), None, None).is_err()
        );
    }
}
