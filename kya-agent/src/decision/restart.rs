//! Holds a previous run left in the approvals journal (kya was killed, or
//! the machine went down, while calls were held): each ends now, in the
//! audit log, as `interrupted` (the agent's call was never released; its
//! connection died with the daemon).

use crate::approvals::persist::PendingRecord;
use crate::audit::ends;
use crate::audit::event::{
    AgentInfo as EventAgent, ApprovalInfo, Destination, EventKind, McpInfo, ProcessInfo,
};
use crate::audit::writer::{AuditLog, Durability};
use crate::audit::DecisionEvent;
use kya_common::Verdict;
use std::collections::HashSet;
use std::path::Path;
use time::OffsetDateTime;

/// Why a journaled hold is recorded as `interrupted`.
pub(crate) const RESTART_REASON: &str =
    "kya stopped while the call was held (found in the approvals journal at start); the call was not forwarded";

/// Write an `interrupted` record for each of `left` whose decision has no
/// final record in the log yet (a hold may have ended on record just before
/// a crash lost its journal line), durably. Returns how many were written.
pub(crate) async fn record_interrupted(
    audit: &AuditLog,
    audit_path: &Path,
    host: &str,
    left: &[PendingRecord],
) -> Result<usize, String> {
    if left.is_empty() {
        return Ok(0);
    }
    let ids: HashSet<String> = left.iter().map(|r| r.request.decision_id.clone()).collect();
    let base = audit_path.to_path_buf();
    let ended = tokio::task::spawn_blocking(move || ends::ended_among(&base, &ids))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("reading the audit log: {e}"))?;
    let mut written = 0;
    for r in left {
        if ended.contains(&r.request.decision_id) {
            continue;
        }
        let event = interrupted_event(host, r);
        audit
            .append(&event, Durability::Sync)
            .await
            .map_err(|e| e.to_string())?;
        written += 1;
    }
    Ok(written)
}

/// The final record of a hold found in the journal.
pub(crate) fn interrupted_event(host: &str, r: &PendingRecord) -> DecisionEvent {
    let req = &r.request;
    let mut mcp = McpInfo {
        method: "tools/call".into(),
        tool: Some(req.tool.clone()),
        ..McpInfo::default()
    };
    mcp.set_args(&req.args, false, &[]);
    let mut process = ProcessInfo::from(&req.process);
    process.tgid = req.process.pid;
    let decision_id = if req.decision_id.is_empty() {
        // Journals from before decision ids were kept: the approval id
        // still names the hold.
        r.view.id.clone()
    } else {
        req.decision_id.clone()
    };
    DecisionEvent {
        decision_id,
        kind: EventKind::Interrupted,
        time: OffsetDateTime::now_utc(),
        host: host.to_string(),
        process,
        agent: EventAgent {
            name: req.agent.clone(),
            owner: Some(req.owner.clone()),
        },
        destination: Destination {
            host: req.server.clone(),
            ..Destination::default()
        },
        mcp,
        verdict: Verdict::Deny,
        rule: req.rule.clone(),
        reason: RESTART_REASON.into(),
        policy_version: req.policy_version.clone(),
        approval: Some(ApprovalInfo {
            id: r.view.id.clone(),
            ..ApprovalInfo::default()
        }),
        credential_id: None,
        hold_id: Some(r.view.id.clone()),
        latency_us: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::approvals::persist::Persist;
    use crate::approvals::Approvals;
    use crate::audit::verify::{verify, TrustedKey, VerifyOptions};
    use crate::audit::writer::AuditConfig;
    use std::time::Duration;

    fn hold_event(r: &PendingRecord) -> DecisionEvent {
        let mut e = interrupted_event("h", r);
        e.kind = EventKind::Hold;
        e.verdict = Verdict::Hold;
        e
    }

    #[tokio::test]
    async fn journaled_holds_end_as_interrupted_once() {
        let dir = tempfile::tempdir().unwrap();
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let path = dir.path().join("audit.jsonl");
        // A previous run: two calls held (and recorded), then killed.
        let approvals = Approvals::new(8, Some(Persist::new(dir.path())));
        let mut a = crate::approvals::pending::tests::action("bot", "alice");
        a.decision_id = "dec_00000000000000a1".into();
        let h1 = approvals
            .submit(a.clone(), Duration::from_secs(60))
            .unwrap();
        a.decision_id = "dec_00000000000000a2".into();
        let h2 = approvals.submit(a, Duration::from_secs(60)).unwrap();
        std::mem::forget((h1, h2));
        let left = Persist::new(dir.path()).interrupted().unwrap();
        assert_eq!(left.len(), 2);
        let log = AuditLog::open(AuditConfig::new(&path), key.clone()).unwrap();
        for r in &left {
            log.append(&hold_event(r), Durability::Sync).await.unwrap();
        }
        // One of them ended on record just before the crash.
        let mut done = interrupted_event("h", &left[0]);
        done.kind = EventKind::Expired;
        log.append(&done, Durability::Sync).await.unwrap();

        let n = record_interrupted(&log, &path, "h", &left).await.unwrap();
        assert_eq!(n, 1, "only the hold without an end");
        log.close().unwrap();
        let report = verify(
            std::slice::from_ref(&path),
            &VerifyOptions {
                key: TrustedKey::Pinned(key.verifying_key()),
                checkpoints: None,
                allow_torn_tail: false,
                ends: Some(true),
            },
        )
        .unwrap();
        let ends = report.ends.unwrap();
        assert!(!ends.has_findings(), "{ends:?}");
        assert!(ends.open.is_empty());
        assert_eq!(report.records, 4);
    }
}
