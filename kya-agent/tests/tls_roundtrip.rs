//! Loopback round trips through kya's TLS building blocks, wired the way the
//! interceptor wires them: peek → read ClientHello → (passthrough splice |
//! verified upstream → terminate with the upstream's ALPN) → copy bytes.
//!
//! The agent side is a rustls client trusting only kya's CA; the upstream is
//! a rustls server with a certificate from a test CA made here.

use kya_agent::ca::{LeafName, LocalCa};
use kya_agent::tls::client_hello::{peek_classify, read_client_hello, FirstBytes, HelloLimits};
use kya_agent::tls::leaf_cache::LeafCache;
use kya_agent::tls::passthrough::Passthrough;
use kya_agent::tls::terminate::{refuse, TerminateError, Terminator, UPSTREAM_CERT_ALERT};
use kya_agent::tls::upstream::{CertFailure, UpstreamConnector, UpstreamError};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const TIMEOUT: Duration = Duration::from_secs(10);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl TestCa {
    fn new(cn: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let cert = params.self_signed(&key).unwrap();
        TestCa { cert, key }
    }

    fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// A server leaf for `sans`, valid over [now + from_h, now + to_h] hours.
    fn leaf(
        &self,
        sans: &[&str],
        from_h: i64,
        to_h: i64,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        let now = OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::hours(from_h);
        params.not_after = now + time::Duration::hours(to_h);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }
}

/// An upstream TLS server: announces its negotiated ALPN in one line, then echoes.
async fn spawn_upstream(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[&str],
) -> SocketAddr {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let alpn = alpn_text(tls.get_ref().1.alpn_protocol());
                let (mut rd, mut wr) = tokio::io::split(tls);
                if wr
                    .write_all(format!("upstream-alpn={alpn}\n").as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
            });
        }
    });
    addr
}

fn alpn_text(p: Option<&[u8]>) -> String {
    p.map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_else(|| "none".into())
}

/// What the interceptor saw on one connection.
#[derive(Debug)]
enum Seen {
    Terminated {
        sni: Option<String>,
        upstream_alpn: String,
        client_alpn: String,
    },
    Spliced {
        pattern: String,
    },
    UpstreamRefused(UpstreamError),
    #[allow(dead_code)] // read through Debug in panic messages
    Failed(String),
}

/// A miniature interceptor: every connection goes to `upstream`.
async fn spawn_interceptor(
    upstream: SocketAddr,
    terminator: Terminator,
    connector: UpstreamConnector,
    passthrough: Passthrough,
) -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (terminator, connector, passthrough, tx) = (
                terminator.clone(),
                connector.clone(),
                passthrough.clone(),
                tx.clone(),
            );
            tokio::spawn(async move {
                let seen = handle(tcp, upstream, &terminator, &connector, &passthrough).await;
                let _ = tx.send(seen);
            });
        }
    });
    (addr, rx)
}

async fn handle(
    mut tcp: TcpStream,
    upstream: SocketAddr,
    terminator: &Terminator,
    connector: &UpstreamConnector,
    passthrough: &Passthrough,
) -> Seen {
    match peek_classify(&tcp, TIMEOUT).await {
        Ok(FirstBytes::Tls) => {}
        other => return Seen::Failed(format!("classify: {other:?}")),
    }
    let hello = match read_client_hello(&mut tcp, HelloLimits::default()).await {
        Ok(h) => h,
        Err(e) => return Seen::Failed(format!("hello: {e}")),
    };
    if let Some(pattern) = hello
        .info
        .sni
        .as_deref()
        .and_then(|s| passthrough.matching(s))
    {
        let pattern = pattern.to_string();
        let mut up = TcpStream::connect(upstream).await.unwrap();
        up.write_all(hello.raw()).await.unwrap();
        tokio::spawn(async move {
            let _ = tokio::io::copy_bidirectional(&mut tcp, &mut up).await;
        });
        return Seen::Spliced { pattern };
    }
    let name = match hello.info.leaf_name(upstream.ip()) {
        Ok(n) => n,
        Err(e) => return Seen::Failed(format!("name: {e}")),
    };
    let up = match connector
        .connect_tcp(upstream, &name, &hello.info.alpn)
        .await
    {
        Ok(up) => up,
        Err(e) => {
            let alert = match e {
                UpstreamError::Certificate { .. } => UPSTREAM_CERT_ALERT,
                _ => rustls::AlertDescription::HandshakeFailure,
            };
            refuse(tcp, alert).await;
            return Seen::UpstreamRefused(e);
        }
    };
    let sni = hello.info.sni.clone();
    let mut agent = match terminator
        .terminate(tcp, hello, &name, up.alpn.as_deref())
        .await
    {
        Ok(t) => t,
        Err(e) => return Seen::Failed(format!("terminate: {e}")),
    };
    let seen = Seen::Terminated {
        sni,
        upstream_alpn: alpn_text(up.alpn.as_deref()),
        client_alpn: alpn_text(agent.get_ref().1.alpn_protocol()),
    };
    let mut upstream_tls = up.stream;
    tokio::spawn(async move {
        let _ = tokio::io::copy_bidirectional(&mut agent, &mut upstream_tls).await;
    });
    seen
}

/// The agent: trusts only `root`, offers `alpn`, asks for `name`.
async fn agent_roundtrip(
    addr: SocketAddr,
    root: CertificateDer<'static>,
    name: &str,
    alpn: &[&str],
) -> Result<(String, String), std::io::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await?;
    let server_name = ServerName::try_from(name.to_string()).unwrap();
    let tls = tokio::time::timeout(TIMEOUT, connector.connect(server_name, tcp))
        .await
        .map_err(|_| std::io::Error::other("handshake timeout"))??;
    let client_alpn = alpn_text(tls.get_ref().1.alpn_protocol());
    let mut tls = BufReader::new(tls);
    let mut line = String::new();
    tokio::time::timeout(TIMEOUT, tls.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::other("read timeout"))??;
    tls.get_mut().write_all(b"ping").await?;
    let mut echo = [0u8; 4];
    tokio::time::timeout(TIMEOUT, tls.read_exact(&mut echo))
        .await
        .map_err(|_| std::io::Error::other("echo timeout"))??;
    assert_eq!(&echo, b"ping");
    Ok((client_alpn, line.trim_end().to_string()))
}

struct Setup {
    _dir: tempfile::TempDir,
    kya_ca: CertificateDer<'static>,
    terminator: Terminator,
    connector: UpstreamConnector,
    upstream_ca: TestCa,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let ca = LocalCa::init(dir.path(), false).unwrap();
    let kya_ca = ca.cert_der().clone();
    let cache = LeafCache::new(Arc::new(ca), NonZeroUsize::new(16).unwrap());
    let upstream_ca = TestCa::new("upstream test CA");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(upstream_ca.der()).unwrap();
    Setup {
        _dir: dir,
        kya_ca,
        terminator: Terminator::new(cache),
        connector: UpstreamConnector::new(roots).unwrap(),
        upstream_ca,
    }
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    tokio::time::timeout(TIMEOUT, rx.recv())
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn both_legs_agree_on_h2_or_http11_as_the_upstream_decides() {
    let s = setup();
    let cases: &[(&[&str], &[&str], &str)] = &[
        // (agent offers, upstream supports, expected on both legs)
        (&["h2", "http/1.1"], &["h2", "http/1.1"], "h2"),
        (&["h2", "http/1.1"], &["http/1.1"], "http/1.1"),
        (&["http/1.1", "h2"], &["h2"], "h2"),
        (&["http/1.1"], &["h2", "http/1.1"], "http/1.1"),
        (&[], &["h2", "http/1.1"], "none"),
        (&["h2", "http/1.1"], &[], "none"),
    ];
    for (agent_alpn, upstream_alpn, want) in cases {
        let (chain, key) = s.upstream_ca.leaf(&["mcp.test"], -1, 24);
        let upstream = spawn_upstream(chain, key, upstream_alpn).await;
        let (addr, mut rx) = spawn_interceptor(
            upstream,
            s.terminator.clone(),
            s.connector.clone(),
            Passthrough::default(),
        )
        .await;
        let (client_alpn, line) = agent_roundtrip(addr, s.kya_ca.clone(), "mcp.test", agent_alpn)
            .await
            .unwrap();
        assert_eq!(
            client_alpn, *want,
            "agent leg, case {agent_alpn:?}/{upstream_alpn:?}"
        );
        assert_eq!(line, format!("upstream-alpn={want}"), "upstream leg");
        match next(&mut rx).await {
            Seen::Terminated {
                sni,
                upstream_alpn: u,
                client_alpn: c,
            } => {
                assert_eq!(sni.as_deref(), Some("mcp.test"));
                assert_eq!((u.as_str(), c.as_str()), (*want, *want));
            }
            other => panic!("{other:?}"),
        }
    }
    // One name, six connections: minted once, then served from the cache.
    let stats = s.terminator.cache().stats();
    assert_eq!((stats.misses, stats.hits), (1, 5));
}

#[tokio::test]
async fn a_connection_without_sni_gets_a_leaf_for_the_original_ip() {
    let s = setup();
    let (chain, key) = s.upstream_ca.leaf(&["127.0.0.1"], -1, 24);
    let upstream = spawn_upstream(chain, key, &["http/1.1"]).await;
    let (addr, mut rx) = spawn_interceptor(
        upstream,
        s.terminator.clone(),
        s.connector.clone(),
        Passthrough::default(),
    )
    .await;
    let (alpn, line) = agent_roundtrip(addr, s.kya_ca.clone(), "127.0.0.1", &["http/1.1"])
        .await
        .unwrap();
    assert_eq!(
        (alpn.as_str(), line.as_str()),
        ("http/1.1", "upstream-alpn=http/1.1")
    );
    assert!(matches!(
        next(&mut rx).await,
        Seen::Terminated { sni: None, .. }
    ));
    assert_eq!(s.terminator.cache().len(), 1);
}

#[tokio::test]
async fn invalid_upstream_certificates_are_refused_with_the_reason() {
    let s = setup();
    let stranger = TestCa::new("not trusted");
    let cases = [
        (
            s.upstream_ca.leaf(&["other.test"], -1, 24),
            CertFailure::WrongName,
        ),
        (
            s.upstream_ca.leaf(&["mcp.test"], -48, -24),
            CertFailure::Expired,
        ),
        (
            s.upstream_ca.leaf(&["mcp.test"], 24, 48),
            CertFailure::NotYetValid,
        ),
        (
            stranger.leaf(&["mcp.test"], -1, 24),
            CertFailure::UnknownIssuer,
        ),
    ];
    for ((chain, key), want) in cases {
        let upstream = spawn_upstream(chain, key, &["h2", "http/1.1"]).await;
        let (addr, mut rx) = spawn_interceptor(
            upstream,
            s.terminator.clone(),
            s.connector.clone(),
            Passthrough::default(),
        )
        .await;
        // The agent never gets a kya-signed session for a bad upstream.
        // It is told why, with a bad_certificate alert.
        let agent = agent_roundtrip(addr, s.kya_ca.clone(), "mcp.test", &["h2"]).await;
        let err = agent.expect_err("agent must not get a session");
        assert!(
            err.to_string().contains("BadCertificate"),
            "{want:?}: {err}"
        );
        match next(&mut rx).await {
            Seen::UpstreamRefused(UpstreamError::Certificate { name, reason }) => {
                assert_eq!(name, "mcp.test");
                assert_eq!(reason, want);
            }
            other => panic!("{want:?}: {other:?}"),
        }
    }
    assert!(
        s.terminator.cache().is_empty(),
        "nothing minted for refused upstreams"
    );
}

#[tokio::test]
async fn passthrough_hosts_are_spliced_and_the_agent_sees_the_real_certificate() {
    let s = setup();
    let (chain, key) = s.upstream_ca.leaf(&["api.pinned.test"], -1, 24);
    let upstream = spawn_upstream(chain, key, &["h2"]).await;
    let passthrough = Passthrough::new(&["*.pinned.test"]).unwrap();
    let (addr, mut rx) = spawn_interceptor(
        upstream,
        s.terminator.clone(),
        s.connector.clone(),
        passthrough,
    )
    .await;
    // Trusting only the upstream's CA (not kya's) works: no decryption happened.
    let (alpn, line) = agent_roundtrip(addr, s.upstream_ca.der(), "API.pinned.test", &["h2"])
        .await
        .unwrap();
    assert_eq!((alpn.as_str(), line.as_str()), ("h2", "upstream-alpn=h2"));
    match next(&mut rx).await {
        Seen::Spliced { pattern } => assert_eq!(pattern, "*.pinned.test"),
        other => panic!("{other:?}"),
    }
    assert!(s.terminator.cache().is_empty());
}

#[tokio::test]
async fn an_agent_offering_only_uninspectable_alpn_is_not_terminated() {
    let s = setup();
    let (chain, key) = s.upstream_ca.leaf(&["mcp.test"], -1, 24);
    let upstream = spawn_upstream(chain, key, &["imap"]).await;
    let (addr, mut rx) = spawn_interceptor(
        upstream,
        s.terminator.clone(),
        s.connector.clone(),
        Passthrough::default(),
    )
    .await;
    assert!(
        agent_roundtrip(addr, s.kya_ca.clone(), "mcp.test", &["imap"])
            .await
            .is_err()
    );
    assert!(matches!(
        next(&mut rx).await,
        Seen::UpstreamRefused(UpstreamError::UninspectableAlpn { .. })
    ));
}

#[tokio::test]
async fn terminating_with_an_alpn_the_agent_did_not_offer_is_refused() {
    let s = setup();
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let root = s.kya_ca.clone();
    let agent =
        tokio::spawn(async move { agent_roundtrip(addr, root, "mcp.test", &["http/1.1"]).await });
    let (mut tcp, _) = listener.accept().await.unwrap();
    let hello = read_client_hello(&mut tcp, HelloLimits::default())
        .await
        .unwrap();
    let name = LeafName::parse("mcp.test").unwrap();
    let got = s.terminator.terminate(tcp, hello, &name, Some(b"h2")).await;
    assert!(
        matches!(got, Err(TerminateError::AlpnNotOffered { .. })),
        "{:?}",
        got.err()
    );
    assert!(agent.await.unwrap().is_err());
}

#[tokio::test]
async fn a_reconnecting_agent_resumes_its_session_on_the_agent_leg() {
    let s = setup();
    let (chain, key) = s.upstream_ca.leaf(&["mcp.test"], -1, 24);
    let upstream = spawn_upstream(chain, key, &["h2"]).await;
    let (addr, mut rx) = spawn_interceptor(
        upstream,
        s.terminator.clone(),
        s.connector.clone(),
        Passthrough::default(),
    )
    .await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(s.kya_ca.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut kinds = Vec::new();
    for _ in 0..2 {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("mcp.test").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        let mut tls = BufReader::new(tls);
        // Reading the upstream's line also processes the session tickets.
        let mut line = String::new();
        tls.read_line(&mut line).await.unwrap();
        assert_eq!(line.trim_end(), "upstream-alpn=h2");
        kinds.push(tls.get_ref().get_ref().1.handshake_kind());
        assert!(matches!(next(&mut rx).await, Seen::Terminated { .. }));
    }
    assert_eq!(
        kinds,
        vec![
            Some(rustls::HandshakeKind::Full),
            Some(rustls::HandshakeKind::Resumed)
        ]
    );
}
