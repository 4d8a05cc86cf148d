//! The proxy over TLS on both legs, as the interceptor runs it: the agent leg is
//! terminated with a leaf for the SNI signed by a test CA, the upstream leg is a
//! verified TLS client, and the ALPN the upstream agreed is the one served to the
//! agent (asserted on both legs, for h2 and HTTP/1.1). Most tests use a small
//! test-local TLS set-up (so they can observe both ALPNs);
//! `with_kya_tls_pieces_both_alpns` runs kya's own `ca`/`tls` modules.

mod proxy_support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kya_agent::intercept::http::{serve_http, ConnFacts, Governor, HttpVersion, Limits};
use proxy_support::*;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

struct Pki {
    ca: CertificateDer<'static>,
    ca_cert: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    fn new() -> Pki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "kya test CA");
        let ca_cert = p.self_signed(&ca_key).unwrap();
        Pki {
            ca: ca_cert.der().clone(),
            ca_cert,
            ca_key,
        }
    }

    fn leaf(&self, name: &str) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let p = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        let cert = p.signed_by(&key, &self.ca_cert, &self.ca_key).unwrap();
        (
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }

    /// A leaf for `names` as PEM files in `dir` (for peers that read files).
    fn leaf_pem(
        &self,
        names: &[&str],
        dir: &std::path::Path,
    ) -> (std::path::PathBuf, std::path::PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let p =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = p.signed_by(&key, &self.ca_cert, &self.ca_key).unwrap();
        let (c, k) = (dir.join("leaf.pem"), dir.join("leaf.key"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    fn ca_pem(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, self.ca_cert.pem()).unwrap();
        path
    }

    fn acceptor(&self, name: &str, alpn: &[&[u8]]) -> TlsAcceptor {
        let (chain, key) = self.leaf(name);
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        TlsAcceptor::from(Arc::new(cfg))
    }

    fn connector(&self, alpn: &[&[u8]]) -> TlsConnector {
        connector_trusting(&self.ca, alpn)
    }
}

/// A TLS client trusting only `ca`, offering `alpn`.
fn connector_trusting(ca: &CertificateDer<'static>, alpn: &[&[u8]]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    TlsConnector::from(Arc::new(cfg))
}

/// What the test proxy saw of the ALPNs, per connection.
type Alpns = Arc<std::sync::Mutex<Vec<(Option<Vec<u8>>, Option<Vec<u8>>)>>>;

/// A TLS-terminating proxy: upstream TLS first (offering what the agent offers),
/// then the agent leg served with exactly the ALPN the upstream agreed.
async fn tls_proxy(
    pki: Arc<Pki>,
    upstream: SocketAddr,
    name: &'static str,
    gov: Arc<FakeGov>,
    alpns: Alpns,
) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut n = 0;
        loop {
            let Ok((agent, _)) = l.accept().await else {
                return;
            };
            n += 1;
            let (pki, gov, alpns) = (pki.clone(), gov.clone(), alpns.clone());
            tokio::spawn(async move {
                // Peek the agent's ClientHello for SNI and ALPN.
                let acceptor = tokio_rustls::LazyConfigAcceptor::new(
                    rustls::server::Acceptor::default(),
                    agent,
                );
                let Ok(start) = acceptor.await else { return };
                let hello = start.client_hello();
                let sni = hello.server_name().map(str::to_string);
                let offered: Vec<Vec<u8>> = hello
                    .alpn()
                    .map(|a| a.map(|p| p.to_vec()).collect())
                    .unwrap_or_default();
                let offered_refs: Vec<&[u8]> = offered.iter().map(|v| v.as_slice()).collect();
                let up_tcp = TcpStream::connect(upstream).await.unwrap();
                let server_name =
                    ServerName::try_from(sni.clone().unwrap_or_else(|| name.to_string())).unwrap();
                let up = pki
                    .connector(&offered_refs)
                    .connect(server_name, up_tcp)
                    .await
                    .unwrap();
                let agreed = up.get_ref().1.alpn_protocol().map(|a| a.to_vec());
                let serve_alpn: Vec<&[u8]> = agreed.iter().map(|a| a.as_slice()).collect();
                let (chain, key) = pki.leaf(sni.as_deref().unwrap_or(name));
                let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .unwrap();
                cfg.alpn_protocols = serve_alpn.iter().map(|a| a.to_vec()).collect();
                let Ok(agent_tls) = start.into_stream(Arc::new(cfg)).await else {
                    return;
                };
                let served = agent_tls.get_ref().1.alpn_protocol().map(|a| a.to_vec());
                alpns.lock().unwrap().push((served.clone(), agreed.clone()));
                let version = if agreed.as_deref() == Some(b"h2") {
                    HttpVersion::H2
                } else {
                    HttpVersion::H1
                };
                let conn = Arc::new(ConnFacts {
                    process: Default::default(),
                    dst: upstream,
                    sni,
                    tls: true,
                    conn_id: n,
                    tunnel: None,
                });
                let gov: Arc<dyn Governor> = Arc::new(GovHandle(gov));
                let _ = serve_http(
                    agent_tls,
                    up,
                    version,
                    conn,
                    gov,
                    &Limits::default(),
                    std::sync::Arc::new(kya_agent::intercept::names::NameResolver::with_table(
                        Default::default(),
                    )),
                    None,
                )
                .await;
            });
        }
    });
    addr
}

async fn setup() -> (Arc<Pki>, Upstream, Arc<FakeGov>, SocketAddr, Alpns) {
    let pki = Arc::new(Pki::new());
    let up = upstream_with(Some(pki.acceptor("mcp.test", &[b"h2", b"http/1.1"]))).await;
    let gov = default_gov();
    let alpns: Alpns = Default::default();
    let addr = tls_proxy(pki.clone(), up.addr, "mcp.test", gov.clone(), alpns.clone()).await;
    (pki, up, gov, addr, alpns)
}

fn req(uri: &str, host: Option<&str>, body: &Value) -> Request<Full<Bytes>> {
    let mut b = Request::post(uri)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream");
    if let Some(h) = host {
        b = b.header("host", h);
    }
    b.body(Full::new(Bytes::from(body.to_string()))).unwrap()
}

#[tokio::test]
async fn tls_h2_on_both_legs() {
    let (pki, up, _gov, addr, alpns) = setup().await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = pki
        .connector(&[b"h2", b"http/1.1"])
        .connect(ServerName::try_from("mcp.test").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "agent leg ALPN"
    );
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = tx
        .send_request(req(
            "https://mcp.test/mcp",
            None,
            &call(1, "search_docs", json!({})),
        ))
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let v: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert!(v["result"]["content"][0]["text"]
        .as_str()
        .unwrap()
        .starts_with("ran search_docs"));
    let resp = tx
        .send_request(req(
            "https://mcp.test/mcp",
            None,
            &call(2, "delete_records", json!({})),
        ))
        .await
        .unwrap();
    let v: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["result"]["isError"], json!(true));
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].version,
        http::Version::HTTP_2,
        "upstream leg spoke h2"
    );
    assert_eq!(
        alpns.lock().unwrap()[0],
        (Some(b"h2".to_vec()), Some(b"h2".to_vec()))
    );
}

#[tokio::test]
async fn tls_http11_on_both_legs_and_fronting_refused() {
    let (pki, up, gov, addr, alpns) = setup().await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = pki
        .connector(&[b"http/1.1"])
        .connect(ServerName::try_from("mcp.test").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    // Host names another server than the SNI: domain fronting.
    let resp = tx
        .send_request(req(
            "/mcp",
            Some("other.test"),
            &call(1, "search_docs", json!({})),
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 421);
    let _ = resp.into_body().collect().await;
    assert!(up.seen().is_empty());
    assert!(gov.refusals.lock().unwrap()[0].contains("domain fronting"));
    // Paired: the right Host on the same connection.
    tx.ready().await.unwrap();
    let resp = tx
        .send_request(req(
            "/mcp",
            Some("mcp.test"),
            &call(2, "search_docs", json!({})),
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let _ = resp.into_body().collect().await;
    assert_eq!(up.seen()[0].version, http::Version::HTTP_11);
    assert_eq!(gov.calls.lock().unwrap()[0].server, "mcp.test");
    assert_eq!(
        alpns.lock().unwrap()[0],
        (Some(b"http/1.1".to_vec()), Some(b"http/1.1".to_vec()))
    );
}

#[tokio::test]
async fn garbage_after_the_handshake_is_closed_cleanly() {
    let (pki, up, _gov, addr, _alpns) = setup().await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = pki
        .connector(&[b"http/1.1"])
        .connect(ServerName::try_from("mcp.test").unwrap(), tcp)
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls.write_all(b"\x00\x01\x02 not http at all\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let r =
        tokio::time::timeout(std::time::Duration::from_secs(5), tls.read_to_end(&mut out)).await;
    assert!(r.is_ok(), "connection left open");
    let text = String::from_utf8_lossy(&out);
    assert!(out.is_empty() || text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(up.seen().is_empty());
}

/// Real h2 peers on both sides: PyPI `httpx` (http2=True) → kya (TLS, ALPN h2 on
/// both legs) → PyPI `hypercorn` serving the Python MCP server over h2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_h2_peers_httpx_to_hypercorn() {
    ensure_peers();
    let pki = Arc::new(Pki::new());
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = pki.leaf_pem(&["mcp.test"], dir.path());
    let ca = pki.ca_pem(dir.path());
    let log = dir.path().join("ran");
    let port = free_port();
    let child = tokio::process::Command::new(peers().join(".venv/bin/hypercorn"))
        .arg("--certfile")
        .arg(&cert)
        .arg("--keyfile")
        .arg(&key)
        .arg("--bind")
        .arg(format!("127.0.0.1:{port}"))
        .arg("asgi:app")
        .current_dir(peers())
        // hypercorn serves from worker processes: the group goes at drop.
        .process_group(0)
        .env("KYA_PEER_LOG", &log)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let _srv = Peer(child);
    wait_listening(port).await;
    let gov = default_gov();
    let alpns: Alpns = Default::default();
    let upstream = SocketAddr::from(([127, 0, 0, 1], port));
    let addr = tls_proxy(
        pki.clone(),
        upstream,
        "mcp.test",
        gov.clone(),
        alpns.clone(),
    )
    .await;

    // The client reaches the proxy by IP (as the redirect would deliver it) and
    // sends SNI and Host "mcp.test" (KYA_SNI), so both legs name the same server.
    let call = |tool: &'static str, args: &'static str| {
        let ca = ca.clone();
        async move {
            let out = tokio::process::Command::new(peers().join(".venv/bin/python"))
                .arg(peers().join("h2_call.py"))
                .arg(format!("https://127.0.0.1:{}/mcp", addr.port()))
                .arg(&ca)
                .arg(tool)
                .arg(args)
                .env("KYA_SNI", "mcp.test")
                .output()
                .await
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            serde_json::from_str::<Value>(text.lines().last().unwrap_or("")).unwrap_or_else(|_| {
                panic!("h2_call: {text} {}", String::from_utf8_lossy(&out.stderr))
            })
        }
    };
    let v = call("search_docs", r#"{"query":"h2"}"#).await;
    assert_eq!(v["http_version"], "HTTP/2", "{v}");
    assert_eq!(
        v["body"]["result"]["content"][0]["text"], "found 3 documents about h2",
        "{v}"
    );
    let v = call("delete_records", r#"{"table":"t"}"#).await;
    assert_eq!(v["body"]["result"]["isError"], json!(true), "{v}");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap_or_default(),
        "search_docs\n"
    );
    for (served, agreed) in alpns.lock().unwrap().iter() {
        assert_eq!(served.as_deref(), Some(&b"h2"[..]));
        assert_eq!(agreed.as_deref(), Some(&b"h2"[..]));
    }
}

/// The same flow with kya's own TLS pieces (the `ca`/`tls` modules): ClientHello
/// read, verified upstream connector, termination with a leaf from kya's local CA
/// serving the upstream's ALPN; then the proxy. h2 and HTTP/1.1.
#[tokio::test]
async fn with_kya_tls_pieces_both_alpns() {
    use kya_agent::tls::client_hello::{read_client_hello, HelloLimits};
    use kya_agent::tls::passthrough::Passthrough;
    use kya_agent::tls::upstream::UpstreamConnector;
    use kya_agent::tls::TlsContext;

    let pki = Arc::new(Pki::new());
    let up = upstream_with(Some(pki.acceptor("mcp.test", &[b"h2", b"http/1.1"]))).await;
    let state = tempfile::tempdir().unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.clone()).unwrap();
    let ctx = TlsContext::new(
        state.path(),
        UpstreamConnector::new(roots).unwrap(),
        Passthrough::new::<&str>(&[]).unwrap(),
        std::num::NonZeroUsize::new(16).unwrap(),
    )
    .unwrap();
    let gov = default_gov();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (ctx2, gov2, up_addr) = (ctx.clone(), gov.clone(), up.addr);
    tokio::spawn(async move {
        let mut n = 0;
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            n += 1;
            let (ctx, gov) = (ctx2.clone(), gov2.clone());
            tokio::spawn(async move {
                let hello = read_client_hello(&mut tcp, HelloLimits::default())
                    .await
                    .unwrap();
                let name = hello.info.leaf_name(up_addr.ip()).unwrap();
                let sni = hello.info.sni.clone();
                let upstream = ctx
                    .upstream
                    .connect_tcp(up_addr, &name, &hello.info.alpn)
                    .await
                    .unwrap();
                let agent = ctx
                    .terminator
                    .terminate(tcp, hello, &name, upstream.alpn.as_deref())
                    .await
                    .unwrap();
                let version = match upstream.alpn.as_deref() {
                    Some(b"h2") => HttpVersion::H2,
                    _ => HttpVersion::H1,
                };
                let conn = Arc::new(ConnFacts {
                    process: Default::default(),
                    dst: up_addr,
                    sni,
                    tls: true,
                    conn_id: n,
                    tunnel: None,
                });
                let gov: Arc<dyn Governor> = Arc::new(GovHandle(gov));
                let _ = serve_http(
                    agent,
                    upstream.stream,
                    version,
                    conn,
                    gov,
                    &Limits::default(),
                    std::sync::Arc::new(kya_agent::intercept::names::NameResolver::with_table(
                        Default::default(),
                    )),
                    None,
                )
                .await;
            });
        }
    });
    // The agent trusts only kya's CA.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ctx.ca.cert_der().clone()).unwrap();
    let client_cfg = |alpn: &[&[u8]]| {
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        TlsConnector::from(Arc::new(cfg))
    };

    // h2.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = client_cfg(&[b"h2", b"http/1.1"])
        .connect(ServerName::try_from("mcp.test").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = tx
        .send_request(req(
            "https://mcp.test/mcp",
            None,
            &call(1, "search_docs", json!({})),
        ))
        .await
        .unwrap();
    let v: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert!(v["result"]["content"][0]["text"]
        .as_str()
        .unwrap()
        .starts_with("ran search_docs"));
    let resp = tx
        .send_request(req(
            "https://mcp.test/mcp",
            None,
            &call(2, "delete_records", json!({})),
        ))
        .await
        .unwrap();
    let v: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["result"]["isError"], json!(true));

    // HTTP/1.1.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = client_cfg(&[b"http/1.1"])
        .connect(ServerName::try_from("mcp.test").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = tx
        .send_request(req(
            "/mcp",
            Some("mcp.test"),
            &call(3, "search_docs", json!({})),
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let _ = resp.into_body().collect().await;

    let seen = up.seen();
    assert_eq!(
        seen.iter().map(|s| s.version).collect::<Vec<_>>(),
        vec![http::Version::HTTP_2, http::Version::HTTP_11]
    );
    assert_eq!(up.tools_called(), vec!["search_docs", "search_docs"]);
}

/// A TCP relay to one of `targets`, chosen per connection by the returned
/// index (an upstream "restarted" with another configuration at the same
/// address).
async fn switchable_relay(targets: Vec<SocketAddr>) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let which = Arc::new(AtomicUsize::new(0));
    let w = which.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = l.accept().await {
            let target = targets[w.load(Ordering::SeqCst)];
            tokio::spawn(async move {
                if let Ok(mut out) = TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    (addr, which)
}

/// kya's own connection handling ([`dispatch::handle`]) on an ephemeral
/// port, every connection's original destination being `dst`; returns the
/// address and the CA the agent must trust.
async fn kya_dispatch(
    pki: &Pki,
    dst: SocketAddr,
    gov: Arc<FakeGov>,
) -> (SocketAddr, CertificateDer<'static>, tempfile::TempDir) {
    let state = tempfile::tempdir().unwrap();
    let insp = inspection(state.path(), Some(pki.ca.clone()), Arc::new(GovHandle(gov)));
    let ca = insp.tls.ca.cert_der().clone();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((agent, _)) = l.accept().await {
            let insp = insp.clone();
            tokio::spawn(async move {
                kya_agent::intercept::dispatch::handle(agent, this_process_to(dst), &insp).await
            });
        }
    });
    (addr, ca, state)
}

/// One `tools/call` on a new TLS connection to kya offering h2 and HTTP/1.1:
/// the ALPN agreed with the agent and the answer, or where it failed.
async fn call_through(
    kya: SocketAddr,
    ca: &CertificateDer<'static>,
    id: u64,
) -> Result<(Option<Vec<u8>>, Value), String> {
    let tcp = TcpStream::connect(kya).await.unwrap();
    let tls = connector_trusting(ca, &[b"h2", b"http/1.1"])
        .connect(ServerName::try_from("mcp.test").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let body = call(id, "search_docs", json!({}));
    let resp = if alpn.as_deref() == Some(b"h2") {
        let (mut tx, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| format!("h2: {e}"))?;
        tokio::spawn(conn);
        tx.send_request(req("https://mcp.test/mcp", None, &body))
            .await
            .map_err(|e| format!("request: {e}"))?
    } else {
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("h1: {e}"))?;
        tokio::spawn(conn);
        tx.send_request(req("/mcp", Some("mcp.test"), &body))
            .await
            .map_err(|e| format!("request: {e}"))?
    };
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok((alpn, json_of(&bytes)))
}

/// A new connection to an upstream kya has met before runs both handshakes
/// at once, assuming what the upstream agreed last time. When the upstream
/// has changed (another ALPN, a certificate kya cannot verify), that
/// connection is refused on the record with nothing forwarded, and the next
/// one is made in turn again: the agent speaks what the upstream now agrees,
/// or is refused with a TLS alert.
#[tokio::test]
async fn a_changed_upstream_is_noticed_by_the_handshakes_at_once() {
    let pki = Arc::new(Pki::new());
    let h2 = upstream_with(Some(pki.acceptor("mcp.test", &[b"h2", b"http/1.1"]))).await;
    let h1 = upstream_with(Some(pki.acceptor("mcp.test", &[b"http/1.1"]))).await;
    let stranger = Pki::new();
    let untrusted = upstream_with(Some(stranger.acceptor("mcp.test", &[b"h2"]))).await;
    let (relay, which) = switchable_relay(vec![h2.addr, h1.addr, untrusted.addr]).await;
    let gov = default_gov();
    let (kya, ca, _state) = kya_dispatch(&pki, relay, gov.clone()).await;
    let ran = |v: &Value| {
        v["result"]["content"][0]["text"]
            .as_str()
            .is_some_and(|t| t.starts_with("ran search_docs"))
    };

    // First meeting, then a known upstream: both work, over h2.
    for id in [1, 2] {
        let (alpn, v) = call_through(kya, &ca, id).await.unwrap();
        assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
        assert!(ran(&v), "{v}");
    }
    assert_eq!(h2.tools_called().len(), 2);
    assert!(gov.refusals.lock().unwrap().is_empty());

    // The upstream now agrees HTTP/1.1 only: one connection is refused on the
    // record before anything is forwarded; the next speaks HTTP/1.1.
    which.store(1, Ordering::SeqCst);
    let refused = call_through(kya, &ca, 3).await;
    assert!(refused.is_err(), "{refused:?}");
    assert!(h1.tools_called().is_empty());
    let reasons = gov.refusals.lock().unwrap().clone();
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(
        reasons[0].contains("agreed ALPN http/1.1 where it agreed h2 before"),
        "{reasons:?}"
    );
    let (alpn, v) = call_through(kya, &ca, 4).await.unwrap();
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert!(ran(&v), "{v}");
    assert_eq!(h1.tools_called().len(), 1);

    // The upstream's certificate no longer verifies: refused on the record
    // (the agent's handshake had already run beside it: a reset), then in
    // turn, before the agent's handshake completes (a TLS alert).
    which.store(2, Ordering::SeqCst);
    for id in [5, 6] {
        let refused = call_through(kya, &ca, id).await;
        assert!(refused.is_err(), "{refused:?}");
    }
    let refused = call_through(kya, &ca, 7).await;
    match refused {
        Err(e) => assert!(e.starts_with("handshake:"), "{e}"),
        Ok(r) => panic!("an unverified upstream answered: {r:?}"),
    }
    assert!(untrusted.seen().is_empty());
    let reasons = gov.refusals.lock().unwrap().clone();
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    for r in &reasons[1..] {
        assert!(r.contains("upstream TLS to mcp.test refused"), "{r}");
    }
    assert_eq!(h2.tools_called().len() + h1.tools_called().len(), 3);
}
