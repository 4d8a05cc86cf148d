//! Issue 3 end to end over TLS: an unmodified MCP client (PyPI `mcp`, httpx)
//! in a selected cgroup calls `https://mcp.test:8443/mcp` (resolved to
//! 127.0.0.2 by an /etc/hosts of its own mount namespace) and trusts only
//! kya's CA, the way a host that ran `kya ca install` would. The server
//! (hypercorn) has a certificate from a test CA that only kya trusts
//! (`--upstream-ca`). A passthrough host is spliced without decryption, and an
//! upstream whose certificate kya cannot verify is refused.

use kya_e2e::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn sh(cmd: &str, dir: &Path) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(dir)
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test CA and a server certificate for mcp.test and pinned.test.
fn pki(dir: &Path) {
    sh("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out test-ca.pem -days 2 -subj /CN=kya-e2e-test-ca 2>/dev/null", dir);
    sh("openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout srv.key -out srv.csr -subj /CN=mcp.test 2>/dev/null", dir);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:mcp.test,DNS:pinned.test\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext");
    sh("openssl x509 -req -in srv.csr -CA test-ca.pem -CAkey ca.key -CAcreateserial -out srv.pem -days 2 -extfile ext.cnf 2>/dev/null", dir);
    std::fs::write(
        dir.join("hosts"),
        "127.0.0.1 localhost\n127.0.0.2 mcp.test pinned.test\n",
    )
    .expect("hosts");
}

struct Hypercorn(Child);

impl Hypercorn {
    fn start(dir: &Path) -> Self {
        use std::os::unix::process::CommandExt;
        let child = Command::new(peers().join(".venv/bin/hypercorn"))
            // Its own process group: hypercorn runs workers in child
            // processes, and all of them must go at drop.
            .process_group(0)
            .arg("--certfile")
            .arg(dir.join("srv.pem"))
            .arg("--keyfile")
            .arg(dir.join("srv.key"))
            .args(["--bind", "127.0.0.2:8443", "asgi:app"])
            .current_dir(peers())
            .env("KYA_PEER_LOG", dir.join("peer.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start hypercorn");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.2", 8443)).is_err() {
            assert!(Instant::now() < deadline, "hypercorn did not listen");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self(child)
    }
}

impl Drop for Hypercorn {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(-(self.0.id() as i32));
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.wait();
        // The port must be free for the next test.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.2", 8443)).is_ok() && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn ran(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("peer.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The real Python client, in the cgroup and in a mount namespace whose
/// /etc/hosts names mcp.test; it trusts only `trust` (`SSL_CERT_FILE`).
fn client(cg: &TestCgroup, dir: &Path, trust: &Path, url: &str, args: &[&str]) -> Value {
    let mut prog = vec![peers().join(".venv/bin/python"), peers().join("client.py")];
    prog.push(PathBuf::from(url));
    run_in_agent_ns(cg, dir, &prog, args, &[("SSL_CERT_FILE", trust)])
}

/// The real Node client (npm @modelcontextprotocol/sdk), the same way; Node
/// takes extra roots from `NODE_EXTRA_CA_CERTS`.
fn node_client(cg: &TestCgroup, dir: &Path, trust: &Path, url: &str, args: &[&str]) -> Value {
    let prog = vec![
        PathBuf::from("node"),
        peers().join("client.mjs"),
        PathBuf::from(url),
    ];
    run_in_agent_ns(cg, dir, &prog, args, &[("NODE_EXTRA_CA_CERTS", trust)])
}

fn run_in_agent_ns(
    cg: &TestCgroup,
    dir: &Path,
    prog: &[PathBuf],
    args: &[&str],
    env: &[(&str, &Path)],
) -> Value {
    let script = format!(
        "mount --bind {hosts} /etc/hosts && echo $$ > {procs} && exec \"$@\"",
        hosts = dir.join("hosts").display(),
        procs = cg.path.join("cgroup.procs").display()
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "--propagation", "private", "sh", "-c", &script, "sh"])
        .args(prog)
        .args(args)
        .current_dir(peers());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| {
        panic!(
            "client printed no JSON ({e}): {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

const POLICY: &str = r#"
[defaults]
verdict = "deny"
methods = "allow"

[[rule]]
id = "docs-ok"
tool = "search_docs"
verdict = "allow"

[[rule]]
id = "no-delete"
tool = "delete_*"
verdict = "deny"
reason = "deleting records is not allowed from agents"
"#;

fn setup(tag: &str) -> (tempfile::TempDir, TestCgroup) {
    ensure_peers();
    let dir = tempfile::tempdir().expect("tempdir");
    pki(dir.path());
    std::fs::write(dir.path().join("policy.toml"), POLICY).expect("policy");
    let sink = dir.path().join("ocsf.jsonl");
    std::fs::write(
        dir.path().join("kya.toml"),
        format!(
            "[intercept]\npassthrough = [\"pinned.test\"]\n[audit]\nsinks = [\"file:{}\"]\n",
            sink.display()
        ),
    )
    .expect("config");
    (dir, TestCgroup::new(tag))
}

#[test]
fn tls_is_terminated_with_kyas_ca_and_every_call_decided() {
    if !privileged("tls_is_terminated_with_kyas_ca_and_every_call_decided") {
        return;
    }
    let _g = serial();
    let (dir, cg) = setup("tls");
    let d = dir.path();
    let _server = Hypercorn::start(d);
    let mut opts = DaemonOptions::new(931).args([
        "--policy",
        d.join("policy.toml").to_str().expect("utf-8"),
        "--cgroup",
        &cg.rel,
        "--port",
        "8443",
        "--upstream-ca",
        d.join("test-ca.pem").to_str().expect("utf-8"),
    ]);
    opts.config = Some(d.join("kya.toml"));
    let daemon = Daemon::start(opts);
    let kya_ca = daemon.state_dir.path().join("ca.pem");
    assert!(kya_ca.exists(), "kya run must create its CA");

    // The client trusts only kya's CA: it can only succeed through kya.
    let url = "https://mcp.test:8443/mcp";
    let r = client(
        &cg,
        d,
        &kya_ca,
        url,
        &["search_docs", r#"{"query": "tls"}"#],
    );
    assert_eq!(r["isError"], false, "{r}");
    assert_eq!(r["text"], "found 3 documents about tls");
    let r = client(
        &cg,
        d,
        &kya_ca,
        url,
        &["delete_records", r#"{"table": "t"}"#],
    );
    assert_eq!(r["isError"], true, "{r}");
    assert!(
        r["text"].as_str().unwrap_or("").contains("no-delete"),
        "{r}"
    );
    assert_eq!(ran(d), vec!["search_docs"], "the server's own record");

    // The Node SDK client, trusting kya's CA the way Node does.
    let r = node_client(
        &cg,
        d,
        &kya_ca,
        url,
        &["search_docs", r#"{"query": "node"}"#],
    );
    assert_eq!(r["isError"], false, "{r}");
    assert_eq!(r["text"], "found 3 documents about node");
    let r = node_client(
        &cg,
        d,
        &kya_ca,
        url,
        &["delete_records", r#"{"table": "t"}"#],
    );
    assert_eq!(r["isError"], true, "{r}");
    assert!(
        r["text"]
            .as_str()
            .unwrap_or("")
            .contains("kya denied this call"),
        "{r}"
    );
    assert_eq!(
        ran(d),
        vec!["search_docs", "search_docs"],
        "the server's own record"
    );

    // The export sink got every tool-call decision as OCSF API Activity.
    let deadline = Instant::now() + Duration::from_secs(5);
    let ocsf = loop {
        let lines: Vec<Value> = std::fs::read_to_string(d.join("ocsf.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|v: &Value| v["api"]["operation"] == "tools/call")
            .collect();
        if lines.len() >= 4 || Instant::now() > deadline {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(ocsf.len(), 4, "{ocsf:#?}");
    assert!(ocsf.iter().all(|v| v["class_uid"] == 6003), "{ocsf:#?}");
    assert_eq!(
        ocsf.iter().filter(|v| v["disposition_id"] == 2).count(),
        2,
        "two blocked: {ocsf:#?}"
    );
    let status = Command::new(kya_bin())
        .args(["status", "--json", "--state-dir"])
        .arg(daemon.state_dir.path())
        .output()
        .expect("kya status");
    let status: Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    assert!(
        status["sinks"][0]["written"].as_u64() >= Some(4),
        "{status}"
    );
    assert_eq!(status["sinks"][0]["failures"], 0, "{status}");

    // Passthrough: spliced untouched, so the client sees the real certificate
    // (it trusts only the test CA here) and kya decides nothing.
    let before = daemon.log_text().matches("\"tools/call\"").count();
    let r = client(
        &cg,
        d,
        &d.join("test-ca.pem"),
        "https://pinned.test:8443/mcp",
        &["search_docs", r#"{"query": "pinned"}"#],
    );
    assert_eq!(r["text"], "found 3 documents about pinned", "{r}");
    assert!(
        daemon.log_text().contains("passthrough host"),
        "{}",
        daemon.log_text()
    );
    assert_eq!(daemon.log_text().matches("\"tools/call\"").count(), before);
}

#[test]
fn an_upstream_certificate_kya_cannot_verify_is_refused() {
    if !privileged("an_upstream_certificate_kya_cannot_verify_is_refused") {
        return;
    }
    let _g = serial();
    let (dir, cg) = setup("badcert");
    let d = dir.path();
    let _server = Hypercorn::start(d);
    // No --upstream-ca: the test CA is unknown to kya.
    let daemon = Daemon::start(DaemonOptions::new(932).args([
        "--policy",
        d.join("policy.toml").to_str().expect("utf-8"),
        "--cgroup",
        &cg.rel,
        "--port",
        "8443",
    ]));
    let kya_ca = daemon.state_dir.path().join("ca.pem");
    let r = client(
        &cg,
        d,
        &kya_ca,
        "https://mcp.test:8443/mcp",
        &["search_docs", r#"{"query": "x"}"#],
    );
    assert!(
        r.get("error").is_some(),
        "the agent must fail, not be served unverified: {r}"
    );
    assert!(ran(d).is_empty(), "nothing may reach the server");
    let log = daemon.log_text();
    assert!(log.contains("upstream TLS failed"), "{log}");
    // The refusal is audited (and on the live stream).
    let ev = Command::new(kya_bin())
        .args(["events", "--json", "--state-dir"])
        .arg(daemon.state_dir.path())
        .output()
        .expect("kya events");
    let text = String::from_utf8_lossy(&ev.stdout);
    assert!(
        text.contains("kya:protocol") && text.contains("upstream TLS"),
        "{text}"
    );
}
