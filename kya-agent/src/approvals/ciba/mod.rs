//! Approvals over OpenID CIBA (Client-Initiated Backchannel Authentication,
//! OpenID CIBA Core 1.0): kya is the CIBA *client*; the owner's OpenID
//! Provider (OP) pushes the question to the owner's device and tells kya
//! who answered, with a signed ID token.
//!
//! For each held call ([`Ask`]):
//! 1. [`discovery`]: the OP's endpoints come from
//!    `{issuer}/.well-known/openid-configuration` (the document's `issuer`
//!    must be the configured one). Discovery runs in the background from
//!    start-up and is retried with back-off; a held call asked before it
//!    succeeds tries once more, and otherwise stays with the local channel.
//! 2. [`client`]: a backchannel authentication request (`scope=openid`,
//!    `login_hint` = the agent's owner, `binding_message` = kya's code and
//!    what is asked, `requested_expiry` = the seconds left in the hold, and in
//!    ping mode a fresh 256-bit `client_notification_token`), authenticated
//!    with `client_secret_basic` or `private_key_jwt` (an `EdDSA` assertion
//!    signed with kya's Ed25519 client key; its public JWK is in `kya status`
//!    for the provider's client registration). A provider that refuses the message
//!    (`invalid_binding_message`; oidc-provider's default allows only
//!    `^[a-zA-Z0-9-._+/!?#]{1,20}$`) is asked again with the code alone.
//! 3. Waiting: in **poll** mode kya polls the token endpoint every `interval`
//!    seconds (5 by default, +5 on `slow_down`); in **ping** mode the OP
//!    notifies kya's HTTPS endpoint ([`ping`]) and kya then fetches the token
//!    once. `authorization_pending` waits on, `expired_token` stops (the hold
//!    then times out and is denied), `access_denied` answers *deny*. Asking
//!    stops as soon as the approval ends any other way ([`Ask::ended`]).
//! 4. [`id_token`]: before an approval is accepted the ID token must verify
//!    against the OP's JWKS, with `iss` = issuer, `aud` ∋ client_id, `exp` in
//!    the future and `sub` = the owner kya asked about (see that module for
//!    the full list).
//! 5. The answer goes to [`Answers::answer`] as channel `ciba`, approver =
//!    the verified `sub`, evidence = `{id_token_sha256, iss, auth_req_id}`.
//!    The action-scoped credential minted on approval
//!    (`decision::mint_and_redeem`) is signed by kya's own key and carries the
//!    verified identity and the ID token digest, and so does the audit log's
//!    `approved` record (`approval.id_token_sha256`): the log ties the
//!    forwarded call to the OP's signed statement.
//!
//! **A token that fails verification never approves, and never denies**: the
//! refusal is logged (warning, with the reason) and counted in `kya status`,
//! and the call stays held until it times out (denied) or is answered on
//! another channel. Denying on a bad token would let whoever can inject a
//! token response cancel the owner's pending calls; approving would be
//! worse. Deny answers (`access_denied`) need no ID token: refusing is always
//! safe.

pub mod client;
pub mod discovery;
use super::http;
pub mod id_token;
pub(crate) mod ping;

use super::answer::{Answer, ApprovalError};
use super::channel::{Answers, ApprovalChannel, Ask};
use crate::ca::{LeafName, LocalCa};
use crate::config::{CibaClientAuth, CibaConfig};
use client::{AuthRequest, CibaError, ClientAuth, TokenPoll};
use discovery::{DiscoveryError, Endpoints};
use ed25519_dalek::SigningKey;
use id_token::{Expect, IdTokenError, Jwks};
use ping::PingRegistry;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The channel's name in answers, the audit log and status.
pub const CHANNEL: &str = "ciba";
/// Longest a single CIBA request is followed, whatever the OP says.
pub const MAX_REQUEST_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Back-off bounds for background discovery.
const DISCOVERY_RETRY_MIN: Duration = Duration::from_secs(2);
const DISCOVERY_RETRY_MAX: Duration = Duration::from_secs(300);

/// Errors starting the channel (local problems: they stop the daemon's start).
#[derive(Debug, thiserror::Error)]
pub enum CibaSetupError {
    #[error("[approvals.ciba] {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "[approvals.ciba] client_key_file {path}: not an Ed25519 PKCS#8 PEM private key ({why})"
    )]
    Key { path: PathBuf, why: String },
    #[error("[approvals.ciba] client_secret_file {0} is empty")]
    EmptySecret(PathBuf),
    #[error("[approvals.ciba] {path} is readable by group or others (mode {mode:04o}): chmod 600 it (owned by the user kya runs as)")]
    OpenCredential { path: PathBuf, mode: u32 },
    #[error("[approvals.ciba] {0}")]
    Http(#[from] http::HttpError),
    #[error("[approvals.ciba] ping_listen {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("[approvals.ciba] ping_url host: {0}")]
    PingName(#[from] crate::ca::LeafNameError),
}

/// Why asking about one held call failed (logged; the call stays held).
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("provider discovery: {0}")]
    Discovery(#[from] DiscoveryError),
    #[error(transparent)]
    Ciba(#[from] CibaError),
    #[error("the agent has no owner to ask")]
    NoOwner,
}

#[derive(Default)]
struct Stats {
    asked: AtomicU64,
    approved: AtomicU64,
    denied: AtomicU64,
    expired: AtomicU64,
    refused_id_tokens: AtomicU64,
    errors: AtomicU64,
    last_error: Mutex<Option<String>>,
}

struct Discovered {
    endpoints: Endpoints,
    jwks: Jwks,
}

struct Inner {
    cfg: CibaConfig,
    http: http::HttpClient,
    auth: ClientAuth,
    discovered: Mutex<Option<Arc<Discovered>>>,
    discovering: tokio::sync::Mutex<()>,
    ping: Option<Arc<PingRegistry>>,
    stats: Stats,
}

/// The CIBA approval channel.
pub struct CibaChannel {
    inner: Arc<Inner>,
    ping_addr: Option<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for CibaChannel {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Read a client secret file (a trailing newline is not part of it).
fn read_secret_file(path: &Path) -> Result<String, CibaSetupError> {
    let text = read_credential_file(path)?;
    let s = text.trim_end_matches(['\n', '\r']).to_string();
    if s.is_empty() {
        return Err(CibaSetupError::EmptySecret(path.to_path_buf()));
    }
    Ok(s)
}

/// Read an Ed25519 client key (PKCS#8 PEM, as `openssl genpkey -algorithm
/// ed25519` writes it).
fn read_key_file(path: &Path) -> Result<SigningKey, CibaSetupError> {
    use ed25519_dalek::pkcs8::DecodePrivateKey;
    let text = read_credential_file(path)?;
    SigningKey::from_pkcs8_pem(&text).map_err(|e| CibaSetupError::Key {
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}

/// Read a file holding a client credential; refused when group or others
/// may read it (as kya's own CA and signing keys are).
fn read_credential_file(path: &Path) -> Result<String, CibaSetupError> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let read_err = |source| CibaSetupError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read_err)?;
    // The mode of the file that is read, not of whatever the path names later.
    let mode = file.metadata().map_err(read_err)?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(CibaSetupError::OpenCredential {
            path: path.to_path_buf(),
            mode: mode & 0o7777,
        });
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(read_err)?;
    Ok(text)
}

/// kya's client authentication as configured.
fn client_auth(cfg: &CibaConfig) -> Result<ClientAuth, CibaSetupError> {
    let id = cfg.client_id.clone();
    Ok(match &cfg.client_auth {
        CibaClientAuth::SecretInline(s) => ClientAuth::secret_basic(id, s.clone()),
        CibaClientAuth::SecretFile(p) => ClientAuth::secret_basic(id, read_secret_file(p)?),
        CibaClientAuth::PrivateKeyFile(p) => {
            ClientAuth::private_key_jwt(id, read_key_file(p)?, cfg.issuer.clone())
        }
    })
}

impl CibaChannel {
    /// Read the secret, build the HTTP client, bind the ping endpoint (ping
    /// mode, serving a leaf from `ca`), and start discovery in the background.
    /// Must run inside a tokio runtime.
    pub async fn start(cfg: CibaConfig, ca: Arc<LocalCa>) -> Result<Arc<Self>, CibaSetupError> {
        let auth = client_auth(&cfg)?;
        let http = http::HttpClient::new(cfg.ca_file.as_deref(), http::DEFAULT_TIMEOUT)?;
        let mut tasks = Vec::new();
        let (ping, ping_addr) = match &cfg.ping {
            Some(p) => {
                let name = LeafName::parse(&p.host)?;
                let listener = tokio::net::TcpListener::bind(p.listen)
                    .await
                    .map_err(|source| CibaSetupError::Bind {
                        addr: p.listen,
                        source,
                    })?;
                let addr = listener
                    .local_addr()
                    .map_err(|source| CibaSetupError::Bind {
                        addr: p.listen,
                        source,
                    })?;
                let cache = crate::tls::leaf_cache::LeafCache::new(ca, NonZeroUsize::MIN);
                let terminator = crate::tls::terminate::Terminator::new(cache);
                let registry = Arc::new(PingRegistry::default());
                tasks.push(tokio::spawn(ping::serve(
                    listener,
                    terminator,
                    name,
                    p.path.clone(),
                    registry.clone(),
                )));
                tracing::info!(%addr, url = %p.url, "CIBA ping notification endpoint listening");
                (Some(registry), Some(addr))
            }
            None => (None, None),
        };
        let inner = Arc::new(Inner {
            auth,
            cfg,
            http,
            discovered: Mutex::new(None),
            discovering: tokio::sync::Mutex::new(()),
            ping,
            stats: Stats::default(),
        });
        tasks.push(tokio::spawn(discover_in_background(inner.clone())));
        Ok(Arc::new(CibaChannel {
            inner,
            ping_addr,
            tasks,
        }))
    }

    /// Where the ping endpoint listens (ping mode).
    pub fn ping_addr(&self) -> Option<SocketAddr> {
        self.ping_addr
    }

    /// True once the provider's discovery document was read.
    pub fn discovered(&self) -> bool {
        self.inner.cached().is_some()
    }

    /// The `ciba` section of `kya status`.
    pub fn status(&self) -> serde_json::Value {
        let s = &self.inner.stats;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "issuer": self.inner.cfg.issuer,
            "client_id": self.inner.cfg.client_id,
            "client_auth": self.inner.auth.method_name(),
            "client_jwk": self.inner.auth.public_jwk(),
            "mode": self.inner.cfg.mode.as_str(),
            "ping_url": self.inner.cfg.ping.as_ref().map(|p| p.url.clone()),
            "discovered": self.discovered(),
            "asked": n(&s.asked),
            "approved": n(&s.approved),
            "denied": n(&s.denied),
            "expired": n(&s.expired),
            "refused_id_tokens": n(&s.refused_id_tokens),
            "errors": n(&s.errors),
            "last_error": s.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        })
    }
}

async fn discover_in_background(inner: Arc<Inner>) {
    let mut wait = DISCOVERY_RETRY_MIN;
    let mut first = true;
    loop {
        match inner.provider().await {
            Ok(_) => return,
            Err(e) => {
                if first {
                    tracing::error!(issuer = %inner.cfg.issuer, error = %e, retry_in = ?wait,
                        "CIBA provider discovery failed; approvals go to the local channel until it succeeds");
                    first = false;
                } else {
                    tracing::warn!(issuer = %inner.cfg.issuer, error = %e, retry_in = ?wait, "CIBA provider discovery failed again");
                }
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(DISCOVERY_RETRY_MAX);
    }
}

impl Inner {
    fn cached(&self) -> Option<Arc<Discovered>> {
        self.discovered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The discovered provider, discovering now if needed (one attempt at a time).
    async fn provider(&self) -> Result<Arc<Discovered>, DiscoveryError> {
        if let Some(d) = self.cached() {
            return Ok(d);
        }
        let _one = self.discovering.lock().await;
        if let Some(d) = self.cached() {
            return Ok(d);
        }
        let endpoints =
            discovery::discover(&self.http, &self.cfg.issuer, self.cfg.mode.as_str()).await?;
        tracing::info!(issuer = %endpoints.issuer, backchannel = %endpoints.backchannel_authentication,
            token = %endpoints.token, "CIBA provider discovered");
        let method = self.auth.method_name();
        if !endpoints.supports_auth_method(method) {
            tracing::warn!(issuer = %endpoints.issuer, method, offered = ?endpoints.auth_methods,
                "the provider does not list kya's client authentication method; requests will likely be refused (invalid_client)");
        }
        let d = Arc::new(Discovered {
            jwks: Jwks::new(endpoints.jwks_uri.clone(), self.http.clone()),
            endpoints,
        });
        *self.discovered.lock().unwrap_or_else(|e| e.into_inner()) = Some(d.clone());
        Ok(d)
    }

    fn record_error(&self, e: &AskError) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        *self
            .stats
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
    }

    async fn run(&self, ask: &Ask, approvals: &dyn Answers) {
        self.stats.asked.fetch_add(1, Ordering::Relaxed);
        match self.ask_owner(ask).await {
            Ok(Some(answer)) => {
                let approve = answer.approve;
                match approvals.answer(&ask.id, answer) {
                    Ok(()) => {
                        let counter = if approve {
                            &self.stats.approved
                        } else {
                            &self.stats.denied
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(approval = %ask.id, approve, "CIBA answer recorded");
                    }
                    Err(ApprovalError::AlreadyAnswered(_) | ApprovalError::NotFound(_)) => {
                        tracing::debug!(approval = %ask.id, "CIBA answer came after another answer");
                    }
                    Err(e) => {
                        tracing::warn!(approval = %ask.id, error = %e, "CIBA answer not recorded")
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(approval = %ask.id, error = %e,
                    "CIBA: asking the owner failed; the call stays held (the local channel still works)");
                self.record_error(&e);
            }
        }
    }

    /// Ask the owner; `Ok(None)` means nothing is to be answered (expired,
    /// or an ID token was refused).
    async fn ask_owner(&self, ask: &Ask) -> Result<Option<Answer>, AskError> {
        let owner = ask.request.owner.as_str();
        if owner.is_empty() {
            return Err(AskError::NoOwner);
        }
        let provider = self.provider().await?;
        let token = self.ping.as_ref().map(|_| ping::new_token());
        let mut wait = match (&self.ping, &token) {
            (Some(reg), Some(t)) => Some(reg.register(t)),
            _ => None,
        };
        let strict = client::strict_binding_message(&ask.binding_message);
        let mut req = AuthRequest {
            login_hint: owner,
            binding_message: &ask.binding_message,
            requested_expiry: ask.seconds_left(),
            client_notification_token: token.as_deref(),
        };
        let endpoint = provider.endpoints.backchannel_authentication.as_str();
        let started = match client::start(&self.http, endpoint, &self.auth, &req).await {
            Err(e) if e.code() == Some("invalid_binding_message") => {
                tracing::info!(approval = %ask.id, sent = %strict,
                    "the OpenID Provider refused kya's binding message; sending the code alone");
                req.binding_message = &strict;
                client::start(&self.http, endpoint, &self.auth, &req).await?
            }
            other => other?,
        };
        tracing::info!(approval = %ask.id, owner, mode = self.cfg.mode.as_str(),
            expires_in = started.expires_in, "CIBA authentication request sent");
        let lifetime = Duration::from_secs(started.expires_in).min(MAX_REQUEST_LIFETIME);
        let deadline = Instant::now() + lifetime;
        let mut interval = started.interval;
        // Ping mode: a token fetch that failed on the network is retried on a
        // timer (the provider pings once).
        let mut retry = false;
        loop {
            // Wait for the next poll, or for a notification naming this request.
            match wait.as_mut().filter(|_| !retry) {
                None => {
                    let next = Instant::now() + Duration::from_secs(interval);
                    if next > deadline {
                        tokio::time::sleep_until(deadline).await;
                        return Ok(self.expired(ask));
                    }
                    tokio::time::sleep_until(next).await;
                }
                Some(w) => {
                    let id = tokio::select! {
                        id = w.rx.recv() => id,
                        _ = tokio::time::sleep_until(deadline) => return Ok(self.expired(ask)),
                    };
                    let Some(id) = id else {
                        return Ok(self.expired(ask));
                    };
                    if !ping::ct_eq(id.as_bytes(), started.auth_req_id.as_bytes()) {
                        tracing::warn!(approval = %ask.id, "CIBA ping named another auth_req_id; ignored");
                        continue;
                    }
                }
            }
            let poll = client::token(
                &self.http,
                &provider.endpoints.token,
                &self.auth,
                &started.auth_req_id,
            )
            .await;
            match poll {
                Ok(TokenPoll::Tokens { id_token }) => {
                    return Ok(self
                        .accept(ask, &provider, &started.auth_req_id, &id_token)
                        .await);
                }
                Ok(TokenPoll::Pending) => {}
                Ok(TokenPoll::SlowDown) => {
                    interval = (interval + client::SLOW_DOWN_SECS).min(client::MAX_INTERVAL_SECS);
                }
                Ok(TokenPoll::Expired) => return Ok(self.expired(ask)),
                Ok(TokenPoll::Denied { description }) => {
                    return Ok(Some(Answer {
                        approve: false,
                        approver: owner.to_string(),
                        channel: CHANNEL.into(),
                        reason: Some(
                            description.unwrap_or_else(|| "denied at the OpenID Provider".into()),
                        ),
                        evidence: Some(serde_json::json!({
                            "iss": self.cfg.issuer,
                            "auth_req_id": started.auth_req_id,
                            "error": "access_denied",
                        })),
                    }));
                }
                // A network hiccup must not drop the question: ask again later.
                Err(CibaError::Http(e)) => {
                    tracing::warn!(approval = %ask.id, error = %e, "CIBA token request failed; retrying");
                    retry = wait.is_some();
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            retry = false;
        }
    }

    fn expired(&self, ask: &Ask) -> Option<Answer> {
        self.stats.expired.fetch_add(1, Ordering::Relaxed);
        tracing::info!(approval = %ask.id, "CIBA request expired at the provider without an answer");
        None
    }

    /// Verify the ID token; only a verified token approves.
    async fn accept(
        &self,
        ask: &Ask,
        provider: &Discovered,
        auth_req_id: &str,
        id_token: &str,
    ) -> Option<Answer> {
        let expect = Expect {
            issuer: &self.cfg.issuer,
            client_id: &self.cfg.client_id,
            subject: &ask.request.owner,
            auth_req_id,
        };
        match provider.jwks.verify(id_token, &expect).await {
            Ok(v) => Some(Answer {
                approve: true,
                approver: v.sub,
                channel: CHANNEL.into(),
                reason: Some(format!("approved over OpenID CIBA at {}", v.iss)),
                evidence: Some(serde_json::json!({
                    "id_token_sha256": v.sha256,
                    "iss": v.iss,
                    "auth_req_id": auth_req_id,
                })),
            }),
            Err(e) => {
                self.refused(ask, &e);
                None
            }
        }
    }

    fn refused(&self, ask: &Ask, e: &IdTokenError) {
        self.stats.refused_id_tokens.fetch_add(1, Ordering::Relaxed);
        *self
            .stats
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(format!("ID token refused: {e}"));
        tracing::warn!(approval = %ask.id, error = %e,
            "CIBA ID token refused: the approval is NOT accepted; the call stays held until it times out or is answered elsewhere");
    }
}

impl ApprovalChannel for CibaChannel {
    fn name(&self) -> &'static str {
        CHANNEL
    }

    fn ask(&self, ask: Ask, approvals: Arc<dyn Answers>) {
        let inner = self.inner.clone();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::error!(approval = %ask.id, "CIBA channel used outside the runtime; not asking");
            return;
        };
        rt.spawn(async move {
            tokio::select! {
                _ = ask.ended() => {
                    tracing::debug!(approval = %ask.id, "approval ended; CIBA stops asking");
                }
                _ = inner.run(&ask, &*approvals) => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_client_credential_file_others_may_read_is_refused_and_its_content_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "s3cr3t-in-file\n").unwrap();
        for mode in [0o640, 0o604, 0o644] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = read_secret_file(&path).unwrap_err();
            assert!(
                matches!(e, CibaSetupError::OpenCredential { .. }),
                "{mode:o}: {e}"
            );
            let text = format!("{e} {e:?}");
            assert!(text.contains("chmod 600"), "{text}");
            assert!(!text.contains("s3cr3t"), "the secret leaked: {text}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret_file(&path).unwrap(), "s3cr3t-in-file");
    }
}
