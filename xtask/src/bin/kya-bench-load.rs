//! The end-to-end benchmark's load client (hyper + rustls, HTTP/1.1): MCP
//! `tools/call`s or a bulk download against one address, for a duration or a
//! count, over kept-alive connections or a new TLS connection per call, with
//! an HDR histogram of per-request latency. Prints one JSON line.
//!
//! It connects to `--addr` itself and presents `--sni` (or, with
//! `--fresh-sni`, a name never used before per connection, `nN.SUFFIX`), so no
//! resolver is involved; it trusts only `--ca`. TLS session resumption is off:
//! every new connection is a full handshake.
//!
//! `--mode flood` is the load harness of kya's limits: it opens
//! `--connections` connections (`--concurrency` handshakes at a time), makes
//! one call on each, keeps every one that was served open with a call every
//! `--keepalive-ms` until `--duration-ms` has passed, and reports how many
//! were served, refused (reset, or closed before an answer) and dropped later.
//! Run it from one process while another runs `--mode calls`: the flood meets
//! kya's per-process and total connection limits, the other's calls flow.
//!
//! `--mode slowloris` opens `--connections` TLS connections and sends a
//! request's headers on each a byte every `--byte-interval-ms`, never ending
//! them, until the other side closes the connection or `--duration-ms` has
//! passed; it reports how many were closed and when. `--pad-headers`,
//! `--pad-header-bytes` and `--pad-body` make every call oversized (header
//! fields, one header's bytes, the body), and `--expect-status` makes the
//! HTTP status the answer must have the only check (a refusal before any
//! JSON-RPC answer); `--expect-closed` wants no answer at all, the
//! connection closed by the other side.

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use rustls::pki_types::ServerName;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// `tools/call` of `--tool`; the answer must match `--expect`.
    Calls,
    /// `GET /bulk?bytes=--bytes`; the body must be that long.
    Bulk,
    /// `--connections` connections, each with one `tools/call` of `--tool`
    /// (answered, or with `--no-answer` only sent: a held call), all kept
    /// open until stdin closes. Prints one JSON line once all are in place.
    Open,
    /// `--connections` connections held open, each with calls of `--tool`.
    Flood,
    /// `--connections` connections, each sending request headers a byte at a
    /// time and never finishing them.
    Slowloris,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Expect {
    /// A result with `isError: false` (containing `--text` if given).
    Allow,
    /// kya's refusal: an error result or a JSON-RPC error.
    Deny,
}

#[derive(Parser)]
struct Args {
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long, default_value = "mcp.test")]
    sni: String,
    /// A new name per connection: `n<counter>.<this suffix>`, starting at `--fresh-start`.
    #[arg(long)]
    fresh_sni: Option<String>,
    #[arg(long, default_value_t = 0)]
    fresh_start: u64,
    /// The only CA trusted (PEM).
    #[arg(long)]
    ca: PathBuf,
    #[arg(long, value_enum, default_value = "calls")]
    mode: Mode,
    #[arg(long, default_value = "bench_echo")]
    tool: String,
    #[arg(long, default_value = "{}")]
    arguments: String,
    #[arg(long, value_enum, default_value = "allow")]
    expect: Expect,
    /// Text an allowed result must contain.
    #[arg(long)]
    text: Option<String>,
    /// Bytes per bulk download.
    #[arg(long, default_value_t = 1 << 20)]
    bytes: u64,
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Run for this long (milliseconds)...
    #[arg(long, default_value_t = 1000)]
    duration_ms: u64,
    /// ...or stop after this many requests in all.
    #[arg(long)]
    count: Option<u64>,
    /// A new TCP + TLS connection per request.
    #[arg(long)]
    new_conn: bool,
    /// Open each worker's connection before timing starts, so the first
    /// request's figure is the call alone, without the handshake.
    #[arg(long)]
    connect_first: bool,
    /// Longest wait for one request (a held call waits for its approval).
    #[arg(long, default_value_t = 60)]
    timeout_s: u64,
    /// `--mode open` and `--mode flood`: connections to open and hold.
    #[arg(long, default_value_t = 10_000)]
    connections: u64,
    /// `--mode open` and `--mode flood`: a call on each held connection this
    /// often (below kya's 30 s header-read timeout, which closes idle
    /// connections).
    #[arg(long, default_value_t = 10_000)]
    keepalive_ms: u64,
    /// `--mode open`: send each call without waiting for its answer (a held
    /// call: its connection is busy, not idle, and needs no keep-alive).
    #[arg(long)]
    no_answer: bool,
    /// `--mode slowloris`: one byte of headers per connection this often.
    #[arg(long, default_value_t = 1000)]
    byte_interval_ms: u64,
    /// Add this many header fields (`x-pad-N: v`) to every call.
    #[arg(long, default_value_t = 0)]
    pad_headers: usize,
    /// Add one header field (`x-pad`) of this many bytes to every call.
    #[arg(long, default_value_t = 0)]
    pad_header_bytes: usize,
    /// Add an argument (`pad`) of this many bytes to every call's body.
    #[arg(long, default_value_t = 0)]
    pad_body: usize,
    /// The HTTP status every answer must have; the body is not checked
    /// (a refusal before any JSON-RPC answer, e.g. 413 or 431).
    #[arg(long)]
    expect_status: Option<u16>,
    /// Every call must end with the connection closed by the other side and
    /// no answer (kya giving up on a server that never answers).
    #[arg(long)]
    expect_closed: bool,
}

struct Shared {
    args: Args,
    connector: TlsConnector,
    deadline: Instant,
    issued: AtomicU64,
    fresh: AtomicU64,
}

impl Shared {
    /// What every worker of a run shares; the run ends `--duration-ms` from
    /// now unless `lasting` says otherwise.
    fn new(args: Args, connector: TlsConnector, lasting: Option<Duration>) -> Arc<Self> {
        let lasting = lasting.unwrap_or(Duration::from_millis(args.duration_ms));
        Arc::new(Self {
            fresh: AtomicU64::new(args.fresh_start),
            deadline: Instant::now() + lasting,
            args,
            connector,
            issued: AtomicU64::new(0),
        })
    }
}

#[derive(Default)]
struct TaskResult {
    ok: u64,
    failed: u64,
    bytes: u64,
    first_error: Option<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let out = rt.block_on(run(args))?;
    // In `open` mode the harness reads only the first report and may have
    // closed its end of the pipe by now: the closing report is best effort.
    use std::io::Write as _;
    let mut stdout = std::io::stdout();
    if let Err(e) = writeln!(stdout, "{out}").and_then(|()| stdout.flush()) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e).context("stdout");
        }
    }
    Ok(())
}

fn connector(ca: &PathBuf) -> Result<TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    let file = std::fs::File::open(ca).with_context(|| format!("open {}", ca.display()))?;
    for cert in rustls_pemfile::certs(&mut std::io::BufReader::new(file)) {
        roots
            .add(cert.context("CA PEM")?)
            .context("CA certificate")?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(
        rustls::crypto::ring::default_provider().into(),
    )
    .with_safe_default_protocol_versions()
    .context("TLS versions")?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(TlsConnector::from(Arc::new(cfg)))
}

async fn run(args: Args) -> Result<Value> {
    if args.mode == Mode::Open {
        return open_and_hold(args).await;
    }
    if args.mode == Mode::Slowloris {
        return slowloris(args).await;
    }
    let connector = connector(&args.ca)?;
    if args.mode == Mode::Flood {
        let shared = Shared::new(args, connector, None);
        return flood(shared).await;
    }
    let concurrency = args.concurrency.max(1);
    let shared = Shared::new(args, connector, None);
    let started = Instant::now();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).context("histogram")?;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        tasks.push(tokio::spawn(worker(shared.clone(), hist.clone())));
    }
    let mut total = TaskResult::default();
    for t in tasks {
        let (h, r) = t.await.context("worker")?;
        hist.add(&h).context("merge histograms")?;
        total.ok += r.ok;
        total.failed += r.failed;
        total.bytes += r.bytes;
        if total.first_error.is_none() {
            total.first_error = r.first_error;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let q = |q: f64| hist.value_at_quantile(q);
    // The CDF: quantiles spaced evenly in log(1 - q), up to 0.9999.
    let cdf: Vec<Value> = (0..=80)
        .map(|i| {
            let quantile = 1.0 - 10f64.powf(-(i as f64) / 20.0);
            json!([q(quantile), quantile])
        })
        .collect();
    Ok(json!({
        "ok": total.ok,
        "failed": total.failed,
        "first_error": total.first_error,
        "elapsed_s": elapsed,
        "rps": total.ok as f64 / elapsed,
        "bytes": total.bytes,
        "bytes_per_s": total.bytes as f64 / elapsed,
        "p50_us": q(0.5),
        "p99_us": q(0.99),
        "p999_us": q(0.999),
        "max_us": hist.max(),
        "cdf_us": cdf,
    }))
}

/// `--mode open`: open the connections (a few at a time, as a client pool
/// would), one call on each, report, then keep them until stdin closes.
async fn open_and_hold(args: Args) -> Result<Value> {
    use std::io::Write;
    let connector = connector(&args.ca)?;
    let n = args.connections;
    let no_answer = args.no_answer;
    let shared = Shared::new(args, connector, Some(Duration::from_secs(3600)));
    let started = Instant::now();
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (shared, gate) = (shared.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await;
            let mut conn = Some(connect(&shared).await?);
            if no_answer {
                // Sent now; the answer (after an approval) is never awaited.
                let Some((sender, host)) = conn.as_mut() else {
                    bail!("no connection");
                };
                sender.ready().await.context("connection not ready")?;
                let req = call_request(&shared, host)?;
                let pending = sender.send_request(req);
                drop(permit);
                return Ok((conn, Some(pending)));
            }
            one_request(&shared, &mut conn).await?;
            drop(permit);
            Ok((conn, None))
        }));
    }
    let mut kept = Vec::new();
    let (mut ok, mut failed, mut first_error) = (0u64, 0u64, None);
    for t in tasks {
        match t.await.context("open task")? {
            Ok(c) => {
                ok += 1;
                kept.push(c);
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    let report = json!({
        "open": ok,
        "failed": failed,
        "first_error": first_error,
        "elapsed_s": started.elapsed().as_secs_f64(),
    });
    println!("{report}");
    std::io::stdout().flush().context("stdout")?;
    // Answered connections stay busy enough that kya does not close them
    // as idle; until the harness closes stdin.
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut alive = tokio::task::JoinSet::new();
    for (conn, pending) in kept {
        if let Some(pending) = pending {
            // A held call: its answer is not awaited, its connection kept.
            let mut stop = stop.clone();
            alive.spawn(async move {
                let _kept = (conn, pending);
                let _ = stop.changed().await;
                true
            });
            continue;
        }
        let (shared, mut stop) = (shared.clone(), stop.clone());
        alive.spawn(async move {
            let mut conn = conn;
            let every = Duration::from_millis(shared.args.keepalive_ms.max(1));
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.changed() => return true,
                }
                if one_request(&shared, &mut conn).await.is_err() {
                    return false;
                }
            }
        });
    }
    tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {
            sink.clear();
        }
    })
    .await
    .context("stdin")?;
    let _ = stop_tx.send(true);
    drop(stop);
    let mut dropped = 0u64;
    while let Some(done) = tokio::time::timeout(Duration::from_secs(5), alive.join_next())
        .await
        .ok()
        .flatten()
    {
        if matches!(done, Ok(false)) {
            dropped += 1;
        }
    }
    alive.abort_all();
    Ok(json!({"closed": ok, "dropped_meanwhile": dropped}))
}

/// How one flood connection fared.
enum Held {
    /// Its first call was not answered: refused (or failed).
    Refused(String),
    /// Served, then closed by the other side after this many calls.
    Dropped(u64),
    /// Served, and open until the end, with this many calls.
    Kept(u64),
}

async fn flood(shared: Arc<Shared>) -> Result<Value> {
    let a = &shared.args;
    let gate = Arc::new(tokio::sync::Semaphore::new(a.concurrency.max(1)));
    let open = Arc::new(AtomicU64::new(0));
    let max_open = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..a.connections {
        if Instant::now() >= shared.deadline {
            break;
        }
        let permit = gate.clone().acquire_owned().await.context("gate")?;
        let (shared, open, max_open) = (shared.clone(), open.clone(), max_open.clone());
        tasks.spawn(async move {
            let a = &shared.args;
            let wait = Duration::from_secs(a.timeout_s);
            let mut conn = None;
            let first = tokio::time::timeout(wait, one_request(&shared, &mut conn))
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {} s", a.timeout_s)));
            drop(permit);
            if let Err(e) = first {
                return Held::Refused(format!("{e:#}"));
            }
            let now_open = open.fetch_add(1, Ordering::Relaxed) + 1;
            max_open.fetch_max(now_open, Ordering::Relaxed);
            let keepalive = Duration::from_millis(a.keepalive_ms.max(1));
            let mut calls = 1;
            let outcome = loop {
                if Instant::now() + keepalive >= shared.deadline {
                    tokio::time::sleep_until(shared.deadline.into()).await;
                    break Held::Kept(calls);
                }
                tokio::time::sleep(keepalive).await;
                if conn.as_ref().is_none_or(|c: &Sender| c.0.is_closed()) {
                    break Held::Dropped(calls);
                }
                match tokio::time::timeout(wait, one_request(&shared, &mut conn)).await {
                    Ok(Ok(_)) => calls += 1,
                    _ => break Held::Dropped(calls),
                }
            };
            open.fetch_sub(1, Ordering::Relaxed);
            outcome
        });
    }
    let (mut refused, mut dropped, mut kept, mut calls) = (0u64, 0u64, 0u64, 0u64);
    let mut first_refusal = None;
    while let Some(done) = tasks.join_next().await {
        match done.context("flood connection")? {
            Held::Refused(e) => {
                refused += 1;
                first_refusal.get_or_insert(e);
            }
            Held::Dropped(n) => {
                dropped += 1;
                calls += n;
            }
            Held::Kept(n) => {
                kept += 1;
                calls += n;
            }
        }
    }
    Ok(json!({
        "mode": "flood",
        "connections": a.connections,
        "served": dropped + kept,
        "refused": refused,
        "first_refusal": first_refusal,
        "dropped_later": dropped,
        "kept_to_end": kept,
        "max_open": max_open.load(Ordering::Relaxed),
        "calls_answered": calls,
        "elapsed_s": started.elapsed().as_secs_f64(),
    }))
}

/// A connection and the name it presented (its requests' `Host`).
type Sender = (hyper::client::conn::http1::SendRequest<Full<Bytes>>, String);

async fn worker(shared: Arc<Shared>, mut hist: Histogram<u64>) -> (Histogram<u64>, TaskResult) {
    let mut result = TaskResult::default();
    let mut conn: Option<Sender> = None;
    let a = &shared.args;
    if a.connect_first {
        match connect(&shared).await {
            Ok(c) => conn = Some(c),
            Err(e) => {
                result.failed += 1;
                result.first_error = Some(format!("{e:#}"));
                return (hist, result);
            }
        }
    }
    loop {
        match a.count {
            Some(n) => {
                if shared.issued.fetch_add(1, Ordering::Relaxed) >= n {
                    break;
                }
            }
            None => {
                if Instant::now() >= shared.deadline {
                    break;
                }
            }
        }
        let started = Instant::now();
        let outcome = tokio::time::timeout(
            Duration::from_secs(a.timeout_s),
            one_request(&shared, &mut conn),
        )
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {} s", a.timeout_s)));
        match outcome {
            Ok(bytes) => {
                let us = started.elapsed().as_micros().max(1) as u64;
                let _ = hist.record(us.min(120_000_000));
                result.ok += 1;
                result.bytes += bytes;
            }
            Err(e) => {
                conn = None;
                result.failed += 1;
                if result.first_error.is_none() {
                    result.first_error = Some(format!("{e:#}"));
                }
            }
        }
        if a.new_conn {
            conn = None;
        }
    }
    (hist, result)
}

async fn connect(shared: &Shared) -> Result<Sender> {
    let a = &shared.args;
    let name = match &a.fresh_sni {
        Some(suffix) => format!("n{}.{suffix}", shared.fresh.fetch_add(1, Ordering::Relaxed)),
        None => a.sni.clone(),
    };
    let tcp = TcpStream::connect(a.addr)
        .await
        .with_context(|| format!("connect {}", a.addr))?;
    tcp.set_nodelay(true).context("nodelay")?;
    let server_name = ServerName::try_from(name.clone()).context("server name")?;
    let tls = shared
        .connector
        .connect(server_name, tcp)
        .await
        .with_context(|| format!("TLS handshake as {name}"))?;
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .context("HTTP/1.1 handshake")?;
    tokio::spawn(connection);
    Ok((sender, name))
}

/// One request on `conn` (opened if needed); returns the body's length.
async fn one_request(shared: &Shared, conn: &mut Option<Sender>) -> Result<u64> {
    let a = &shared.args;
    if conn.as_ref().is_none_or(|c| c.0.is_closed()) {
        *conn = Some(connect(shared).await?);
    }
    let Some((sender, host)) = conn.as_mut() else {
        bail!("no connection");
    };
    sender.ready().await.context("connection not ready")?;
    let host = host.as_str();
    let req = match a.mode {
        Mode::Calls | Mode::Open | Mode::Flood | Mode::Slowloris => call_request(shared, host)?,
        Mode::Bulk => hyper::Request::get(format!("/bulk?bytes={}", a.bytes))
            .header("host", host)
            .body(Full::new(Bytes::new()))
            .context("request")?,
    };
    let resp = match sender.send_request(req).await {
        // The connection ended under the request (cleanly or, over TLS,
        // without close_notify): nothing was answered.
        Err(e) if a.expect_closed && !e.is_user() => return Ok(0),
        Err(e) => return Err(e).context("send"),
        Ok(r) if a.expect_closed => bail!("expected no answer, got {}", r.status()),
        Ok(r) => r,
    };
    let status = resp.status();
    let mut body = resp.into_body();
    let mut len = 0u64;
    let mut kept = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.context("body")?;
        if let Some(d) = frame.data_ref() {
            len += d.len() as u64;
            if a.mode != Mode::Bulk {
                kept.extend_from_slice(d);
            }
        }
    }
    if let Some(want) = a.expect_status {
        if status.as_u16() != want {
            bail!("expected status {want}, got {status}");
        }
        return Ok(len);
    }
    match a.mode {
        Mode::Bulk => {
            if !status.is_success() || len != a.bytes {
                bail!("bulk: status {status}, {len} of {} bytes", a.bytes);
            }
        }
        Mode::Calls | Mode::Open | Mode::Flood | Mode::Slowloris => check_answer(a, status, &kept)?,
    }
    Ok(len)
}

/// A `tools/call` of `--tool` with `--arguments` for `host`.
fn call_request(shared: &Shared, host: &str) -> Result<hyper::Request<Full<Bytes>>> {
    let a = &shared.args;
    let mut arguments: Value = serde_json::from_str(&a.arguments).context("--arguments")?;
    if a.pad_body > 0 {
        if let Some(args) = arguments.as_object_mut() {
            args.insert("pad".into(), Value::String("p".repeat(a.pad_body)));
        }
    }
    let body = json!({
        "jsonrpc": "2.0",
        "id": shared.issued.load(Ordering::Relaxed),
        "method": "tools/call",
        "params": {"name": a.tool, "arguments": arguments},
    });
    let mut req = hyper::Request::post("/mcp")
        .header("host", host)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream");
    for i in 0..a.pad_headers {
        req = req.header(format!("x-pad-{i}"), "v");
    }
    if a.pad_header_bytes > 0 {
        req = req.header("x-pad", "p".repeat(a.pad_header_bytes));
    }
    req.body(Full::new(Bytes::from(body.to_string())))
        .context("request")
}

/// How one slowloris connection ended.
enum Slow {
    /// The TCP or TLS connection was not established.
    NotOpened(String),
    /// The other side closed it after this long, before any answer.
    Closed(Duration),
    /// The other side answered (sent bytes) before closing.
    Answered,
    /// Still open when the run ended.
    Open,
}

/// `--mode slowloris`: request headers a byte at a time on every connection.
async fn slowloris(args: Args) -> Result<Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let connector = connector(&args.ca)?;
    let shared = Shared::new(args, connector, None);
    let gate = Arc::new(tokio::sync::Semaphore::new(shared.args.concurrency.max(1)));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..shared.args.connections {
        let (shared, gate) = (shared.clone(), gate.clone());
        tasks.spawn(async move {
            let a = &shared.args;
            let permit = gate.acquire_owned().await;
            let opened = async {
                let tcp = TcpStream::connect(a.addr).await.context("connect")?;
                tcp.set_nodelay(true).context("nodelay")?;
                let name = ServerName::try_from(a.sni.clone()).context("server name")?;
                shared
                    .connector
                    .connect(name, tcp)
                    .await
                    .context("TLS handshake")
            }
            .await;
            drop(permit);
            let tls = match opened {
                Ok(t) => t,
                Err(e) => return Slow::NotOpened(format!("{e:#}")),
            };
            let since = Instant::now();
            let (mut rd, mut wr) = tokio::io::split(tls);
            // Headers that never end: a valid start, then a header value
            // that grows by a byte at a time.
            let head = format!(
                "POST /mcp HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\nx-slow: ",
                a.sni
            );
            let mut bytes = head.into_bytes().into_iter().chain(std::iter::repeat(b'a'));
            let every = Duration::from_millis(a.byte_interval_ms.max(1));
            let mut buf = [0u8; 512];
            loop {
                tokio::select! {
                    n = rd.read(&mut buf) => {
                        return match n {
                            Ok(n) if n > 0 => Slow::Answered,
                            _ => Slow::Closed(since.elapsed()),
                        };
                    }
                    _ = tokio::time::sleep_until(shared.deadline.into()) => return Slow::Open,
                    _ = tokio::time::sleep(every) => {
                        let b = bytes.next().unwrap_or(b'a');
                        if wr.write_all(&[b]).await.is_err() || wr.flush().await.is_err() {
                            return Slow::Closed(since.elapsed());
                        }
                    }
                }
            }
        });
    }
    let (mut not_opened, mut answered, mut open) = (0u64, 0u64, 0u64);
    let mut closed_after = Vec::new();
    let mut first_error = None;
    while let Some(done) = tasks.join_next().await {
        match done.context("slowloris connection")? {
            Slow::NotOpened(e) => {
                not_opened += 1;
                first_error.get_or_insert(e);
            }
            Slow::Closed(d) => closed_after.push(d.as_secs_f64()),
            Slow::Answered => answered += 1,
            Slow::Open => open += 1,
        }
    }
    closed_after.sort_by(f64::total_cmp);
    let at = |q: f64| {
        closed_after
            .get(((closed_after.len() as f64 - 1.0) * q).round() as usize)
            .copied()
    };
    Ok(json!({
        "mode": "slowloris",
        "connections": shared.args.connections,
        "not_opened": not_opened,
        "first_error": first_error,
        "closed_by_server": closed_after.len(),
        "closed_after_s_min": at(0.0),
        "closed_after_s_p50": at(0.5),
        "closed_after_s_max": at(1.0),
        "answered": answered,
        "open_at_end": open,
        "elapsed_s": started.elapsed().as_secs_f64(),
    }))
}

/// The JSON-RPC answer in a JSON body or in an SSE body's `data:` lines.
fn answer(body: &[u8]) -> Option<Value> {
    let is_answer = |v: &Value| v.get("result").is_some() || v.get("error").is_some();
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        return Some(v).filter(is_answer);
    }
    let text = std::str::from_utf8(body).ok()?;
    text.split("\n\n").find_map(|event| {
        let data: Vec<&str> = event
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|d| d.strip_prefix(' ').unwrap_or(d))
            .collect();
        serde_json::from_str::<Value>(&data.join("\n"))
            .ok()
            .filter(is_answer)
    })
}

fn check_answer(a: &Args, status: hyper::StatusCode, body: &[u8]) -> Result<()> {
    let shown = || String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
    let Some(v) = answer(body) else {
        bail!("status {status}, no JSON-RPC answer: {}", shown());
    };
    let is_error = v.get("error").is_some() || v["result"]["isError"] == true;
    match a.expect {
        Expect::Allow => {
            if is_error {
                bail!("expected an allowed call, got: {}", shown());
            }
            if let Some(t) = &a.text {
                let found = v["result"]["content"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["text"].as_str().is_some_and(|s| s.contains(t.as_str())));
                if !found {
                    bail!("the result lacks {t:?}: {}", shown());
                }
            }
        }
        Expect::Deny => {
            if !is_error {
                bail!("expected a denial, got: {}", shown());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(expect: Expect, text: Option<&str>) -> Args {
        let mut a = Args::parse_from(["kya-bench-load", "--addr", "127.0.0.1:1", "--ca", "x"]);
        a.expect = expect;
        a.text = text.map(str::to_string);
        a
    }

    const OK: &[u8] =
        br#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"bench-ok"}],"isError":false}}"#;
    const DENIED: &[u8] =
        br#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"no"}],"isError":true}}"#;

    #[test]
    fn answers_in_json_and_in_sse() {
        assert!(answer(OK).is_some());
        let sse = b"event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\n\n";
        assert_eq!(answer(sse).map(|v| v["id"] == 1), Some(true));
        // A data line split in two, and a comment event before the answer.
        let split = b": ping\n\nevent: message\ndata: {\"jsonrpc\":\"2.0\",\ndata: \"id\":2,\"error\":{}}\n\n";
        assert_eq!(answer(split).map(|v| v["id"] == 2), Some(true));
    }

    #[test]
    fn garbage_is_no_answer() {
        for body in [
            &b""[..],
            b"not json",
            b"data: {\"jsonrpc\":\"2.0\"}\n\n",
            b"\xff\xfe",
        ] {
            assert!(answer(body).is_none(), "{body:?}");
        }
        let a = args(Expect::Allow, None);
        assert!(check_answer(&a, hyper::StatusCode::OK, b"<html>").is_err());
    }

    #[test]
    fn allow_and_deny_are_told_apart() {
        let s = hyper::StatusCode::OK;
        assert!(check_answer(&args(Expect::Allow, Some("bench-ok")), s, OK).is_ok());
        assert!(check_answer(&args(Expect::Allow, Some("other")), s, OK).is_err());
        assert!(check_answer(&args(Expect::Allow, None), s, DENIED).is_err());
        assert!(check_answer(&args(Expect::Deny, None), s, DENIED).is_ok());
        assert!(check_answer(&args(Expect::Deny, None), s, OK).is_err());
        let rpc_error =
            br#"{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"refused"}}"#;
        assert!(check_answer(&args(Expect::Deny, None), s, rpc_error).is_ok());
        assert!(check_answer(&args(Expect::Allow, None), s, rpc_error).is_err());
    }
}
