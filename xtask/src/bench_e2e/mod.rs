//! `cargo xtask bench-e2e`: the same MCP workload measured end to end three
//! ways on one machine: directly against the upstream, through the real kya
//! daemon (cgroup selection, eBPF redirect, TLS with kya's CA, a policy of a
//! few dozen rules, audit log on), and through mitmproxy in reverse-proxy mode.
//!
//! The peers are the benchmark's own upstream (`kya-bench-upstream`) and load
//! client (`kya-bench-load`), built in release with kya; the real MCP SDK
//! server (`tests/peers`, under hypercorn) serves one more run of the
//! kept-alive workload. (j) floods each of kya's limits in turn (`flood.rs`).
//! `--workloads` narrows a run to some of them. The run fails only when
//! something does not work (no successful request, a denial not received, an
//! approval not delivered, a denied call reaching the upstream), never on a
//! figure.

mod approvals;
mod flood;
mod peers;
mod report;
mod scale;

use anyhow::{bail, Context, Result};
use kya_e2e::{Daemon, DaemonOptions, Hypercorn, TestCgroup};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use peers::{Mitmproxy, Upstream, Venv};
use report::{Report, Row, Via};

/// The upstream (kept-alive, SSE and bulk workloads).
const UPSTREAM: &str = "127.0.0.2:18480";
const UPSTREAM_PORT: u16 = 18480;
/// The real SDK server (hypercorn).
const SDK: &str = "127.0.0.2:18481";
const SDK_PORT: u16 = 18481;
/// mitmproxy's listener.
const MITM_PORT: u16 = 18482;
/// New processes timed for their first call, (g).
const FIRST_CALLS: usize = 20;
/// (h): connections and held calls open at once in a full run.
const SCALE: usize = 10_000;
/// (i): connects of an unselected process.
const UNSELECTED_CONNECTS: usize = 20_000;
/// kya's interceptor port.
const KYA_LISTEN: u16 = 996;

/// What `bench-e2e` was asked for.
#[derive(Clone)]
pub(crate) struct Options {
    pub quick: bool,
    /// Each workload's duration.
    pub duration: Duration,
    /// Bytes of the bulk download.
    pub bulk_bytes: u64,
    /// Held calls to approve.
    pub held: usize,
    /// Skip the run against the real SDK server.
    pub no_sdk: bool,
    /// The paths measured (all three unless narrowed with `--only`).
    paths: Vec<Via>,
    /// Where to write a `perf record -g` profile of the daemon taken during
    /// the kept-alive workloads through kya.
    pub perf: Option<PathBuf>,
    /// Profile the new-connection workload (b) instead of the kept-alive ones.
    pub perf_new_conn: bool,
    /// (h): kept-alive connections and held calls open at once.
    pub scale_connections: usize,
    pub scale_held: usize,
    /// The workloads run (all unless narrowed with `--workloads`).
    workloads: Vec<Workload>,
}

/// A group of workloads, selected with `--workloads`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Workload {
    /// (a)–(g): latency and throughput on each path.
    Standard,
    /// (h), (i): many connections and holds at once; unselected processes.
    Scale,
    /// (j): each limit flooded, through kya.
    Flood,
}

impl Workload {
    const ALL: [Workload; 3] = [Workload::Standard, Workload::Scale, Workload::Flood];

    fn name(self) -> &'static str {
        match self {
            Workload::Standard => "standard",
            Workload::Scale => "scale",
            Workload::Flood => "flood",
        }
    }
}

impl Options {
    pub(crate) fn new(quick: bool, seconds: Option<f64>, no_sdk: bool) -> Self {
        let default = if quick { 1.0 } else { 10.0 };
        Self {
            quick,
            duration: Duration::from_secs_f64(seconds.unwrap_or(default).max(0.1)),
            bulk_bytes: if quick { 16 << 20 } else { 256 << 20 },
            held: if quick { 3 } else { 20 },
            no_sdk,
            paths: vec![Via::Direct, Via::Kya, Via::Mitmproxy],
            perf: None,
            perf_new_conn: false,
            scale_connections: if quick { 100 } else { SCALE },
            scale_held: if quick { 50 } else { SCALE },
            workloads: Workload::ALL.to_vec(),
        }
    }

    /// Narrow the run to the named workload groups (empty: all of them).
    pub(crate) fn workloads(&mut self, names: &[String]) -> Result<()> {
        if names.is_empty() {
            return Ok(());
        }
        let mut picked = Vec::new();
        for n in names {
            let w = Workload::ALL
                .into_iter()
                .find(|w| w.name() == n.as_str())
                .with_context(|| format!("--workloads {n}: expected standard, scale or flood"))?;
            if !picked.contains(&w) {
                picked.push(w);
            }
        }
        self.workloads = picked;
        Ok(())
    }

    fn runs(&self, w: Workload) -> bool {
        self.workloads.contains(&w)
    }

    /// Narrow the run to the named paths (empty: all of them).
    pub(crate) fn only(&mut self, names: &[String]) -> Result<()> {
        if names.is_empty() {
            return Ok(());
        }
        let mut paths = Vec::new();
        for n in names {
            let via = [Via::Direct, Via::Kya, Via::Mitmproxy]
                .into_iter()
                .find(|v| v.name() == n.as_str())
                .with_context(|| format!("--only {n}: expected direct, kya or mitmproxy"))?;
            if !paths.contains(&via) {
                paths.push(via);
            }
        }
        self.paths = paths;
        Ok(())
    }

    fn measures(&self, via: Via) -> bool {
        self.paths.contains(&via)
    }
}

/// A `perf record` of the daemon, stopped (and the profile written) on drop.
struct Profile(Option<std::process::Child>);

impl Profile {
    fn start(out: Option<&Path>, pid: u32) -> Result<Self> {
        let Some(out) = out else {
            return Ok(Self(None));
        };
        let child = Command::new("perf")
            .args(["record", "-F", "999", "-g", "-p"])
            .arg(pid.to_string())
            .arg("-o")
            .arg(out)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("start perf record (Debian package linux-perf)")?;
        // perf needs a moment to attach before the workload starts.
        std::thread::sleep(Duration::from_millis(500));
        Ok(Self(Some(child)))
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            // SIGINT: perf writes the profile and exits.
            // SAFETY: kill with a pid we spawned.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
            let _ = child.wait();
        }
    }
}

/// The policy: generated rules (allow and deny on other tools) plus an allow
/// for the benchmark's tools, a deny rule and a hold rule.
fn policy() -> String {
    let mut p = String::from(
        "[defaults]\nverdict = \"deny\"\nmethods = \"allow\"\nhold_timeout = \"120s\"\n\n",
    );
    for i in 0..40 {
        let (verdict, when) = match i % 4 {
            0 => ("allow", String::new()),
            1 => ("deny", String::new()),
            2 => ("allow", format!("when = \"has(args.n) && args.n < {i}\"\n")),
            _ => (
                "deny",
                format!("when = \"has(args.path) && args.path.startsWith('/etc/{i}')\"\n"),
            ),
        };
        p.push_str(&format!(
            "[[rule]]\nid = \"gen-{i}\"\ntool = \"svc{i}_*\"\n{when}verdict = \"{verdict}\"\n\n"
        ));
    }
    p.push_str(
        r#"[[rule]]
id = "bench-ok"
tool = "bench_echo"
verdict = "allow"

[[rule]]
id = "bench-big"
tool = "bench_big"
verdict = "allow"

[[rule]]
id = "bench-flood"
tool = "bench_flood"
verdict = "allow"

[[rule]]
id = "bench-silent"
tool = "bench_silent"
verdict = "allow"

[[rule]]
id = "sdk-docs"
tool = "search_docs"
verdict = "allow"

[[rule]]
id = "no-delete"
tool = "bench_delete"
verdict = "deny"
reason = "deleting is not allowed from agents"

[[rule]]
id = "hold-it"
tool = "bench_hold"
verdict = "hold"
"#,
    );
    p
}

/// Test PKI: the upstream's CA and a certificate for every name the client uses.
fn pki(dir: &Path) -> Result<()> {
    kya_e2e::test_pki(dir);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:mcp.test,DNS:bulk.test,DNS:*.sni.test\nextendedKeyUsage=serverAuth\n",
    )
    .context("ext.cnf")?;
    kya_e2e::sh("openssl x509 -req -in srv.csr -CA test-ca.pem -CAkey ca.key -CAcreateserial -out srv.pem -days 2 -extfile ext.cnf 2>/dev/null", dir);
    // kya resolves the passthrough name the way the agent would.
    std::fs::write(
        dir.join("hosts"),
        "127.0.0.1 localhost\n127.0.0.2 mcp.test bulk.test\n",
    )
    .context("hosts")?;
    Ok(())
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|d| if d.is_absolute() { d } else { root.join(d) })
        .unwrap_or_else(|| root.join("target"))
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// Where one load run goes and what it trusts.
struct Route<'a> {
    via: Via,
    addr: &'a str,
    ca: PathBuf,
    cgroup: Option<&'a TestCgroup>,
}

struct Bench<'a> {
    load_bin: PathBuf,
    opts: &'a Options,
    rows: Vec<Row>,
    nonce: u64,
}

impl Bench<'_> {
    /// Run the load client on `route` with `args`; fail if no request
    /// succeeded. Failed requests are reported with the figures (a transport
    /// error under load is a finding, not a broken harness).
    fn load(&mut self, workload: &'static str, route: &Route, args: &[&str]) -> Result<Value> {
        self.load_checked(workload, route, args, false)
    }

    /// [`Bench::load`]; with `strict`, any failed request fails the run
    /// (a call that was not denied where it must be).
    fn load_checked(
        &mut self,
        workload: &'static str,
        route: &Route,
        args: &[&str],
        strict: bool,
    ) -> Result<Value> {
        let v = self.run_load(workload, route, args, strict)?;
        self.rows.push(Row {
            workload,
            via: route.via,
            result: v.clone(),
        });
        Ok(v)
    }

    /// (g) The first call of a new process: `FIRST_CALLS` processes (3 with
    /// `--quick`), each opening its connection and then timing its one call,
    /// so kya's per-process work (its identity, executable digest, `/proc`)
    /// shows next to a warm call's cost in (a).
    fn first_calls(&mut self, route: &Route) -> Result<()> {
        let n = if self.opts.quick { 3 } else { FIRST_CALLS };
        let mut us = Vec::with_capacity(n);
        for _ in 0..n {
            let v = self.run_load("g-first", route, &["--count", "1", "--connect-first"], true)?;
            us.push(v["p50_us"].as_f64().unwrap_or(0.0));
        }
        us.sort_by(f64::total_cmp);
        let median = us[us.len() / 2];
        let max = us.last().copied().unwrap_or(0.0);
        self.rows.push(Row {
            workload: "g-first",
            via: route.via,
            result: serde_json::json!({"p50_us": median, "max_us": max, "calls": n}),
        });
        Ok(())
    }

    /// Run the load client once and return its figures (no row).
    fn run_load(
        &self,
        workload: &'static str,
        route: &Route,
        args: &[&str],
        strict: bool,
    ) -> Result<Value> {
        let ms = self.opts.duration.as_millis().to_string();
        let ca = route.ca.display().to_string();
        let mut all: Vec<&str> = vec!["--addr", route.addr, "--ca", &ca];
        if !args.contains(&"--count") {
            all.extend(["--duration-ms", ms.as_str()]);
        }
        all.extend_from_slice(args);
        let mut cmd = match route.cgroup {
            Some(cg) => cg.command(&self.load_bin, &all),
            None => {
                let mut c = Command::new(&self.load_bin);
                c.args(&all);
                c
            }
        };
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .context("run kya-bench-load")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let v: Value =
            serde_json::from_str(stdout.lines().last().unwrap_or("")).with_context(|| {
                format!(
                    "{workload} via {}: the load client printed no result ({}): {}",
                    route.via.name(),
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                )
            })?;
        let (ok, failed) = (
            v["ok"].as_u64().unwrap_or(0),
            v["failed"].as_u64().unwrap_or(0),
        );
        eprintln!(
            "bench-e2e: {workload:<12} {:<10} ok {ok:>7}  failed {failed}  p50 {} µs  {:.0} req/s",
            route.via.name(),
            v["p50_us"],
            v["rps"].as_f64().unwrap_or(0.0)
        );
        if failed > 0 {
            eprintln!(
                "bench-e2e: {workload} via {}: {failed} of {} requests failed; first error: {}",
                route.via.name(),
                ok + failed,
                v["first_error"]
            );
        }
        if ok == 0 || (strict && failed > 0) {
            bail!(
                "{workload} via {}: {ok} succeeded, {failed} failed; first error: {}",
                route.via.name(),
                v["first_error"]
            );
        }
        Ok(v)
    }

    /// The workloads every path runs: (a), (b), (e), (f).
    fn common(&mut self, route: &Route, bulk: &Route) -> Result<()> {
        self.kept_alive(route)?;
        self.new_conns(route)?;
        self.others(route, bulk)
    }

    /// (a): the kept-alive workloads.
    fn kept_alive(&mut self, route: &Route) -> Result<()> {
        self.load("a-c1", route, &["--concurrency", "1"])?;
        self.load("a-c64", route, &["--concurrency", "64"])?;
        Ok(())
    }

    /// (a) to the passthrough name, on the paths that can splice (direct
    /// and kya): the same calls, relayed by kya without being decrypted,
    /// judged or recorded, so the cost of the relay itself (the redirect,
    /// two more loopback hops, the copies) shows apart from the inspection's.
    fn kept_alive_spliced(&mut self, bulk: &Route) -> Result<()> {
        for (workload, n) in [("a-splice-c1", "1"), ("a-splice-c64", "64")] {
            self.load(workload, bulk, &["--concurrency", n, "--sni", "bulk.test"])?;
        }
        Ok(())
    }

    /// (b): a new TLS connection per call, the leaf cached and not.
    fn new_conns(&mut self, route: &Route) -> Result<()> {
        self.load("b-cached", route, &["--new-conn"])?;
        self.nonce += 1_000_000;
        let start = self.nonce.to_string();
        self.load(
            "b-fresh",
            route,
            &[
                "--new-conn",
                "--fresh-sni",
                "sni.test",
                "--fresh-start",
                &start,
            ],
        )?;
        Ok(())
    }

    /// (e), (f), (g): SSE, bulk, first calls.
    fn others(&mut self, route: &Route, bulk: &Route) -> Result<()> {
        self.load("e-sse", route, &["--tool", "bench_big"])?;
        let bytes = self.opts.bulk_bytes.to_string();
        self.load(
            "f-bulk",
            bulk,
            &["--mode", "bulk", "--sni", "bulk.test", "--bytes", &bytes],
        )?;
        self.first_calls(route)
    }

    fn sdk(&mut self, route: &Route) -> Result<()> {
        let args = [
            "--tool",
            "search_docs",
            "--arguments",
            r#"{"query": "bench"}"#,
            "--text",
            "found 3 documents about bench",
        ];
        let mut c1 = vec!["--concurrency", "1"];
        c1.extend(args);
        self.load("sdk-c1", route, &c1)?;
        let mut c64 = vec!["--concurrency", "64"];
        c64.extend(args);
        self.load("sdk-c64", route, &c64)?;
        Ok(())
    }
}

pub(crate) fn run(root: &Path, opts: &Options) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench-e2e loads BPF programs and creates cgroups: run it as root");
    }
    let open_files =
        raise_open_files(2 * opts.scale_connections.max(opts.scale_held) as u64 + 4096)?;
    let fits = connections_within(open_files);
    let mut opts = opts.clone();
    if opts.scale_connections > fits || opts.scale_held > fits {
        eprintln!(
            "bench-e2e: the open-files limit is {open_files} and cannot be raised: (h) opens at most {fits} connections"
        );
        opts.scale_connections = opts.scale_connections.min(fits);
        opts.scale_held = opts.scale_held.min(fits);
    }
    let opts = &opts;
    crate::cargo(
        root,
        &[
            "build",
            "--release",
            "-p",
            "kya-agent",
            "-p",
            "xtask",
            "--bins",
        ],
    )?;
    let target = target_dir(root);
    let bin_dir = target.join("release");
    let out_dir = target.join("bench-e2e");
    std::fs::create_dir_all(&out_dir).context("output directory")?;
    let standard = opts.runs(Workload::Standard);
    // mitmproxy and the plot of (a) run in the venv; the SDK server with (a).
    let venv = match standard {
        true => Some(Venv::ensure(&out_dir.join("venv"))?),
        false => None,
    };
    let with_sdk = standard && !opts.no_sdk;
    if with_sdk {
        kya_e2e::ensure_peers();
    }
    let work = tempfile_dir()?;
    let d = work.path();
    pki(d)?;
    std::fs::write(d.join("policy.toml"), policy()).context("policy")?;
    daemon_at_production_log_level(d, &bin_dir)?;
    std::fs::write(
        d.join("kya.toml"),
        // (h) opens its connections and holds from one process: kya's
        // per-process bounds (1024 connections, 64 held calls) are raised
        // for it, the totals sized to the run.
        format!(
            "[intercept]\npassthrough = [\"bulk.test\"]\nmax_connections = {conns}\nmax_connections_per_process = {conns}\nmax_held_per_process = {held}\n\n[approvals]\nmax_pending = {held}\n",
            conns = opts.scale_connections.max(opts.scale_held) + 1024,
            held = opts.scale_held + 64,
        ),
    )
    .context("config")?;
    let load_start = load_average();
    let upstream = Upstream::start(&bin_dir.join("kya-bench-upstream"), d, &[UPSTREAM])?;
    let _sdk = with_sdk.then(|| Hypercorn::start_tls(d, &[SDK]));
    let mut bench = Bench {
        load_bin: bin_dir.join("kya-bench-load"),
        opts,
        rows: Vec::new(),
        nonce: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|t| t.as_secs() * 1_000_000_000)
            .unwrap_or(0),
    };
    let test_ca = d.join("test-ca.pem");

    // Direct: no kya running.
    let direct = Route {
        via: Via::Direct,
        addr: UPSTREAM,
        ca: test_ca.clone(),
        cgroup: None,
    };
    if standard && opts.measures(Via::Direct) {
        bench.common(&direct, &direct)?;
        bench.kept_alive_spliced(&direct)?;
        if with_sdk {
            bench.sdk(&Route {
                addr: SDK,
                ..direct
            })?;
        }
    }

    // mitmproxy, reverse-proxy mode.
    if let (Some(venv), true) = (&venv, opts.measures(Via::Mitmproxy)) {
        let mitm = Mitmproxy::start(venv, &out_dir.join("mitm-conf"), MITM_PORT, UPSTREAM)?;
        let addr = format!("127.0.0.1:{MITM_PORT}");
        let route = Route {
            via: Via::Mitmproxy,
            addr: &addr,
            ca: mitm.ca.clone(),
            cgroup: None,
        };
        bench.common(&route, &route)?;
    }

    if !opts.measures(Via::Kya) {
        return finish(
            bench,
            Vec::new(),
            Vec::new(),
            None,
            venv.as_ref(),
            &out_dir,
            load_start,
        );
    }
    // kya: the real daemon, the load client in a selected cgroup.
    let cg = TestCgroup::new("bench-e2e");
    // A registered agent: a held call needs an owner to approve it (root here,
    // the approver of the held calls below).
    std::fs::write(
        d.join("agents.toml"),
        format!(
            "[[agent]]\nname = \"bench-agent\"\nowner = \"root\"\ncreated = \"2026-01-01\"\nmatch = {{ cgroup = \"{}\" }}\n",
            cg.rel
        ),
    )
    .context("agents")?;
    let mut dopts = DaemonOptions::new(KYA_LISTEN).args([
        "--policy".to_string(),
        d.join("policy.toml").display().to_string(),
        "--agents".into(),
        d.join("agents.toml").display().to_string(),
        "--cgroup".into(),
        cg.rel.clone(),
        "--port".into(),
        UPSTREAM_PORT.to_string(),
        "--port".into(),
        SDK_PORT.to_string(),
        "--upstream-ca".into(),
        test_ca.display().to_string(),
    ]);
    dopts.config = Some(d.join("kya.toml"));
    dopts.hosts = Some(d.join("hosts"));
    let fresh = dopts.clone();
    // Each daemon's route trusts that daemon's CA; this one the test CA
    // (the passthrough host's).
    let kya = Route {
        via: Via::Kya,
        addr: UPSTREAM,
        ca: test_ca.clone(),
        cgroup: Some(&cg),
    };
    let held = match standard {
        true => standard_through_kya(&mut bench, &kya, dopts, &upstream, with_sdk)?,
        false => Vec::new(),
    };
    let scale = match opts.runs(Workload::Scale) {
        true => scale_through_kya(&mut bench, &kya, &fresh)?,
        false => Vec::new(),
    };
    let floods = match opts.runs(Workload::Flood) {
        true => {
            let cfg = flood::Config::new(opts.quick);
            std::fs::write(d.join("flood.toml"), cfg.toml()).context("flood config")?;
            let mut fopts = fresh.clone();
            fopts.config = Some(d.join("flood.toml"));
            fopts
                .args
                .extend(["--metrics".to_string(), flood::METRICS.to_string()]);
            Some(flood::run(&bench, &kya, &fopts, &upstream, &cfg)?)
        }
        false => None,
    };
    drop(cg);
    let failures = floods
        .as_ref()
        .map(|f| f.failures.clone())
        .unwrap_or_default();
    finish(
        bench,
        held,
        scale,
        floods,
        venv.as_ref(),
        &out_dir,
        load_start,
    )?;
    if !failures.is_empty() {
        bail!("the floods: {}", failures.join("; "));
    }
    Ok(())
}

/// (a)–(g) through kya, on one daemon; returns the held calls' delays (d).
fn standard_through_kya(
    bench: &mut Bench,
    template: &Route,
    dopts: DaemonOptions,
    upstream: &Upstream,
    with_sdk: bool,
) -> Result<Vec<Duration>> {
    let opts = bench.opts;
    let daemon = Daemon::start(dopts);
    let kya_ca = daemon.state_dir.path().join("ca.pem");
    let kya = Route {
        ca: kya_ca.clone(),
        ..*template
    };
    // The passthrough host is not decrypted: the client trusts the upstream's CA.
    let kya_bulk = Route {
        ca: template.ca.clone(),
        ..kya
    };
    let (kept_alive_perf, new_conn_perf) = match opts.perf_new_conn {
        false => (opts.perf.as_deref(), None),
        true => (None, opts.perf.as_deref()),
    };
    let profile = Profile::start(kept_alive_perf, daemon.pid)?;
    bench.kept_alive(&kya)?;
    drop(profile);
    let profile = Profile::start(new_conn_perf, daemon.pid)?;
    bench.new_conns(&kya)?;
    drop(profile);
    bench.others(&kya, &kya_bulk)?;
    bench.kept_alive_spliced(&kya_bulk)?;
    if with_sdk {
        bench.sdk(&Route {
            addr: SDK,
            ca: kya_ca.clone(),
            ..kya
        })?;
    }
    // (c) Denied calls: the answer is kya's refusal, and the upstream never ran one.
    bench.load_checked(
        "c-deny",
        &kya,
        &["--tool", "bench_delete", "--expect", "deny"],
        true,
    )?;
    let ran = upstream.ran("bench_delete").len();
    if ran > 0 {
        bail!("a denied call reached the upstream ({ran} times)");
    }
    // (d) Held calls approved by this process over the control socket.
    let held = held_calls(bench, &kya, &daemon, upstream)?;
    if !daemon.log_text().contains("kya is running") {
        bail!("the daemon's log lost its start record");
    }
    Ok(held)
}

/// (h) and (i) through kya.
fn scale_through_kya(
    bench: &mut Bench,
    kya: &Route,
    fresh: &DaemonOptions,
) -> Result<Vec<scale::Figure>> {
    let opts = bench.opts;
    // (h) Many connections, then many held calls, each on a fresh daemon (so
    // memory one leaves to the allocator does not hide the other's), and
    // (i) the cost to processes kya does not select.
    let mut scale = Vec::new();
    {
        let daemon = Daemon::start(fresh.clone());
        let route = Route {
            ca: daemon.state_dir.path().join("ca.pem"),
            ..*kya
        };
        scale.extend(scale::connections(
            bench,
            &route,
            &daemon,
            opts.scale_connections,
        )?);
    }
    {
        let daemon = Daemon::start(fresh.clone());
        let route = Route {
            ca: daemon.state_dir.path().join("ca.pem"),
            ..*kya
        };
        scale.extend(scale::holds(bench, &route, &daemon, opts.scale_held)?);
        let connects = if opts.quick {
            2_000
        } else {
            UNSELECTED_CONNECTS
        };
        scale.extend(scale::unselected_connect_cost(UPSTREAM, connects)?);
    }
    Ok(scale)
}

/// Print and write the report of a run.
fn finish(
    bench: Bench<'_>,
    held: Vec<Duration>,
    scale: Vec<scale::Figure>,
    floods: Option<flood::Floods>,
    venv: Option<&Venv>,
    out_dir: &Path,
    load_start: String,
) -> Result<()> {
    let load_end = load_average();
    let opts = bench.opts;
    let report = Report {
        rows: bench.rows,
        held,
        scale,
        floods,
        mitmproxy_version: venv
            .map(Venv::mitmproxy_version)
            .unwrap_or_else(|| "not run".into()),
        load: format!("{load_start} at start, {load_end} at end"),
        opts,
    };
    report.print();
    let md = out_dir.join("bench-e2e.md");
    std::fs::write(&md, report.markdown()).context("write the markdown table")?;
    std::fs::write(out_dir.join("bench-e2e.json"), report.json().to_string())
        .context("write the results")?;
    let png = out_dir.join("bench-e2e-cdf.png");
    if let Some(venv) = venv {
        report.plot(venv, &png)?;
    }
    eprintln!(
        "bench-e2e: wrote {}, {}{}",
        md.display(),
        out_dir.join("bench-e2e.json").display(),
        venv.map(|_| format!(" and {}", png.display()))
            .unwrap_or_default()
    );
    Ok(())
}

fn held_calls(
    bench: &mut Bench,
    kya: &Route,
    daemon: &Daemon,
    upstream: &Upstream,
) -> Result<Vec<Duration>> {
    let count = bench.opts.held.to_string();
    let ca = kya.ca.display().to_string();
    let cg = kya.cgroup.context("the held calls run through kya")?;
    let mut child = cg
        .command(
            &bench.load_bin,
            &[
                "--addr",
                kya.addr,
                "--ca",
                &ca,
                "--tool",
                "bench_hold",
                "--text",
                "bench-ok",
                "--count",
                &count,
            ],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start the held calls")?;
    let approved = approvals::approve_each(
        daemon.state_dir.path(),
        upstream,
        "bench_hold",
        bench.opts.held,
    );
    if approved.is_err() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().context("held calls")?;
    let delays = approved?;
    let v: Value = serde_json::from_str(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or(""),
    )
    .with_context(|| {
        format!(
            "held calls: no result: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if v["ok"].as_u64() != Some(bench.opts.held as u64) {
        bail!("held calls: the client did not get every approved answer: {v}");
    }
    Ok(delays)
}

/// The e2e harness starts `KYA_BIN_DIR/kya` with debug logging; a benchmark
/// measures the daemon as it runs in production (`info`). A wrapper in `dir`
/// sets that and execs the release binary (the daemon keeps the pid).
fn daemon_at_production_log_level(dir: &Path, bin_dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let wrapper_dir = dir.join("bin");
    std::fs::create_dir_all(&wrapper_dir).context("wrapper directory")?;
    let wrapper = wrapper_dir.join("kya");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nRUST_LOG=info exec '{}' \"$@\"\n",
            bin_dir.join("kya").display()
        ),
    )
    .context("kya wrapper")?;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))
        .context("chmod the kya wrapper")?;
    std::env::set_var("KYA_BIN_DIR", &wrapper_dir);
    Ok(())
}

/// Room for (h): the daemon holds two descriptors per agent connection, the
/// load client and the upstream one each; the children inherit the limit.
/// Raised to `want`, or as far as the hard limit allows where this root may
/// not raise that (no `CAP_SYS_RESOURCE`, as in some containers); returns
/// the open-files limit in force.
fn raise_open_files(want: u64) -> Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        bail!("getrlimit: {}", std::io::Error::last_os_error());
    }
    if lim.rlim_cur >= want {
        return Ok(lim.rlim_cur);
    }
    let raised = libc::rlimit {
        rlim_cur: want,
        rlim_max: lim.rlim_max.max(want),
    };
    // SAFETY: setrlimit reads `raised`.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return Ok(want);
    }
    let soft = libc::rlimit {
        rlim_cur: lim.rlim_max,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: setrlimit reads `soft`; the soft limit may always rise to the hard one.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) } != 0 {
        bail!("setrlimit NOFILE: {}", std::io::Error::last_os_error());
    }
    Ok(lim.rlim_max)
}

/// The most agent connections the daemon can hold under `open_files`: two
/// descriptors each, and 1,024 kept for everything else.
fn connections_within(open_files: u64) -> usize {
    usize::try_from(open_files.saturating_sub(1024) / 2).unwrap_or(usize::MAX)
}

fn tempfile_dir() -> Result<TempDir> {
    TempDir::new()
}

/// A temporary directory removed on drop (the PKI, policy and records).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("kya-bench-e2e-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).context("work directory")?;
        Ok(Self(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
