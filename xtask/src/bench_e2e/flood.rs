//! (j) Hostile load, through the real daemon: each of kya's limits flooded
//! in turn, every flood on a fresh daemon, while a well-behaved agent in
//! another process makes kept-alive calls and times them. Per flood: what
//! the flooding client saw refused, the daemon's own counter of that limit
//! (from `/metrics`, before and after), the well-behaved agent's latency and
//! throughput next to a run without any flood, the daemon's peak resident
//! memory (`VmRSS` sampled during the flood, and `VmHWM`), and how many of
//! the flood's calls the upstream itself ran.
//!
//! The run fails when the upstream ran a call of a flood that policy denies
//! or holds (no one approves), or that a limit refused before any decision;
//! or when the well-behaved agent got no call through. Figures never fail it.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::peers::Upstream;
use super::{approvals, Bench, Route};
use kya_e2e::{Daemon, DaemonOptions};

/// Where each flood's daemon serves `/metrics`.
pub(super) const METRICS: &str = "127.0.0.1:18540";
/// The request-header timeout (no configuration key): slowloris runs past it.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// The limits the flood daemons run with (`[intercept]` in their kya.toml).
pub(super) struct Config {
    pub per_process: usize,
    pub total: usize,
    pub held_per_process: usize,
    /// `max_body`, bytes.
    pub max_body: usize,
    /// `response_timeout`: how long kya waits for a server's answer.
    pub response_timeout: Duration,
}

impl Config {
    pub(super) fn new(quick: bool) -> Self {
        Self {
            per_process: if quick { 50 } else { 1024 },
            total: if quick { 200 } else { 5000 },
            held_per_process: if quick { 8 } else { 64 },
            max_body: 64 << 10,
            response_timeout: Duration::from_secs(if quick { 1 } else { 5 }),
        }
    }

    pub(super) fn toml(&self) -> String {
        format!(
            "[intercept]\nmax_connections = {}\nmax_connections_per_process = {}\nmax_held_per_process = {}\nmax_body = \"{}KiB\"\nresponse_timeout = \"{}s\"\n",
            self.total,
            self.per_process,
            self.held_per_process,
            self.max_body >> 10,
            self.response_timeout.as_secs()
        )
    }

    fn describe(&self) -> String {
        format!(
            "max_connections = {}, max_connections_per_process = {}, max_held_per_process = {}, max_body = {} KiB, response_timeout = {} s",
            self.total,
            self.per_process,
            self.held_per_process,
            self.max_body >> 10,
            self.response_timeout.as_secs()
        )
    }
}

/// What the floods found.
pub(super) struct Floods {
    config: String,
    baseline: Value,
    rows: Vec<Row>,
    /// What must not happen and did (the run fails after the report).
    pub failures: Vec<String>,
}

/// One flood's figures.
struct Row {
    name: &'static str,
    what: String,
    /// What the flooding client saw refused (or, for held calls, denied).
    refused: u64,
    /// The counter of the limit and its increase; other limit counters that moved.
    counter: &'static str,
    delta: u64,
    /// Other limit counters that moved, and what else was seen.
    others: Vec<String>,
    beside: Value,
    peak_rss_kib: u64,
    hwm_kib: u64,
    tool: &'static str,
    ran: usize,
    clients: Vec<Value>,
}

/// One flood to run.
struct Flood {
    name: &'static str,
    what: String,
    /// The processes flooding: each one's load-client arguments.
    processes: Vec<Vec<String>>,
    counter: &'static str,
    tool: &'static str,
    /// How long the flood (and the well-behaved agent beside it) runs.
    duration: Duration,
    /// The client's refusals from its report(s).
    refused: fn(&[Value]) -> u64,
    /// Policy allows the flood's calls and the upstream runs each one
    /// (kya bounds what follows); otherwise it must run none.
    upstream_runs: bool,
}

fn sum(reports: &[Value], key: &str) -> u64 {
    reports.iter().map(|v| v[key].as_u64().unwrap_or(0)).sum()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The floods, sized by `--quick`.
fn floods(quick: bool, cfg: &Config) -> Vec<Flood> {
    let secs = if quick { 3 } else { 15 };
    let duration = Duration::from_secs(secs);
    let ms = duration.as_millis().to_string();
    // Room to open every connection of a connection flood (full handshakes
    // on two legs for each one served).
    let conn_duration = Duration::from_secs(if quick { 3 } else { 30 });
    let conn_ms = conn_duration.as_millis().to_string();
    let one = if quick { 100 } else { 10_000 };
    let (procs, each) = if quick { (5, 45) } else { (10, 1_000) };
    let slow = if quick { 10 } else { 1_000 };
    let held = if quick { 20 } else { 1_000 };
    let silent = if quick { 10 } else { 500 };
    let deny = ["--tool", "bench_delete", "--expect", "deny"];
    let flood = |n: usize, concurrency: &str| {
        let mut a = args(&["--mode", "flood", "--concurrency", concurrency]);
        a.extend(args(&[
            "--connections",
            &n.to_string(),
            "--duration-ms",
            &conn_ms,
        ]));
        a.extend(args(&deny));
        a
    };
    let oversized = |extra: &[&str]| {
        let mut a = args(&[
            "--new-conn",
            "--concurrency",
            if quick { "4" } else { "16" },
            "--duration-ms",
            &ms,
            "--tool",
            "bench_flood",
        ]);
        a.extend(args(extra));
        a
    };
    vec![
        Flood {
            name: "conn-process",
            what: format!(
                "{one} connections from one process (past max_connections_per_process = {}); each served one calls bench_delete (denied)",
                cfg.per_process
            ),
            processes: vec![flood(one, "64")],
            counter: "intercept_refused_process_limit",
            tool: "bench_delete",
            duration: conn_duration,
            refused: |r| sum(r, "refused"),
            upstream_runs: false,
        },
        Flood {
            name: "conn-total",
            what: format!(
                "{} connections from {procs} processes of {each} (past max_connections = {}); bench_delete (denied)",
                procs * each,
                cfg.total
            ),
            processes: (0..procs).map(|_| flood(each, "16")).collect(),
            counter: "intercept_refused_total_limit",
            tool: "bench_delete",
            duration: conn_duration,
            refused: |r| sum(r, "refused"),
            upstream_runs: false,
        },
        Flood {
            name: "slowloris",
            what: format!(
                "{slow} connections sending request headers a byte a second, never ending them (header timeout {} s)",
                HEADER_TIMEOUT.as_secs()
            ),
            processes: vec![args(&[
                "--mode",
                "slowloris",
                "--connections",
                &slow.to_string(),
                "--concurrency",
                "64",
                "--byte-interval-ms",
                "1000",
                "--duration-ms",
                &(HEADER_TIMEOUT + Duration::from_secs(6)).as_millis().to_string(),
            ])],
            counter: "limit_refused_slow_headers",
            tool: "bench_flood",
            duration: HEADER_TIMEOUT + Duration::from_secs(6),
            refused: |r| sum(r, "closed_by_server"),
            upstream_runs: false,
        },
        Flood {
            name: "header-fields",
            what: "calls of bench_flood (allowed) with 150 header fields (limit 100), a new connection each".into(),
            processes: vec![oversized(&["--pad-headers", "150", "--expect-status", "431"])],
            counter: "limit_refused_headers",
            tool: "bench_flood",
            duration,
            refused: |r| sum(r, "ok"),
            upstream_runs: false,
        },
        Flood {
            name: "header-bytes",
            what: "calls of bench_flood (allowed) with a 72 KiB header field (limit 64 KiB of headers), a new connection each".into(),
            processes: vec![oversized(&["--pad-header-bytes", "73728", "--expect-status", "431"])],
            counter: "limit_refused_headers",
            tool: "bench_flood",
            duration,
            refused: |r| sum(r, "ok"),
            upstream_runs: false,
        },
        Flood {
            name: "body",
            what: format!(
                "calls of bench_flood (allowed) with a 256 KiB body (max_body = {} KiB), a new connection each",
                cfg.max_body >> 10
            ),
            processes: vec![oversized(&["--pad-body", "262144", "--expect-status", "413"])],
            counter: "limit_refused_body",
            tool: "bench_flood",
            duration,
            refused: |r| sum(r, "ok"),
            upstream_runs: false,
        },
        Flood {
            name: "held",
            what: format!(
                "{held} calls of bench_hold (held by policy, never approved) from one process, each on its own connection (max_held_per_process = {})",
                cfg.held_per_process
            ),
            processes: vec![{
                // Each held call keeps its place in the client's handshake
                // gate: room for every hold the limit allows, and as many more.
                let mut a = args(&[
                    "--mode",
                    "flood",
                    "--concurrency",
                    &(2 * cfg.held_per_process).to_string(),
                    "--connections",
                    &held.to_string(),
                    "--duration-ms",
                    &ms,
                    "--timeout-s",
                    &secs.to_string(),
                    "--tool",
                    "bench_hold",
                    "--expect",
                    "deny",
                ]);
                a.push("--keepalive-ms".into());
                a.push((secs * 2000).to_string());
                a
            }],
            counter: "limit_refused_held_per_process",
            tool: "bench_hold",
            duration,
            // Answered with a denial: the hold was refused; the others are held.
            refused: |r| sum(r, "served"),
            upstream_runs: false,
        },
        Flood {
            name: "silent",
            what: format!(
                "calls of bench_silent (allowed), which the server runs and never answers, {silent} at a time, each on its own connection (response_timeout = {} s)",
                cfg.response_timeout.as_secs()
            ),
            processes: vec![args(&[
                "--new-conn",
                "--concurrency",
                &silent.to_string(),
                "--duration-ms",
                &ms,
                "--timeout-s",
                &(cfg.response_timeout.as_secs() + 20).to_string(),
                "--tool",
                "bench_silent",
                "--expect-closed",
            ])],
            counter: "limit_refused_no_answer",
            tool: "bench_silent",
            duration,
            // Given up on: the connection closed with no answer.
            refused: |r| sum(r, "ok"),
            upstream_runs: true,
        },
    ]
}

/// `kya_…_total` counters without labels, from the daemon's `/metrics`
/// (waiting a little for a daemon just started to serve them).
fn counters() -> Result<HashMap<String, u64>> {
    let mut tries = 0;
    let mut s = loop {
        match std::net::TcpStream::connect(METRICS) {
            Ok(s) => break s,
            Err(_) if tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e).with_context(|| format!("connect {METRICS}")),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .context("metrics timeout")?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: kya\r\nConnection: close\r\n\r\n"
    )
    .context("metrics request")?;
    let mut text = String::new();
    s.read_to_string(&mut text).context("metrics")?;
    if !text.starts_with("HTTP/1.1 200") {
        bail!("metrics: {}", text.lines().next().unwrap_or(""));
    }
    let mut found: HashMap<String, u64> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.contains('{'))
        .filter_map(|l| {
            let (name, value) = l.split_once(' ')?;
            let name = name.strip_prefix("kya_")?.strip_suffix("_total")?;
            Some((name.to_string(), value.trim().parse::<f64>().ok()? as u64))
        })
        .collect();
    // Calls denied because the audit log could not record them (any agent).
    let unrecordable = text
        .lines()
        .filter(|l| l.starts_with("kya_decisions_total{") && l.contains(AUDIT_UNAVAILABLE))
        .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
        .sum::<f64>() as u64;
    found.insert(UNRECORDABLE.into(), unrecordable);
    Ok(found)
}

/// The rule of a call denied because the audit log could not take its record.
const AUDIT_UNAVAILABLE: &str = "rule=\"kya:audit-unavailable\"";
/// The name this harness gives their count.
const UNRECORDABLE: &str = "decisions_denied_audit_unavailable";

/// `VmRSS` and `VmHWM` (KiB) of `pid`.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The highest `VmRSS` of a process, sampled every 100 ms until stopped.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(memory(pid).0, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Self {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

/// A load client started in the agent's cgroup; killed if not waited for.
struct Client(Option<Child>);

impl Client {
    fn start(bench: &Bench, route: &Route, extra: &[String]) -> Result<Self> {
        let ca = route.ca.display().to_string();
        let mut all: Vec<&str> = vec!["--addr", route.addr, "--ca", &ca];
        all.extend(extra.iter().map(String::as_str));
        let cg = route.cgroup.context("floods run through kya")?;
        let child = cg
            .command(&bench.load_bin, &all)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("start kya-bench-load")?;
        Ok(Self(Some(child)))
    }

    /// Its one-line JSON report.
    fn report(mut self) -> Result<Value> {
        let child = self.0.take().context("client already waited for")?;
        let out = child
            .wait_with_output()
            .context("wait for kya-bench-load")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.lines().last().unwrap_or("")).with_context(|| {
            format!(
                "the load client printed no result ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The well-behaved agent: one kept-alive connection (opened before its
/// clock starts), `tools/call` of an allowed tool, for `duration`.
fn well_behaved(bench: &Bench, route: &Route, duration: Duration) -> Result<Client> {
    Client::start(
        bench,
        route,
        &args(&[
            "--concurrency",
            "1",
            "--connect-first",
            "--duration-ms",
            &duration.as_millis().to_string(),
            "--timeout-s",
            "30",
        ]),
    )
}

fn beside_figures(v: &Value) -> Value {
    json!({
        "ok": v["ok"], "failed": v["failed"], "first_error": v["first_error"],
        "p50_us": v["p50_us"], "p99_us": v["p99_us"], "rps": v["rps"],
    })
}

/// Run every flood, each on a fresh daemon started with `dopts` (whose
/// config holds `cfg`'s limits and which serves metrics at [`METRICS`]).
pub(super) fn run(
    bench: &Bench,
    route: &Route,
    dopts: &DaemonOptions,
    upstream: &Upstream,
    cfg: &Config,
) -> Result<Floods> {
    let quick = bench.opts.quick;
    let mut out = Floods {
        config: cfg.describe(),
        baseline: Value::Null,
        rows: Vec::new(),
        failures: Vec::new(),
    };
    {
        let daemon = Daemon::start(dopts.clone());
        let route = Route {
            ca: daemon.state_dir.path().join("ca.pem"),
            ..*route
        };
        let secs = if quick { 3 } else { 15 };
        let v = well_behaved(bench, &route, Duration::from_secs(secs))?.report()?;
        eprintln!(
            "bench-e2e: flood baseline: {} calls, p50 {} µs, p99 {} µs",
            v["ok"], v["p50_us"], v["p99_us"]
        );
        out.baseline = beside_figures(&v);
        out.baseline["peak_rss_kib"] = json!(memory(daemon.pid).1);
    }
    for flood in floods(quick, cfg) {
        let row = one(bench, route, dopts, upstream, &flood, cfg)?;
        if flood.upstream_runs {
            // Each call the client saw given up on reached the server, and
            // each was counted: nothing hung and nothing was lost.
            if (row.ran as u64) < row.refused || row.delta < row.refused || row.refused == 0 {
                out.failures.push(format!(
                    "{}: {} calls given up on, the server ran {}, counted {}",
                    row.name, row.refused, row.ran, row.delta
                ));
            }
        } else if row.ran != 0 {
            out.failures.push(format!(
                "{}: the upstream ran {} calls of {} (policy denies or holds them, or a limit refused them first)",
                row.name, row.ran, row.tool
            ));
        }
        if row.beside["ok"].as_u64().unwrap_or(0) == 0 {
            out.failures.push(format!(
                "{}: the well-behaved agent got no call through: {}",
                row.name, row.beside["first_error"]
            ));
        }
        out.rows.push(row);
    }
    Ok(out)
}

fn one(
    bench: &Bench,
    route: &Route,
    dopts: &DaemonOptions,
    upstream: &Upstream,
    flood: &Flood,
    cfg: &Config,
) -> Result<Row> {
    let daemon = Daemon::start(dopts.clone());
    let route = Route {
        ca: daemon.state_dir.path().join("ca.pem"),
        ..*route
    };
    let before = counters()?;
    let ran_before = upstream.ran(flood.tool).len();
    let sampler = RssSampler::start(daemon.pid);
    // The well-behaved agent connects first (its one connection is open
    // before any limit fills up), then the flood starts.
    let beside = well_behaved(bench, &route, flood.duration)?;
    std::thread::sleep(Duration::from_millis(200));
    let clients = flood
        .processes
        .iter()
        .map(|a| Client::start(bench, &route, a))
        .collect::<Result<Vec<_>>>()?;
    let held_at_once = if flood.name == "held" {
        // Midway through: the calls held at once, across the process's connections.
        std::thread::sleep(flood.duration / 2);
        Some(approvals::pending_count(daemon.state_dir.path())?)
    } else {
        None
    };
    let mut reports = Vec::new();
    for c in clients {
        let mut v = c.report()?;
        // The flood's own latency curve is not a figure here.
        if let Some(o) = v.as_object_mut() {
            o.remove("cdf_us");
        }
        reports.push(v);
    }
    let beside = beside.report()?;
    let peak = sampler.stop();
    // The last refusals are counted as their connections end.
    std::thread::sleep(Duration::from_millis(500));
    let after = counters()?;
    let (_, hwm) = memory(daemon.pid);
    let ran = upstream.ran(flood.tool).len().saturating_sub(ran_before);
    let delta = |name: &str| {
        after
            .get(name)
            .copied()
            .unwrap_or(0)
            .saturating_sub(before.get(name).copied().unwrap_or(0))
    };
    let mut others: Vec<String> = after
        .keys()
        .filter(|k| {
            (k.starts_with("limit_refused_")
                || k.starts_with("intercept_refused_")
                || k.as_str() == UNRECORDABLE)
                && k.as_str() != flood.counter
        })
        .map(|k| (k, delta(k)))
        .filter(|(_, d)| *d > 0)
        .map(|(k, d)| format!("{k} +{d}"))
        .collect();
    others.sort();
    if let Some(n) = held_at_once {
        others.push(format!(
            "{n} held at once (max_held_per_process = {})",
            cfg.held_per_process
        ));
    }
    let refused = (flood.refused)(&reports);
    eprintln!(
        "bench-e2e: flood {:<13} refused {refused:>6}  {} +{}  beside: {} calls p50 {} µs p99 {} µs  peak RSS {} KiB  upstream ran {} {}",
        flood.name,
        flood.counter,
        delta(flood.counter),
        beside["ok"],
        beside["p50_us"],
        beside["p99_us"],
        peak,
        ran,
        flood.tool
    );
    for r in &reports {
        eprintln!("bench-e2e: flood {}: {r}", flood.name);
    }
    Ok(Row {
        name: flood.name,
        what: flood.what.clone(),
        refused,
        counter: flood.counter,
        delta: delta(flood.counter),
        others,
        beside: beside_figures(&beside),
        peak_rss_kib: peak,
        hwm_kib: hwm,
        tool: flood.tool,
        ran,
        clients: reports,
    })
}

fn ms(v: &Value) -> String {
    let f = |k: &str| {
        v[k].as_f64()
            .map(|us| format!("{:.2}", us / 1000.0))
            .unwrap_or_else(|| "–".into())
    };
    format!(
        "{} / {} ms, {:.0} calls/s",
        f("p50_us"),
        f("p99_us"),
        v["rps"].as_f64().unwrap_or(0.0)
    )
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

impl Floods {
    /// Table lines (markdown).
    pub(super) fn lines(&self) -> Vec<String> {
        let mut l = vec![
            String::new(),
            format!("| (j) flood, through kya ({}) | refused (client) | kya counter Δ | well-behaved agent meanwhile: p50 / p99, calls/s | daemon peak RSS MiB (sampled / VmHWM) | upstream ran the flood's tool |", self.config),
            "| --- | ---: | --- | --- | --- | --- |".into(),
            format!(
                "| none (baseline) | – | – | {} | – / {} | – |",
                ms(&self.baseline),
                mib(self.baseline["peak_rss_kib"].as_u64().unwrap_or(0))
            ),
        ];
        for r in &self.rows {
            let failed = r.beside["failed"].as_u64().unwrap_or(0);
            let others = &r.others;
            l.push(format!(
                "| {}: {} | {} | {} +{}{} | {}{} | {} / {} | {} of {} |",
                r.name,
                r.what,
                r.refused,
                r.counter,
                r.delta,
                if others.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", others.join(", "))
                },
                ms(&r.beside),
                if failed > 0 {
                    format!(", {failed} failed")
                } else {
                    String::new()
                },
                mib(r.peak_rss_kib),
                mib(r.hwm_kib),
                r.ran,
                r.tool
            ));
        }
        for r in &self.rows {
            let failed = r.beside["failed"].as_u64().unwrap_or(0);
            if failed > 0 {
                l.push(String::new());
                l.push(format!(
                    "(j) {}: {failed} of the well-behaved agent's calls failed; first error: {}",
                    r.name, r.beside["first_error"]
                ));
            }
        }
        l
    }

    pub(super) fn json(&self) -> Value {
        json!({
            "config": self.config,
            "baseline": self.baseline,
            "floods": self.rows.iter().map(|r| json!({
                "name": r.name,
                "what": r.what,
                "refused": r.refused,
                "counter": r.counter,
                "counter_delta": r.delta,
                "others": r.others,
                "well_behaved": r.beside,
                "peak_rss_kib": r.peak_rss_kib,
                "vm_hwm_kib": r.hwm_kib,
                "tool": r.tool,
                "upstream_ran": r.ran,
                "clients": r.clients,
            })).collect::<Vec<_>>(),
            "failures": self.failures,
        })
    }
}
