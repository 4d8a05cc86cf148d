//! The ping-mode notification endpoint (CIBA Core 10.2).
//!
//! kya serves HTTPS with a leaf minted by its own CA for the host of the
//! configured `ping_url` (the provider must trust kya's CA). The provider
//! POSTs `{"auth_req_id": ...}` with `Authorization: Bearer
//! <client_notification_token>`. A notification only *wakes* the task of the
//! matching pending request, which then fetches the token from the token
//! endpoint and verifies the ID token like in poll mode: a notification never
//! answers anything by itself, so a forged one can at most cause one token
//! request.
//!
//! Tokens are 256-bit random values, one per request. The registry is keyed by
//! the token's SHA-256 (a lookup leaks nothing useful about a token's bytes)
//! and the stored token is then compared in constant time. Unknown tokens get
//! 401, other paths 404, other methods 405, bad bodies 400; a known token
//! whose `auth_req_id` is not its request's is ignored (204, nothing woken).

use crate::ca::LeafName;
use crate::tls::terminate::Terminator;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};

/// Largest notification body read.
pub(crate) const MAX_NOTIFICATION: usize = 4096;
/// Concurrent connections served.
pub(crate) const MAX_CONNECTIONS: usize = 64;
/// Time for a whole connection (handshake, request, response).
pub(crate) const CONNECTION_TIMEOUT: Duration = Duration::from_secs(20);

type Key = [u8; 32];

struct Slot {
    token: String,
    tx: mpsc::Sender<String>,
}

/// Pending requests waiting for a notification.
#[derive(Default)]
pub(crate) struct PingRegistry {
    slots: Mutex<HashMap<Key, Slot>>,
}

/// A registration: receives the `auth_req_id`s notified for its token;
/// unregisters on drop.
pub(crate) struct PingWait {
    key: Key,
    registry: Arc<PingRegistry>,
    pub rx: mpsc::Receiver<String>,
}

impl Drop for PingWait {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.key);
    }
}

/// Outcome of one notification, as the endpoint answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Notified {
    Woken,
    UnknownToken,
}

/// Constant-time equality of two byte strings (length is not secret).
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A fresh client notification token: 256 random bits, base64url.
pub(crate) fn new_token() -> String {
    use base64::Engine;
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl PingRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Register `token` before the authentication request is sent (a fast
    /// human could otherwise be notified about before kya listens).
    pub(crate) fn register(self: &Arc<Self>, token: &str) -> PingWait {
        let key: Key = Sha256::digest(token.as_bytes()).into();
        let (tx, rx) = mpsc::channel(4);
        self.lock().insert(
            key,
            Slot {
                token: token.to_string(),
                tx,
            },
        );
        PingWait {
            key,
            registry: self.clone(),
            rx,
        }
    }

    /// Deliver a notification.
    pub(crate) fn notify(&self, token: &str, auth_req_id: &str) -> Notified {
        let key: Key = Sha256::digest(token.as_bytes()).into();
        let map = self.lock();
        match map.get(&key) {
            Some(slot) if ct_eq(slot.token.as_bytes(), token.as_bytes()) => {
                // A full queue means the task has wake-ups pending already.
                let _ = slot.tx.try_send(auth_req_id.chars().take(1024).collect());
                Notified::Woken
            }
            _ => Notified::UnknownToken,
        }
    }

    /// Registered requests.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn reply(status: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = status;
    r
}

/// Handle one request to the endpoint.
pub(crate) async fn handle(
    req: Request<Incoming>,
    path: &str,
    registry: &PingRegistry,
) -> Response<Full<Bytes>> {
    if req.uri().path() != path {
        return reply(StatusCode::NOT_FOUND);
    }
    if req.method() != Method::POST {
        return reply(StatusCode::METHOD_NOT_ALLOWED);
    }
    let token = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .filter(|t| !t.is_empty() && t.len() <= 1024)
        .map(str::to_string);
    let Some(token) = token else {
        return reply(StatusCode::UNAUTHORIZED);
    };
    let body = match Limited::new(req.into_body(), MAX_NOTIFICATION)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => return reply(StatusCode::PAYLOAD_TOO_LARGE),
    };
    #[derive(serde::Deserialize)]
    struct Body {
        auth_req_id: String,
    }
    let Ok(b) = serde_json::from_slice::<Body>(&body) else {
        return reply(StatusCode::BAD_REQUEST);
    };
    match registry.notify(&token, &b.auth_req_id) {
        Notified::Woken => reply(StatusCode::NO_CONTENT),
        Notified::UnknownToken => {
            tracing::warn!("CIBA ping with an unknown notification token refused");
            reply(StatusCode::UNAUTHORIZED)
        }
    }
}

/// Serve the endpoint on `listener` until the task is aborted.
pub(crate) async fn serve(
    listener: TcpListener,
    terminator: Terminator,
    name: LeafName,
    path: String,
    registry: Arc<PingRegistry>,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let path: Arc<str> = path.into();
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "CIBA ping endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "CIBA ping endpoint: too many connections; dropping one");
            continue;
        };
        let config = match terminator.server_config(&name, Some(b"http/1.1")) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "CIBA ping endpoint: no certificate");
                continue;
            }
        };
        let registry = registry.clone();
        let path = path.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let work = async {
                let tls = match tokio_rustls::TlsAcceptor::from(config).accept(tcp).await {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "CIBA ping endpoint: TLS handshake failed");
                        return;
                    }
                };
                let service = hyper::service::service_fn(|req| {
                    let registry = registry.clone();
                    let path = path.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(req, &path, &registry).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .max_buf_size(16 * 1024)
                    .serve_connection(TokioIo::new(tls), service);
                if let Err(e) = conn.await {
                    tracing::debug!(%peer, error = %e, "CIBA ping endpoint: connection error");
                }
            };
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, work).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_the_registered_token_wakes_and_drop_unregisters() {
        let reg = Arc::new(PingRegistry::default());
        let t = new_token();
        assert!(t.len() >= 43, "256 bits");
        let mut w = reg.register(&t);
        assert_eq!(reg.notify("forged", "r1"), Notified::UnknownToken);
        assert_eq!(reg.notify(&t[..t.len() - 1], "r1"), Notified::UnknownToken);
        assert_eq!(reg.notify(&t, "r1"), Notified::Woken);
        assert_eq!(w.rx.recv().await.as_deref(), Some("r1"));
        drop(w);
        assert!(reg.is_empty());
        assert_eq!(reg.notify(&t, "r1"), Notified::UnknownToken);
        assert!(ct_eq(b"abc", b"abc") && !ct_eq(b"abc", b"abd") && !ct_eq(b"ab", b"abc"));
    }
}
