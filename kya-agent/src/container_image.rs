//! The image each container runs, as its engine names it, and the image's
//! id: asked of the engine's CLI (Podman for `libpod-` cgroups, Docker for
//! `docker-` ones) off the async workers, bounded in time and output, its
//! answer parsed strictly, and cached by container id. A container is asked
//! about once (when `--image` selection first sees it, or when its first
//! connection arrives); decisions only read the cache, never wait for an
//! engine: until the answer is in, the image is unknown (empty to policy).
//! Containers of containerd and CRI-O have no engine CLI asked about them:
//! their image is the one their pod's status reports, when the Kubernetes
//! pod watch runs (`crate::kube::names`).

use kya_common::ProcessIdentity;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Most containers whose image is remembered; past it the cache starts over.
const MAX_CACHED: usize = 4096;
/// Most ids asked of an engine in one call.
const CHUNK: usize = 32;
/// Most bytes of an engine's answer read (one line is about 200 bytes).
const MAX_ANSWER: usize = 1 << 20;
/// Longest answer line looked at.
const MAX_LINE: usize = 1024;
/// Most lookups started by arriving connections at once.
const MAX_PREWARMS: usize = 4;
/// First wait before asking again about a container the engine did not
/// answer for; doubled on each miss up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(60);

/// A container's image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct ContainerImage {
    /// As the engine names it (`localhost/agent:1.2`); `None` when it gives
    /// no usable name (an untagged image).
    pub(crate) name: Option<String>,
    /// The image id: 64 lowercase hex digits.
    pub(crate) id: String,
}

#[derive(Debug, Clone)]
enum Entry {
    Known(ContainerImage),
    /// Being asked now.
    Pending,
    /// Not answered: ask again after `retry_at`.
    Unknown {
        retry_at: Instant,
        wait: Duration,
    },
}

fn cache() -> &'static Mutex<HashMap<String, Entry>> {
    static CACHE: OnceLock<Mutex<HashMap<String, Entry>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

fn lock() -> std::sync::MutexGuard<'static, HashMap<String, Entry>> {
    cache().lock().unwrap_or_else(|e| e.into_inner())
}

/// The engine whose CLI knows the containers of `runtime`.
fn engine_of(runtime: &str) -> Option<&'static str> {
    match runtime {
        "podman" => Some("podman"),
        "docker" => Some("docker"),
        _ => None,
    }
}

/// The `container inspect` template of `engine`: id, image name, image id,
/// separated by single spaces (none of them may hold one).
fn template_of(engine: &str) -> &'static str {
    match engine {
        "docker" => "{{.Id}} {{.Config.Image}} {{.Image}}",
        _ => "{{.Id}} {{.ImageName}} {{.Image}}",
    }
}

/// The image of container `id`, when known now (never blocks on an engine):
/// as its engine answered, or else as its pod's status reports it.
pub(crate) fn known(id: &str) -> Option<ContainerImage> {
    match lock().get(id) {
        Some(Entry::Known(i)) => Some(i.clone()),
        _ => crate::kube::names::image_of(id),
    }
}

/// `p` with its container's image, when `p` is in a container whose image
/// is known now and not yet in `p`; `None` when nothing would change.
pub(crate) fn enrich(p: &ProcessIdentity) -> Option<ProcessIdentity> {
    let c = p.container.as_ref()?;
    if c.image_id.is_some() {
        return None;
    }
    let i = known(&c.id)?;
    let mut p = p.clone();
    if let Some(c) = p.container.as_mut() {
        c.image = i.name;
        c.image_id = Some(i.id);
    }
    Some(p)
}

/// As a connection arrives: ask the engine for its container's image off
/// the async workers, unless known, being asked, or asked recently.
pub(crate) fn prewarm(p: &ProcessIdentity) {
    static RUNNING: AtomicUsize = AtomicUsize::new(0);
    let Some(c) = p.container.as_ref() else {
        return;
    };
    if c.image_id.is_some() || engine_of(&c.runtime).is_none() {
        return;
    }
    if tokio::runtime::Handle::try_current().is_err() {
        return;
    }
    if known(&c.id).is_some() {
        return;
    }
    // a slot first: a container marked as being asked must be asked
    if RUNNING.fetch_add(1, Ordering::AcqRel) >= MAX_PREWARMS {
        RUNNING.fetch_sub(1, Ordering::AcqRel);
        return;
    }
    let wanted = vec![(c.id.clone(), c.runtime.clone())];
    tokio::task::spawn_blocking(move || {
        look_up(&wanted);
        RUNNING.fetch_sub(1, Ordering::AcqRel);
    });
}

/// Of `wanted` (container id, runtime), those to ask about now, marked as
/// being asked.
fn due(wanted: &[(String, String)]) -> Vec<(String, &'static str)> {
    let now = Instant::now();
    let mut map = lock();
    let mut out = Vec::new();
    for (id, runtime) in wanted {
        let Some(engine) = engine_of(runtime) else {
            continue;
        };
        let ask = match map.get(id) {
            None => true,
            Some(Entry::Unknown { retry_at, .. }) => *retry_at <= now,
            Some(Entry::Known(_) | Entry::Pending) => false,
        };
        if ask {
            if map.len() >= MAX_CACHED && !map.contains_key(id) {
                map.retain(|_, e| matches!(e, Entry::Pending));
            }
            map.insert(id.clone(), Entry::Pending);
            out.push((id.clone(), engine));
        }
    }
    out
}

/// Asks the engines about the containers of `wanted` (container id,
/// runtime) that are due, and caches the answers. Blocking: run it off the
/// async workers. An engine that is absent or fails is logged; its
/// containers are asked again later.
pub(crate) fn look_up(wanted: &[(String, String)]) {
    let asked = due(wanted);
    let mut by_engine: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (id, engine) in asked {
        by_engine.entry(engine).or_default().push(id);
    }
    for (engine, ids) in by_engine {
        for chunk in ids.chunks(CHUNK) {
            let answered = ask(engine, chunk);
            let now = Instant::now();
            let mut map = lock();
            for id in chunk {
                match answered.get(id) {
                    Some(image) => {
                        tracing::debug!(%engine, container = %id, image = ?image.name, image_id = %image.id, "container image known");
                        map.insert(id.clone(), Entry::Known(image.clone()));
                    }
                    None => {
                        let wait = match map.get(id) {
                            Some(Entry::Unknown { wait, .. }) => (*wait * 2).min(MAX_RETRY),
                            _ => FIRST_RETRY,
                        };
                        map.insert(
                            id.clone(),
                            Entry::Unknown {
                                retry_at: now + wait,
                                wait,
                            },
                        );
                    }
                }
            }
        }
    }
}

/// `ENGINE container inspect --format TEMPLATE -- IDS`: the images of the
/// containers it knows among `ids` (it exits non-zero when it does not know
/// one, and still answers for the others).
fn ask(engine: &str, ids: &[String]) -> HashMap<String, ContainerImage> {
    let mut args = vec![
        "container",
        "inspect",
        "--format",
        template_of(engine),
        "--",
    ];
    args.extend(ids.iter().map(String::as_str));
    match crate::container::run_engine(engine, &args, MAX_ANSWER) {
        Ok((ok, out)) => {
            let asked: HashSet<&str> = ids.iter().map(String::as_str).collect();
            let found = parse_answer(&String::from_utf8_lossy(&out), &asked);
            if !ok && found.is_empty() {
                tracing::info!(%engine, containers = ids.len(), "the engine knows none of these containers; their image is unknown");
            }
            found
        }
        Err(e) => {
            // said once per engine and error: it is asked again and again
            static SAID: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
            let first = SAID
                .get_or_init(Default::default)
                .lock()
                .map(|mut said| said.len() < 64 && said.insert(format!("{engine}: {e}")))
                .unwrap_or(true);
            if first {
                tracing::warn!(%engine, error = %e, "cannot ask the container engine for images; they stay unknown for now");
            } else {
                tracing::debug!(%engine, error = %e, "cannot ask the container engine for images");
            }
            HashMap::new()
        }
    }
}

/// Parses an engine's answer: lines of `ID NAME IMAGE_ID` for the `asked`
/// ids only. A malformed line, a line about an id not asked, or two
/// different answers for one id are skipped with a warning.
fn parse_answer(out: &str, asked: &HashSet<&str>) -> HashMap<String, ContainerImage> {
    let mut answers = Vec::new();
    for line in out.lines() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            continue;
        }
        let Some((id, image)) = parse_line(line) else {
            tracing::warn!(
                line = %line.chars().take(120).collect::<String>().escape_debug(),
                "malformed line in the container engine's answer: skipped"
            );
            continue;
        };
        if !asked.contains(id.as_str()) {
            tracing::warn!(container = %id, "the container engine answered for a container not asked about: skipped");
            continue;
        }
        answers.push((id, image));
    }
    unambiguous(answers, "the container engine")
}

/// The images of `answers` by container id. An id given two different
/// images is an answer kya cannot trust: it gets neither (logged, naming
/// `source`).
pub(crate) fn unambiguous(
    answers: impl IntoIterator<Item = (String, ContainerImage)>,
    source: &str,
) -> HashMap<String, ContainerImage> {
    let mut found: HashMap<String, ContainerImage> = HashMap::new();
    let mut conflicting: HashSet<String> = HashSet::new();
    for (id, image) in answers {
        match found.get(&id) {
            Some(prev) if *prev != image => {
                tracing::warn!(%source, container = %id, "two images for one container: neither is used");
                conflicting.insert(id);
            }
            Some(_) => {}
            None => {
                found.insert(id, image);
            }
        }
    }
    for id in conflicting {
        found.remove(&id);
    }
    found
}

/// One answer line: a full container id, the image's name (or a
/// placeholder for none), its id (optionally `sha256:`).
fn parse_line(line: &str) -> Option<(String, ContainerImage)> {
    if line.len() > MAX_LINE {
        return None;
    }
    let mut fields = line.split(' ');
    let (id, name, image_id) = (fields.next()?, fields.next()?, fields.next()?);
    if fields.next().is_some() || !is_full_id(id) {
        return None;
    }
    let image_id = image_id.strip_prefix("sha256:").unwrap_or(image_id);
    if !is_full_id(image_id) {
        return None;
    }
    let name = match name {
        "" | "<none>" | "<none>:<none>" => None,
        n if crate::image_ref::is_image_name(n) => Some(n.to_string()),
        // an image run by its id: no name
        n if is_full_id(n.strip_prefix("sha256:").unwrap_or(n)) => None,
        _ => return None,
    };
    Some((
        id.to_string(),
        ContainerImage {
            name,
            id: image_id.to_string(),
        },
    ))
}

/// A full container or image id: 64 lowercase hex digits.
pub(crate) fn is_full_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Forgets the containers not in `running` (stopped ones).
pub(crate) fn retain_running(running: &HashSet<&str>) {
    lock().retain(|id, e| matches!(e, Entry::Pending) || running.contains(id.as_str()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use kya_common::ContainerIdentity;

    const C1: &str = "a6d0922ee25759935500b1ac114c202d5e4ed54072824888b41044039ff794b4";
    const C2: &str = "3f4e8a1b2c3d4e5f60718293a4b5c6d7e8f90123456789abcdef0123456789ab";
    const I1: &str = "dec98d5f5d7686bb20a235ee4b98429239e2b492231e028f5fb453a7a2362229";
    const I2: &str = "0000000000000000000000000000000000000000000000000000000000000002";

    fn asked<'a>(ids: &[&'a str]) -> HashSet<&'a str> {
        ids.iter().copied().collect()
    }

    #[test]
    fn answers_of_podman_and_docker_parse() {
        let out = format!("{C1} localhost/kya-test-img:latest {I1}\n{C2} alpine sha256:{I2}\n");
        let found = parse_answer(&out, &asked(&[C1, C2]));
        assert_eq!(
            found[C1],
            ContainerImage {
                name: Some("localhost/kya-test-img:latest".into()),
                id: I1.into()
            }
        );
        assert_eq!(found[C2].name.as_deref(), Some("alpine"));
        assert_eq!(found[C2].id, I2);
        // no usable name: known by its id
        for none in ["<none>", "<none>:<none>", "", I1, &format!("sha256:{I1}")] {
            let found = parse_answer(&format!("{C1} {none} {I1}"), &asked(&[C1]));
            assert_eq!(found[C1].name, None, "{none:?}");
            assert_eq!(found[C1].id, I1);
        }
    }

    #[test]
    fn an_absent_or_failing_engine_answers_nothing() {
        let ids = vec![C1.to_string()];
        assert!(ask("/nonexistent/podman", &ids).is_empty());
        assert!(ask("false", &ids).is_empty());
    }

    #[test]
    fn malformed_hostile_and_duplicate_answers_are_skipped() {
        let a = asked(&[C1, C2]);
        for bad in [
            format!("{C1} localhost/img:1"),
            format!("{C1} localhost/img:1 {I1} extra"),
            format!("{C1}  localhost/img:1 {I1}"),
            format!("{C1}\tlocalhost/img:1\t{I1}"),
            format!("{} localhost/img:1 {I1}", &C1[..12]),
            format!("{} localhost/img:1 {I1}", C1.to_uppercase()),
            format!("{C1} localhost/img:1 {}", &I1[..63]),
            format!("{C1} localhost/img:1 sha512:{I1}"),
            format!("{C1} localhost/Img:1 {I1}"),
            format!("{C1} img;id {I1}"),
            format!("{C1} $(id) {I1}"),
            format!("{C1} img\u{1b}[31m {I1}"),
            format!("{C1} {} {I1}", "a".repeat(2000)),
            "Error: no such container".to_string(),
            "\0\0\0".to_string(),
        ] {
            assert!(parse_answer(&bad, &a).is_empty(), "{bad:?}");
        }
        // an answer about a container not asked about
        let other = "1".repeat(64);
        assert!(parse_answer(&format!("{other} img {I1}"), &a).is_empty());
        // the same answer twice is one; two different ones are none
        let twice = format!("{C1} img:1 {I1}\n{C1} img:1 {I1}\n{C2} img:2 {I2}\n");
        let found = parse_answer(&twice, &a);
        assert_eq!(found.len(), 2);
        let conflict = format!("{C1} img:1 {I1}\n{C2} img:2 {I2}\n{C1} img:1 {I2}\n");
        let found = parse_answer(&conflict, &a);
        assert_eq!(found.keys().collect::<Vec<_>>(), [&C2.to_string()]);
        // good lines among bad ones, CRLF endings, a huge answer
        let mut huge = String::from("garbage\r\n");
        huge.push_str(&format!("{C2} img:2 {I2}\r\n"));
        for _ in 0..20_000 {
            huge.push_str("x y z\n");
        }
        let found = parse_answer(&huge, &a);
        assert_eq!(found[C2].id, I2);
        assert_eq!(found.len(), 1);
    }

    #[test]
    fn the_cache_completes_processes_and_asks_each_container_once() {
        let id = "5".repeat(64);
        let c = ContainerIdentity {
            id: id.clone(),
            runtime: "podman".into(),
            ..Default::default()
        };
        let p = ProcessIdentity {
            pid: 1,
            container: Some(c),
            ..Default::default()
        };
        assert_eq!(enrich(&p), None, "unknown: nothing to add");
        lock().insert(
            id.clone(),
            Entry::Known(ContainerImage {
                name: Some("localhost/agent:1".into()),
                id: I1.into(),
            }),
        );
        let e = enrich(&p).expect("known");
        let ec = e.container.as_ref().expect("container");
        assert_eq!(ec.image.as_deref(), Some("localhost/agent:1"));
        assert_eq!(ec.image_id.as_deref(), Some(I1));
        assert_eq!(enrich(&e), None, "already complete");
        assert_eq!(enrich(&ProcessIdentity::default()), None, "no container");

        // not answered for: asked again only later
        let id = "6".repeat(64);
        let wanted = vec![(id.clone(), "podman".to_string())];
        assert_eq!(due(&wanted).len(), 1);
        assert!(due(&wanted).is_empty(), "being asked");
        lock().insert(
            id.clone(),
            Entry::Unknown {
                retry_at: Instant::now() + Duration::from_secs(60),
                wait: FIRST_RETRY,
            },
        );
        assert!(due(&wanted).is_empty(), "asked recently");
        // runtimes without a known engine are never asked
        assert!(due(&[("7".repeat(64), "containerd".to_string())]).is_empty());

        // stopped containers are forgotten (one being asked about stays)
        let pending = "8".repeat(64);
        assert_eq!(due(&[(pending.clone(), "docker".to_string())]).len(), 1);
        retain_running(&HashSet::new());
        assert_eq!(known(&"5".repeat(64)), None);
        assert!(lock().contains_key(&pending));
        assert!(!lock().contains_key(&id));
    }
}
