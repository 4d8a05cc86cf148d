//! The pods on this node, as the Kubernetes API reports them: a list
//! (`GET /api/v1/pods?fieldSelector=spec.nodeName=NODE`) followed by a watch
//! from its resourceVersion, one JSON event per line. [`PodIndex`] applies
//! both and answers which pods match a label selector; [`pod_cgroups`] maps
//! each pod uid to the cgroup the kubelet made for it, so the matching pods
//! can be selected by cgroup.
//!
//! Everything here is untrusted input: the index refuses events it cannot
//! read, ignores pods of other nodes, and bounds what it holds.

use super::selector::LabelSelector;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Most pods held (a node runs at most a few hundred).
const MAX_PODS: usize = 10_000;
/// Deepest cgroup level searched for pod cgroups.
const MAX_DEPTH: usize = 4;
/// Most cgroup directories looked at in one search.
const MAX_DIRS: usize = 100_000;

/// Why an API answer cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("unreadable API answer: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the watch expired (410 Gone: {0}): list again")]
    Gone(String),
    #[error("the API server reported an error ({code}: {message})")]
    Api { code: u16, message: String },
    #[error("unknown watch event type {0:?}")]
    EventType(String),
    #[error("node name {0:?} is not a DNS subdomain")]
    NodeName(String),
    #[error("more than {MAX_PODS} pods on this node")]
    TooManyPods,
}

#[derive(Debug, Deserialize)]
struct PodList {
    metadata: ListMeta,
    #[serde(default)]
    items: Vec<Pod>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListMeta {
    #[serde(default)]
    resource_version: String,
}

#[derive(Debug, Deserialize)]
struct Pod {
    metadata: ObjectMeta,
    #[serde(default)]
    spec: PodSpec,
    #[serde(default)]
    status: PodStatus,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObjectMeta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    uid: String,
    #[serde(default)]
    resource_version: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    #[serde(default)]
    node_name: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodStatus {
    #[serde(default)]
    phase: String,
    #[serde(default)]
    qos_class: String,
}

#[derive(Debug, Deserialize)]
struct WatchEvent {
    #[serde(rename = "type")]
    kind: String,
    object: serde_json::Value,
}

#[derive(Debug, Deserialize)]
struct Status {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    message: String,
}

/// One pod of this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub phase: String,
    pub qos_class: String,
}

/// What one watch event changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Added(String),
    Modified(String),
    Deleted(String),
    /// A bookmark, or a pod of another node: only the resourceVersion moved.
    Nothing,
}

/// The pods of one node, kept current by watch events.
#[derive(Debug, Clone)]
pub struct PodIndex {
    node: String,
    pods: BTreeMap<String, PodView>,
    resource_version: String,
}

impl PodIndex {
    /// The index of `node`'s pods from a pod list answer.
    pub fn from_list(node: &str, body: &str) -> Result<Self, KubeError> {
        check_node(node)?;
        let list: PodList = serde_json::from_str(body)?;
        let mut idx = Self {
            node: node.to_string(),
            pods: BTreeMap::new(),
            resource_version: list.metadata.resource_version,
        };
        for pod in list.items {
            idx.upsert(pod)?;
        }
        Ok(idx)
    }

    /// The list request for `node`'s pods.
    pub fn list_path(node: &str) -> Result<String, KubeError> {
        check_node(node)?;
        Ok(format!("/api/v1/pods?fieldSelector=spec.nodeName%3D{node}"))
    }

    /// The watch request that continues from what the index has seen.
    pub fn watch_path(&self) -> String {
        format!(
            "/api/v1/pods?watch=1&allowWatchBookmarks=true&fieldSelector=spec.nodeName%3D{}&resourceVersion={}",
            self.node,
            percent_encoding::utf8_percent_encode(
                &self.resource_version,
                percent_encoding::NON_ALPHANUMERIC
            )
        )
    }

    pub fn resource_version(&self) -> &str {
        &self.resource_version
    }

    /// Applies one line of a watch stream.
    pub fn apply_line(&mut self, line: &str) -> Result<Change, KubeError> {
        let ev: WatchEvent = serde_json::from_str(line)?;
        match ev.kind.as_str() {
            "ERROR" => {
                let s: Status = serde_json::from_value(ev.object)?;
                if s.code == 410 {
                    Err(KubeError::Gone(s.message))
                } else {
                    Err(KubeError::Api {
                        code: s.code,
                        message: s.message,
                    })
                }
            }
            "BOOKMARK" => {
                let rv = ev.object["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default();
                if !rv.is_empty() {
                    self.resource_version = rv.to_string();
                }
                Ok(Change::Nothing)
            }
            "ADDED" | "MODIFIED" | "DELETED" => {
                let pod: Pod = serde_json::from_value(ev.object)?;
                if !pod.metadata.resource_version.is_empty() {
                    self.resource_version = pod.metadata.resource_version.clone();
                }
                let uid = pod.metadata.uid.clone();
                if ev.kind == "DELETED" {
                    return Ok(match self.pods.remove(&uid) {
                        Some(_) => Change::Deleted(uid),
                        None => Change::Nothing,
                    });
                }
                let known = self.pods.contains_key(&uid);
                if !self.upsert(pod)? {
                    // moved off this node (or never on it)
                    return Ok(match self.pods.remove(&uid) {
                        Some(_) => Change::Deleted(uid),
                        None => Change::Nothing,
                    });
                }
                Ok(if known {
                    Change::Modified(uid)
                } else {
                    Change::Added(uid)
                })
            }
            other => Err(KubeError::EventType(other.to_string())),
        }
    }

    /// The pods whose labels match `sel`, by uid.
    pub fn matching<'a>(&'a self, sel: &'a LabelSelector) -> impl Iterator<Item = &'a PodView> {
        self.pods.values().filter(move |p| sel.matches(&p.labels))
    }

    /// Every pod held.
    pub fn pods(&self) -> impl Iterator<Item = &PodView> {
        self.pods.values()
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// Holds `pod` if it runs on this node and has a well-formed uid;
    /// whether it was held.
    fn upsert(&mut self, pod: Pod) -> Result<bool, KubeError> {
        if pod.spec.node_name != self.node || !is_uid(&pod.metadata.uid) {
            return Ok(false);
        }
        if self.pods.len() >= MAX_PODS && !self.pods.contains_key(&pod.metadata.uid) {
            return Err(KubeError::TooManyPods);
        }
        let view = PodView {
            uid: pod.metadata.uid,
            namespace: pod.metadata.namespace,
            name: pod.metadata.name,
            labels: pod.metadata.labels,
            phase: pod.status.phase,
            qos_class: pod.status.qos_class,
        };
        self.pods.insert(view.uid.clone(), view);
        Ok(true)
    }
}

/// A node name: a DNS subdomain (lowercase letters, digits, '-', '.').
fn check_node(node: &str) -> Result<(), KubeError> {
    let ok = !node.is_empty()
        && node.len() <= 253
        && node.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(KubeError::NodeName(node.to_string()))
    }
}

/// An RFC 4122 uid as the API writes it (lowercase hex).
fn is_uid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

/// Every pod cgroup under the kubelet's `kubepods` trees of the cgroup2
/// mount: pod uid → cgroup path (relative to the mount). Both drivers:
/// `/kubepods/<qos>/pod<uid>` and
/// `/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_with_underscores>.slice`.
pub fn pod_cgroups(cgroup2: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack: Vec<(PathBuf, usize)> = Vec::new();
    if let Ok(rd) = std::fs::read_dir(cgroup2) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name == "kubepods" || name.starts_with("kubepods.") || name.starts_with("kubepods-")
            {
                stack.push((e.path(), 1));
            }
        }
    }
    let mut seen = 0usize;
    while let Some((dir, depth)) = stack.pop() {
        seen += 1;
        if seen > MAX_DIRS {
            tracing::warn!(
                limit = MAX_DIRS,
                "cgroup tree too large: pod search stopped"
            );
            break;
        }
        let Ok(rel) = dir.strip_prefix(cgroup2) else {
            continue;
        };
        let Some(rel) = rel.to_str() else { continue };
        let rel = format!("/{rel}");
        if let Some(uid) = kya_common::container::pod_uid_of_cgroup(&rel) {
            out.insert(uid, rel);
            continue; // its children are the pod's containers
        }
        if depth >= MAX_DEPTH {
            continue;
        }
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push((e.path(), depth + 1));
            }
        }
    }
    out
}

/// The cgroups of the pods of `index` that match `sel` and whose cgroup
/// exists (`cgroups` from [`pod_cgroups`]); sorted.
pub fn selected_cgroups(
    index: &PodIndex,
    sel: &LabelSelector,
    cgroups: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut out: Vec<String> = index
        .matching(sel)
        .filter_map(|p| cgroups.get(&p.uid).cloned())
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = include_str!("testdata/pod_list.json");
    const WATCH: &str = include_str!("testdata/watch.jsonl");
    const AGENT1: &str = "1b2c3d4e-5f60-4718-9293-a4b5c6d7e8f9";
    const WEB: &str = "2c3d4e5f-6071-4829-93a4-b5c6d7e8f901";
    const AGENT2: &str = "4e5f6071-8293-4a41-b5c6-d7e8f9012345";

    fn uids<'a>(it: impl Iterator<Item = &'a PodView>) -> Vec<String> {
        it.map(|p| p.uid.clone()).collect()
    }

    #[test]
    fn a_recorded_list_and_watch_keep_the_node_s_pods() {
        let mut idx = PodIndex::from_list("node-a", LIST).unwrap();
        assert_eq!(idx.len(), 2, "the pod of node-b is not held");
        assert_eq!(idx.resource_version(), "48213");
        let sel = LabelSelector::parse("app=agent").unwrap();
        assert_eq!(uids(idx.matching(&sel)), [AGENT1]);
        assert!(idx.watch_path().ends_with("&resourceVersion=48213"));
        let mut lines = WATCH.lines();
        let mut next = || idx.apply_line(lines.next().unwrap());
        assert_eq!(next().unwrap(), Change::Added(AGENT2.into()));
        assert_eq!(next().unwrap(), Change::Modified(AGENT1.into()));
        assert_eq!(next().unwrap(), Change::Nothing);
        assert_eq!(next().unwrap(), Change::Deleted(WEB.into()));
        assert!(matches!(next(), Err(KubeError::Gone(_))));
        assert_eq!(idx.resource_version(), "48410");
        // agent-1 was relabelled, agent-2 joined
        assert_eq!(uids(idx.matching(&sel)), [AGENT2]);
        let pod = idx.matching(&sel).next().unwrap();
        assert_eq!(
            (pod.namespace.as_str(), pod.name.as_str()),
            ("agents", "agent-2")
        );
        assert_eq!(pod.qos_class, "Guaranteed");
    }

    #[test]
    fn a_pod_that_moves_off_the_node_is_dropped() {
        let mut idx = PodIndex::from_list("node-a", LIST).unwrap();
        let moved = WATCH
            .lines()
            .nth(1)
            .unwrap()
            .replace("\"nodeName\":\"node-a\"", "\"nodeName\":\"node-b\"");
        assert_eq!(
            idx.apply_line(&moved).unwrap(),
            Change::Deleted(AGENT1.into())
        );
        assert_eq!(idx.len(), 1);
    }

    #[test]
    fn hostile_answers_are_refused_and_change_nothing() {
        let mut idx = PodIndex::from_list("node-a", LIST).unwrap();
        for bad in [
            "",
            "not json",
            r#"{"type":"ADDED"}"#,
            r#"{"type":"SURPRISE","object":{}}"#,
            r#"{"type":"ADDED","object":{"metadata":"x"}}"#,
            r#"{"type":"ERROR","object":{"code":500,"message":"boom"}}"#,
        ] {
            assert!(idx.apply_line(bad).is_err(), "{bad:?}");
        }
        // a pod without a well-formed uid is not held
        let r = idx.apply_line(
            r#"{"type":"ADDED","object":{"metadata":{"uid":"../../x","labels":{"app":"agent"}},"spec":{"nodeName":"node-a"}}}"#,
        );
        assert_eq!(r.unwrap(), Change::Nothing);
        assert_eq!(idx.len(), 2);
        for node in ["", "Node-A", "a/b", "a..b", "-a"] {
            assert!(PodIndex::from_list(node, LIST).is_err(), "{node:?}");
            assert!(PodIndex::list_path(node).is_err(), "{node:?}");
        }
        assert!(PodIndex::from_list("node-a", "[]").is_err());
    }

    #[test]
    fn pod_uids_map_to_their_cgroups_for_both_drivers() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        for d in [
            format!("kubepods/besteffort/pod{AGENT1}/3f4e8a1b2c3d4e5f60718293a4b5c6d7e8f90123456789abcdef0123456789ab"),
            format!("kubepods/burstable/pod{WEB}"),
            format!(
                "kubepods.slice/kubepods-pod{}.slice",
                AGENT2.replace('-', "_")
            ),
            "system.slice/pod00000000-0000-4000-8000-000000000000".to_string(),
        ] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        let cgs = pod_cgroups(r);
        assert_eq!(cgs.len(), 3, "{cgs:?}");
        assert_eq!(cgs[AGENT1], format!("/kubepods/besteffort/pod{AGENT1}"));
        assert_eq!(
            cgs[AGENT2],
            format!(
                "/kubepods.slice/kubepods-pod{}.slice",
                AGENT2.replace('-', "_")
            )
        );
        let mut idx = PodIndex::from_list("node-a", LIST).unwrap();
        for l in WATCH.lines().take(2) {
            idx.apply_line(l).unwrap();
        }
        let sel = LabelSelector::parse("app in (agent, web)").unwrap();
        assert_eq!(
            selected_cgroups(&idx, &sel, &cgs),
            [
                format!(
                    "/kubepods.slice/kubepods-pod{}.slice",
                    AGENT2.replace('-', "_")
                ),
                format!("/kubepods/burstable/pod{WEB}"),
            ]
        );
    }
}
