//! Rule index: the rules that *can* match a call's method, tool and server.
//!
//! A call evaluates only its candidates (full matching, including CEL, happens
//! in the engine), so a 10,000-rule policy costs a handful of hash lookups plus
//! the few rules about this tool, not 10,000 CEL evaluations. Rules are keyed by
//! their most selective pattern: the tool glob if any, else the server glob,
//! else they are candidates for every call of their method.

use super::glob::Glob;
use super::rule::Rule;
use std::collections::HashMap;

/// Globs keyed for lookup: exact names, literal prefixes, literal suffixes, rest.
#[derive(Debug, Default)]
struct GlobIndex {
    exact: HashMap<String, Vec<u32>>,
    prefix: HashMap<String, Vec<u32>>,
    prefix_lens: Vec<usize>,
    suffix: HashMap<String, Vec<u32>>,
    suffix_lens: Vec<usize>,
    rest: Vec<u32>,
}

impl GlobIndex {
    fn insert(&mut self, glob: &Glob, rule: u32) {
        if let Some(exact) = glob.exact() {
            self.exact.entry(exact.to_string()).or_default().push(rule);
        } else if !glob.literal_prefix().is_empty() {
            let p = glob.literal_prefix();
            if !self.prefix_lens.contains(&p.len()) {
                self.prefix_lens.push(p.len());
            }
            self.prefix.entry(p.to_string()).or_default().push(rule);
        } else if !glob.literal_suffix().is_empty() {
            let s = glob.literal_suffix();
            if !self.suffix_lens.contains(&s.len()) {
                self.suffix_lens.push(s.len());
            }
            self.suffix.entry(s.to_string()).or_default().push(rule);
        } else {
            self.rest.push(rule);
        }
    }

    /// Rules whose glob may match `text` (a superset; `text` already folded).
    fn candidates(&self, text: &str, out: &mut Vec<u32>) {
        if let Some(v) = self.exact.get(text) {
            out.extend_from_slice(v);
        }
        for &len in &self.prefix_lens {
            if let Some(p) = text.get(..len) {
                if let Some(v) = self.prefix.get(p) {
                    out.extend_from_slice(v);
                }
            }
        }
        for &len in &self.suffix_lens {
            if let Some(start) = text.len().checked_sub(len) {
                if let Some(s) = text.get(start..) {
                    if let Some(v) = self.suffix.get(s) {
                        out.extend_from_slice(v);
                    }
                }
            }
        }
        out.extend_from_slice(&self.rest);
    }
}

/// Rules of one method bucket.
#[derive(Debug, Default)]
struct MethodIndex {
    by_tool: GlobIndex,
    by_server: GlobIndex,
    always: Vec<u32>,
}

impl MethodIndex {
    fn insert(&mut self, rule: &Rule, i: u32) {
        if let Some(tool) = &rule.tool {
            self.by_tool.insert(tool, i);
        } else if let Some(server) = &rule.server {
            self.by_server.insert(server, i);
        } else {
            self.always.push(i);
        }
    }

    fn candidates(&self, tool: Option<&str>, server: &str, out: &mut Vec<u32>) {
        // A rule with a tool pattern never matches a call without a tool.
        if let Some(tool) = tool {
            self.by_tool.candidates(tool, out);
        }
        self.by_server.candidates(server, out);
        out.extend_from_slice(&self.always);
    }
}

/// The index over a policy's rules.
#[derive(Debug, Default)]
pub(crate) struct RuleIndex {
    by_method: HashMap<String, MethodIndex>,
    any_method: MethodIndex,
}

impl RuleIndex {
    /// Index `rules` (their positions are the ids returned by lookups).
    pub(crate) fn build(rules: &[Rule]) -> RuleIndex {
        let mut idx = RuleIndex::default();
        for (i, rule) in rules.iter().enumerate() {
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            match rule.method.exact() {
                Some(m) => idx
                    .by_method
                    .entry(m.to_string())
                    .or_default()
                    .insert(rule, i),
                None => idx.any_method.insert(rule, i),
            }
        }
        idx
    }

    /// Candidate rule positions, sorted in load order. `server` must be
    /// normalised (lowercase, no port).
    pub(crate) fn candidates(&self, method: &str, tool: Option<&str>, server: &str) -> Vec<u32> {
        let mut out = Vec::new();
        if let Some(m) = self.by_method.get(method) {
            m.candidates(tool, server, &mut out);
        }
        self.any_method.candidates(tool, server, &mut out);
        out.sort_unstable();
        out.dedup();
        out
    }
}
