//! The end-to-end benchmark's upstream: a small, fast MCP server over TLS
//! (hyper + rustls, HTTP/1.1) so that the server is never the bottleneck.
//!
//! * `POST /mcp`: `initialize`, `tools/list`, notifications (202), and
//!   `tools/call`, answered with a fixed `CallToolResult` (`bench-ok`); the
//!   tool `bench_big` answers with one SSE event carrying a 1 MiB text.
//!   Calls to `bench_hold`, `bench_delete`, `bench_flood` and `bench_silent` are appended to
//!   the record file (`NAME UNIX_NANOS` per line): the server's own account of what ran.
//!   `bench_silent` is never answered (a server that hangs).
//! * `GET /bulk?bytes=N`: N bytes of non-MCP payload.
//!
//! Usage: `kya-bench-upstream --cert PEM --key PEM --record FILE ADDR...`;
//! prints `ready` once every address listens.

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::io::Write;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// The size of `bench_big`'s text.
const BIG: usize = 1 << 20;
/// Largest request body read.
const MAX_BODY: usize = 1 << 20;
/// Chunk of the bulk download.
const CHUNK: usize = 256 << 10;

struct Args {
    cert: PathBuf,
    key: PathBuf,
    record: PathBuf,
    addrs: Vec<String>,
}

fn parse_args() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let (mut cert, mut key, mut record, mut addrs) = (None, None, None, Vec::new());
    while let Some(a) = it.next() {
        match a.as_str() {
            "--cert" => cert = it.next().map(PathBuf::from),
            "--key" => key = it.next().map(PathBuf::from),
            "--record" => record = it.next().map(PathBuf::from),
            _ if a.starts_with("--") => bail!("unknown option {a}"),
            _ => addrs.push(a),
        }
    }
    if addrs.is_empty() {
        bail!("usage: kya-bench-upstream --cert PEM --key PEM --record FILE ADDR...");
    }
    Ok(Args {
        cert: cert.context("--cert")?,
        key: key.context("--key")?,
        record: record.context("--record")?,
        addrs,
    })
}

fn tls_config(cert: &PathBuf, key: &PathBuf) -> Result<rustls::ServerConfig> {
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(cert).with_context(|| format!("open {}", cert.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .context("certificate PEM")?;
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(key).with_context(|| format!("open {}", key.display()))?,
    ))
    .context("key PEM")?
    .context("no private key")?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(
        rustls::crypto::ring::default_provider().into(),
    )
    .with_safe_default_protocol_versions()
    .context("TLS versions")?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("server certificate")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

struct State {
    record: std::sync::Mutex<std::fs::File>,
    big_text: String,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let acceptor = TlsAcceptor::from(Arc::new(tls_config(&args.cert, &args.key)?));
    let state = Arc::new(State {
        record: std::sync::Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&args.record)
                .with_context(|| format!("open {}", args.record.display()))?,
        ),
        big_text: "x".repeat(BIG),
    });
    let mut tasks = Vec::new();
    for addr in &args.addrs {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("bind {addr}"))?;
        tasks.push(tokio::spawn(serve(
            listener,
            acceptor.clone(),
            state.clone(),
        )));
    }
    println!("ready");
    std::io::stdout().flush().ok();
    for t in tasks {
        t.await.context("listener task")?;
    }
    Ok(())
}

async fn serve(listener: TcpListener, acceptor: TlsAcceptor, state: Arc<State>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, state) = (acceptor.clone(), state.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let svc = hyper::service::service_fn(move |req| handle(req, state.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                .await;
        });
    }
}

type Reply = Response<Pin<Box<dyn Body<Data = Bytes, Error = Infallible> + Send>>>;

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Box::pin(Full::new(body.into())) as _);
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

async fn handle(req: Request<Incoming>, state: Arc<State>) -> Result<Reply, Infallible> {
    if req.method() == hyper::Method::GET && req.uri().path() == "/bulk" {
        let bytes = req
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("bytes="))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        let mut r = Response::new(Box::pin(Bulk::new(bytes)) as _);
        if let Ok(v) = "application/octet-stream".parse() {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        return Ok(r);
    }
    if req.method() != hyper::Method::POST || req.uri().path() != "/mcp" {
        return Ok(reply(StatusCode::NOT_FOUND, "text/plain", "not found"));
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(reply(StatusCode::BAD_REQUEST, "text/plain", "bad body")),
    };
    let Ok(msg) = serde_json::from_slice::<Value>(&body) else {
        return Ok(reply(StatusCode::BAD_REQUEST, "text/plain", "not JSON"));
    };
    let id = msg["id"].clone();
    let method = msg["method"].as_str().unwrap_or("");
    if id.is_null() {
        return Ok(reply(StatusCode::ACCEPTED, "text/plain", ""));
    }
    let result = match method {
        "initialize" => json!({
            "protocolVersion": "2025-06-18",
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "kya-bench-upstream", "version": "1"},
        }),
        "tools/list" => json!({"tools": [
            {"name": "bench_echo", "inputSchema": {"type": "object"}},
            {"name": "bench_big", "inputSchema": {"type": "object"}},
            {"name": "bench_hold", "inputSchema": {"type": "object"}},
            {"name": "bench_delete", "inputSchema": {"type": "object"}},
            {"name": "bench_flood", "inputSchema": {"type": "object"}},
            {"name": "bench_silent", "inputSchema": {"type": "object"}},
        ]}),
        "tools/call" => {
            let name = msg["params"]["name"].as_str().unwrap_or("");
            if matches!(
                name,
                "bench_hold" | "bench_delete" | "bench_flood" | "bench_silent"
            ) {
                record(&state, name);
            }
            if name == "bench_silent" {
                // Never answered: the connection stays until the client ends it.
                std::future::pending::<()>().await;
            }
            if name == "bench_big" {
                let event = json!({"jsonrpc": "2.0", "id": id, "result": {
                    "content": [{"type": "text", "text": state.big_text}],
                    "isError": false,
                }});
                let text = format!("event: message\ndata: {event}\n\n");
                return Ok(reply(StatusCode::OK, "text/event-stream", text));
            }
            json!({"content": [{"type": "text", "text": "bench-ok"}], "isError": false})
        }
        _ => json!({}),
    };
    let answer = json!({"jsonrpc": "2.0", "id": id, "result": result});
    Ok(reply(
        StatusCode::OK,
        "application/json",
        answer.to_string(),
    ))
}

fn record(state: &State, name: &str) {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut f = state.record.lock().unwrap_or_else(|e| e.into_inner());
    let _ = writeln!(f, "{name} {nanos}");
}

/// A body of `remaining` bytes, sent in shared chunks.
struct Bulk {
    remaining: u64,
    chunk: Bytes,
}

impl Bulk {
    fn new(remaining: u64) -> Self {
        Self {
            remaining,
            chunk: Bytes::from(vec![b'k'; CHUNK]),
        }
    }
}

impl Body for Bulk {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(CHUNK as u64);
        self.remaining -= n;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n as usize)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}
