//! OAuth 2.0 access tokens kya obtains itself for a brokered server, cached
//! until shortly before they expire.
//!
//! * `client_credentials` (RFC 6749 section 4.4): one token for kya's client,
//!   shared by every agent the entry covers.
//! * `token_exchange` (RFC 8693): one token per agent. The subject token says
//!   on whose behalf the agent acts (its registered owner, or the agent itself
//!   when it has none) and the actor token says which agent acts (name, uid,
//!   executable digest); both are short JWTs kya signs with its Ed25519 key
//!   (`signing-key.pub.pem` in the state directory is what the authorization
//!   server trusts), so the issued token can carry the agent as `act`.
//!
//! kya authenticates to the token endpoint with `client_secret_basic`, the
//! secret read from a root-only file (see [`super::secret_file`]). Responses
//! are read defensively: only a `Bearer` token of printable ASCII is used;
//! error texts from the server are truncated before they reach a log or an
//! error; nothing here ever prints a token or the client secret.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use ed25519_dalek::{Signer, SigningKey};
use serde::Deserialize;

use super::secret_file::{SecretFile, SecretFileError};
use crate::approvals::ciba::client::ClientAuth;
use crate::approvals::http::{HttpClient, HttpError};

/// The RFC 8693 grant type.
pub(crate) const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// The token type of kya's signed subject and actor tokens.
pub(crate) const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
/// What kya asks for in an exchange.
pub(crate) const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
/// How long kya's subject and actor tokens are valid.
const ASSERTION_LIFETIME_SECS: u64 = 60;
/// The lifetime assumed for a token whose response names none.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(60);
/// A token is renewed this long before it expires (or at half its life,
/// whichever comes later).
const RENEW_BEFORE: Duration = Duration::from_secs(30);
/// Most tokens cached per entry (one per agent under token exchange).
const MAX_CACHED: usize = 4096;
/// Longest access token accepted.
const MAX_TOKEN: usize = 16 * 1024;

/// Which grant kya uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Grant {
    ClientCredentials,
    TokenExchange,
}

/// Why no token could be had.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OAuthError {
    #[error("client secret: {0}")]
    Secret(#[from] SecretFileError),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("the token endpoint answered {status} {error}{}", .description.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Refused {
        status: u16,
        error: String,
        description: Option<String>,
    },
    #[error("the token endpoint's answer is unusable: {0}")]
    Malformed(&'static str),
}

/// Who a token is for (token exchange).
#[derive(Debug, Clone)]
pub struct Actor {
    pub agent: String,
    pub owner: Option<String>,
    pub uid: u32,
    pub exe_sha256: Option<String>,
}

struct Cached {
    value: String,
    renew_at: Instant,
}

/// One entry's token source.
pub(crate) struct OAuthSource {
    token_url: String,
    client_id: String,
    secret: SecretFile,
    grant: Grant,
    scope: Option<String>,
    resource: Option<String>,
    audience: Option<String>,
    http: HttpClient,
    /// Signs the subject and actor tokens of an exchange, and names their issuer.
    signer: Option<(Arc<SigningKey>, String)>,
    cache: tokio::sync::Mutex<HashMap<String, Cached>>,
}

impl std::fmt::Debug for OAuthSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuthSource")
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .field("grant", &self.grant)
            .finish_non_exhaustive()
    }
}

/// What configures an [`OAuthSource`].
pub(crate) struct OAuthSettings {
    pub token_url: String,
    pub client_id: String,
    pub secret: SecretFile,
    pub grant: Grant,
    pub scope: Option<String>,
    pub resource: Option<String>,
    pub audience: Option<String>,
    pub http: HttpClient,
    /// kya's key and the `iss` of its assertions (token exchange only).
    pub signer: Option<(Arc<SigningKey>, String)>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: Option<String>,
    token_type: Option<String>,
    expires_in: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ErrorResponse {
    error: Option<String>,
    error_description: Option<String>,
}

fn truncate(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect::<String>()
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A compact JWS (`EdDSA`) over `claims`.
fn sign_jwt(key: &SigningKey, claims: &serde_json::Value) -> String {
    let header = serde_json::json!({"alg": "EdDSA", "typ": "JWT"});
    let input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let sig = key.sign(input.as_bytes());
    format!("{input}.{}", b64url(&sig.to_bytes()))
}

impl OAuthSource {
    pub(crate) fn new(s: OAuthSettings) -> OAuthSource {
        OAuthSource {
            token_url: s.token_url,
            client_id: s.client_id,
            secret: s.secret,
            grant: s.grant,
            scope: s.scope,
            resource: s.resource,
            audience: s.audience,
            http: s.http,
            signer: s.signer,
            cache: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn grant(&self) -> Grant {
        self.grant
    }

    fn cache_key(&self, actor: &Actor) -> String {
        match self.grant {
            Grant::ClientCredentials => String::new(),
            Grant::TokenExchange => format!("{}\u{0}{}", actor.agent, actor.uid),
        }
    }

    /// The access token to attach for `actor`: cached, or obtained now.
    pub(crate) async fn token(&self, actor: &Actor) -> Result<String, OAuthError> {
        let key = self.cache_key(actor);
        // Held across the request: one fetch per entry at a time, so a burst
        // of calls after expiry costs one token request, not one each.
        let mut cache = self.cache.lock().await;
        let now = Instant::now();
        if let Some(c) = cache.get(&key) {
            if now < c.renew_at {
                return Ok(c.value.clone());
            }
        }
        let (value, lifetime) = self.fetch(actor).await?;
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, c| now < c.renew_at);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        let renew_in = lifetime.saturating_sub(RENEW_BEFORE).max(lifetime / 2);
        cache.insert(
            key,
            Cached {
                value: value.clone(),
                renew_at: now + renew_in,
            },
        );
        Ok(value)
    }

    /// The server refused a token this source gave: forget it, so the next
    /// request gets a fresh one.
    pub(crate) async fn forget(&self, actor: &Actor) {
        let key = self.cache_key(actor);
        self.cache.lock().await.remove(&key);
    }

    async fn fetch(&self, actor: &Actor) -> Result<(String, Duration), OAuthError> {
        let secret = self.secret.value()?;
        let auth = ClientAuth::secret_basic(self.client_id.clone(), secret).credentials();
        let mut form: Vec<(&str, String)> = Vec::new();
        match self.grant {
            Grant::ClientCredentials => form.push(("grant_type", "client_credentials".into())),
            Grant::TokenExchange => {
                let Some((key, issuer)) = &self.signer else {
                    return Err(OAuthError::Malformed("token exchange without kya's key"));
                };
                let now = now_secs();
                let common = |sub: &str| {
                    serde_json::json!({
                        "iss": issuer,
                        "sub": sub,
                        "aud": self.token_url,
                        "iat": now,
                        "exp": now + ASSERTION_LIFETIME_SECS,
                        "jti": hex::encode(rand::random::<[u8; 16]>()),
                    })
                };
                let subject =
                    sign_jwt(key, &common(actor.owner.as_deref().unwrap_or(&actor.agent)));
                let mut act = common(&actor.agent);
                if let Some(obj) = act.as_object_mut() {
                    obj.insert("kya_uid".into(), actor.uid.into());
                    if let Some(d) = &actor.exe_sha256 {
                        obj.insert("kya_exe_sha256".into(), d.clone().into());
                    }
                }
                let actor_token = sign_jwt(key, &act);
                form.push(("grant_type", TOKEN_EXCHANGE.into()));
                form.push(("subject_token", subject));
                form.push(("subject_token_type", JWT_TOKEN_TYPE.into()));
                form.push(("actor_token", actor_token));
                form.push(("actor_token_type", JWT_TOKEN_TYPE.into()));
                form.push(("requested_token_type", ACCESS_TOKEN_TYPE.into()));
            }
        }
        if let Some(s) = &self.scope {
            form.push(("scope", s.clone()));
        }
        if let Some(r) = &self.resource {
            form.push(("resource", r.clone()));
        }
        if let Some(a) = &self.audience {
            form.push(("audience", a.clone()));
        }
        for (k, v) in auth.form {
            form.push((k, v));
        }
        let pairs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let resp = self
            .http
            .post_form(&self.token_url, &pairs, auth.authorization.as_deref())
            .await?;
        if !resp.status.is_success() {
            let e: ErrorResponse = serde_json::from_slice(&resp.body).unwrap_or(ErrorResponse {
                error: None,
                error_description: None,
            });
            return Err(OAuthError::Refused {
                status: resp.status.as_u16(),
                error: truncate(e.error.as_deref().unwrap_or("(no error code)")),
                description: e.error_description.as_deref().map(truncate),
            });
        }
        parse_token(&resp.body)
    }
}

/// The token and its lifetime from a successful token response.
fn parse_token(body: &[u8]) -> Result<(String, Duration), OAuthError> {
    let t: TokenResponse =
        serde_json::from_slice(body).map_err(|_| OAuthError::Malformed("not a JSON object"))?;
    let token = t
        .access_token
        .ok_or(OAuthError::Malformed("no access_token"))?;
    if token.is_empty() || token.len() > MAX_TOKEN {
        return Err(OAuthError::Malformed("access_token empty or over 16 KiB"));
    }
    if !token.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err(OAuthError::Malformed(
            "access_token holds characters a header cannot carry",
        ));
    }
    match t.token_type.as_deref() {
        Some(tt) if tt.eq_ignore_ascii_case("bearer") => {}
        _ => return Err(OAuthError::Malformed("token_type is not Bearer")),
    }
    let lifetime = match t.expires_in {
        None => DEFAULT_LIFETIME,
        Some(serde_json::Value::Number(n)) => match n.as_u64() {
            Some(s) if s > 0 => Duration::from_secs(s.min(86_400)),
            _ => {
                return Err(OAuthError::Malformed(
                    "expires_in is not a positive integer",
                ))
            }
        },
        Some(_) => return Err(OAuthError::Malformed("expires_in is not a number")),
    };
    Ok((token, lifetime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_bearer_token_and_its_lifetime() {
        let (t, l) =
            parse_token(br#"{"access_token":"abc.def","token_type":"bearer","expires_in":300}"#)
                .unwrap();
        assert_eq!(t, "abc.def");
        assert_eq!(l, Duration::from_secs(300));
        let (_, l) = parse_token(br#"{"access_token":"x","token_type":"Bearer"}"#).unwrap();
        assert_eq!(l, DEFAULT_LIFETIME);
    }

    #[test]
    fn hostile_token_responses_are_refused() {
        let cases: [&[u8]; 10] = [
            b"",
            b"[]",
            br#"{"token_type":"Bearer"}"#,
            br#"{"access_token":"x"}"#,
            br#"{"access_token":"x","token_type":"mac"}"#,
            br#"{"access_token":"a b","token_type":"Bearer"}"#,
            br#"{"access_token":"a\r\nX-Evil: 1","token_type":"Bearer"}"#,
            br#"{"access_token":"","token_type":"Bearer"}"#,
            br#"{"access_token":"x","token_type":"Bearer","expires_in":-5}"#,
            br#"{"access_token":"x","token_type":"Bearer","expires_in":"300"}"#,
        ];
        for c in cases {
            assert!(parse_token(c).is_err(), "{}", String::from_utf8_lossy(c));
        }
        let huge = format!(
            r#"{{"access_token":"{}","token_type":"Bearer"}}"#,
            "a".repeat(MAX_TOKEN + 1)
        );
        assert!(parse_token(huge.as_bytes()).is_err());
    }

    #[test]
    fn assertions_are_verifiable_eddsa_jwts() {
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let jwt = sign_jwt(&key, &serde_json::json!({"sub": "agent-1"}));
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[2])
            .unwrap();
        let sig = ed25519_dalek::Signature::from_slice(&sig).unwrap();
        key.verifying_key()
            .verify_strict(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
            .unwrap();
    }

    #[test]
    fn error_texts_are_truncated_and_stripped() {
        let t = truncate(&format!("bad\r\n{}", "x".repeat(1000)));
        assert!(!t.contains('\n'));
        assert_eq!(t.chars().count(), 200);
    }
}
