//! Which container a process runs in, read from its cgroup v2 path.
//!
//! Container engines put each container in a cgroup named after its id:
//!
//! | engine | cgroup (systemd driver) | cgroup (cgroupfs driver) |
//! | --- | --- | --- |
//! | Docker | `…/docker-<id>.scope` | `/docker/<id>` |
//! | Podman | `…/libpod-<id>.scope` | `/libpod_parent/libpod-<id>` |
//! | containerd (CRI) | `…/cri-containerd-<id>.scope` | `/kubepods/…/pod<uid>/<id>` |
//! | CRI-O | `…/crio-<id>.scope` | `/kubepods/…/pod<uid>/<id>` |
//!
//! and Kubernetes nests them under the pod's cgroup (`kubepods-…-pod<uid>.slice`
//! or `pod<uid>`). The path is the kernel's record of where the process was at
//! connect, not something the process says about itself; still, a cgroup name
//! is chosen by whoever may create cgroups, so the parser accepts only the
//! exact shapes above (a 64-hex id, an RFC 4122 pod uid) and nothing else.
//! The engine's helper processes (`libpod-conmon-…`, `crio-conmon-…`) are not
//! containers.

use serde::{Deserialize, Serialize};

/// Longest cgroup path looked at (the kernel's PATH_MAX).
const MAX_PATH: usize = 4096;

/// A container, as its cgroup path names it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerIdentity {
    /// The container id (64 lowercase hex digits).
    pub id: String,
    /// `docker`, `podman`, `containerd`, `cri-o`, or `kubernetes` when only
    /// the Kubernetes layout says it is a container.
    pub runtime: String,
    /// The Kubernetes pod uid, when the container runs in a pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// The pod's namespace and name: not in the cgroup path; known when kya
    /// watches the pods through the Kubernetes API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// The image the container runs, as its engine names it (e.g.
    /// `localhost/agent:1.2`): not in the cgroup path; known once the
    /// engine (Podman, Docker) was asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// That image's id (64 lowercase hex digits), from the same answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
}

impl ContainerIdentity {
    /// The first 12 digits, as `docker ps` shows the id.
    pub fn short_id(&self) -> &str {
        self.id.get(..12).unwrap_or(&self.id)
    }
}

/// The container a cgroup v2 path (relative to the cgroup2 mount) belongs
/// to; `None` for a path that is not a container's (or not one of the known
/// shapes). The innermost container wins (a container in a container).
pub fn container_of_cgroup(path: &str) -> Option<ContainerIdentity> {
    if path.len() > MAX_PATH {
        return None;
    }
    let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let mut kubepods = false;
    let mut pod_uid: Option<String> = None;
    let mut found: Option<(&'static str, &str, Option<String>)> = None;
    for (i, c) in comps.iter().enumerate() {
        if i == 0 && (*c == "kubepods" || c.starts_with("kubepods.") || c.starts_with("kubepods-"))
        {
            kubepods = true;
        }
        if kubepods {
            if let Some(uid) = pod_uid_of(c) {
                pod_uid = Some(uid);
                continue;
            }
        }
        let prev = i.checked_sub(1).and_then(|p| comps.get(p)).copied();
        if let Some((runtime, id)) = scope_id(c) {
            found = Some((runtime, id, pod_uid.clone()));
        } else if prev == Some("docker") && is_id(c) {
            found = Some(("docker", c, None));
        } else if kubepods && is_id(c) && prev.is_some_and(|p| pod_uid_of(p).is_some()) {
            found = Some(("kubernetes", c, pod_uid.clone()));
        }
    }
    let (runtime, id, pod_uid) = found?;
    Some(ContainerIdentity {
        id: id.to_string(),
        runtime: runtime.to_string(),
        pod_uid,
        ..Default::default()
    })
}

/// The pod uid of a pod's own cgroup (its last path component is the pod's,
/// under a `kubepods` tree); `None` for anything else, a container inside a
/// pod included.
pub fn pod_uid_of_cgroup(path: &str) -> Option<String> {
    if path.len() > MAX_PATH {
        return None;
    }
    let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let first = comps.first()?;
    let kubepods =
        *first == "kubepods" || first.starts_with("kubepods.") || first.starts_with("kubepods-");
    if !kubepods || comps.len() < 2 {
        return None;
    }
    pod_uid_of(comps.last()?)
}

/// `docker-<id>.scope` and its kin (the `.scope` suffix is optional: the
/// cgroupfs drivers name the cgroup `libpod-<id>`).
fn scope_id(c: &str) -> Option<(&'static str, &str)> {
    let base = c.strip_suffix(".scope").unwrap_or(c);
    for (prefix, runtime) in [
        ("docker-", "docker"),
        ("libpod-", "podman"),
        ("cri-containerd-", "containerd"),
        ("crio-", "cri-o"),
    ] {
        if let Some(id) = base.strip_prefix(prefix) {
            if is_id(id) {
                return Some((runtime, id));
            }
        }
    }
    None
}

/// A container id: exactly 64 lowercase hex digits.
fn is_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The pod uid of a pod cgroup: `pod<uid>` (cgroupfs) or
/// `kubepods[-<qos>]-pod<uid_with_underscores>.slice` (systemd).
fn pod_uid_of(c: &str) -> Option<String> {
    let raw = if let Some(rest) = c.strip_prefix("pod") {
        rest.to_string()
    } else {
        let base = c.strip_suffix(".slice")?;
        let (_, uid) = base.rsplit_once("-pod")?;
        uid.replace('_', "-")
    };
    is_uuid(&raw).then_some(raw)
}

/// 8-4-4-4-12 lowercase hex digits.
fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4e8a1b2c3d4e5f60718293a4b5c6d7e8f90123456789abcdef0123456789ab";
    const UID: &str = "1b2c3d4e-5f60-4718-9293-a4b5c6d7e8f9";

    fn c(path: &str) -> Option<(String, String, Option<String>)> {
        container_of_cgroup(path).map(|c| (c.id, c.runtime, c.pod_uid))
    }

    fn some(
        id: &str,
        runtime: &str,
        pod: Option<&str>,
    ) -> Option<(String, String, Option<String>)> {
        Some((id.into(), runtime.into(), pod.map(Into::into)))
    }

    #[test]
    fn every_engine_layout_is_recognised() {
        assert_eq!(
            c(&format!("/system.slice/docker-{ID}.scope")),
            some(ID, "docker", None)
        );
        assert_eq!(c(&format!("/docker/{ID}")), some(ID, "docker", None));
        assert_eq!(
            c(&format!("/machine.slice/libpod-{ID}.scope")),
            some(ID, "podman", None)
        );
        assert_eq!(
            c(&format!(
                "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container"
            )),
            some(ID, "podman", None),
            "podman's inner cgroup of the container"
        );
        assert_eq!(
            c(&format!("/libpod_parent/libpod-{ID}")),
            some(ID, "podman", None)
        );
        let pod_slice = UID.replace('-', "_");
        assert_eq!(
            c(&format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod_slice}.slice/cri-containerd-{ID}.scope"
            )),
            some(ID, "containerd", Some(UID))
        );
        assert_eq!(
            c(&format!(
                "/kubepods.slice/kubepods-pod{pod_slice}.slice/crio-{ID}.scope"
            )),
            some(ID, "cri-o", Some(UID))
        );
        assert_eq!(
            c(&format!("/kubepods/burstable/pod{UID}/{ID}")),
            some(ID, "kubernetes", Some(UID))
        );
        assert_eq!(
            c(&format!("/kubepods/pod{UID}/{ID}")),
            some(ID, "kubernetes", Some(UID))
        );
        let inner = ID.replace('3', "4");
        assert_eq!(
            c(&format!("/system.slice/docker-{ID}.scope/docker/{inner}")),
            some(&inner, "docker", None),
            "the innermost container"
        );
        assert_eq!(
            container_of_cgroup(&format!("/docker/{ID}"))
                .unwrap()
                .short_id(),
            &ID[..12]
        );
    }

    #[test]
    fn hostile_and_malformed_paths_are_not_containers() {
        let long = "a".repeat(MAX_PATH);
        let bad = [
            "",
            "/",
            "/user.slice/user-1000.slice/session-3.scope",
            "/system.slice/docker.service",
            "/system.slice/docker-.scope",
            "/system.slice/docker-abc.scope",
            // 63 and 65 digits, upper case, non-hex
            &format!("/docker-{}.scope", &ID[..63]),
            &format!("/docker-{ID}0.scope"),
            &format!("/docker-{}.scope", ID.to_uppercase()),
            &format!("/docker-{}g.scope", &ID[..63]),
            // traversal and separators inside the name
            &format!("/docker-../../{ID}.scope"),
            "/docker/../etc",
            &format!("/docker-{ID}.scope.evil/x/../"),
            // helpers are not containers
            &format!("/machine.slice/libpod-conmon-{ID}.scope"),
            &format!("/kubepods.slice/crio-conmon-{ID}.scope"),
            // a bare id outside a container layout
            &format!("/agents/{ID}"),
            // a pod-looking cgroup outside kubepods
            &format!("/pod{UID}/{ID}"),
            // NUL and non-ASCII
            &format!("/docker-{}\0.scope", &ID[..63]),
            &format!("/docker-{}é.scope", &ID[..62]),
            &long,
            &format!("/{long}/docker-{ID}.scope"),
        ];
        for p in bad {
            assert_eq!(c(p), None, "{p:?}");
        }
        // a pod uid that is not a uuid is dropped, the container stays
        assert_eq!(
            c(&format!(
                "/kubepods.slice/kubepods-podnot_a_uid.slice/cri-containerd-{ID}.scope"
            )),
            some(ID, "containerd", None)
        );
        assert_eq!(c(&format!("/kubepods/podxyz/{ID}")), None);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut x: u32 = 0x1234_5678;
        for n in 0..2000 {
            let mut s = String::new();
            for _ in 0..(n % 200) {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let alphabet = "/-_.abcdef0123456789podkubepodsdockerlibpodscope\u{e9}";
                let chars: Vec<char> = alphabet.chars().collect();
                s.push(chars[(x as usize) % chars.len()]);
            }
            let _ = container_of_cgroup(&s);
        }
    }

    #[test]
    fn pod_cgroups_name_their_pod() {
        assert_eq!(
            pod_uid_of_cgroup(&format!("/kubepods/besteffort/pod{UID}")),
            Some(UID.to_string())
        );
        assert_eq!(
            pod_uid_of_cgroup(&format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
                UID.replace('-', "_")
            )),
            Some(UID.to_string())
        );
        for not in [
            format!("/kubepods/besteffort/pod{UID}/{ID}"),
            format!("/system.slice/pod{UID}"),
            format!("/pod{UID}"),
            "/kubepods/besteffort".to_string(),
            format!("/kubepods/pod{}", &UID[1..]),
        ] {
            assert_eq!(pod_uid_of_cgroup(&not), None, "{not}");
        }
    }
}
