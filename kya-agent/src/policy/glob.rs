//! Globs for tool, server, method, agent and owner names.
//!
//! Deliberately tiny: `*` matches any run of characters (including none), `?`
//! exactly one character, `\` escapes the next character. Character classes and
//! braces are rejected rather than taken literally, so a pattern never means
//! something other than what its author believes. Matching is iterative with
//! one backtrack point, so hostile patterns cannot blow up (linear-ish time).

use std::fmt;

/// One piece of a compiled glob.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(char),
    Any,
    AnyRun,
}

/// A compiled glob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    source: String,
    tokens: Vec<Token>,
    case_insensitive: bool,
    /// Literal text before the first wildcard (lowercased when case-insensitive).
    prefix: String,
    /// Literal text after the last wildcard, when the glob has a wildcard.
    suffix: String,
    has_wildcard: bool,
}

/// Why a glob pattern was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GlobError {
    /// Empty patterns match nothing and are always a mistake.
    #[error("empty pattern")]
    Empty,
    /// Trailing `\`.
    #[error("pattern {0:?} ends with an unfinished escape '\\'")]
    DanglingEscape(String),
    /// `[`, `]`, `{`, `}`: not supported, and not silently literal.
    #[error("pattern {0:?} uses {1:?}, which is not supported (only * and ? are wildcards; escape it with \\ to mean the character)")]
    Unsupported(String, char),
    /// Absurdly long patterns are refused.
    #[error("pattern is longer than {MAX_GLOB_LEN} characters")]
    TooLong,
}

/// Longest accepted pattern.
pub(crate) const MAX_GLOB_LEN: usize = 1024;

impl Glob {
    /// Compile a case-sensitive glob (tool names).
    pub fn new(pattern: &str) -> Result<Glob, GlobError> {
        Glob::compile(pattern, false)
    }

    /// Compile a case-insensitive glob (server names).
    pub fn new_case_insensitive(pattern: &str) -> Result<Glob, GlobError> {
        Glob::compile(pattern, true)
    }

    fn compile(pattern: &str, case_insensitive: bool) -> Result<Glob, GlobError> {
        if pattern.is_empty() {
            return Err(GlobError::Empty);
        }
        if pattern.chars().count() > MAX_GLOB_LEN {
            return Err(GlobError::TooLong);
        }
        let mut tokens = Vec::new();
        let mut chars = pattern.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some(e) => tokens.push(Token::Literal(fold(e, case_insensitive))),
                    None => return Err(GlobError::DanglingEscape(pattern.to_string())),
                },
                '*' => {
                    if tokens.last() != Some(&Token::AnyRun) {
                        tokens.push(Token::AnyRun)
                    }
                }
                '?' => tokens.push(Token::Any),
                '[' | ']' | '{' | '}' => {
                    return Err(GlobError::Unsupported(pattern.to_string(), c))
                }
                c => tokens.push(Token::Literal(fold(c, case_insensitive))),
            }
        }
        let has_wildcard = tokens.iter().any(|t| !matches!(t, Token::Literal(_)));
        let prefix: String = tokens
            .iter()
            .map_while(|t| match t {
                Token::Literal(c) => Some(*c),
                _ => None,
            })
            .collect();
        let suffix: String = if has_wildcard {
            let mut s: Vec<char> = tokens
                .iter()
                .rev()
                .map_while(|t| match t {
                    Token::Literal(c) => Some(*c),
                    _ => None,
                })
                .collect();
            s.reverse();
            s.into_iter().collect()
        } else {
            String::new()
        };
        Ok(Glob {
            source: pattern.to_string(),
            tokens,
            case_insensitive,
            prefix,
            suffix,
            has_wildcard,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Some(literal) when the pattern has no wildcard (an exact name, folded
    /// to lowercase when case-insensitive): the index keys exact names.
    pub fn exact(&self) -> Option<&str> {
        (!self.has_wildcard).then_some(self.prefix.as_str())
    }

    /// The literal text before the first wildcard (folded).
    pub fn literal_prefix(&self) -> &str {
        &self.prefix
    }

    /// The literal text after the last wildcard (folded; empty for exact names).
    pub fn literal_suffix(&self) -> &str {
        &self.suffix
    }

    /// Does `text` match the whole pattern?
    pub fn matches(&self, text: &str) -> bool {
        if !self.has_wildcard {
            // Exact names: a plain comparison (folded when case-insensitive).
            return if self.case_insensitive {
                self.prefix.eq_ignore_ascii_case(text)
            } else {
                self.prefix == text
            };
        }
        if text.is_ascii() {
            // Hot path: names are ASCII; compare bytes without allocating.
            let bytes = text.as_bytes();
            self.match_with(bytes.len(), |i| {
                fold(char::from(bytes[i]), self.case_insensitive)
            })
        } else {
            let chars: Vec<char> = text
                .chars()
                .map(|c| fold(c, self.case_insensitive))
                .collect();
            self.match_with(chars.len(), |i| chars[i])
        }
    }

    /// Iterative wildcard matching with a single backtrack point (the last
    /// `*`), which is complete for `*`/`?` globs and linear-times-pattern.
    fn match_with(&self, len: usize, at: impl Fn(usize) -> char) -> bool {
        let (mut t, mut p) = (0usize, 0usize);
        let mut star: Option<(usize, usize)> = None;
        while t < len {
            match self.tokens.get(p) {
                Some(Token::Literal(c)) if *c == at(t) => {
                    t += 1;
                    p += 1;
                }
                Some(Token::Any) => {
                    t += 1;
                    p += 1;
                }
                Some(Token::AnyRun) => {
                    star = Some((p, t));
                    p += 1;
                }
                _ => match star {
                    Some((sp, st)) => {
                        p = sp + 1;
                        t = st + 1;
                        star = Some((sp, st + 1));
                    }
                    None => return false,
                },
            }
        }
        self.tokens[p..].iter().all(|t| *t == Token::AnyRun)
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

fn fold(c: char, case_insensitive: bool) -> char {
    if case_insensitive {
        c.to_ascii_lowercase()
    } else {
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn star_and_question() {
        let g = Glob::new("search_*").unwrap();
        assert!(g.matches("search_"));
        assert!(g.matches("search_docs"));
        assert!(!g.matches("Search_docs"));
        assert!(!g.matches("research_docs"));
        let g = Glob::new("a?c").unwrap();
        assert!(g.matches("abc"));
        assert!(!g.matches("ac"));
        assert!(!g.matches("abbc"));
        let g = Glob::new("*_delete_*").unwrap();
        assert!(g.matches("db_delete_rows"));
        assert!(!g.matches("db_delete"));
        assert!(Glob::new("*").unwrap().matches(""));
        assert!(Glob::new("**").unwrap().matches("anything/at:all"));
    }

    #[test]
    fn exact_prefix_suffix() {
        let g = Glob::new("transfer").unwrap();
        assert_eq!(g.exact(), Some("transfer"));
        let g = Glob::new("delete_*").unwrap();
        assert_eq!(g.exact(), None);
        assert_eq!(g.literal_prefix(), "delete_");
        assert_eq!(g.literal_suffix(), "");
        let g = Glob::new("*_rows").unwrap();
        assert_eq!(g.literal_prefix(), "");
        assert_eq!(g.literal_suffix(), "_rows");
        let g = Glob::new_case_insensitive("MCP.Example.COM").unwrap();
        assert_eq!(g.exact(), Some("mcp.example.com"));
        assert!(g.matches("mcp.example.com"));
    }

    #[test]
    fn case_insensitive_servers() {
        let g = Glob::new_case_insensitive("*.Example.com").unwrap();
        assert!(g.matches("MCP.EXAMPLE.COM"));
        assert!(!g.matches("example.com"));
    }

    #[test]
    fn escapes_and_rejections() {
        assert!(Glob::new(r"a\*b").unwrap().matches("a*b"));
        assert!(!Glob::new(r"a\*b").unwrap().matches("axb"));
        assert_eq!(Glob::new(""), Err(GlobError::Empty));
        assert!(matches!(
            Glob::new("abc\\"),
            Err(GlobError::DanglingEscape(_))
        ));
        assert!(matches!(
            Glob::new("a[bc]"),
            Err(GlobError::Unsupported(_, '['))
        ));
        assert!(matches!(
            Glob::new("{a,b}"),
            Err(GlobError::Unsupported(_, '{'))
        ));
        assert_eq!(Glob::new(&"a".repeat(5000)), Err(GlobError::TooLong));
    }

    #[test]
    fn hostile_pattern_is_fast_enough_and_correct() {
        let g = Glob::new(&"*a".repeat(100)).unwrap();
        assert!(!g.matches(&"a".repeat(99)));
        assert!(g.matches(&"a".repeat(100)));
    }

    /// Reference matcher: straightforward recursion over the pattern.
    fn reference(p: &[char], t: &[char]) -> bool {
        match p.first() {
            None => t.is_empty(),
            Some('*') => (0..=t.len()).any(|i| reference(&p[1..], &t[i..])),
            Some('?') => !t.is_empty() && reference(&p[1..], &t[1..]),
            Some(c) => t.first() == Some(c) && reference(&p[1..], &t[1..]),
        }
    }

    proptest! {
        #[test]
        fn agrees_with_reference(p in "[ab*?]{1,8}", t in "[ab]{0,10}") {
            let g = Glob::new(&p).unwrap();
            let pc: Vec<char> = p.chars().collect();
            let tc: Vec<char> = t.chars().collect();
            prop_assert_eq!(g.matches(&t), reference(&pc, &tc));
        }

        #[test]
        fn literal_globs_match_only_themselves(s in "[a-z_]{1,12}", t in "[a-z_]{1,12}") {
            let g = Glob::new(&s).unwrap();
            prop_assert_eq!(g.matches(&t), s == t);
            prop_assert_eq!(g.exact(), Some(s.as_str()));
        }

        #[test]
        fn case_insensitive_agrees_with_lowercased_reference(p in "[aBé*?]{1,6}", t in "[AbÉé]{0,8}") {
            let g = Glob::new_case_insensitive(&p).unwrap();
            let pc: Vec<char> = p.to_ascii_lowercase().chars().collect();
            let tc: Vec<char> = t.to_ascii_lowercase().chars().collect();
            prop_assert_eq!(g.matches(&t), reference(&pc, &tc));
        }

        #[test]
        fn never_panics(p in "\\PC{0,20}", t in "\\PC{0,20}") {
            if let Ok(g) = Glob::new(&p) { let _ = g.matches(&t); }
        }
    }
}
