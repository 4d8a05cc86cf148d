//! Added latency of one `tools/call` on a kept-alive HTTP/1.1 connection: the
//! same hyper client calling a hyper upstream directly, and through kya's proxy
//! (`serve_http` with an allow-everything governor) on loopback.
//!
//! Criterion reports the mean of each; before that, 2000 sequential calls each way
//! are timed individually and the median and p99 are printed, since a proxy's tail
//! matters as much as its average.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use kya_agent::intercept::http::{
    serve_http, BoxFuture, CallFacts, ConnFacts, Governor, HttpVersion, Limits, Ruling,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

const CALL: &str = r#"{"jsonrpc":"2.0","id":17,"method":"tools/call","params":{"name":"transfer","arguments":{"amount":5000,"to":"bob","memo":"invoice"}}}"#;
const RESULT: &str = r#"{"jsonrpc":"2.0","id":17,"result":{"content":[{"type":"text","text":"transferred 5000 to bob"}]}}"#;

struct AllowAll;
impl Governor for AllowAll {
    fn decide(&self, _call: CallFacts) -> BoxFuture<'static, Ruling> {
        Box::pin(async {
            Ruling::Allow {
                decision_id: "d".into(),
                grant: None,
            }
        })
    }
    fn may_call(&self, _: &ConnFacts, _: &str, _: &str) -> bool {
        true
    }
    fn refused(&self, _: &ConnFacts, _: &str) {}
}

async fn upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let _ = req.into_body().collect().await;
                        Ok::<_, std::convert::Infallible>(
                            Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from_static(RESULT.as_bytes())))
                                .unwrap(),
                        )
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

async fn proxy(up: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut n = 0;
        loop {
            let (agent, _) = l.accept().await.unwrap();
            n += 1;
            let upstream = TcpStream::connect(up).await.unwrap();
            let conn = Arc::new(ConnFacts {
                process: Default::default(),
                dst: up,
                sni: None,
                tls: false,
                conn_id: n,
                tunnel: None,
            });
            tokio::spawn(async move {
                let gov: Arc<dyn Governor> = Arc::new(AllowAll);
                let _ = serve_http(
                    agent,
                    upstream,
                    HttpVersion::H1,
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

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn client(addr: SocketAddr) -> Sender {
    let s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    tx
}

async fn one_call(tx: &mut Sender) {
    tx.ready().await.unwrap();
    let req = Request::post("/mcp")
        .header("host", "127.0.0.1")
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(Full::new(Bytes::from_static(CALL.as_bytes())))
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(!body.is_empty());
}

fn percentiles(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[(v.len() * 99) / 100])
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let _ = TokioExecutor::new();
    let (up, px) = rt.block_on(async {
        let up = upstream().await;
        (up, proxy(up).await)
    });
    let mut direct = rt.block_on(client(up));
    let mut via = rt.block_on(client(px));
    report(&rt, &mut direct, &mut via);

    let mut g = c.benchmark_group("tools_call_keepalive");
    g.bench_function("direct", |b| b.iter(|| rt.block_on(one_call(&mut direct))));
    g.bench_function("through_kya", |b| {
        b.iter(|| rt.block_on(one_call(&mut via)))
    });
    g.finish();
}

fn report(rt: &Runtime, direct: &mut Sender, via: &mut Sender) {
    const N: usize = 2000;
    let mut d = Vec::with_capacity(N);
    let mut k = Vec::with_capacity(N);
    rt.block_on(async {
        for _ in 0..200 {
            one_call(direct).await;
            one_call(via).await;
        }
        for _ in 0..N {
            let t = Instant::now();
            one_call(direct).await;
            d.push(t.elapsed());
            let t = Instant::now();
            one_call(via).await;
            k.push(t.elapsed());
        }
    });
    let (d50, d99) = percentiles(d);
    let (k50, k99) = percentiles(k);
    eprintln!(
        "tools/call kept-alive, {N} calls: direct p50 {d50:?} p99 {d99:?}; through kya p50 {k50:?} p99 {k99:?}; added p50 {:?} p99 {:?}",
        k50.saturating_sub(d50),
        k99.saturating_sub(d99)
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
