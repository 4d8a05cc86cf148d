//! The agent registry: which processes are which named agents, and which
//! human owns each (the approver).
//!
//! The registry is the bridge to the control plane: it names agents, gives
//! each an owner and a lifecycle, and says how to recognise its processes.
//! An agent whose owner is gone (no owner, or listed in `departed_owners`) or
//! whose lifecycle window (`created` .. `expires`) does not contain "now" is
//! *orphaned*; the policy's `[defaults] orphaned` verdict (deny by default)
//! applies to its calls. Its selectors also feed the eBPF selection.

use super::diag::{Diagnostic, Diagnostics, Source};
use super::glob::Glob;
use super::load::{detect_kind, read_source, FileKind};
use super::AgentInfo;
use kya_common::ProcessIdentity;
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use time::OffsetDateTime;
use toml::Spanned;

/// The name of a selected process that matches no registered agent.
pub(crate) const UNREGISTERED: &str = "unregistered";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgentFile {
    #[serde(default)]
    agent: Vec<Spanned<RawAgent>>,
    departed_owners: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    name: Spanned<String>,
    owner: Option<String>,
    created: Option<Spanned<toml::Value>>,
    expires: Option<Spanned<toml::Value>>,
    #[serde(rename = "match")]
    selectors: Option<Spanned<RawMatch>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    exe: Option<Spanned<String>>,
    exe_sha256: Option<Spanned<String>>,
    cgroup: Option<Spanned<String>>,
    uid: Option<Spanned<i64>>,
    unit: Option<Spanned<String>>,
}

/// One registered agent. All given selectors must hold for a process to be it.
#[derive(Debug)]
pub struct Agent {
    /// Unique name.
    pub name: String,
    /// Approver (local user / CIBA login_hint).
    pub owner: Option<String>,
    /// Start of its lifecycle.
    pub created: Option<OffsetDateTime>,
    /// End of its lifecycle.
    pub expires: Option<OffsetDateTime>,
    /// Executable path glob.
    pub exe: Option<Glob>,
    /// Lowercase hex SHA-256 of the executable.
    pub exe_sha256: Option<String>,
    /// cgroup v2 path prefix (whole path segments).
    pub cgroup: Option<String>,
    /// Unix uid.
    pub uid: Option<u32>,
    /// systemd unit name (a segment of the cgroup path, e.g. `agent.service`).
    pub unit: Option<String>,
    /// `file:line`.
    pub origin: String,
}

/// What the eBPF selection needs to select every registered agent's processes
/// (a superset: each agent's own selectors, combined with "any match").
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Selectors {
    /// uids.
    pub uids: Vec<u32>,
    /// cgroup path prefixes.
    pub cgroups: Vec<String>,
    /// Executable path globs.
    pub exes: Vec<String>,
    /// systemd units (select via their cgroup).
    pub units: Vec<String>,
}

/// The loaded registry.
#[derive(Debug, Default)]
pub struct Registry {
    agents: Vec<Agent>,
    departed: HashSet<String>,
}

impl Registry {
    /// A registry with no agents: every process is `unregistered`.
    pub fn empty() -> Registry {
        Registry::default()
    }

    /// Load a registry file; warnings are dropped (see [`Registry::load_with_warnings`]).
    pub fn load(path: &Path) -> Result<Registry, Diagnostics> {
        Registry::load_with_warnings(path).map(|(r, _)| r)
    }

    /// Load a registry file, returning its warnings too.
    pub fn load_with_warnings(path: &Path) -> Result<(Registry, Diagnostics), Diagnostics> {
        let src = read_source(path).map_err(|d| Diagnostics(vec![d]))?;
        Registry::from_source(&src)
    }

    /// Compile a registry from text.
    pub fn from_source(src: &Source) -> Result<(Registry, Diagnostics), Diagnostics> {
        match detect_kind(src) {
            Ok(FileKind::Agents) => {}
            Ok(_) => {
                return Err(Diagnostics(vec![src.error_at(
                    0,
                    "this is not an agent registry (expected [[agent]] tables)",
                )]))
            }
            Err(d) => return Err(Diagnostics(vec![d])),
        }
        let raw: RawAgentFile =
            toml::from_str(&src.text).map_err(|e| Diagnostics(vec![src.toml_error(&e)]))?;
        let mut errors = Vec::new();
        let mut warnings = Vec::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut agents = Vec::new();
        for a in raw.agent {
            let start = a.span().start;
            let a = a.into_inner();
            match compile_agent(src, start, a, &mut errors, &mut warnings) {
                Some(agent) => {
                    if let Some(line) = names.get(&agent.name) {
                        errors.push(src.error_at(
                            start,
                            format!(
                                "duplicate agent name {:?} (first at line {line})",
                                agent.name
                            ),
                        ));
                    } else {
                        names.insert(agent.name.clone(), src.line_of(start));
                        agents.push(agent);
                    }
                }
                None => continue,
            }
        }
        if !errors.is_empty() {
            return Err(Diagnostics(errors));
        }
        Ok((
            Registry {
                agents,
                departed: raw
                    .departed_owners
                    .unwrap_or_default()
                    .into_iter()
                    .collect(),
            },
            Diagnostics(warnings),
        ))
    }

    /// The registered agents, in file order.
    pub fn agents(&self) -> &[Agent] {
        &self.agents
    }

    /// Who is this process? The first agent (file order) whose selectors all
    /// hold; otherwise `unregistered`.
    pub fn resolve(&self, p: &ProcessIdentity, now: OffsetDateTime) -> AgentInfo {
        for a in &self.agents {
            if self.matches(a, p) {
                return self.info(a, now);
            }
        }
        AgentInfo::unregistered()
    }

    /// An agent by name (for call descriptions that name their agent).
    pub fn by_name(&self, name: &str, now: OffsetDateTime) -> Option<AgentInfo> {
        self.agents
            .iter()
            .find(|a| a.name == name)
            .map(|a| self.info(a, now))
    }

    fn info(&self, a: &Agent, now: OffsetDateTime) -> AgentInfo {
        let owner_gone = match &a.owner {
            None => true,
            Some(o) => o.trim().is_empty() || self.departed.contains(o),
        };
        let not_yet = a.created.is_some_and(|c| now < c);
        let expired = a.expires.is_some_and(|e| now >= e);
        AgentInfo {
            name: a.name.clone(),
            owner: a.owner.clone().filter(|o| !o.trim().is_empty()),
            orphaned: owner_gone || not_yet || expired,
        }
    }

    fn matches(&self, a: &Agent, p: &ProcessIdentity) -> bool {
        if a.uid.is_some_and(|u| u != p.uid) {
            return false;
        }
        if let Some(prefix) = &a.cgroup {
            if !cgroup_has_prefix(&p.cgroup, prefix) {
                return false;
            }
        }
        if let Some(unit) = &a.unit {
            if !p.cgroup.split('/').any(|seg| seg == unit) {
                return false;
            }
        }
        if let Some(g) = &a.exe {
            if p.exe.is_empty() || !g.matches(&p.exe) {
                return false;
            }
        }
        if let Some(want) = &a.exe_sha256 {
            match self.exe_hash(p) {
                Some(h) if &h == want => {}
                _ => return false,
            }
        }
        true
    }

    /// SHA-256 of the process's executable (see [`crate::exe_digest`]: only
    /// the very file the kernel recorded at connect, cached process-wide by
    /// (device, inode, size, mtime), usually computed as the connection
    /// arrived).
    pub fn exe_hash(&self, p: &ProcessIdentity) -> Option<String> {
        crate::exe_digest::digest(p)
    }

    /// Everything the eBPF selection must cover so every registered agent is selected.
    pub fn selectors(&self) -> Selectors {
        let mut s = Selectors::default();
        for a in &self.agents {
            if let Some(u) = a.uid {
                if !s.uids.contains(&u) {
                    s.uids.push(u);
                }
            }
            if let Some(c) = &a.cgroup {
                if !s.cgroups.contains(c) {
                    s.cgroups.push(c.clone());
                }
            }
            if let Some(e) = &a.exe {
                if !s.exes.iter().any(|x| x == e.as_str()) {
                    s.exes.push(e.as_str().to_string());
                }
            }
            if let Some(u) = &a.unit {
                if !s.units.contains(u) {
                    s.units.push(u.clone());
                }
            }
        }
        s
    }
}

fn cgroup_has_prefix(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

fn compile_agent(
    src: &Source,
    start: usize,
    a: RawAgent,
    errors: &mut Vec<Diagnostic>,
    warnings: &mut Vec<Diagnostic>,
) -> Option<Agent> {
    let before = errors.len();
    let name = a.name.get_ref().clone();
    if name.is_empty()
        || name.len() > 128
        || name.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        errors.push(src.error_at(a.name.span().start, format!("invalid agent name {name:?}")));
    }
    if name == UNREGISTERED {
        errors.push(src.error_at(
            a.name.span().start,
            "\"unregistered\" is reserved for processes that match no agent",
        ));
    }
    let created = a.created.as_ref().and_then(|v| date(src, v, errors));
    let expires = a.expires.as_ref().and_then(|v| date(src, v, errors));
    if let (Some(c), Some(e)) = (created, expires) {
        if e <= c {
            errors.push(src.error_at(
                start,
                format!("agent {name:?} expires before it is created"),
            ));
        }
    }
    let m = match a.selectors {
        Some(m) => m.into_inner(),
        None => {
            errors.push(src.error_at(
                start,
                format!("agent {name:?} has no match = {{...}} selectors (it would match every process)"),
            ));
            return None;
        }
    };
    let exe = m.exe.as_ref().and_then(|e| {
        if !e.get_ref().starts_with('/') {
            errors.push(src.error_at(e.span().start, "match.exe must be an absolute path (glob)"));
            return None;
        }
        Glob::new(e.get_ref())
            .map_err(|err| errors.push(src.error_at(e.span().start, format!("bad glob: {err}"))))
            .ok()
    });
    let exe_sha256 = m.exe_sha256.as_ref().and_then(|h| {
        let v = h.get_ref().to_ascii_lowercase();
        if v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()) {
            Some(v)
        } else {
            errors.push(src.error_at(h.span().start, "match.exe_sha256 must be 64 hex digits"));
            None
        }
    });
    let cgroup = m.cgroup.as_ref().and_then(|c| {
        if c.get_ref().starts_with('/') {
            Some(c.get_ref().clone())
        } else {
            errors.push(src.error_at(
                c.span().start,
                "match.cgroup must start with / (a path below the cgroup2 mount)",
            ));
            None
        }
    });
    let uid = m
        .uid
        .as_ref()
        .and_then(|u| match u32::try_from(*u.get_ref()) {
            Ok(u) => Some(u),
            Err(_) => {
                errors.push(src.error_at(u.span().start, "match.uid must be 0..4294967295"));
                None
            }
        });
    let unit = m.unit.as_ref().and_then(|u| {
        let v = u.get_ref();
        if v.is_empty() || v.contains('/') {
            errors.push(src.error_at(
                u.span().start,
                "match.unit must be a unit name like agent.service",
            ));
            None
        } else {
            Some(v.clone())
        }
    });
    if m.exe.is_none()
        && m.exe_sha256.is_none()
        && m.cgroup.is_none()
        && m.uid.is_none()
        && m.unit.is_none()
    {
        errors.push(src.error_at(
            start,
            format!("agent {name:?} has an empty match (it would match every process)"),
        ));
    }
    if errors.len() != before {
        return None;
    }
    if (exe.is_some() || exe_sha256.is_some())
        && uid.is_none()
        && cgroup.is_none()
        && unit.is_none()
    {
        warnings.push(src.warning_at(
            start,
            format!("agent {name:?} is matched by exe alone: any user could run that binary; add uid, cgroup or unit"),
        ));
    }
    Some(Agent {
        name,
        owner: a.owner,
        created,
        expires,
        exe,
        exe_sha256,
        cgroup,
        uid,
        unit,
        origin: format!("{}:{}", src.name, src.line_of(start)),
    })
}

fn date(
    src: &Source,
    v: &Spanned<toml::Value>,
    errors: &mut Vec<Diagnostic>,
) -> Option<OffsetDateTime> {
    let text = match v.get_ref() {
        toml::Value::String(s) => s.clone(),
        toml::Value::Datetime(d) => d.to_string(),
        _ => {
            errors.push(src.error_at(v.span().start, "expected a date like \"2026-11-01\""));
            return None;
        }
    };
    match parse_date(&text) {
        Some(d) => Some(d),
        None => {
            errors.push(src.error_at(
                v.span().start,
                format!("bad date {text:?}: expected YYYY-MM-DD or RFC 3339"),
            ));
            None
        }
    }
}

/// `YYYY-MM-DD` (midnight UTC) or an RFC 3339 timestamp.
pub(crate) fn parse_date(s: &str) -> Option<OffsetDateTime> {
    use time::format_description::well_known::Rfc3339;
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Some(t);
    }
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    time::Date::parse(s, &fmt)
        .ok()
        .map(|d| d.midnight().assume_utc())
}
