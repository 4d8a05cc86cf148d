//! Diagnostics: `file:line: message` errors and warnings for policy input.
//!
//! Every problem found while loading rule files, agent registries or policy
//! tests becomes one [`Diagnostic`] naming the file and the line, so an
//! operator can fix a broken policy without guessing; nothing is silently
//! skipped.

use std::fmt;

/// How bad a diagnostic is: errors reject the input, warnings do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The input is rejected.
    Error,
    /// The input is accepted, but probably not what the author meant.
    Warning,
}

/// One problem in one file at one line (1-based).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    /// The file as given by the user (or `<embedded default>`).
    pub file: String,
    /// 1-based line number.
    pub line: usize,
    /// Error or warning.
    pub severity: Severity,
    /// What is wrong, in words.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.severity {
            Severity::Error => write!(f, "{}:{}: {}", self.file, self.line, self.message),
            Severity::Warning => {
                write!(f, "{}:{}: warning: {}", self.file, self.line, self.message)
            }
        }
    }
}

/// A list of diagnostics; the error type of every policy loader.
#[derive(Debug, Clone, Default, PartialEq, Eq, thiserror::Error)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl Diagnostics {
    /// True when at least one diagnostic is an error.
    pub fn has_errors(&self) -> bool {
        self.0.iter().any(|d| d.severity == Severity::Error)
    }

    /// The errors only.
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.0.iter().filter(|d| d.severity == Severity::Error)
    }

    /// The warnings only.
    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.0.iter().filter(|d| d.severity == Severity::Warning)
    }

    /// Append another list.
    pub fn extend(&mut self, other: Diagnostics) {
        self.0.extend(other.0);
    }
}

/// The text of one input file and its name, for turning byte offsets into lines.
#[derive(Debug, Clone)]
pub struct Source {
    /// Name shown in diagnostics.
    pub name: String,
    /// Full text.
    pub text: String,
}

impl Source {
    /// A named source.
    pub fn new(name: impl Into<String>, text: impl Into<String>) -> Self {
        Source {
            name: name.into(),
            text: text.into(),
        }
    }

    /// The 1-based line containing byte `offset` (clamped to the text).
    pub fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1
    }

    /// An error at a byte offset.
    pub fn error_at(&self, offset: usize, message: impl Into<String>) -> Diagnostic {
        self.diag_at(offset, Severity::Error, message)
    }

    /// A warning at a byte offset.
    pub fn warning_at(&self, offset: usize, message: impl Into<String>) -> Diagnostic {
        self.diag_at(offset, Severity::Warning, message)
    }

    fn diag_at(&self, offset: usize, severity: Severity, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            file: self.name.clone(),
            line: self.line_of(offset),
            severity,
            message: message.into(),
        }
    }

    /// Turn a TOML error into a diagnostic at its position (line 1 when it has none).
    pub fn toml_error(&self, err: &toml::de::Error) -> Diagnostic {
        let offset = err.span().map(|s| s.start).unwrap_or(0);
        let message = err.message().trim().to_string();
        self.error_at(offset, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_one_based_and_clamped() {
        let s = Source::new("f.toml", "a\nb\nc");
        assert_eq!(s.line_of(0), 1);
        assert_eq!(s.line_of(2), 2);
        assert_eq!(s.line_of(4), 3);
        assert_eq!(s.line_of(10_000), 3);
    }

    #[test]
    fn display_is_file_line_message() {
        let s = Source::new("p.toml", "x\ny");
        assert_eq!(s.error_at(2, "bad").to_string(), "p.toml:2: bad");
        assert_eq!(s.warning_at(0, "hmm").to_string(), "p.toml:1: warning: hmm");
        let d = Diagnostics(vec![s.error_at(0, "a"), s.warning_at(2, "b")]);
        assert!(d.has_errors());
        assert_eq!(d.errors().count(), 1);
        assert_eq!(d.warnings().count(), 1);
    }
}
