//! Load harness for held calls, through kya's real decision path (policy,
//! pending approvals persisted in a state dir on disk, the audit log with its
//! durable hold/approval records, the single-use action credential minted,
//! verified and spent on every approval) and the HTTP proxy, on loopback:
//!
//! 1. **approval → upstream**: one held `tools/call` at a time; the time from
//!    the owner's answer arriving (`Approvals::answer`, what the control socket
//!    calls) to the upstream receiving the request. `KYA_BENCH_RELEASES` (300).
//! 2. **hold capacity**: `KYA_BENCH_HOLDS` (1000, the default bound) calls held
//!    at once, each on its own connection; resident memory before and after,
//!    per held call; then all approved at once and drained.
//!
//! Run: `cargo bench -p kya-agent --bench hold_release`. Not a criterion
//! bench: what matters is the distribution and the memory, printed at the end.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use kya_agent::approvals::persist::Persist;
use kya_agent::approvals::{Answer, Approvals};
use kya_agent::audit::writer::{AuditConfig, AuditLog};
use kya_agent::credential::store::CredentialStore;
use kya_agent::decision::events::EventHub;
use kya_agent::decision::DecisionPath;
use kya_agent::intercept::http::{serve_http, ConnFacts, Governor, HttpVersion, Limits};
use kya_agent::metrics::Metrics;
use kya_agent::policy::PolicyEngine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const POLICY: &str = r#"
[defaults]
verdict = "deny"
methods = "allow"
hold_timeout = "300s"

[[rule]]
id = "big-transfer"
tool = "transfer"
verdict = "hold"
"#;

const AGENTS: &str = r#"
[[agent]]
name = "bench-bot"
owner = "nobody"
match = { uid = 4242 }
"#;

const RESULT: &str =
    r#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"ok"}]}}"#;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// An upstream that reports the instant each request's head arrives.
async fn upstream(arrived: mpsc::UnboundedSender<Instant>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let arrived = arrived.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let _ = arrived.send(Instant::now());
                    async move {
                        let _ = req.into_body().collect().await;
                        Ok::<_, std::convert::Infallible>(
                            Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from_static(RESULT.as_bytes())))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// kya's proxy with the real decision path in front of `up`.
async fn proxy(up: SocketAddr, gov: Arc<dyn Governor>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut n = 0;
        loop {
            let Ok((agent, _)) = l.accept().await else {
                continue;
            };
            n += 1;
            let gov = gov.clone();
            tokio::spawn(async move {
                let Ok(upstream) = TcpStream::connect(up).await else {
                    return;
                };
                let conn = Arc::new(ConnFacts {
                    process: kya_common::ProcessIdentity {
                        pid: 1,
                        uid: 4242,
                        ..Default::default()
                    },
                    dst: up,
                    sni: None,
                    tls: false,
                    conn_id: n,
                    tunnel: None,
                });
                let limits = Limits {
                    progress_interval: Duration::from_secs(3600),
                    ..Limits::default()
                };
                let _ = serve_http(
                    agent,
                    upstream,
                    HttpVersion::H1,
                    conn,
                    gov,
                    &limits,
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

/// One held call on its own connection, as raw bytes (the agent side costs
/// the harness as little memory as possible). Returns when answered.
async fn held_call(addr: SocketAddr, i: usize) {
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":{i},"method":"tools/call","params":{{"name":"transfer","arguments":{{"amount":{i},"to":"bob"}}}}}}"#
    );
    let req = format!(
        "POST /mcp HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return;
    };
    if s.write_all(req.as_bytes()).await.is_err() {
        return;
    }
    let mut buf = [0u8; 512];
    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn approve() -> Answer {
    Answer {
        approve: true,
        approver: "nobody".into(),
        channel: "local".into(),
        reason: None,
        evidence: None,
    }
}

fn pct(v: &mut [Duration], p: usize) -> Duration {
    v.sort();
    v[(v.len() * p / 100).min(v.len() - 1)]
}

async fn wait_pending(approvals: &Approvals, n: usize) {
    while approvals.len() < n {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// The capacity run's upstream lives in a child process (this binary again,
/// with `KYA_BENCH_UPSTREAM=1`), so its memory is not counted as kya's.
fn upstream_child() -> (std::process::Child, SocketAddr) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .env("KYA_BENCH_UPSTREAM", "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line.trim().parse().unwrap())
}

fn main() {
    if std::env::var_os("KYA_BENCH_UPSTREAM").is_some() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let addr = upstream(tx).await;
            println!("{addr}");
            while rx.recv().await.is_some() {}
        });
        return;
    }
    let (mut child, child_up) = upstream_child();
    let releases = env_usize("KYA_BENCH_RELEASES", 300);
    let holds = env_usize("KYA_BENCH_HOLDS", 1000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // On disk (target/tmp), not tmpfs: fsync costs what it costs in production.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    std::fs::write(dir.path().join("policy.toml"), POLICY).unwrap();
    std::fs::write(dir.path().join("agents.toml"), AGENTS).unwrap();
    rt.block_on(async {
        let engine = Arc::new(
            PolicyEngine::new(
                vec![dir.path().join("policy.toml")],
                Some(dir.path().join("agents.toml")),
                Some(dir.path()),
            )
            .unwrap(),
        );
        let approvals = Approvals::new(holds.max(1), Some(Persist::new(dir.path())));
        let key = Arc::new(kya_agent::keys::load_or_create(dir.path()).unwrap());
        let audit = Arc::new(
            AuditLog::open(AuditConfig::new(dir.path().join("audit.jsonl")), (*key).clone())
                .unwrap(),
        );
        let credentials = Arc::new(CredentialStore::open(dir.path()).unwrap());
        let suspensions = Arc::new(kya_agent::agents::Suspensions::open(dir.path()).unwrap());
        let gov: Arc<dyn Governor> = Arc::new(DecisionPath::new(
            engine,
            approvals.clone(),
            credentials,
            key,
            audit,
            EventHub::new(),
            Metrics::new(),
            suspensions,
        ));
        let (tx, mut arrived) = mpsc::unbounded_channel();
        let up = upstream(tx).await;
        let px = proxy(up, gov.clone()).await;

        // 1. approval → upstream, one held call at a time.
        let mut lat = Vec::with_capacity(releases);
        for i in 0..releases + 20 {
            let call = tokio::spawn(held_call(px, i));
            wait_pending(&approvals, 1).await;
            let (id, _) = approvals.pending().pop().unwrap();
            let t0 = Instant::now();
            approvals.answer(&id, approve()).unwrap();
            let t1 = arrived.recv().await.unwrap();
            call.await.unwrap();
            while !approvals.is_empty() {
                tokio::task::yield_now().await;
            }
            if i >= 20 {
                lat.push(t1.saturating_duration_since(t0));
            }
        }
        let (p50, p99, max) = (pct(&mut lat, 50), pct(&mut lat, 99), pct(&mut lat, 100));
        eprintln!(
            "approval -> upstream, {releases} held calls one at a time: p50 {p50:?} p99 {p99:?} max {max:?}"
        );

        // 2. capacity: `holds` calls held at once, the upstream out of process.
        let px = proxy(child_up, gov).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let before = rss_kib();
        let t = Instant::now();
        let calls: Vec<_> = (0..holds).map(|i| tokio::spawn(held_call(px, i))).collect();
        wait_pending(&approvals, holds).await;
        let entered = t.elapsed();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let after = rss_kib();
        let per = (after.saturating_sub(before) * 1024) / holds.max(1) as u64;
        eprintln!(
            "{holds} calls held at once: all pending after {entered:?} ({:.0} holds/s); RSS {before} KiB -> {after} KiB, {per} bytes per held call (kya's side: both connections, proxy, decision path, approval; plus the harness's agent-side socket task)",
            holds as f64 / entered.as_secs_f64()
        );
        let t = Instant::now();
        for (id, _) in approvals.pending() {
            let _ = approvals.answer(&id, approve());
        }
        for c in calls {
            c.await.unwrap();
        }
        let drained = t.elapsed();
        eprintln!(
            "all {holds} approved at once: forwarded after {drained:?} ({:.0} releases/s)",
            holds as f64 / drained.as_secs_f64()
        );
    });
    let _ = child.kill();
    let _ = child.wait();
}
