//! The daemon's configuration: the TOML config file merged with `kya run` flags.
//!
//! Flags override the file; every key of the file is optional.

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Default config file; its absence is not an error.
pub const DEFAULT_CONFIG: &str = "/etc/kya/kya.toml";
/// Default per-instance BPF pin directory.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/kya";
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/kya";
/// Default interceptor port. 1021 is reserved for experiments (RFC 4727) and is
/// below 1024, so no unprivileged process can bind it while kya is down.
pub const DEFAULT_LISTEN_PORT: u16 = 1021;
/// Destination ports guarded by default.
pub const DEFAULT_PORTS: [u16; 2] = [80, 443];
/// Default request/response body limit.
pub const DEFAULT_MAX_BODY: u64 = 4 * 1024 * 1024;
/// Default largest inspected response body and SSE event (`intercept.max_response_body`):
/// real tool results (files, query results, images) run to tens of megabytes.
pub const DEFAULT_MAX_RESPONSE_BODY: u64 = 64 * 1024 * 1024;
/// How long a redirected client may stay silent before its first bytes; then
/// its connection is refused (never spliced uninspected).
pub const DEFAULT_FIRST_BYTES_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Default wait for a server's answer, its head and then its whole JSON body
/// (`intercept.response_timeout`).
pub const DEFAULT_RESPONSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);
/// Connections the interceptor handles at once, in total
/// (`intercept.max_connections`); each costs two file descriptors.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16384;
/// Connections one process may have open through kya at once
/// (`intercept.max_connections_per_process`).
pub const DEFAULT_MAX_CONNECTIONS_PER_PROCESS: usize = 1024;
/// Calls one process may have held for approval at once, across its
/// connections (`intercept.max_held_per_process`).
pub const DEFAULT_MAX_HELD_PER_PROCESS: usize = 64;

/// Errors reading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("listen port {0} is not below 1024: an unprivileged process could take it over while kya is down")]
    ListenPortNotPrivileged(u16),
    #[error("listen port must not be 0")]
    ListenPortZero,
    #[error("guarded port 0 is not a port")]
    GuardedPortZero,
    #[error("invalid size {0:?} (expected e.g. 4MiB, 512KiB, 1048576)")]
    Size(String),
    #[error("cgroup path {0:?} must start with '/' and must not contain '..'")]
    CgroupPath(String),
    #[error("{0}")]
    CgroupGlob(String),
    #[error("{0}")]
    Image(String),
    #[error("[kubernetes] {0}")]
    Kubernetes(String),
    #[error("[audit] sinks: {0}")]
    Sink(String),
    #[error("[approvals.ciba] {0}")]
    Ciba(String),
    #[error("[approvals.webhook] {0}")]
    Webhook(String),
    #[error("[intercept] {0}")]
    Intercept(String),
    #[error("[control] {0}")]
    Control(String),
    #[error("[approvals] {0}")]
    Approvals(String),
    #[error("[audit] {0}")]
    Audit(String),
    #[error("[proof] {0}")]
    Proof(String),
}

/// The file's schema (every key optional, unknown keys rejected).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub select: SelectSection,
    #[serde(default)]
    pub intercept: InterceptSection,
    #[serde(default)]
    pub policy: PolicySection,
    #[serde(default)]
    pub audit: AuditSection,
    #[serde(default)]
    pub state: StateSection,
    #[serde(default)]
    pub approvals: ApprovalsSection,
    #[serde(default)]
    pub control: ControlSection,
    /// Present (even empty): kya watches this node's pods.
    #[serde(default)]
    pub kubernetes: Option<KubernetesSection>,
    /// `[[broker]]`: credentials kya holds for servers (see [`crate::broker`]).
    #[serde(default)]
    pub broker: Vec<crate::broker::BrokerSection>,
    #[serde(default)]
    pub proof: ProofSection,
}

/// `[proof]`: servers that get a signed decision receipt (the
/// `Kya-Decision` header) with every request kya forwards to them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProofSection {
    /// Server names as policy sees them (SNI, `Host`, or the address).
    #[serde(default)]
    pub servers: Vec<String>,
    /// How long a receipt is valid, e.g. "60s" (at most 10m).
    pub ttl: Option<String>,
}

impl ProofSection {
    /// Check the section against the passthrough names (a spliced server
    /// could never get a receipt, nor be kept from an agent's forged one).
    fn validate(
        self,
        passthrough: &[String],
    ) -> Result<crate::decision::receipts::ProofSettings, ConfigError> {
        let err = |m: String| ConfigError::Proof(m);
        // An invalid pattern is the TLS setup's to report (kya does not start).
        let spliced = crate::tls::passthrough::Passthrough::new(passthrough).unwrap_or_default();
        let mut servers = std::collections::HashSet::new();
        for s in &self.servers {
            let name = proof_server_name(s).ok_or_else(|| {
                    err(format!(
                        "servers: {s:?} is not a server name (a host name or address, no port, no scheme)"
                    ))
                })?;
            if spliced.is_passthrough(&name) {
                return Err(err(format!(
                    "servers: {name:?} is also an intercept.passthrough name: kya never reads \
                     its traffic, so it can neither add a receipt nor remove a forged one"
                )));
            }
            servers.insert(name);
        }
        let ttl = match &self.ttl {
            None => crate::decision::receipts::DEFAULT_TTL,
            Some(t) => {
                let d = humantime::parse_duration(t).map_err(|e| err(format!("ttl {t:?}: {e}")))?;
                if d < std::time::Duration::from_secs(1) || d > crate::credential::receipt::MAX_TTL
                {
                    return Err(err("ttl must be at least 1s and at most 10m".into()));
                }
                // Receipts are valid for whole seconds.
                std::time::Duration::from_secs(d.as_secs())
            }
        };
        Ok(crate::decision::receipts::ProofSettings { servers, ttl })
    }
}

/// `[control]`: who may connect to the control socket.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlSection {
    /// The approvers group: the socket is `0660` and this group's. Without
    /// it, the socket is `0660` and the daemon's own group's (root's when kya
    /// runs as root): only root, and nobody else, may connect.
    pub group: Option<String>,
}

/// `[kubernetes]`: watch the pods of this node through the Kubernetes API,
/// for their names and their containers' images in decisions and records,
/// and select those whose labels match `pod_selector` (when given). The rest
/// defaults to what a pod finds in the cluster (`NODE_NAME`,
/// `KUBERNETES_SERVICE_HOST`, the service account's token and CA).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesSection {
    pub pod_selector: Option<String>,
    pub node: Option<String>,
    pub api: Option<String>,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
}

/// `[approvals]`: backchannels that ask an owner (the local one always exists).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalsSection {
    /// Separation of duties: an approval over the control socket must come
    /// from a uid other than the one the held call's agent process runs as.
    #[serde(default)]
    pub separate_duties: bool,
    /// Calls held for approval at once, across all agents (default 1024);
    /// one more is denied at once ("too many pending approvals").
    pub max_pending: Option<usize>,
    pub ciba: Option<CibaSection>,
    pub webhook: Option<WebhookSection>,
}

/// `[approvals.webhook]`: a signed notification per held call (see
/// [`crate::approvals::webhook`]); answers still come over the CLI or CIBA.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSection {
    pub url: Option<String>,
    pub ca_file: Option<PathBuf>,
    /// Deadline of one attempt, e.g. "5s".
    pub timeout: Option<String>,
}

impl WebhookSection {
    /// Check the section; errors name the key.
    pub fn validate(self) -> Result<crate::approvals::webhook::WebhookConfig, ConfigError> {
        let err = |m: String| ConfigError::Webhook(m);
        let url = self
            .url
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| err("url is required".into()))?;
        crate::approvals::http::parse_url(&url).map_err(|e| err(format!("url: {e}")))?;
        if let Some(p) = &self.ca_file {
            if !p.is_absolute() {
                return Err(err(format!(
                    "ca_file {} must be an absolute path",
                    p.display()
                )));
            }
        }
        let timeout = match &self.timeout {
            None => crate::approvals::webhook::DEFAULT_TIMEOUT,
            Some(t) => {
                let d =
                    humantime::parse_duration(t).map_err(|e| err(format!("timeout {t:?}: {e}")))?;
                if d.is_zero() || d > std::time::Duration::from_secs(60) {
                    return Err(err("timeout must be more than 0 and at most 60s".into()));
                }
                d
            }
        };
        Ok(crate::approvals::webhook::WebhookConfig {
            url,
            ca_file: self.ca_file,
            timeout,
        })
    }
}

/// `[approvals.ciba]` as written (validated into [`CibaConfig`]).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CibaSection {
    pub issuer: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    pub client_secret_file: Option<PathBuf>,
    /// `private_key_jwt`: kya's Ed25519 client key (PKCS#8 PEM).
    pub client_key_file: Option<PathBuf>,
    pub mode: Option<CibaMode>,
    pub ping_listen: Option<std::net::SocketAddr>,
    pub ping_url: Option<String>,
    pub ca_file: Option<PathBuf>,
}

/// CIBA token delivery mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CibaMode {
    /// kya polls the token endpoint.
    #[default]
    Poll,
    /// The provider notifies kya's HTTPS endpoint; kya then fetches the token once.
    Ping,
}

impl CibaMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CibaMode::Poll => "poll",
            CibaMode::Ping => "ping",
        }
    }
}

/// How kya authenticates to the provider, and where its credential comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum CibaClientAuth {
    /// `client_secret_basic` with the secret written in the config.
    SecretInline(String),
    /// `client_secret_basic` with the secret read from a file.
    SecretFile(PathBuf),
    /// `private_key_jwt` (RFC 7523) with an Ed25519 key read from a PKCS#8
    /// PEM file; assertions are signed `EdDSA`.
    PrivateKeyFile(PathBuf),
}

impl std::fmt::Debug for CibaClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CibaClientAuth::SecretInline(_) => f.write_str("SecretInline(<redacted>)"),
            CibaClientAuth::SecretFile(p) => f.debug_tuple("SecretFile").field(p).finish(),
            CibaClientAuth::PrivateKeyFile(p) => f.debug_tuple("PrivateKeyFile").field(p).finish(),
        }
    }
}

/// The ping-mode endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CibaPing {
    /// Where kya's HTTPS notification endpoint listens.
    pub listen: std::net::SocketAddr,
    /// What the provider was told (its client registration).
    pub url: String,
    /// The URL's host (the minted certificate's name).
    pub host: String,
    /// The URL's path (the only path served).
    pub path: String,
}

/// A validated `[approvals.ciba]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CibaConfig {
    pub issuer: String,
    pub client_id: String,
    pub client_auth: CibaClientAuth,
    pub mode: CibaMode,
    pub ping: Option<CibaPing>,
    pub ca_file: Option<PathBuf>,
}

impl CibaSection {
    /// Check the section; errors name the key.
    pub fn validate(self) -> Result<CibaConfig, ConfigError> {
        use crate::approvals::http::parse_url;
        let err = |m: String| ConfigError::Ciba(m);
        let issuer = self
            .issuer
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| err("issuer is required".into()))?;
        let target = parse_url(&issuer).map_err(|e| err(format!("issuer: {e}")))?;
        if issuer.contains('?') {
            return Err(err("issuer: must not have a query".into()));
        }
        let _ = target;
        let client_id = self
            .client_id
            .filter(|s| !s.is_empty())
            .ok_or_else(|| err("client_id is required".into()))?;
        if client_id.len() > 256 || client_id.chars().any(char::is_control) {
            return Err(err(
                "client_id: at most 256 characters, no control characters".into(),
            ));
        }
        let absolute = |key: &str, p: PathBuf| {
            if p.is_absolute() {
                Ok(p)
            } else {
                Err(err(format!("{key} must be an absolute path")))
            }
        };
        let client_auth = match (
            self.client_secret,
            self.client_secret_file,
            self.client_key_file,
        ) {
            (Some(s), None, None) if !s.is_empty() => CibaClientAuth::SecretInline(s),
            (None, Some(p), None) => CibaClientAuth::SecretFile(absolute("client_secret_file", p)?),
            (None, None, Some(p)) => {
                CibaClientAuth::PrivateKeyFile(absolute("client_key_file", p)?)
            }
            (None, None, None) | (Some(_), None, None) => {
                return Err(err(
                    "client authentication is required: client_secret_file (or client_secret) \
                     for client_secret_basic, or client_key_file for private_key_jwt"
                        .into(),
                ))
            }
            _ => {
                return Err(err(
                    "client_secret, client_secret_file and client_key_file are exclusive".into(),
                ))
            }
        };
        let mode = self.mode.unwrap_or_default();
        let ping = match mode {
            CibaMode::Poll => {
                if self.ping_listen.is_some() || self.ping_url.is_some() {
                    return Err(err("ping_listen and ping_url need mode = \"ping\"".into()));
                }
                None
            }
            CibaMode::Ping => {
                let listen = self
                    .ping_listen
                    .ok_or_else(|| err("mode = \"ping\" needs ping_listen".into()))?;
                let url = self
                    .ping_url
                    .ok_or_else(|| err("mode = \"ping\" needs ping_url".into()))?;
                let t = parse_url(&url).map_err(|e| err(format!("ping_url: {e}")))?;
                if !t.https {
                    return Err(err("ping_url must be https (CIBA Core 10.2)".into()));
                }
                crate::ca::LeafName::parse(&t.host).map_err(|e| err(format!("ping_url: {e}")))?;
                if t.path_and_query.contains('?') {
                    return Err(err("ping_url: must not have a query".into()));
                }
                Some(CibaPing {
                    listen,
                    host: t.host,
                    path: t.path_and_query,
                    url,
                })
            }
        };
        Ok(CibaConfig {
            issuer,
            client_id,
            client_auth,
            mode,
            ping,
            ca_file: self.ca_file,
        })
    }
}

/// `[select]`: any match selects a process.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectSection {
    #[serde(default)]
    pub cgroups: Vec<String>,
    /// Container ids (or unique prefixes) or names, resolved to their cgroups.
    #[serde(default)]
    pub containers: Vec<String>,
    /// Cgroup path globs, rescanned while running (new containers are
    /// selected as they start).
    #[serde(default)]
    pub cgroup_globs: Vec<String>,
    /// Image references: every running container of a matching image,
    /// rescanned while running.
    #[serde(default)]
    pub images: Vec<String>,
    #[serde(default)]
    pub uids: Vec<u32>,
    #[serde(default)]
    pub exes: Vec<String>,
    #[serde(default)]
    pub pids: Vec<u32>,
}

/// `[intercept]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterceptSection {
    /// Extra guarded ports, or `"all"`: every TCP port.
    pub ports: Option<PortsValue>,
    pub listen_port: Option<u16>,
    #[serde(default)]
    pub passthrough: Vec<String>,
    pub max_body: Option<SizeValue>,
    /// Largest inspected response body or SSE event, e.g. "64MiB".
    pub max_response_body: Option<SizeValue>,
    pub deny_shape: Option<DenyShape>,
    /// Guarded ports where traffic that is neither TLS nor HTTP is spliced to
    /// its destination instead of refused (e.g. a server-speaks-first protocol).
    #[serde(default)]
    pub splice_ports: Vec<u16>,
    /// How long a client may stay silent before its first bytes, e.g. "30s".
    pub first_bytes_timeout: Option<String>,
    /// How long kya waits for a server's answer (its head, then a whole JSON
    /// body), e.g. "10m".
    pub response_timeout: Option<String>,
    /// Connections handled at once, in total; more are refused.
    pub max_connections: Option<usize>,
    /// Connections one process may have open at once; more are refused.
    pub max_connections_per_process: Option<usize>,
    /// Calls one process may have held for approval at once; more are denied.
    pub max_held_per_process: Option<usize>,
}

/// `[intercept] ports`: a list of extra guarded ports, or the word `"all"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(
    untagged,
    expecting = "a list of port numbers, or \"all\" (every TCP port)"
)]
pub enum PortsValue {
    List(Vec<u16>),
    Word(String),
}

/// `[policy]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    #[serde(default)]
    pub paths: Vec<PathBuf>,
    pub agents: Option<PathBuf>,
}

/// `[audit]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    pub path: Option<PathBuf>,
    /// Export sinks for the decision stream, besides the audit log:
    /// `"stdout"` or `"file:/path/events.jsonl"` (OCSF JSON lines), or
    /// `"syslog"` (`/dev/log`), `"syslog:unix:/path"`, `"syslog:udp://HOST:PORT"`,
    /// `"syslog:tcp://HOST:PORT"` (RFC 5424, MSG = OCSF JSON), each optionally
    /// with `?facility=NAME` (default `authpriv`).
    #[serde(default)]
    pub sinks: Vec<String>,
    /// Record each tool call's arguments in its audit event (and so in the
    /// event stream and the sinks), after `redact`. Default: only their digest.
    #[serde(default)]
    pub args: bool,
    /// Argument paths never recorded, logged or shown: a JSON Pointer
    /// (`/auth/password`) or a key name hidden at every depth (`password`).
    #[serde(default)]
    pub redact: Vec<String>,
}

/// `[state]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateSection {
    pub dir: Option<PathBuf>,
}

/// A size written as a number of bytes or a string with a unit (`"4MiB"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    Bytes(u64),
    Text(String),
}

impl SizeValue {
    fn bytes(&self) -> Result<u64, ConfigError> {
        match self {
            SizeValue::Bytes(n) => Ok(*n),
            SizeValue::Text(s) => parse_size(s),
        }
    }
}

/// How a denial is shown to the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DenyShape {
    /// A `CallToolResult` with `isError: true` (MCP clients show it to the model).
    #[default]
    ToolError,
    /// A JSON-RPC error, code -32001, `data: {rule, reason, decision}`.
    JsonrpcError,
}

/// Which processes the kernel side redirects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    pub cgroups: Vec<String>,
    /// Container ids (or unique prefixes) or names; each selects its
    /// container's cgroup, resolved when the redirect is configured.
    pub containers: Vec<String>,
    /// Cgroup path globs (`crate::cgroup_glob`).
    pub cgroup_globs: Vec<String>,
    /// Image references (`crate::image_ref`).
    pub images: Vec<String>,
    pub uids: Vec<u32>,
    pub exes: Vec<String>,
    pub pids: Vec<u32>,
}

impl Selection {
    /// True when nothing at all is selected.
    pub fn is_empty(&self) -> bool {
        self.cgroups.is_empty()
            && self.containers.is_empty()
            && self.cgroup_globs.is_empty()
            && self.images.is_empty()
            && self.uids.is_empty()
            && self.exes.is_empty()
            && self.pids.is_empty()
    }
}

/// The resolved configuration of one daemon instance.
#[derive(Debug, Clone)]
pub struct Config {
    pub selection: Selection,
    /// Guarded ports: redirected TCP ports, and where datagrams are refused.
    pub ports: Vec<u16>,
    /// Every TCP connection of a selected process is redirected, whatever
    /// its port (`ports = "all"`, `--all-ports`).
    pub all_ports: bool,
    pub listen_port: u16,
    pub passthrough: Vec<String>,
    /// Ports on which unclassifiable traffic is spliced, not refused (any
    /// port in all-ports mode, else guarded ones only).
    pub splice_ports: Vec<u16>,
    /// Longest silence before a connection's first bytes.
    pub first_bytes_timeout: std::time::Duration,
    /// Longest wait for a server's answer head, and then for its whole JSON body.
    pub response_timeout: std::time::Duration,
    /// Connections handled at once, in total (`intercept.max_connections`).
    pub max_connections: usize,
    /// Connections one process may have open at once.
    pub max_connections_per_process: usize,
    /// Calls one process may have held for approval at once.
    pub max_held_per_process: usize,
    pub max_body: u64,
    /// Largest inspected response body or SSE event.
    pub max_response_body: u64,
    pub deny_shape: DenyShape,
    /// Policy files/directories; empty means the embedded example policy.
    pub policy_paths: Vec<PathBuf>,
    pub agents: Option<PathBuf>,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    pub audit_path: PathBuf,
    /// Export sinks (`[audit] sinks`).
    pub sinks: Vec<crate::audit::export::SinkSpec>,
    pub upstream_ca: Option<PathBuf>,
    pub metrics: Option<std::net::SocketAddr>,
    pub fail_open: bool,
    /// `[approvals.ciba]`, validated.
    pub ciba: Option<CibaConfig>,
    /// `[approvals.webhook]`, validated.
    pub webhook: Option<crate::approvals::webhook::WebhookConfig>,
    /// `[approvals] separate_duties`: the approver's uid must differ from the
    /// held call's agent process's uid.
    pub separate_duties: bool,
    /// `[approvals] max_pending`: calls held at once.
    pub max_pending: usize,
    /// `[control] group`: the approvers group of the control socket.
    pub control_group: Option<String>,
    /// `[[broker]]` entries: credentials kya holds for servers.
    pub broker: Vec<crate::broker::BrokerSection>,
    /// `[audit] args`: record tool call arguments (after `audit_redact`).
    pub audit_args: bool,
    /// `[audit] redact`: argument paths replaced by `[redacted]`.
    pub audit_redact: Vec<String>,
    /// `[kubernetes]`, resolved: the pod watch runs.
    pub kubernetes: Option<crate::kube::client::KubeSettings>,
    /// `[proof]`: servers that get a decision receipt, and its validity.
    pub proof: crate::decision::receipts::ProofSettings,
}

/// What the command line sets on top of the config file (the `kya run`
/// flags, parsed by the CLI): lists are added to the file's, the rest wins.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// Config file (TOML). Default /etc/kya/kya.toml; a missing default file is fine.
    pub config: Option<PathBuf>,
    /// Policy file or directory (repeatable). Default: the config's policy.paths, else the embedded example policy.
    pub policies: Vec<PathBuf>,
    /// Agent registry (TOML); registered agents are selected too.
    pub agents: Option<PathBuf>,
    /// Select processes in this cgroup v2 path (relative to the cgroup2 mount) and its descendants.
    pub cgroups: Vec<String>,
    /// Select processes running as this uid.
    pub uids: Vec<u32>,
    /// Select processes executing this path (globs are expanded), from exec on.
    pub exes: Vec<String>,
    /// Select this process (tgid) and its future children.
    pub pids: Vec<u32>,
    /// Select this container (full id, a unique prefix of 12+ hex digits, or
    /// its name) through its cgroup.
    pub containers: Vec<String>,
    /// Select every cgroup whose path matches this glob, now and as they appear.
    pub cgroup_globs: Vec<String>,
    /// Select every running container of this image, now and as they start.
    pub images: Vec<String>,
    /// Add a guarded destination port (default 80 and 443, plus intercept.ports).
    pub ports: Vec<u16>,
    /// Redirect every TCP connection of a selected process, whatever its port
    /// (as `[intercept] ports = "all"`): TLS and HTTP are inspected on any
    /// port, anything else is refused unless its port is in splice_ports.
    /// UDP stays refused on the guarded ports only.
    pub all_ports: bool,
    /// Port the interceptor listens on at 127.0.0.1 and ::1; must be below 1024.
    pub listen_port: Option<u16>,
    /// Directory for this instance's pinned BPF objects (default /sys/fs/bpf/kya).
    pub pin_dir: Option<PathBuf>,
    /// State directory: CA, keys, control socket, approvals (default /var/lib/kya).
    pub state_dir: Option<PathBuf>,
    /// Audit log file (default STATE_DIR/audit.jsonl).
    pub audit: Option<PathBuf>,
    /// Extra CA certificates (PEM) trusted for upstream TLS, besides the system roots.
    pub upstream_ca: Option<PathBuf>,
    /// Serve Prometheus metrics at this address (e.g. 127.0.0.1:9464).
    pub metrics: Option<std::net::SocketAddr>,
    /// Leave nothing pinned: if the daemon dies, selected processes connect directly.
    pub fail_open: bool,
    /// The control socket's approvers group (as `[control] group`).
    pub control_group: Option<String>,
}

impl Config {
    /// Read the config file named by `--config` (or the default, if present) and apply the flags.
    pub fn load(args: &Overrides) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => {
                let default = Path::new(DEFAULT_CONFIG);
                if default.exists() {
                    read_file(default)?
                } else {
                    FileConfig::default()
                }
            }
        };
        Self::merge(file, args)
    }

    /// Merge a parsed file with the flags (flags win; lists are added together).
    pub fn merge(file: FileConfig, args: &Overrides) -> Result<Self, ConfigError> {
        let mut selection = Selection {
            cgroups: file.select.cgroups,
            containers: file.select.containers,
            cgroup_globs: file.select.cgroup_globs,
            images: file.select.images,
            uids: file.select.uids,
            exes: file.select.exes,
            pids: file.select.pids,
        };
        selection.cgroups.extend(args.cgroups.iter().cloned());
        selection.containers.extend(args.containers.iter().cloned());
        selection
            .cgroup_globs
            .extend(args.cgroup_globs.iter().cloned());
        selection.images.extend(args.images.iter().cloned());
        selection.uids.extend(args.uids.iter().copied());
        selection.exes.extend(args.exes.iter().cloned());
        selection.pids.extend(args.pids.iter().copied());
        for cg in &mut selection.cgroups {
            *cg = normalize_cgroup(cg)?;
        }
        dedup(&mut selection.cgroups);
        dedup(&mut selection.containers);
        dedup(&mut selection.cgroup_globs);
        crate::cgroup_glob::CgroupGlobs::new(&selection.cgroup_globs)
            .map_err(|e| ConfigError::CgroupGlob(e.to_string()))?;
        dedup(&mut selection.images);
        crate::image_select::ImageSelectors::new(&selection.images)
            .map_err(|e| ConfigError::Image(e.to_string()))?;
        dedup(&mut selection.uids);
        dedup(&mut selection.exes);
        dedup(&mut selection.pids);

        let mut ports: Vec<u16> = DEFAULT_PORTS.to_vec();
        let mut all_ports = args.all_ports;
        match &file.intercept.ports {
            None => {}
            Some(PortsValue::List(list)) => ports.extend(list.iter().copied()),
            Some(PortsValue::Word(w)) if w == "all" => all_ports = true,
            Some(PortsValue::Word(w)) => {
                return Err(ConfigError::Intercept(format!(
                    "ports = {w:?}: expected a list of port numbers or \"all\""
                )))
            }
        }
        ports.extend(args.ports.iter().copied());
        if ports.contains(&0) {
            return Err(ConfigError::GuardedPortZero);
        }
        dedup(&mut ports);

        let listen_port = args
            .listen_port
            .or(file.intercept.listen_port)
            .unwrap_or(DEFAULT_LISTEN_PORT);
        if listen_port == 0 {
            return Err(ConfigError::ListenPortZero);
        }
        if listen_port >= 1024 {
            return Err(ConfigError::ListenPortNotPrivileged(listen_port));
        }

        let mut splice_ports = file.intercept.splice_ports.clone();
        dedup(&mut splice_ports);
        if splice_ports.contains(&0) {
            return Err(ConfigError::Intercept(
                "splice_ports names port 0, which is not a port".into(),
            ));
        }
        if let Some(p) = splice_ports
            .iter()
            .find(|p| !all_ports && !ports.contains(p))
        {
            return Err(ConfigError::Intercept(format!(
                "splice_ports names port {p}, which is not guarded (add it to ports, or set ports = \"all\")"
            )));
        }
        let first_bytes_timeout = timeout_key(
            "first_bytes_timeout",
            file.intercept.first_bytes_timeout.as_deref(),
            DEFAULT_FIRST_BYTES_TIMEOUT,
            std::time::Duration::from_secs(600),
        )?;
        let response_timeout = timeout_key(
            "response_timeout",
            file.intercept.response_timeout.as_deref(),
            DEFAULT_RESPONSE_TIMEOUT,
            std::time::Duration::from_secs(24 * 3600),
        )?;
        let max_connections = file
            .intercept
            .max_connections
            .unwrap_or(DEFAULT_MAX_CONNECTIONS);
        let max_connections_per_process = file
            .intercept
            .max_connections_per_process
            .unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_PROCESS);
        let max_held_per_process = file
            .intercept
            .max_held_per_process
            .unwrap_or(DEFAULT_MAX_HELD_PER_PROCESS);
        if max_connections == 0 || max_connections_per_process == 0 || max_held_per_process == 0 {
            return Err(ConfigError::Intercept(
                "max_connections, max_connections_per_process and max_held_per_process must be at least 1".into(),
            ));
        }
        let max_body = match &file.intercept.max_body {
            Some(v) => v.bytes()?,
            None => DEFAULT_MAX_BODY,
        };
        let max_response_body = match &file.intercept.max_response_body {
            Some(v) => v.bytes()?,
            None => DEFAULT_MAX_RESPONSE_BODY,
        };
        let state_dir = args
            .state_dir
            .clone()
            .or(file.state.dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        let audit_path = args
            .audit
            .clone()
            .or(file.audit.path.clone())
            .unwrap_or_else(|| state_dir.join("audit.jsonl"));
        let sinks = file
            .audit
            .sinks
            .iter()
            .map(|s| s.parse().map_err(ConfigError::Sink))
            .collect::<Result<Vec<_>, _>>()?;
        let separate_duties = file.approvals.separate_duties;
        let max_pending = match file.approvals.max_pending {
            None => crate::approvals::pending::DEFAULT_MAX_PENDING,
            Some(0) => {
                return Err(ConfigError::Approvals(
                    "max_pending must be at least 1".into(),
                ))
            }
            Some(n) => n,
        };
        let control_group = args.control_group.clone().or(file.control.group);
        if let Some(g) = &control_group {
            if g.trim().is_empty() || g.contains(['/', ':', '\0']) {
                return Err(ConfigError::Control(format!(
                    "group {g:?} is not a group name"
                )));
            }
        }
        for entry in &file.audit.redact {
            if entry.is_empty() || entry == "/" {
                return Err(ConfigError::Audit(format!(
                    "redact entry {entry:?} names no argument (use a JSON Pointer such as \"/auth/password\" or a key name)"
                )));
            }
        }
        let ciba = file.approvals.ciba.map(CibaSection::validate).transpose()?;
        let webhook = file
            .approvals
            .webhook
            .map(WebhookSection::validate)
            .transpose()?;
        let kubernetes = match &file.kubernetes {
            Some(k) => Some(
                crate::kube::client::KubeSettings::resolve(
                    k.pod_selector.as_deref(),
                    k.node.as_deref(),
                    k.api.as_deref(),
                    k.token_file.as_deref(),
                    k.ca_file.as_deref(),
                )
                .map_err(|e| ConfigError::Kubernetes(e.to_string()))?,
            ),
            None => None,
        };
        let proof = file.proof.validate(&file.intercept.passthrough)?;
        let policy_paths = if args.policies.is_empty() {
            file.policy.paths
        } else {
            args.policies.clone()
        };
        Ok(Config {
            selection,
            ports,
            all_ports,
            listen_port,
            passthrough: file.intercept.passthrough,
            splice_ports,
            first_bytes_timeout,
            response_timeout,
            max_connections,
            max_connections_per_process,
            max_held_per_process,
            max_body,
            max_response_body,
            deny_shape: file.intercept.deny_shape.unwrap_or_default(),
            policy_paths,
            agents: args.agents.clone().or(file.policy.agents),
            pin_dir: args
                .pin_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_DIR)),
            state_dir,
            audit_path,
            sinks,
            upstream_ca: args.upstream_ca.clone(),
            metrics: args.metrics,
            fail_open: args.fail_open,
            ciba,
            webhook,
            separate_duties,
            max_pending,
            control_group,
            broker: file.broker,
            audit_args: file.audit.args,
            audit_redact: file.audit.redact,
            kubernetes,
            proof,
        })
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_file(path, &text)
}

/// Parse config text; errors carry `file:line:` where TOML gives a span.
pub fn parse_file(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        let message = e.message().to_string();
        ConfigError::Parse {
            path: match line {
                Some(l) => PathBuf::from(format!("{}:{l}", path.display())),
                None => path.to_path_buf(),
            },
            message,
        }
    })
}

/// A `[proof] servers` entry as the proxy names servers: lower case, no
/// trailing dot, an IPv6 address without brackets; `None` when it is not a
/// host name or address (a port, a scheme, a path).
fn proof_server_name(entry: &str) -> Option<String> {
    let t = entry.trim();
    let t = t
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(t);
    let t = t.strip_suffix('.').unwrap_or(t).to_ascii_lowercase();
    let chars_ok = !t.is_empty()
        && t.len() <= 253
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':'));
    if !chars_ok || (t.contains(':') && t.parse::<std::net::Ipv6Addr>().is_err()) {
        return None;
    }
    Some(t)
}

/// An `[intercept]` duration key such as "30s" or "10m": `default` when
/// absent; more than zero and at most `max`.
fn timeout_key(
    key: &str,
    value: Option<&str>,
    default: std::time::Duration,
    max: std::time::Duration,
) -> Result<std::time::Duration, ConfigError> {
    let Some(t) = value else {
        return Ok(default);
    };
    let d = humantime::parse_duration(t)
        .map_err(|e| ConfigError::Intercept(format!("{key} {t:?}: {e}")))?;
    if d.is_zero() || d > max {
        return Err(ConfigError::Intercept(format!(
            "{key} must be more than 0 and at most {}",
            humantime::format_duration(max)
        )));
    }
    Ok(d)
}

/// Parse `4MiB`, `512KiB`, `1GiB`, `10MB`, `100kB`, `123` or `123B`.
pub fn parse_size(text: &str) -> Result<u64, ConfigError> {
    let err = || ConfigError::Size(text.to_string());
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() {
        return Err(err());
    }
    let n: u64 = digits.parse().map_err(|_| err())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(err()),
    };
    n.checked_mul(mult).ok_or_else(err)
}

/// A cgroup path as the kernel shows it: leading '/', no trailing '/', no `..`.
pub fn normalize_cgroup(path: &str) -> Result<String, ConfigError> {
    let p = path.trim();
    if !p.starts_with('/') || p.split('/').any(|c| c == "..") {
        return Err(ConfigError::CgroupPath(path.to_string()));
    }
    let trimmed = p.trim_end_matches('/');
    Ok(if trimmed.is_empty() {
        "/".to_string()
    } else {
        trimmed.to_string()
    })
}

fn dedup<T: PartialEq>(v: &mut Vec<T>) {
    let mut out: Vec<T> = Vec::with_capacity(v.len());
    for x in v.drain(..) {
        if !out.contains(&x) {
            out.push(x);
        }
    }
    *v = out;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_reject_garbage() {
        assert_eq!(parse_size("4MiB").unwrap(), 4 << 20);
        assert_eq!(parse_size("512KiB").unwrap(), 512 << 10);
        assert_eq!(parse_size("10MB").unwrap(), 10_000_000);
        assert_eq!(parse_size("123").unwrap(), 123);
        for bad in [
            "",
            "MiB",
            "4 parsecs",
            "-1",
            "18446744073709551615GiB",
            "4.5MiB",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn full_example_parses_and_flags_override() {
        let text = r#"
[select]
cgroups = ["/agents/"]
containers = ["3f4e8a1b2c3d"]
cgroup_globs = ["/libpod_parent/libpod-*"]
images = ["localhost/agent:1.2"]
uids = [1001]
exes = ["/usr/local/bin/agent"]
[intercept]
ports = [80, 443, 8000]
listen_port = 853
passthrough = ["*.pinned.example.com"]
max_body = "4MiB"
deny_shape = "jsonrpc_error"
[policy]
paths = ["/etc/kya/policies"]
agents = "/etc/kya/agents.toml"
[audit]
path = "/var/lib/kya/audit.jsonl"
[state]
dir = "/var/lib/kya"
"#;
        let file = parse_file(Path::new("kya.toml"), text).unwrap();
        let args = Overrides {
            listen_port: Some(900),
            uids: vec![1001, 1002],
            containers: vec!["3f4e8a1b2c3d".into(), "0123456789ab".into()],
            cgroup_globs: vec!["/system.slice/docker-*.scope".into()],
            images: vec!["agent".into(), "localhost/agent:1.2".into()],
            ports: vec![8443],
            ..Default::default()
        };
        let cfg = Config::merge(file, &args).unwrap();
        assert_eq!(cfg.listen_port, 900);
        assert_eq!(cfg.selection.cgroups, vec!["/agents"]);
        assert_eq!(
            cfg.selection.containers,
            vec!["3f4e8a1b2c3d", "0123456789ab"]
        );
        assert_eq!(
            cfg.selection.cgroup_globs,
            vec!["/libpod_parent/libpod-*", "/system.slice/docker-*.scope"]
        );
        let bad = Overrides {
            cgroup_globs: vec!["libpod-*".into()],
            ..Default::default()
        };
        assert!(matches!(
            Config::merge(FileConfig::default(), &bad),
            Err(ConfigError::CgroupGlob(_))
        ));
        assert_eq!(cfg.selection.images, vec!["localhost/agent:1.2", "agent"]);
        for image in ["", "Agent", "agent;id", "$(id)"] {
            let bad = Overrides {
                images: vec![image.into()],
                ..Default::default()
            };
            assert!(
                matches!(
                    Config::merge(FileConfig::default(), &bad),
                    Err(ConfigError::Image(_))
                ),
                "{image:?}"
            );
        }
        assert_eq!(cfg.selection.uids, vec![1001, 1002]);
        assert_eq!(cfg.ports, vec![80, 443, 8000, 8443]);
        assert_eq!(cfg.max_body, 4 << 20);
        assert_eq!(cfg.deny_shape, DenyShape::JsonrpcError);
        assert_eq!(cfg.passthrough, vec!["*.pinned.example.com"]);
        assert_eq!(cfg.audit_path, PathBuf::from("/var/lib/kya/audit.jsonl"));
    }

    #[test]
    fn the_shipped_example_config_parses_and_means_the_defaults() {
        let text = include_str!("../../packaging/kya.toml");
        let file = parse_file(Path::new("packaging/kya.toml"), text).unwrap();
        let cfg = Config::merge(file, &Overrides::default()).unwrap();
        assert_eq!(cfg.listen_port, DEFAULT_LISTEN_PORT);
        assert!(cfg.selection.is_empty());
        assert!(cfg.sinks.is_empty());
    }

    #[test]
    fn timeouts_are_read_and_bounded() {
        let merge = |text: &str| {
            Config::merge(
                parse_file(Path::new("k.toml"), text).unwrap(),
                &Overrides::default(),
            )
        };
        let cfg = merge("").unwrap();
        assert_eq!(cfg.first_bytes_timeout, DEFAULT_FIRST_BYTES_TIMEOUT);
        assert_eq!(cfg.response_timeout, DEFAULT_RESPONSE_TIMEOUT);
        let cfg = merge("[intercept]\nfirst_bytes_timeout = \"5s\"\nresponse_timeout = \"2h\"\n")
            .unwrap();
        assert_eq!(cfg.first_bytes_timeout, std::time::Duration::from_secs(5));
        assert_eq!(cfg.response_timeout, std::time::Duration::from_secs(7200));
        for bad in [
            "response_timeout = \"0s\"",
            "response_timeout = \"25h\"",
            "response_timeout = \"soon\"",
            "response_timeout = \"-1s\"",
            "first_bytes_timeout = \"11m\"",
            "response_timeout = 30",
        ] {
            let text = format!("[intercept]\n{bad}\n");
            let err = parse_file(Path::new("k.toml"), &text)
                .and_then(|f| Config::merge(f, &Overrides::default()));
            assert!(err.is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn load_limits_are_read_and_zero_is_refused() {
        let file = parse_file(
            Path::new("k.toml"),
            "[intercept]\nmax_connections = 10000\nmax_connections_per_process = 20\nmax_held_per_process = 3\n",
        )
        .unwrap();
        let cfg = Config::merge(file, &Overrides::default()).unwrap();
        assert_eq!(cfg.max_connections, 10000);
        assert_eq!(cfg.max_connections_per_process, 20);
        assert_eq!(cfg.max_held_per_process, 3);
        let cfg = Config::merge(
            parse_file(Path::new("k.toml"), "").unwrap(),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(cfg.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(
            cfg.max_connections_per_process,
            DEFAULT_MAX_CONNECTIONS_PER_PROCESS
        );
        assert_eq!(cfg.max_held_per_process, DEFAULT_MAX_HELD_PER_PROCESS);
        for bad in [
            "max_connections = 0",
            "max_connections_per_process = 0",
            "max_held_per_process = 0",
            "max_connections = -1",
            "max_connections = \"many\"",
        ] {
            let text = format!("[intercept]\n{bad}\n");
            let parsed = parse_file(Path::new("k.toml"), &text)
                .map_err(|e| e.to_string())
                .and_then(|f| Config::merge(f, &Overrides::default()).map_err(|e| e.to_string()));
            assert!(parsed.is_err(), "{bad}");
        }
    }

    #[test]
    fn proof_servers_are_normalized_and_checked() {
        let load = |text: &str| {
            parse_file(Path::new("k.toml"), text)
                .map_err(|e| e.to_string())
                .and_then(|f| Config::merge(f, &Overrides::default()).map_err(|e| e.to_string()))
        };
        let cfg = load(
            "[proof]\nservers = [\"API.Example.com.\", \"127.0.0.1\", \"[::1]\"]\nttl = \"30s\"\n",
        )
        .unwrap();
        let mut names: Vec<_> = cfg.proof.servers.iter().cloned().collect();
        names.sort();
        assert_eq!(names, ["127.0.0.1", "::1", "api.example.com"]);
        assert_eq!(cfg.proof.ttl, std::time::Duration::from_secs(30));
        // Off by default; the default validity is a minute.
        let cfg = load("").unwrap();
        assert!(cfg.proof.servers.is_empty());
        assert_eq!(cfg.proof.ttl, std::time::Duration::from_secs(60));
        for bad in [
            "[proof]\nservers = [\"api.example.com:443\"]\n",
            "[proof]\nservers = [\"https://api.example.com\"]\n",
            "[proof]\nservers = [\"\"]\n",
            "[proof]\nservers = [\"a b\"]\n",
            "[proof]\nttl = \"0s\"\n",
            "[proof]\nttl = \"1h\"\n",
            "[proof]\nttl = \"soon\"\n",
            "[proof]\nheader = \"X-Proof\"\n",
            // A passthrough server is never read: no receipt, no stripping.
            "[intercept]\npassthrough = [\"*.bank.example\"]\n[proof]\nservers = [\"api.bank.example\"]\n",
        ] {
            assert!(load(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sinks_are_checked_at_load() {
        let file = parse_file(
            Path::new("k.toml"),
            "[audit]\nsinks = [\"stdout\", \"file:/var/log/kya/e.jsonl\", \"syslog\", \"syslog:udp://127.0.0.1:514?facility=local0\"]\n",
        )
        .unwrap();
        assert_eq!(
            Config::merge(file, &Overrides::default())
                .unwrap()
                .sinks
                .len(),
            4
        );
        let bad = parse_file(
            Path::new("k.toml"),
            "[audit]\nsinks = [\"syslog:pigeon://x\"]\n",
        )
        .unwrap();
        assert!(matches!(
            Config::merge(bad, &Overrides::default()),
            Err(ConfigError::Sink(_))
        ));
    }

    #[test]
    fn separation_of_duties_is_opt_in() {
        let load = |text: &str| {
            parse_file(Path::new("k.toml"), text)
                .and_then(|f| Config::merge(f, &Overrides::default()))
        };
        assert!(!load("").unwrap().separate_duties);
        assert!(!load("[approvals]\n").unwrap().separate_duties);
        assert_eq!(
            load("").unwrap().max_pending,
            crate::approvals::pending::DEFAULT_MAX_PENDING
        );
        assert_eq!(
            load("[approvals]\nmax_pending = 20000\n")
                .unwrap()
                .max_pending,
            20000
        );
        assert!(load("[approvals]\nmax_pending = 0\n").is_err());
        assert!(load("[approvals]\nmax_pending = -1\n").is_err());
        assert!(
            load("[approvals]\nseparate_duties = true\n")
                .unwrap()
                .separate_duties
        );
        for bad in [
            "[approvals]\nseparate_duties = \"yes\"\n",
            "[approvals]\nseparate_duty = true\n",
        ] {
            assert!(load(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ciba_section_is_validated_at_load() {
        let load = |text: &str| {
            parse_file(Path::new("k.toml"), text)
                .and_then(|f| Config::merge(f, &Overrides::default()))
        };
        let cfg = load(
            "[approvals.ciba]\nissuer = \"https://login.example.com\"\nclient_id = \"kya\"\n\
             client_secret_file = \"/etc/kya/ciba-secret\"\n",
        )
        .unwrap();
        let c = cfg.ciba.unwrap();
        assert_eq!(c.mode, CibaMode::Poll);
        assert_eq!(
            c.client_auth,
            CibaClientAuth::SecretFile("/etc/kya/ciba-secret".into())
        );
        let ping = load(
            "[approvals.ciba]\nissuer = \"http://127.0.0.1:18300\"\nclient_id = \"kya\"\n\
             client_secret = \"s\"\nmode = \"ping\"\nping_listen = \"127.0.0.1:8790\"\n\
             ping_url = \"https://localhost:8790/ciba/notify\"\n",
        )
        .unwrap()
        .ciba
        .unwrap();
        let p = ping.ping.unwrap();
        assert_eq!(
            (p.host.as_str(), p.path.as_str()),
            ("localhost", "/ciba/notify")
        );
        assert_eq!(
            format!("{:?}", ping.client_auth),
            "SecretInline(<redacted>)"
        );
        let jwt = load(
            "[approvals.ciba]\nissuer = \"https://login.example.com\"\nclient_id = \"kya\"\n\
             client_key_file = \"/etc/kya/ciba-client.pem\"\n",
        )
        .unwrap()
        .ciba
        .unwrap();
        assert_eq!(
            jwt.client_auth,
            CibaClientAuth::PrivateKeyFile("/etc/kya/ciba-client.pem".into())
        );
        let base = "[approvals.ciba]\nclient_id = \"kya\"\nclient_secret = \"s\"\n";
        for (bad, why) in [
            (format!("{base}issuer = \"http://login.example.com\"\n"), "loopback"),
            (base.to_string(), "issuer is required"),
            (format!("{base}issuer = \"https://x\"\nclient_secret_file = \"/s\"\n"), "exclusive"),
            (format!("{base}issuer = \"https://x\"\nclient_key_file = \"/k.pem\"\n"), "exclusive"),
            (
                "[approvals.ciba]\nissuer = \"https://x\"\nclient_id = \"kya\"\n".into(),
                "client authentication is required",
            ),
            (
                "[approvals.ciba]\nissuer = \"https://x\"\nclient_id = \"kya\"\nclient_key_file = \"k.pem\"\n".into(),
                "client_key_file must be an absolute path",
            ),
            (format!("{base}issuer = \"https://x\"\nmode = \"ping\"\n"), "ping_listen"),
            (format!("{base}issuer = \"https://x\"\nmode = \"push\"\n"), "unknown variant"),
            (format!("{base}issuer = \"https://x\"\nping_url = \"https://x/n\"\n"), "need mode"),
            (
                format!("{base}issuer = \"https://x\"\nmode = \"ping\"\nping_listen = \"127.0.0.1:1\"\nping_url = \"http://localhost/n\"\n"),
                "must be https",
            ),
            (format!("{base}issuer = \"https://x\"\nbogus = 1\n"), "unknown field"),
            (
                "[approvals.ciba]\nissuer = \"https://x\"\nclient_id = \"kya\"\nclient_secret_file = \"rel\"\n".into(),
                "absolute",
            ),
        ] {
            let e = load(&bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn control_group_and_audit_redaction_keys() {
        let load = |text: &str, args: &Overrides| {
            parse_file(Path::new("k.toml"), text).and_then(|f| Config::merge(f, args))
        };
        let none = Overrides::default();
        let cfg = load("", &none).unwrap();
        assert_eq!(cfg.control_group, None);
        assert!(!cfg.audit_args);
        assert!(cfg.audit_redact.is_empty());
        let cfg = load(
            "[control]\ngroup = \"kya-approvers\"\n[audit]\nargs = true\nredact = [\"/auth/password\", \"token\"]\n",
            &none,
        )
        .unwrap();
        assert_eq!(cfg.control_group.as_deref(), Some("kya-approvers"));
        assert!(cfg.audit_args);
        assert_eq!(cfg.audit_redact, ["/auth/password", "token"]);
        // the flag wins over the file
        let flag = Overrides {
            control_group: Some("ops".into()),
            ..Default::default()
        };
        let cfg = load("[control]\ngroup = \"kya-approvers\"\n", &flag).unwrap();
        assert_eq!(cfg.control_group.as_deref(), Some("ops"));
        for (bad, why) in [
            ("[control]\ngroup = \"\"\n", "not a group name"),
            ("[control]\ngroup = \"a/b\"\n", "not a group name"),
            ("[control]\ngroup = \"a:b\"\n", "not a group name"),
            ("[control]\nmode = \"0666\"\n", "unknown field"),
            ("[control]\ngroup = 5\n", "invalid type"),
            ("[audit]\nredact = [\"\"]\n", "names no argument"),
            ("[audit]\nredact = [\"/\"]\n", "names no argument"),
            ("[audit]\nredact = \"token\"\n", "invalid type"),
            ("[audit]\nargs = \"yes\"\n", "invalid type"),
        ] {
            let e = load(bad, &none).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn all_ports_from_the_file_or_the_flag() {
        let load = |text: &str, args: &Overrides| {
            parse_file(Path::new("k.toml"), text).and_then(|f| Config::merge(f, args))
        };
        let none = Overrides::default();
        let cfg = load(
            "[intercept]\nports = \"all\"\nsplice_ports = [22, 5432]\n",
            &none,
        )
        .unwrap();
        assert!(cfg.all_ports);
        // the listed ports stay: datagrams are refused there
        assert_eq!(cfg.ports, vec![80, 443]);
        assert_eq!(cfg.splice_ports, vec![22, 5432]);
        let flag = Overrides {
            all_ports: true,
            ports: vec![8443],
            ..Default::default()
        };
        let cfg = load("[intercept]\nsplice_ports = [6379]\n", &flag).unwrap();
        assert!(cfg.all_ports);
        assert_eq!(cfg.ports, vec![80, 443, 8443]);
        let listed = load("[intercept]\nports = [8000]\n", &none).unwrap();
        assert!(!listed.all_ports);
        assert_eq!(listed.ports, vec![80, 443, 8000]);
        // a splice port must be guarded unless every port is
        let e = load("[intercept]\nsplice_ports = [22]\n", &none)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not guarded"), "{e}");
        for (bad, why) in [
            ("[intercept]\nports = \"some\"\n", "\"all\""),
            ("[intercept]\nports = \"ALL\"\n", "\"all\""),
            ("[intercept]\nports = \"\"\n", "\"all\""),
            ("[intercept]\nports = [80, \"all\"]\n", "\"all\""),
            ("[intercept]\nports = [\"all\"]\n", "\"all\""),
            ("[intercept]\nports = 443\n", "\"all\""),
            ("[intercept]\nports = [70000]\n", "\"all\""),
            ("[intercept]\nports = true\n", "\"all\""),
            (
                "[intercept]\nports = \"all\"\nsplice_ports = [0]\n",
                "port 0",
            ),
        ] {
            let e = load(bad, &none).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn defaults_when_empty() {
        let cfg = Config::merge(FileConfig::default(), &Overrides::default()).unwrap();
        assert_eq!(cfg.listen_port, DEFAULT_LISTEN_PORT);
        assert_eq!(cfg.ports, vec![80, 443]);
        assert_eq!(cfg.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
        assert_eq!(cfg.audit_path, PathBuf::from("/var/lib/kya/audit.jsonl"));
        assert!(cfg.selection.is_empty());
        assert!(cfg.policy_paths.is_empty());
    }

    #[test]
    fn hostile_config_is_rejected_with_location() {
        let bad = "[intercept]\nlisten_port = 853\nbogus = 1\n";
        let err = parse_file(Path::new("k.toml"), bad)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("k.toml:3:"), "{err}");
        assert!(parse_file(Path::new("k.toml"), "[select]\nuids = [\"root\"]\n").is_err());
        assert!(parse_file(Path::new("k.toml"), "[select\n").is_err());
        let high = Overrides {
            listen_port: Some(8080),
            ..Default::default()
        };
        assert!(matches!(
            Config::merge(FileConfig::default(), &high),
            Err(ConfigError::ListenPortNotPrivileged(8080))
        ));
        let zero = Overrides {
            ports: vec![0],
            ..Default::default()
        };
        assert!(Config::merge(FileConfig::default(), &zero).is_err());
        let cg = Overrides {
            cgroups: vec!["agents".into()],
            ..Default::default()
        };
        assert!(Config::merge(FileConfig::default(), &cg).is_err());
        let cg = Overrides {
            cgroups: vec!["/a/../b".into()],
            ..Default::default()
        };
        assert!(Config::merge(FileConfig::default(), &cg).is_err());
    }

    /// The `kya.toml` the Kubernetes ConfigMap carries (a YAML block
    /// scalar under `data:`) is a valid configuration.
    #[test]
    fn the_kubernetes_configmap_config_is_valid() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/configmap.yaml");
        let yaml = std::fs::read_to_string(&path).unwrap();
        let mut lines = yaml.lines().skip_while(|l| l.trim() != "kya.toml: |");
        assert!(lines.next().is_some(), "no kya.toml in the ConfigMap");
        let text: String = lines
            .take_while(|l| l.is_empty() || l.starts_with("    "))
            .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
            .collect();
        // in a pod, the node and the API server come from its environment
        // (NODE_NAME, KUBERNETES_SERVICE_HOST); here they are written in
        assert!(text.contains("\n[kubernetes]\n"), "{text}");
        let text = text.replace(
            "\n[kubernetes]\n",
            "\n[kubernetes]\nnode = \"node-a\"\napi = \"https://10.96.0.1:443\"\n",
        );
        let file = parse_file(Path::new("kya.toml"), &text).unwrap();
        let cfg = Config::merge(file, &Overrides::default()).unwrap();
        let k = cfg.kubernetes.as_ref().expect("the pod watch runs");
        assert!(k.selector.is_none(), "no pod is selected by label");
        assert_eq!(cfg.selection.cgroup_globs.len(), 2, "{text}");
        assert!(cfg
            .selection
            .cgroup_globs
            .iter()
            .all(|g| g.starts_with("/kubepods")));
        assert_eq!(cfg.policy_paths, [PathBuf::from("/etc/kya/policy.toml")]);
        assert_eq!(cfg.sinks, [crate::audit::export::SinkSpec::Stdout]);
        assert_eq!(cfg.state_dir, PathBuf::from("/var/lib/kya"));
    }
}
