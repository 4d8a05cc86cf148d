//! `kya policy check`: validate rule files, agent registries and policy tests.
//!
//! Files named explicitly form one policy set (as `--policy A --policy B`
//! would load them); the rule files of each directory (searched recursively)
//! form one set per directory (as `--policy DIR` would load it), so duplicate
//! ids and a second `[defaults]` are found exactly where loading would fail.

use super::diag::{Diagnostic, Diagnostics, Source};
use super::load::{detect_kind, expand, read_source, FileKind};
use super::model::Policy;
use super::registry::Registry;
use super::testfile;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Check `paths`; the result holds errors and warnings.
pub(crate) fn check(paths: &[PathBuf]) -> Diagnostics {
    let mut diags = Diagnostics::default();
    // group key: None = explicit files, Some(dir) = that directory.
    let mut groups: BTreeMap<Option<PathBuf>, Vec<Source>> = BTreeMap::new();
    for p in paths {
        let files = match expand(std::slice::from_ref(p), true) {
            Ok(f) => f,
            Err(d) => {
                diags.extend(d);
                continue;
            }
        };
        if p.is_dir() && files.is_empty() {
            diags.0.push(Diagnostic {
                file: p.display().to_string(),
                line: 1,
                severity: super::Severity::Warning,
                message: "no .toml files here".into(),
            });
        }
        for f in files {
            let group = if p.is_dir() {
                Some(f.parent().map(Path::to_path_buf).unwrap_or_default())
            } else {
                None
            };
            check_file(&f, group, &mut groups, &mut diags);
        }
    }
    for sources in groups.values() {
        if let Err(d) = Policy::from_sources(sources) {
            for e in d.0 {
                if !diags.0.contains(&e) {
                    diags.0.push(e);
                }
            }
        }
    }
    diags
}

fn check_file(
    f: &Path,
    group: Option<PathBuf>,
    groups: &mut BTreeMap<Option<PathBuf>, Vec<Source>>,
    diags: &mut Diagnostics,
) {
    let src = match read_source(f) {
        Ok(s) => s,
        Err(d) => {
            diags.0.push(d);
            return;
        }
    };
    match detect_kind(&src) {
        Err(d) => diags.0.push(d),
        Ok(FileKind::Rules) => groups.entry(group).or_default().push(src),
        Ok(FileKind::Agents) => match Registry::from_source(&src) {
            Ok((_, warnings)) => diags.extend(warnings),
            Err(d) => diags.extend(d),
        },
        Ok(FileKind::Tests) => {
            let dir = f.parent().map(Path::to_path_buf).unwrap_or_default();
            match testfile::parse(&src, &dir) {
                Ok(t) => {
                    // The policy and registry a test file names must load too.
                    if let Some(ps) = &t.policy {
                        if let Err(d) = Policy::load(ps) {
                            diags.0.push(src.error_at(
                                0,
                                format!(
                                    "the policy this test file names does not load: {}",
                                    d.0.first().map(|x| x.to_string()).unwrap_or_default()
                                ),
                            ));
                        }
                    }
                    if let Some(a) = &t.agents {
                        if let Err(d) = Registry::load(a) {
                            diags.0.push(src.error_at(
                                0,
                                format!(
                                    "the registry this test file names does not load: {}",
                                    d.0.first().map(|x| x.to_string()).unwrap_or_default()
                                ),
                            ));
                        }
                    }
                }
                Err(d) => diags.extend(d),
            }
        }
    }
}
