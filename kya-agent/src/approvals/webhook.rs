//! The webhook channel: tell a configured URL that a call is held, signed with
//! kya's Ed25519 key so the receiver can verify who sent it and when.
//!
//! The webhook only *notifies* (a chat bot, a pager, a ticket): the answer comes
//! back through `kya approvals approve|deny` or CIBA, where the approver's
//! identity is verified. Nothing a webhook receiver sends back is an answer.
//!
//! # Wire format ([Standard Webhooks], asymmetric signature)
//!
//! ```text
//! POST <url>
//! content-type: application/json
//! webhook-id: apr_0123456789abcdef            # the approval id; the same on retries
//! webhook-timestamp: 1795000000               # Unix seconds when this attempt was signed
//! webhook-signature: v1a,<base64 Ed25519 signature of "{id}.{timestamp}.{body}">
//! kya-key: did:key:z6Mk...                    # kya's public key (pin it out of band)
//!
//! {"type": "approval.requested", "timestamp": "2026-11-26T12:00:00Z",
//!  "data": {"id": ..., "agent": ..., "owner": ..., "server": ..., "tool": ...,
//!           "args_sha256": ..., "binding_message": ..., "expires": ..., "rule": ...,
//!           "reason": ..., "pid": ..., "uid": ..., "cgroup": ..., "host": ...,
//!           "answer_with": "kya approvals approve|deny apr_..."}}
//! ```
//!
//! Receivers verify the signature with kya's public key
//! (`STATE_DIR/signing-key.pub.pem`, or the `did:key` in `kya-key` once pinned)
//! and reject timestamps too far from their clock (replay). The call's
//! arguments are not sent, only their digest: the receiver is told *that* a
//! call waits, not its content.
//!
//! Delivery: a 2xx answer ends it; other answers and network errors are
//! retried with backoff (1 s, doubling, at most [`MAX_ATTEMPTS`]) until the
//! approval ends or expires; a 4xx other than 408/429 is permanent.
//!
//! [Standard Webhooks]: https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md

use super::channel::{Answers, ApprovalChannel, Ask};
use super::http::{HttpClient, HttpError};
use crate::credential::multikey;
use base64::Engine;
#[cfg(test)]
use ed25519_dalek::VerifyingKey;
use ed25519_dalek::{Signer, SigningKey};
use serde_json::json;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Attempts per notification, at most.
pub(crate) const MAX_ATTEMPTS: u32 = 6;
/// Deadline of one attempt.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// A validated `[approvals.webhook]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    /// `https://...` (or `http://` to a loopback host).
    pub url: String,
    /// Extra trust for the receiver's certificate.
    pub ca_file: Option<PathBuf>,
    /// Deadline of one attempt.
    pub timeout: Duration,
}

/// Errors setting up the channel.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WebhookError {
    #[error("webhook: {0}")]
    Http(#[from] HttpError),
}

/// The three Standard Webhooks headers for one signed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Signed {
    pub id: String,
    pub timestamp: i64,
    /// `v1a,<base64 signature>`.
    pub signature: String,
}

/// Sign `body` for message `id` at `timestamp` (Unix seconds).
pub(crate) fn sign(key: &SigningKey, id: &str, timestamp: i64, body: &[u8]) -> Signed {
    let mut content = format!("{id}.{timestamp}.").into_bytes();
    content.extend_from_slice(body);
    let sig = key.sign(&content);
    Signed {
        id: id.to_owned(),
        timestamp,
        signature: format!(
            "v1a,{}",
            base64::engine::general_purpose::STANDARD.encode(sig.to_bytes())
        ),
    }
}

/// Why a received webhook does not verify.
#[cfg(test)]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum VerifyError {
    #[error("no v1a signature in the webhook-signature header")]
    NoSignature,
    #[error("the signature does not verify with the given key")]
    BadSignature,
    #[error("timestamp {got} is more than {tolerance}s away from now ({now})")]
    Stale { got: i64, now: i64, tolerance: i64 },
}

/// What a receiver does: check a `webhook-signature` header (space-separated
/// `v1a,...` entries; any valid one suffices) and the timestamp's freshness:
/// the receiver's side, which the tests check signatures against.
#[cfg(test)]
fn verify(
    key: &VerifyingKey,
    id: &str,
    timestamp: i64,
    signature_header: &str,
    body: &[u8],
    now: i64,
    tolerance: i64,
) -> Result<(), VerifyError> {
    if (now - timestamp).abs() > tolerance {
        return Err(VerifyError::Stale {
            got: timestamp,
            now,
            tolerance,
        });
    }
    let mut content = format!("{id}.{timestamp}.").into_bytes();
    content.extend_from_slice(body);
    let mut any = false;
    for entry in signature_header.split(' ') {
        let Some(b64) = entry.strip_prefix("v1a,") else {
            continue;
        };
        any = true;
        let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(b64) else {
            continue;
        };
        let Ok(sig) = ed25519_dalek::Signature::from_slice(&bytes) else {
            continue;
        };
        if key.verify_strict(&content, &sig).is_ok() {
            return Ok(());
        }
    }
    Err(if any {
        VerifyError::BadSignature
    } else {
        VerifyError::NoSignature
    })
}

/// The JSON body announcing `ask`.
pub(crate) fn body(ask: &Ask, host: &str, now: OffsetDateTime) -> Vec<u8> {
    let r = &ask.request;
    let n = json!({
        "type": "approval.requested",
        "timestamp": now.format(&Rfc3339).unwrap_or_default(),
        "data": {
            "id": ask.id,
            "agent": r.agent,
            "owner": r.owner,
            "approvers": r.approvers,
            "server": r.server,
            "tool": r.tool,
            "args_sha256": r.args_digest,
            "binding_message": ask.binding_message,
            "expires": ask.expires.format(&Rfc3339).unwrap_or_default(),
            "rule": r.rule,
            "reason": r.reason,
            "decision_id": r.decision_id,
            "pid": r.process.pid,
            "uid": r.process.uid,
            "cgroup": r.process.cgroup,
            "host": host,
            "answer_with": format!("kya approvals approve|deny {}", ask.id),
        },
    });
    serde_json::to_vec(&n).unwrap_or_default()
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    failed_attempts: AtomicU64,
    gave_up: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// The webhook channel.
pub(crate) struct WebhookChannel {
    config: WebhookConfig,
    key: Arc<SigningKey>,
    key_id: String,
    host: String,
    http: HttpClient,
    counters: Arc<Counters>,
}

impl WebhookChannel {
    /// Build the channel (the trust store is read now: a bad `ca_file` stops the start).
    pub(crate) fn new(
        config: WebhookConfig,
        key: Arc<SigningKey>,
        host: String,
    ) -> Result<Arc<Self>, WebhookError> {
        let http = HttpClient::new(config.ca_file.as_deref(), config.timeout)?;
        Ok(Arc::new(Self {
            key_id: multikey::did_key(&key.verifying_key()),
            config,
            key,
            host,
            http,
            counters: Arc::default(),
        }))
    }

    /// Counters for `kya status`.
    pub(crate) fn status(&self) -> serde_json::Value {
        let c = &self.counters;
        json!({
            "url": self.config.url,
            "sent": c.sent.load(Ordering::Relaxed),
            "failed_attempts": c.failed_attempts.load(Ordering::Relaxed),
            "gave_up": c.gave_up.load(Ordering::Relaxed),
            "last_error": *c.last_error.lock().unwrap_or_else(|e| e.into_inner()),
        })
    }

    fn failed(counters: &Counters, message: String) {
        counters.failed_attempts.fetch_add(1, Ordering::Relaxed);
        *counters
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(message);
    }

    /// Deliver one notification: signed per attempt, retried with backoff.
    async fn deliver(
        http: HttpClient,
        key: Arc<SigningKey>,
        key_id: String,
        url: String,
        counters: Arc<Counters>,
        ask: Ask,
        body: Vec<u8>,
    ) {
        let mut backoff = Duration::from_secs(1);
        for attempt in 1..=MAX_ATTEMPTS {
            let now = OffsetDateTime::now_utc().unix_timestamp();
            let signed = sign(&key, &ask.id, now, &body);
            let ts = signed.timestamp.to_string();
            let headers = [
                ("webhook-id", signed.id.as_str()),
                ("webhook-timestamp", ts.as_str()),
                ("webhook-signature", signed.signature.as_str()),
                ("kya-key", key_id.as_str()),
            ];
            let permanent = match http.post_json(&url, body.clone(), &headers).await {
                Ok(r) if r.status.is_success() => {
                    counters.sent.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(approval = %ask.id, %url, attempt, "approval webhook delivered");
                    return;
                }
                Ok(r) => {
                    let code = r.status.as_u16();
                    Self::failed(&counters, format!("{url}: HTTP {code}"));
                    (400..500).contains(&code) && code != 408 && code != 429
                }
                Err(e) => {
                    Self::failed(&counters, e.to_string());
                    false
                }
            };
            if permanent {
                tracing::warn!(approval = %ask.id, %url, "approval webhook refused by the receiver; not retried");
                break;
            }
            if attempt == MAX_ATTEMPTS || OffsetDateTime::now_utc() + backoff >= ask.expires {
                break;
            }
            tracing::warn!(approval = %ask.id, %url, attempt, "approval webhook failed; retrying in {backoff:?}");
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = ask.ended() => return,
            }
            backoff *= 2;
        }
        counters.gave_up.fetch_add(1, Ordering::Relaxed);
        tracing::error!(approval = %ask.id, %url, "approval webhook not delivered; the owner can still answer with kya approvals");
    }
}

impl ApprovalChannel for WebhookChannel {
    fn name(&self) -> &'static str {
        "webhook"
    }

    fn ask(&self, ask: Ask, _approvals: Arc<dyn Answers>) {
        let body = body(&ask, &self.host, OffsetDateTime::now_utc());
        let fut = Self::deliver(
            self.http.clone(),
            self.key.clone(),
            self.key_id.clone(),
            self.config.url.clone(),
            self.counters.clone(),
            ask.clone(),
            body,
        );
        tokio::spawn(async move {
            // An approval answered meanwhile needs no more notifying.
            tokio::select! {
                _ = fut => {}
                _ = ask.ended() => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::approvals::pending::tests::action;
    use crate::approvals::pending::Approvals;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[3u8; 32])
    }

    #[test]
    fn signatures_verify_and_any_change_breaks_them() {
        let k = key();
        let body = br#"{"type":"approval.requested"}"#;
        let s = sign(&k, "apr_1", 1_795_000_000, body);
        assert!(s.signature.starts_with("v1a,"));
        let pk = k.verifying_key();
        let ok = |id: &str, ts: i64, sig: &str, b: &[u8]| verify(&pk, id, ts, sig, b, ts, 300);
        assert_eq!(ok("apr_1", s.timestamp, &s.signature, body), Ok(()));
        // Several signatures in the header: any valid one suffices.
        let multi = format!("v1a,AAAA {}", s.signature);
        assert_eq!(ok("apr_1", s.timestamp, &multi, body), Ok(()));
        // Another id, another time, another body, another key: refused.
        assert_eq!(
            ok("apr_2", s.timestamp, &s.signature, body),
            Err(VerifyError::BadSignature)
        );
        assert_eq!(
            ok("apr_1", s.timestamp + 1, &s.signature, body),
            Err(VerifyError::BadSignature)
        );
        let mut tampered = body.to_vec();
        tampered[3] ^= 1;
        assert_eq!(
            ok("apr_1", s.timestamp, &s.signature, &tampered),
            Err(VerifyError::BadSignature)
        );
        let other = SigningKey::from_bytes(&[4u8; 32]).verifying_key();
        assert_eq!(
            verify(
                &other,
                "apr_1",
                s.timestamp,
                &s.signature,
                body,
                s.timestamp,
                300
            ),
            Err(VerifyError::BadSignature)
        );
        // Garbage and absent signatures; a symmetric (v1) one is not ours.
        for header in [
            "",
            "v1,abc",
            "v1a,",
            "v1a,!!!",
            "v1a,AAAA",
            &"v1a,A".repeat(10_000),
        ] {
            assert!(
                ok("apr_1", s.timestamp, header, body).is_err(),
                "{header:.40}"
            );
        }
        assert_eq!(
            ok("apr_1", s.timestamp, "v1,abc", body),
            Err(VerifyError::NoSignature)
        );
        // Replay outside the receiver's tolerance.
        assert!(matches!(
            verify(
                &pk,
                "apr_1",
                s.timestamp,
                &s.signature,
                body,
                s.timestamp + 301,
                300
            ),
            Err(VerifyError::Stale { .. })
        ));
    }

    #[test]
    fn the_body_names_the_call_but_not_its_arguments() {
        let (_tx, rx) = tokio::sync::watch::channel(());
        let mut req = action("bot", "alice");
        req.args = json!({"amount": 5000, "secret": "hunter2"});
        let ask = Ask::new(
            "apr_1".into(),
            "KYA-ABCD-EFGH bot wants transfer".into(),
            OffsetDateTime::now_utc(),
            req,
            rx,
        );
        let b = body(&ask, "host-a", OffsetDateTime::now_utc());
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["type"], "approval.requested");
        assert_eq!(v["data"]["id"], "apr_1");
        assert_eq!(v["data"]["owner"], "alice");
        assert_eq!(
            v["data"]["binding_message"],
            "KYA-ABCD-EFGH bot wants transfer"
        );
        assert_eq!(v["data"]["answer_with"], "kya approvals approve|deny apr_1");
        assert!(
            !String::from_utf8_lossy(&b).contains("hunter2"),
            "arguments leaked"
        );
    }

    /// A receiver on loopback answering with the given statuses in turn
    /// (the last one repeats); reports each request's headers and body.
    async fn receiver(
        statuses: Vec<u16>,
    ) -> (String, mpsc::UnboundedReceiver<(http::HeaderMap, Bytes)>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks/kya", l.local_addr().unwrap());
        let (tx, rx) = mpsc::unbounded_channel();
        let statuses = Arc::new(Mutex::new(statuses));
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                let tx = tx.clone();
                let statuses = statuses.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let tx = tx.clone();
                            let statuses = statuses.clone();
                            async move {
                                let (parts, body) = req.into_parts();
                                let body = body
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let _ = tx.send((parts.headers, body));
                                let code = {
                                    let mut s = statuses.lock().unwrap();
                                    if s.len() > 1 {
                                        s.remove(0)
                                    } else {
                                        s[0]
                                    }
                                };
                                Ok::<_, std::convert::Infallible>(
                                    http::Response::builder()
                                        .status(code)
                                        .body(Full::new(Bytes::new()))
                                        .unwrap(),
                                )
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        (url, rx)
    }

    fn channel(url: &str) -> Arc<WebhookChannel> {
        WebhookChannel::new(
            WebhookConfig {
                url: url.into(),
                ca_file: None,
                timeout: Duration::from_secs(2),
            },
            Arc::new(key()),
            "host-a".into(),
        )
        .unwrap()
    }

    fn header<'a>(h: &'a http::HeaderMap, name: &str) -> &'a str {
        h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    #[tokio::test]
    async fn a_held_call_is_announced_signed_and_retried_until_delivered() {
        let (url, mut got) = receiver(vec![503, 200]).await;
        let ch = channel(&url);
        let approvals = Approvals::new(8, None);
        approvals.add_channel(ch.clone());
        let h = approvals
            .submit(action("bot", "alice"), Duration::from_secs(30))
            .unwrap();
        let pk = key().verifying_key();
        for attempt in 0..2 {
            let (headers, body) = tokio::time::timeout(Duration::from_secs(10), got.recv())
                .await
                .expect("webhook attempt")
                .unwrap();
            assert_eq!(header(&headers, "webhook-id"), h.id, "attempt {attempt}");
            assert_eq!(header(&headers, "content-type"), "application/json");
            assert_eq!(header(&headers, "kya-key"), multikey::did_key(&pk));
            let ts: i64 = header(&headers, "webhook-timestamp").parse().unwrap();
            let now = OffsetDateTime::now_utc().unix_timestamp();
            verify(
                &pk,
                &h.id,
                ts,
                header(&headers, "webhook-signature"),
                &body,
                now,
                60,
            )
            .expect("the receiver can verify kya's signature");
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["data"]["binding_message"], h.binding_message.as_str());
        }
        // Delivered: no third attempt; the webhook never answers the call.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(got.try_recv().is_err());
        assert!(approvals.is_pending(&h.id));
        let s = ch.status();
        assert_eq!(
            (s["sent"].as_u64(), s["failed_attempts"].as_u64()),
            (Some(1), Some(1)),
            "{s}"
        );
    }

    #[tokio::test]
    async fn a_refusal_is_permanent_and_an_ended_approval_stops_retries() {
        let (url, mut got) = receiver(vec![400]).await;
        let ch = channel(&url);
        let approvals = Approvals::new(8, None);
        approvals.add_channel(ch.clone());
        let _h = approvals
            .submit(action("bot", "alice"), Duration::from_secs(30))
            .unwrap();
        got.recv().await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(got.try_recv().is_err(), "a 400 is not retried");
        assert_eq!(ch.status()["gave_up"], 1);

        // Unreachable receiver: retried, until the approval ends.
        let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead_url = format!("http://{}/x", dead.local_addr().unwrap());
        drop(dead);
        let ch = channel(&dead_url);
        let approvals = Approvals::new(8, None);
        approvals.add_channel(ch.clone());
        let h = approvals
            .submit(action("bot", "alice"), Duration::from_secs(30))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(ch.status()["failed_attempts"], 1);
        drop(h);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            ch.status()["failed_attempts"],
            1,
            "no retry after the approval ended"
        );
        assert!(ch.status()["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("connect"));
    }

    #[test]
    fn the_config_section_is_checked() {
        use crate::config::WebhookSection;
        let section = |url: &str, ca: Option<&str>, timeout: Option<&str>| WebhookSection {
            url: Some(url.into()),
            ca_file: ca.map(PathBuf::from),
            timeout: timeout.map(str::to_owned),
        };
        let ok = section(
            "https://hooks.example.com/kya",
            Some("/etc/kya/hooks-ca.pem"),
            Some("3s"),
        )
        .validate()
        .unwrap();
        assert_eq!(ok.timeout, Duration::from_secs(3));
        assert_eq!(
            section("http://127.0.0.1:9000/h", None, None)
                .validate()
                .unwrap()
                .timeout,
            DEFAULT_TIMEOUT
        );
        for bad in [
            section("http://hooks.example.com/kya", None, None),
            section("ftp://x/y", None, None),
            section("https://user:pw@hooks.example.com/", None, None),
            section("", None, None),
            section("https://h/", Some("relative.pem"), None),
            section("https://h/", None, Some("0s")),
            section("https://h/", None, Some("2min")),
            section("https://h/", None, Some("soon")),
            WebhookSection::default(),
        ] {
            assert!(bad.clone().validate().is_err(), "{bad:?}");
        }
    }
}
