//! The Kubernetes manifests under deploy/kubernetes/ are valid against the
//! Kubernetes schemas (checked offline by `kubernetes-validate`, which
//! bundles them, in strict mode: an unknown field fails), a broken manifest
//! is caught, and the policy the ConfigMap carries passes `kya policy check`.

use kya_e2e::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

/// The manifests kustomization.yaml lists (what `kubectl apply -k` applies).
fn manifests() -> Vec<PathBuf> {
    let k = std::fs::read_to_string(deploy().join("kustomization.yaml")).expect("kustomization");
    let files: Vec<PathBuf> = k
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- "))
        .map(|f| deploy().join(f.trim()))
        .collect();
    assert!(files.len() >= 5, "{files:?}");
    files
}

fn validate(files: &[PathBuf], version: Option<&str>) -> std::process::Output {
    let mut c = Command::new(peers().join(".venv/bin/kubernetes-validate"));
    c.args(["--strict", "--no-warn"]);
    if let Some(v) = version {
        c.args(["--kubernetes-version", v]);
    }
    c.args(files).output().expect("run kubernetes-validate")
}

#[test]
fn the_kubernetes_manifests_validate_offline_against_the_schemas() {
    ensure_peers();
    let files = manifests();
    // An unknown kind is skipped without a word: each resource must be
    // named as passed.
    // 1.30: the oldest release with securityContext.appArmorProfile
    for version in [None, Some("1.30.0")] {
        let out = validate(&files, version);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{version:?}: {text}");
        for kind in [
            "namespace/kya-system",
            "serviceaccount/kya",
            "clusterrole/kya-pod-reader",
            "clusterrolebinding/kya-pod-reader",
            "configmap/kya-config",
            "secret/kya-ciba",
            "daemonset/kya",
        ] {
            assert!(
                text.contains(&format!("passed for resource {kind}")),
                "{version:?}: {kind} not validated: {text}"
            );
        }
    }
}

#[test]
fn a_broken_manifest_is_caught() {
    ensure_peers();
    let dir = tempfile::tempdir().expect("tempdir");
    let ds = std::fs::read_to_string(deploy().join("daemonset.yaml")).expect("daemonset");
    for (from, to, why) in [
        ("hostPID: true", "hostPid: true", "a misspelt field"),
        (
            "containerPort: 9464",
            "containerPort: nine",
            "a port that is not a number",
        ),
        (
            "- name: kya\n          image: kya:latest",
            "- image: kya:latest",
            "a container without its required name",
        ),
    ] {
        assert!(ds.contains(from), "{from}");
        let bad = dir.path().join("daemonset.yaml");
        std::fs::write(&bad, ds.replacen(from, to, 1)).expect("write");
        let out = validate(&[bad], None);
        assert!(!out.status.success(), "{why} passed: {out:?}");
    }
}

#[test]
fn the_configmap_policy_passes_kya_policy_check() {
    ensure_peers();
    let dir = tempfile::tempdir().expect("tempdir");
    let script =
        "import json, sys, yaml\nprint(json.dumps(yaml.safe_load(open(sys.argv[1]))['data']))";
    let out = Command::new(peers_python())
        .args(["-c", script])
        .arg(deploy().join("configmap.yaml"))
        .output()
        .expect("python");
    assert!(out.status.success(), "{out:?}");
    let data: Value = serde_json::from_slice(&out.stdout).expect("ConfigMap data");
    let policy = data["policy.toml"]
        .as_str()
        .expect("policy.toml in the ConfigMap");
    let config = data["kya.toml"]
        .as_str()
        .expect("kya.toml in the ConfigMap");
    assert!(
        config.contains("/etc/kya/policy.toml"),
        "kya.toml names the policy where the ConfigMap is mounted"
    );
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, policy).expect("write");
    let out = Command::new(kya_bin())
        .args(["policy", "check"])
        .arg(&path)
        .output()
        .expect("kya policy check");
    assert!(out.status.success(), "{out:?}");
}

/// The DaemonSet grants what the tested `podman run` line grants: the same
/// capabilities, host pid and network namespaces, a read-only root, and
/// the same host mounts.
#[test]
fn the_daemonset_has_the_privileges_of_the_tested_run_line() {
    ensure_peers();
    let script = "import json, sys, yaml\nprint(json.dumps(yaml.safe_load(open(sys.argv[1]))))";
    let out = Command::new(peers_python())
        .args(["-c", script])
        .arg(deploy().join("daemonset.yaml"))
        .output()
        .expect("python");
    assert!(out.status.success(), "{out:?}");
    let ds: Value = serde_json::from_slice(&out.stdout).expect("DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    assert_eq!(pod["hostNetwork"], true);
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let mut caps: Vec<String> = sc["capabilities"]["add"]
        .as_array()
        .expect("caps")
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    caps.sort();
    let mut tested: Vec<String> = podman::KYA_PRIVILEGES
        .iter()
        .filter_map(|p| p.strip_prefix("--cap-add="))
        .map(str::to_string)
        .collect();
    tested.sort();
    assert_eq!(
        caps, tested,
        "the DaemonSet's capabilities are the tested ones"
    );
    let mounts: Vec<(String, bool)> = c["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .map(|m| {
            (
                m["mountPath"].as_str().unwrap_or("").to_string(),
                m["readOnly"] == true,
            )
        })
        .collect();
    for (path, ro) in [
        ("/sys/fs/bpf", false),
        ("/sys/fs/cgroup", true),
        ("/var/lib/kya", false),
    ] {
        assert!(
            mounts.contains(&(path.to_string(), ro)),
            "{path} (read-only: {ro}) in {mounts:?}"
        );
    }
}
