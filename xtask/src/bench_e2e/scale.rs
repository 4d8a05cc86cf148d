//! (h) Scale, through the real daemon: many kept-alive agent connections and
//! many held calls at once (the daemon's resident memory and file
//! descriptors before and with them, per connection and per held call, and
//! a well-behaved agent's call latency meanwhile), and (i) what kya's BPF
//! programs cost a process that is not selected, per `connect()`, from the
//! kernel's own run-time statistics.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{approvals, Bench, Route};
use kya_e2e::Daemon;

/// One figure of the scale table.
pub(super) struct Figure {
    pub what: String,
    pub value: String,
}

fn figure(what: impl Into<String>, value: impl Into<String>) -> Figure {
    Figure {
        what: what.into(),
        value: value.into(),
    }
}

/// Resident memory (KiB) and open file descriptors of `pid`.
fn footprint(pid: u32) -> Result<(u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS")?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("/proc/{pid}/fd"))?
        .count();
    Ok((rss, fds))
}

/// The load client holding `n` connections open (one call each; with
/// `held`, a call that is held), until dropped.
struct Holder(Child);

impl Holder {
    fn start(bench: &Bench, route: &Route, n: usize, tool: &str, held: bool) -> Result<Self> {
        let ca = route.ca.display().to_string();
        let n = n.to_string();
        let mut args = vec![
            "--addr",
            route.addr,
            "--ca",
            &ca,
            "--mode",
            "open",
            "--connections",
            &n,
            "--tool",
            tool,
        ];
        if held {
            args.push("--no-answer");
        }
        let cg = route.cgroup.context("scale runs through kya")?;
        let mut child = cg
            .command(&bench.load_bin, &args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start the load client")?;
        let stdout = child.stdout.take().context("client stdout")?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .context("read the client's report")?;
        let holder = Holder(child);
        let v: Value = serde_json::from_str(line.trim())
            .with_context(|| format!("the client's report: {line:?}"))?;
        if v["failed"].as_u64() != Some(0) {
            bail!("opening {n} connections: {v}");
        }
        eprintln!("bench-e2e: scale: {v}");
        Ok(holder)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        // Closing stdin lets the client close its connections and exit.
        drop(self.0.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Wait until the daemon holds `n` calls for approval.
fn wait_pending(state_dir: &Path, n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let pending = approvals::pending_count(state_dir)?;
        if pending >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{pending} of {n} calls held after 120 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Memory grows in steps (allocator arenas): wait until two readings a
/// second apart agree, at most a few seconds.
fn settled(pid: u32) -> Result<(u64, usize)> {
    let mut last = footprint(pid)?;
    for _ in 0..5 {
        std::thread::sleep(Duration::from_secs(1));
        let now = footprint(pid)?;
        if now == last {
            break;
        }
        last = now;
    }
    Ok(last)
}

/// The daemon's footprint before anything is open.
fn idle(daemon: &Daemon) -> Result<(u64, Figure)> {
    let (rss, fds) = settled(daemon.pid)?;
    Ok((
        rss,
        figure(
            "daemon resident memory, no agent connection open",
            format!("{:.1} MiB ({fds} fds)", rss as f64 / 1024.0),
        ),
    ))
}

/// Another agent's kept-alive calls while the many are open.
fn beside(bench: &mut Bench, route: &Route) -> Result<Figure> {
    let v = bench.run_load("h-beside", route, &["--concurrency", "1"], true)?;
    Ok(figure(
        "another agent's tools/call meanwhile, kept alive (p50 / p99 µs)",
        format!("{} / {}", v["p50_us"], v["p99_us"]),
    ))
}

/// (h) on a fresh daemon: `n` kept-alive connections, one call each.
pub(super) fn connections(
    bench: &mut Bench,
    route: &Route,
    daemon: &Daemon,
    n: usize,
) -> Result<Vec<Figure>> {
    let (idle_rss, idle_figure) = idle(daemon)?;
    let _open = Holder::start(bench, route, n, "bench_echo", false)?;
    let (rss, fds) = settled(daemon.pid)?;
    let per = rss.saturating_sub(idle_rss) as f64 / n as f64;
    Ok(vec![
        idle_figure,
        figure(
            format!("{n} kept-alive agent connections open (one call each)"),
            format!(
                "{:.1} MiB, {per:.1} KiB per connection; {fds} fds",
                rss as f64 / 1024.0
            ),
        ),
        beside(bench, route)?,
    ])
}

/// (h) on a fresh daemon: `n` calls held at once, each on its connection.
pub(super) fn holds(
    bench: &mut Bench,
    route: &Route,
    daemon: &Daemon,
    n: usize,
) -> Result<Vec<Figure>> {
    let (idle_rss, _) = idle(daemon)?;
    let _held = Holder::start(bench, route, n, "bench_hold", true)?;
    wait_pending(daemon.state_dir.path(), n)?;
    let (rss, fds) = settled(daemon.pid)?;
    let per = rss.saturating_sub(idle_rss) as f64 / n as f64;
    Ok(vec![
        figure(
            format!("{n} calls held at once (each on its own connection)"),
            format!(
                "{:.1} MiB, {per:.1} KiB per held call with its connection; {fds} fds",
                rss as f64 / 1024.0
            ),
        ),
        beside(bench, route)?,
    ])
}

/// Run time and run count of every BPF program whose name starts `kya_`.
fn kya_programs() -> Result<Vec<(String, u64, u64)>> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "-j"])
        .output()
        .context("bpftool prog show (Debian package bpftool)")?;
    let v: Value = serde_json::from_slice(&out.stdout).context("bpftool's JSON")?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let name = p["name"].as_str()?;
            name.starts_with("kya_").then(|| {
                (
                    name.to_string(),
                    p["run_time_ns"].as_u64().unwrap_or(0),
                    p["run_cnt"].as_u64().unwrap_or(0),
                )
            })
        })
        .collect())
}

/// The programs a connection runs (on both of its ends: the load client's
/// connect and the server's accept).
const SOCKET_PROGRAMS: &[&str] = &["connect", "getpeername", "sockops", "sendmsg"];

/// Restores `kernel.bpf_stats_enabled` on drop.
struct BpfStats(String);

impl BpfStats {
    const PATH: &'static str = "/proc/sys/kernel/bpf_stats_enabled";

    fn enable() -> Result<Self> {
        let old = std::fs::read_to_string(Self::PATH).context(Self::PATH)?;
        std::fs::write(Self::PATH, "1").context("enable BPF run-time statistics")?;
        Ok(Self(old.trim().to_string()))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, &self.0);
    }
}

/// (i): `count` connects by this process (not selected) to `addr`; the time
/// kya's programs ran, per connect, from the kernel's statistics.
pub(super) fn unselected_connect_cost(addr: &str, count: usize) -> Result<Vec<Figure>> {
    let _stats = BpfStats::enable()?;
    let before = kya_programs()?;
    let started = Instant::now();
    for _ in 0..count {
        let s = std::net::TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
        drop(s);
    }
    let wall = started.elapsed();
    let after = kya_programs()?;
    let mut total_ns = 0u64;
    let mut per_program = Vec::new();
    for (name, ns, cnt) in &after {
        let (ns0, cnt0) = before
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, ns, cnt)| (*ns, *cnt))
            .unwrap_or((0, 0));
        let (dns, dcnt) = (ns.saturating_sub(ns0), cnt.saturating_sub(cnt0));
        if dcnt > 0 {
            // Process events (fork, exec, exit) of other processes in the
            // window are listed, not counted against the connects.
            if SOCKET_PROGRAMS.iter().any(|p| name.contains(p)) {
                total_ns += dns;
            }
            per_program.push(format!(
                "{name} {:.0} ns × {dcnt}",
                dns as f64 / dcnt as f64
            ));
        }
    }
    Ok(vec![
        figure(
            format!("kya's socket programs per connection of an unselected process, both ends ({count} connects; bpf_stats)"),
            format!("{:.0} ns", total_ns as f64 / count as f64),
        ),
        figure("of which, per program (mean ns × runs)", per_program.join("; ")),
        figure(
            "connect + close, wall clock per connect (for scale)",
            format!("{:.1} µs", wall.as_secs_f64() * 1e6 / count as f64),
        ),
    ])
}
