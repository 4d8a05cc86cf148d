//! `--image REF`: every running container whose image matches a reference
//! (`crate::image_ref`) is selected through its cgroup. The cgroup tree is
//! rescanned while the daemon runs (as for the globs): a container seen for
//! the first time has its image asked of its engine once
//! (`crate::container_image`), and is selected when that image matches; one
//! that stops (its cgroup is gone) is dropped. An engine that is absent or
//! fails leaves its containers unselected by image (logged, asked again
//! later); the rest of the selection applies.

use crate::bpf::Redirector;
use crate::container::RunningContainer;
use crate::container_select::{apply, BuildSelection, ContainerCgroups};
use crate::image_ref::{ImageRef, ImageRefError};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// How often the cgroup tree is rescanned for new and stopped containers.
const RESCAN_EVERY: Duration = Duration::from_millis(250);

/// The operator's image references, parsed.
#[derive(Debug, Clone, Default)]
pub(crate) struct ImageSelectors {
    refs: Vec<(String, ImageRef)>,
}

impl ImageSelectors {
    pub(crate) fn new(refs: &[String]) -> Result<Self, ImageRefError> {
        let refs = refs
            .iter()
            .map(|r| Ok((r.clone(), r.parse::<ImageRef>()?)))
            .collect::<Result<_, ImageRefError>>()?;
        Ok(Self { refs })
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.refs.is_empty()
    }

    /// The references (as given) that the image `name`/`id` matches.
    fn matching(&self, name: Option<&str>, id: &str) -> Vec<String> {
        self.refs
            .iter()
            .filter(|(_, r)| r.matches(name, id))
            .map(|(s, _)| s.clone())
            .collect()
    }
}

/// A running container selected by its image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct ImageMatch {
    /// The container id.
    pub(crate) container: String,
    /// Its cgroup, relative to the cgroup2 mount (a container whose id two
    /// cgroups name is matched in each).
    pub(crate) cgroup: String,
    /// Its image, as the engine names it.
    pub(crate) image: Option<String>,
    pub(crate) image_id: String,
    /// The references it matches.
    pub(crate) refs: Vec<String>,
}

/// The running containers whose image matches now (empty without
/// references or without a cgroup2 mount). Blocking: asks the engines about
/// containers not seen before.
pub(crate) fn resolve(selectors: &ImageSelectors) -> Vec<ImageMatch> {
    if selectors.is_empty() {
        return Vec::new();
    }
    match crate::bpf::cgroup2_mount() {
        Ok(m) => {
            let running = crate::container::running_containers(&m);
            let ids: HashSet<&str> = running.iter().map(|c| c.id.as_str()).collect();
            crate::container_image::retain_running(&ids);
            matches_of(selectors, running)
        }
        Err(e) => {
            tracing::error!(error = %e, "no cgroup2 mount: --image cannot be resolved");
            Vec::new()
        }
    }
}

/// Of the `running` containers, those whose image matches (asking the
/// engines about the ones not asked before).
fn matches_of(selectors: &ImageSelectors, running: Vec<RunningContainer>) -> Vec<ImageMatch> {
    let wanted: Vec<(String, String)> = running
        .iter()
        .map(|c| (c.id.clone(), c.runtime.clone()))
        .collect();
    crate::container_image::look_up(&wanted);
    running
        .into_iter()
        .filter_map(|c| {
            let image = crate::container_image::known(&c.id)?;
            let refs = selectors.matching(image.name.as_deref(), &image.id);
            (!refs.is_empty()).then_some(ImageMatch {
                container: c.id,
                cgroup: c.cgroup,
                image: image.name,
                image_id: image.id,
                refs,
            })
        })
        .collect()
}

/// The cgroups of `matches`, sorted, for the selection.
pub(crate) fn cgroups_of(matches: &[ImageMatch]) -> Vec<String> {
    let mut out: Vec<String> = matches.iter().map(|m| m.cgroup.clone()).collect();
    out.sort();
    out.dedup();
    out
}

/// Keeps the kernel's selection in step with the containers whose image
/// matches: each rescan that finds a different set (a container started
/// from a matching image, or one stopped) reapplies the whole selection.
/// `matches` holds the current ones, for `kya status`.
pub(crate) fn spawn_watcher(
    selectors: ImageSelectors,
    matches: Arc<Mutex<Vec<ImageMatch>>>,
    current: Arc<Mutex<ContainerCgroups>>,
    redirector: Arc<Mutex<Option<Redirector>>>,
    build: BuildSelection,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if selectors.is_empty() {
            return;
        }
        let selectors = Arc::new(selectors);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(RESCAN_EVERY) => {}
                _ = stop.changed() => return,
            }
            let s = selectors.clone();
            // an engine may take seconds to answer: a stop does not wait for it
            let found = tokio::select! {
                r = tokio::task::spawn_blocking(move || resolve(&s)) => match r {
                    Ok(f) => f,
                    Err(_) => continue,
                },
                _ = stop.changed() => return,
            };
            let imaged = cgroups_of(&found);
            if let Ok(mut m) = matches.lock() {
                *m = found;
            }
            apply(&current, &redirector, &build, "image matches", |cur| {
                let next = ContainerCgroups {
                    imaged,
                    stale: false,
                    ..cur.clone()
                };
                (next != *cur).then_some(next)
            });
        }
    })
}

/// The `images` section of `kya status`: the references and the containers
/// they select now.
pub(crate) fn status(
    selectors: &ImageSelectors,
    matches: &Mutex<Vec<ImageMatch>>,
) -> serde_json::Value {
    let now = matches.lock().map(|m| m.clone()).unwrap_or_default();
    serde_json::json!({
        "selectors": selectors.refs.iter().map(|(s, _)| s).collect::<Vec<_>>(),
        "containers": now,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_refuse_a_bad_reference() {
        assert!(ImageSelectors::new(&["agent".into(), "Bad".into()]).is_err());
        assert!(ImageSelectors::new(&[]).unwrap().is_empty());
        let s = ImageSelectors::new(&["agent".into(), "localhost/agent:1".into()]).unwrap();
        let id = "d".repeat(64);
        assert_eq!(
            s.matching(Some("localhost/agent:1"), &id),
            ["agent", "localhost/agent:1"]
        );
        assert_eq!(s.matching(Some("localhost/agent:2"), &id), ["agent"]);
        assert!(s.matching(Some("localhost/other:1"), &id).is_empty());
        assert!(s.matching(None, &id).is_empty());
    }

    #[test]
    fn containers_of_unknown_engines_or_images_are_not_selected() {
        // a container of a runtime no engine CLI is asked about
        let running = vec![RunningContainer {
            id: "9".repeat(64),
            runtime: "containerd".into(),
            cgroup: "/kubepods/pod1b2c3d4e-5f60-4718-9293-a4b5c6d7e8f9/x".into(),
        }];
        let s = ImageSelectors::new(&["agent".into()]).unwrap();
        assert!(matches_of(&s, running).is_empty());
        assert!(resolve(&ImageSelectors::default()).is_empty());
    }

    #[test]
    fn the_cgroups_of_matches_are_sorted_once() {
        let m = |c: &str| ImageMatch {
            container: "c".into(),
            cgroup: c.into(),
            image: None,
            image_id: "i".into(),
            refs: vec![],
        };
        assert_eq!(cgroups_of(&[m("/b"), m("/a"), m("/b")]), ["/a", "/b"]);
    }
}
