//! Building the audit/stream record of a decision from what the proxy and the
//! policy engine know.

use crate::audit::event::{
    AgentInfo as EventAgent, ApprovalInfo, Destination, EventKind, McpInfo, ProcessInfo,
};
use crate::audit::DecisionEvent;
use crate::intercept::http::{CallFacts, ConnFacts};
use crate::policy::{AgentInfo, Decision};
use kya_common::Verdict;
use std::time::Instant;
use time::OffsetDateTime;

/// The facts shared by every record of one decision (a hold and its outcome
/// share them).
pub(super) struct EventFacts {
    decision_id: String,
    host: String,
    process: ProcessInfo,
    agent: EventAgent,
    destination: Destination,
    mcp: McpInfo,
    rule: Option<String>,
    reason: String,
    policy_version: String,
    started: Instant,
}

impl EventFacts {
    /// Record how the called tool differs from its pin.
    pub(super) fn with_tool_change(mut self, change: Option<serde_json::Value>) -> Self {
        self.mcp.tool_change = change;
        self
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        host: &str,
        process: ProcessInfo,
        call: &CallFacts,
        agent: &AgentInfo,
        decision: &Decision,
        decision_id: &str,
        started: Instant,
        args: &super::ArgsRecord,
    ) -> Self {
        let mut mcp = McpInfo {
            session_id: call.session.clone(),
            method: call.method.clone(),
            tool: call.tool.clone(),
            jsonrpc_id: call.jsonrpc_id.clone(),
            ..McpInfo::default()
        };
        mcp.set_args(&call.args, args.include, &args.redact);
        Self {
            decision_id: decision_id.to_string(),
            host: host.to_string(),
            process,
            agent: EventAgent {
                name: agent.name.clone(),
                owner: agent.owner.clone(),
            },
            destination: destination(&call.conn, &call.server),
            mcp,
            rule: decision.rule.clone(),
            reason: decision.reason.clone(),
            policy_version: decision.policy_version.clone(),
            started,
        }
    }

    /// A protocol-level refusal (no policy decision behind it).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn refused(
        host: &str,
        process: ProcessInfo,
        conn: &ConnFacts,
        agent: &AgentInfo,
        reason: &str,
        decision_id: &str,
        policy_version: &str,
        started: Instant,
    ) -> Self {
        let server = conn
            .sni
            .clone()
            .unwrap_or_else(|| conn.dst.ip().to_string());
        Self {
            decision_id: decision_id.to_string(),
            host: host.to_string(),
            process,
            agent: EventAgent {
                name: agent.name.clone(),
                owner: agent.owner.clone(),
            },
            destination: destination(conn, &server),
            mcp: McpInfo {
                method: "kya/refused".into(),
                ..McpInfo::default()
            },
            rule: Some("kya:protocol".into()),
            reason: reason.to_string(),
            policy_version: policy_version.to_string(),
            started,
        }
    }

    /// Replace the rule and reason the records of this decision give (kya
    /// ended it another way than the policy said).
    pub(super) fn set_outcome(&mut self, rule: Option<String>, reason: String) {
        self.rule = rule;
        self.reason = reason;
    }

    pub(super) fn rule(&self) -> Option<String> {
        self.rule.clone()
    }

    pub(super) fn reason(&self) -> &str {
        &self.reason
    }

    pub(super) fn event(
        &self,
        kind: EventKind,
        verdict: Verdict,
        approval: Option<ApprovalInfo>,
        credential_id: Option<String>,
    ) -> DecisionEvent {
        let hold_id = approval.as_ref().map(|a| a.id.clone());
        DecisionEvent {
            decision_id: self.decision_id.clone(),
            kind,
            time: OffsetDateTime::now_utc(),
            host: self.host.clone(),
            process: self.process.clone(),
            agent: self.agent.clone(),
            destination: self.destination.clone(),
            mcp: self.mcp.clone(),
            verdict,
            rule: self.rule.clone(),
            reason: self.reason.clone(),
            policy_version: self.policy_version.clone(),
            approval,
            credential_id,
            hold_id,
            latency_us: u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX),
        }
    }
}

/// Command line and parent of a connection's process, read from `/proc` once
/// per connection (its process does not change) instead of per decision.
/// These are the only process facts taken from `/proc`: the kernel does not
/// record them at connect. Everything else (pid, uid, gid, comm, cgroup,
/// executable) is the kernel's record of the connect, and a later exec does
/// not change it; the command line is context for a human reading the
/// record, never an identity policy relies on.
/// Keyed by connection number *and* pid; bounded (cleared when full).
const MAX_CACHED_CONNS: usize = 4096;

type ProcCache = std::collections::HashMap<(u64, u32), (Vec<String>, Option<u32>)>;

fn proc_cache() -> &'static std::sync::Mutex<ProcCache> {
    static CACHE: std::sync::OnceLock<std::sync::Mutex<ProcCache>> = std::sync::OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// The process facts of `conn` when `/proc` was already read for it (no I/O:
/// safe on an async worker).
pub(super) fn cached_process_info(conn: &ConnFacts) -> Option<ProcessInfo> {
    let key = (conn.conn_id, conn.process.pid);
    let (cmdline, ppid) = proc_cache()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
        .cloned()?;
    let mut p = ProcessInfo::from(&conn.process);
    p.cmdline = cmdline;
    p.ppid = ppid;
    Some(p)
}

/// The process facts of `conn`, reading `/proc` on the first decision of the
/// connection (unless [`prewarm`] already did): blocking, so the decision path
/// runs it off the async workers.
pub(super) fn process_info(conn: &ConnFacts) -> ProcessInfo {
    let (cmdline, ppid) = proc_facts(conn.conn_id, conn.process.pid);
    let mut p = ProcessInfo::from(&conn.process);
    p.cmdline = cmdline;
    p.ppid = ppid;
    p
}

/// Read what a new connection's first decision needs from the filesystem, on
/// one blocking thread as the connection arrives (its handshake and first
/// request take longer): the process facts, cached for this connection, the
/// executable's digest ([`crate::exe_digest`], cached per file) and the
/// container's image ([`crate::container_image`], cached per container). The first
/// decision then neither reads `/proc` nor hops to the blocking pool. The
/// facts are those of the connection's start, as a first decision would have
/// read them a moment later.
pub(crate) fn prewarm(conn_id: u64, process: &kya_common::ProcessIdentity) {
    crate::container_image::prewarm(process);
    if process.pid == 0 && process.exe.is_empty() {
        return;
    }
    let p = process.clone();
    tokio::task::spawn_blocking(move || {
        let _ = crate::exe_digest::digest(&p);
        if p.pid != 0 {
            proc_facts(conn_id, p.pid);
        }
    });
}

/// The command line and parent of `pid` for connection `conn_id`, from the
/// cache or `/proc` (blocking).
fn proc_facts(conn_id: u64, pid: u32) -> (Vec<String>, Option<u32>) {
    let cache = proc_cache();
    let key = (conn_id, pid);
    let cached = cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
        .cloned();
    if let Some(found) = cached {
        return found;
    }
    let facts = crate::procinfo::read(pid);
    let found = (facts.cmdline, facts.ppid);
    let mut map = cache.lock().unwrap_or_else(|e| e.into_inner());
    if map.len() >= MAX_CACHED_CONNS {
        map.clear();
    }
    map.insert(key, found.clone());
    found
}

fn destination(conn: &ConnFacts, server: &str) -> Destination {
    Destination {
        host: server.to_string(),
        ip: Some(conn.dst.ip()),
        port: conn.dst.port(),
        sni: conn.sni.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(conn_id: u64, pid: u32) -> ConnFacts {
        ConnFacts {
            process: kya_common::ProcessIdentity {
                pid,
                ..Default::default()
            },
            dst: "127.0.0.1:80".parse().unwrap(),
            sni: None,
            tls: false,
            conn_id,
            tunnel: None,
        }
    }

    #[test]
    fn process_facts_come_from_proc_once_per_connection() {
        let me = std::process::id();
        let first = process_info(&conn(u64::MAX - 7, me));
        assert!(!first.cmdline.is_empty(), "our own command line");
        assert_eq!(first.ppid, Some(nix::unistd::getppid().as_raw() as u32));
        assert_eq!(process_info(&conn(u64::MAX - 7, me)).cmdline, first.cmdline);
        // Same connection number, another process: not confused with it.
        let gone = process_info(&conn(u64::MAX - 7, u32::MAX - 1));
        assert!(gone.cmdline.is_empty() && gone.ppid.is_none());
        assert_eq!(
            cached_process_info(&conn(u64::MAX - 7, me)).map(|p| p.cmdline),
            Some(first.cmdline)
        );
        assert!(cached_process_info(&conn(u64::MAX - 8, me)).is_none());
    }

    /// A connection's process facts read as it arrives are what its first
    /// decision finds, without reading `/proc` itself.
    #[tokio::test]
    async fn prewarmed_facts_are_found_without_a_read() {
        let me = std::process::id();
        let c = conn(u64::MAX - 9, me);
        assert!(cached_process_info(&c).is_none());
        prewarm(c.conn_id, &c.process);
        let mut found = None;
        for _ in 0..500 {
            found = cached_process_info(&c);
            if found.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let found = found.expect("the prewarmed facts are cached");
        assert_eq!(found.cmdline, process_info(&c).cmdline);
        assert_eq!(found.ppid, Some(nix::unistd::getppid().as_raw() as u32));
    }
}
