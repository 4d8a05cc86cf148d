//! Tamper tests: logs written by the real writer, checked by the real `kya`
//! binary. Every manipulation must make `kya audit verify` exit 1 and name the
//! place; the untouched log must verify.

use ed25519_dalek::SigningKey;
use kya_agent::audit::event::{AgentInfo, ApprovalInfo, Destination, McpInfo, ProcessInfo};
use kya_agent::audit::{AuditConfig, AuditLog, DecisionEvent, EventKind};
use kya_agent::keys;
use kya_common::Verdict;
use std::path::{Path, PathBuf};
use std::process::Command;

const RECORDS: u64 = 30;

fn event(n: u64) -> DecisionEvent {
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
    let mut mcp = McpInfo {
        method: "tools/call".into(),
        tool: Some(format!("tool_{n}")),
        jsonrpc_id: Some(serde_json::json!(n)),
        session_id: Some("s-1".into()),
        ..Default::default()
    };
    mcp.set_args(
        &serde_json::json!({"n": n, "secret": "s3cret"}),
        n % 4 == 0,
        &["secret".into()],
    );
    DecisionEvent {
        decision_id: format!("dec-{n}"),
        kind,
        time: time::OffsetDateTime::from_unix_timestamp(1_795_000_000 + n as i64).unwrap(),
        host: "testhost".into(),
        process: ProcessInfo {
            pid: 100 + n as u32,
            tgid: 100,
            uid: 1000,
            gid: 1000,
            exe: "/usr/bin/agent".into(),
            comm: "agent".into(),
            cgroup: "/agents/a".into(),
            ..Default::default()
        },
        agent: AgentInfo {
            name: "bot".into(),
            owner: Some("alice".into()),
        },
        destination: Destination {
            host: "mcp.test".into(),
            ip: Some("127.0.0.1".parse().unwrap()),
            port: 443,
            sni: Some("mcp.test".into()),
        },
        mcp,
        verdict,
        rule: Some("r1".into()),
        reason: "because".into(),
        policy_version: "v1".into(),
        approval: matches!(kind, EventKind::Approved | EventKind::Rejected).then(|| ApprovalInfo {
            id: format!("ap-{n}"),
            approver: Some("alice".into()),
            channel: Some("cli".into()),
            id_token_sha256: None,
        }),
        credential_id: None,
        hold_id: None,
        latency_us: 50,
    }
}

/// A state dir with a key and a log of `RECORDS` records written by the real writer.
struct Fixture {
    _dir: tempfile::TempDir,
    state: PathBuf,
    log: PathBuf,
    checkpoints: PathBuf,
    pubkey: PathBuf,
}

fn write_log(state: &Path, log: &Path, count: u64, rotate_bytes: Option<u64>) {
    let key = keys::load_or_create(state).unwrap();
    let mut cfg = AuditConfig::new(log);
    cfg.origin = Some("testhost/kya-audit".into());
    cfg.checkpoint_every = 8;
    if let Some(r) = rotate_bytes {
        cfg.rotate_bytes = r;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let audit = AuditLog::open(cfg, key).unwrap();
        let mut pending = Vec::new();
        for n in 0..count {
            let e = event(n);
            let r = audit.append(&e, e.required_durability()).await.unwrap();
            pending.push(r);
        }
        for r in pending {
            r.committed().await.unwrap();
        }
        audit.close().unwrap();
    });
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let log = dir.path().join("audit.jsonl");
    write_log(&state, &log, RECORDS, None);
    Fixture {
        checkpoints: dir.path().join("audit.jsonl.checkpoints"),
        pubkey: state.join(keys::PUBLIC_KEY_FILE),
        _dir: dir,
        state,
        log,
    }
}

struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
}

fn kya_verify(files: &[&Path], extra: &[&str]) -> Outcome {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kya"));
    cmd.args(["audit", "verify"]);
    cmd.args(files);
    cmd.args(extra);
    let out = cmd.output().unwrap();
    Outcome {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn with_key(f: &Fixture) -> [&str; 2] {
    ["--key", f.pubkey.to_str().unwrap()]
}

/// The `line` of the first `<file>:<line>:` in a failure message.
fn named_line(stderr: &str, file: &Path) -> Option<u64> {
    let name = file.display().to_string();
    let at = stderr.find(&format!("{name}:"))? + name.len() + 1;
    stderr[at..].split(':').next()?.parse().ok()
}

fn assert_fails(o: &Outcome, what: &str) {
    assert_eq!(
        o.code, 1,
        "{what}: expected exit 1\nstdout: {}\nstderr: {}",
        o.stdout, o.stderr
    );
    assert!(o.stderr.contains("FAILED"), "{what}: {}", o.stderr);
}

#[test]
fn the_untouched_log_verifies_with_every_key_source() {
    let f = fixture();
    let o = kya_verify(&[&f.log], &with_key(&f));
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert!(
        o.stdout.contains(&format!("{RECORDS} records")),
        "{}",
        o.stdout
    );
    assert!(o.stdout.contains("(--key)"), "{}", o.stdout);

    let o = kya_verify(&[&f.log], &["--state-dir", f.state.to_str().unwrap()]);
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("(state dir)"), "{}", o.stdout);

    let empty = tempfile::tempdir().unwrap();
    let o = kya_verify(&[&f.log], &["--state-dir", empty.path().to_str().unwrap()]);
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert!(
        o.stdout.contains("key named in the checkpoint file"),
        "{}",
        o.stdout
    );
}

#[test]
fn flipping_any_single_byte_of_the_log_is_detected_at_its_line() {
    let f = fixture();
    let original = std::fs::read(&f.log).unwrap();
    let line_of = |pos: usize| original[..pos].iter().filter(|&&b| b == b'\n').count() as u64 + 1;
    // Every byte of the first and last records, and a stride through the rest.
    let first_end = original.iter().position(|&b| b == b'\n').unwrap() + 1;
    let last_start = original[..original.len() - 1]
        .iter()
        .rposition(|&b| b == b'\n')
        .unwrap()
        + 1;
    // (Every byte of a smaller log is flipped in-process by the verify.rs unit tests.)
    let mut positions: Vec<usize> = (0..first_end).step_by(7).collect();
    positions.extend((first_end..last_start).step_by(211));
    positions.extend((last_start..original.len()).step_by(7));
    positions.push(original.len() - 1);
    for (i, &pos) in positions.iter().enumerate() {
        let mut bytes = original.clone();
        bytes[pos] ^= if i % 2 == 0 { 0x01 } else { 0x20 };
        std::fs::write(&f.log, &bytes).unwrap();
        let o = kya_verify(&[&f.log], &with_key(&f));
        assert_fails(&o, &format!("byte {pos}"));
        let line = named_line(&o.stderr, &f.log)
            .unwrap_or_else(|| panic!("byte {pos}: no file:line in {}", o.stderr));
        let want = line_of(pos);
        assert!(
            line == want || line == want + 1,
            "byte {pos} (line {want}) reported at line {line}: {}",
            o.stderr
        );
    }
    std::fs::write(&f.log, &original).unwrap();
    assert_eq!(kya_verify(&[&f.log], &with_key(&f)).code, 0);
}

#[test]
fn flipping_any_byte_of_the_checkpoint_file_is_detected() {
    let f = fixture();
    let original = std::fs::read(&f.checkpoints).unwrap();
    for pos in (0..original.len()).step_by(5).chain([original.len() - 1]) {
        let mut bytes = original.clone();
        bytes[pos] ^= 0x01;
        std::fs::write(&f.checkpoints, &bytes).unwrap();
        let o = kya_verify(&[&f.log], &with_key(&f));
        assert_fails(&o, &format!("checkpoint byte {pos}"));
        assert!(
            o.stderr.contains(&f.checkpoints.display().to_string())
                || o.stderr.contains(&f.log.display().to_string()),
            "{}",
            o.stderr
        );
    }
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text).unwrap();
}

#[test]
fn deleting_a_record_is_detected_where_it_was() {
    let f = fixture();
    let mut l = lines(&f.log);
    l.remove(9);
    write_lines(&f.log, &l);
    let o = kya_verify(&[&f.log], &with_key(&f));
    assert_fails(&o, "delete");
    assert_eq!(named_line(&o.stderr, &f.log), Some(10), "{}", o.stderr);
    assert!(
        o.stderr.contains("sequence number 10 where 9 was expected"),
        "{}",
        o.stderr
    );
}

#[test]
fn reordering_two_records_is_detected() {
    let f = fixture();
    let mut l = lines(&f.log);
    l.swap(4, 5);
    write_lines(&f.log, &l);
    let o = kya_verify(&[&f.log], &with_key(&f));
    assert_fails(&o, "reorder");
    assert_eq!(named_line(&o.stderr, &f.log), Some(5), "{}", o.stderr);
}

#[test]
fn truncation_below_the_last_checkpoint_is_detected() {
    let f = fixture();
    let l = lines(&f.log);
    for keep in [0usize, 1, 17, RECORDS as usize - 1] {
        write_lines(&f.log, &l[..keep]);
        if keep == 0 {
            std::fs::write(&f.log, "").unwrap();
        }
        let o = kya_verify(&[&f.log], &with_key(&f));
        assert_fails(&o, &format!("truncate to {keep}"));
        assert!(o.stderr.contains("truncated"), "{}", o.stderr);
        assert_eq!(
            named_line(&o.stderr, &f.log),
            Some(keep as u64 + 1),
            "{}",
            o.stderr
        );
    }
    // Cutting the checkpoint file instead: the log now claims more than any
    // checkpoint, which is allowed (chain-only tail) -- but deleting it entirely is not.
    std::fs::remove_file(&f.checkpoints).unwrap();
    write_lines(&f.log, &l);
    let o = kya_verify(&[&f.log], &with_key(&f));
    assert_fails(&o, "checkpoint file removed");
    assert!(o.stderr.contains("checkpoint file missing"), "{}", o.stderr);
}

#[test]
fn a_replaced_checkpoint_signature_is_detected() {
    let f = fixture();
    let text = std::fs::read_to_string(&f.checkpoints).unwrap();
    let sig_lines: Vec<&str> = text.lines().filter(|l| l.starts_with('\u{2014}')).collect();
    let victim = *sig_lines.last().unwrap();
    let (prefix, blob) = victim.rsplit_once(' ').unwrap();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut raw = b64.decode(blob).unwrap();

    // Same key id, different signature bytes.
    raw[10] ^= 0x01;
    let forged = format!("{prefix} {}", b64.encode(&raw));
    std::fs::write(&f.checkpoints, text.replace(victim, &forged)).unwrap();
    let o = kya_verify(&[&f.log], &with_key(&f));
    assert_fails(&o, "forged signature");
    assert!(o.stderr.contains("does not verify"), "{}", o.stderr);
    assert!(
        o.stderr.contains(&f.checkpoints.display().to_string()),
        "{}",
        o.stderr
    );

    // A valid signature over the same body by another key, under the same name.
    let other = SigningKey::from_bytes(&[42; 32]);
    let notes = kya_agent::audit::checkpoint::parse_file(&text)
        .unwrap()
        .notes;
    let last = &notes.last().unwrap().note;
    let resigned =
        kya_agent::audit::checkpoint::sign(&last.body, "testhost/kya-audit", &other).unwrap();
    let new_sig = resigned.render().lines().last().unwrap().to_string();
    std::fs::write(&f.checkpoints, text.replace(victim, &new_sig)).unwrap();
    let o = kya_verify(&[&f.log], &with_key(&f));
    assert_fails(&o, "signature by another key");
    assert!(
        o.stderr.contains("not signed by the trusted key"),
        "{}",
        o.stderr
    );
    // Without a pinned key the embedded key catches it too (the body names kya's key).
    let empty = tempfile::tempdir().unwrap();
    let o = kya_verify(&[&f.log], &["--state-dir", empty.path().to_str().unwrap()]);
    assert_fails(&o, "signature by another key, embedded key");
}

#[test]
fn a_log_re_signed_with_another_key_fails_with_the_pinned_key() {
    let f = fixture();
    // The attacker rewrites history with a key of their own: same events, new
    // chain, new checkpoints, all internally consistent.
    let forged_dir = tempfile::tempdir().unwrap();
    let forged_state = forged_dir.path().join("state");
    let forged_log = forged_dir.path().join("audit.jsonl");
    write_log(&forged_state, &forged_log, RECORDS, None);
    std::fs::copy(&forged_log, &f.log).unwrap();
    std::fs::copy(
        forged_dir.path().join("audit.jsonl.checkpoints"),
        &f.checkpoints,
    )
    .unwrap();

    let o = kya_verify(&[&f.log], &with_key(&f));
    assert_fails(&o, "re-signed log with --key");
    assert!(
        o.stderr.contains("not signed by the trusted key"),
        "{}",
        o.stderr
    );
    assert_eq!(
        kya_verify(&[&f.log], &["--state-dir", f.state.to_str().unwrap()]).code,
        1,
        "the state dir key pins too"
    );
    // Self-consistent: with no key to pin, only integrity can be shown, and the output says so.
    let empty = tempfile::tempdir().unwrap();
    let o = kya_verify(&[&f.log], &["--state-dir", empty.path().to_str().unwrap()]);
    assert_eq!(o.code, 0);
    assert!(o.stdout.contains("not who wrote it"), "{}", o.stdout);
}

#[test]
fn rotated_sets_verify_in_order_and_only_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let log = dir.path().join("audit.jsonl");
    write_log(&state, &log, 60, Some(3000));
    let set = kya_agent::audit::files::log_set(&log).unwrap();
    assert!(set.len() >= 3, "{set:?}");
    let pubkey = state.join(keys::PUBLIC_KEY_FILE);
    let key = ["--key", pubkey.to_str().unwrap()];
    let refs: Vec<&Path> = set.iter().map(PathBuf::as_path).collect();
    let o = kya_verify(&refs, &key);
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert!(
        o.stdout
            .contains(&format!("{} file(s), 60 records", set.len())),
        "{}",
        o.stdout
    );

    let mut swapped = refs.clone();
    swapped.swap(0, 1);
    let o = kya_verify(&swapped, &key);
    assert_fails(&o, "files out of order");
    assert_eq!(named_line(&o.stderr, swapped[0]), Some(1), "{}", o.stderr);

    let mut missing = refs.clone();
    missing.remove(1);
    let o = kya_verify(&missing, &key);
    assert_fails(&o, "middle file missing");
    assert_eq!(named_line(&o.stderr, missing[1]), Some(1), "{}", o.stderr);

    // Only the live file: its first record is not seq 0.
    let o = kya_verify(&[&log], &key);
    assert_fails(&o, "live file alone");
}

#[test]
fn hostile_files_fail_cleanly_and_never_panic() {
    let f = fixture();
    let good = std::fs::read(&f.log).unwrap();
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"hello world\n".to_vec()),
        ("non-utf8", vec![0xff, 0xfe, 0xfd, b'\n']),
        (
            "wrong types",
            b"{\"seq\":\"zero\",\"prev\":1,\"event\":null}\n".to_vec(),
        ),
        ("array", b"[1,2,3]\n".to_vec()),
        ("nul bytes", vec![0u8; 4096]),
        (
            "deep nesting",
            [b"[".repeat(50_000), b"]".repeat(50_000), b"\n".to_vec()].concat(),
        ),
    ];
    let mut huge = vec![b'a'; 3 << 20];
    huge.push(b'\n');
    cases.push(("huge line", huge));
    let mut appended = good.clone();
    appended.extend_from_slice(b"{\"seq\":30,\"prev\":\"00\",\"event\":{}}\n");
    cases.push(("appended forgery", appended));
    for (what, bytes) in cases {
        std::fs::write(&f.log, &bytes).unwrap();
        let o = kya_verify(&[&f.log], &with_key(&f));
        assert_fails(&o, what);
        assert!(
            named_line(&o.stderr, &f.log).is_some(),
            "{what}: {}",
            o.stderr
        );
    }
    // A hostile checkpoint file.
    std::fs::write(&f.log, &good).unwrap();
    for bytes in [vec![0xffu8; 100], b"\n\n\n".to_vec(), vec![b'x'; 100_000]] {
        std::fs::write(&f.checkpoints, &bytes).unwrap();
        let o = kya_verify(&[&f.log], &with_key(&f));
        assert_fails(&o, "hostile checkpoint file");
    }
    // Missing file, directory instead of file.
    let o = kya_verify(&[Path::new("/nonexistent/audit.jsonl")], &with_key(&f));
    assert_fails(&o, "missing file");
    let o = kya_verify(&[f.state.as_path()], &with_key(&f));
    assert_fails(&o, "directory");
}
