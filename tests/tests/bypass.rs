//! No route around the decision: the bypass corpus (`tests/bypass/corpus.toml`)
//! replayed against the real daemon. An agent in a selected cgroup
//! (`tests/peers/bypass.py`) tries every route in the corpus to run a tool that
//! policy forbids, through the eBPF redirect, against real MCP servers
//! (hypercorn serving the SDK's app, plaintext and TLS). Every case is judged
//! on the servers' own record of the tools they executed.

use kya_e2e::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PLAIN_PORT: u16 = 18090;
const TLS_PORT: u16 = 8443;
/// The CONNECT proxy (`via = "proxy"` cases), on a guarded port. At
/// trusted.test's address: a Host or SNI naming trusted.test would resolve to
/// the connection's destination, so only the tunnel binding stops it.
const PROXY: &str = "127.0.0.5:3128";

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

[[rule]]
id = "transfer-only-to-the-trusted-server"
tool = "transfer"
server = "trusted.test"
verdict = "allow"
"#;

fn corpus() -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("bypass/corpus.toml");
    let text = std::fs::read_to_string(&path).expect("read the corpus");
    let parsed: toml::Table = toml::from_str(&text).expect("parse the corpus");
    let json = serde_json::to_value(parsed).expect("corpus as JSON");
    let cases = json["case"].as_array().cloned().expect("[[case]] entries");
    let mut names = std::collections::BTreeSet::new();
    for c in &cases {
        let name = c["name"].as_str().expect("every case has a name");
        assert!(names.insert(name.to_string()), "duplicate case {name}");
        assert!(
            matches!(
                c["expect"].as_str(),
                Some("refused" | "denied" | "executed")
            ),
            "{name}: expect must be refused, denied or executed"
        );
        assert!(c["route"].is_string(), "{name}: say which route it tries");
    }
    cases
}

fn ran(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("peer.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn count(dir: &Path, tool: &str) -> usize {
    ran(dir).iter().filter(|t| *t == tool).count()
}

/// Replay one case as the agent; returns what the agent saw.
fn replay(cg: &TestCgroup, dir: &Path, kya_ca: &Path, case: &Value) -> Value {
    let mut case = case.clone();
    let tls = case["transport"] == "tls";
    let obj = case.as_object_mut().expect("case table");
    let default_host = if tls { "127.0.0.2" } else { "127.0.0.1" };
    obj.entry("host").or_insert_with(|| default_host.into());
    obj.insert(
        "port".into(),
        (if tls { TLS_PORT } else { PLAIN_PORT }).into(),
    );
    // The agent trusts kya's CA (as after `kya ca install`), or for cases that
    // go around kya the upstream's own CA (as agents trust public CAs).
    let ca = if obj.get("trust").and_then(Value::as_str) == Some("upstream") {
        dir.join("test-ca.pem")
    } else {
        kya_ca.to_path_buf()
    };
    obj.insert("ca".into(), ca.display().to_string().into());
    if obj.get("via").and_then(Value::as_str) == Some("proxy") {
        obj.insert("proxy".into(), PROXY.into());
    }
    let prog = [peers_python(), peers().join("bypass.py")];
    let arg = case.to_string();
    run_in_agent_ns(cg, dir, &prog, &[&arg], &[])
}

/// Wait until the server's record stops changing (a refused or denied call
/// never shows up; an executed one shows up before the agent is answered).
fn settled(dir: &Path) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_millis(500);
    let mut last = ran(dir);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let now = ran(dir);
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

#[test]
fn no_case_of_the_bypass_corpus_runs_a_forbidden_tool() {
    if !privileged("no_case_of_the_bypass_corpus_runs_a_forbidden_tool") {
        return;
    }
    let _g = serial();
    ensure_peers();
    let cases = corpus();
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    test_pki(d);
    std::fs::write(d.join("policy.toml"), POLICY).expect("policy");
    std::fs::write(
        d.join("kya.toml"),
        "[intercept]\npassthrough = [\"pinned.test\"]\nfirst_bytes_timeout = \"1s\"\n",
    )
    .expect("config");
    let cg = TestCgroup::new("bypass");
    let _tls = Hypercorn::start_tls(d, &["127.0.0.2:8443", "127.0.0.4:8443"]);
    let _plain = Hypercorn::start_plain(d, &["127.0.0.1:18090", "127.0.0.5:18090"]);
    let proxy = ConnectProxy::start(d, PROXY);
    let mut opts = DaemonOptions::new(933).args([
        "--policy",
        d.join("policy.toml").to_str().expect("utf-8"),
        "--cgroup",
        &cg.rel,
        "--port",
        &PLAIN_PORT.to_string(),
        "--port",
        &TLS_PORT.to_string(),
        "--port",
        PROXY.rsplit(':').next().unwrap_or_default(),
        "--upstream-ca",
        d.join("test-ca.pem").to_str().expect("utf-8"),
    ]);
    opts.config = Some(d.join("kya.toml"));
    opts.hosts = Some(d.join("hosts"));
    let daemon = Daemon::start(opts);
    let kya_ca: PathBuf = daemon.state_dir.path().join("ca.pem");

    let mut failures = Vec::new();
    for case in &cases {
        let name = case["name"].as_str().unwrap_or("?");
        let tool = case["tool"].as_str().unwrap_or("delete_records");
        let expect = case["expect"].as_str().unwrap_or("?");
        let before = count(d, tool);
        let seen = replay(&cg, d, &kya_ca, case);
        settled(d);
        let delta = count(d, tool) - before;
        let ok = match expect {
            "refused" => delta == 0 && seen["outcome"] == "refused",
            "denied" => delta == 0 && seen["outcome"] == "answered",
            _ => delta == 1,
        };
        eprintln!("bypass case {name}: expect {expect}, {tool} ran {delta}x, agent saw {seen}");
        if !ok {
            failures.push(format!(
                "{name} ({}): expected {expect}, {tool} ran {delta} time(s), agent saw {seen}",
                case["route"].as_str().unwrap_or("")
            ));
        }
        if case["control"] == true {
            // The same route with an allowed call must work: the route is
            // inspected, not merely broken.
            let mut control = case.clone();
            control["tool"] = "search_docs".into();
            let before = count(d, "search_docs");
            let seen = replay(&cg, d, &kya_ca, &control);
            settled(d);
            let delta = count(d, "search_docs") - before;
            if delta != 1 {
                failures.push(format!(
                    "{name} (control): search_docs ran {delta} time(s), agent saw {seen}"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}\nserver record: {:?}\ndaemon log tail:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n"),
        ran(d),
        tail(&daemon.log_text(), 40)
    );

    // Refusals of connections kya could not judge are on the record, with the process.
    let ev = std::process::Command::new(kya_bin())
        .args(["events", "--json", "--state-dir"])
        .arg(daemon.state_dir.path())
        .output()
        .expect("kya events");
    let text = String::from_utf8_lossy(&ev.stdout);
    for needle in [
        "neither TLS nor HTTP",
        "no TLS or HTTP within",
        "cannot inspect",
        "does not resolve to",
        "nested tunnels are refused",
        "is not the target of the CONNECT tunnel",
        "in the CONNECT tunnel to",
    ] {
        assert!(text.contains(needle), "no audited refusal with {needle:?}");
    }
    // The followed tunnels really went through the proxy.
    let tunnels = proxy.tunnels();
    for target in ["mcp.test:8443", "127.0.0.1:18090"] {
        assert!(
            tunnels.iter().any(|t| t == target),
            "the proxy opened no tunnel to {target}: {tunnels:?}"
        );
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
