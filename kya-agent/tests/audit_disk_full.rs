//! Disk full: appends fail with the typed error, `health()` says so, nothing
//! panics, the log stays verifiable, and it heals when space returns.
//!
//! Needs root (to mount a 64 KiB tmpfs); skipped otherwise, except under
//! `CI=true`, where a skip is a failure.

use kya_agent::audit::event::{AgentInfo, Destination, McpInfo, ProcessInfo};
use kya_agent::audit::files;
use kya_agent::audit::verify::{verify, TrustedKey, VerifyOptions};
use kya_agent::audit::{
    AuditConfig, AuditError, AuditLog, DecisionEvent, Durability, EventKind, HealthState,
};
use kya_common::Verdict;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::path::{Path, PathBuf};

fn event(n: u64) -> DecisionEvent {
    DecisionEvent {
        decision_id: format!("dec-{n}"),
        kind: EventKind::Decision,
        time: time::OffsetDateTime::from_unix_timestamp(1_795_000_000).unwrap(),
        host: "testhost".into(),
        process: ProcessInfo {
            pid: 7,
            tgid: 7,
            comm: "agent".into(),
            ..Default::default()
        },
        agent: AgentInfo {
            name: "bot".into(),
            owner: None,
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
        verdict: Verdict::Deny,
        rule: Some("r".into()),
        reason: "padding ".repeat(60),
        policy_version: "v1".into(),
        approval: None,
        credential_id: None,
        hold_id: None,
        latency_us: 1,
    }
}

fn skip_or_fail(why: &str) {
    kya_testkit::skip("audit_disk_full", why);
}

struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = umount2(&self.0, MntFlags::MNT_DETACH);
    }
}

fn verify_log(base: &Path, key: &ed25519_dalek::SigningKey) -> u64 {
    verify(
        &files::log_set(base).unwrap(),
        &VerifyOptions {
            ends: None,
            key: TrustedKey::Pinned(key.verifying_key()),
            checkpoints: None,
            allow_torn_tail: false,
        },
    )
    .unwrap_or_else(|f| panic!("log on the full disk no longer verifies: {f}"))
    .records
}

#[tokio::test]
async fn a_full_disk_fails_appends_with_a_typed_error_and_health_reports_it() {
    if !nix::unistd::Uid::effective().is_root() {
        return skip_or_fail("not root");
    }
    let dir = tempfile::tempdir().unwrap();
    if let Err(e) = mount(
        Some("tmpfs"),
        dir.path(),
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("size=64k"),
    ) {
        return skip_or_fail(&format!("cannot mount tmpfs: {e}"));
    }
    let _guard = Mounted(dir.path().to_path_buf());
    let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    let base = dir.path().join("audit.jsonl");
    // Most of the space is taken by something else; freeing it later lets the log heal.
    let filler = dir.path().join("filler");
    std::fs::write(&filler, vec![0u8; 40 * 1024]).unwrap();

    let mut cfg = AuditConfig::new(&base);
    cfg.origin = Some("testhost/kya-audit".into());
    let log = AuditLog::open(cfg, key.clone()).unwrap();
    let mut failure = None;
    for n in 0..1000 {
        match log.append(&event(n), Durability::Sync).await {
            Ok(_) => {}
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let failure = failure.expect("a 64 KiB tmpfs never filled up");
    match &failure {
        AuditError::Write { kind, .. } => {
            assert_eq!(*kind, std::io::ErrorKind::StorageFull, "{failure}")
        }
        other => panic!("expected a write error, got {other:?}"),
    }
    let health = log.health();
    assert!(!health.is_writable());
    assert!(
        matches!(health.state, HealthState::Failing { .. }),
        "{health:?}"
    );
    assert!(health.write_failures >= 1);
    let written = health.records;
    assert!(written > 0);

    // Group callers learn it from `append` itself: it returns once the record
    // is written, and the write failed.
    assert!(matches!(
        log.append(&event(5000), Durability::Group).await,
        Err(AuditError::Write { .. })
    ));
    assert_eq!(
        log.health().records,
        written,
        "failed records are not counted"
    );

    // No partial record was left behind: what is on disk verifies.
    assert_eq!(verify_log(&base, &key), written);

    // Space returns: the next append succeeds and health recovers.
    std::fs::remove_file(&filler).unwrap();
    let c = log
        .append(&event(6000), Durability::Sync)
        .await
        .unwrap()
        .committed()
        .await
        .unwrap();
    assert_eq!(c.seq, written);
    assert!(log.health().is_writable());
    log.close().unwrap();
    assert_eq!(verify_log(&base, &key), written + 1);
}
