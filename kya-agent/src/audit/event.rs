//! The decision event: what kya records about every decision it makes, filled
//! by the interceptor and written as the `event` of an audit record.
//!
//! It is kya's own shape (stable, flat enough to grep); `ocsf.rs` renders
//! it as OCSF for SIEMs. Fields may be added; none may be renamed (the audit
//! log is forever, and old records must keep parsing).

use kya_common::{ProcessIdentity, Verdict};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::net::IpAddr;
use time::OffsetDateTime;

/// What happened: the first decision on a call, or a later step of a hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// Policy decided allow or deny (possibly allow because a credential covered a hold).
    Decision,
    /// Policy decided hold: the call waits for its owner.
    Hold,
    /// The owner approved a held call; it is forwarded.
    Approved,
    /// The owner refused a held call; it is denied.
    Rejected,
    /// Nobody answered a held call in time; it is denied.
    Expired,
    /// The agent gave up on the call before kya ended it (disconnected, sent
    /// `notifications/cancelled`, or its stream went away); nothing was
    /// forwarded.
    Cancelled,
    /// kya stopped (SIGTERM/SIGINT, or a restart found the call in the
    /// approvals journal) before the call was ended; it was denied.
    Interrupted,
    /// A state-changing control command (answering an approval, issuing or
    /// revoking a credential, suspending or resuming an agent) came from a
    /// selected process or a descendant of one, or from a process kya could
    /// not check, and was refused. `mcp.method` names the command, `process`
    /// the caller, `destination.host` the control socket.
    ControlRefused,
}

impl EventKind {
    /// Every kind, for exhaustive tests and documentation.
    pub const ALL: [EventKind; 8] = [
        EventKind::Decision,
        EventKind::Hold,
        EventKind::Approved,
        EventKind::Rejected,
        EventKind::Expired,
        EventKind::ControlRefused,
        EventKind::Cancelled,
        EventKind::Interrupted,
    ];

    /// The snake_case name used in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Decision => "decision",
            EventKind::Hold => "hold",
            EventKind::Approved => "approved",
            EventKind::Rejected => "rejected",
            EventKind::Expired => "expired",
            EventKind::ControlRefused => "control_refused",
            EventKind::Cancelled => "cancelled",
            EventKind::Interrupted => "interrupted",
        }
    }

    /// Whether a record of this kind ends its decision: every decision id
    /// has exactly one such record (a `hold` is the only kind that does not).
    pub fn is_final(self) -> bool {
        !matches!(self, EventKind::Hold)
    }
}

/// The process behind the call (kernel record completed from `/proc`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// The thread that made the connection.
    pub pid: u32,
    /// The thread group (what users call the pid).
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    /// The executable at connect time (the kernel's record), empty when
    /// unknown.
    pub exe: String,
    /// Hex SHA-256 of the executable, when it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe_sha256: Option<String>,
    pub comm: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cmdline: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ppid: Option<u32>,
    /// cgroup v2 path relative to the cgroup2 mount.
    pub cgroup: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub systemd_unit: Option<String>,
    /// The container the cgroup path names (`kya_common::container`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// Its engine: `docker`, `podman`, `containerd`, `cri-o`, `kubernetes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_runtime: Option<String>,
    /// The Kubernetes pod uid, when the container runs in a pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// The pod's namespace and name, when kya watches pods through the API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// The container's image as its engine names it (or, on Kubernetes,
    /// as its pod's status reports it), and the image's id, when known by
    /// the decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_image_id: Option<String>,
    /// The network namespace (inode) the connection came from, when not the
    /// host's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<u64>,
}

impl From<&ProcessIdentity> for ProcessInfo {
    fn from(p: &ProcessIdentity) -> Self {
        ProcessInfo {
            pid: p.pid,
            tgid: p.pid,
            uid: p.uid,
            gid: p.gid,
            exe: p.exe.clone(),
            comm: p.comm.clone(),
            cgroup: p.cgroup.clone(),
            container_id: p.container.as_ref().map(|c| c.id.clone()),
            container_runtime: p.container.as_ref().map(|c| c.runtime.clone()),
            pod_uid: p.container.as_ref().and_then(|c| c.pod_uid.clone()),
            pod_namespace: p.container.as_ref().and_then(|c| c.pod_namespace.clone()),
            pod_name: p.container.as_ref().and_then(|c| c.pod_name.clone()),
            container_image: p.container.as_ref().and_then(|c| c.image.clone()),
            container_image_id: p.container.as_ref().and_then(|c| c.image_id.clone()),
            netns: (p.netns != 0).then_some(p.netns),
            ..Default::default()
        }
    }
}

/// The registered agent (or `unregistered`) and the human who owns it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// Where the call was going (the original destination the redirect hid).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Destination {
    /// Host name (SNI or `Host`), or the IP as text when neither was present.
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
}

/// The MCP request that was decided.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct McpInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    pub method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// The JSON-RPC id exactly as sent (string or number).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jsonrpc_id: Option<Value>,
    /// Hex SHA-256 of the canonical JSON of the *unredacted* arguments: lets an
    /// auditor confirm "these were the arguments" without the log holding them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args_sha256: Option<String>,
    /// The arguments, only when policy asks for them, after redaction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
    /// What was redacted from `args` (the redaction list entries that matched).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redacted: Vec<String>,
    /// How the called tool's definition differs from the one kya pinned for
    /// the server, when it does: `{server, tool, state, pinned_sha256,
    /// current_sha256, fields: [{field, old, new}]}` (each side cut short).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_change: Option<Value>,
}

/// The placeholder that replaces a redacted value.
pub const REDACTED: &str = "[redacted]";

impl McpInfo {
    /// Record `args`: always their digest; the arguments themselves only when
    /// `include`, with every `redact` entry replaced by [`REDACTED`]. An entry
    /// starting with `/` is a JSON Pointer (RFC 6901); any other entry is an
    /// object key redacted at every depth (`password` hides every `password`).
    pub fn set_args(&mut self, args: &Value, include: bool, redact: &[String]) {
        self.args_sha256 = Some(hex::encode(Sha256::digest(canonical_json(args))));
        self.args = None;
        self.redacted.clear();
        if !include {
            return;
        }
        let mut copy = args.clone();
        for entry in redact {
            let hit = if entry.starts_with('/') {
                match copy.pointer_mut(entry) {
                    Some(v) => {
                        *v = Value::String(REDACTED.into());
                        true
                    }
                    None => false,
                }
            } else {
                redact_key(&mut copy, entry, 0)
            };
            if hit {
                self.redacted.push(entry.clone());
            }
        }
        self.args = Some(copy);
    }
}

/// Depth beyond which redaction stops descending (the interceptor bounds JSON
/// depth already; this keeps the recursion bounded on its own).
const MAX_REDACT_DEPTH: usize = 128;

fn redact_key(v: &mut Value, key: &str, depth: usize) -> bool {
    if depth > MAX_REDACT_DEPTH {
        return false;
    }
    let mut hit = false;
    match v {
        Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                if k == key {
                    *child = Value::String(REDACTED.into());
                    hit = true;
                } else {
                    hit |= redact_key(child, key, depth + 1);
                }
            }
        }
        Value::Array(items) => {
            for child in items {
                hit |= redact_key(child, key, depth + 1);
            }
        }
        _ => {}
    }
    hit
}

/// Canonical JSON bytes: object keys sorted, no whitespace, serde_json's number
/// and string forms. Stable whatever map order a dependency enables.
pub fn canonical_json(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(Value::String((*k).clone()).to_string().as_bytes());
                out.push(b':');
                if let Some(child) = map.get(*k) {
                    write_canonical(child, out);
                }
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, child) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(child, out);
            }
            out.push(b']');
        }
        scalar => out.extend_from_slice(scalar.to_string().as_bytes()),
    }
}

/// The human approval behind an `approved`/`rejected` event (or the allow that follows it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalInfo {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approver: Option<String>,
    /// `ciba`, `cli`, `webhook`...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// SHA-256 (hex) of the verified OpenID ID token that proved a CIBA
    /// approval: ties the logged release to the provider's signed statement
    /// (the minted credential, which carries the same digest, is not kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_token_sha256: Option<String>,
}

/// One decision, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionEvent {
    /// Unique per decision; a hold and its approval share the call but not the id.
    pub decision_id: String,
    pub kind: EventKind,
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// The host kya runs on.
    pub host: String,
    pub process: ProcessInfo,
    pub agent: AgentInfo,
    pub destination: Destination,
    pub mcp: McpInfo,
    pub verdict: Verdict,
    /// The deciding rule; `None` when the defaults decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    pub reason: String,
    pub policy_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalInfo>,
    /// The credential that released a hold or that kya minted after an approval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_id: Option<String>,
    /// The decision id of the hold this event resolves, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_id: Option<String>,
    /// Time from the request's last byte to the verdict, in microseconds.
    pub latency_us: u64,
}

/// An event whose fields contradict each other.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("inconsistent decision event {decision_id}: {what}")]
pub struct InvalidEvent {
    pub decision_id: String,
    pub what: String,
}

impl DecisionEvent {
    /// Check the kind/verdict/approval combination, so the log never records a
    /// story that cannot have happened (e.g. an `approved` event that denies).
    pub fn validate(&self) -> Result<(), InvalidEvent> {
        let fail = |what: &str| {
            Err(InvalidEvent {
                decision_id: self.decision_id.clone(),
                what: what.to_string(),
            })
        };
        if self.decision_id.is_empty() {
            return fail("empty decision_id");
        }
        if self.mcp.method.is_empty() {
            return fail("empty MCP method");
        }
        match (self.kind, self.verdict) {
            (EventKind::Decision, Verdict::Hold) => fail("a hold must have kind hold"),
            (EventKind::Hold, v) if v != Verdict::Hold => fail("kind hold needs verdict hold"),
            (EventKind::Approved, v) if v != Verdict::Allow => {
                fail("kind approved needs verdict allow")
            }
            (EventKind::Approved, _) if self.approval.is_none() => {
                fail("kind approved needs an approval")
            }
            (
                EventKind::Rejected
                | EventKind::Expired
                | EventKind::ControlRefused
                | EventKind::Cancelled
                | EventKind::Interrupted,
                v,
            ) if v != Verdict::Deny => fail(
                "kinds rejected, expired, control_refused, cancelled and interrupted need verdict deny",
            ),
            _ => Ok(()),
        }
    }

    /// How durable the record must be before the call may proceed: holds,
    /// approvals and an allow that follows an approval must be on disk first
    /// (an auditor must be able to link that action to a human); plain allows
    /// and denies are group-committed.
    pub fn required_durability(&self) -> super::Durability {
        let consequential = matches!(
            self.kind,
            EventKind::Hold
                | EventKind::Approved
                | EventKind::Rejected
                | EventKind::ControlRefused
                | EventKind::Interrupted
        ) || (self.verdict == Verdict::Allow
            && (self.approval.is_some() || self.credential_id.is_some()));
        if consequential {
            super::Durability::Sync
        } else {
            super::Durability::Group
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// A complete event of the given kind (used by other modules' tests too).
    pub(crate) fn sample(kind: EventKind, n: u64) -> DecisionEvent {
        let verdict = match kind {
            EventKind::Decision => {
                if n % 2 == 0 {
                    Verdict::Allow
                } else {
                    Verdict::Deny
                }
            }
            EventKind::Hold => Verdict::Hold,
            EventKind::Approved => Verdict::Allow,
            EventKind::Rejected
            | EventKind::Expired
            | EventKind::ControlRefused
            | EventKind::Cancelled
            | EventKind::Interrupted => Verdict::Deny,
        };
        let mut mcp = McpInfo {
            session_id: Some("sess-1".into()),
            method: "tools/call".into(),
            tool: Some("transfer".into()),
            jsonrpc_id: Some(json!(n)),
            ..Default::default()
        };
        mcp.set_args(&json!({"amount": n, "to": "bob"}), false, &[]);
        DecisionEvent {
            decision_id: format!("d-{n}"),
            kind,
            time: OffsetDateTime::from_unix_timestamp(1_795_000_000 + n as i64).unwrap(),
            host: "host-a".into(),
            process: ProcessInfo {
                pid: 4242,
                tgid: 4242,
                uid: 1001,
                gid: 1001,
                exe: "/usr/bin/python3".into(),
                exe_sha256: Some("ab".repeat(32)),
                comm: "python3".into(),
                cmdline: vec!["python3".into(), "agent.py".into()],
                ppid: Some(1),
                cgroup: "/agents/billing".into(),
                systemd_unit: Some("agent.service".into()),
                container_id: None,
                ..Default::default()
            },
            agent: AgentInfo {
                name: "billing-bot".into(),
                owner: Some("alice".into()),
            },
            destination: Destination {
                host: "mcp.example.com".into(),
                ip: Some("127.0.0.1".parse().unwrap()),
                port: 443,
                sni: Some("mcp.example.com".into()),
            },
            mcp,
            verdict,
            rule: Some("large-transfer".into()),
            reason: "amount above 1000".into(),
            policy_version: "sha256:abcd".into(),
            approval: matches!(kind, EventKind::Approved | EventKind::Rejected).then(|| {
                ApprovalInfo {
                    id: format!("a-{n}"),
                    approver: Some("alice".into()),
                    channel: Some("ciba".into()),
                    id_token_sha256: None,
                }
            }),
            credential_id: (kind == EventKind::Approved).then(|| "cred-1".into()),
            hold_id: None,
            latency_us: 120 + n,
        }
    }

    #[test]
    fn every_kind_validates_and_round_trips() {
        for kind in EventKind::ALL {
            let e = sample(kind, 3);
            e.validate().unwrap();
            let text = serde_json::to_string(&e).unwrap();
            let back: DecisionEvent = serde_json::from_str(&text).unwrap();
            assert_eq!(back, e);
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["kind"], kind.as_str());
        }
    }

    #[test]
    fn contradictory_events_are_refused() {
        let mut e = sample(EventKind::Hold, 1);
        e.verdict = Verdict::Allow;
        assert!(e.validate().is_err());
        let mut e = sample(EventKind::Decision, 1);
        e.verdict = Verdict::Hold;
        assert!(e.validate().is_err());
        let mut e = sample(EventKind::Approved, 1);
        e.approval = None;
        assert!(e.validate().is_err());
        let mut e = sample(EventKind::Expired, 1);
        e.verdict = Verdict::Allow;
        assert!(e.validate().is_err());
        let mut e = sample(EventKind::Decision, 1);
        e.decision_id.clear();
        assert!(e.validate().is_err());
    }

    #[test]
    fn durability_follows_consequence() {
        use crate::audit::Durability;
        assert_eq!(
            sample(EventKind::Hold, 1).required_durability(),
            Durability::Sync
        );
        assert_eq!(
            sample(EventKind::Approved, 1).required_durability(),
            Durability::Sync
        );
        assert_eq!(
            sample(EventKind::Decision, 2).required_durability(),
            Durability::Group
        );
        assert_eq!(
            sample(EventKind::Decision, 1).required_durability(),
            Durability::Group
        );
        let mut released = sample(EventKind::Decision, 2);
        released.credential_id = Some("c".into());
        assert_eq!(released.required_durability(), Durability::Sync);
    }

    #[test]
    fn hostile_event_json_is_an_error_not_a_panic() {
        for text in [
            "",
            "null",
            "[]",
            "{\"kind\":\"decision\"}",
            "{\"decision_id\":1}",
            &format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)),
        ] {
            assert!(serde_json::from_str::<DecisionEvent>(text).is_err());
        }
        let mut good = serde_json::to_value(sample(EventKind::Decision, 1)).unwrap();
        good["verdict"] = json!("permit");
        assert!(serde_json::from_value::<DecisionEvent>(good.clone()).is_err());
        good["verdict"] = json!("deny");
        good["time"] = json!("yesterday");
        assert!(serde_json::from_value::<DecisionEvent>(good).is_err());
    }

    #[test]
    fn args_are_digested_always_and_recorded_only_redacted() {
        let args = json!({"b": 1, "a": {"password": "hunter2", "list": [{"password": "x"}]}, "token": "t"});
        let mut m = McpInfo::default();
        m.set_args(&args, false, &["password".into()]);
        assert!(m.args.is_none());
        let digest = m.args_sha256.clone().unwrap();
        assert_eq!(
            digest,
            hex::encode(Sha256::digest(
                br#"{"a":{"list":[{"password":"x"}],"password":"hunter2"},"b":1,"token":"t"}"#
            ))
        );
        m.set_args(
            &args,
            true,
            &["password".into(), "/token".into(), "/missing".into()],
        );
        assert_eq!(
            m.args_sha256.as_deref(),
            Some(digest.as_str()),
            "digest is of the unredacted args"
        );
        let recorded = m.args.clone().unwrap();
        assert_eq!(recorded["a"]["password"], REDACTED);
        assert_eq!(recorded["a"]["list"][0]["password"], REDACTED);
        assert_eq!(recorded["token"], REDACTED);
        assert_eq!(recorded["b"], 1);
        assert_eq!(
            m.redacted,
            vec!["password".to_string(), "/token".to_string()]
        );
        assert!(!serde_json::to_string(&m).unwrap().contains("hunter2"));
    }

    #[test]
    fn canonical_json_sorts_keys_and_escapes() {
        let v = json!({"z": [1, 2.5, null], "a": "q\"\n", "m": {"y": true, "b": false}});
        assert_eq!(
            String::from_utf8(canonical_json(&v)).unwrap(),
            r#"{"a":"q\"\n","m":{"b":false,"y":true},"z":[1,2.5,null]}"#
        );
    }
}
