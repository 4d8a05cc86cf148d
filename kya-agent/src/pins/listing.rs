//! Reading the tool definitions out of a server's `tools/list` result.
//!
//! The result is JSON kya's strict parser already accepted (no duplicate
//! keys, bounded depth and size). Here each entry of `result.tools` becomes a
//! [`ToolDef`]: the pinned fields (`name`, `title`, `description`,
//! `inputSchema`, `outputSchema`, `annotations`) as RFC 8785 canonical JSON
//! and its SHA-256. A listing kya cannot pin is refused whole
//! ([`ListingError`]): an entry that is not an object, a name that is not a
//! non-empty string, two tools with one name, more tools than
//! [`MAX_TOOLS`], a definition larger than [`MAX_TOOL_BYTES`] or one that has
//! no canonical form.

use crate::credential::jcs;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::HashSet;

/// Most tools one listing (and one server's pins) may hold.
pub(crate) const MAX_TOOLS: usize = 4096;
/// Largest canonical definition of one tool, in bytes.
pub(crate) const MAX_TOOL_BYTES: usize = 256 * 1024;
/// Longest tool name, in bytes.
pub(crate) const MAX_NAME_BYTES: usize = 512;

/// The fields of a tool definition kya pins, in the order they are shown.
pub(crate) const PINNED_FIELDS: &[&str] = &[
    "name",
    "title",
    "description",
    "inputSchema",
    "outputSchema",
    "annotations",
];

/// One tool as the server announced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ToolDef {
    pub name: String,
    /// The pinned fields, RFC 8785 canonical JSON.
    pub canonical: String,
    /// Hex SHA-256 of `canonical`.
    pub digest: String,
}

impl ToolDef {
    /// The definition of `canonical` text (already canonical), with its digest.
    pub(crate) fn from_canonical(name: String, canonical: String) -> ToolDef {
        let digest = digest(&canonical);
        ToolDef {
            name,
            canonical,
            digest,
        }
    }
}

/// Hex SHA-256 of a canonical definition.
pub(crate) fn digest(canonical: &str) -> String {
    hex::encode(Sha256::digest(canonical.as_bytes()))
}

/// A listing read from a `tools/list` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Listing {
    pub tools: Vec<ToolDef>,
    /// The answer names a further page (`nextCursor`): tools missing from it
    /// are not removed.
    pub more: bool,
}

/// Why a `tools/list` answer is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ListingError {
    #[error("the tools/list result is not an object with a \"tools\" array")]
    NotAList,
    #[error("the tools/list result announces {count} tools, more than kya pins ({MAX_TOOLS})")]
    TooMany { count: usize },
    #[error("tool #{index} of the tools/list result is not an object")]
    NotObject { index: usize },
    #[error("tool #{index} of the tools/list result has no name kya can judge ({why})")]
    BadName { index: usize, why: &'static str },
    #[error("the tools/list result names the tool {name:?} twice; kya cannot tell which definition the agent would use")]
    Duplicate { name: String },
    #[error(
        "the definition of tool {name:?} is {bytes} bytes, more than kya pins ({MAX_TOOL_BYTES})"
    )]
    TooLarge { name: String, bytes: usize },
    #[error("the definition of tool {name:?} has no canonical form: {why}")]
    NotCanonical { name: String, why: String },
}

/// Read the tools of a `tools/list` answer's `result` (the value of the
/// response's `result` member).
pub(crate) fn read(result: &Value) -> Result<Listing, ListingError> {
    let Some(tools) = result.get("tools").and_then(Value::as_array) else {
        return Err(ListingError::NotAList);
    };
    if tools.len() > MAX_TOOLS {
        return Err(ListingError::TooMany { count: tools.len() });
    }
    let more = result.get("nextCursor").is_some_and(|c| !c.is_null());
    let mut names = HashSet::with_capacity(tools.len());
    let mut defs = Vec::with_capacity(tools.len());
    for (index, tool) in tools.iter().enumerate() {
        let Some(obj) = tool.as_object() else {
            return Err(ListingError::NotObject { index });
        };
        let name = match obj.get("name") {
            None => return Err(ListingError::BadName { index, why: "none" }),
            Some(Value::String(s)) if s.is_empty() => {
                return Err(ListingError::BadName {
                    index,
                    why: "empty",
                })
            }
            Some(Value::String(s)) if s.len() > MAX_NAME_BYTES => {
                return Err(ListingError::BadName {
                    index,
                    why: "too long",
                })
            }
            Some(Value::String(s)) => s.clone(),
            Some(_) => {
                return Err(ListingError::BadName {
                    index,
                    why: "not a string",
                })
            }
        };
        if !names.insert(name.clone()) {
            return Err(ListingError::Duplicate { name });
        }
        let pinned: Map<String, Value> = PINNED_FIELDS
            .iter()
            .filter_map(|f| obj.get(*f).map(|v| (f.to_string(), v.clone())))
            .collect();
        let canonical =
            jcs::canonicalize(&Value::Object(pinned)).map_err(|e| ListingError::NotCanonical {
                name: name.clone(),
                why: e.to_string(),
            })?;
        if canonical.len() > MAX_TOOL_BYTES {
            return Err(ListingError::TooLarge {
                name,
                bytes: canonical.len(),
            });
        }
        defs.push(ToolDef::from_canonical(name, canonical));
    }
    Ok(Listing { tools: defs, more })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pinned_fields_only_and_canonical() {
        let a = read(&json!({"tools":[{"name":"t","description":"d","inputSchema":{"type":"object","b":1,"a":2},"icons":[1],"_meta":{"x":1}}]})).unwrap();
        let b = read(&json!({"tools":[{"inputSchema":{"a":2,"type":"object","b":1},"description":"d","name":"t"}]})).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            a.tools[0].canonical,
            r#"{"description":"d","inputSchema":{"a":2,"b":1,"type":"object"},"name":"t"}"#
        );
        assert_eq!(a.tools[0].digest, digest(&a.tools[0].canonical));
        assert!(!a.more);
        let paged = read(&json!({"tools":[],"nextCursor":"c2"})).unwrap();
        assert!(paged.more);
    }

    #[test]
    fn every_field_counts() {
        let base = json!({"name":"t","description":"d","inputSchema":{"type":"object"},
            "annotations":{"destructiveHint":false},"title":"T","outputSchema":{"type":"object"}});
        let d0 = read(&json!({ "tools": [base.clone()] })).unwrap().tools[0]
            .digest
            .clone();
        for (field, value) in [
            ("description", json!("d2")),
            (
                "inputSchema",
                json!({"type":"object","additionalProperties":true}),
            ),
            ("annotations", json!({"destructiveHint":true})),
            ("title", json!("T2")),
            ("outputSchema", json!({})),
        ] {
            let mut t = base.clone();
            t[field] = value;
            let d = read(&json!({ "tools": [t] })).unwrap().tools[0]
                .digest
                .clone();
            assert_ne!(d, d0, "{field}");
        }
    }

    #[test]
    fn hostile_listings_are_refused() {
        let cases = [
            (json!({}), "NotAList"),
            (json!({"tools": {}}), "NotAList"),
            (json!({"tools": [1]}), "NotObject"),
            (json!({"tools": [{"description": "x"}]}), "BadName"),
            (json!({"tools": [{"name": 7}]}), "BadName"),
            (json!({"tools": [{"name": null}]}), "BadName"),
            (json!({"tools": [{"name": ["a"]}]}), "BadName"),
            (json!({"tools": [{"name": ""}]}), "BadName"),
            (
                json!({"tools": [{"name": "x".repeat(MAX_NAME_BYTES + 1)}]}),
                "BadName",
            ),
            (
                json!({"tools": [{"name": "a"}, {"name": "b"}, {"name": "a", "description": "other"}]}),
                "Duplicate",
            ),
            (
                json!({"tools": [{"name": "a", "description": "x".repeat(MAX_TOOL_BYTES)}]}),
                "TooLarge",
            ),
            (
                json!({"tools": [{"name": "a", "inputSchema": {"maximum": 18446744073709551615u64}}]}),
                "NotCanonical",
            ),
        ];
        for (v, want) in cases {
            let e = read(&v).unwrap_err();
            assert!(format!("{e:?}").starts_with(want), "{v}: {e:?}");
        }
    }

    #[test]
    fn a_hundred_thousand_tools_are_refused_before_any_is_read() {
        let tools: Vec<Value> = (0..100_000)
            .map(|i| json!({"name": format!("t{i}")}))
            .collect();
        let e = read(&json!({ "tools": tools })).unwrap_err();
        assert_eq!(e, ListingError::TooMany { count: 100_000 });
        let tools: Vec<Value> = (0..MAX_TOOLS)
            .map(|i| json!({"name": format!("t{i}")}))
            .collect();
        assert_eq!(
            read(&json!({ "tools": tools })).unwrap().tools.len(),
            MAX_TOOLS
        );
    }

    #[test]
    fn deeply_nested_schema_is_refused_not_overflowed() {
        let mut schema = json!({"type": "object"});
        for _ in 0..200 {
            schema = json!({ "properties": { "x": schema } });
        }
        let e = read(&json!({"tools": [{"name": "deep", "inputSchema": schema}]})).unwrap_err();
        assert!(matches!(e, ListingError::NotCanonical { .. }), "{e:?}");
    }
}
