//! The two CIBA exchanges kya makes as a client (CIBA Core 1.0, sections 7
//! and 10): the backchannel authentication request and the token request.
//!
//! Client authentication is `client_secret_basic` (RFC 6749 section 2.3.1:
//! id and secret form-encoded, then Basic). Every response is parsed
//! defensively: unknown fields are ignored, missing ones are errors, and
//! error texts from the provider are truncated before they reach a log.

use crate::approvals::http::{enc, HttpClient, HttpError};
use base64::Engine;
use serde::Deserialize;

/// The CIBA grant type.
pub const GRANT_TYPE: &str = "urn:openid:params:grant-type:ciba";
/// Poll interval when the provider names none (CIBA Core 7.3).
pub const DEFAULT_INTERVAL_SECS: u64 = 5;
/// What `slow_down` adds to the interval (CIBA Core 11, RFC 8628 3.5).
pub const SLOW_DOWN_SECS: u64 = 5;
/// Bounds on a provider-chosen interval.
pub const MIN_INTERVAL_SECS: u64 = 1;
pub const MAX_INTERVAL_SECS: u64 = 60;

/// Errors of one exchange.
#[derive(Debug, thiserror::Error)]
pub enum CibaError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("{endpoint}: the provider answered {status} {error}{}", .description.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Refused {
        endpoint: &'static str,
        status: u16,
        error: String,
        description: Option<String>,
    },
    #[error("{endpoint}: unexpected response: {why}")]
    Malformed { endpoint: &'static str, why: String },
}

impl CibaError {
    /// The OAuth `error` code, when the provider sent one.
    pub fn code(&self) -> Option<&str> {
        match self {
            CibaError::Refused { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// kya's client credentials.
#[derive(Clone)]
pub struct ClientAuth {
    pub client_id: String,
    secret: String,
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientAuth")
            .field("client_id", &self.client_id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl ClientAuth {
    pub fn new(client_id: String, secret: String) -> Self {
        ClientAuth { client_id, secret }
    }

    /// The `Authorization` header value for `client_secret_basic`.
    pub fn basic(&self) -> String {
        let raw = format!("{}:{}", enc(&self.client_id), enc(&self.secret));
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

/// What kya asks the provider.
#[derive(Debug, Clone)]
pub struct AuthRequest<'a> {
    pub login_hint: &'a str,
    pub binding_message: &'a str,
    pub requested_expiry: u64,
    /// Ping mode only.
    pub client_notification_token: Option<&'a str>,
}

/// The provider accepted the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthStarted {
    pub auth_req_id: String,
    pub expires_in: u64,
    /// Poll interval in seconds (bounded; the default when absent).
    pub interval: u64,
}

/// The result of one token request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenPoll {
    /// The human approved: the ID token to verify.
    Tokens { id_token: String },
    /// Not answered yet.
    Pending,
    /// Poll less often.
    SlowDown,
    /// The request expired at the provider: stop (the hold times out).
    Expired,
    /// The human (or the provider's policy) refused.
    Denied { description: Option<String> },
}

#[derive(Deserialize)]
struct OAuthError {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

fn clip(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect::<String>()
}

fn refused(endpoint: &'static str, status: u16, body: &[u8]) -> CibaError {
    match serde_json::from_slice::<OAuthError>(body) {
        Ok(e) => CibaError::Refused {
            endpoint,
            status,
            error: clip(&e.error),
            description: e.error_description.as_deref().map(clip),
        },
        Err(_) => CibaError::Refused {
            endpoint,
            status,
            error: "(no OAuth error)".into(),
            description: None,
        },
    }
}

/// POST the backchannel authentication request.
pub async fn start(
    http: &HttpClient,
    endpoint: &str,
    auth: &ClientAuth,
    req: &AuthRequest<'_>,
) -> Result<AuthStarted, CibaError> {
    const WHAT: &str = "backchannel authentication";
    let expiry = req.requested_expiry.to_string();
    let mut form = vec![
        ("scope", "openid"),
        ("login_hint", req.login_hint),
        ("binding_message", req.binding_message),
        ("requested_expiry", expiry.as_str()),
    ];
    if let Some(t) = req.client_notification_token {
        form.push(("client_notification_token", t));
    }
    let resp = http.post_form(endpoint, &form, Some(&auth.basic())).await?;
    if !resp.status.is_success() {
        return Err(refused(WHAT, resp.status.as_u16(), &resp.body));
    }
    #[derive(Deserialize)]
    struct Body {
        auth_req_id: String,
        expires_in: u64,
        #[serde(default)]
        interval: Option<u64>,
    }
    let b: Body = serde_json::from_slice(&resp.body).map_err(|e| CibaError::Malformed {
        endpoint: WHAT,
        why: e.to_string(),
    })?;
    if b.auth_req_id.is_empty() || b.auth_req_id.len() > 1024 {
        return Err(CibaError::Malformed {
            endpoint: WHAT,
            why: "auth_req_id empty or too long".into(),
        });
    }
    Ok(AuthStarted {
        auth_req_id: b.auth_req_id,
        expires_in: b.expires_in,
        interval: b
            .interval
            .unwrap_or(DEFAULT_INTERVAL_SECS)
            .clamp(MIN_INTERVAL_SECS, MAX_INTERVAL_SECS),
    })
}

/// POST one token request for `auth_req_id`.
pub async fn token(
    http: &HttpClient,
    endpoint: &str,
    auth: &ClientAuth,
    auth_req_id: &str,
) -> Result<TokenPoll, CibaError> {
    const WHAT: &str = "token";
    let form = [("grant_type", GRANT_TYPE), ("auth_req_id", auth_req_id)];
    let resp = http.post_form(endpoint, &form, Some(&auth.basic())).await?;
    if resp.status.is_success() {
        #[derive(Deserialize)]
        struct Body {
            id_token: Option<String>,
        }
        let b: Body = serde_json::from_slice(&resp.body).map_err(|e| CibaError::Malformed {
            endpoint: WHAT,
            why: e.to_string(),
        })?;
        return match b.id_token {
            Some(id_token) => Ok(TokenPoll::Tokens { id_token }),
            None => Err(CibaError::Malformed {
                endpoint: WHAT,
                why: "no id_token in the token response".into(),
            }),
        };
    }
    let err = refused(WHAT, resp.status.as_u16(), &resp.body);
    match err.code() {
        Some("authorization_pending") => Ok(TokenPoll::Pending),
        Some("slow_down") => Ok(TokenPoll::SlowDown),
        Some("expired_token") => Ok(TokenPoll::Expired),
        Some("access_denied") => Ok(TokenPoll::Denied {
            description: match &err {
                CibaError::Refused { description, .. } => description.clone(),
                _ => None,
            },
        }),
        _ => Err(err),
    }
}

/// A binding message that a strict provider accepts: oidc-provider's default
/// (and a common choice) is `^[a-zA-Z0-9-._+/!?#]{1,20}$`. kya's full message
/// starts with its code (`KYA-7MQC-ART4`, 13 characters of that set), so the
/// fallback keeps the code, which is what the human compares.
pub fn strict_binding_message(message: &str) -> String {
    let first = message.split_whitespace().next().unwrap_or("");
    let kept: String = first
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-._+/!?#".contains(*c))
        .take(20)
        .collect();
    if kept.is_empty() {
        "kya".into()
    } else {
        kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_form_encodes_then_base64s() {
        let a = ClientAuth::new("kya client".into(), "s3cr:t".into());
        let b = a.basic();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b.strip_prefix("Basic ").unwrap())
            .unwrap();
        assert_eq!(raw, b"kya%20client:s3cr%3At");
        assert!(!format!("{a:?}").contains("s3cr"));
    }

    #[test]
    fn strict_binding_messages_keep_the_code() {
        assert_eq!(
            strict_binding_message("KYA-7MQC-ART4 billing-bot wants transfer"),
            "KYA-7MQC-ART4"
        );
        assert_eq!(strict_binding_message(""), "kya");
        let long = strict_binding_message(&"A".repeat(50));
        assert_eq!(long.len(), 20);
    }

    /// Serve one canned HTTP response on loopback; returns the URL.
    async fn canned(status: u16, body: String) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/x", l.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 8192];
            let _ = s.read(&mut buf).await;
            let head = format!(
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(body.as_bytes()).await;
        });
        url
    }

    #[tokio::test]
    async fn token_responses_map_to_the_state_machine() {
        let http = HttpClient::new(None, std::time::Duration::from_secs(5)).unwrap();
        let auth = ClientAuth::new("kya".into(), "s".into());
        let err = |e: &str| serde_json::json!({ "error": e }).to_string();
        for (body, want) in [
            (err("authorization_pending"), TokenPoll::Pending),
            (err("slow_down"), TokenPoll::SlowDown),
            (err("expired_token"), TokenPoll::Expired),
            (
                err("access_denied"),
                TokenPoll::Denied { description: None },
            ),
        ] {
            let url = canned(400, body).await;
            assert_eq!(token(&http, &url, &auth, "r").await.unwrap(), want);
        }
        let url = canned(400, err("invalid_grant")).await;
        assert_eq!(
            token(&http, &url, &auth, "r").await.unwrap_err().code(),
            Some("invalid_grant")
        );
        let url = canned(200, r#"{"access_token":"a"}"#.into()).await;
        assert!(matches!(
            token(&http, &url, &auth, "r").await,
            Err(CibaError::Malformed { .. })
        ));
        let url = canned(200, format!(r#"{{"id_token":"{}"}}"#, "a".repeat(70_000))).await;
        assert!(matches!(
            token(&http, &url, &auth, "r").await,
            Err(CibaError::Http(HttpError::TooLarge { .. }))
        ));
        let url = canned(
            200,
            r#"{"auth_req_id":"r1","expires_in":60,"interval":0}"#.into(),
        )
        .await;
        let req = AuthRequest {
            login_hint: "alice",
            binding_message: "KYA-AAAA-CCCC",
            requested_expiry: 60,
            client_notification_token: None,
        };
        let started = start(&http, &url, &auth, &req).await.unwrap();
        assert_eq!(started.interval, MIN_INTERVAL_SECS);
        let url = canned(200, r#"{"expires_in":60}"#.into()).await;
        assert!(start(&http, &url, &auth, &req).await.is_err());
    }

    #[test]
    fn provider_errors_are_clipped() {
        let body = serde_json::json!({"error": "x\n".repeat(300), "error_description": "d"});
        let e = refused("token", 400, &serde_json::to_vec(&body).unwrap());
        let text = e.to_string();
        assert!(!text.contains('\n') && text.len() < 300, "{text}");
    }
}
