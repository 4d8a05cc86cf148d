//! Shared harness of the proxy tests: a table-driven fake governor, a recording
//! upstream MCP-ish server (hyper), the proxy on an ephemeral loopback port, and a
//! hyper client. Everything is on 127.0.0.1.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use kya_agent::intercept::http::{
    serve_http, BoxFuture, CallFacts, ConnFacts, Governor, HttpVersion, Limits, Ruling,
};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

/// What the fake governor does with a tool (or a server→client method).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Act {
    Allow,
    Deny,
    /// Held until the test releases it, or denied after the timeout.
    Hold(Duration),
}

#[derive(Default)]
pub(crate) struct FakeGov {
    pub table: Mutex<HashMap<String, Act>>,
    pub calls: Mutex<Vec<CallFacts>>,
    pub refusals: Mutex<Vec<String>>,
    pub hidden: Mutex<Vec<String>>,
    releases: Mutex<HashMap<String, oneshot::Sender<bool>>>,
    /// Fires each time a hold is dropped before it resolved (the agent gave up).
    pub abandoned: Mutex<Vec<String>>,
    next: Mutex<u64>,
}

impl FakeGov {
    pub(crate) fn new(entries: &[(&str, Act)]) -> Arc<Self> {
        let g = Self::default();
        for (k, a) in entries {
            g.table.lock().unwrap().insert(k.to_string(), *a);
        }
        Arc::new(g)
    }

    /// Release the hold on `tool`: true approves, false denies. Waits until it exists.
    pub(crate) async fn release(&self, tool: &str, approve: bool) {
        for _ in 0..500 {
            if let Some(tx) = self.releases.lock().unwrap().remove(tool) {
                let _ = tx.send(approve);
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no hold on {tool}");
    }

    /// Wait until a hold on `tool` is pending (without releasing it).
    pub(crate) async fn wait_for_hold(&self, tool: &str) {
        for _ in 0..1000 {
            if self.releases.lock().unwrap().contains_key(tool) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no hold on {tool}");
    }

    pub(crate) fn decided_tools(&self) -> Vec<String> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter_map(|c| c.tool.clone())
            .collect()
    }
}

struct Abandon {
    tool: String,
    gov: Arc<FakeGov>,
    done: bool,
}
impl Drop for Abandon {
    fn drop(&mut self) {
        if !self.done {
            self.gov.abandoned.lock().unwrap().push(self.tool.clone());
        }
    }
}

pub(crate) struct GovHandle(pub Arc<FakeGov>);

impl Governor for GovHandle {
    fn decide(&self, call: CallFacts) -> BoxFuture<'static, Ruling> {
        let g = self.0.clone();
        let key = call.tool.clone().unwrap_or_else(|| call.method.clone());
        g.calls.lock().unwrap().push(call);
        let act = g
            .table
            .lock()
            .unwrap()
            .get(&key)
            .copied()
            .unwrap_or(Act::Allow);
        let id = {
            let mut n = g.next.lock().unwrap();
            *n += 1;
            format!("d-{}", *n)
        };
        Box::pin(async move {
            match act {
                Act::Allow => Ruling::Allow {
                    decision_id: id,
                    grant: None,
                },
                Act::Deny => Ruling::Deny {
                    decision_id: id,
                    rule: Some(format!("no-{key}")),
                    reason: format!("{key} is not allowed"),
                },
                Act::Hold(timeout) => {
                    let (tx, rx) = oneshot::channel();
                    g.releases.lock().unwrap().insert(key.clone(), tx);
                    let did = id.clone();
                    let gov = g.clone();
                    let wait: BoxFuture<'static, Ruling> = Box::pin(async move {
                        let mut guard = Abandon {
                            tool: key.clone(),
                            gov,
                            done: false,
                        };
                        let r = tokio::select! {
                            r = rx => match r {
                                Ok(true) => Ruling::Allow {
                                    decision_id: did,
                                    grant: None,
                                },
                                _ => Ruling::Deny { decision_id: did, rule: Some("approval".into()), reason: "denied by the owner".into() },
                            },
                            _ = tokio::time::sleep(timeout) => Ruling::Deny { decision_id: did, rule: Some("approval".into()), reason: "hold timed out".into() },
                        };
                        guard.done = true;
                        r
                    });
                    Ruling::Hold {
                        decision_id: id,
                        owner: "alice".into(),
                        binding: "WXYZ".into(),
                        wait,
                    }
                }
            }
        })
    }

    fn may_call(&self, _conn: &ConnFacts, _server: &str, tool: &str) -> bool {
        !self.0.hidden.lock().unwrap().iter().any(|t| t == tool)
    }

    fn refused(&self, _conn: &ConnFacts, reason: &str) {
        self.0.refusals.lock().unwrap().push(reason.to_string());
    }
}

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub method: String,
    pub path: String,
    pub version: http::Version,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Seen {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// The recording upstream.
pub(crate) struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Legacy sessions: session id → sender into its SSE stream.
    legacy: Arc<Mutex<HashMap<String, mpsc::Sender<Bytes>>>>,
}

impl Upstream {
    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
    /// The tools/call names the upstream actually received.
    pub(crate) fn tools_called(&self) -> Vec<String> {
        let mut out = Vec::new();
        for s in self.seen() {
            let v = s.json();
            let items = match v {
                Value::Array(a) => a,
                o => vec![o],
            };
            for m in items {
                if m["method"] == "tools/call" {
                    out.push(m["params"]["name"].as_str().unwrap_or("").to_string());
                }
            }
        }
        out
    }
}

fn tool_result(id: &Value, text: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": {"content": [{"type": "text", "text": text}]}})
}

/// A result shaped like a `tools/list` answer (three tools, one hidden by
/// [`default_gov`]'s `hidden` list when a test adds `transfer` to it).
pub(crate) fn tools_shaped(id: &Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": {"tools": [
        {"name": "search_docs", "inputSchema": {"type": "object"}},
        {"name": "delete_records", "inputSchema": {"type": "object"}},
        {"name": "transfer", "inputSchema": {"type": "object"}}]}})
}

fn answer_one(m: &Value) -> Option<Value> {
    let id = m.get("id")?;
    match m["method"].as_str()? {
        // A tool whose result looks like a tools/list answer.
        "tools/call" if m["params"]["name"] == "list_like" => Some(tools_shaped(id)),
        "tools/call" => {
            let name = m["params"]["name"].as_str().unwrap_or("");
            Some(tool_result(
                id,
                &format!("ran {name} with {}", m["params"]["arguments"]),
            ))
        }
        "tools/list" => Some(tools_shaped(id)),
        _ => Some(json!({"jsonrpc": "2.0", "id": id, "result": {}})),
    }
}

fn sse_frame(v: &Value) -> Bytes {
    Bytes::from(format!("event: message\ndata: {v}\n\n"))
}

type UpBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

fn full(b: impl Into<Bytes>) -> UpBody {
    Full::new(b.into()).boxed()
}

struct ChanBody(mpsc::Receiver<Bytes>);
impl hyper::body::Body for ChanBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|o| o.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

async fn upstream_handle(
    req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
    legacy: Arc<Mutex<HashMap<String, mpsc::Sender<Bytes>>>>,
) -> Result<Response<UpBody>, std::convert::Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        path: path.clone(),
        version: parts.version,
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    let mut resp = Response::builder();
    if parts.method == http::Method::GET && parts.uri.path() == "/sse" {
        // Legacy transport: endpoint event, then responses to POSTs.
        let sid = format!("s{}", rand_id());
        let (tx, rx) = mpsc::channel(16);
        tx.send(Bytes::from(format!(
            "event: endpoint\ndata: /messages?session_id={sid}\n\n"
        )))
        .await
        .unwrap();
        legacy.lock().unwrap().insert(sid, tx);
        return Ok(resp
            .header("content-type", "text/event-stream")
            .body(ChanBody(rx).boxed())
            .unwrap());
    }
    if parts.method == http::Method::GET && parts.uri.path() == "/stream-answers" {
        // A GET stream carrying tools/list-shaped answers to the JSON ids in
        // the query (`ids=[5,"5"]`), each sent twice.
        let ids: Vec<Value> = parts
            .uri
            .query()
            .and_then(|q| q.strip_prefix("ids="))
            .map(|q| {
                percent_encoding::percent_decode_str(q)
                    .decode_utf8_lossy()
                    .into_owned()
            })
            .and_then(|q| serde_json::from_str(&q).ok())
            .unwrap_or_default();
        let mut s = String::new();
        for id in ids.iter().chain(&ids) {
            s.push_str(&format!("event: message\ndata: {}\n\n", tools_shaped(id)));
        }
        return Ok(resp
            .header("content-type", "text/event-stream")
            .body(full(s))
            .unwrap());
    }
    if parts.method == http::Method::GET && parts.uri.path() == "/stream" {
        // The Streamable HTTP GET stream: one server→client request, one notification.
        let (tx, rx) = mpsc::channel(16);
        tx.send(sse_frame(&json!({"jsonrpc":"2.0","id":"s1","method":"sampling/createMessage","params":{"messages":[]}}))).await.unwrap();
        tx.send(sse_frame(&json!({"jsonrpc":"2.0","method":"notifications/message","params":{"level":"info","data":"hi"}}))).await.unwrap();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(tx);
        });
        return Ok(resp
            .header("content-type", "text/event-stream")
            .body(ChanBody(rx).boxed())
            .unwrap());
    }
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(_) => {
            return Ok(resp
                .header("content-type", "text/plain")
                .body(full("ok"))
                .unwrap())
        }
    };
    let answers: Vec<Value> = match &v {
        Value::Array(a) => a.iter().filter_map(answer_one).collect(),
        o => answer_one(o).into_iter().collect(),
    };
    if parts.uri.path() == "/messages" {
        let sid = parts
            .uri
            .query()
            .unwrap_or("")
            .trim_start_matches("session_id=")
            .to_string();
        let tx = legacy.lock().unwrap().get(&sid).cloned();
        if let Some(tx) = tx {
            for a in answers {
                let _ = tx.send(sse_frame(&a)).await;
            }
        }
        return Ok(resp.status(202).body(full("")).unwrap());
    }
    if answers.is_empty() {
        return Ok(resp.status(202).body(full("")).unwrap());
    }
    let out = if v.is_array() {
        Value::Array(answers)
    } else {
        answers[0].clone()
    };
    if parts.uri.path() == "/mcp-sse" {
        // Streamable HTTP answering with SSE: a server→client request first.
        let mut s = String::new();
        s.push_str(&format!("event: message\ndata: {}\n\n", json!({"jsonrpc":"2.0","id":"srv-1","method":"sampling/createMessage","params":{"messages":[]}})));
        s.push_str(&format!("event: message\ndata: {}\n\n", json!({"jsonrpc":"2.0","id":"srv-2","method":"elicitation/create","params":{"message":"ok?"}})));
        s.push_str(&format!("event: message\ndata: {out}\n\n"));
        return Ok(resp
            .header("content-type", "text/event-stream")
            .body(full(s))
            .unwrap());
    }
    resp = resp.header("content-type", "application/json");
    if let Some(sid) = parts.headers.get("mcp-session-id") {
        resp = resp.header("mcp-session-id", sid);
    }
    Ok(resp.body(full(out.to_string())).unwrap())
}

fn rand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Start the recording upstream (HTTP/1.1 and prior-knowledge h2).
pub(crate) async fn upstream() -> Upstream {
    upstream_with(None).await
}

/// The recording upstream, over TLS when `tls` is given (ALPN picks h2 or HTTP/1.1).
pub(crate) async fn upstream_with(tls: Option<tokio_rustls::TlsAcceptor>) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let legacy = Arc::new(Mutex::new(HashMap::new()));
    let (s2, l2) = (seen.clone(), legacy.clone());
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let (s3, l3) = (s2.clone(), l2.clone());
            let tls = tls.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |r| upstream_handle(r, s3.clone(), l3.clone()));
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                match tls {
                    None => {
                        let _ = builder.serve_connection(TokioIo::new(sock), svc).await;
                    }
                    Some(acceptor) => {
                        let Ok(stream) = acceptor.accept(sock).await else {
                            return;
                        };
                        let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                    }
                }
            });
        }
    });
    Upstream { addr, seen, legacy }
}

/// The proxy on an ephemeral port, forwarding every connection to `upstream`.
pub(crate) async fn proxy(
    upstream: SocketAddr,
    gov: Arc<FakeGov>,
    limits: Limits,
    version: HttpVersion,
    sni: Option<&str>,
) -> SocketAddr {
    proxy_with(upstream, Arc::new(GovHandle(gov)), limits, version, sni).await
}

/// The proxy behind any governor (the real decision path, say).
pub(crate) async fn proxy_with(
    upstream: SocketAddr,
    gov: Arc<dyn Governor>,
    limits: Limits,
    version: HttpVersion,
    sni: Option<&str>,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sni = sni.map(str::to_string);
    tokio::spawn(async move {
        let mut n = 0;
        loop {
            let Ok((agent, _)) = listener.accept().await else {
                return;
            };
            n += 1;
            let up = TcpStream::connect(upstream).await.unwrap();
            let conn = Arc::new(ConnFacts {
                process: Default::default(),
                dst: upstream,
                sni: sni.clone(),
                tls: false,
                conn_id: n,
                tunnel: None,
            });
            let gov = gov.clone();
            let limits = limits.clone();
            tokio::spawn(async move {
                let _ = serve_http(
                    agent,
                    up,
                    version,
                    conn,
                    gov,
                    &limits,
                    std::sync::Arc::new(kya_agent::intercept::names::NameResolver::with_table(
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

/// A new plain TCP connection to `addr` for the proxy's upstream leg.
pub(crate) fn reconnect_to(addr: SocketAddr) -> kya_agent::intercept::http::client::Reconnect {
    Arc::new(move || {
        Box::pin(async move {
            TcpStream::connect(addr)
                .await
                .map(|s| Box::new(s) as Box<dyn kya_agent::intercept::http::client::Io>)
                .map_err(|e| e.to_string())
        })
    })
}

/// A hyper HTTP/1.1 client connection.
pub(crate) struct Client {
    pub h1: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
    pub h2: Option<hyper::client::conn::http2::SendRequest<Full<Bytes>>>,
    pub addr: SocketAddr,
}

impl Client {
    pub(crate) async fn h1(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).await.unwrap();
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .unwrap();
        tokio::spawn(conn);
        Client {
            h1: Some(tx),
            h2: None,
            addr,
        }
    }

    pub(crate) async fn h2(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).await.unwrap();
        let (tx, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
                .await
                .unwrap();
        tokio::spawn(conn);
        Client {
            h1: None,
            h2: Some(tx),
            addr,
        }
    }

    pub(crate) async fn send(&mut self, req: Request<Full<Bytes>>) -> Response<Incoming> {
        if let Some(h1) = self.h1.as_mut() {
            h1.ready().await.unwrap();
            h1.send_request(req).await.unwrap()
        } else {
            let h2 = self.h2.as_mut().unwrap();
            h2.ready().await.unwrap();
            h2.send_request(req).await.unwrap()
        }
    }

    /// POST `body` to `path` with JSON content type and the given extra headers.
    pub(crate) async fn post(
        &mut self,
        path: &str,
        body: impl Into<Bytes>,
        headers: &[(&str, &str)],
    ) -> (u16, http::HeaderMap, Bytes) {
        let b = Request::post(self.uri(path))
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream");
        self.exchange(b, body.into(), headers).await
    }

    /// GET `path` with the given extra headers; the whole answer.
    pub(crate) async fn get(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (u16, http::HeaderMap, Bytes) {
        let b = Request::get(self.uri(path));
        self.exchange(b, Bytes::new(), headers).await
    }

    fn uri(&self, path: &str) -> String {
        if self.h2.is_some() {
            format!("http://127.0.0.1:{}{path}", self.addr.port())
        } else {
            path.to_string()
        }
    }

    /// Send the request `b` with `body` and `headers` (and a `Host` over
    /// HTTP/1.1); the status, headers and whole body of the answer.
    async fn exchange(
        &mut self,
        mut b: http::request::Builder,
        body: Bytes,
        headers: &[(&str, &str)],
    ) -> (u16, http::HeaderMap, Bytes) {
        if self.h1.is_some() {
            b = b.header("host", format!("127.0.0.1:{}", self.addr.port()));
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let resp = self.send(b.body(Full::new(body)).unwrap()).await;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        (status, headers, body)
    }
}

pub(crate) fn call(id: u64, tool: &str, args: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": args}})
}

pub(crate) fn json_of(b: &[u8]) -> Value {
    serde_json::from_slice(b)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(b)))
}

/// Parse an SSE body into the JSON data of its events.
pub(crate) fn sse_messages(b: &[u8]) -> Vec<Value> {
    let text = String::from_utf8_lossy(b);
    text.split("\n\n")
        .filter_map(|block| {
            let data: Vec<&str> = block
                .lines()
                .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
                .collect();
            if data.is_empty() {
                None
            } else {
                serde_json::from_str(&data.join("\n")).ok()
            }
        })
        .collect()
}

pub(crate) fn default_gov() -> Arc<FakeGov> {
    FakeGov::new(&[
        ("search_docs", Act::Allow),
        ("delete_records", Act::Deny),
        ("transfer", Act::Hold(Duration::from_secs(10))),
    ])
}

/// Read SSE events from a streaming body until `n` JSON messages arrived (or the
/// timeout passes); returns what arrived.
pub(crate) async fn read_events(body: &mut Incoming, n: usize, timeout: Duration) -> Vec<Value> {
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let got = sse_messages(&buf);
        if got.len() >= n {
            return got;
        }
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(f))) => {
                if let Ok(d) = f.into_data() {
                    buf.extend_from_slice(&d);
                }
            }
            _ => return sse_messages(&buf),
        }
    }
}

/// Raw SSE text read the same way (for `endpoint` events, which are not JSON).
pub(crate) async fn read_raw_until(body: &mut Incoming, needle: &str, timeout: Duration) -> String {
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        if text.contains(needle) {
            return text;
        }
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(f))) => {
                if let Ok(d) = f.into_data() {
                    buf.extend_from_slice(&d);
                }
            }
            _ => return text,
        }
    }
}

pub(crate) fn post_req(
    path: &str,
    body: &Value,
    sse: bool,
    extra: &[(&str, &str)],
) -> Request<Full<Bytes>> {
    let mut b = Request::post(path)
        .header("host", "127.0.0.1")
        .header("content-type", "application/json")
        .header(
            "accept",
            if sse {
                "application/json, text/event-stream"
            } else {
                "application/json"
            },
        );
    for (k, v) in extra {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::from(body.to_string()))).unwrap()
}

// ---- real peers (tests/peers, installed by setup.sh) ----

use std::path::PathBuf;
use std::sync::OnceLock;

pub(crate) fn peers() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/peers")
}

/// Install the peers once per test binary (the script is idempotent and fast when
/// already installed). Setup serialises on a lock so parallel tests wait for it.
pub(crate) fn ensure_peers() {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let r = DONE.get_or_init(|| {
        let out = std::process::Command::new("sh")
            .arg(peers().join("setup.sh"))
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    });
    if let Err(e) = r {
        panic!("tests/peers/setup.sh failed: {e}");
    }
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A peer process, killed (by its own pid) when the test ends.
/// A peer process, killed at drop with its process group when it leads one
/// (a server that forks workers is started with `process_group(0)`, so no
/// worker outlives the test).
pub(crate) struct Peer(pub tokio::process::Child);
impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(pid) = self.0.id().and_then(|p| i32::try_from(p).ok()) {
            // ESRCH when the peer leads no group of its own: nothing to do.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.0.start_kill();
    }
}

pub(crate) async fn wait_listening(port: u16) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("peer on port {port} never listened");
}

/// kya's connection handling as the daemon sets it up ([`Inspection`]):
/// its TLS context (CA) in `state`, trusting `upstream_root` upstream (or a
/// root nothing is signed by), deciding through `gov`.
///
/// [`Inspection`]: kya_agent::intercept::dispatch::Inspection
pub(crate) fn inspection(
    state: &std::path::Path,
    upstream_root: Option<rustls::pki_types::CertificateDer<'static>>,
    gov: Arc<dyn Governor>,
) -> Arc<kya_agent::intercept::dispatch::Inspection> {
    use kya_agent::intercept::dispatch::{Inspection, Unclassified};
    use kya_agent::tls::{leaf_cache, passthrough::Passthrough, upstream, TlsContext};
    let root = upstream_root.unwrap_or_else(|| {
        let test_root = rcgen::generate_simple_self_signed(vec!["root.test".into()]).expect("root");
        test_root.cert.der().clone()
    });
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).expect("root");
    let tls = TlsContext::new(
        state,
        upstream::UpstreamConnector::new(roots).expect("connector"),
        Passthrough::new::<&str>(&[]).expect("passthrough"),
        leaf_cache::DEFAULT_CAPACITY,
    )
    .expect("tls");
    Arc::new(Inspection::new(
        tls,
        gov,
        Limits::default(),
        Unclassified::default(),
        Arc::new(kya_agent::intercept::names::NameResolver::new()),
    ))
}

/// The origin of a connection this test process made to `dst`.
pub(crate) fn this_process_to(dst: SocketAddr) -> kya_agent::intercept::origin::ConnOrigin {
    kya_agent::intercept::origin::ConnOrigin {
        dst,
        process: kya_common::ProcessIdentity {
            pid: std::process::id(),
            ..Default::default()
        },
        tid: std::process::id(),
        cgroup_id: 0,
        netns: None,
    }
}
