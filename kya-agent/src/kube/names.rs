//! The namespace and name of each pod of this node, by uid, as the pod
//! watch last saw them: the cgroup path carries only the uid, so decisions
//! are completed from here.

use super::pods::PodIndex;
use kya_common::ContainerIdentity;
use std::collections::BTreeMap;
use std::sync::{OnceLock, RwLock};

fn names() -> &'static RwLock<BTreeMap<String, (String, String)>> {
    static NAMES: OnceLock<RwLock<BTreeMap<String, (String, String)>>> = OnceLock::new();
    NAMES.get_or_init(|| RwLock::new(BTreeMap::new()))
}

/// Replaces what is known with the pods of `index`.
pub fn learn(index: &PodIndex) {
    let now: BTreeMap<String, (String, String)> = index
        .pods()
        .map(|p| (p.uid.clone(), (p.namespace.clone(), p.name.clone())))
        .collect();
    if let Ok(mut n) = names().write() {
        *n = now;
    }
}

/// `c` with its pod's namespace and name, when its pod is known.
pub fn enrich(mut c: ContainerIdentity) -> ContainerIdentity {
    let Some(uid) = c.pod_uid.as_deref() else {
        return c;
    };
    if let Some((ns, name)) = names().read().ok().and_then(|n| n.get(uid).cloned()) {
        c.pod_namespace = Some(ns);
        c.pod_name = Some(name);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containers_of_known_pods_get_their_names() {
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
}
