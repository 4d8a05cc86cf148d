//! What changed between a pinned tool definition and the one the server
//! announces now, field by field.
//!
//! Each changed field is shown as its canonical JSON before and after
//! (`null` when absent). A [`bounded`](Change::bounded) copy cuts each side to
//! [`SHOWN_BYTES`], for the places that must stay small (the approval, the
//! audit record); `kya tools diff` shows the whole of it.

use super::listing::PINNED_FIELDS;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Most bytes of one side of one field kept in a bounded change.
pub(crate) const SHOWN_BYTES: usize = 2048;

/// How a tool's definition stands against its pin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub server: String,
    pub tool: String,
    /// `changed`, `new` or `removed`.
    pub state: String,
    /// SHA-256 of the pinned definition (`None` for a new tool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned_sha256: Option<String>,
    /// SHA-256 of the definition announced now (`None` for a removed tool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_sha256: Option<String>,
    /// The fields that differ.
    pub fields: Vec<FieldChange>,
}

/// One field that differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldChange {
    pub field: String,
    /// Canonical JSON of the pinned value (`null` when absent).
    pub old: String,
    /// Canonical JSON of the value now (`null` when absent).
    pub new: String,
}

/// The fields of two canonical definitions (`None`: no definition) that differ.
pub(crate) fn fields(old: Option<&str>, new: Option<&str>) -> Vec<FieldChange> {
    let parse = |s: Option<&str>| -> Value {
        s.and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or(Value::Null)
    };
    let (old, new) = (parse(old), parse(new));
    let text = |v: &Value, f: &str| -> String {
        match v.get(f) {
            // Canonical text in, so each member's re-serialization is canonical too.
            Some(x) => crate::credential::jcs::canonicalize(x).unwrap_or_else(|_| x.to_string()),
            None => "null".to_string(),
        }
    };
    PINNED_FIELDS
        .iter()
        .filter(|f| old.get(**f) != new.get(**f))
        .map(|f| FieldChange {
            field: f.to_string(),
            old: text(&old, f),
            new: text(&new, f),
        })
        .collect()
}

impl Change {
    /// A copy with each side of each field cut to [`SHOWN_BYTES`].
    pub(crate) fn bounded(&self) -> Change {
        let mut c = self.clone();
        for f in &mut c.fields {
            f.old = cut(&f.old);
            f.new = cut(&f.new);
        }
        c
    }

    /// The change as lines of text: `- field: old` / `+ field: new`.
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::with_capacity(self.fields.len() * 2);
        for f in &self.fields {
            out.push(format!("- {}: {}", f.field, f.old));
            out.push(format!("+ {}: {}", f.field, f.new));
        }
        out
    }
}

fn cut(s: &str) -> String {
    if s.len() <= SHOWN_BYTES {
        return s.to_string();
    }
    let mut end = SHOWN_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}… ({} bytes more; kya tools diff shows all)",
        &s[..end],
        s.len() - end
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_changed_fields_are_listed() {
        let a = r#"{"annotations":{"destructiveHint":false},"description":"Add","name":"add"}"#;
        let b = r#"{"annotations":{"destructiveHint":true},"description":"Add","name":"add"}"#;
        let f = fields(Some(a), Some(b));
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].field, "annotations");
        assert_eq!(f[0].old, r#"{"destructiveHint":false}"#);
        assert_eq!(f[0].new, r#"{"destructiveHint":true}"#);
        let new = fields(None, Some(b));
        assert_eq!(
            new.iter().map(|f| f.field.as_str()).collect::<Vec<_>>(),
            ["name", "description", "annotations"]
        );
        assert!(new.iter().all(|f| f.old == "null"));
        assert!(fields(Some(a), Some(a)).is_empty());
    }

    #[test]
    fn bounded_cuts_on_char_boundaries() {
        let long = format!("\"{}\"", "é".repeat(SHOWN_BYTES));
        let c = Change {
            server: "s".into(),
            tool: "t".into(),
            state: "changed".into(),
            pinned_sha256: None,
            current_sha256: None,
            fields: vec![FieldChange {
                field: "description".into(),
                old: "\"a\"".into(),
                new: long.clone(),
            }],
        };
        let b = c.bounded();
        assert_eq!(b.fields[0].old, "\"a\"");
        assert!(b.fields[0].new.len() < SHOWN_BYTES + 64);
        assert!(b.fields[0].new.contains("bytes more"));
        assert_eq!(c.lines()[0], "- description: \"a\"");
    }
}
