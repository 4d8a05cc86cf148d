//! `--container ID|NAME`: a container selected by its id or its name (a name
//! is turned into the id by the engine's own `inspect`), resolved to the
//! cgroup its engine made for it (`docker-<id>.scope`, `libpod-<id>.scope`,
//! `cri-containerd-<id>.scope`, `crio-<id>.scope`, `/docker/<id>`, a pod's
//! `<id>` cgroup; see `kya_common::container`). Selecting that cgroup selects
//! every process of the container, wherever its network namespace is.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Shortest id prefix accepted (what `docker ps` shows).
const MIN_ID_PREFIX: usize = 12;
/// Deepest cgroup level searched (Kubernetes and rootless Podman nest 4 to 7).
const MAX_DEPTH: usize = 16;
/// Most cgroup directories looked at in one search.
const MAX_DIRS: usize = 200_000;

/// Why a container selector could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("container id {0:?} must be {MIN_ID_PREFIX} to 64 lowercase hex digits (a full id or its unique prefix)")]
    BadId(String),
    #[error("no running container has an id starting with {0:?} (no cgroup of a known engine layout names it)")]
    NotFound(String),
    #[error("container id prefix {prefix:?} is ambiguous: {ids:?}")]
    Ambiguous { prefix: String, ids: Vec<String> },
    #[error("container {0:?} must be 12 to 64 lowercase hex digits (an id or its unique prefix) or a container name (a letter or digit, then letters, digits, '_', '.', '-')")]
    BadSelector(String),
    #[error("no running container is named {name:?} ({why})")]
    NameNotFound { name: String, why: String },
}

/// The engines asked for a container's id by name, in this order.
const ENGINES: &[&str] = &["podman", "docker"];
/// Longest wait for an engine's answer.
const ENGINE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest container name accepted.
const MAX_NAME: usize = 128;

/// The cgroup of the running container that `selector` names: an id (or a
/// unique prefix of one), else a container name, resolved to its id by the
/// first engine (`podman`, `docker` on the PATH) that knows it.
pub fn cgroup_of_selector(cgroup2: &Path, selector: &str) -> Result<String, ContainerError> {
    let hex = selector.len() >= MIN_ID_PREFIX
        && selector.len() <= 64
        && selector
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if hex {
        match cgroup_of_container(cgroup2, selector) {
            // an all-hex word may still be a name
            Err(ContainerError::NotFound(_)) => {}
            other => return other,
        }
    } else if !is_name(selector) {
        return Err(ContainerError::BadSelector(selector.to_string()));
    }
    let id = id_of_name(selector).map_err(|why| {
        if hex {
            ContainerError::NotFound(selector.to_string())
        } else {
            ContainerError::NameNotFound {
                name: selector.to_string(),
                why,
            }
        }
    })?;
    cgroup_of_container(cgroup2, &id)
}

/// A container name as Docker and Podman accept it: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`.
fn is_name(s: &str) -> bool {
    let mut b = s.bytes();
    s.len() <= MAX_NAME
        && b.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && b.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// The full id of the container named `name`, asked of each engine in turn.
fn id_of_name(name: &str) -> Result<String, String> {
    let mut why = Vec::new();
    for engine in ENGINES {
        match inspect_id(engine, name) {
            Ok(id) => {
                tracing::info!(%engine, container = %name, %id, "container name resolved");
                return Ok(id);
            }
            Err(e) => why.push(format!("{engine}: {e}")),
        }
    }
    Err(why.join("; "))
}

/// `ENGINE container inspect --format {{.Id}} NAME`, bounded in time; the
/// answer must be one full id.
fn inspect_id(engine: &str, name: &str) -> Result<String, String> {
    let (ok, out) = run_engine(
        engine,
        &["container", "inspect", "--format", "{{.Id}}", "--", name],
        4096, // an id is 65 bytes
    )?;
    if !ok {
        return Err("no such container".into());
    }
    let out = String::from_utf8_lossy(&out);
    let id = out.trim();
    if crate::container_image::is_full_id(id) {
        Ok(id.to_string())
    } else {
        Err("the engine's answer is not a container id".into())
    }
}

/// Runs `ENGINE ARGS` (argv, no shell; stdin and stderr closed), waiting at
/// most [`ENGINE_TIMEOUT`] (then it is killed) and keeping at most `limit`
/// bytes of its stdout (the rest is read and dropped, so a chatty engine
/// never blocks on a full pipe). Whether it exited with 0, and its stdout.
/// Blocking: call it off the async workers.
pub(crate) fn run_engine(
    engine: &str,
    args: &[&str],
    limit: usize,
) -> Result<(bool, Vec<u8>), String> {
    use std::io::Read;
    let mut child = Command::new(engine)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let reader = child.stdout.take().map(|mut stdout| {
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            let _ = (&mut stdout).take(limit as u64).read_to_end(&mut kept);
            // drain the rest: the engine must not block on a full pipe
            let _ = std::io::copy(&mut stdout, &mut std::io::sink());
            kept
        })
    });
    let deadline = Instant::now() + ENGINE_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("no answer in time".into());
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    // the pipe closes with the engine (a helper it left behind holding the
    // pipe is not waited for past the deadline: the reader is detached)
    let out = match reader {
        Some(r) => {
            while !r.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if r.is_finished() {
                r.join().unwrap_or_default()
            } else {
                return Err("its output did not end in time".into());
            }
        }
        None => Vec::new(),
    };
    Ok((status.success(), out))
}

/// A running container, as the cgroup tree shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RunningContainer {
    /// Its id (64 lowercase hex digits).
    pub id: String,
    /// The engine its cgroup's name says made it (`podman`, `docker`, ...).
    pub runtime: String,
    /// Its cgroup, relative to the cgroup2 mount.
    pub cgroup: String,
}

/// Every container cgroup in the tree under `cgroup2` now (the outermost
/// cgroup naming a container id: its sub-cgroups are the same container),
/// sorted by id, then cgroup. An id that two cgroups name is listed with
/// each: a cgroup's name is chosen by whoever may create it, so a look-alike
/// never hides the container's real cgroup from a selection.
pub(crate) fn running_containers(cgroup2: &Path) -> Vec<RunningContainer> {
    let mut found: Vec<RunningContainer> = Vec::new();
    let mut stack: Vec<(PathBuf, usize)> = vec![(cgroup2.to_path_buf(), 0)];
    let mut seen = 0usize;
    while let Some((dir, depth)) = stack.pop() {
        seen += 1;
        if seen > MAX_DIRS {
            tracing::warn!(
                limit = MAX_DIRS,
                "cgroup tree too large: container scan stopped"
            );
            break;
        }
        let Ok(rel) = dir.strip_prefix(cgroup2) else {
            continue;
        };
        let Some(rel) = rel.to_str() else { continue };
        let rel = format!("/{rel}");
        if let Some(c) = kya_common::container_of_cgroup(&rel) {
            found.push(RunningContainer {
                id: c.id,
                runtime: c.runtime,
                cgroup: rel,
            });
            continue; // its sub-cgroups are the same container
        }
        if depth >= MAX_DEPTH {
            continue;
        }
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            // no symlinks in cgroupfs, but never follow one
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push((e.path(), depth + 1));
            }
        }
    }
    found.sort_by(|a, b| (&a.id, &a.cgroup).cmp(&(&b.id, &b.cgroup)));
    found
}

/// The cgroup (relative to the cgroup2 mount `cgroup2`) of the running
/// container whose id is or starts with `id`: the outermost one when the
/// engine nests several (Podman's `libpod-<id>.scope/container`).
pub fn cgroup_of_container(cgroup2: &Path, id: &str) -> Result<String, ContainerError> {
    if id.len() < MIN_ID_PREFIX
        || id.len() > 64
        || !id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err(ContainerError::BadId(id.to_string()));
    }
    let found: Vec<RunningContainer> = running_containers(cgroup2)
        .into_iter()
        .filter(|c| c.id.starts_with(id))
        .collect();
    // sorted by id already
    let mut ids: Vec<String> = found.iter().map(|c| c.id.clone()).collect();
    ids.dedup();
    match ids.len() {
        0 => Err(ContainerError::NotFound(id.to_string())),
        1 => Ok(found
            .into_iter()
            .map(|c| c.cgroup)
            .min_by_key(|cg| (cg.len(), cg.clone()))
            .unwrap_or_default()),
        _ => Err(ContainerError::Ambiguous {
            prefix: id.to_string(),
            ids,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "3f4e8a1b2c3d4e5f60718293a4b5c6d7e8f90123456789abcdef0123456789ab";
    const B: &str = "3f4e8a1b2c3d0000000000000000000000000000000000000000000000000000";

    #[test]
    fn resolves_ids_and_prefixes_in_a_cgroup_tree() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join(format!("system.slice/docker-{A}.scope"))).unwrap();
        std::fs::create_dir_all(r.join(format!("machine.slice/libpod-{B}.scope/container")))
            .unwrap();
        std::fs::create_dir_all(r.join("user.slice/user-1000.slice/session-1.scope")).unwrap();
        assert_eq!(
            cgroup_of_container(r, A).unwrap(),
            format!("/system.slice/docker-{A}.scope")
        );
        assert_eq!(
            cgroup_of_container(r, &A[..16]).unwrap(),
            format!("/system.slice/docker-{A}.scope")
        );
        assert_eq!(
            cgroup_of_container(r, &B[..20]).unwrap(),
            format!("/machine.slice/libpod-{B}.scope"),
            "the outermost cgroup of the container"
        );
        assert!(matches!(
            cgroup_of_container(r, &A[..12]),
            Err(ContainerError::Ambiguous { .. })
        ));
        assert!(matches!(
            cgroup_of_container(r, "0123456789abcdef"),
            Err(ContainerError::NotFound(_))
        ));
        for bad in [
            "",
            "3f4e8a",
            "../../etc/passwd",
            &A.to_uppercase(),
            &format!("{A}0"),
            "3f4e8a1b2c3d*",
        ] {
            assert!(
                matches!(cgroup_of_container(r, bad), Err(ContainerError::BadId(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn selectors_are_ids_or_names_and_nothing_else() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join(format!("system.slice/docker-{A}.scope"))).unwrap();
        assert_eq!(
            cgroup_of_selector(r, &A[..16]).unwrap(),
            format!("/system.slice/docker-{A}.scope")
        );
        let long = "n".repeat(MAX_NAME + 1);
        for bad in [
            "",
            "../../etc",
            "-rm",
            ".hidden",
            "a b",
            "name/with/slash",
            "x\0y",
            "{{.Id}}",
            &long,
        ] {
            assert!(
                matches!(
                    cgroup_of_selector(r, bad),
                    Err(ContainerError::BadSelector(_))
                ),
                "{bad:?}"
            );
        }
        for good in ["agent", "my-agent_1.2", "A9", &long[1..]] {
            assert!(is_name(good), "{good:?}");
        }
    }

    #[test]
    fn running_containers_are_listed_by_each_cgroup_naming_them() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join(format!("system.slice/docker-{A}.scope"))).unwrap();
        std::fs::create_dir_all(r.join(format!("machine.slice/libpod-{B}.scope/container")))
            .unwrap();
        std::fs::create_dir_all(r.join(format!("libpod_parent/libpod-conmon-{B}"))).unwrap();
        std::fs::create_dir_all(r.join("user.slice/user-1000.slice/session-1.scope")).unwrap();
        // a look-alike of A's cgroup somewhere else: listed beside the real one
        std::fs::create_dir_all(r.join(format!("user.slice/user-1000.slice/docker-{A}.scope")))
            .unwrap();
        let found = running_containers(r);
        assert_eq!(
            found,
            [
                RunningContainer {
                    id: B.into(),
                    runtime: "podman".into(),
                    cgroup: format!("/machine.slice/libpod-{B}.scope"),
                },
                RunningContainer {
                    id: A.into(),
                    runtime: "docker".into(),
                    cgroup: format!("/system.slice/docker-{A}.scope"),
                },
                RunningContainer {
                    id: A.into(),
                    runtime: "docker".into(),
                    cgroup: format!("/user.slice/user-1000.slice/docker-{A}.scope"),
                },
            ]
        );
        assert!(running_containers(&r.join("nonexistent")).is_empty());
    }

    #[test]
    fn an_engine_runs_bounded_in_output_and_without_a_shell() {
        // more output than kept: the rest is drained, the process ends
        let (ok, out) = run_engine("sh", &["-c", "yes | head -c 1000000"], 100).unwrap();
        assert!(ok);
        assert_eq!(out.len(), 100);
        // arguments are argv: nothing is interpreted by a shell
        let (ok, out) = run_engine("echo", &["$(id)", ";", "`id`"], 100).unwrap();
        assert!(ok);
        assert_eq!(out, b"$(id) ; `id`\n");
        let (ok, _) = run_engine("false", &[], 100).unwrap();
        assert!(!ok);
        assert!(run_engine("/nonexistent/engine", &[], 100).is_err());
    }
}
