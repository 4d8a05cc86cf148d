//! The two CIBA exchanges kya makes as a client (CIBA Core 1.0, sections 7
//! and 10): the backchannel authentication request and the token request.
//!
//! Client authentication is `client_secret_basic` (RFC 6749 section 2.3.1:
//! id and secret form-encoded, then Basic) or `private_key_jwt` (OpenID
//! Connect Core 9 / RFC 7523: an `EdDSA` assertion signed with kya's Ed25519
//! client key, fresh for every request). Every response is parsed
//! defensively: unknown fields are ignored, missing ones are errors, and
//! error texts from the provider are truncated before they reach a log.

use crate::approvals::http::{enc, HttpClient, HttpError};
use base64::Engine;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::sync::Arc;

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

/// The `client_assertion_type` of a JWT client assertion (RFC 7523 2.2).
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// How long one client assertion is valid.
pub const ASSERTION_LIFETIME_SECS: u64 = 60;

#[derive(Clone)]
enum Method {
    /// `client_secret_basic` (RFC 6749 2.3.1).
    SecretBasic { secret: String },
    /// `private_key_jwt` (OpenID Connect Core 9, RFC 7523): a fresh
    /// `EdDSA`-signed assertion per request, `iss` = `sub` = client_id,
    /// `aud` = the issuer identifier (CIBA Core 7.1 recommends it; providers
    /// must accept it), a random `jti`, valid for a minute.
    PrivateKeyJwt {
        key: Arc<SigningKey>,
        kid: String,
        audience: String,
    },
}

/// kya's client credentials.
#[derive(Clone)]
pub struct ClientAuth {
    pub client_id: String,
    method: Method,
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("ClientAuth");
        d.field("client_id", &self.client_id)
            .field("method", &self.method_name());
        match &self.method {
            Method::SecretBasic { .. } => d.field("secret", &"<redacted>"),
            Method::PrivateKeyJwt { kid, .. } => d.field("kid", kid),
        };
        d.finish()
    }
}

/// What authenticates one request: a header, or fields added to the form.
#[derive(Debug, Default)]
pub struct Credentials {
    pub authorization: Option<String>,
    pub form: Vec<(&'static str, String)>,
}

impl ClientAuth {
    /// `client_secret_basic`.
    pub fn secret_basic(client_id: String, secret: String) -> Self {
        ClientAuth {
            client_id,
            method: Method::SecretBasic { secret },
        }
    }

    /// `private_key_jwt` with `key`; assertions are addressed to `audience`
    /// (the provider's issuer identifier).
    pub fn private_key_jwt(client_id: String, key: SigningKey, audience: String) -> Self {
        let kid = jwk_thumbprint(&key.verifying_key());
        ClientAuth {
            client_id,
            method: Method::PrivateKeyJwt {
                key: Arc::new(key),
                kid,
                audience,
            },
        }
    }

    /// The registered name of the method (what the provider's client
    /// registration must say in `token_endpoint_auth_method`).
    pub fn method_name(&self) -> &'static str {
        match self.method {
            Method::SecretBasic { .. } => "client_secret_basic",
            Method::PrivateKeyJwt { .. } => "private_key_jwt",
        }
    }

    /// The public JWK to register with the provider (`private_key_jwt`).
    pub fn public_jwk(&self) -> Option<serde_json::Value> {
        match &self.method {
            Method::SecretBasic { .. } => None,
            Method::PrivateKeyJwt { key, kid, .. } => Some(serde_json::json!({
                "kty": "OKP",
                "crv": "Ed25519",
                "x": b64url(key.verifying_key().as_bytes()),
                "kid": kid,
                "alg": "EdDSA",
                "use": "sig",
            })),
        }
    }

    /// The `Authorization` header value for `client_secret_basic`.
    fn basic(client_id: &str, secret: &str) -> String {
        let raw = format!("{}:{}", enc(client_id), enc(secret));
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }

    /// Authenticate one request made now.
    pub fn credentials(&self) -> Credentials {
        match &self.method {
            Method::SecretBasic { secret } => Credentials {
                authorization: Some(Self::basic(&self.client_id, secret)),
                form: Vec::new(),
            },
            Method::PrivateKeyJwt { key, kid, audience } => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let jti: [u8; 16] = rand::random();
                let header = serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": kid});
                let claims = serde_json::json!({
                    "iss": self.client_id,
                    "sub": self.client_id,
                    "aud": audience,
                    "jti": hex::encode(jti),
                    "iat": now,
                    "exp": now + ASSERTION_LIFETIME_SECS,
                });
                let signing_input = format!(
                    "{}.{}",
                    b64url(header.to_string().as_bytes()),
                    b64url(claims.to_string().as_bytes())
                );
                let signature = key.sign(signing_input.as_bytes());
                Credentials {
                    authorization: None,
                    form: vec![
                        ("client_id", self.client_id.clone()),
                        ("client_assertion_type", ASSERTION_TYPE.to_string()),
                        (
                            "client_assertion",
                            format!("{signing_input}.{}", b64url(&signature.to_bytes())),
                        ),
                    ],
                }
            }
        }
    }
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The RFC 7638 JWK thumbprint of an Ed25519 public key (RFC 8037 section 2:
/// members `crv`, `kty`, `x` in that order).
pub fn jwk_thumbprint(key: &VerifyingKey) -> String {
    let canonical = format!(
        r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
        b64url(key.as_bytes())
    );
    b64url(&Sha256::digest(canonical.as_bytes()))
}

/// POST `form` to `endpoint`, authenticated as `auth`.
async fn post_authenticated(
    http: &HttpClient,
    endpoint: &str,
    auth: &ClientAuth,
    form: &[(&str, &str)],
) -> Result<crate::approvals::http::Response, HttpError> {
    let creds = auth.credentials();
    let mut all: Vec<(&str, &str)> = form.to_vec();
    all.extend(creds.form.iter().map(|(k, v)| (*k, v.as_str())));
    http.post_form(endpoint, &all, creds.authorization.as_deref())
        .await
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
    let resp = post_authenticated(http, endpoint, auth, &form).await?;
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
    let resp = post_authenticated(http, endpoint, auth, &form).await?;
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
        let a = ClientAuth::secret_basic("kya client".into(), "s3cr:t".into());
        let creds = a.credentials();
        assert!(creds.form.is_empty());
        let b = creds.authorization.unwrap();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b.strip_prefix("Basic ").unwrap())
            .unwrap();
        assert_eq!(raw, b"kya%20client:s3cr%3At");
        assert!(!format!("{a:?}").contains("s3cr"));
    }

    #[test]
    fn jwk_thumbprint_matches_rfc8037() {
        // RFC 8037 appendix A.1 (the key) and A.3 (its thumbprint).
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo")
            .unwrap();
        let key = VerifyingKey::from_bytes(&x.try_into().unwrap()).unwrap();
        assert_eq!(
            jwk_thumbprint(&key),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );
    }

    #[test]
    fn private_key_jwt_assertions_verify_and_are_fresh() {
        use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let public = key.verifying_key();
        let a = ClientAuth::private_key_jwt("kya".into(), key, "https://op.example".into());
        assert_eq!(a.method_name(), "private_key_jwt");
        let jwk = a.public_jwk().unwrap();
        assert_eq!(jwk["kid"], jwk_thumbprint(&public));
        assert!(jwk.get("d").is_none(), "the private part never leaves");
        let field = |c: &Credentials, k: &str| {
            c.form
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        let one = a.credentials();
        let two = a.credentials();
        assert!(one.authorization.is_none());
        assert_eq!(field(&one, "client_assertion_type"), ASSERTION_TYPE);
        assert_eq!(field(&one, "client_id"), "kya");
        let jwt = field(&one, "client_assertion");
        // An independent verifier (jsonwebtoken) with the public JWK.
        let header = decode_header(&jwt).unwrap();
        assert_eq!(header.alg, Algorithm::EdDSA);
        assert_eq!(header.kid.as_deref(), jwk["kid"].as_str());
        let mut v = Validation::new(Algorithm::EdDSA);
        v.set_audience(&["https://op.example"]);
        v.set_issuer(&["kya"]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let dk = DecodingKey::from_ed_components(jwk["x"].as_str().unwrap()).unwrap();
        let claims = decode::<serde_json::Value>(&jwt, &dk, &v).unwrap().claims;
        assert_eq!(claims["sub"], "kya");
        let (iat, exp) = (
            claims["iat"].as_u64().unwrap(),
            claims["exp"].as_u64().unwrap(),
        );
        assert_eq!(exp - iat, ASSERTION_LIFETIME_SECS);
        // Every request carries its own jti (providers refuse a replayed one).
        let other = decode::<serde_json::Value>(&field(&two, "client_assertion"), &dk, &v)
            .unwrap()
            .claims;
        assert_ne!(claims["jti"], other["jti"]);
        // Another key's verifier refuses it.
        let stranger = SigningKey::from_bytes(&[8u8; 32]).verifying_key();
        let dk2 = DecodingKey::from_ed_components(&b64url(stranger.as_bytes())).unwrap();
        assert!(decode::<serde_json::Value>(&jwt, &dk2, &v).is_err());
        assert!(!format!("{a:?}").contains("07070707"));
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
        let auth = ClientAuth::secret_basic("kya".into(), "s".into());
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
