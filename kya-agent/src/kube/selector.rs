//! Kubernetes label selectors (the `labelSelector` query syntax): `k=v`,
//! `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`, joined by
//! commas; every requirement must hold.

use std::collections::BTreeMap;

/// Longest selector accepted.
const MAX_LEN: usize = 4096;
/// Longest key (a 253-character prefix, `/`, a 63-character name).
const MAX_KEY: usize = 317;
/// Longest value.
const MAX_VALUE: usize = 63;

/// Why a selector is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectorError {
    #[error("label selector is longer than {MAX_LEN} bytes")]
    TooLong,
    #[error("label selector requirement {0:?} is not one Kubernetes accepts")]
    Bad(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Req {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    Absent(String),
}

/// A parsed label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelSelector(Vec<Req>);

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        if s.len() > MAX_LEN {
            return Err(SelectorError::TooLong);
        }
        let mut reqs = Vec::new();
        for part in split_top(s) {
            let p = part.trim();
            let bad = || SelectorError::Bad(p.to_string());
            if p.is_empty() {
                return Err(bad());
            }
            let req = if let Some(k) = p.strip_prefix('!') {
                Req::Absent(key(k.trim()).ok_or_else(bad)?)
            } else if let Some((k, v)) = p.split_once("!=") {
                Req::Ne(
                    key(k.trim()).ok_or_else(bad)?,
                    value(v.trim()).ok_or_else(bad)?,
                )
            } else if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
                Req::Eq(
                    key(k.trim()).ok_or_else(bad)?,
                    value(v.trim()).ok_or_else(bad)?,
                )
            } else if let Some((k, set)) = set_op(p, " notin ") {
                Req::NotIn(key(k).ok_or_else(bad)?, values(set).ok_or_else(bad)?)
            } else if let Some((k, set)) = set_op(p, " in ") {
                Req::In(key(k).ok_or_else(bad)?, values(set).ok_or_else(bad)?)
            } else {
                Req::Exists(key(p).ok_or_else(bad)?)
            };
            reqs.push(req);
        }
        Ok(Self(reqs))
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Req::Eq(k, v) => labels.get(k) == Some(v),
            Req::Ne(k, v) => labels.get(k) != Some(v),
            Req::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Req::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Req::Exists(k) => labels.contains_key(k),
            Req::Absent(k) => !labels.contains_key(k),
        })
    }
}

/// Split at commas outside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

/// `key OP (a,b)`.
fn set_op<'a>(p: &'a str, op: &str) -> Option<(&'a str, &'a str)> {
    let (k, rest) = p.split_once(op)?;
    let set = rest.trim().strip_prefix('(')?.strip_suffix(')')?;
    Some((k.trim(), set))
}

fn values(set: &str) -> Option<Vec<String>> {
    if set.trim().is_empty() {
        return None;
    }
    let vs: Option<Vec<String>> = set.split(',').map(|v| value(v.trim())).collect();
    vs.filter(|v| !v.is_empty())
}

/// `[prefix/]name`: the prefix a DNS subdomain, the name 1-63 of
/// `[A-Za-z0-9._-]` starting and ending alphanumeric.
fn key(k: &str) -> Option<String> {
    if k.is_empty() || k.len() > MAX_KEY {
        return None;
    }
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if let Some(p) = prefix {
        let ok = !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            });
        if !ok {
            return None;
        }
    }
    (!name.is_empty() && name_ok(name)).then(|| k.to_string())
}

/// A label value: empty, or a name.
fn value(v: &str) -> Option<String> {
    (v.is_empty() || name_ok(v)).then(|| v.to_string())
}

fn name_ok(n: &str) -> bool {
    let b = n.as_bytes();
    n.len() <= MAX_VALUE
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn every_kind_of_requirement() {
        let l = labels(&[
            ("app", "agent"),
            ("tier", "llm"),
            ("example.com/owner", "ana"),
        ]);
        for (sel, want) in [
            ("app=agent", true),
            ("app==agent", true),
            ("app!=agent", false),
            ("app=other", false),
            ("app", true),
            ("!app", false),
            ("!gpu", true),
            ("tier in (llm, tools)", true),
            ("tier notin (llm)", false),
            ("gpu notin (yes)", true),
            ("app=agent,tier in (llm,tools),example.com/owner=ana", true),
            ("app=agent,tier=tools", false),
        ] {
            assert_eq!(
                LabelSelector::parse(sel).unwrap().matches(&l),
                want,
                "{sel}"
            );
        }
    }

    #[test]
    fn hostile_selectors_are_refused() {
        for bad in [
            "",
            ",",
            "app=agent,",
            "=agent",
            "app=a b",
            "app in ()",
            "app in (a",
            "-app=x",
            "Example.com/app=x",
            "app=x\u{0}",
            &format!("app={}", "a".repeat(64)),
            &"a=b,".repeat(2000),
        ] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad:?}");
        }
        // an empty value is a value
        let empty = LabelSelector::parse("app=").unwrap();
        assert!(empty.matches(&labels(&[("app", "")])));
        assert!(!empty.matches(&labels(&[("app", "x")])));
    }
}
