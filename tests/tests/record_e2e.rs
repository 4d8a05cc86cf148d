//! Every held call ends on the record when the daemon stops, end to end,
//! with the real daemon, the real MCP client (PyPI `mcp`) in a selected
//! cgroup and the real MCP server:
//! * SIGTERM with calls held: each agent is answered with a denial saying
//!   kya is stopping, the server never ran the tool (its own record), each
//!   held decision ends in exactly one `interrupted` record, and the log
//!   verifies with `kya audit verify --closed` (no hold left without an end);
//! * `kill -9` with a call held, then a restart: the hold the approvals
//!   journal still holds gets its `interrupted` record in the audit log.

use kya_e2e::*;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

const PORT: u16 = 18523;

const POLICY: &str = r#"
[defaults]
verdict = "allow"
methods = "allow"
hold_timeout = "300s"

[[rule]]
id = "big-transfer"
tool = "transfer"
verdict = "hold"
"#;

fn client(cg: &TestCgroup, args: &[&str]) -> std::process::Child {
    mcp_client(cg, &format!("http://127.0.0.1:{PORT}/mcp"), args)
}

fn audit_events(audit: &Path) -> Vec<Value> {
    std::fs::read_to_string(audit)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("audit record")["event"].clone())
        .collect()
}

/// Every decision id in the log has exactly one final record.
fn assert_one_end_each(events: &[Value]) {
    let mut finals: HashMap<&str, usize> = HashMap::new();
    for e in events {
        let n = finals
            .entry(e["decision_id"].as_str().expect("decision id"))
            .or_default();
        if e["kind"] != "hold" {
            *n += 1;
        }
    }
    for (id, n) in finals {
        assert_eq!(n, 1, "decision {id} has {n} final records: {events:#?}");
    }
}

fn verify_closed(audit: &Path, key: &Path) -> Output {
    Command::new(kya_bin())
        .args(["audit", "verify", "--closed"])
        .arg(audit)
        .arg("--key")
        .arg(key)
        .output()
        .expect("kya audit verify")
}

fn wait_pending(daemon: &Daemon, n: usize) -> Vec<Value> {
    let mut seen: Vec<String> = Vec::new();
    let mut all = Vec::new();
    while all.len() < n {
        let refs: Vec<&str> = seen.iter().map(String::as_str).collect();
        let a = wait_new_approval(daemon, &refs);
        seen.push(a["id"].as_str().expect("approval id").to_string());
        all.push(a);
    }
    all
}

#[test]
fn sigterm_with_calls_held_denies_them_and_ends_each_on_record() {
    if !privileged("sigterm_with_calls_held_denies_them_and_ends_each_on_record") {
        return;
    }
    let _g = serial();
    let scene = AgentScene::new("recterm", POLICY);
    let server = McpServer::start(scene.dir.path(), PORT, "peer.log");
    let mut daemon = Daemon::start(scene.daemon_options(987, PORT));
    let audit = daemon.state_dir.path().join("audit.jsonl");
    let key = daemon.state_dir.path().join("signing-key.pub.pem");

    let held: Vec<_> = (0..2)
        .map(|i| {
            client(
                &scene.cg,
                &[
                    "transfer",
                    &format!(r#"{{"amount": {}, "to": "bob"}}"#, 100 + i),
                ],
            )
        })
        .collect();
    let pending = wait_pending(&daemon, 2);
    let status = daemon.terminate();
    assert!(status.success(), "kya run exited with {status}");

    for c in held {
        let r = mcp_result(c);
        assert_eq!(r["isError"], true, "{r}");
        assert!(
            r["text"].as_str().unwrap_or("").contains("kya is stopping"),
            "{r}"
        );
    }
    assert!(
        !server.ran().contains(&"transfer".to_string()),
        "a held call reached the server: {:?}",
        server.ran()
    );
    let events = audit_events(&audit);
    assert_one_end_each(&events);
    for a in &pending {
        let id = a["decision_id"].as_str().expect("decision id");
        let ends: Vec<&Value> = events
            .iter()
            .filter(|e| e["decision_id"] == id && e["kind"] != "hold")
            .collect();
        assert_eq!(ends.len(), 1, "{events:#?}");
        assert_eq!(ends[0]["kind"], "interrupted", "{events:#?}");
        assert_eq!(ends[0]["verdict"], "deny");
        assert_eq!(ends[0]["hold_id"], a["id"]);
    }
    let v = verify_closed(&audit, &key);
    assert!(
        v.status.success(),
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
}

#[test]
fn a_restart_records_the_holds_a_killed_daemon_left_as_interrupted() {
    if !privileged("a_restart_records_the_holds_a_killed_daemon_left_as_interrupted") {
        return;
    }
    let _g = serial();
    let scene = AgentScene::new("recrest", POLICY);
    let server = McpServer::start(scene.dir.path(), PORT, "peer.log");
    // The log lives outside either daemon's state directory; the second
    // daemon continues it with the same key and the same approvals journal.
    let audit = scene.dir.path().join("audit.jsonl");
    let opts = || {
        scene
            .daemon_options(988, PORT)
            .args(["--audit".to_string(), audit.display().to_string()])
    };
    let mut first = Daemon::start(opts());
    let held = client(&scene.cg, &["transfer", r#"{"amount": 5, "to": "eve"}"#]);
    let pending = wait_pending(&first, 1);
    let decision = pending[0]["decision_id"]
        .as_str()
        .expect("decision id")
        .to_string();
    first.kill9();
    let _ = mcp_result(held);
    let journal = first.state_dir.path().join("approvals.journal");
    let state = first.state_dir.path().to_path_buf();
    let before = audit_events(&audit);
    assert!(
        before
            .iter()
            .any(|e| e["decision_id"] == decision.as_str() && e["kind"] == "hold"),
        "{before:#?}"
    );
    assert!(
        !before
            .iter()
            .any(|e| e["decision_id"] == decision.as_str() && e["kind"] != "hold"),
        "the killed daemon ended nothing"
    );

    let mut second_opts = opts();
    second_opts.key_from = Some(state.clone());
    // The second daemon starts on the first one's approvals journal.
    let journal_bytes = std::fs::read(&journal).expect("approvals journal");
    second_opts
        .state_files
        .push(("approvals.journal".into(), journal_bytes));
    let mut second = Daemon::start(second_opts);
    let status = second.terminate();
    assert!(status.success(), "kya run exited with {status}");
    assert!(!server.ran().contains(&"transfer".to_string()));

    let events = audit_events(&audit);
    assert_one_end_each(&events);
    let ends: Vec<&Value> = events
        .iter()
        .filter(|e| e["decision_id"] == decision.as_str() && e["kind"] != "hold")
        .collect();
    assert_eq!(ends.len(), 1, "{events:#?}");
    assert_eq!(ends[0]["kind"], "interrupted");
    assert_eq!(ends[0]["hold_id"], pending[0]["id"]);
    let key = second.state_dir.path().join("signing-key.pub.pem");
    let v = verify_closed(&audit, &key);
    assert!(
        v.status.success(),
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
}
