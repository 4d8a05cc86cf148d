//! Crash test: a process appending mixed records is killed with SIGKILL at
//! random moments, many times, on the same log. Every record the writer
//! acknowledged must be in the log, the log must verify (an incomplete final
//! line is the only thing allowed), and the next open must continue the chain.

use kya_agent::audit::event::{AgentInfo, ApprovalInfo, Destination, McpInfo, ProcessInfo};
use kya_agent::audit::{AuditConfig, AuditLog, DecisionEvent, EventKind};
use kya_agent::keys;
use kya_common::Verdict;
use rand::Rng;
use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "KYA_AUDIT_CRASH_DIR";

fn event(trial: u64, n: u64) -> DecisionEvent {
    let kind = EventKind::ALL[(n % 5) as usize];
    let verdict = match kind {
        EventKind::Decision if n % 2 == 0 => Verdict::Allow,
        EventKind::Decision => Verdict::Deny,
        EventKind::Hold => Verdict::Hold,
        EventKind::Approved => Verdict::Allow,
        EventKind::Rejected
        | EventKind::Expired
        | EventKind::ControlRefused
        | EventKind::Cancelled
        | EventKind::Interrupted => Verdict::Deny,
    };
    DecisionEvent {
        decision_id: format!("t{trial}-n{n}"),
        kind,
        time: time::OffsetDateTime::now_utc(),
        host: "crash".into(),
        process: ProcessInfo {
            pid: std::process::id(),
            tgid: std::process::id(),
            comm: "child".into(),
            ..Default::default()
        },
        agent: AgentInfo {
            name: "bot".into(),
            owner: Some("alice".into()),
        },
        destination: Destination {
            host: "mcp.test".into(),
            port: 443,
            ..Default::default()
        },
        mcp: McpInfo {
            method: "tools/call".into(),
            tool: Some("t".into()),
            ..Default::default()
        },
        verdict,
        rule: None,
        reason: "crash test ".repeat(1 + (n % 7) as usize),
        policy_version: "v1".into(),
        approval: matches!(kind, EventKind::Approved | EventKind::Rejected).then(|| ApprovalInfo {
            id: format!("a{n}"),
            approver: Some("alice".into()),
            channel: Some("cli".into()),
            id_token_sha256: None,
        }),
        credential_id: None,
        hold_id: None,
        latency_us: 1,
    }
}

/// Not a test: the child process of the crash test (run with `--ignored` by it).
/// Appends forever; prints `ack <decision id>` once `append` returned (a sync
/// record is on disk by then, a group record is written to the file).
#[test]
#[ignore = "helper process for kill_9_at_random_moments_loses_nothing_acknowledged"]
fn crash_child_process() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let dir = Path::new(&dir);
    let trial: u64 = std::env::var("KYA_AUDIT_CRASH_TRIAL")
        .unwrap()
        .parse()
        .unwrap();
    let key = keys::load_or_create(&dir.join("state")).unwrap();
    let mut cfg = AuditConfig::new(dir.join("audit.jsonl"));
    cfg.origin = Some("crash/kya-audit".into());
    cfg.checkpoint_every = 50;
    cfg.rotate_bytes = 64 * 1024;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let log = AuditLog::open(cfg, key).unwrap();
        let stdout = std::io::stdout();
        for n in 0.. {
            let e = event(trial, n);
            // Acknowledge as soon as `append` returns: that is when kya answers
            // the agent (a group record is written by then, not yet synced).
            let r = log.append(&e, e.required_durability()).await.unwrap();
            let mut out = stdout.lock();
            writeln!(out, "ack {}", e.decision_id).unwrap();
            out.flush().unwrap();
            drop(r);
        }
    });
}

fn logged_ids(dir: &Path) -> HashSet<String> {
    let mut ids = HashSet::new();
    for file in kya_agent::audit::files::log_set(&dir.join("audit.jsonl")).unwrap() {
        let text = std::fs::read_to_string(&file).unwrap();
        for line in text.split('\n') {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                if let Some(id) = v["event"]["decision_id"].as_str() {
                    assert!(ids.insert(id.to_string()), "{id} logged twice");
                }
            }
        }
    }
    ids
}

fn kya_verify(dir: &Path) -> (i32, String) {
    let mut files = kya_agent::audit::files::log_set(&dir.join("audit.jsonl")).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kya"));
    cmd.args(["audit", "verify"]).args(files.drain(..));
    cmd.arg("--key")
        .arg(dir.join("state").join(keys::PUBLIC_KEY_FILE));
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn kill_9_at_random_moments_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    keys::load_or_create(&dir.path().join("state")).unwrap();
    let mut rng = rand::thread_rng();
    let mut acked_total = 0usize;
    for trial in 0..12u64 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "crash_child_process",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_ENV, dir.path())
            .env("KYA_AUDIT_CRASH_TRIAL", trial.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(id) = line.strip_prefix("ack ") {
                    if tx.send(id.to_string()).is_err() {
                        break;
                    }
                }
            }
        });
        // Let it get going (first ack), then kill it after a random delay.
        let first = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("child never acknowledged a record");
        let delay = Duration::from_micros(rng.gen_range(0..40_000));
        let start = Instant::now();
        while start.elapsed() < delay {
            std::hint::spin_loop();
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        let mut acked: Vec<String> = vec![first];
        acked.extend(rx.try_iter());
        acked_total += acked.len();

        let (code, output) = kya_verify(dir.path());
        assert_eq!(
            code, 0,
            "trial {trial}: log does not verify after SIGKILL:\n{output}"
        );
        let logged = logged_ids(dir.path());
        for id in &acked {
            assert!(
                logged.contains(id),
                "trial {trial}: acknowledged {id} is not in the log"
            );
        }
    }
    assert!(acked_total >= 12);
    // One more clean open/close: the chain continues and verifies strictly (no torn tail left).
    let key = keys::load_or_create(&dir.path().join("state")).unwrap();
    let mut cfg = AuditConfig::new(dir.path().join("audit.jsonl"));
    cfg.origin = Some("crash/kya-audit".into());
    let log = AuditLog::open(cfg, key).unwrap();
    log.close().unwrap();
    let (code, output) = kya_verify(dir.path());
    assert_eq!(code, 0, "{output}");
    assert!(!output.contains("incomplete final record"), "{output}");
}
