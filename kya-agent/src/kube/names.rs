//! The namespace and name of each pod of this node, by uid, and the image
//! of each of its containers, by container id, as the pod watch last saw
//! them: the cgroup path carries only the uids, so decisions are completed
//! from here. On containerd and CRI-O, whose images no engine CLI is asked
//! about, this is where a container's image comes from.

use super::pods::PodIndex;
use crate::container_image::ContainerImage;
use kya_common::ContainerIdentity;
use std::collections::{BTreeMap, HashMap};
use std::sync::{OnceLock, RwLock};

#[derive(Default)]
struct Known {
    /// pod uid → (namespace, name)
    pods: BTreeMap<String, (String, String)>,
    /// container id → its image
    images: HashMap<String, ContainerImage>,
}

fn known() -> &'static RwLock<Known> {
    static KNOWN: OnceLock<RwLock<Known>> = OnceLock::new();
    KNOWN.get_or_init(|| RwLock::new(Known::default()))
}

/// Replaces what is known with the pods of `index`. A container id that
/// two pods claim with different images is an answer kya cannot trust:
/// its image stays unknown.
pub fn learn(index: &PodIndex) {
    let pods: BTreeMap<String, (String, String)> = index
        .pods()
        .map(|p| (p.uid.clone(), (p.namespace.clone(), p.name.clone())))
        .collect();
    let images = crate::container_image::unambiguous(
        index.pods().flat_map(|p| &p.containers).map(|c| {
            (
                c.id.clone(),
                ContainerImage {
                    name: c.image.clone(),
                    id: c.image_id.clone(),
                },
            )
        }),
        "the Kubernetes API",
    );
    if let Ok(mut k) = known().write() {
        *k = Known { pods, images };
    }
}

/// The image of container `id`, when a pod of this node reports it.
pub(crate) fn image_of(id: &str) -> Option<ContainerImage> {
    known().read().ok()?.images.get(id).cloned()
}

/// `c` with its pod's namespace and name, when its pod is known.
pub fn enrich(mut c: ContainerIdentity) -> ContainerIdentity {
    let Some(uid) = c.pod_uid.as_deref() else {
        return c;
    };
    if let Some((ns, name)) = known().read().ok().and_then(|k| k.pods.get(uid).cloned()) {
        c.pod_namespace = Some(ns);
        c.pod_name = Some(name);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// What is known is one for the process: the tests take turns.
    static TURN: Mutex<()> = Mutex::new(());

    #[test]
    fn containers_of_known_pods_get_their_names() {
        let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let list = include_str!("testdata/pod_list.json");
        learn(&PodIndex::from_list("node-a", list).unwrap());
        let c = kya_common::container_of_cgroup(
            "/kubepods/besteffort/pod1b2c3d4e-5f60-4718-9293-a4b5c6d7e8f9/3f4e8a1b2c3d4e5f60718293a4b5c6d7e8f90123456789abcdef0123456789ab",
        )
        .unwrap();
        let c = enrich(c);
        assert_eq!(c.pod_namespace.as_deref(), Some("agents"));
        assert_eq!(c.pod_name.as_deref(), Some("agent-1"));
        // an unknown pod, or no pod: unchanged
        let other = kya_common::container_of_cgroup(
            "/kubepods/pod00000000-0000-4000-8000-000000000000/3f4e8a1b2c3d4e5f60718293a4b5c6d7e8f90123456789abcdef0123456789ab",
        )
        .unwrap();
        assert_eq!(enrich(other.clone()), other);
    }

    #[test]
    fn containers_of_known_pods_get_their_images_and_conflicts_none() {
        let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let list = include_str!("testdata/pod_list.json");
        let mut index = PodIndex::from_list("node-a", list).unwrap();
        learn(&index);
        let agent = "3f4e8a1b2c3d4e5f60718293a4b5c6d7e8f90123456789abcdef0123456789ab";
        let image = image_of(agent).unwrap();
        assert_eq!(
            image.name.as_deref(),
            Some("registry.example.com/agents/agent:1.4")
        );
        assert_eq!(image.id, "a1".repeat(32));
        // also through the image cache that decisions read
        assert_eq!(crate::container_image::known(agent), Some(image));
        assert!(image_of(&"0".repeat(64)).is_none());
        // another pod claims the same container with another image: the
        // answer cannot be trusted, neither image is used
        index
            .apply_line(&format!(
                r#"{{"type":"ADDED","object":{{"metadata":{{"uid":"4e5f6071-8293-4a41-b5c6-d7e8f9012345","name":"imposter","namespace":"agents"}},"spec":{{"nodeName":"node-a"}},"status":{{"containerStatuses":[{{"containerID":"containerd://{agent}","image":"trusted:1","imageID":"sha256:{}"}}]}}}}}}"#,
                "9".repeat(64)
            ))
            .unwrap();
        learn(&index);
        assert!(image_of(agent).is_none());
        // a pod that is gone takes its containers' images with it
        learn(&PodIndex::from_list("node-a", r#"{"metadata":{},"items":[]}"#).unwrap());
        assert!(image_of(&"b2".repeat(32)).is_none());
    }
}
