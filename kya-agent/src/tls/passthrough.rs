//! `intercept.passthrough`: SNI patterns whose TLS is spliced without decryption
//! (certificate-pinned services, banking, anything the operator exempts).
//!
//! Passthrough means *not inspected*, so matching is deliberately narrow:
//! - case-insensitive; a trailing dot on either side is ignored;
//! - patterns match whole names, label by label;
//! - a `*` inside a label matches any characters **within that one label**
//!   (`*.pinned.example.com` matches `a.pinned.example.com`, not
//!   `a.b.pinned.example.com` and not `pinned.example.com`; `api-*.example.com`
//!   matches `api-eu.example.com`), like a TLS wildcard certificate;
//! - a leftmost label `**` matches **one or more** labels
//!   (`**.pinned.example.com` also matches `a.b.pinned.example.com`);
//! - no other glob syntax: `?`, `[`, `{` are invalid, so a pattern can't
//!   accidentally mean more than it reads.
//!
//! Connections without SNI (by IP) never match: passthrough is by name.

/// A pattern that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid passthrough pattern {pattern:?}: {reason}")]
pub struct PatternError {
    pub pattern: String,
    pub reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Label {
    /// `**`: one or more labels (leftmost only).
    Many,
    /// A label, possibly with `*` wildcards inside, lower-case.
    Glob(String),
}

#[derive(Debug, Clone)]
struct Pattern {
    text: String,
    labels: Vec<Label>,
}

/// A compiled set of passthrough patterns.
#[derive(Debug, Clone, Default)]
pub struct Passthrough {
    patterns: Vec<Pattern>,
}

/// Longest DNS name (RFC 1035), also the bound on pattern length.
const MAX_NAME: usize = 253;

impl Passthrough {
    /// Compile patterns; every invalid one is an error (a typo must not
    /// silently leave a pinned host intercepted, or exempt more than meant).
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self, PatternError> {
        let patterns = patterns
            .iter()
            .map(|p| compile(p.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Passthrough { patterns })
    }

    /// The first pattern matching `sni`, if any (for the log line / audit event).
    pub fn matching(&self, sni: &str) -> Option<&str> {
        let name = sni.strip_suffix('.').unwrap_or(sni);
        if name.is_empty() || name.len() > MAX_NAME {
            return None;
        }
        let name = name.to_ascii_lowercase();
        let labels: Vec<&str> = name.split('.').collect();
        if labels.iter().any(|l| l.is_empty()) {
            return None;
        }
        self.patterns
            .iter()
            .find(|p| matches_labels(&p.labels, &labels))
            .map(|p| p.text.as_str())
    }

    /// Whether `sni` is to be spliced untouched.
    pub fn is_passthrough(&self, sni: &str) -> bool {
        self.matching(sni).is_some()
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }
}

fn compile(text: &str) -> Result<Pattern, PatternError> {
    let err = |reason| PatternError {
        pattern: text.chars().take(300).collect(),
        reason,
    };
    let trimmed = text.strip_suffix('.').unwrap_or(text);
    if trimmed.is_empty() {
        return Err(err("empty"));
    }
    if trimmed.len() > MAX_NAME {
        return Err(err("longer than a DNS name can be"));
    }
    let lower = trimmed.to_ascii_lowercase();
    let parts: Vec<&str> = lower.split('.').collect();
    let mut labels = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        if part.is_empty() {
            return Err(err("empty label"));
        }
        if *part == "**" {
            if i != 0 {
                return Err(err("`**` is allowed only as the leftmost label"));
            }
            labels.push(Label::Many);
            continue;
        }
        if part.contains("**") {
            return Err(err("`**` must be a whole label"));
        }
        if !part
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'*')
        {
            return Err(err(
                "only letters, digits, `-`, `_` and `*` may appear in a label",
            ));
        }
        if part.len() > 63 {
            return Err(err("label longer than 63 characters"));
        }
        labels.push(Label::Glob((*part).to_string()));
    }
    let literal = labels
        .iter()
        .filter(|l| matches!(l, Label::Glob(g) if !g.contains('*')))
        .count();
    if literal == 0 {
        return Err(err(
            "a pattern needs at least one literal label (refusing to pass through everything)",
        ));
    }
    Ok(Pattern {
        text: text.to_string(),
        labels,
    })
}

fn matches_labels(pattern: &[Label], name: &[&str]) -> bool {
    match pattern.split_first() {
        Some((Label::Many, rest)) => {
            // One or more labels, then the rest matches the tail exactly.
            name.len() > rest.len() && matches_exact(rest, &name[name.len() - rest.len()..])
        }
        _ => matches_exact(pattern, name),
    }
}

fn matches_exact(pattern: &[Label], name: &[&str]) -> bool {
    pattern.len() == name.len()
        && pattern.iter().zip(name).all(|(p, n)| match p {
            Label::Glob(g) => label_glob(g.as_bytes(), n.as_bytes()),
            Label::Many => false,
        })
}

/// `*` matches any run of bytes within one label. Iterative with one
/// backtrack point, so hostile patterns cannot make it exponential.
fn label_glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(p: &[&str]) -> Passthrough {
        Passthrough::new(p).unwrap()
    }

    #[test]
    fn single_star_is_one_label_and_case_insensitive() {
        let p = set(&["*.pinned.example.com"]);
        assert!(p.is_passthrough("a.pinned.example.com"));
        assert!(p.is_passthrough("A.PINNED.Example.COM."));
        assert!(!p.is_passthrough("a.b.pinned.example.com"));
        assert!(!p.is_passthrough("pinned.example.com"));
        assert!(!p.is_passthrough("a.pinned.example.com.evil.test"));
        assert!(!p.is_passthrough("apinned.example.com"));
        assert!(!p.is_passthrough("a.pinned-example.com"));
    }

    #[test]
    fn double_star_is_one_or_more_labels() {
        let p = set(&["**.pinned.example.com"]);
        assert!(p.is_passthrough("a.pinned.example.com"));
        assert!(p.is_passthrough("a.b.c.pinned.example.com"));
        assert!(!p.is_passthrough("pinned.example.com"));
        assert!(!p.is_passthrough("xpinned.example.com"));
    }

    #[test]
    fn stars_inside_labels_and_exact_names() {
        let p = set(&["api-*.example.com", "bank.test"]);
        assert!(p.is_passthrough("api-eu.example.com"));
        assert!(p.is_passthrough("api-.example.com"));
        assert!(!p.is_passthrough("api.example.com"));
        assert!(!p.is_passthrough("api-eu.x.example.com"));
        assert!(p.is_passthrough("BANK.test"));
        assert!(!p.is_passthrough("www.bank.test"));
        assert_eq!(p.matching("bank.test"), Some("bank.test"));
        assert_eq!(
            set(&["a*b*c.test"]).matching("aXbYbZc.test"),
            Some("a*b*c.test")
        );
        assert!(!set(&["a*b*c.test"]).is_passthrough("aXbYbZ.test"));
    }

    #[test]
    fn invalid_patterns_are_refused() {
        for bad in [
            "",
            ".",
            "*",
            "**",
            "*.*",
            "a..b",
            "a.**.b",
            "***.b.com",
            "a**.b.com",
            "a?.b.com",
            "[ab].com",
            "{a,b}.com",
            "a b.com",
            "a/b.com",
            "ünï.com",
        ] {
            assert!(Passthrough::new(&[bad]).is_err(), "{bad:?}");
        }
        assert!(Passthrough::new(&["a".repeat(254)]).is_err());
        assert!(Passthrough::new(&[format!("{}.com", "a".repeat(64))]).is_err());
        // One bad pattern spoils the set.
        assert!(Passthrough::new(&["ok.com", "bad..com"]).is_err());
    }

    #[test]
    fn hostile_names_never_match_and_never_hang() {
        let p = set(&["*a*a*a*a*a*a*a*a*b.test", "**.x.test"]);
        let long_label = "a".repeat(63);
        assert!(!p.is_passthrough(&format!("{long_label}.test")));
        assert!(!p.is_passthrough(""));
        assert!(!p.is_passthrough("."));
        assert!(!p.is_passthrough("..x.test"));
        assert!(!p.is_passthrough("a..x.test"));
        assert!(!p.is_passthrough(&"a.".repeat(2000)));
        assert!(!p.is_passthrough("y.x.test\0"));
        assert!(p.is_passthrough("y.x.test"));
        assert!(Passthrough::default().is_empty());
        assert!(!Passthrough::default().is_passthrough("anything.test"));
    }
}
