//! What kya allows reaches the other side as a direct connection would: the
//! real daemon between real HTTP clients (httpx, the PyPI `mcp` client) in a
//! selected cgroup and a raw HTTP/1.1 MCP server (tests/peers/http_peer.py)
//! whose connection handling the test controls. Each check is against the
//! server's own record (calls it ran, connections it closed) and the same
//! client run direct.

use kya_e2e::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

const PORT: u16 = 18583;
const PORT2: u16 = 18584;
const TLS_PORT: u16 = 18585;

const POLICY: &str = r#"
[defaults]
verdict = "deny"
methods = "allow"

[[rule]]
id = "echo-ok"
tool = "echo"
verdict = "allow"

[[rule]]
id = "big-ok"
tool = "big"
verdict = "allow"

[[rule]]
id = "slow-held"
tool = "slow"
verdict = "hold"
"#;

/// `tests/peers/http_peer.py` on a loopback port, in a process group of its own.
struct HttpPeer {
    child: Child,
    log: PathBuf,
}

impl HttpPeer {
    fn start(dir: &Path, port: u16, log_name: &str, extra: &[&str]) -> Self {
        Self::start_on(dir, "127.0.0.1", port, log_name, extra)
    }

    fn start_on(dir: &Path, host: &str, port: u16, log_name: &str, extra: &[&str]) -> Self {
        use std::os::unix::process::CommandExt;
        let log = dir.join(log_name);
        if !log.exists() {
            std::fs::write(&log, "").expect("peer log");
        }
        let child = Command::new(peers_python())
            .process_group(0)
            .arg(peers().join("http_peer.py"))
            .args(["--host", host, "--port", &port.to_string(), "--log"])
            .arg(&log)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the HTTP peer");
        let deadline = Instant::now() + patience() * 30;
        while std::net::TcpStream::connect((host, port)).is_err() {
            assert!(Instant::now() < deadline, "HTTP peer did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, log }
    }

    /// Lines of its log that start with `prefix`.
    fn count(&self, prefix: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with(prefix))
            .count()
    }

    /// Wait until the log has more than `n` lines starting with `prefix`.
    fn wait_more(&self, prefix: &str, n: usize) {
        let deadline = Instant::now() + patience() * 20;
        while self.count(prefix) <= n {
            assert!(
                Instant::now() < deadline,
                "the peer never logged {prefix:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for HttpPeer {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(-(self.child.id() as i32));
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

fn url(port: u16) -> String {
    format!("http://127.0.0.1:{port}/mcp")
}

fn client_args<'a>(script: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec![script];
    all.extend_from_slice(args);
    all
}

fn last_json(out: std::process::Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| {
        panic!(
            "client printed no JSON ({e}): {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// `http_client.py ARGS`, in the agent's cgroup (through kya) or direct.
fn run_client(cg: Option<&TestCgroup>, args: &[&str]) -> Value {
    let script = peers().join("http_client.py");
    let script = script.to_str().expect("utf-8 path");
    let all = client_args(script, args);
    let mut cmd = match cg {
        Some(cg) => cg.command(peers_python(), &all),
        None => {
            let mut c = Command::new(peers_python());
            c.args(&all);
            c
        }
    };
    last_json(cmd.output().expect("run the HTTP client"))
}

/// `http_client.py steps URL` in the cgroup: one command in, one JSON line out.
struct Steps {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Steps {
    fn start(cg: &TestCgroup, url: &str) -> Self {
        let script = peers().join("http_client.py");
        let script = script.to_str().expect("utf-8 path");
        let mut child = cg
            .command(peers_python(), &[script, "steps", url])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the steps client");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Self {
            child,
            stdin,
            stdout,
        }
    }

    fn run(&mut self, cmd: &str) -> Value {
        writeln!(self.stdin, "{cmd}").expect("write a command");
        self.stdin.flush().expect("flush");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read an answer");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{cmd}: {e}: {line:?}"))
    }
}

impl Drop for Steps {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn daemon(scene: &AgentScene, listen: u16, config: Option<&str>) -> Daemon {
    let mut opts = scene
        .daemon_options(listen, PORT)
        .args(["--port", &PORT2.to_string()]);
    if let Some(text) = config {
        let path = scene.dir.path().join(format!("kya-{listen}.toml"));
        std::fs::write(&path, text).expect("config");
        opts.config = Some(path);
    }
    Daemon::start(opts)
}

#[test]
fn a_server_closing_kept_alive_connections_costs_no_request() {
    if !privileged("a_server_closing_kept_alive_connections_costs_no_request") {
        return;
    }
    let _g = serial();
    let scene = AgentScene::new("tp-close", POLICY);
    // nginx's keepalive_requests: every 200th answer carries Connection: close.
    let peer = HttpPeer::start(
        scene.dir.path(),
        PORT,
        "peer.log",
        &["--close-every", "200"],
    );
    let _daemon = daemon(&scene, 983, None);
    let load = ["load", &url(PORT), "--requests", "600", "--workers", "8"];

    let direct = run_client(None, &load);
    let closes_direct = peer.count("close-after");
    let calls_direct = peer.count("call echo");
    let through = run_client(Some(&scene.cg), &load);
    let closes_through = peer.count("close-after") - closes_direct;
    let calls_through = peer.count("call echo") - calls_direct;

    assert_eq!(direct["errors"], 0, "direct: {direct}");
    assert_eq!(direct["ok"], 4800, "direct: {direct}");
    assert_eq!(
        through["errors"], direct["errors"],
        "through kya: {through}"
    );
    assert_eq!(through["ok"], 4800, "through kya: {through}");
    // The server really ended connections under the load through kya, and ran
    // every call once.
    assert!(closes_through >= 8, "{closes_through} connections closed");
    assert_eq!(calls_through, 4800);
}

#[test]
fn idle_timeouts_and_restarts_of_the_server_cost_no_request() {
    if !privileged("idle_timeouts_and_restarts_of_the_server_cost_no_request") {
        return;
    }
    let _g = serial();
    let scene = AgentScene::new("tp-idle", POLICY);
    let args = ["--idle-timeout", "0.3"];
    let peer = HttpPeer::start(scene.dir.path(), PORT, "peer.log", &args);
    let _daemon = daemon(&scene, 984, None);
    let mut steps = Steps::start(&scene.cg, &url(PORT));

    let first = steps.run("call-port first");
    assert_eq!(first["error"], Value::Null, "{first}");
    let same_connection = serde_json::json!({"error": null, "port": first["port"]});
    // The server times the kept-alive connection out; the next call works.
    // kya does not relay that close to the agent, whose next request could
    // cross it, but sends the call over a new upstream connection: long after
    // the close, the agent's connection is still the one it had.
    let idle = peer.count("idle-close");
    peer.wait_more("idle-close", idle);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(steps.run("call-port second"), same_connection);
    assert_eq!(steps.run("call third"), serde_json::json!({"error": null}));

    // The server restarts between two calls of the same client.
    drop(peer);
    let peer = HttpPeer::start(scene.dir.path(), PORT, "peer.log", &args);
    assert_eq!(steps.run("call-port fourth"), same_connection);
    assert_eq!(steps.run("call fifth"), serde_json::json!({"error": null}));
    assert_eq!(peer.count("call echo"), 5);
}

#[test]
fn oauth_challenges_and_answers_without_an_id_pass_unchanged() {
    if !privileged("oauth_challenges_and_answers_without_an_id_pass_unchanged") {
        return;
    }
    let _g = serial();
    let scene = AgentScene::new("tp-oauth", POLICY);
    let _auth = HttpPeer::start(scene.dir.path(), PORT, "auth.log", &["--require-auth"]);
    let _notify = HttpPeer::start(scene.dir.path(), PORT2, "notify.log", &["--notify-result"]);
    let _daemon = daemon(&scene, 985, None);

    // requireBearerAuth's answer to an unauthenticated initialize: exactly the
    // server's status, challenge and bytes, so OAuth discovery can start.
    let mut steps = Steps::start(&scene.cg, &url(PORT));
    let r = steps.run("raw");
    assert_eq!(r["status"], 401, "{r}");
    assert_eq!(
        r["body"],
        r#"{"error": "invalid_token", "error_description": "Missing Authorization header"}"#,
        "{r}"
    );
    let challenge = r["www_authenticate"].as_str().unwrap_or("");
    assert!(
        challenge.starts_with("Bearer ") && challenge.contains("resource_metadata="),
        "{r}"
    );

    // A notification answered with an id-less "result": unchanged bytes
    // (kya's canonical form would have no spaces).
    let mut steps = Steps::start(&scene.cg, &url(PORT2));
    let r = steps.run("notify");
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["body"], r#"{"jsonrpc": "2.0", "result": {}}"#, "{r}");
    // Real answers on the same connection are still judged and delivered.
    assert_eq!(steps.run("call after"), serde_json::json!({"error": null}));
}

#[test]
fn a_50_mb_tool_result_arrives_and_one_over_the_limit_is_an_immediate_error() {
    if !privileged("a_50_mb_tool_result_arrives_and_one_over_the_limit_is_an_immediate_error") {
        return;
    }
    let _g = serial();
    let scene = AgentScene::new("tp-big", POLICY);
    let peer = HttpPeer::start(
        scene.dir.path(),
        PORT,
        "peer.log",
        &["--big-bytes", "50000000"],
    );
    let sdk = ["sdk", &url(PORT), "big"];
    let direct = run_client(None, &sdk);
    assert_eq!(direct["len"], 50_000_000, "{direct}");
    {
        let _daemon = daemon(&scene, 986, None);
        let through = run_client(Some(&scene.cg), &sdk);
        assert_eq!(through["isError"], false, "{through}");
        assert_eq!(through["len"], direct["len"], "{through}");
        assert_eq!(through["sha256"], direct["sha256"], "{through}");
    }
    let ran = peer.count("call big");
    assert_eq!(ran, 2);

    // Over a configured limit: the call fails with kya's reason (not the
    // client's read timeout), and the daemon says why.
    let daemon = daemon(
        &scene,
        987,
        Some("[intercept]\nmax_response_body = \"1MiB\"\n"),
    );
    let over = run_client(Some(&scene.cg), &sdk);
    let err = over["error"].as_str().unwrap_or("");
    assert!(
        err.contains("kya: the server's answer was not delivered") && err.contains("1048576"),
        "{over}"
    );
    assert_eq!(peer.count("call big"), ran + 1);
    assert!(
        daemon
            .log_text()
            .contains("server answer not delivered; the agent gets an error"),
        "{}",
        daemon.log_text()
    );
}

#[test]
fn a_call_approved_after_the_tls_server_timed_out_the_idle_connection_is_delivered() {
    if !privileged(
        "a_call_approved_after_the_tls_server_timed_out_the_idle_connection_is_delivered",
    ) {
        return;
    }
    let _g = serial();
    let scene = AgentScene::new("tp-tls", POLICY);
    let d = scene.dir.path();
    test_pki(d);
    let (cert, key) = (d.join("srv.pem"), d.join("srv.key"));
    let peer = HttpPeer::start_on(
        d,
        "127.0.0.2",
        TLS_PORT,
        "peer.log",
        &[
            "--idle-timeout",
            "0.3",
            "--certfile",
            cert.to_str().expect("utf-8"),
            "--keyfile",
            key.to_str().expect("utf-8"),
        ],
    );
    let mut opts = scene.daemon_options(988, TLS_PORT).args([
        "--upstream-ca",
        d.join("test-ca.pem").to_str().expect("utf-8"),
    ]);
    opts.hosts = Some(d.join("hosts"));
    let daemon = Daemon::start(opts);
    let kya_ca = daemon.state_dir.path().join("ca.pem");

    // A call held for approval (with `echo`'s arguments under the name `slow`),
    // by a client that trusts only kya's CA.
    let url = format!("https://mcp.test:{TLS_PORT}/mcp");
    let prog = [peers_python(), peers().join("http_client.py")];
    let args = ["seq", url.as_str(), "held", "--tool-name", "slow"];
    let env = [("SSL_CERT_FILE", kya_ca.as_path())];
    let r = std::thread::scope(|s| {
        let held = s.spawn(|| run_in_agent_ns(&scene.cg, d, &prog, &args, &env));
        let pending = wait_new_approval(&daemon, &[]);
        let id = pending["id"].as_str().expect("approval id").to_string();
        // Meanwhile the server times the idle upstream connection out.
        peer.wait_more("idle-close", 0);
        let ok = scene.as_user(&daemon, &scene.owner, &["approvals", "approve", &id]);
        assert!(
            ok.status.success(),
            "{}",
            String::from_utf8_lossy(&ok.stderr)
        );
        held.join().expect("client thread")
    });
    assert_eq!(r, serde_json::json!({"errors": [null]}), "{r}");
    assert_eq!(peer.count("call slow"), 1, "the server ran the call once");
    assert!(
        daemon.log_text().contains("new upstream connection"),
        "the approved call went over a new verified TLS connection"
    );
}
