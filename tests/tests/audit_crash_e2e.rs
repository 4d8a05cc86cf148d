//! Issue 6 acceptance, end to end: `kill -9` the daemon at random moments
//! during a load of mixed calls, many times, on one audit log. A real MCP
//! client (PyPI `mcp`) in a selected cgroup makes allows, denies and holds
//! (approved by root with `kya approvals approve`) through the eBPF redirect;
//! it prints every answer it actually received. After each kill:
//! * `kya audit verify` accepts the log (an incomplete final record, cut by the
//!   kill mid-write, is the only thing tolerated, and it is reported as such);
//! * every deny the agent saw is in the log under the decision id its denial
//!   text names, every allow and every approved call it saw is in the log
//!   (matched by the SHA-256 of its unique arguments), and so is the hold
//!   before each approval;
//! * the next daemon opens the same log and continues the chain.
//!
//! The client's own output is the reference, not kya's.

use kya_e2e::*;
use serde_json::Value;
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PORT: u16 = 18200;
const LISTEN_PORT: u16 = 940;
const TRIALS: usize = 16;

const POLICY: &str = r#"
[defaults]
verdict = "deny"
methods = "allow"
hold_timeout = "30s"

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
id = "big-transfer"
tool = "transfer"
when = "args.amount > 1000"
verdict = "hold"
"#;

fn python() -> PathBuf {
    peers().join(".venv/bin/python")
}

/// A random number of milliseconds in `lo..hi` (no RNG crate in this one).
fn random_ms(lo: u64, hi: u64) -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    lo + h.finish() % (hi - lo)
}

/// The load client; its answers are collected line by line as they arrive.
struct Load {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(cg: &TestCgroup, tag: &str) -> Self {
        let script = peers().join("load.py");
        let url = format!("http://127.0.0.1:{PORT}/mcp");
        let mut child = cg
            .command(
                python(),
                &[script.to_str().expect("utf-8"), &url, tag, "--workers", "4"],
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the load client");
        let out = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                match line {
                    Ok(l) => sink.lock().unwrap_or_else(|e| e.into_inner()).push(l),
                    Err(_) => return,
                }
            }
        });
        Load {
            child,
            lines,
            reader: Some(reader),
        }
    }

    fn answers(&self) -> usize {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Kill the client and return every complete line it printed.
    fn finish(mut self) -> Vec<Value> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Root approves every pending call, until stopped.
struct Approver {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Approver {
    fn start(state_dir: &Path) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let state_dir = state_dir.to_path_buf();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                let listed = Command::new(kya_bin())
                    .args(["approvals", "list", "--json", "--state-dir"])
                    .arg(&state_dir)
                    .output();
                let pending: Vec<Value> = listed
                    .ok()
                    .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
                    .and_then(|v| v.as_array().cloned())
                    .unwrap_or_default();
                for a in pending {
                    if let Some(id) = a["id"].as_str() {
                        let _ = Command::new(kya_bin())
                            .args(["approvals", "approve", id, "--state-dir"])
                            .arg(&state_dir)
                            .output();
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Approver {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Approver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `kya audit verify AUDIT --key PUB`: (exit code, stdout + stderr).
fn verify(audit: &Path, key: &Path) -> (i32, String) {
    let out = Command::new(kya_bin())
        .args(["audit", "verify"])
        .arg(audit)
        .arg("--key")
        .arg(key)
        .output()
        .expect("kya audit verify");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `kya audit verify --closed AUDIT --key PUB`: also every decision ended.
fn verify_closed(audit: &Path, key: &Path) -> (i32, String) {
    let out = Command::new(kya_bin())
        .args(["audit", "verify", "--closed"])
        .arg(audit)
        .arg("--key")
        .arg(key)
        .output()
        .expect("kya audit verify");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The events of every complete record in the log.
fn logged(audit: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(audit).expect("audit log");
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    complete
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("a complete record is JSON");
            v["event"].clone()
        })
        .collect()
}

/// The decision id a denial names: `... (rule X, decision dec_...)`.
fn denial_id(text: &str) -> Option<&str> {
    let start = text.rfind("decision dec_")? + "decision ".len();
    let rest = &text[start..];
    Some(&rest[..rest.find(')').unwrap_or(rest.len())])
}

#[derive(Default)]
struct Tally {
    denies: usize,
    allows: usize,
    approved: usize,
}

/// Every answer the agent saw is in the log.
fn check_answers(trial: usize, seen: &[Value], events: &[Value], tally: &mut Tally) {
    let mut by_id: HashMap<&str, Vec<&Value>> = HashMap::new();
    let mut by_args: HashMap<&str, Vec<&Value>> = HashMap::new();
    for e in events {
        if let Some(id) = e["decision_id"].as_str() {
            by_id.entry(id).or_default().push(e);
        }
        if let Some(d) = e["mcp"]["args_sha256"].as_str() {
            by_args.entry(d).or_default().push(e);
        }
    }
    let has = |digest: &str, kind: &str, verdict: &str| {
        by_args.get(digest).is_some_and(|v| {
            v.iter()
                .any(|e| e["kind"] == kind && e["verdict"] == verdict)
        })
    };
    for a in seen {
        if a.get("error").is_some() {
            continue; // the daemon died under this call: the agent saw no verdict
        }
        let tool = a["tool"].as_str().unwrap_or("");
        let digest = a["args_sha256"].as_str().expect("args digest");
        let text = a["text"].as_str().unwrap_or("");
        if a["isError"] == true {
            let id = denial_id(text)
                .unwrap_or_else(|| panic!("trial {trial}: a denial without a decision id: {a}"));
            let recs = by_id.get(id).unwrap_or_else(|| {
                panic!("trial {trial}: the agent saw deny {id} but it is not in the audit log: {a}")
            });
            assert!(
                recs.iter()
                    .any(|e| e["verdict"] == "deny" && e["mcp"]["args_sha256"] == digest),
                "trial {trial}: {id} is logged, but not as this denial: {recs:?}"
            );
            tally.denies += 1;
            continue;
        }
        match tool {
            "search_docs" => {
                assert!(
                    has(digest, "decision", "allow"),
                    "trial {trial}: the agent saw an allow that is not in the audit log: {a}"
                );
                tally.allows += 1;
            }
            "transfer" => {
                assert!(
                    has(digest, "hold", "hold"),
                    "trial {trial}: an approved call whose hold is not in the audit log: {a}"
                );
                assert!(
                    has(digest, "approved", "allow"),
                    "trial {trial}: the agent saw an approved call that is not in the audit log: {a}"
                );
                tally.approved += 1;
            }
            other => panic!("trial {trial}: {other} succeeded; it must be denied: {a}"),
        }
    }
}

#[test]
fn kill_9_during_mixed_load_loses_no_verdict_the_agent_saw() {
    if !privileged("kill_9_during_mixed_load_loses_no_verdict_the_agent_saw") {
        return;
    }
    let _g = serial();
    ensure_peers();
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let cg = TestCgroup::new("crash");
    std::fs::write(dir.path().join("policy.toml"), POLICY).expect("policy");
    std::fs::write(
        dir.path().join("agents.toml"),
        format!(
            "[[agent]]\nname = \"crash-agent\"\nowner = \"root\"\ncreated = \"2026-01-01\"\nmatch = {{ cgroup = \"{}\" }}\n",
            cg.rel
        ),
    )
    .expect("agents");
    let _server = McpServer::start(dir.path(), PORT, "peer.log");
    let audit = dir.path().join("audit.jsonl");
    // A syslog sink with nothing listening: its failures are counted in
    // `kya status`, and decisions go on regardless.
    let config = dir.path().join("kya.toml");
    let dead_syslog = dir.path().join("no-syslog-here");
    std::fs::write(
        &config,
        format!(
            "[audit]\nsinks = [\"syslog:unix:{}\"]\n",
            dead_syslog.display()
        ),
    )
    .expect("config");
    let keys = dir.path().join("keys");
    std::fs::create_dir_all(&keys).expect("keys dir");
    let public_key = keys.join("signing-key.pub.pem");
    let args = |audit: &Path| -> Vec<String> {
        let p = |f: &str| dir.path().join(f).display().to_string();
        vec![
            "--policy".into(),
            p("policy.toml"),
            "--agents".into(),
            p("agents.toml"),
            "--port".into(),
            PORT.to_string(),
            "--audit".into(),
            audit.display().to_string(),
        ]
    };

    let mut tally = Tally::default();
    let mut torn = 0;
    // The approvals journal a killed daemon leaves, for the next one (as in
    // one state directory): its holds are recorded as interrupted at start.
    let mut journal: Option<Vec<u8>> = None;
    for trial in 0..TRIALS {
        let mut opts = DaemonOptions::new(LISTEN_PORT).args(args(&audit));
        opts.config = Some(config.clone());
        if trial > 0 {
            opts.key_from = Some(keys.clone());
        }
        if let Some(j) = journal.take() {
            opts.state_files.push(("approvals.journal".into(), j));
        }
        // The restarted daemon opens the crashed log: it verifies it, drops a
        // torn final line, and continues the chain (or refuses to start).
        let mut daemon = Daemon::start(opts);
        if trial == 0 {
            for name in ["signing-key.pem", "signing-key.pub.pem"] {
                std::fs::copy(daemon.state_dir.path().join(name), keys.join(name))
                    .expect("keep the signing key");
            }
        }
        let approver = Approver::start(daemon.state_dir.path());
        let load = Load::start(&cg, &format!("t{trial}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while load.answers() == 0 {
            assert!(
                Instant::now() < deadline,
                "trial {trial}: no answer within 30 s:\n{}",
                daemon.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        if trial == 0 {
            let status = Command::new(kya_bin())
                .args(["status", "--json", "--state-dir"])
                .arg(daemon.state_dir.path())
                .output()
                .expect("kya status");
            let status: Value = serde_json::from_slice(&status.stdout).expect("status JSON");
            let sink = &status["sinks"][0];
            assert!(
                sink["sink"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("syslog:unix:")
                    && sink["failures"].as_u64().unwrap_or(0) > 0
                    && sink["last_error"]
                        .as_str()
                        .is_some_and(|e| e.contains("no-syslog-here")),
                "an unreachable syslog sink must show in kya status: {status}"
            );
        }
        std::thread::sleep(Duration::from_millis(random_ms(50, 1500)));
        daemon.kill9();
        drop(approver);
        let seen = load.finish();
        journal = std::fs::read(daemon.state_dir.path().join("approvals.journal")).ok();
        drop(daemon);

        let (code, out) = verify(&audit, &public_key);
        assert_eq!(
            code, 0,
            "trial {trial}: the crashed log does not verify:\n{out}"
        );
        let bytes = std::fs::read(&audit).expect("audit log");
        if bytes.last().is_some_and(|b| *b != b'\n') {
            torn += 1;
            assert!(
                out.contains("incomplete final record"),
                "trial {trial}: a torn tail must be reported as such:\n{out}"
            );
        }
        let events = logged(&audit);
        check_answers(trial, &seen, &events, &mut tally);
        eprintln!(
            "trial {trial}: {} answers seen, {} records in the log",
            seen.iter().filter(|a| a.get("error").is_none()).count(),
            events.len()
        );
    }

    // One last restart on the crashed log and a clean stop: the whole chain
    // verifies strictly, with a final checkpoint over every record, and
    // every decision of every killed daemon has exactly one final record
    // (`--closed`: no hold may be left without an end).
    let mut opts = DaemonOptions::new(LISTEN_PORT).args(args(&audit));
    opts.key_from = Some(keys.clone());
    if let Some(j) = journal.take() {
        opts.state_files.push(("approvals.journal".into(), j));
    }
    let mut daemon = Daemon::start(opts);
    assert!(daemon.terminate().success(), "{}", daemon.log_text());
    drop(daemon);
    let (code, out) = verify_closed(&audit, &public_key);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("incomplete"), "{out}");
    let records = logged(&audit).len();
    assert!(
        records >= tally.denies + tally.allows + 2 * tally.approved,
        "{records} records"
    );
    assert!(
        tally.denies > 0 && tally.allows > 0 && tally.approved > 0,
        "the load must have produced every kind of answer: {} denies, {} allows, {} approved",
        tally.denies,
        tally.allows,
        tally.approved
    );
    eprintln!(
        "{TRIALS} kill -9 trials in {:?}: {} denies, {} allows, {} approved calls seen by the agent, all in the log; {torn} torn tails; {records} records verify",
        started.elapsed(),
        tally.denies,
        tally.allows,
        tally.approved
    );
}
