//! Bounded under hostile load: each limit is reached, the connection or
//! message past it refused (audited through the governor), counted, and
//! other agents keep being served.

mod proxy_support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use kya_agent::intercept::http::Limits;
use kya_agent::intercept::origin::OriginError;
use kya_agent::intercept::{ConnOrigin, Interceptor, InterceptorConfig, OriginSource};
use proxy_support::*;
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;

/// Longest a step may take before the test calls it hung (a failure guard,
/// not a measured time).
const HUNG: Duration = Duration::from_secs(20);

/// Origins registered by the agent's source address: where it was going and
/// which process it was.
#[derive(Default)]
struct Table(Mutex<HashMap<SocketAddr, (SocketAddr, u32)>>);

impl OriginSource for Table {
    fn take(
        &self,
        peer: SocketAddr,
        _local: SocketAddr,
        _netns: u64,
    ) -> Result<Option<ConnOrigin>, OriginError> {
        let entry = self.0.lock().unwrap().remove(&peer);
        Ok(entry.map(|(dst, pid)| ConnOrigin {
            dst,
            process: kya_common::ProcessIdentity {
                pid,
                ..Default::default()
            },
            tid: pid,
            cgroup_id: 0,
            netns: None,
        }))
    }
}

struct Setup {
    addr: SocketAddr,
    table: Arc<Table>,
    gov: Arc<FakeGov>,
    up: Upstream,
    stats: Arc<kya_agent::intercept::InterceptStats>,
    stop: watch::Sender<bool>,
    _state: tempfile::TempDir,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn setup(max_connections: usize, max_connections_per_process: usize) -> Setup {
    let up = upstream().await;
    let gov = default_gov();
    let state = tempfile::tempdir().expect("tempdir");
    let insp = inspection(state.path(), None, Arc::new(GovHandle(gov.clone())));
    let interceptor = Interceptor::bind(InterceptorConfig {
        listen_port: 0,
        max_connections,
        max_connections_per_process,
        drain: Duration::from_millis(100),
    })
    .expect("bind");
    let addr = interceptor.local_addrs()[0];
    let stats = interceptor.stats();
    let table = Arc::new(Table::default());
    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(interceptor.serve(table.clone(), Some(insp), stop_rx));
    Setup {
        addr,
        table,
        gov,
        up,
        stats,
        stop,
        _state: state,
    }
}

impl Setup {
    /// A TCP connection to the interceptor, as if redirected from process `pid`.
    async fn connect(&self, pid: u32) -> TcpStream {
        let sock = TcpSocket::new_v4().expect("socket");
        sock.bind("127.0.0.1:0".parse().expect("address"))
            .expect("bind");
        let src = sock.local_addr().expect("address");
        self.table
            .0
            .lock()
            .unwrap()
            .insert(src, (self.up.addr, pid));
        sock.connect(self.addr).await.expect("connect")
    }

    /// An HTTP/1.1 connection of process `pid` that has had one tool call
    /// answered (so kya counts it open); kept alive while the sender lives.
    async fn served(
        &self,
        pid: u32,
        id: u64,
    ) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
        let s = self.connect(pid).await;
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let status = tokio::time::timeout(HUNG, call_on(&mut tx, self.addr, id))
            .await
            .expect("the call hung");
        assert_eq!(status, 200, "process {pid}'s call was not served");
        tx
    }

    /// The connection is refused: reset or closed before any answer.
    async fn refused(&self, pid: u32) {
        let mut s = self.connect(pid).await;
        let mut buf = [0u8; 64];
        let got = tokio::time::timeout(HUNG, s.read(&mut buf))
            .await
            .expect("the connection past the limit was left waiting, not refused");
        assert!(matches!(got, Ok(0) | Err(_)), "{got:?}");
    }
}

/// A `tools/call` of `search_docs` with id `id`, for the server at `addr`.
fn call_request(addr: SocketAddr, id: u64) -> hyper::Request<Full<Bytes>> {
    let body = serde_json::to_vec(&call(id, "search_docs", json!({"q": id}))).expect("json");
    hyper::Request::post("/mcp")
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(Full::new(Bytes::from(body)))
        .expect("request")
}

async fn call_on(
    tx: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    addr: SocketAddr,
    id: u64,
) -> u16 {
    let req = call_request(addr, id);
    tx.ready().await.expect("ready");
    let resp = tx.send_request(req).await.expect("send");
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    status
}

#[tokio::test]
async fn one_process_cannot_take_more_than_its_connections() {
    if !kya_testkit::root_or_skip(
        "one_process_cannot_take_more_than_its_connections",
        "needs root (SO_MARK on the upstream leg)",
    ) {
        return;
    }
    let k = setup(64, 2).await;
    let _a1 = k.served(1001, 1).await;
    let _a2 = k.served(1001, 2).await;
    // The process's third connection is refused, on record, counted.
    k.refused(1001).await;
    assert_eq!(k.stats.refused_process_limit.load(Ordering::Relaxed), 1);
    assert_eq!(k.stats.refused_total_limit.load(Ordering::Relaxed), 0);
    let refusals = k.gov.refusals.lock().unwrap().clone();
    assert!(
        refusals
            .iter()
            .any(|r| r.contains("process 1001") && r.contains("max_connections_per_process")),
        "{refusals:?}"
    );
    // Another process is served meanwhile, and its call reached the server.
    let _b = k.served(2002, 3).await;
    assert_eq!(k.up.tools_called().len(), 3);
}

#[tokio::test]
async fn the_total_limit_refuses_at_once_and_frees_as_connections_end() {
    if !kya_testkit::root_or_skip(
        "the_total_limit_refuses_at_once_and_frees_as_connections_end",
        "needs root (SO_MARK on the upstream leg)",
    ) {
        return;
    }
    let k = setup(2, 64).await;
    let a1 = k.served(1001, 1).await;
    let _a2 = k.served(1001, 2).await;
    // A third connection, from anyone, is refused at once (not left waiting
    // for a permit), on record, counted.
    k.refused(2002).await;
    assert_eq!(k.stats.refused_total_limit.load(Ordering::Relaxed), 1);
    let refusals = k.gov.refusals.lock().unwrap().clone();
    assert!(
        refusals
            .iter()
            .any(|r| r.contains("connection limit") && r.contains("intercept.max_connections")),
        "{refusals:?}"
    );
    // One connection ends: its place is given to the next one (tried until
    // kya has seen the end; each try before that is refused, never left
    // hanging).
    drop(a1);
    let mut served = false;
    for id in 10..200 {
        let s = k.connect(2002).await;
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        tx.ready().await.expect("ready");
        let sent = {
            let body =
                serde_json::to_vec(&call(id, "search_docs", json!({"q": id}))).expect("json");
            let req = hyper::Request::post("/mcp")
                .header("host", k.addr.to_string())
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
                .expect("request");
            tokio::time::timeout(HUNG, tx.send_request(req))
                .await
                .expect("a connection was left hanging")
        };
        if let Ok(resp) = sent {
            assert_eq!(resp.status(), 200);
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        served,
        "the freed place was never given to a new connection"
    );
    assert_eq!(k.up.tools_called().len(), 3);
}

/// The proxy on an ephemeral port, every connection as process `pid`.
async fn proxy_as(upstream: SocketAddr, gov: Arc<FakeGov>, limits: Limits, pid: u32) -> SocketAddr {
    use kya_agent::intercept::http::{serve_http, ConnFacts, HttpVersion};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((agent, _)) = listener.accept().await {
            n += 1;
            let Ok(up) = TcpStream::connect(upstream).await else {
                return;
            };
            let conn = Arc::new(ConnFacts {
                process: kya_common::ProcessIdentity {
                    pid,
                    ..Default::default()
                },
                dst: upstream,
                sni: None,
                tls: false,
                conn_id: n,
                tunnel: None,
            });
            let gov: Arc<dyn kya_agent::intercept::http::Governor> =
                Arc::new(GovHandle(gov.clone()));
            let limits = limits.clone();
            tokio::spawn(async move {
                let _ = serve_http(
                    agent,
                    up,
                    HttpVersion::Detect,
                    conn,
                    gov,
                    &limits,
                    Arc::new(kya_agent::intercept::names::NameResolver::with_table(
                        Default::default(),
                    )),
                    Some(reconnect_to(upstream)),
                )
                .await;
            });
        }
    });
    addr
}

/// Wait (bounded) until `pid` has `n` calls held.
async fn until_held(limits: &Limits, pid: u32, n: usize) {
    for _ in 0..2000 {
        if limits.held_by_process.held(pid) == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!(
        "process {pid} has {} calls held, not {n}",
        limits.held_by_process.held(pid)
    );
}

#[tokio::test]
async fn one_process_cannot_fill_the_held_calls() {
    let hold = Act::Hold(Duration::from_secs(60));
    let gov = FakeGov::new(&[
        ("search_docs", Act::Allow),
        ("hold_a", hold),
        ("hold_b", hold),
        ("hold_c", hold),
        ("hold_d", hold),
    ]);
    let up = upstream().await;
    let limits = Limits {
        max_held_per_process: 2,
        ..Limits::default()
    };
    let a = proxy_as(up.addr, gov.clone(), limits.clone(), 1001).await;
    let b = proxy_as(up.addr, gov.clone(), limits.clone(), 2002).await;

    // Two calls of process 1001 held, each on its own connection.
    let mut waiting = Vec::new();
    for (id, tool) in [(1, "hold_a"), (2, "hold_b")] {
        waiting.push(tokio::spawn(async move {
            let mut c = Client::h1(a).await;
            let (_, _, body) = c
                .post("/mcp", call(id, tool, json!({})).to_string(), &[])
                .await;
            json_of(&body)
        }));
        gov.wait_for_hold(tool).await;
    }
    until_held(&limits, 1001, 2).await;

    // A third, on a third connection: denied at once, on record, counted.
    let mut c = Client::h1(a).await;
    let (status, _, body) = tokio::time::timeout(
        HUNG,
        c.post("/mcp", call(3, "hold_c", json!({})).to_string(), &[]),
    )
    .await
    .expect("the hold past the limit was left waiting");
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&body).to_string();
    assert!(text.contains("max_held_per_process"), "{text}");
    assert_eq!(
        limits
            .refusals
            .held_per_process
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let refusals = gov.refusals.lock().unwrap().clone();
    assert!(
        refusals.iter().any(|r| r.contains("process 1001")),
        "{refusals:?}"
    );

    // Another process is unaffected: its allowed call flows and its own
    // call is held.
    let mut cb = Client::h1(b).await;
    let (status, _, _) = cb
        .post("/mcp", call(4, "search_docs", json!({})).to_string(), &[])
        .await;
    assert_eq!(status, 200);
    let held_b = tokio::spawn(async move {
        let mut c = Client::h1(b).await;
        let (_, _, body) = c
            .post("/mcp", call(5, "hold_d", json!({})).to_string(), &[])
            .await;
        json_of(&body)
    });
    gov.wait_for_hold("hold_d").await;
    until_held(&limits, 2002, 1).await;

    // A hold that ends gives its place back.
    gov.release("hold_a", true).await;
    let answered = tokio::time::timeout(HUNG, waiting.remove(0))
        .await
        .expect("the approved call hung")
        .expect("task");
    assert!(answered.get("result").is_some(), "{answered}");
    until_held(&limits, 1001, 1).await;
    gov.release("hold_b", true).await;
    gov.release("hold_d", true).await;
    let _ = held_b.await;
    let called = up.tools_called();
    assert!(!called.contains(&"hold_c".to_string()), "{called:?}");
    assert!(called.contains(&"hold_a".to_string()), "{called:?}");
    assert!(called.contains(&"search_docs".to_string()), "{called:?}");
}

/// Raw HTTP/2 frames, for an agent that does not play by the rules.
mod h2raw {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    pub(crate) const HEADERS: u8 = 0x1;
    pub(crate) const RST_STREAM: u8 = 0x3;
    pub(crate) const SETTINGS: u8 = 0x4;
    pub(crate) const GOAWAY: u8 = 0x7;
    pub(crate) const CONTINUATION: u8 = 0x9;
    pub(crate) const END_HEADERS: u8 = 0x4;
    pub(crate) const ACK: u8 = 0x1;
    pub(crate) const REFUSED_STREAM: u32 = 0x7;
    pub(crate) const ENHANCE_YOUR_CALM: u32 = 0xb;

    pub(crate) fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// `:method POST`, `:scheme http`, `:path /mcp`, `:authority` (HPACK,
    /// no Huffman, no indexing).
    pub(crate) fn request_block(authority: &str) -> Vec<u8> {
        let mut b = vec![0x83, 0x86, 0x04, 4];
        b.extend_from_slice(b"/mcp");
        b.push(0x01);
        b.push(authority.len() as u8);
        b.extend_from_slice(authority.as_bytes());
        b
    }

    /// A literal header `x-pad: <n bytes>` (n < 16384).
    pub(crate) fn pad_header(n: usize) -> Vec<u8> {
        let mut b = vec![0x00, 5];
        b.extend_from_slice(b"x-pad");
        // Length with a 7-bit prefix integer.
        let mut v = n;
        b.push(0x7f);
        v -= 127;
        while v >= 128 {
            b.push((v % 128) as u8 | 0x80);
            v /= 128;
        }
        b.push(v as u8);
        b.extend(std::iter::repeat_n(b'a', n));
        b
    }

    pub(crate) async fn read_frame(s: &mut TcpStream) -> Option<(u8, u8, u32, Vec<u8>)> {
        let mut head = [0u8; 9];
        s.read_exact(&mut head).await.ok()?;
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).await.ok()?;
        Some((head[3], head[4], stream, payload))
    }

    /// Preface and SETTINGS; the server's SETTINGS acknowledged.
    pub(crate) async fn open(s: &mut TcpStream) {
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .expect("preface");
        s.write_all(&frame(SETTINGS, 0, 0, &[]))
            .await
            .expect("settings");
        loop {
            let (kind, flags, _, _) = read_frame(s).await.expect("server settings");
            if kind == SETTINGS && flags & ACK == 0 {
                s.write_all(&frame(SETTINGS, ACK, 0, &[]))
                    .await
                    .expect("ack");
                return;
            }
        }
    }
}

#[tokio::test]
async fn an_http2_stream_past_the_limit_is_refused_and_others_flow() {
    use tokio::io::AsyncWriteExt;
    let up = upstream().await;
    let gov = default_gov();
    let limits = Limits {
        max_h2_streams: 2,
        ..Limits::default()
    };
    let addr = proxy_as(up.addr, gov.clone(), limits, 1001).await;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    h2raw::open(&mut s).await;
    // Three requests whose bodies never come: two streams open, the third
    // past the advertised limit.
    let block = h2raw::request_block(&addr.to_string());
    for stream in [1u32, 3, 5] {
        s.write_all(&h2raw::frame(
            h2raw::HEADERS,
            h2raw::END_HEADERS,
            stream,
            &block,
        ))
        .await
        .expect("headers");
    }
    let refused = tokio::time::timeout(HUNG, async {
        while let Some((kind, _, stream, payload)) = h2raw::read_frame(&mut s).await {
            if kind == h2raw::RST_STREAM {
                let code = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                return Some((stream, code));
            }
        }
        None
    })
    .await
    .expect("the stream past the limit was neither served nor refused");
    assert_eq!(refused, Some((5, h2raw::REFUSED_STREAM)));
    // Another connection is served meanwhile.
    let mut c = Client::h2(addr).await;
    let (status, _, _) = c
        .post("/mcp", call(1, "search_docs", json!({})).to_string(), &[])
        .await;
    assert_eq!(status, 200);
    assert_eq!(up.tools_called(), vec!["search_docs".to_string()]);
}

#[tokio::test]
async fn a_continuation_flood_ends_the_connection() {
    use tokio::io::AsyncWriteExt;
    let up = upstream().await;
    let gov = default_gov();
    let addr = proxy_as(up.addr, gov.clone(), Limits::default(), 1001).await;
    let s = TcpStream::connect(addr).await.expect("connect");
    let (mut r, mut w) = s.into_split();
    w.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("preface");
    w.write_all(&h2raw::frame(h2raw::SETTINGS, 0, 0, &[]))
        .await
        .expect("settings");
    let block = h2raw::request_block(&addr.to_string());
    w.write_all(&h2raw::frame(h2raw::HEADERS, 0, 1, &block))
        .await
        .expect("headers");
    // Far more header bytes than any limit, in CONTINUATION frames that
    // never end the block; the writer stops once kya ends the connection.
    let flood = tokio::spawn(async move {
        let pad = h2raw::pad_header(8000);
        for _ in 0..2000 {
            if w.write_all(&h2raw::frame(h2raw::CONTINUATION, 0, 1, &pad))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let ended = tokio::time::timeout(HUNG, async {
        let mut head = [0u8; 9];
        loop {
            use tokio::io::AsyncReadExt;
            if r.read_exact(&mut head).await.is_err() {
                return None;
            }
            let len =
                (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            if r.read_exact(&mut payload).await.is_err() {
                return None;
            }
            if head[3] == h2raw::GOAWAY && payload.len() >= 8 {
                return Some(u32::from_be_bytes([
                    payload[4], payload[5], payload[6], payload[7],
                ]));
            }
        }
    })
    .await
    .expect("the CONTINUATION flood was neither refused nor ended");
    // A GOAWAY (ENHANCE_YOUR_CALM) when it arrives before the reset.
    if let Some(code) = ended {
        assert_eq!(code, h2raw::ENHANCE_YOUR_CALM);
    }
    let _ = flood.await;
    // Nothing reached the server, and another connection is served.
    assert!(up.seen().is_empty());
    let mut c = Client::h2(addr).await;
    let (status, _, _) = c
        .post("/mcp", call(1, "search_docs", json!({})).to_string(), &[])
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn trickled_headers_and_idle_connections_are_closed_and_counted() {
    use tokio::io::AsyncWriteExt;
    let up = upstream().await;
    let limits = Limits {
        body_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let addr = proxy_as(up.addr, default_gov(), limits.clone(), 1001).await;
    let count = || {
        limits
            .refusals
            .slow_headers
            .load(std::sync::atomic::Ordering::Relaxed)
    };

    // Slowloris: a request line and one header, and then nothing.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"POST /mcp HTTP/1.1\r\nHost: a\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let got = tokio::time::timeout(HUNG, s.read_to_end(&mut buf))
        .await
        .expect("a trickling client was kept waiting");
    assert!(
        got.is_err() || !String::from_utf8_lossy(&buf).contains(" 200 "),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    assert_eq!(count(), 1);

    // A kept-alive connection that goes idle after a served call.
    let s = TcpStream::connect(addr).await.expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .expect("handshake");
    let driver = tokio::spawn(conn);
    assert_eq!(call_on(&mut tx, addr, 1).await, 200);
    let _ = tokio::time::timeout(HUNG, driver)
        .await
        .expect("an idle kept-alive connection was kept open");
    assert_eq!(count(), 2);
    assert_eq!(up.tools_called(), vec!["search_docs".to_string()]);
}

/// One `tools/call` on a new HTTP/1.1 connection to `addr`, whose client
/// reads heads of up to `max_buf` bytes: the answer, or the client's error
/// when the connection ended without one. Panics if no end came.
async fn h1_call(
    addr: SocketAddr,
    max_buf: usize,
) -> Result<hyper::Response<hyper::body::Incoming>, hyper::Error> {
    let s = TcpStream::connect(addr).await.expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(max_buf)
        .handshake(TokioIo::new(s))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = call_request(addr, 1);
    tx.ready().await.expect("ready");
    tokio::time::timeout(HUNG, tx.send_request(req))
        .await
        .expect("the agent was kept waiting")
}

/// A server that reads requests and never answers.
async fn silent_server() -> SocketAddr {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let silent_addr = silent.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = silent.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    silent_addr
}

#[tokio::test]
async fn a_server_that_never_answers_over_http2_costs_only_the_stream() {
    let silent_addr = silent_server().await;
    let gov = default_gov();
    let limits = Limits {
        response_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let addr = proxy_as(silent_addr, gov.clone(), limits.clone(), 1001).await;
    let mut c = Client::h2(addr).await;
    for id in 1..=2 {
        let (status, _, body) = tokio::time::timeout(
            HUNG,
            c.post("/mcp", call(id, "search_docs", json!({})).to_string(), &[]),
        )
        .await
        .expect("the agent was kept waiting on a silent server");
        assert_eq!(status, 502, "{}", String::from_utf8_lossy(&body));
        assert!(
            String::from_utf8_lossy(&body).contains("no answer within"),
            "{}",
            String::from_utf8_lossy(&body)
        );
    }
    assert_eq!(
        limits
            .refusals
            .no_answer
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

#[tokio::test]
async fn a_server_that_never_answers_is_given_up_on_record() {
    let silent_addr = silent_server().await;
    let gov = default_gov();
    let limits = Limits {
        response_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let addr = proxy_as(silent_addr, gov.clone(), limits.clone(), 1001).await;
    let answer = h1_call(addr, 400 << 10).await;
    assert!(answer.is_err(), "the connection was not closed: {answer:?}");
    assert_eq!(
        limits
            .refusals
            .no_answer
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let refusals = gov.refusals.lock().unwrap().clone();
    assert!(
        refusals.iter().any(|r| r.contains("no answer within")),
        "{refusals:?}"
    );
}

/// A server whose every answer carries a header field of `pad` bytes. It
/// counts the requests it got (its own record of what it ran).
async fn padded_server(pad: usize, ran: Arc<std::sync::atomic::AtomicUsize>) -> SocketAddr {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let ran = ran.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    match s.read(&mut chunk).await {
                        Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                        _ => return,
                    }
                    // One small request: its head and its JSON body.
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.ends_with(b"}") {
                        break;
                    }
                }
                ran.fetch_add(1, Ordering::SeqCst);
                let body =
                    json!({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}).to_string();
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-pad: {}\r\ncontent-length: {}\r\n\r\n{body}",
                    "p".repeat(pad),
                    body.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
                let _ = s.flush().await;
                // Keep the connection until the proxy closes it.
                let _ = s.read(&mut chunk).await;
            });
        }
    });
    addr
}

/// The server's answer head is bounded as the agent's request head is: past
/// `max_header_bytes` (at every offset of the read that crosses the bound)
/// the agent gets a 502 instead of the answer, the refusal is on record and
/// counted. Just under the bound the answer is relayed.
#[tokio::test]
async fn a_server_answer_head_past_the_limit_is_refused_on_record() {
    let limits = Limits::default();
    let max = limits.max_header_bytes;
    let cases = [
        (max - 1024, true),
        (max + 1, false),
        (max + 2048, false),
        (max + 8192, false),
        (max + 30000, false),
    ];
    let mut refused = 0;
    for (pad, relayed) in cases {
        let ran = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let server = padded_server(pad, ran.clone()).await;
        let gov = default_gov();
        let addr = proxy_as(server, gov.clone(), limits.clone(), 1201).await;
        let resp = h1_call(addr, max * 2).await.expect("an answer");
        let status = resp.status();
        let pad_seen = resp.headers().get("x-pad").map(|v| v.len());
        let answer = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(ran.load(Ordering::SeqCst), 1, "the server ran the call");
        let refusals = gov.refusals.lock().unwrap().clone();
        if relayed {
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
            assert_eq!(pad_seen, Some(pad));
            assert!(refusals.is_empty(), "{refusals:?}");
        } else {
            refused += 1;
            assert_eq!(
                status,
                502,
                "{pad} bytes: {}",
                String::from_utf8_lossy(&answer)
            );
            assert_eq!(pad_seen, None);
            assert!(
                refusals
                    .iter()
                    .any(|r| r.contains(&format!("answer head is over {max} bytes"))),
                "{pad} bytes: {refusals:?}"
            );
        }
        assert_eq!(limits.refusals.response.load(Ordering::Relaxed), refused);
    }
}

/// Header bytes past the limit over TLS, as kya serves an intercepted agent:
/// the read that takes the proxy's buffer past its bound can complete the
/// headers (the buffer's bound alone let those through). Refused with 431
/// and counted at every size past the limit; the upstream sees none.
#[tokio::test]
async fn header_bytes_past_the_limit_over_tls_are_refused() {
    use kya_agent::intercept::http::{serve_http, ConnFacts, HttpVersion};
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use std::sync::atomic::Ordering::Relaxed;
    use tokio::io::AsyncWriteExt;
    let up = upstream().await;
    let limits = Limits::default();
    let leaf = rcgen::generate_simple_self_signed(vec!["mcp.test".to_string()]).expect("leaf");
    let cert = leaf.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_pair.serialize_der()));
    let provider = || Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).expect("root");
    let client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    {
        let (limits, up_addr) = (limits.clone(), up.addr);
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((tcp, _)) = listener.accept().await {
                n += 1;
                let (acceptor, limits) = (acceptor.clone(), limits.clone());
                tokio::spawn(async move {
                    let Ok(agent) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(upstream) = TcpStream::connect(up_addr).await else {
                        return;
                    };
                    let conn = Arc::new(ConnFacts {
                        process: kya_common::ProcessIdentity {
                            pid: 1101,
                            ..Default::default()
                        },
                        dst: up_addr,
                        sni: Some("mcp.test".into()),
                        tls: true,
                        conn_id: n,
                        tunnel: None,
                    });
                    let gov: Arc<dyn kya_agent::intercept::http::Governor> =
                        Arc::new(GovHandle(default_gov()));
                    let _ = serve_http(
                        agent,
                        upstream,
                        HttpVersion::H1,
                        conn,
                        gov,
                        &limits,
                        Arc::new(kya_agent::intercept::names::NameResolver::with_table(
                            Default::default(),
                        )),
                        Some(reconnect_to(up_addr)),
                    )
                    .await;
                });
            }
        });
    }
    let sizes = [1usize, 2048, 4096, 8192, 12000, 16384, 30000];
    for (i, extra) in sizes.into_iter().enumerate() {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = ServerName::try_from("mcp.test").expect("name");
        let mut tls = connector.connect(name, tcp).await.expect("handshake");
        let big = "v".repeat(limits.max_header_bytes + extra);
        let body = call(1, "search_docs", json!({})).to_string();
        let req = format!(
            "POST /mcp HTTP/1.1\r\nHost: mcp.test\r\nContent-Type: application/json\r\nx-big: {big}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let _ = tls.write_all(req.as_bytes()).await;
        let _ = tls.flush().await;
        // The answer's head (a 431 closes the connection; an answered call
        // would keep it open).
        let mut buf = Vec::new();
        let head = async {
            let mut chunk = [0u8; 4096];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match tls.read(&mut chunk).await {
                    Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                    _ => break,
                }
            }
        };
        tokio::time::timeout(HUNG, head).await.expect("hung");
        assert!(
            String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 431"),
            "{extra} bytes past the limit: {}",
            String::from_utf8_lossy(&buf[..buf.len().min(300)])
        );
        assert_eq!(limits.refusals.headers.load(Relaxed), i as u64 + 1);
    }
    assert!(
        up.seen().is_empty(),
        "the upstream saw {} requests",
        up.seen().len()
    );
}

#[tokio::test]
async fn oversize_headers_and_bodies_are_refused_and_counted() {
    use std::sync::atomic::Ordering::Relaxed;
    use tokio::io::AsyncWriteExt;
    let up = upstream().await;
    let gov = default_gov();
    let limits = Limits {
        max_body: 1024,
        ..Limits::default()
    };
    let addr = proxy_as(up.addr, gov.clone(), limits.clone(), 1001).await;

    // HTTP/1.1: more header fields than allowed.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut req = String::from("POST /mcp HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n");
    for i in 0..(limits.max_headers + 1) {
        req.push_str(&format!("x-h{i}: v\r\n"));
    }
    req.push_str("\r\n{}");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(HUNG, s.read_to_end(&mut buf))
        .await
        .expect("hung");
    assert!(
        String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    assert_eq!(limits.refusals.headers.load(Relaxed), 1);

    // HTTP/1.1: more header bytes than allowed.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let big = "v".repeat(limits.max_header_bytes + 1);
    s.write_all(format!("POST /mcp HTTP/1.1\r\nHost: a\r\nx-big: {big}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(HUNG, s.read_to_end(&mut buf))
        .await
        .expect("hung");
    assert!(
        String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    assert_eq!(limits.refusals.headers.load(Relaxed), 2);

    // HTTP/2: more header fields than allowed, on record.
    let mut c = Client::h2(addr).await;
    let many: Vec<(String, String)> = (0..(limits.max_headers + 1))
        .map(|i| (format!("x-h{i}"), "v".to_string()))
        .collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (status, _, _) = c
        .post("/mcp", call(1, "search_docs", json!({})).to_string(), &many)
        .await;
    assert_eq!(status, 431);
    assert_eq!(limits.refusals.headers.load(Relaxed), 3);

    // A body over the limit, on record.
    let mut c = Client::h1(addr).await;
    let (status, _, _) = c
        .post(
            "/mcp",
            call(2, "search_docs", json!({"q": "x".repeat(2048)})).to_string(),
            &[],
        )
        .await;
    assert_eq!(status, 413);
    assert_eq!(limits.refusals.body.load(Relaxed), 1);
    let refusals = gov.refusals.lock().unwrap().clone();
    assert!(
        refusals
            .iter()
            .any(|r| r.contains("too many header fields")),
        "{refusals:?}"
    );
    assert!(
        refusals.iter().any(|r| r.contains("request body over")),
        "{refusals:?}"
    );

    // None of it reached the server; a call within the limits does.
    assert!(up.tools_called().is_empty());
    let (status, _, _) = c
        .post("/mcp", call(3, "search_docs", json!({})).to_string(), &[])
        .await;
    assert_eq!(status, 200);
    assert_eq!(up.tools_called(), vec!["search_docs".to_string()]);
}
