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
use crate::container_image::is_full_id;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Most pods held (a node runs at most a few hundred).
const MAX_PODS: usize = 10_000;
/// Most containers of one pod whose image is held (the rest stay unknown).
const MAX_CONTAINERS: usize = 128;
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
    #[serde(default)]
    container_statuses: Vec<ContainerStatus>,
    #[serde(default)]
    init_container_statuses: Vec<ContainerStatus>,
    #[serde(default)]
    ephemeral_container_statuses: Vec<ContainerStatus>,
}

/// What the kubelet reports of one container: its runtime's id
/// (`containerd://<id>`, `cri-o://<id>`, `docker://<id>`), the image as the
/// pod names it and the image's digest (`repo@sha256:<hex>` or
/// `sha256:<hex>`).
#[derive(Debug, Default, Deserialize)]
struct ContainerStatus {
    #[serde(default, rename = "containerID")]
    container_id: String,
    #[serde(default)]
    image: String,
    #[serde(default, rename = "imageID")]
    image_id: String,
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
    /// Its started containers whose image the API reports.
    pub containers: Vec<PodContainer>,
}

/// A container of a pod and its image, as the API reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodContainer {
    /// The runtime's container id: 64 lowercase hex digits.
    pub id: String,
    /// The image as the pod names it; `None` when that is no image name
    /// (an image given by its id).
    pub image: Option<String>,
    /// The image digest the API reports (`imageID`): 64 lowercase hex
    /// digits (the repository digest on containerd and CRI-O).
    pub image_id: String,
}

impl ContainerStatus {
    /// The container and its image, when the status names both well; a
    /// container not started yet has neither.
    fn view(&self) -> Option<PodContainer> {
        let (_runtime, id) = self.container_id.split_once("://")?;
        let digest = self.image_id.rsplit_once("sha256:")?.1;
        if !is_full_id(id) || !is_full_id(digest) {
            return None;
        }
        let image = Some(self.image.as_str())
            .filter(|i| crate::image_ref::is_image_name(i))
            .map(str::to_string);
        Some(PodContainer {
            id: id.to_string(),
            image,
            image_id: digest.to_string(),
        })
    }
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
        let status = &pod.status;
        let statuses = status
            .container_statuses
            .iter()
            .chain(&status.init_container_statuses)
            .chain(&status.ephemeral_container_statuses);
        let mut containers: Vec<PodContainer> =
            statuses.filter_map(ContainerStatus::view).collect();
        if containers.len() > MAX_CONTAINERS {
            tracing::warn!(
                pod = %pod.metadata.uid,
                containers = containers.len(),
                limit = MAX_CONTAINERS,
                "a pod with more containers than kya holds images for: the rest stay unknown"
            );
            containers.truncate(MAX_CONTAINERS);
        }
        let view = PodView {
            uid: pod.metadata.uid,
            namespace: pod.metadata.namespace,
            name: pod.metadata.name,
            labels: pod.metadata.labels,
            phase: pod.status.phase,
            qos_class: pod.status.qos_class,
            containers,
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
    fn containers_and_their_images_come_from_the_statuses() {
        let idx = PodIndex::from_list("node-a", LIST).unwrap();
        let agent = idx.pods().find(|p| p.uid == AGENT1).unwrap();
        assert_eq!(
            agent.containers,
            [
                PodContainer {
                    id: "3f4e8a1b2c3d4e5f60718293a4b5c6d7e8f90123456789abcdef0123456789ab".into(),
                    image: Some("registry.example.com/agents/agent:1.4".into()),
                    image_id: "a1".repeat(32),
                },
                // an init container (containerd, a bare image id)
                PodContainer {
                    id: "b2".repeat(32),
                    image: Some("docker.io/library/busybox:1.36".into()),
                    image_id: "c3".repeat(32),
                },
            ]
        );
        let web = idx.pods().find(|p| p.uid == WEB).unwrap();
        // CRI-O, the image given by its id (no name); the sidecar that has
        // not started has no container id and is left out
        assert_eq!(
            web.containers,
            [PodContainer {
                id: "d4".repeat(32),
                image: None,
                image_id: "e5".repeat(32),
            }]
        );
    }

    #[test]
    fn hostile_container_statuses_give_no_image() {
        let pod = |statuses: &str| {
            format!(
                r#"{{"type":"ADDED","object":{{"metadata":{{"uid":"{AGENT2}","name":"x","namespace":"y"}},"spec":{{"nodeName":"node-a"}},"status":{{"containerStatuses":{statuses}}}}}}}"#
            )
        };
        let id = "f".repeat(64);
        let digest = format!("sha256:{}", "0".repeat(64));
        for bad in [
            // ids that are not 64 lowercase hex digits, or carry no runtime
            format!(
                r#"[{{"containerID":"containerd://{}","image":"a:1","imageID":"{digest}"}}]"#,
                "F".repeat(64)
            ),
            format!(
                r#"[{{"containerID":"containerd://{id}0","image":"a:1","imageID":"{digest}"}}]"#
            ),
            format!(r#"[{{"containerID":"{id}","image":"a:1","imageID":"{digest}"}}]"#),
            format!(
                r#"[{{"containerID":"containerd://../{id}","image":"a:1","imageID":"{digest}"}}]"#
            ),
            // digests that are not sha256 of 64 hex digits
            format!(
                r#"[{{"containerID":"containerd://{id}","image":"a:1","imageID":"a@sha512:{}"}}]"#,
                "0".repeat(128)
            ),
            format!(
                r#"[{{"containerID":"containerd://{id}","image":"a:1","imageID":"sha256:{}"}}]"#,
                "0".repeat(63)
            ),
            format!(r#"[{{"containerID":"containerd://{id}","image":"a:1"}}]"#),
        ] {
            let mut idx = PodIndex::from_list("node-a", LIST).unwrap();
            idx.apply_line(&pod(&bad)).unwrap();
            let p = idx.pods().find(|p| p.uid == AGENT2).unwrap();
            assert!(p.containers.is_empty(), "{bad}");
        }
        // a name that is no image reference: the image has no name
        let mut idx = PodIndex::from_list("node-a", LIST).unwrap();
        idx.apply_line(&pod(&format!(
            r#"[{{"containerID":"containerd://{id}","image":"Bad Name\n","imageID":"{digest}"}}]"#
        )))
        .unwrap();
        let p = idx.pods().find(|p| p.uid == AGENT2).unwrap();
        assert_eq!(p.containers[0].image, None);
        // statuses that are not a list: the event is refused
        let mut idx = PodIndex::from_list("node-a", LIST).unwrap();
        assert!(idx.apply_line(&pod(r#"{"a":1}"#)).is_err());
        // a pod with very many containers holds the first MAX_CONTAINERS
        let many: Vec<String> = (0..MAX_CONTAINERS + 10)
            .map(|i| {
                format!(r#"{{"containerID":"containerd://{i:064x}","image":"a:1","imageID":"{digest}"}}"#)
            })
            .collect();
        idx.apply_line(&pod(&format!("[{}]", many.join(","))))
            .unwrap();
        let p = idx.pods().find(|p| p.uid == AGENT2).unwrap();
        assert_eq!(p.containers.len(), MAX_CONTAINERS);
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
