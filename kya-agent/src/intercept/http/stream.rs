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
use hyper::body::Incoming;
use serde_json::Value;
use tokio::sync::mpsc;

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
pub(crate) async fn send_message(out: &mpsc::Sender<Bytes>, message: &Value) -> bool {
    let data = String::from_utf8_lossy(&json::to_canonical_bytes(message)).into_owned();
    send_event(out, SseEvent::message(data)).await
}

async fn send_event(out: &mpsc::Sender<Bytes>, event: SseEvent) -> bool {
    match sse::encode(&SseItem::Event(event)) {
        Ok(bytes) => out.send(Bytes::from(bytes)).await.is_ok(),
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
    mut peer: Peer,
    sse_url: Option<Uri>,
    ids: Vec<Value>,
    mut upstream: Incoming,
    out: mpsc::Sender<Bytes>,
) {
    let mut parser = SseParser::new(peer.limits.sse());
    let mut legacy: Option<(sessions::LegacyGuard, mpsc::Receiver<Value>)> = None;
    loop {
        let injected = async {
            match legacy.as_mut() {
                Some((_, rx)) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            frame = upstream.frame() => {
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
                            tracing::debug!(conn = peer.conn.conn_id, error = %e, "upstream SSE stream failed");
                            ended = true;
                            break;
                        }
                        Some(Ok(f)) => f.into_data().unwrap_or_default(),
                    };
                    let items = match parser.push(&chunk) {
                        Ok(items) => items,
                        Err(e) => {
                            // An oversize or non-UTF-8 event: stop relaying rather than
                            // pass something uninspected, and say so at once.
                            let reason = format!("server event stream refused: {e}");
                            tracing::warn!(conn = peer.conn.conn_id, %reason, requests = ids.len(), "event stream ended by kya");
                            peer.gov.refused(&peer.conn, &reason);
                            if !batch.is_empty() && out.send(Bytes::from(batch)).await.is_err() {
                                return;
                            }
                            for id in &ids {
                                if !send_message(&out, &undeliverable(id, &reason)).await {
                                    break;
                                }
                            }
                            return;
                        }
                    };
                    for item in items {
                        forward_item(&mut peer, sse_url.as_ref(), &mut legacy, item, &mut batch).await;
                    }
                    // Gathering is bounded: a server that never pauses still
                    // reaches the agent in pieces, and kya holds no more of it.
                    if batch.len() < MAX_BATCH_BYTES {
                        next = next_ready(&mut upstream).await;
                    }
                }
                if !batch.is_empty() && out.send(Bytes::from(batch)).await.is_err() {
                    return;
                }
                if ended {
                    return;
                }
            }
            msg = injected => {
                match msg {
                    Some(m) => if !send_message(&out, &m).await { return },
                    None => legacy = None,
                }
            }
            _ = out.closed() => return,
        }
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
    for _ in 0..3 {
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
