//! The `kya` command line (a contract: see the README, "Command line").

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// kya ("Know Your Agent"): an execution-plane guard for AI agents.
#[derive(Debug, Parser)]
#[command(name = "kya", version, about, propagate_version = true)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "KYA_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// How `tracing` output is rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: load the eBPF redirect, intercept and govern selected agents' traffic.
    Run(Box<RunArgs>),
    /// Show what a running daemon is doing.
    Status(StatusArgs),
    /// List and answer calls held for approval.
    Approvals(ApprovalsArgs),
    /// Manage kya's local CA: create it, print it, add it to the system trust store.
    Ca(CaArgs),
    /// Check policy files, or evaluate calls and policy tests against them.
    Policy(PolicyArgs),
    /// Issue, verify or revoke action-scoped verifiable credentials (offline).
    #[command(subcommand)]
    Credential(Box<CredentialCommand>),
    /// Work with the tamper-evident audit log.
    Audit(AuditArgs),
    /// Show decisions as they happen (recent ones, or --follow).
    Events(EventsArgs),
    /// List registered agents; suspend or resume one (the kill switch).
    Agents(AgentsArgs),
    /// The tool definitions kya pinned per server: list, diff, accept changes.
    Tools(ToolsArgs),
}

/// `kya tools`.
#[derive(Debug, Clone, Args)]
pub struct ToolsArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    #[command(subcommand)]
    pub command: ToolsCommand,
}

/// `kya tools list|diff|accept`.
#[derive(Debug, Clone, Subcommand)]
pub enum ToolsCommand {
    /// Every pinned or announced tool, with its state (unchanged, changed, new, removed).
    List {
        /// Only this server (as policy names it: SNI or Host, port stripped).
        #[arg(long)]
        server: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// How announced definitions differ from their pins, field by field
    /// (exit status 1 when any does).
    Diff {
        #[arg(long)]
        server: Option<String>,
        /// Only this tool.
        tool: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Make what the server announces now the pins of these tools (all its
    /// changed, new and removed tools when none is named).
    Accept {
        #[arg(long)]
        server: String,
        tools: Vec<String>,
    },
}

/// `kya agents`.
#[derive(Debug, Clone, Args)]
pub struct AgentsArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    #[command(subcommand)]
    pub command: AgentsCommand,
}

/// `kya agents list|suspend|resume`.
#[derive(Debug, Clone, Subcommand)]
pub enum AgentsCommand {
    /// Registered agents with owner and state.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Deny the agent's next call and end its held calls (root or its owner).
    Suspend { name: String },
    /// Lift a suspension.
    Resume { name: String },
}

/// `kya events`.
#[derive(Debug, Clone, Args)]
pub struct EventsArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    /// Keep streaming new decisions.
    #[arg(long)]
    pub follow: bool,
    /// One JSON object per line instead of the compact form.
    #[arg(long)]
    pub json: bool,
    /// Only this process.
    #[arg(long, value_name = "N")]
    pub pid: Option<u32>,
    /// Only this agent.
    #[arg(long, value_name = "NAME")]
    pub agent: Option<String>,
    /// Only this verdict (allow, deny, hold) or kind (approved, rejected, expired).
    #[arg(long, value_name = "V")]
    pub verdict: Option<String>,
    /// Only decisions at or after this time (RFC 3339).
    #[arg(long, value_name = "T")]
    pub since: Option<String>,
}

/// `kya approvals`.
#[derive(Debug, Clone, Args)]
pub struct ApprovalsArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    #[command(subcommand)]
    pub command: ApprovalsCommand,
}

/// `kya approvals list|approve|deny`.
#[derive(Debug, Clone, Subcommand)]
pub enum ApprovalsCommand {
    /// Pending approvals you may answer (all of them for root).
    List {
        /// Print JSON: an array of {id, agent, tool, owner, binding_message, expires, ...}.
        #[arg(long)]
        json: bool,
    },
    /// Approve a held call (you must be its owner or a listed approver).
    Approve {
        id: String,
        #[arg(long)]
        reason: Option<String>,
        /// Approve this tool on this server for a while (e.g. 1h), not just this
        /// one call: later calls of the agent to it are released without asking.
        #[arg(long = "for", value_name = "DURATION")]
        standing_for: Option<String>,
    },
    /// Deny a held call.
    Deny {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
}

/// `--state-dir`, shared by every client subcommand: where `kya.sock` is.
#[derive(Debug, Clone, Args)]
pub struct StateDirArg {
    /// The daemon's state directory (its control socket is STATE_DIR/kya.sock).
    #[arg(long, global = true, value_name = "DIR", default_value = crate::config::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

/// `kya status`.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `kya ca ...`
#[derive(Debug, Clone, Args)]
pub struct CaArgs {
    #[command(subcommand)]
    pub action: CaAction,
}

/// The `kya ca` actions.
#[derive(Debug, Clone, Subcommand)]
pub enum CaAction {
    /// Create the CA (ca.pem, ca-key.pem 0600) in the state dir; refuses to replace one without --force.
    Init {
        /// State directory (default: [state] dir of /etc/kya/kya.toml, else /var/lib/kya).
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Replace an existing CA (every agent trusting the old one must be given the new one).
        #[arg(long)]
        force: bool,
    },
    /// Print the CA certificate (PEM) on stdout.
    Cert {
        /// State directory (default: [state] dir of /etc/kya/kya.toml, else /var/lib/kya).
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Add the CA to the system trust store (creating the CA if needed), or remove it.
    Install {
        /// State directory (default: [state] dir of /etc/kya/kya.toml, else /var/lib/kya).
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Remove this instance's CA from the system trust store instead.
        #[arg(long)]
        uninstall: bool,
    },
}

/// `kya policy`.
#[derive(Debug, Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    pub command: PolicyCommand,
}

/// `kya policy` subcommands.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate rule files, agent registries and policy tests (exit 0 valid; else file:line: message, exit 1).
    Check(PolicyCheckArgs),
    /// Evaluate one call (--call) and print the decision as JSON, or run [[test]] files.
    Test(PolicyTestArgs),
}

/// `kya policy check PATH...`.
#[derive(Debug, Args)]
pub struct PolicyCheckArgs {
    /// Files or directories (searched recursively).
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
}

/// `kya policy test PATH... [--agents FILE] [--call FILE|-] [--explain]`.
#[derive(Debug, Args)]
pub struct PolicyTestArgs {
    /// Rule files, directories and (without --call) [[test]] files.
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// Agent registry used to resolve the call's agent from its process.
    #[arg(long, value_name = "FILE")]
    pub agents: Option<PathBuf>,
    /// A JSON call description ('-' for stdin); prints one decision.
    #[arg(long, value_name = "FILE|-")]
    pub call: Option<PathBuf>,
    /// With --call: show every rule and budget and why it matched or not.
    #[arg(long)]
    pub explain: bool,
}

/// `kya audit ...`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub command: AuditCommand,
}

/// The audit subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify an audit log (or a rotated set, oldest first): hash chain, Merkle tree,
    /// signed checkpoints. Exit 0 when intact; else exit 1 naming the first bad record.
    Verify(AuditVerifyArgs),
}

/// `kya audit verify FILE... [--key PUB]`.
#[derive(Debug, Args)]
pub struct AuditVerifyArgs {
    /// Log files in chain order (e.g. audit.jsonl.1 audit.jsonl.2 audit.jsonl).
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Public key (SPKI PEM) the checkpoints must be signed by; only this key is accepted.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Without --key: use STATE_DIR/signing-key.pub.pem when present (default /var/lib/kya).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Checkpoint file (default: <live file>.checkpoints beside the last FILE).
    #[arg(long, value_name = "FILE")]
    pub checkpoints: Option<PathBuf>,
    /// The daemon that wrote the log is stopped: a held call without a final
    /// record is a finding (without it, one that may still be waiting is
    /// reported as open).
    #[arg(long)]
    pub closed: bool,
}

/// `kya run`: every flag overrides the config file.
#[derive(Debug, Clone, Default, Args)]
pub struct RunArgs {
    /// Config file (TOML). Default /etc/kya/kya.toml; a missing default file is fine.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Policy file or directory (repeatable). Default: the config's policy.paths, else the embedded example policy.
    #[arg(long = "policy", value_name = "PATH")]
    pub policies: Vec<PathBuf>,
    /// Agent registry (TOML); registered agents are selected too.
    #[arg(long, value_name = "FILE")]
    pub agents: Option<PathBuf>,
    /// Select processes in this cgroup v2 path (relative to the cgroup2 mount) and its descendants.
    #[arg(long = "cgroup", value_name = "PATH")]
    pub cgroups: Vec<String>,
    /// Select the processes of this running container (full id, a unique
    /// prefix of at least 12 digits, or its name as podman/docker know it),
    /// found through its engine's cgroup.
    #[arg(long = "container", value_name = "ID|NAME")]
    pub containers: Vec<String>,
    /// Select every cgroup whose path (relative to the cgroup2 mount) matches
    /// this glob, e.g. '/libpod_parent/libpod-*'; rescanned while running, so
    /// containers that start later are selected as they appear.
    #[arg(long = "cgroup-glob", value_name = "GLOB")]
    pub cgroup_globs: Vec<String>,
    /// Select every running container whose image matches REF (as the
    /// engine names it: 'localhost/agent:1.2', 'agent:1.2', 'agent' for any
    /// tag, or an image id prefix of 12+ hex digits); rescanned while
    /// running, so containers started later from it are selected as they appear.
    #[arg(long = "image", value_name = "REF")]
    pub images: Vec<String>,
    /// Select processes running as this uid.
    #[arg(long = "uid", value_name = "N")]
    pub uids: Vec<u32>,
    /// Select processes executing this path (globs are expanded), from exec on.
    #[arg(long = "exe", value_name = "PATH")]
    pub exes: Vec<String>,
    /// Select this process (tgid) and its future children.
    #[arg(long = "pid", value_name = "N")]
    pub pids: Vec<u32>,
    /// Add a guarded destination port (default 80 and 443, plus intercept.ports).
    #[arg(long = "port", value_name = "N")]
    pub ports: Vec<u16>,
    /// Redirect every TCP connection of a selected process, whatever its port
    /// (as `[intercept] ports = "all"`): TLS and HTTP are inspected on any
    /// port, anything else is refused unless its port is in splice_ports.
    /// UDP stays refused on the guarded ports only.
    #[arg(long)]
    pub all_ports: bool,
    /// Port the interceptor listens on at 127.0.0.1 and ::1; must be below 1024.
    #[arg(long, value_name = "N")]
    pub listen_port: Option<u16>,
    /// Directory for this instance's pinned BPF objects (default /sys/fs/bpf/kya).
    #[arg(long, value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,
    /// State directory: CA, keys, control socket, approvals (default /var/lib/kya).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Audit log file (default STATE_DIR/audit.jsonl).
    #[arg(long, value_name = "FILE")]
    pub audit: Option<PathBuf>,
    /// Extra CA certificates (PEM) trusted for upstream TLS, besides the system roots.
    #[arg(long, value_name = "FILE")]
    pub upstream_ca: Option<PathBuf>,
    /// Serve Prometheus metrics at this address (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Leave nothing pinned: if the daemon dies, selected processes connect directly.
    #[arg(long)]
    pub fail_open: bool,
    /// The control socket's approvers group (as `[control] group`): its
    /// members may connect; without it only root may.
    #[arg(long, value_name = "GROUP")]
    pub control_group: Option<String>,
}

impl RunArgs {
    /// What these flags set on top of the config file.
    pub fn overrides(&self) -> crate::config::Overrides {
        crate::config::Overrides {
            config: self.config.clone(),
            policies: self.policies.clone(),
            agents: self.agents.clone(),
            cgroups: self.cgroups.clone(),
            uids: self.uids.clone(),
            exes: self.exes.clone(),
            pids: self.pids.clone(),
            containers: self.containers.clone(),
            cgroup_globs: self.cgroup_globs.clone(),
            images: self.images.clone(),
            ports: self.ports.clone(),
            all_ports: self.all_ports,
            listen_port: self.listen_port,
            pin_dir: self.pin_dir.clone(),
            state_dir: self.state_dir.clone(),
            audit: self.audit.clone(),
            upstream_ca: self.upstream_ca.clone(),
            metrics: self.metrics,
            fail_open: self.fail_open,
            control_group: self.control_group.clone(),
        }
    }
}

/// `kya credential ...`
#[derive(Debug, Subcommand)]
pub enum CredentialCommand {
    /// Issue a standing credential with kya's key (offline; the invoking Unix user is the approver).
    Issue(Box<CredentialIssueArgs>),
    /// Verify a credential offline: signature, window, revocation and, with --call, scope and binding.
    Verify(CredentialVerifyArgs),
    /// Revoke a credential by id; takes effect on the next call.
    Revoke(CredentialRevokeArgs),
    /// List the standing credentials in the state dir.
    List(CredentialListArgs),
}

/// `kya credential issue`
#[derive(Debug, Clone, Args)]
pub struct CredentialIssueArgs {
    /// Registered agent name the credential is for.
    #[arg(long, value_name = "NAME")]
    pub agent: String,
    /// Tool name (exact).
    #[arg(long, value_name = "T")]
    pub tool: String,
    /// MCP server (SNI / Host); default any.
    #[arg(long, value_name = "S")]
    pub server: Option<String>,
    /// Exactly these arguments: hex SHA-256 of their JCS form (makes the credential single-use).
    #[arg(long, value_name = "HEX", conflicts_with_all = ["max_args", "min_args"])]
    pub args_digest: Option<String>,
    /// Upper bound on a numeric argument (repeatable), e.g. amount=500.
    #[arg(long = "max-arg", value_name = "KEY=N")]
    pub max_args: Vec<String>,
    /// Lower bound on a numeric argument (repeatable), e.g. amount=0.
    #[arg(long = "min-arg", value_name = "KEY=N")]
    pub min_args: Vec<String>,
    /// How long the credential is valid, from now (e.g. 15m, 1h, 4days).
    #[arg(long, value_name = "DURATION", default_value = "15m")]
    pub valid_for: String,
    /// Bind to this uid.
    #[arg(long, value_name = "N")]
    pub uid: Option<u32>,
    /// Bind to this cgroup v2 path (and its descendants).
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<String>,
    /// Bind to this executable: its SHA-256 is computed now.
    #[arg(long, value_name = "PATH", conflicts_with = "exe_sha256")]
    pub exe: Option<PathBuf>,
    /// Bind to an executable by its SHA-256 (hex).
    #[arg(long, value_name = "HEX")]
    pub exe_sha256: Option<String>,
    /// Host the credential is valid on (default: this host's name).
    #[arg(long, value_name = "NAME")]
    pub host: Option<String>,
    /// Spend the credential on its first use.
    #[arg(long)]
    pub single_use: bool,
    /// Agent registry (TOML): the agent must be registered and not expired, the
    /// invoking user must be its owner (or root), and its `match` selectors
    /// (uid, cgroup, exe) become the binding where no flag gives one.
    #[arg(long, value_name = "FILE")]
    pub agents: Option<PathBuf>,
    /// State directory holding kya's key and the credential store.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Write the credential here instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Sign with the key in the state dir even when a daemon runs (needs read
    /// access to the key). By default the running daemon issues, authorising
    /// the caller by SO_PEERCRED against its live agent registry.
    #[arg(long)]
    pub offline: bool,
}

/// `kya credential verify`
#[derive(Debug, Clone, Args)]
pub struct CredentialVerifyArgs {
    /// Credential file (JSON), or a file holding a `Kya-Decision` header
    /// value (a decision receipt), or - for stdin.
    #[arg(value_name = "FILE", required_unless_present = "header")]
    pub file: Option<PathBuf>,
    /// A `Kya-Decision` header value (a decision receipt) to verify.
    #[arg(long, value_name = "VALUE", conflicts_with = "file")]
    pub header: Option<String>,
    /// The request body a decision receipt must be bound to (the bytes the server received).
    #[arg(long, value_name = "FILE")]
    pub body: Option<PathBuf>,
    /// Trusted issuer key: an SPKI PEM file, a did:key, or a z6Mk... multikey.
    #[arg(long, value_name = "PUB")]
    pub key: Option<String>,
    /// State directory: its kya public key is trusted (unless --key) and its revocations apply.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// A call description (as for `kya policy test`) the credential must cover; - for stdin.
    #[arg(long, value_name = "CALL.json")]
    pub call: Option<PathBuf>,
    /// Check the window at this time (RFC 3339) instead of the call's time or now.
    #[arg(long, value_name = "TIME")]
    pub now: Option<String>,
    /// Use the credential for the call: a single-use credential is spent (in the
    /// state dir's store), so presenting it again is refused as a replay.
    #[arg(long, requires = "call")]
    pub consume: bool,
}

/// `kya credential revoke`
#[derive(Debug, Clone, Args)]
pub struct CredentialRevokeArgs {
    /// Credential id (urn:uuid:...).
    #[arg(value_name = "ID")]
    pub id: String,
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Write the revocation to the state dir directly even when a daemon runs.
    #[arg(long)]
    pub offline: bool,
}

/// `kya credential list`
#[derive(Debug, Clone, Args)]
pub struct CredentialListArgs {
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Print a JSON array.
    #[arg(long)]
    pub json: bool,
}

/// Install the global `tracing` subscriber (stderr; `RUST_LOG` filters, default `info`).
pub fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A subscriber may already be installed (tests); that is not an error.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
