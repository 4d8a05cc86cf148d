//! Relaying a server's `text/event-stream` to the agent, event by event.
//!
//! Each event is parsed (bounded), its data judged by [`filter`](super::filter), and
//! the event re-encoded, so the agent sees exactly the events that were inspected.
//! The relay is also where the legacy HTTP+SSE transport lives: an `endpoint`
//! event registers the session's message URL, and denials of POSTs to that URL are
//! injected into this stream (the POST itself is answered 202, as the server would).

use bytes::Bytes;
use http::Uri;
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use super::body::BodyTx;

use crate::mcp::json;
use crate::mcp::sse::{self, SseEvent, SseItem, SseParser};

use super::filter::{filter_server_data, Filtered, Peer};
use super::listed;
use super::sessions;

/// The key of a legacy session's message URL.
pub(crate) fn legacy_key(dst: &std::net::SocketAddr, path_and_query: &str) -> String {
    format!("{dst}|{path_and_query}")
}

/// Write one JSON-RPC message to the agent as an SSE `message` event.
pub(crate) async fn send_message(out: &BodyTx, message: &Value) -> bool {
    let data = String::from_utf8_lossy(&json::to_canonical_bytes(message)).into_owned();
    send_event(out, SseEvent::message(data)).await
}

/// [`send_message`] as the last event of the response: the agent gets it and
/// the end together.
pub(crate) async fn last_message(out: BodyTx, message: &Value) -> bool {
    let data = String::from_utf8_lossy(&json::to_canonical_bytes(message)).into_owned();
    match sse::encode(&SseItem::Event(SseEvent::message(data))) {
        Ok(bytes) => out.finish(Bytes::from(bytes)).await,
        Err(e) => {
            tracing::warn!(error = %e, "could not encode an SSE event");
            true
        }
    }
}

async fn send_event(out: &BodyTx, event: SseEvent) -> bool {
    match sse::encode(&SseItem::Event(event)) {
        Ok(bytes) => out.send(Bytes::from(bytes)).await,
        Err(e) => {
            tracing::warn!(error = %e, "could not encode an SSE event");
            true
        }
    }
}

/// The JSON-RPC error a request gets when kya cannot deliver the server's answer.
pub(crate) fn undeliverable(id: &Value, reason: &str) -> Value {
    serde_json::json!({
        "jsonrpc": "2.0",
        "id": id,
        "error": {"code": -32603, "message": format!("kya: the server's answer was not delivered: {reason}")},
    })
}

/// Relay `upstream` into `out` until either side ends. `sse_url` is the absolute
/// URL of the stream (the base an `endpoint` event resolves against); `ids` are
/// the requests the stream answers (a POST's): when kya must stop relaying (an
/// event over the limit, not UTF-8), each gets a JSON-RPC error at once instead
/// of waiting for an answer that will never come, and the stream ends.
///
/// What the server sent together reaches the agent together: the events of
/// every frame already received are judged and handed to the body as one
/// piece, and when the server's stream has ended by then the channel closes
/// with it, so the agent gets the last events and the end of the response in
/// one write, as it would directly (a client may act on an event before it has
/// read an end that arrives separately, and find the connection still busy).
pub(crate) async fn relay(
    peer: Peer,
    sse_url: Option<Uri>,
    ids: Vec<Value>,
    upstream: Incoming,
    out: BodyTx,
    started: Option<oneshot::Sender<()>>,
) {
    let mut r = Relay {
        parser: SseParser::new(peer.limits.sse()),
        peer,
        sse_url,
        ids,
        upstream,
        out,
        legacy: None,
    };
    // What the server sent with its answer's head is judged and queued
    // before that head goes to the agent, so both leave in one write.
    let first = next_ready(&mut r.upstream).await;
    let go_on = match first {
        Some(frame) => r.frames(frame).await,
        None => true,
    };
    if let Some(started) = started {
        let _ = started.send(());
    }
    if !go_on {
        return;
    }
    loop {
        let injected = async {
            match r.legacy.as_mut() {
                Some((_, rx)) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            frame = r.upstream.frame() => {
                if !r.frames(frame).await {
                    return;
                }
            }
            msg = injected => {
                match msg {
                    Some(m) => if !send_message(&r.out, &m).await { return },
                    None => r.legacy = None,
                }
            }
            _ = r.out.closed() => return,
        }
    }
}

/// One relayed event stream.
struct Relay {
    peer: Peer,
    sse_url: Option<Uri>,
    /// The requests the stream answers.
    ids: Vec<Value>,
    upstream: Incoming,
    out: BodyTx,
    parser: SseParser,
    legacy: Option<(sessions::LegacyGuard, mpsc::Receiver<Value>)>,
}

impl Relay {
    /// Judge `frame` and every frame already there after it, and hand what
    /// the agent gets of them over as one piece (with the end of the
    /// response, when the server's stream ended among them). False: the
    /// relay is over.
    async fn frames(
        &mut self,
        frame: Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>,
    ) -> bool {
        let mut batch = Vec::new();
        let mut next = Some(frame);
        let mut ended = false;
        while let Some(frame) = next.take() {
            let chunk = match frame {
                None => {
                    ended = true;
                    break;
                }
                Some(Err(e)) => {
                    tracing::debug!(conn = self.peer.conn.conn_id, error = %e, "upstream SSE stream failed");
                    ended = true;
                    break;
                }
                Some(Ok(f)) => f.into_data().unwrap_or_default(),
            };
            let parsed = self.parser.push(&chunk).map_err(|e| {
                // An oversize or non-UTF-8 event: stop relaying rather than
                // pass something uninspected.
                if matches!(e, crate::mcp::sse::SseError::EventTooLarge { .. }) {
                    super::load::LimitRefusals::count(&self.peer.limits.refusals.sse_event);
                }
                e.to_string()
            });
            // An event that hands back the credential kya attached to the
            // request (credential brokering) ends the stream the same way.
            let items = parsed.and_then(|items| {
                let echoed = items.iter().find_map(|item| match item {
                    SseItem::Event(ev) => ev
                        .data
                        .as_deref()
                        .and_then(|d| self.peer.echoed_secret(d.as_bytes())),
                    _ => None,
                });
                echoed.map_or(Ok(items), Err)
            });
            let items = match items {
                Ok(items) => items,
                Err(why) => {
                    // Say so at once, to every request the stream answers.
                    let reason = format!("server event stream refused: {why}");
                    tracing::warn!(conn = self.peer.conn.conn_id, %reason, requests = self.ids.len(), "event stream ended by kya");
                    self.peer.gov.refused(&self.peer.conn, &reason);
                    if !batch.is_empty() && !self.out.send(Bytes::from(batch)).await {
                        return false;
                    }
                    for id in &self.ids {
                        if !send_message(&self.out, &undeliverable(id, &reason)).await {
                            break;
                        }
                    }
                    return false;
                }
            };
            for item in items {
                forward_item(
                    &mut self.peer,
                    self.sse_url.as_ref(),
                    &mut self.legacy,
                    item,
                    &mut batch,
                )
                .await;
            }
            // A body of known length says it has ended with its last
            // byte, without waiting for a frame that says so.
            if self.upstream.is_end_stream() {
                ended = true;
                break;
            }
            // Gathering is bounded: a server that never pauses still
            // reaches the agent in pieces, and kya holds no more of it.
            if batch.len() < MAX_BATCH_BYTES {
                next = next_ready(&mut self.upstream).await;
            }
        }
        if ended {
            // The last events and the end of the response together.
            if !batch.is_empty() {
                self.out.clone().finish(Bytes::from(batch)).await;
            }
            return false;
        }
        batch.is_empty() || self.out.send(Bytes::from(batch)).await
    }
}

/// The most judged bytes gathered before they are handed to the agent's
/// body (one event larger than this still goes whole).
const MAX_BATCH_BYTES: usize = 64 * 1024;

/// The server's next frame if it has already arrived: hyper's connection task
/// hands the body over one frame at a time, once the relay asks for the next,
/// so give that task a turn (a yield, not a wait) before concluding that
/// nothing more is there.
async fn next_ready(
    upstream: &mut Incoming,
) -> Option<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
    for _ in 0..8 {
        if let Some(f) = ready_now(upstream.frame()).await {
            return Some(f);
        }
        tokio::task::yield_now().await;
    }
    ready_now(upstream.frame()).await
}

/// `fut`'s output if it is ready at the first poll, else `None` (and `fut` is
/// dropped: reading a frame is cancel-safe).
async fn ready_now<F: std::future::Future>(fut: F) -> Option<F::Output> {
    tokio::select! {
        biased;
        v = fut => Some(v),
        () = std::future::ready(()) => None,
    }
}

/// Judge one item and append what the agent gets of it to `batch`.
async fn forward_item(
    peer: &mut Peer,
    sse_url: Option<&Uri>,
    legacy: &mut Option<(sessions::LegacyGuard, mpsc::Receiver<Value>)>,
    item: SseItem,
    batch: &mut Vec<u8>,
) {
    let SseItem::Event(mut event) = item else {
        // Comments (keep-alives) carry nothing to judge.
        append(batch, &item);
        return;
    };
    if event.event_type() == "endpoint" {
        let data = event.data.clone().unwrap_or_default();
        let resolved = sse_url.ok_or(()).and_then(|base| {
            sse::resolve_endpoint(base, data.trim()).map_err(|e| {
                peer.gov
                    .refused(&peer.conn, &format!("legacy SSE endpoint refused: {e}"));
            })
        });
        let Ok(url) = resolved else {
            return; // not delivered: the client never learns a URL kya cannot govern
        };
        let pq = url.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        match sessions::register_legacy(legacy_key(&peer.conn.dst, pq)) {
            Some(reg) => {
                *legacy = Some(reg);
                // The session's answers come on this stream, to the requests
                // POSTed to its message URL.
                let session = listed::client_session(None, peer.conn.process.pid, pq);
                peer.scope = listed::scope(&peer.conn.dst, &peer.server, &session);
            }
            None => {
                peer.gov.refused(&peer.conn, "too many legacy SSE sessions");
                return;
            }
        }
        append(batch, &SseItem::Event(event));
        return;
    }
    let Some(data) = event.data.clone() else {
        append(batch, &SseItem::Event(event));
        return;
    };
    match filter_server_data(peer, data.as_bytes()).await {
        Filtered::Opaque | Filtered::Unchanged => append(batch, &SseItem::Event(event)),
        Filtered::JsonRpc(None) => {}
        Filtered::JsonRpc(Some(bytes)) => {
            event.data = Some(String::from_utf8_lossy(&bytes).into_owned());
            append(batch, &SseItem::Event(event));
        }
        Filtered::Refused(reason) => peer.gov.refused(&peer.conn, &reason),
    }
}

/// Encode `item` onto `batch`.
fn append(batch: &mut Vec<u8>, item: &SseItem) {
    match sse::encode(item) {
        Ok(bytes) => batch.extend_from_slice(&bytes),
        Err(e) => tracing::warn!(error = %e, "could not encode an SSE event"),
    }
}
