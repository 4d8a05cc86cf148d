//! `--cgroup-glob PATTERN`: every cgroup whose path (relative to the cgroup2
//! mount) matches a glob is selected, with its descendants, e.g. each Podman
//! container (`/libpod_parent/libpod-*`, `/machine.slice/libpod-*.scope`),
//! each Docker container (`/system.slice/docker-*.scope`) or each Kubernetes
//! pod (`/kubepods/**/pod*`). The tree is rescanned while the daemon runs, so
//! containers that start later are selected as they appear.
//!
//! `*` and `?` stay inside one path component; `**` spans components. A match
//! is not descended into: its descendants are selected with it.

use kya_common::maps::KYA_MAX_SEL_CGROUPS;
use std::path::{Path, PathBuf};

/// Deepest cgroup level looked at (Kubernetes and rootless Podman nest 4 to 7).
const MAX_DEPTH: usize = 16;
/// Most cgroup directories looked at in one scan.
const MAX_DIRS: usize = 200_000;
/// Most cgroups one scan selects (the kernel's selection map holds
/// `KYA_MAX_SEL_CGROUPS`, shared with the other cgroup selectors).
const MAX_MATCHES: usize = KYA_MAX_SEL_CGROUPS as usize / 2;

/// Why a cgroup glob is refused.
#[derive(Debug, thiserror::Error)]
pub enum CgroupGlobError {
    #[error("cgroup glob {0:?} must start with '/' and must not contain '..' or NUL")]
    Path(String),
    #[error("cgroup glob {pattern:?}: {source}")]
    Glob {
        pattern: String,
        source: globset::Error,
    },
}

/// The operator's cgroup globs, compiled.
#[derive(Debug, Clone)]
pub struct CgroupGlobs {
    set: globset::GlobSet,
    patterns: Vec<String>,
}

impl CgroupGlobs {
    pub fn new(patterns: &[String]) -> Result<Self, CgroupGlobError> {
        let mut b = globset::GlobSetBuilder::new();
        for p in patterns {
            if !p.starts_with('/') || p.contains('\0') || p.split('/').any(|c| c == "..") {
                return Err(CgroupGlobError::Path(p.clone()));
            }
            let g = globset::GlobBuilder::new(p)
                .literal_separator(true)
                .build()
                .map_err(|source| CgroupGlobError::Glob {
                    pattern: p.clone(),
                    source,
                })?;
            b.add(g);
        }
        let set = b.build().map_err(|source| CgroupGlobError::Glob {
            pattern: patterns.join(", "),
            source,
        })?;
        Ok(Self {
            set,
            patterns: patterns.to_vec(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The cgroups (paths relative to `cgroup2`, sorted) that match now; a
    /// match's descendants are not listed (they are selected with it).
    pub fn scan(&self, cgroup2: &Path) -> Vec<String> {
        let mut out = Vec::new();
        if self.is_empty() {
            return out;
        }
        let mut stack: Vec<(PathBuf, usize)> = vec![(cgroup2.to_path_buf(), 0)];
        let mut seen = 0usize;
        while let Some((dir, depth)) = stack.pop() {
            seen += 1;
            if seen > MAX_DIRS {
                tracing::warn!(limit = MAX_DIRS, "cgroup tree too large: glob scan stopped");
                break;
            }
            if depth > 0 {
                let Ok(rel) = dir.strip_prefix(cgroup2) else {
                    continue;
                };
                let Some(rel) = rel.to_str() else { continue };
                let rel = format!("/{rel}");
                if self.set.is_match(&rel) {
                    if out.len() >= MAX_MATCHES {
                        tracing::warn!(
                            limit = MAX_MATCHES,
                            "too many cgroups match the cgroup globs: the rest are not selected"
                        );
                        break;
                    }
                    out.push(rel);
                    continue;
                }
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
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4e8a1b2c3d4e5f60718293a4b5c6d7e8f90123456789abcdef0123456789ab";

    fn globs(p: &[&str]) -> CgroupGlobs {
        CgroupGlobs::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn matches_containers_and_pods_but_not_their_descendants() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        for d in [
            format!("libpod_parent/libpod-{ID}"),
            format!("libpod_parent/libpod-conmon-{ID}"),
            format!("machine.slice/libpod-{ID}.scope/container"),
            format!("system.slice/docker-{ID}.scope"),
            "system.slice/sshd.service".to_string(),
            "kubepods/besteffort/pod1b2c3d4e-5f60-4718-9293-a4b5c6d7e8f9/abc".to_string(),
            "kubepods/pod0b2c3d4e-5f60-4718-9293-a4b5c6d7e8f9".to_string(),
        ] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        assert_eq!(
            globs(&["/libpod_parent/libpod-*", "/*/libpod-*.scope"]).scan(r),
            [
                format!("/libpod_parent/libpod-{ID}"),
                format!("/libpod_parent/libpod-conmon-{ID}"),
                format!("/machine.slice/libpod-{ID}.scope"),
            ]
        );
        assert_eq!(
            globs(&["/kubepods/**/pod*"]).scan(r),
            [
                "/kubepods/besteffort/pod1b2c3d4e-5f60-4718-9293-a4b5c6d7e8f9",
                "/kubepods/pod0b2c3d4e-5f60-4718-9293-a4b5c6d7e8f9",
            ]
        );
        // the systemd driver's layout, as the Kubernetes ConfigMap selects it
        for d in [
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1b2c3d4e_5f60_4718_9293_a4b5c6d7e8f9.slice/cri-containerd-x.scope",
            "kubepods.slice/kubepods-pod0b2c3d4e_5f60_4718_9293_a4b5c6d7e8f9.slice",
            "kubepods.slice/kubepods-burstable.slice",
        ] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        assert_eq!(
            globs(&["/kubepods.slice/**/kubepods-*pod*.slice"]).scan(r),
            [
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1b2c3d4e_5f60_4718_9293_a4b5c6d7e8f9.slice",
                "/kubepods.slice/kubepods-pod0b2c3d4e_5f60_4718_9293_a4b5c6d7e8f9.slice",
            ]
        );
        // `*` does not cross a '/'
        assert!(globs(&["/*-*.scope"]).scan(r).is_empty());
        // the root itself is never a match
        assert!(globs(&["/**"]).scan(r).iter().all(|c| c != "/"));
        assert!(globs(&[]).scan(r).is_empty());
    }

    #[test]
    fn hostile_patterns_are_refused() {
        for bad in ["libpod-*", "/../*", "/a/../../b", "/a\0", ""] {
            assert!(
                matches!(
                    CgroupGlobs::new(&[bad.to_string()]),
                    Err(CgroupGlobError::Path(_))
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            CgroupGlobs::new(&["/a[".to_string()]),
            Err(CgroupGlobError::Glob { .. })
        ));
    }
}
