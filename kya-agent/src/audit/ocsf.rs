//! Render a [`DecisionEvent`] as an OCSF event for SIEM ingestion.
//!
//! Class: **API Activity** (`class_uid` 6003, `category_uid` 6 Application
//! Activity), with the **security_control** profile, OCSF 1.3. Attribute names
//! below are those of the OCSF schema (schema.ocsf.io, classes/api_activity and
//! profiles/security_control):
//!
//! | kya field | OCSF attribute |
//! | --- | --- |
//! | `time` | `time` (epoch ms), `metadata.original_time` (RFC 3339) |
//! | `decision_id` | `metadata.uid`; `kind` → `metadata.event_code` |
//! | `mcp.method` | `api.operation`, `activity_name`; `activity_id` 99 Other (an MCP call is not CRUD) |
//! | `mcp.jsonrpc_id` | `api.request.uid`; `mcp.session_id` → `metadata.correlation_uid` |
//! | `mcp.tool` | `resources[0].name` (`type` "mcp_tool") |
//! | `destination` | `dst_endpoint.hostname`, `.ip`, `.port`, `api.service.name` |
//! | `host` | `src_endpoint.hostname` (the calling process runs here) |
//! | `process` | `actor.process.pid`, `.name`, `.cmd_line`, `.file.path`, `.file.hashes[]` (SHA-256, algorithm_id 3), `.parent_process.pid`, `.user.uid`, `.container.uid`, `.container.runtime`, `.container.pod_uuid`, `.container.orchestrator` |
//! | `agent` | `actor.app_name` (name); owner in `unmapped` |
//! | `verdict`, `kind` | `action_id` (1 Allowed, 2 Denied, 99 Other for a hold), `disposition_id` (1 Allowed, 2 Blocked, 6 Dropped for a call the agent cancelled, 8 Approved, 14 Delayed); `interrupted` (kya stopped) is 2 Denied, 2 Blocked |
//! | `rule`, `policy_version`, `reason` | `policy.uid`, `policy.name`, `policy.version`, `policy.desc`; `reason` also `status_detail` |
//! | `approval`, `credential_id` | `authorizations[]` (`decision`, `policy.uid`) |
//! | `latency_us` | `duration` (ms) and `unmapped.latency_us` |
//! | everything else (tgid, gid, cgroup, netns, systemd unit, SNI, args digest, args, redactions, hold id, a CIBA approval's ID token digest, how the tool differs from its pin) | `unmapped` |
//!
//! `severity_id`: 1 Informational for allows, 2 Low for holds, approvals and
//! calls the agent cancelled,
//! 3 Medium for denies (a denied agent call is something a SOC may want to see),
//! 4 High for `control_refused` (a selected process tried to answer an
//! approval or change kya's state: an agent acting for its human).
//! `cloud` is not set: kya guards a host, not a cloud provider's API.

use super::event::{DecisionEvent, EventKind};
use kya_common::Verdict;
use serde_json::{json, Map, Value};

/// OCSF class: API Activity.
pub(crate) const CLASS_UID: u64 = 6003;
/// OCSF category: Application Activity.
pub(crate) const CATEGORY_UID: u64 = 6;
/// API Activity `activity_id` 99: Other (see `activity_name`).
pub(crate) const ACTIVITY_OTHER: u64 = 99;
/// The OCSF schema version the mapping follows.
pub(crate) const OCSF_VERSION: &str = "1.3.0";

/// The attributes OCSF 1.3 requires of every API Activity event (plus the
/// security_control profile's recommended outcome fields, which kya always sets).
#[cfg(test)]
const REQUIRED: [&str; 14] = [
    "activity_id",
    "category_uid",
    "class_uid",
    "severity_id",
    "time",
    "type_uid",
    "metadata",
    "actor",
    "api",
    "src_endpoint",
    "action_id",
    "disposition_id",
    "policy",
    "dst_endpoint",
];

/// `(action_id, action, disposition_id, disposition)` for an event.
pub(crate) fn outcome(e: &DecisionEvent) -> (u64, &'static str, u64, &'static str) {
    match (e.kind, e.verdict) {
        (EventKind::Hold, _) | (_, Verdict::Hold) => (99, "Other", 14, "Delayed"),
        (EventKind::Approved, _) => (1, "Allowed", 8, "Approved"),
        // The agent withdrew the call: nothing was forwarded.
        (EventKind::Cancelled, _) => (2, "Denied", 6, "Dropped"),
        (_, Verdict::Allow) => (1, "Allowed", 1, "Allowed"),
        (_, Verdict::Deny) => (2, "Denied", 2, "Blocked"),
    }
}

fn severity(e: &DecisionEvent) -> (u64, &'static str) {
    match (e.kind, e.verdict) {
        // Something inside the selection tried to act for its human.
        (EventKind::ControlRefused, _) => (4, "High"),
        // The agent gave up on its own call: routine, not a policy denial.
        (EventKind::Cancelled, _) => (2, "Low"),
        (_, Verdict::Deny) => (3, "Medium"),
        (EventKind::Hold | EventKind::Approved, _) | (_, Verdict::Hold) => (2, "Low"),
        _ => (1, "Informational"),
    }
}

fn put(map: &mut Map<String, Value>, key: &str, value: Option<Value>) {
    if let Some(v) = value {
        map.insert(key.to_string(), v);
    }
}

/// The OCSF rendering of `e`.
pub(crate) fn to_ocsf(e: &DecisionEvent) -> Value {
    let (action_id, action, disposition_id, disposition) = outcome(e);
    let (severity_id, severity_name) = severity(e);
    let time_ms = (e.time.unix_timestamp_nanos() / 1_000_000) as i64;
    let original_time = e
        .time
        .format(&time::format_description::well_known::Rfc3339)
        .ok();

    let p = &e.process;
    let mut process = Map::new();
    process.insert("pid".into(), json!(p.tgid));
    process.insert("tid".into(), json!(p.pid));
    process.insert("name".into(), json!(p.comm));
    process.insert("user".into(), json!({"uid": p.uid.to_string()}));
    if !p.cmdline.is_empty() {
        process.insert("cmd_line".into(), json!(p.cmdline.join(" ")));
    }
    if !p.exe.is_empty() || p.exe_sha256.is_some() {
        let mut file = Map::new();
        file.insert("path".into(), json!(p.exe));
        if let Some(name) = p.exe.rsplit('/').next() {
            file.insert("name".into(), json!(name));
        }
        file.insert("type_id".into(), json!(1));
        if let Some(h) = &p.exe_sha256 {
            file.insert(
                "hashes".into(),
                json!([{"algorithm_id": 3, "algorithm": "SHA-256", "value": h}]),
            );
        }
        process.insert("file".into(), Value::Object(file));
    }
    put(
        &mut process,
        "parent_process",
        p.ppid.map(|pp| json!({"pid": pp})),
    );
    put(
        &mut process,
        "container",
        p.container_id.as_ref().map(|c| {
            let mut container = Map::new();
            container.insert("uid".into(), json!(c));
            put(
                &mut container,
                "runtime",
                p.container_runtime.as_ref().map(|r| json!(r)),
            );
            put(
                &mut container,
                "pod_uuid",
                p.pod_uid.as_ref().map(|u| json!(u)),
            );
            if p.pod_uid.is_some() {
                container.insert("orchestrator".into(), json!("Kubernetes"));
            }
            if p.container_image.is_some() || p.container_image_id.is_some() {
                let mut image = Map::new();
                put(
                    &mut image,
                    "name",
                    p.container_image.as_ref().map(|n| json!(n)),
                );
                put(
                    &mut image,
                    "uid",
                    p.container_image_id.as_ref().map(|i| json!(i)),
                );
                container.insert("image".into(), Value::Object(image));
            }
            Value::Object(container)
        }),
    );

    let mut dst = Map::new();
    dst.insert("hostname".into(), json!(e.destination.host));
    dst.insert("port".into(), json!(e.destination.port));
    put(
        &mut dst,
        "ip",
        e.destination.ip.map(|ip| json!(ip.to_string())),
    );

    let mut api = Map::new();
    api.insert("operation".into(), json!(e.mcp.method));
    api.insert("service".into(), json!({"name": e.destination.host}));
    put(
        &mut api,
        "request",
        e.mcp.jsonrpc_id.as_ref().map(|id| {
            let uid = match id {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            json!({ "uid": uid })
        }),
    );

    let mut policy = Map::new();
    policy.insert(
        "name".into(),
        json!(e.rule.as_deref().unwrap_or("defaults")),
    );
    policy.insert("version".into(), json!(e.policy_version));
    policy.insert("desc".into(), json!(e.reason));
    policy.insert("is_applied".into(), json!(true));
    put(&mut policy, "uid", e.rule.as_ref().map(|r| json!(r)));

    let mut authorizations = Vec::new();
    if let Some(a) = &e.approval {
        let verb = match e.kind {
            EventKind::Rejected => "Rejected",
            EventKind::ControlRefused => "Refused an attempt to answer",
            _ => "Approved",
        };
        let mut decision = format!(
            "{verb} by {}",
            a.approver.as_deref().unwrap_or("unknown approver")
        );
        if let Some(ch) = &a.channel {
            decision.push_str(&format!(" via {ch}"));
        }
        authorizations
            .push(json!({"decision": decision, "policy": {"uid": a.id, "name": "human approval"}}));
    }
    if let Some(c) = &e.credential_id {
        authorizations.push(json!({"decision": "Covered by credential", "policy": {"uid": c, "name": "action-scoped credential"}}));
    }

    let mut unmapped = Map::new();
    unmapped.insert("tgid".into(), json!(p.tgid));
    unmapped.insert("gid".into(), json!(p.gid));
    unmapped.insert("cgroup".into(), json!(p.cgroup));
    put(&mut unmapped, "netns", p.netns.map(|n| json!(n)));
    put(
        &mut unmapped,
        "systemd_unit",
        p.systemd_unit.as_ref().map(|u| json!(u)),
    );
    unmapped.insert(
        "agent".into(),
        json!({"name": e.agent.name, "owner": e.agent.owner}),
    );
    put(
        &mut unmapped,
        "sni",
        e.destination.sni.as_ref().map(|s| json!(s)),
    );
    put(
        &mut unmapped,
        "mcp_tool",
        e.mcp.tool.as_ref().map(|t| json!(t)),
    );
    put(
        &mut unmapped,
        "args_sha256",
        e.mcp.args_sha256.as_ref().map(|d| json!(d)),
    );
    put(&mut unmapped, "args", e.mcp.args.clone());
    put(&mut unmapped, "tool_change", e.mcp.tool_change.clone());
    if !e.mcp.redacted.is_empty() {
        unmapped.insert("redacted".into(), json!(e.mcp.redacted));
    }
    put(
        &mut unmapped,
        "hold_id",
        e.hold_id.as_ref().map(|h| json!(h)),
    );
    put(
        &mut unmapped,
        "id_token_sha256",
        e.approval
            .as_ref()
            .and_then(|a| a.id_token_sha256.as_ref())
            .map(|d| json!(d)),
    );
    unmapped.insert("verdict".into(), json!(e.verdict));
    unmapped.insert("latency_us".into(), json!(e.latency_us));

    let mut metadata = Map::new();
    metadata.insert("version".into(), json!(OCSF_VERSION));
    metadata.insert(
        "product".into(),
        json!({"name": "kya", "vendor_name": "kya", "version": env!("CARGO_PKG_VERSION")}),
    );
    metadata.insert("profiles".into(), json!(["security_control", "host"]));
    metadata.insert("uid".into(), json!(e.decision_id));
    metadata.insert("event_code".into(), json!(e.kind.as_str()));
    put(
        &mut metadata,
        "original_time",
        original_time.map(Value::String),
    );
    put(
        &mut metadata,
        "correlation_uid",
        e.mcp.session_id.as_ref().map(|s| json!(s)),
    );

    let mut out = Map::new();
    out.insert("class_uid".into(), json!(CLASS_UID));
    out.insert("class_name".into(), json!("API Activity"));
    out.insert("category_uid".into(), json!(CATEGORY_UID));
    out.insert("category_name".into(), json!("Application Activity"));
    out.insert("activity_id".into(), json!(ACTIVITY_OTHER));
    out.insert("activity_name".into(), json!(e.mcp.method));
    out.insert("type_uid".into(), json!(CLASS_UID * 100 + ACTIVITY_OTHER));
    out.insert("type_name".into(), json!("API Activity: Other"));
    out.insert("time".into(), json!(time_ms));
    out.insert("severity_id".into(), json!(severity_id));
    out.insert("severity".into(), json!(severity_name));
    out.insert("action_id".into(), json!(action_id));
    out.insert("action".into(), json!(action));
    out.insert("disposition_id".into(), json!(disposition_id));
    out.insert("disposition".into(), json!(disposition));
    if e.verdict == Verdict::Deny {
        out.insert("status_id".into(), json!(2));
        out.insert("status".into(), json!("Failure"));
        out.insert("status_detail".into(), json!(e.reason));
    }
    out.insert("duration".into(), json!(e.latency_us / 1000));
    out.insert("metadata".into(), Value::Object(metadata));
    out.insert(
        "actor".into(),
        json!({"process": Value::Object(process), "app_name": e.agent.name}),
    );
    out.insert("api".into(), Value::Object(api));
    if let Some(tool) = &e.mcp.tool {
        out.insert(
            "resources".into(),
            json!([{"name": tool, "type": "mcp_tool"}]),
        );
    }
    out.insert("src_endpoint".into(), json!({"hostname": e.host}));
    out.insert("dst_endpoint".into(), Value::Object(dst));
    out.insert("policy".into(), Value::Object(policy));
    if !authorizations.is_empty() {
        out.insert("authorizations".into(), Value::Array(authorizations));
    }
    out.insert("unmapped".into(), Value::Object(unmapped));
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::event::tests::sample;

    #[test]
    fn a_containers_identity_is_in_actor_process_container() {
        let mut e = sample(EventKind::Decision, 1);
        let o = to_ocsf(&e);
        assert!(o["actor"]["process"].get("container").is_none(), "{o}");
        assert!(o["unmapped"].get("netns").is_none(), "{o}");
        let id = "3f4e8a1b2c3d4e5f60718293a4b5c6d7e8f90123456789abcdef0123456789ab";
        let pod = "1b2c3d4e-5f60-4718-9293-a4b5c6d7e8f9";
        let identity = kya_common::ProcessIdentity {
            cgroup: format!(
                "/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{id}.scope",
                pod.replace('-', "_")
            ),
            container: kya_common::container_of_cgroup(&format!(
                "/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{id}.scope",
                pod.replace('-', "_")
            )),
            netns: 4026532305,
            ..Default::default()
        };
        e.process = crate::audit::event::ProcessInfo::from(&identity);
        let o = to_ocsf(&e);
        let c = &o["actor"]["process"]["container"];
        assert_eq!(c["uid"], id, "{o}");
        assert_eq!(c["runtime"], "containerd");
        assert_eq!(c["pod_uuid"], pod);
        assert_eq!(c["orchestrator"], "Kubernetes");
        assert_eq!(o["unmapped"]["netns"], 4026532305u64);
        assert!(c.get("image").is_none(), "unknown image: no object");
        e.process.container_image = Some("localhost/agent:1.2".into());
        e.process.container_image_id = Some("d".repeat(64));
        let o = to_ocsf(&e);
        let image = &o["actor"]["process"]["container"]["image"];
        assert_eq!(image["name"], "localhost/agent:1.2", "{o}");
        assert_eq!(image["uid"], "d".repeat(64), "{o}");
    }

    /// The schema test: every event kind (and every verdict a kind allows) maps
    /// to an event with every required attribute, of the right type, with
    /// values from the OCSF enumerations.
    #[test]
    fn every_event_kind_has_the_required_fields() {
        for kind in EventKind::ALL {
            for n in [1u64, 2] {
                let e = sample(kind, n);
                let o = to_ocsf(&e);
                for field in REQUIRED {
                    assert!(
                        o.get(field).is_some_and(|v| !v.is_null()),
                        "{kind:?}: missing {field}"
                    );
                }
                assert_eq!(o["class_uid"], 6003);
                assert_eq!(o["category_uid"], 6);
                assert_eq!(o["type_uid"], 600399);
                assert_eq!(o["activity_id"], 99);
                assert_eq!(o["time"], json!(e.time.unix_timestamp() * 1000));
                assert!([1, 2, 3, 4].contains(&o["severity_id"].as_u64().unwrap()));
                assert!([1, 2, 99].contains(&o["action_id"].as_u64().unwrap()));
                assert!([1, 2, 6, 8, 14].contains(&o["disposition_id"].as_u64().unwrap()));
                assert_eq!(o["metadata"]["product"]["name"], "kya");
                assert_eq!(o["metadata"]["uid"], json!(e.decision_id));
                assert_eq!(o["metadata"]["event_code"], kind.as_str());
                assert_eq!(o["actor"]["process"]["pid"], 4242);
                assert_eq!(o["actor"]["process"]["user"]["uid"], "1001");
                assert_eq!(
                    o["actor"]["process"]["file"]["hashes"][0]["algorithm_id"],
                    3
                );
                assert_eq!(o["actor"]["app_name"], "billing-bot");
                assert_eq!(o["api"]["operation"], "tools/call");
                assert_eq!(o["dst_endpoint"]["port"], 443);
                assert_eq!(o["dst_endpoint"]["ip"], "127.0.0.1");
                assert_eq!(o["policy"]["uid"], "large-transfer");
                assert_eq!(o["policy"]["version"], "sha256:abcd");
                assert_eq!(o["unmapped"]["cgroup"], "/agents/billing");
                assert_eq!(o["unmapped"]["agent"]["owner"], "alice");
                assert_eq!(o["unmapped"]["sni"], "mcp.example.com");
            }
        }
    }

    #[test]
    fn outcomes_map_to_the_security_control_enumerations() {
        let o = |kind, n| {
            let v = to_ocsf(&sample(kind, n));
            (
                v["action_id"].as_u64().unwrap(),
                v["disposition_id"].as_u64().unwrap(),
            )
        };
        assert_eq!(o(EventKind::Decision, 2), (1, 1), "allow");
        assert_eq!(o(EventKind::Decision, 1), (2, 2), "deny");
        assert_eq!(o(EventKind::Hold, 1), (99, 14), "hold is delayed");
        assert_eq!(o(EventKind::Approved, 1), (1, 8), "approved");
        assert_eq!(o(EventKind::Rejected, 1), (2, 2));
        assert_eq!(o(EventKind::Expired, 1), (2, 2));
        assert_eq!(o(EventKind::ControlRefused, 1), (2, 2), "refused: blocked");
        assert_eq!(o(EventKind::Cancelled, 1), (2, 6), "cancelled: dropped");
        assert_eq!(o(EventKind::Interrupted, 1), (2, 2), "interrupted: blocked");
        let mut refused = sample(EventKind::ControlRefused, 1);
        refused.approval = Some(crate::audit::event::ApprovalInfo {
            id: "apr_1".into(),
            approver: Some("alice".into()),
            channel: Some("local".into()),
            id_token_sha256: None,
        });
        let v = to_ocsf(&refused);
        assert_eq!(v["severity_id"], 4);
        let decision = v["authorizations"][0]["decision"].as_str().unwrap();
        assert!(decision.starts_with("Refused"), "{decision}");
        let approved = to_ocsf(&sample(EventKind::Approved, 1));
        let auth = approved["authorizations"].as_array().unwrap();
        assert_eq!(auth.len(), 2);
        assert_eq!(auth[0]["decision"], "Approved by alice via ciba");
        assert_eq!(auth[0]["policy"]["uid"], "a-1");
        assert_eq!(auth[1]["policy"]["uid"], "cred-1");
        assert!(approved["unmapped"].get("id_token_sha256").is_none());
        let mut ciba = sample(EventKind::Approved, 1);
        if let Some(a) = ciba.approval.as_mut() {
            a.id_token_sha256 = Some("cd".repeat(32));
        }
        assert_eq!(
            to_ocsf(&ciba)["unmapped"]["id_token_sha256"],
            "cd".repeat(32).as_str()
        );
        let deny = to_ocsf(&sample(EventKind::Decision, 1));
        assert_eq!(deny["status_detail"], "amount above 1000");
        assert!(deny.get("authorizations").is_none());
    }

    #[test]
    fn sparse_events_still_have_the_required_fields() {
        let mut e = sample(EventKind::Decision, 2);
        e.process = Default::default();
        e.destination = Default::default();
        e.mcp = crate::audit::event::McpInfo {
            method: "initialize".into(),
            ..Default::default()
        };
        e.rule = None;
        e.approval = None;
        e.credential_id = None;
        let o = to_ocsf(&e);
        for field in REQUIRED {
            assert!(
                o.get(field).is_some_and(|v| !v.is_null()),
                "missing {field}"
            );
        }
        assert_eq!(o["policy"]["name"], "defaults");
        assert!(o["policy"].get("uid").is_none());
        assert!(o.get("resources").is_none());
    }
}
