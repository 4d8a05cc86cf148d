//! `cargo xtask`: developer automation for kya.
//!
//! * `test`: the whole suite (the README's and CI's one command): format and lint
//!   checks, build, every Rust test (privileged end-to-end tests need root;
//!   they skip without it on a laptop and fail under `CI=true`).
//!   As root it first runs `kernel-matrix` (under `CI=true` a missing kernel
//!   or virtme-ng is a failure, elsewhere a skip).
//! * `kernel-matrix [--kernel 6.1]`: the kernel-dependent end-to-end checks
//!   booted on Debian 12's 6.1 and Debian's 6.12 kernels in QEMU.
//! * `clean-host`: remove what a crashed earlier run left on this machine
//!   (test pins, test cgroups), never touching a running kya.
//! * `bench-connect`: the connection-setup load harness (root).
//! * `bench-e2e [--quick]`: the same MCP workload end to end, direct, through
//!   kya and through mitmproxy (root).
//! * `bench`: the criterion benchmarks.

mod bench_connect;
mod bench_e2e;
mod clean;
mod kernel_matrix;
mod leftovers;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Run the whole test suite.
    Test {
        /// Skip `cargo fmt --check` and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Remove leftovers of crashed test runs (pins, cgroups).
    CleanHost,
    /// Boot each kernel of the matrix in QEMU and run the kernel-dependent
    /// end-to-end checks in it (needs root, virtme-ng and the kernels that
    /// scripts/install-deps.sh installs).
    KernelMatrix {
        /// Only this kernel (6.1 or 6.12).
        #[arg(long)]
        kernel: Option<String>,
    },
    /// Measure connection setup overhead (needs root).
    BenchConnect {
        /// Connects per measurement.
        #[arg(long, default_value_t = 2000)]
        count: usize,
    },
    /// Measure an MCP workload end to end: direct, through kya, through
    /// mitmproxy (needs root; installs mitmproxy into a private venv).
    BenchE2e {
        /// A small configuration (about a second per workload), for CI.
        #[arg(long)]
        quick: bool,
        /// Seconds per workload (default 10, or 1 with --quick).
        #[arg(long)]
        seconds: Option<f64>,
        /// Skip the run against the real Python SDK server.
        #[arg(long)]
        no_sdk: bool,
        /// Measure only these paths (direct, kya, mitmproxy; default all three).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Record a CPU profile of the daemon (`perf record -g`) during the
        /// kept-alive workloads through kya, into this file.
        #[arg(long)]
        perf: Option<std::path::PathBuf>,
        /// With --perf: profile the new-connection workload (b) instead of
        /// the kept-alive ones.
        #[arg(long, requires = "perf")]
        perf_new_conn: bool,
        /// (h): kept-alive connections open at once (default 10000, or 100 with --quick).
        #[arg(long)]
        scale_connections: Option<usize>,
        /// (h): calls held at once (default 10000, or 50 with --quick).
        #[arg(long)]
        scale_held: Option<usize>,
        /// Run only these workloads (standard: (a)-(g); scale: (h), (i);
        /// flood: (j), each limit flooded; default all three).
        #[arg(long, value_delimiter = ',')]
        workloads: Vec<String>,
    },
    /// Run the criterion benchmarks.
    Bench {
        /// Extra arguments for `cargo bench`.
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    match cli.command {
        Task::Test {
            no_lint,
            cargo_args,
        } => test(&root, no_lint, &cargo_args),
        Task::CleanHost => clean::clean_host(),
        Task::KernelMatrix { kernel } => kernel_matrix::run(&root, kernel.as_deref()),
        Task::BenchConnect { count } => bench_connect::run(&root, count),
        Task::BenchE2e {
            quick,
            seconds,
            no_sdk,
            only,
            perf,
            perf_new_conn,
            scale_connections,
            scale_held,
            workloads,
        } => {
            let mut opts = bench_e2e::Options::new(quick, seconds, no_sdk);
            opts.only(&only)?;
            opts.workloads(&workloads)?;
            opts.perf = perf;
            opts.perf_new_conn = perf_new_conn;
            if let Some(n) = scale_connections {
                opts.scale_connections = n.max(1);
            }
            if let Some(n) = scale_held {
                opts.scale_held = n.max(1);
            }
            bench_e2e::run(&root, &opts)
        }
        Task::Bench { cargo_args } => {
            let mut args = vec!["bench", "--workspace"];
            if !cargo_args.is_empty() {
                args.push("--");
                args.extend(cargo_args.iter().map(String::as_str));
            }
            cargo(&root, &args)
        }
    }
}

fn workspace_root() -> Result<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    dir.parent()
        .map(Path::to_path_buf)
        .context("xtask lives inside the workspace")
}

/// Run `cargo ARGS` in the workspace, failing on a non-zero exit.
pub fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("xtask: cargo {}", args.join(" "));
    let status = Command::new(cargo)
        .args(args)
        .current_dir(root)
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn test(root: &Path, no_lint: bool, cargo_args: &[String]) -> Result<()> {
    let is_root = nix_is_root();
    let ci = std::env::var("CI").map(|v| v == "true").unwrap_or(false);
    if !is_root {
        if ci {
            bail!("CI=true: the privileged eBPF tests must run, so the suite must run as root");
        }
        eprintln!("xtask: not root: privileged eBPF/end-to-end tests will be skipped (run with sudo for the full suite)");
    }
    if !no_lint {
        cargo(root, &["fmt", "--all", "--", "--check"])?;
        cargo(
            root,
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
        )?;
    }
    // The end-to-end tests run the real binaries: build them first.
    cargo(root, &["build", "--workspace", "--bins"])?;
    // The kernel matrix first, so that the suite's summary stays the last
    // line; its failure fails the run after the suite has run too.
    let matrix = if !is_root {
        Ok(())
    } else if kernel_matrix::installed() {
        kernel_matrix::run(root, None)
    } else if ci {
        Err(anyhow::anyhow!(
            "CI=true: the kernel matrix must run, but virtme-ng or a kernel is missing \
             (scripts/install-deps.sh installs them)"
        ))
    } else {
        eprintln!("xtask: kernel matrix skipped: virtme-ng or the matrix kernels are not installed (scripts/install-deps.sh)");
        Ok(())
    };
    let suite_cgroup = if is_root {
        clean::clean_host()?;
        Some(leftovers::SuiteCgroup::enter()?)
    } else {
        None
    };
    let mut args = vec!["test", "--workspace", "--no-fail-fast"];
    if !cargo_args.is_empty() {
        args.push("--");
        args.extend(cargo_args.iter().map(String::as_str));
    }
    let suite = cargo_test_with_summary(root, &args);
    let left = suite_cgroup.map_or(Ok(()), leftovers::SuiteCgroup::finish);
    matrix.context("kernel matrix")?;
    suite?;
    left
}

/// Run `cargo test`, echoing its output, and end with one line that sums
/// every test binary's result (the last line cargo prints is a doc-test
/// binary's, which says nothing about the suite).
fn cargo_test_with_summary(root: &Path, args: &[&str]) -> Result<()> {
    use std::io::{BufRead, BufReader, Write};
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("xtask: cargo {}", args.join(" "));
    // Tests that cannot run here (no root on a laptop) append themselves to
    // this file (kya-testkit), so they are counted as skipped, not passed.
    let skip_log = std::env::temp_dir().join(format!("kya-skips-{}", std::process::id()));
    let _ = std::fs::remove_file(&skip_log);
    let mut child = Command::new(cargo)
        .args(args)
        .current_dir(root)
        .env(kya_testkit::SKIP_LOG_ENV, &skip_log)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        let stdout = std::io::stdout();
        for line in BufReader::new(out).lines() {
            let line = line.context("reading cargo test output")?;
            let _ = writeln!(stdout.lock(), "{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                for part in rest.split(';') {
                    let mut words = part.split_whitespace().rev();
                    let (Some(kind), Some(n)) = (words.next(), words.next()) else {
                        continue;
                    };
                    let n: u64 = n.parse().unwrap_or(0);
                    match kind {
                        "passed" => passed += n,
                        "failed" => failed += n,
                        "ignored" => ignored += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    let skips = std::fs::read_to_string(&skip_log).unwrap_or_default();
    let _ = std::fs::remove_file(&skip_log);
    let could_not_run = skips.lines().count() as u64;
    for line in skips.lines() {
        eprintln!("xtask: skipped {}", line.replace('\t', ": "));
    }
    // A test that could not run returned early, which libtest counts as passed.
    let passed = passed.saturating_sub(could_not_run);
    println!(
        "summary: {passed} passed, {failed} failed, {} skipped ({could_not_run} could not run here, {ignored} ignored)",
        could_not_run + ignored
    );
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    if passed == 0 {
        bail!("cargo test ran no test");
    }
    Ok(())
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
