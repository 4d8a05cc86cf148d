//! One HTTP exchange through the proxy: read the agent's request, have every
//! JSON-RPC message decided, then forward the canonical bytes, answer with the
//! denial, or hold; and judge what the server answers.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body as _, Incoming};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::mcp::json;
use crate::mcp::jsonrpc::{self, Id, Message, Payload};
use crate::mcp::{encoding, headers as mcp_headers};

use super::body::{self, ProxyBody, ReadError};
use super::client::{Upstream, UpstreamError};
use super::deny::{self, Denial};
use super::filter::{filter_server_data, Filtered, Peer};
use super::governor::{CallFacts, ConnFacts, Direction, Governor, Grant, ProofRequest, Ruling};
use super::inspect::{self, Refusal};
use super::limits::Limits;
use super::listed;
use super::load::LimitRefusals;
use super::sessions;
use super::stream;
use crate::broker;
use crate::intercept::names::NameResolver;

tokio::task_local! {
    /// Set when the upstream connection ended after the request may have
    /// reached the server: the agent's connection is closed without an
    /// answer, as the server closed its own.
    static UPSTREAM_GONE: Cell<bool>;
}

/// The agent's connection is closed without an answer (see [`UPSTREAM_GONE`]).
#[derive(Debug, thiserror::Error)]
#[error("the upstream connection ended during the exchange")]
pub(crate) struct UpstreamGone;

/// The JSON-RPC requests a server's answer answers: each gets an error when
/// kya cannot deliver the answer.
#[derive(Debug, Default)]
struct Answers {
    ids: Vec<Value>,
    /// The requests came as a batch: errors are answered as an array.
    batch: bool,
}

/// Refusal when the process-wide table of held calls is full (audited).
const TOO_MANY_HELD: &str = "too many calls are held at once";
/// The request head, kept to build the upstream request (possibly later, after a hold).
#[derive(Debug, Clone)]
struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

/// The longest an event stream's head waits for the events that came with
/// it to be judged (they then leave with it, in one write).
const FIRST_EVENTS_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

/// What was decided for one message of a request.
#[derive(Debug)]
enum Outcome {
    /// The decision id, and what a proof of decision says of the message
    /// (when its server asked for proofs).
    Allow(String, Option<Arc<Grant>>),
    Deny(Denial),
    /// A response or error the client sends back to the server (the answer to a
    /// server→client request that was already decided on its way in): not decided.
    Pass,
}

/// Per-connection state shared by all its exchanges.
pub(super) struct Exchange {
    pub gov: Arc<dyn Governor>,
    pub conn: Arc<ConnFacts>,
    pub limits: Limits,
    pub upstream: Upstream,
    /// Calls currently held on this connection.
    pub held: Arc<AtomicUsize>,
    /// Checks a `Host` that no certificate vouched for against the destination.
    pub names: Arc<NameResolver>,
    /// Follows `CONNECT` tunnels ([`super::connect`]); `None`: refused.
    pub tunnels: Option<Arc<dyn super::connect::Tunnels>>,
}

/// Where a held call's progress notifications go.
struct Progress {
    token: Id,
    owner: String,
    binding: String,
    to: ProgressTo,
}

enum ProgressTo {
    /// The legacy SSE session's stream (messages injected into it).
    Session(mpsc::Sender<Value>),
    /// The response's own event stream; closed when the client goes away.
    Stream(body::BodyTx),
}

/// How waiting for a held call ended.
enum Held {
    /// The governor ruled.
    Ruled(Outcome),
    /// The client cancelled the call (`notifications/cancelled`).
    Cancelled,
    /// The client went away.
    Gone,
}

/// Counts a held call for as long as it lives.
struct HeldCount(Arc<AtomicUsize>);

impl Drop for HeldCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
];

/// Whether `name` (lowercase) is a hop-by-hop header, never forwarded as is.
pub(crate) fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.contains(&name)
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Copy headers minus hop-by-hop ones (and those the `Connection` header names).
pub(super) fn end_to_end(h: &HeaderMap, also_drop: &[&str]) -> HeaderMap {
    let named: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::with_capacity(h.len());
    for (k, v) in h {
        let n = k.as_str();
        if HOP_BY_HOP.contains(&n) || also_drop.contains(&n) || named.iter().any(|x| x == n) {
            continue;
        }
        out.append(k.clone(), v.clone());
    }
    out
}

fn json_response(status: StatusCode, value: &Value) -> Response<ProxyBody> {
    let bytes = json::to_canonical_bytes(value);
    let mut r = Response::new(body::full(bytes));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn empty_response(status: StatusCode) -> Response<ProxyBody> {
    let mut r = Response::new(body::empty());
    *r.status_mut() = status;
    r
}

fn accepts_sse(h: &HeaderMap) -> bool {
    h.get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("text/event-stream"))
}

fn is_sse(h: &HeaderMap) -> bool {
    header_str(h, "content-type").is_some_and(|ct| {
        ct.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .eq_ignore_ascii_case("text/event-stream")
    })
}

fn to_outcome(r: Ruling) -> Outcome {
    match r {
        Ruling::Allow { decision_id, grant } => Outcome::Allow(decision_id, grant),
        Ruling::Deny {
            decision_id,
            rule,
            reason,
        } => Outcome::Deny(Denial {
            rule,
            reason,
            decision: decision_id,
        }),
        Ruling::Hold { decision_id, .. } => Outcome::Deny(Denial {
            rule: None,
            reason: "a hold resolved to another hold".into(),
            decision: decision_id,
        }),
    }
}

impl Exchange {
    /// hyper's service entry point. Every failure is an HTTP answer, except an
    /// upstream connection that ended under a sent request: then the agent's
    /// connection is closed too (`Err`), which is what it would have seen direct.
    pub(super) async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, UpstreamGone> {
        UPSTREAM_GONE
            .scope(Cell::new(false), async move {
                let r = self.handle_request(req).await;
                if UPSTREAM_GONE.try_with(Cell::get).unwrap_or(false) {
                    Err(UpstreamGone)
                } else {
                    Ok(r)
                }
            })
            .await
    }

    /// A refusal without a JSON-RPC id to answer: an HTTP error whose body is still a
    /// JSON-RPC error, so an MCP client shows the reason.
    pub(super) fn refuse_http(
        &self,
        status: StatusCode,
        version: Version,
        reason: &str,
    ) -> Response<ProxyBody> {
        tracing::info!(conn = self.conn.conn_id, %reason, "request refused");
        self.gov.refused(&self.conn, reason);
        let mut r = json_response(status, &deny::refusal(reason));
        if status == StatusCode::REQUEST_TIMEOUT && version == Version::HTTP_11 {
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }

    /// The server name policy sees. Under TLS with an SNI the upstream's
    /// certificate vouched for the name. Otherwise the name is only the agent's
    /// `Host` header: it counts if it resolves to the address the connection
    /// really goes to, and else the destination address is the server's name
    /// (an agent cannot borrow a trusted name for another address).
    async fn bind_to_destination(&self, claimed: String) -> String {
        if self.conn.sni.is_some() {
            return claimed;
        }
        let ip = self.conn.dst.ip();
        match self.names.resolves_to(&claimed, ip).await {
            Ok(true) => claimed,
            Ok(false) => {
                tracing::info!(conn = self.conn.conn_id, host = %claimed, dst = %ip, "Host does not resolve to the destination: the server is named by its address");
                ip.to_string()
            }
            Err(e) => {
                tracing::info!(conn = self.conn.conn_id, host = %claimed, dst = %ip, error = %e, "Host cannot be checked: the server is named by its address");
                ip.to_string()
            }
        }
    }

    fn peer(&self, server: &str, head: &Head) -> Peer {
        Peer {
            gov: self.gov.clone(),
            conn: self.conn.clone(),
            server: server.to_string(),
            session: header_str(&head.headers, "mcp-session-id").map(str::to_string),
            protocol_version: header_str(&head.headers, "mcp-protocol-version").map(str::to_string),
            limits: self.limits.clone(),
            scope: self.scope(server, head),
            secret: None,
        }
    }

    async fn handle_request(self: Arc<Self>, req: Request<Incoming>) -> Response<ProxyBody> {
        if req.method() == Method::CONNECT {
            return super::connect::connect(&self, req).await;
        }
        let (parts, incoming) = req.into_parts();
        let head = Head {
            method: parts.method,
            uri: parts.uri,
            version: parts.version,
            headers: parts.headers,
        };
        let v = head.version;
        if head.headers.len() > self.limits.max_headers {
            LimitRefusals::count(&self.limits.refusals.headers);
            return self.refuse_http(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                v,
                "too many header fields",
            );
        }
        let server = match inspect::server_name(&self.conn, &head.headers, &head.uri) {
            Ok(s) => s,
            Err(Refusal(r)) => return self.refuse_http(StatusCode::MISDIRECTED_REQUEST, v, &r),
        };
        let server = self.bind_to_destination(server).await;
        if let Some(broker) = self.gov.broker() {
            if let Err(e) =
                broker.check_placeholders(&server, self.port(), &head.uri, &head.headers)
            {
                return self.refuse_http(StatusCode::FORBIDDEN, v, &e.to_string());
            }
        }
        if incoming.is_end_stream() {
            let mcp = head.headers.contains_key("mcp-session-id")
                || head.headers.contains_key("mcp-protocol-version");
            let proof = match self.proof(&server, &head, b"", &[]) {
                Ok(p) => p,
                Err(reason) => return self.refuse_http(StatusCode::BAD_GATEWAY, v, &reason),
            };
            return self
                .forward(
                    &server,
                    &head,
                    body::empty(),
                    None,
                    false,
                    mcp,
                    Answers::default(),
                    proof,
                )
                .await;
        }
        let raw = match body::read_bounded(incoming, self.limits.max_body, self.limits.body_timeout)
            .await
        {
            Ok(b) => b,
            Err(ReadError::TooLarge(n)) => {
                LimitRefusals::count(&self.limits.refusals.body);
                return self.refuse_http(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    v,
                    &format!("request body over {n} bytes"),
                );
            }
            Err(ReadError::TimedOut(d)) => {
                LimitRefusals::count(&self.limits.refusals.slow_body);
                return self.refuse_http(
                    StatusCode::REQUEST_TIMEOUT,
                    v,
                    &format!("request body not received within {d:?}"),
                );
            }
            Err(ReadError::Transport(e)) => {
                return self.refuse_http(
                    StatusCode::BAD_REQUEST,
                    v,
                    &format!("request body unreadable: {e}"),
                )
            }
        };
        let max = usize::try_from(self.limits.max_body).unwrap_or(usize::MAX);
        let decoded = match encoding::decode_body(&head.headers, &raw, max) {
            Ok(d) => d,
            Err(e) => {
                return self.refuse_http(StatusCode::UNSUPPORTED_MEDIA_TYPE, v, &e.to_string())
            }
        };
        let ct = header_str(&head.headers, "content-type");
        match inspect::read_body(ct, &decoded, &self.limits.json(), self.limits.max_batch) {
            Err(Refusal(r)) => self.refuse_http(StatusCode::BAD_REQUEST, v, &r),
            Ok(inspect::Body::Opaque) => {
                let len = raw.len();
                let proof = match self.proof(&server, &head, &raw, &[]) {
                    Ok(p) => p,
                    Err(reason) => return self.refuse_http(StatusCode::BAD_GATEWAY, v, &reason),
                };
                self.forward(
                    &server,
                    &head,
                    body::full(raw),
                    Some(len),
                    false,
                    false,
                    Answers::default(),
                    proof,
                )
                .await
            }
            Ok(inspect::Body::JsonRpc { payload, value }) => {
                self.govern(server, head, payload, value).await
            }
        }
    }

    fn call_facts(
        &self,
        server: &str,
        session: Option<&str>,
        pv: Option<&str>,
        msg: &Message,
        raw: &Value,
        batch: Option<(usize, usize)>,
    ) -> CallFacts {
        let params = raw
            .get("params")
            .cloned()
            .unwrap_or_else(|| Value::Object(Default::default()));
        let (tool, args, progress_token) = match msg {
            Message::ToolCall(t) => (
                Some(t.name.clone()),
                Value::Object(t.arguments.clone()),
                t.progress_token.as_ref().map(|p| p.to_value()),
            ),
            _ => {
                let p = params
                    .get("_meta")
                    .and_then(|m| m.get("progressToken"))
                    .cloned();
                (None, params, p)
            }
        };
        CallFacts {
            conn: self.conn.clone(),
            server: server.to_string(),
            direction: Direction::ClientToServer,
            method: msg.method().unwrap_or_default().to_string(),
            tool,
            args,
            jsonrpc_id: msg.id().map(|i| i.to_value()),
            session: session.map(str::to_string),
            protocol_version: pv.map(str::to_string),
            progress_token,
            batch,
        }
    }

    /// The session a held call belongs to, for matching `notifications/cancelled`:
    /// the `Mcp-Session-Id`, or without one (legacy transport, stateless servers)
    /// the message URL and the calling process, so one process cannot cancel
    /// another's held call by guessing its id.
    fn session_key(&self, head: &Head) -> String {
        listed::client_session(
            header_str(&head.headers, "mcp-session-id"),
            self.conn.process.pid,
            head.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        )
    }

    /// The MCP session of a request, for matching answers to `tools/list` requests.
    fn scope(&self, server: &str, head: &Head) -> String {
        listed::scope(&self.conn.dst, server, &self.session_key(head))
    }

    async fn govern(
        self: Arc<Self>,
        server: String,
        head: Head,
        payload: Payload,
        value: Value,
    ) -> Response<ProxyBody> {
        let raws: Vec<Value> = match &value {
            Value::Array(items) => items.clone(),
            single => vec![single.clone()],
        };
        // Session, protocol version and Mcp-Method/Mcp-Name: validated, and the
        // latter two must agree with the body.
        let mcp = match mcp_headers::read_mcp_headers(&head.headers)
            .and_then(|h| mcp_headers::check_agreement(&h, &payload.messages).map(|()| h))
        {
            Ok(h) => h,
            Err(e) => {
                let reason = e.to_string();
                self.gov.refused(&self.conn, &reason);
                let outcomes = payload
                    .messages
                    .iter()
                    .map(|_| Outcome::Deny(Denial::refusal(reason.clone())))
                    .collect();
                return self.answer(&head, &payload, outcomes);
            }
        };
        let session = mcp.session_id;
        let pv = mcp.protocol_version;
        let session_key = self.session_key(&head);
        let size = payload.messages.len();

        let mut outcomes = Vec::with_capacity(size);
        let mut holds = Vec::new();
        for (i, (msg, raw)) in payload.messages.iter().zip(&raws).enumerate() {
            if let Message::Notification(n) = msg {
                if n.method == "notifications/cancelled" {
                    if let Some(id) = n.params.as_ref().and_then(|p| p.get("requestId")) {
                        let key =
                            sessions::held_key(&self.conn.dst, &server, Some(&session_key), id);
                        if sessions::cancel_held(&key) {
                            tracing::info!(conn = self.conn.conn_id, request = %id, "held call cancelled by the client");
                        }
                    }
                }
            }
            if matches!(msg, Message::Response(_) | Message::Error(_)) {
                outcomes.push(Outcome::Pass);
                continue;
            }
            let batch = payload.batch.then_some((i, size));
            let facts =
                self.call_facts(&server, session.as_deref(), pv.as_deref(), msg, raw, batch);
            match self.gov.decide(facts).await {
                Ruling::Hold {
                    decision_id,
                    owner,
                    binding,
                    wait,
                } => {
                    holds.push((i, decision_id.clone(), owner, binding, wait));
                    outcomes.push(Outcome::Allow(decision_id, None));
                }
                other => outcomes.push(to_outcome(other)),
            }
        }

        if !holds.is_empty() {
            let pid = self.conn.process.pid;
            let over_conn =
                self.held.load(Ordering::Acquire) + holds.len() > self.limits.max_held_per_conn;
            let process_holds = if over_conn {
                None
            } else {
                self.limits.held_by_process.enter(
                    pid,
                    holds.len(),
                    self.limits.max_held_per_process,
                )
            };
            let admitted = if let Some(mut process_holds) = process_holds {
                // Each hold counts against its process for as long as it is
                // waited for (dropping the wait is the end of the hold).
                holds = holds
                    .into_iter()
                    .map(|(i, decision_id, owner, binding, wait)| {
                        let share = process_holds.take_one();
                        let wait: super::governor::BoxFuture<'static, Ruling> =
                            Box::pin(async move {
                                let _share = share;
                                wait.await
                            });
                        (i, decision_id, owner, binding, wait)
                    })
                    .collect();
                true
            } else {
                let reason = if over_conn {
                    LimitRefusals::count(&self.limits.refusals.held_per_conn);
                    "too many calls held for approval on this connection".to_string()
                } else {
                    LimitRefusals::count(&self.limits.refusals.held_per_process);
                    let reason = format!(
                        "too many calls held for approval for process {pid} (intercept.max_held_per_process)"
                    );
                    self.gov.refused(&self.conn, &reason);
                    reason
                };
                for (i, decision_id, ..) in holds.drain(..) {
                    outcomes[i] = Outcome::Deny(Denial {
                        rule: None,
                        reason: reason.clone(),
                        decision: decision_id,
                    });
                }
                false
            };
            if admitted {
                let legacy = self.legacy_injector(&head).is_some();
                let single = size == 1 && holds.len() == 1;
                let token = payload.messages.first().and_then(|m| match m {
                    Message::ToolCall(t) => t.progress_token.clone(),
                    _ => None,
                });
                if single && !legacy && accepts_sse(&head.headers) && token.is_some() {
                    if let (Some((_, _, owner, binding, wait)), Some(token)) = (holds.pop(), token)
                    {
                        let Some(id) = payload.messages[0].id().cloned() else {
                            return self.answer(&head, &payload, outcomes);
                        };
                        let is_tool = matches!(payload.messages[0], Message::ToolCall(_));
                        let key = sessions::held_key(
                            &self.conn.dst,
                            &server,
                            Some(&session_key),
                            &id.to_value(),
                        );
                        return self.hold_with_progress(
                            server, head, value, key, id, is_tool, token, owner, binding, wait,
                        );
                    }
                }
                if let Some(inject) = self.legacy_injector(&head) {
                    // Legacy transport: the POST is answered 202 at once (clients give
                    // POSTs a short timeout); the hold is resolved in the background
                    // and the answer, and any progress, arrive on the session's stream.
                    let this = self.clone();
                    tokio::spawn(async move {
                        for (i, _decision_id, owner, binding, wait) in holds {
                            let key = this.held_key_of(&server, &session_key, &payload.messages[i]);
                            let progress = match &payload.messages[i] {
                                Message::ToolCall(t) => t
                                    .progress_token
                                    .clone()
                                    .map(|tok| (tok, owner, binding, inject.clone())),
                                _ => None,
                            };
                            outcomes[i] = this.await_hold(key, wait, progress).await;
                        }
                        drop(
                            this.finish(&server, &head, &payload, &value, outcomes)
                                .await,
                        );
                    });
                    return empty_response(StatusCode::ACCEPTED);
                }
                for (i, _decision_id, owner, binding, wait) in holds {
                    let key = self.held_key_of(&server, &session_key, &payload.messages[i]);
                    tracing::info!(conn = self.conn.conn_id, %owner, %binding, "call held for approval");
                    outcomes[i] = self.await_hold(key, wait, None).await;
                }
            }
        }
        self.finish(&server, &head, &payload, &value, outcomes)
            .await
    }

    /// Every message decided: forward the canonical bytes if all were allowed,
    /// otherwise answer each request.
    async fn finish(
        &self,
        server: &str,
        head: &Head,
        payload: &Payload,
        value: &Value,
        outcomes: Vec<Outcome>,
    ) -> Response<ProxyBody> {
        let all_allowed = outcomes.iter().all(|o| !matches!(o, Outcome::Deny(_)));
        if all_allowed {
            let bytes = json::to_canonical_bytes(value);
            let proof = match self.proof(server, head, &bytes, &outcomes) {
                Ok(p) => p,
                Err(reason) => {
                    // Not sent: each request is answered with the reason
                    // (on the legacy session's stream, where it has one).
                    tracing::info!(conn = self.conn.conn_id, %reason, "request refused");
                    self.gov.refused(&self.conn, &reason);
                    let outcomes = outcomes
                        .into_iter()
                        .map(|o| match o {
                            Outcome::Allow(decision_id, _) => {
                                self.gov.not_forwarded(&decision_id);
                                Outcome::Deny(Denial::refusal(reason.clone()))
                            }
                            other => other,
                        })
                        .collect();
                    return self.answer(head, payload, outcomes);
                }
            };
            for o in &outcomes {
                if let Outcome::Allow(decision_id, _) = o {
                    self.gov.forwarded(decision_id);
                }
            }
            listed::sent(&self.scope(server, head), &payload.messages);
            let len = bytes.len();
            let answers = Answers {
                ids: payload
                    .messages
                    .iter()
                    .filter(|m| !matches!(m, Message::Response(_) | Message::Error(_)))
                    .filter_map(|m| m.id().map(Id::to_value))
                    .collect(),
                batch: payload.batch,
            };
            return self
                .forward(
                    server,
                    head,
                    body::full(bytes),
                    Some(len),
                    true,
                    true,
                    answers,
                    proof,
                )
                .await;
        }
        for o in &outcomes {
            if let Outcome::Allow(decision_id, _) = o {
                self.gov.not_forwarded(decision_id);
            }
        }
        self.answer(head, payload, outcomes)
    }

    fn held_key_of(&self, server: &str, session_key: &str, msg: &Message) -> String {
        let id = msg.id().map(|x| x.to_value()).unwrap_or(Value::Null);
        sessions::held_key(&self.conn.dst, server, Some(session_key), &id)
    }

    /// Wait for a held call's final ruling, or for the client to cancel it. With
    /// `progress` (token, owner, binding, legacy stream), `notifications/progress`
    /// is injected into the legacy session's stream meanwhile.
    async fn await_hold(
        &self,
        key: String,
        mut wait: super::governor::BoxFuture<'static, Ruling>,
        progress: Option<(Id, String, String, mpsc::Sender<Value>)>,
    ) -> Outcome {
        self.held.fetch_add(1, Ordering::AcqRel);
        let _count = HeldCount(self.held.clone());
        let Some((_guard, mut cancel)) = sessions::register_held(key) else {
            self.gov.refused(&self.conn, TOO_MANY_HELD);
            return Outcome::Deny(Denial::refusal(TOO_MANY_HELD));
        };
        let progress = progress.map(|(token, owner, binding, tx)| Progress {
            token,
            owner,
            binding,
            to: ProgressTo::Session(tx),
        });
        match self
            .hold_loop(&mut wait, &mut cancel, progress.as_ref())
            .await
        {
            Held::Ruled(outcome) => outcome,
            Held::Cancelled => Outcome::Deny(Denial::refusal("cancelled by the client while held")),
            // The session's stream is gone: nobody is waiting any more.
            Held::Gone => Outcome::Deny(Denial::refusal("the client went away while held")),
        }
    }

    /// The one wait of a held call, whatever the transport: until the
    /// governor rules, the client cancels (`notifications/cancelled`), or the
    /// client is gone; meanwhile progress notifications, when asked for.
    /// Returning without a ruling drops nothing: the caller drops `wait`,
    /// which tells the governor the call was given up.
    async fn hold_loop(
        &self,
        wait: &mut super::governor::BoxFuture<'static, Ruling>,
        cancel: &mut tokio::sync::oneshot::Receiver<()>,
        progress: Option<&Progress>,
    ) -> Held {
        let mut tick = tokio::time::interval(self.limits.progress_interval);
        let mut step = 0u64;
        let closed = async {
            match progress.map(|p| &p.to) {
                Some(ProgressTo::Stream(tx)) => tx.closed().await,
                _ => std::future::pending().await,
            }
        };
        tokio::pin!(closed);
        loop {
            tokio::select! {
                r = &mut *wait => return Held::Ruled(to_outcome(r)),
                _ = &mut *cancel => return Held::Cancelled,
                _ = &mut closed => return Held::Gone,
                _ = tick.tick(), if progress.is_some() => {
                    if let Some(p) = progress {
                        let note = deny::progress(&p.token, step, &p.owner, &p.binding);
                        let sent = match &p.to {
                            ProgressTo::Session(tx) => tx.send(note).await.is_ok(),
                            ProgressTo::Stream(tx) => stream::send_message(tx, &note).await,
                        };
                        if !sent {
                            return Held::Gone;
                        }
                        step += 1;
                    }
                }
            }
        }
    }

    fn legacy_injector(&self, head: &Head) -> Option<mpsc::Sender<Value>> {
        if head.method != Method::POST {
            return None;
        }
        let pq = head.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        sessions::legacy_injector(&stream::legacy_key(&self.conn.dst, pq))
    }

    /// Answer a request that is not forwarded: each request gets its denial, or the
    /// batch refusal when it was allowed but shares a batch with a denied call.
    fn answer(
        &self,
        head: &Head,
        payload: &Payload,
        outcomes: Vec<Outcome>,
    ) -> Response<ProxyBody> {
        let mut answers = Vec::new();
        for (msg, outcome) in payload.messages.iter().zip(outcomes) {
            let Some(id) = msg.id() else {
                continue;
            };
            if matches!(msg, Message::Response(_) | Message::Error(_)) {
                continue;
            }
            let is_tool = matches!(msg, Message::ToolCall(_));
            let shape = self.limits.deny_shape;
            answers.push(match outcome {
                Outcome::Deny(d) => deny::answer(shape, is_tool, id, &d),
                Outcome::Allow(decision, _) => deny::batch_refusal(shape, is_tool, id, &decision),
                Outcome::Pass => continue,
            });
        }
        if let Some(tx) = self.legacy_injector(head) {
            // Legacy transport: the server would answer 202 and send the response on
            // the session's SSE stream, so kya does the same.
            for a in answers {
                if tx.try_send(a).is_err() {
                    tracing::warn!(
                        conn = self.conn.conn_id,
                        "legacy SSE session full or gone; denial not injected"
                    );
                }
            }
            return empty_response(StatusCode::ACCEPTED);
        }
        if answers.is_empty() {
            return empty_response(StatusCode::ACCEPTED);
        }
        let body = if payload.batch {
            Value::Array(answers)
        } else {
            answers.swap_remove(0)
        };
        json_response(StatusCode::OK, &body)
    }

    #[allow(clippy::too_many_arguments)]
    fn hold_with_progress(
        self: Arc<Self>,
        server: String,
        head: Head,
        value: Value,
        key: String,
        id: Id,
        is_tool: bool,
        token: Id,
        owner: String,
        binding: String,
        mut wait: super::governor::BoxFuture<'static, Ruling>,
    ) -> Response<ProxyBody> {
        let (tx, out) = body::channel(16);
        self.held.fetch_add(1, Ordering::AcqRel);
        let count = HeldCount(self.held.clone());
        let registration = sessions::register_held(key);
        tokio::spawn(async move {
            let _count = count;
            let Some((_guard, mut cancel)) = registration else {
                self.gov.refused(&self.conn, TOO_MANY_HELD);
                let d = Denial::refusal(TOO_MANY_HELD);
                stream::last_message(tx, &deny::answer(self.limits.deny_shape, is_tool, &id, &d))
                    .await;
                return;
            };
            let progress = Progress {
                token,
                owner,
                binding,
                to: ProgressTo::Stream(tx.clone()),
            };
            let outcome = match self
                .hold_loop(&mut wait, &mut cancel, Some(&progress))
                .await
            {
                Held::Ruled(outcome) => outcome,
                Held::Cancelled => {
                    Outcome::Deny(Denial::refusal("cancelled by the client while held"))
                }
                // The client went away: dropping `wait` tells the governor.
                Held::Gone => return,
            };
            match outcome {
                Outcome::Deny(d) => {
                    stream::last_message(
                        tx,
                        &deny::answer(self.limits.deny_shape, is_tool, &id, &d),
                    )
                    .await;
                }
                allowed @ (Outcome::Allow(..) | Outcome::Pass) => {
                    self.forward_into_stream(&server, &head, &value, &id.to_value(), tx, &allowed)
                        .await
                }
            }
        });
        let mut r = Response::new(out);
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        r
    }

    /// After an approved hold (`outcome`): forward and deliver the server's
    /// answer as SSE events.
    async fn forward_into_stream(
        &self,
        server: &str,
        head: &Head,
        value: &Value,
        id: &Value,
        tx: body::BodyTx,
        outcome: &Outcome,
    ) {
        let fail = |reason: String| json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32603, "message": format!("kya: {reason}")}});
        let bytes = json::to_canonical_bytes(value);
        let proof = match self.proof(server, head, &bytes, std::slice::from_ref(outcome)) {
            Ok(p) => p,
            Err(reason) => {
                if let Outcome::Allow(decision_id, _) = outcome {
                    self.gov.not_forwarded(decision_id);
                }
                tracing::info!(conn = self.conn.conn_id, %reason, "request refused");
                self.gov.refused(&self.conn, &reason);
                stream::last_message(tx, &fail(reason)).await;
                return;
            }
        };
        if let Outcome::Allow(decision_id, _) = outcome {
            self.gov.forwarded(decision_id);
        }
        if let Ok(p) = jsonrpc::parse_payload(value, self.limits.max_batch) {
            listed::sent(&self.scope(server, head), &p.messages);
        }
        let len = bytes.len();
        let mut req = self.upstream_request(head, body::full(bytes), Some(len), true, proof);
        let target = self.broker_target(server, head, Some(len), true);
        let attached = match self.apply_broker(&target, req.headers_mut()).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(conn = self.conn.conn_id, reason = %e, "approved call not sent: no credential");
                self.gov.refused(&self.conn, &e);
                stream::last_message(tx, &fail(e)).await;
                return;
            }
        };
        let mut peer = self.peer(server, head);
        peer.secret = attached.as_ref().map(|a| a.secret.clone());
        let resp = match self.send_bounded(req).await {
            Ok(r) => r,
            Err(e) => {
                stream::last_message(tx, &fail(e.to_string())).await;
                return;
            }
        };
        Self::broker_answered(&target, attached, resp.status()).await;
        if is_sse(resp.headers()) {
            let url = self.absolute(head, server);
            stream::relay(peer, url, vec![id.clone()], resp.into_body(), tx, None).await;
            return;
        }
        let (parts, incoming) = resp.into_parts();
        let max = self.limits.max_response_body;
        let raw = body::read_bounded(incoming, max, self.limits.response_timeout)
            .await
            .map_err(|e| e.to_string())
            .and_then(|raw| {
                encoding::decode_body(
                    &parts.headers,
                    &raw,
                    usize::try_from(max).unwrap_or(usize::MAX),
                )
                .map_err(|e| e.to_string())
            })
            .and_then(|raw| match peer.echoed_secret(&raw) {
                Some(reason) => Err(reason),
                None => Ok(raw),
            });
        let raw = match raw {
            Ok(b) => b,
            Err(e) => {
                let reason = format!("server answer: {e}");
                tracing::warn!(conn = self.conn.conn_id, %reason, "server answer not delivered");
                self.gov.refused(&self.conn, &reason);
                stream::last_message(tx, &fail(reason)).await;
                return;
            }
        };
        match filter_server_data(&peer, &raw).await {
            Filtered::JsonRpc(Some(b)) => {
                if let Ok(v) = json::parse(&b, &self.limits.response_json()) {
                    stream::last_message(tx, &v).await;
                }
            }
            Filtered::Unchanged => {
                let text = raw.strip_prefix(b"\xef\xbb\xbf").unwrap_or(&raw);
                if let Ok(v) = json::parse(text, &self.limits.response_json()) {
                    stream::last_message(tx, &v).await;
                }
            }
            Filtered::JsonRpc(None) => {}
            Filtered::Opaque | Filtered::Refused(_) => {
                self.gov.refused(
                    &self.conn,
                    "server answer to an approved call is not JSON-RPC",
                );
                stream::last_message(tx, &fail("the server's answer was refused".into())).await;
            }
        }
    }

    /// Send `req` upstream and wait at most `response_timeout` for the
    /// answer's head. A server that never answers, or whose answer head is
    /// over `max_header_bytes`, is refused on record.
    /// Over HTTP/1.1 the upstream connection cannot carry another request
    /// and is taken for gone: the agent's connection is closed as it would
    /// be had the server closed its own (the request may have run). Over
    /// HTTP/2 only the stream is abandoned: the agent gets an error answer.
    async fn send_bounded(
        &self,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        match tokio::time::timeout(self.limits.response_timeout, self.upstream.send(req)).await {
            Ok(Err(e)) if e.head_too_large() => {
                self.refuse_answer(
                    &self.limits.refusals.response,
                    format!(
                        "the server's answer head is over {} bytes",
                        self.limits.max_header_bytes
                    ),
                );
                Err(e)
            }
            Ok(r) => r,
            Err(_) => {
                self.refuse_answer(
                    &self.limits.refusals.no_answer,
                    format!(
                        "the server sent no answer within {:?}",
                        self.limits.response_timeout
                    ),
                );
                if !self.upstream.is_h2() {
                    let _ = UPSTREAM_GONE.try_with(|g| g.set(true));
                }
                Err(UpstreamError::NoAnswer(self.limits.response_timeout))
            }
        }
    }

    /// A server answer given up on by a limit: counted, logged, on record.
    fn refuse_answer(&self, counter: &std::sync::atomic::AtomicU64, reason: String) {
        LimitRefusals::count(counter);
        tracing::info!(conn = self.conn.conn_id, %reason, "server answer refused");
        self.gov.refused(&self.conn, &reason);
    }

    /// The destination port the agent connected to (a followed tunnel's target).
    fn port(&self) -> u16 {
        self.conn
            .tunnel
            .as_ref()
            .map_or(self.conn.dst.port(), |t| t.port)
    }

    /// The absolute URL of a request (the base for legacy `endpoint` resolution).
    fn absolute(&self, head: &Head, server: &str) -> Option<Uri> {
        let scheme = if self.conn.tls { "https" } else { "http" };
        let authority = head
            .uri
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| header_str(&head.headers, "host").map(str::to_string))
            .unwrap_or_else(|| server.to_string());
        let pq = head.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        format!("{scheme}://{authority}{pq}").parse().ok()
    }

    /// The `Kya-Decision` header for a request to `server` carrying `body`
    /// (the messages decided in it: `outcomes`), when the server asked for
    /// proofs. `Err`: the request must not go; the reason is for the agent
    /// (the caller refuses on record).
    fn proof(
        &self,
        server: &str,
        head: &Head,
        body: &[u8],
        outcomes: &[Outcome],
    ) -> Result<Option<HeaderValue>, String> {
        if !self.gov.proof_wanted(server) {
            return Ok(None);
        }
        let mut calls = Vec::with_capacity(outcomes.len());
        for o in outcomes {
            if let Outcome::Allow(decision_id, grant) = o {
                let Some(grant) = grant else {
                    return Err(format!(
                        "no proof of decision for {server}: decision {decision_id} has no grant"
                    ));
                };
                calls.push((decision_id.as_str(), grant.as_ref()));
            }
        }
        let request = ProofRequest {
            conn: &self.conn,
            server,
            method: head.method.as_str(),
            path: upstream_path(head),
            body,
            calls,
        };
        self.gov
            .prove(&request)
            .map(Some)
            .map_err(|e| format!("no proof of decision for {server}: {e}"))
    }

    /// What the credential broker needs to know of a request to `server`.
    fn broker_target<'a>(
        &self,
        server: &'a str,
        head: &'a Head,
        len: Option<usize>,
        decided: bool,
    ) -> broker::Target<'a> {
        broker::Target {
            server,
            port: self.port(),
            method: &head.method,
            path: head.uri.path(),
            tls: self.conn.tls,
            decided,
            bodyless: len.is_none_or(|n| n == 0),
        }
    }

    /// Credentials kya holds for the server: the agent's own removed from
    /// `headers`, kya's attached to decided requests. Returns who it was
    /// attached for, to renew one the server refuses; an error means the
    /// request must not be sent.
    async fn apply_broker(
        &self,
        target: &broker::Target<'_>,
        headers: &mut http::HeaderMap,
    ) -> Result<Option<Attached>, String> {
        let Some(broker) = self.gov.broker() else {
            return Ok(None);
        };
        let actor = self.gov.actor(&self.conn);
        match broker.apply(target, &actor, headers).await {
            Ok(broker::Applied::Attached { source, secret }) => {
                tracing::debug!(conn = self.conn.conn_id, server = %target.server, %source, "credential attached");
                Ok(Some(Attached {
                    broker,
                    actor,
                    secret,
                }))
            }
            Ok(broker::Applied::NotBrokered | broker::Applied::Withheld) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The server answered a request kya attached a credential to: a `401`
    /// makes the broker forget it.
    async fn broker_answered(
        target: &broker::Target<'_>,
        attached: Option<Attached>,
        status: StatusCode,
    ) {
        if let Some(a) = attached {
            if status == StatusCode::UNAUTHORIZED {
                a.broker.rejected(target, &a.actor).await;
            }
        }
    }

    fn upstream_request(
        &self,
        head: &Head,
        body: ProxyBody,
        len: Option<usize>,
        rewritten: bool,
        proof: Option<HeaderValue>,
    ) -> Request<ProxyBody> {
        // A proof header from the agent never reaches any server: only kya
        // writes one.
        let mut drop: Vec<&str> = vec![
            "content-length",
            "accept-encoding",
            crate::credential::header::HEADER_NAME,
        ];
        if rewritten {
            drop.push("content-encoding");
        }
        let mut headers = end_to_end(&head.headers, &drop);
        if let Some(n) = len {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        if let Some(p) = proof {
            headers.insert(crate::credential::header::HEADER_NAME, p);
        }
        let uri = if self.upstream.is_h2() {
            self.absolute(head, "localhost")
                .unwrap_or_else(|| head.uri.clone())
        } else {
            upstream_path(head)
                .parse()
                .unwrap_or_else(|_| Uri::from_static("/"))
        };
        if self.upstream.is_h2() {
            headers.remove(header::HOST);
        }
        let mut req = Request::new(body);
        *req.method_mut() = head.method.clone();
        *req.uri_mut() = uri;
        *req.version_mut() = if self.upstream.is_h2() {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        *req.headers_mut() = headers;
        req
    }

    /// Forward a request and relay (and judge) the server's answer. `decided`
    /// says the body is the canonical bytes of JSON-RPC messages that were all
    /// decided and allowed; `mcp` says the exchange is MCP, so JSON answers are
    /// read whole and judged; `answers` are the JSON-RPC requests the answer answers.
    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        server: &str,
        head: &Head,
        body: ProxyBody,
        len: Option<usize>,
        decided: bool,
        mcp: bool,
        answers: Answers,
        proof: Option<HeaderValue>,
    ) -> Response<ProxyBody> {
        let mut req = self.upstream_request(head, body, len, decided, proof);
        let target = self.broker_target(server, head, len, decided);
        let attached = match self.apply_broker(&target, req.headers_mut()).await {
            Ok(a) => a,
            Err(e) => return self.undeliverable(head, &answers, &e),
        };
        let resp = match self.send_bounded(req).await {
            Ok(r) => r,
            Err(e @ UpstreamError::Gone(_)) => {
                tracing::info!(conn = self.conn.conn_id, error = %e, "upstream connection ended under a request; closing the agent's");
                let _ = UPSTREAM_GONE.try_with(|g| g.set(true));
                return empty_response(StatusCode::BAD_GATEWAY);
            }
            Err(e) => {
                tracing::info!(conn = self.conn.conn_id, error = %e, "upstream request failed");
                return json_response(
                    StatusCode::BAD_GATEWAY,
                    &json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32603, "message": format!("kya: {e}")}}),
                );
            }
        };
        let (parts, incoming) = resp.into_parts();
        let secret = attached.as_ref().map(|a| a.secret.clone());
        Self::broker_answered(&target, attached, parts.status).await;
        // The server ends the connection after this answer: so does kya's
        // agent side (HTTP/2 has no such header; GOAWAY follows from the driver).
        let closing = head.version == Version::HTTP_11 && closes_connection(&parts);
        let mut r = self
            .relay_answer(server, head, parts, incoming, mcp, answers, secret)
            .await;
        if closing {
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }

    /// `secret`: the credential kya attached to the request (an answer that
    /// carries it is not delivered; every answer is then read whole or
    /// judged event by event).
    #[allow(clippy::too_many_arguments)]
    async fn relay_answer(
        &self,
        server: &str,
        head: &Head,
        parts: http::response::Parts,
        incoming: Incoming,
        mcp: bool,
        answers: Answers,
        secret: Option<broker::Secret>,
    ) -> Response<ProxyBody> {
        let mut peer = self.peer(server, head);
        peer.secret = secret;
        let ct = header_str(&parts.headers, "content-type");
        if is_sse(&parts.headers) {
            if parts
                .headers
                .get(header::CONTENT_ENCODING)
                .is_some_and(|e| !e.as_bytes().eq_ignore_ascii_case(b"identity"))
            {
                return self.refuse_http(
                    StatusCode::BAD_GATEWAY,
                    head.version,
                    "compressed event stream from the server",
                );
            }
            if let Some(charset) = inspect::foreign_response_charset(ct) {
                // A client honouring the charset could read events kya reads otherwise.
                return self.refuse_http(
                    StatusCode::BAD_GATEWAY,
                    head.version,
                    &format!(
                        "event stream from the server in charset {charset:?}: only UTF-8 is judged"
                    ),
                );
            }
            let (tx, out) = body::channel(16);
            let url = self.absolute(head, server);
            // The events that came with the head are judged and queued first,
            // so the agent gets head and events in one write, as directly;
            // a judgment that takes longer (a held server request) does not
            // hold the head back for more than `FIRST_EVENTS_WAIT`.
            let (started, first_queued) = tokio::sync::oneshot::channel();
            tokio::spawn(stream::relay(
                peer,
                url,
                answers.ids,
                incoming,
                tx,
                Some(started),
            ));
            let _ = tokio::time::timeout(FIRST_EVENTS_WAIT, first_queued).await;
            let mut r = Response::new(out);
            *r.status_mut() = parts.status;
            *r.headers_mut() = end_to_end(&parts.headers, &["content-length"]);
            return r;
        }
        let declared_json = inspect::declares_json(ct);
        let judged = mcp && (declared_json || !incoming.is_end_stream());
        if !judged && peer.secret.is_none() {
            let mut r = Response::new(body::stream(incoming));
            *r.status_mut() = parts.status;
            *r.headers_mut() = end_to_end(&parts.headers, &[]);
            return r;
        }
        // An MCP exchange: read the answer whole (bounded), decode, judge.
        let max = self.limits.max_response_body;
        let raw = match body::read_bounded(incoming, max, self.limits.response_timeout).await {
            Ok(b) => b,
            Err(e) => {
                if matches!(e, ReadError::TooLarge(_) | ReadError::TimedOut(_)) {
                    LimitRefusals::count(&self.limits.refusals.response);
                }
                return self.undeliverable(head, &answers, &format!("server answer: {e}"));
            }
        };
        let decoded = match encoding::decode_body(
            &parts.headers,
            &raw,
            usize::try_from(max).unwrap_or(usize::MAX),
        ) {
            Ok(d) => d,
            Err(e) => return self.undeliverable(head, &answers, &format!("server answer: {e}")),
        };
        if let Some(reason) = peer.echoed_secret(&decoded) {
            return self.undeliverable(head, &answers, &reason);
        }
        if !judged {
            // Read only to look for the credential: the server's bytes, unchanged.
            let mut r = Response::new(body::full(raw));
            *r.status_mut() = parts.status;
            *r.headers_mut() = end_to_end(&parts.headers, &[]);
            return r;
        }
        if inspect::looks_like_json(&decoded) {
            if let Some(charset) = inspect::foreign_response_charset(ct) {
                return self.undeliverable(
                    head,
                    &answers,
                    &format!("server answer is JSON in charset {charset:?}: only UTF-8 is judged"),
                );
            }
        }
        let (new_body, rewritten) = match filter_server_data(&peer, &decoded).await {
            // Nothing a client acts on as JSON-RPC, or JSON-RPC judged and
            // delivered whole: the server's bytes, unchanged.
            Filtered::Opaque | Filtered::Unchanged => (raw, false),
            Filtered::JsonRpc(Some(b)) => (Bytes::from(b), true),
            Filtered::JsonRpc(None) => (Bytes::new(), true),
            Filtered::Refused(reason) => {
                return self.refuse_http(StatusCode::BAD_GATEWAY, head.version, &reason)
            }
        };
        let drop: &[&str] = if rewritten {
            &["content-length", "content-encoding"]
        } else {
            &["content-length"]
        };
        let mut headers = end_to_end(&parts.headers, drop);
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(new_body.len()));
        let mut r = Response::new(body::full(new_body));
        *r.status_mut() = parts.status;
        *r.headers_mut() = headers;
        r
    }

    /// The server's answer cannot be delivered (over a limit, undecodable):
    /// audited, and each request it answers gets a JSON-RPC error at once (an
    /// HTTP error when there is no request id to answer).
    fn undeliverable(&self, head: &Head, answers: &Answers, reason: &str) -> Response<ProxyBody> {
        if answers.ids.is_empty() {
            return self.refuse_http(StatusCode::BAD_GATEWAY, head.version, reason);
        }
        tracing::warn!(conn = self.conn.conn_id, %reason, "server answer not delivered; the agent gets an error");
        self.gov.refused(&self.conn, reason);
        let mut errors: Vec<Value> = answers
            .ids
            .iter()
            .map(|id| stream::undeliverable(id, reason))
            .collect();
        let body = if answers.batch {
            Value::Array(errors)
        } else {
            errors.swap_remove(0)
        };
        json_response(StatusCode::OK, &body)
    }
}

/// A credential the broker attached to a request, and for whom.
struct Attached {
    broker: Arc<broker::Broker>,
    actor: broker::oauth::Actor,
    /// What the server must not hand back to the agent.
    secret: broker::Secret,
}

/// The path (with query) a request goes upstream with, as a server sees it.
fn upstream_path(head: &Head) -> &str {
    head.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
}

/// Whether the server ends its connection after this response.
fn closes_connection(parts: &http::response::Parts) -> bool {
    let tokens = || {
        parts
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
    };
    if tokens().any(|t| t == "close") {
        return true;
    }
    parts.version == Version::HTTP_10 && !tokens().any(|t| t == "keep-alive")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(version: Version, connection: &[&[u8]]) -> http::response::Parts {
        let mut r = Response::new(());
        *r.version_mut() = version;
        for v in connection {
            if let Ok(v) = HeaderValue::from_bytes(v) {
                r.headers_mut().append(header::CONNECTION, v);
            }
        }
        r.into_parts().0
    }

    #[test]
    fn which_answers_end_the_servers_connection() {
        let h11 = Version::HTTP_11;
        assert!(closes_connection(&parts(h11, &[b"close"])));
        assert!(closes_connection(&parts(h11, &[b"Keep-Alive, CLOSE"])));
        assert!(closes_connection(&parts(h11, &[b"upgrade", b" close "])));
        assert!(!closes_connection(&parts(h11, &[])));
        assert!(!closes_connection(&parts(h11, &[b"keep-alive"])));
        assert!(!closes_connection(&parts(h11, &[b"closed", b"x-close"])));
        // Not visible ASCII: not a token kya can read, and not a close.
        assert!(!closes_connection(&parts(h11, &[b"cl\xffose"])));
        // HTTP/1.0 closes unless it says keep-alive.
        let h10 = Version::HTTP_10;
        assert!(closes_connection(&parts(h10, &[])));
        assert!(!closes_connection(&parts(h10, &[b"keep-alive"])));
        assert!(closes_connection(&parts(h10, &[b"keep-alive, close"])));
    }
}
