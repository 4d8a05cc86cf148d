//! The `kya` command line (a contract: see DESIGN.md, "The `kya` command line").

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
// Parsed once per process; boxing `RunArgs` would only add noise at every use.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Run the daemon: load the eBPF redirect, intercept and govern selected agents' traffic.
    Run(RunArgs),
    /// Manage kya's local CA: create it, print it, add it to the system trust store.
    Ca(CaArgs),
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
