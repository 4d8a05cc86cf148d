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
                let chunk = match frame {
                    None => break,
                    Some(Err(e)) => {
                        tracing::debug!(conn = peer.conn.conn_id, error = %e, "upstream SSE stream failed");
                        break;
                    }
                    Some(Ok(f)) => match f.into_data() {
                        Ok(d) => d,
                        Err(_) => continue,
                    },
                };
                let items = match parser.push(&chunk) {
                    Ok(items) => items,
                    Err(e) => {
                        // An oversize or non-UTF-8 event: stop relaying rather than
                        // pass something uninspected, and say so at once.
                        let reason = format!("server event stream refused: {e}");
                        tracing::warn!(conn = peer.conn.conn_id, %reason, requests = ids.len(), "event stream ended by kya");
                        peer.gov.refused(&peer.conn, &reason);
                        for id in &ids {
                            if !send_message(&out, &undeliverable(id, &reason)).await {
                                break;
                            }
                        }
                        break;
                    }
                };
                for item in items {
                    if !forward_item(&mut peer, sse_url.as_ref(), &mut legacy, item, &out).await {
                        return;
                    }
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

async fn forward_item(
    peer: &mut Peer,
    sse_url: Option<&Uri>,
    legacy: &mut Option<(sessions::LegacyGuard, mpsc::Receiver<Value>)>,
    item: SseItem,
    out: &mpsc::Sender<Bytes>,
) -> bool {
    let SseItem::Event(mut event) = item else {
        // Comments (keep-alives) carry nothing to judge.
        return match sse::encode(&item) {
            Ok(b) => out.send(Bytes::from(b)).await.is_ok(),
            Err(_) => true,
        };
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
            return true; // not delivered: the client never learns a URL kya cannot govern
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
                return true;
            }
        }
        return send_event(out, event).await;
    }
    let Some(data) = event.data.clone() else {
        return send_event(out, event).await;
    };
    match filter_server_data(peer, data.as_bytes()).await {
        Filtered::Opaque | Filtered::Unchanged => send_event(out, event).await,
        Filtered::JsonRpc(None) => true,
        Filtered::JsonRpc(Some(bytes)) => {
            event.data = Some(String::from_utf8_lossy(&bytes).into_owned());
            send_event(out, event).await
        }
        Filtered::Refused(reason) => {
            peer.gov.refused(&peer.conn, &reason);
            true
        }
    }
}
