//! The call description of `kya policy test --call` and of `[[test]]` tables:
//! JSON (or TOML) naming the agent, process, server, method, tool, arguments
//! and time, turned into a [`CallContext`].

use super::registry::Registry;
use super::{AgentInfo, CallContext};
use kya_common::ProcessIdentity;
use serde::Deserialize;
use time::OffsetDateTime;

/// Largest call description accepted.
pub(crate) const MAX_CALL_BYTES: usize = 4 * 1024 * 1024;

/// One call, as written by a person.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CallDescription {
    /// Agent name (or `{name, owner, orphaned}`); omitted → resolved from `process`.
    #[serde(default)]
    pub agent: Option<AgentField>,
    /// Process identity.
    #[serde(default)]
    pub process: ProcessIdentity,
    /// SNI / Host.
    #[serde(default)]
    pub server: String,
    /// The address connected to, e.g. `"203.0.113.7:443"`.
    #[serde(default)]
    pub destination: Option<std::net::SocketAddr>,
    /// JSON-RPC method (default `tools/call`).
    #[serde(default = "tools_call")]
    pub method: String,
    /// Tool name.
    #[serde(default)]
    pub tool: Option<String>,
    /// Arguments (default `{}`).
    #[serde(default = "empty_object")]
    pub args: serde_json::Value,
    /// RFC 3339 string or unix seconds (default: now).
    #[serde(default)]
    pub time: Option<TimeField>,
    /// Scope of a covering credential.
    #[serde(default)]
    pub credential: Option<serde_json::Value>,
    /// How the tool stands against its pin: `unknown` (default),
    /// `unchanged`, `changed`, `new`, `removed`.
    #[serde(default)]
    pub tool_pin: super::ToolPin,
}

/// `"agent": "name"` or `"agent": {"name": .., "owner": .., "orphaned": ..}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum AgentField {
    /// A name (looked up in the registry for owner and lifecycle).
    Name(String),
    /// Everything spelled out.
    Full {
        /// Name.
        name: String,
        /// Owner.
        #[serde(default)]
        owner: Option<String>,
        /// Orphaned.
        #[serde(default)]
        orphaned: bool,
    },
}

/// A time as RFC 3339 or unix seconds.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum TimeField {
    /// `2026-11-26T12:00:00Z`.
    Text(String),
    /// Unix seconds.
    Unix(i64),
}

fn tools_call() -> String {
    "tools/call".to_string()
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

impl CallDescription {
    /// Parse JSON text (bounded).
    pub(crate) fn from_json(text: &str) -> Result<CallDescription, String> {
        if text.len() > MAX_CALL_BYTES {
            return Err(format!(
                "call description larger than {MAX_CALL_BYTES} bytes"
            ));
        }
        serde_json::from_str(text).map_err(|e| format!("bad call description: {e}"))
    }

    /// From a JSON value (e.g. converted from a TOML test table).
    pub(crate) fn from_value(v: serde_json::Value) -> Result<CallDescription, String> {
        serde_json::from_value(v).map_err(|e| format!("bad call description: {e}"))
    }

    /// The call time (now when not given).
    pub(crate) fn time(&self) -> Result<OffsetDateTime, String> {
        match &self.time {
            None => Ok(OffsetDateTime::now_utc()),
            Some(TimeField::Unix(s)) => {
                OffsetDateTime::from_unix_timestamp(*s).map_err(|e| format!("bad time {s}: {e}"))
            }
            Some(TimeField::Text(t)) => OffsetDateTime::parse(
                t,
                &time::format_description::well_known::Rfc3339,
            )
            .map_err(|e| {
                format!("bad time {t:?}: {e} (expected RFC 3339, e.g. 2026-11-26T12:00:00Z)")
            }),
        }
    }

    /// Build the call context, resolving the agent with `registry`.
    pub(crate) fn into_call(self, registry: &Registry) -> Result<CallContext, String> {
        let time = self.time()?;
        if self.method.is_empty() {
            return Err("method must not be empty".to_string());
        }
        if self.method == "tools/call" && self.tool.as_deref().is_none_or(str::is_empty) {
            return Err("a tools/call needs a tool name".to_string());
        }
        let agent = match self.agent {
            None => registry.resolve(&self.process, time),
            Some(AgentField::Name(name)) => registry.by_name(&name, time).unwrap_or(AgentInfo {
                name,
                owner: None,
                orphaned: false,
            }),
            Some(AgentField::Full {
                name,
                owner,
                orphaned,
            }) => AgentInfo {
                name,
                owner,
                orphaned,
            },
        };
        Ok(CallContext {
            agent,
            process: self.process,
            server: self.server,
            destination: self.destination,
            method: self.method,
            tool: self.tool,
            args: self.args,
            time,
            credential: self.credential,
            tool_pin: self.tool_pin,
        })
    }
}

/// TOML to JSON for call tables in test files (datetimes become RFC 3339 strings).
pub(crate) fn toml_to_json(v: &toml::Value) -> Result<serde_json::Value, String> {
    Ok(match v {
        toml::Value::String(s) => serde_json::Value::String(s.clone()),
        toml::Value::Integer(i) => serde_json::Value::from(*i),
        toml::Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(serde_json::Value::Number)
            .ok_or_else(|| format!("non-finite number {f} in call"))?,
        toml::Value::Boolean(b) => serde_json::Value::Bool(*b),
        toml::Value::Datetime(d) => serde_json::Value::String(d.to_string()),
        toml::Value::Array(a) => {
            serde_json::Value::Array(a.iter().map(toml_to_json).collect::<Result<_, _>>()?)
        }
        toml::Value::Table(t) => serde_json::Value::Object(
            t.iter()
                .map(|(k, v)| toml_to_json(v).map(|v| (k.clone(), v)))
                .collect::<Result<_, _>>()?,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn design_example_parses() {
        let d = CallDescription::from_json(r#"{"agent": "billing-bot",
 "process": {"pid": 42, "uid": 1000, "exe": "/usr/bin/python3", "comm": "python3", "cgroup": "/agents/billing"},
 "server": "mcp.example.com", "method": "tools/call", "tool": "transfer",
 "args": {"amount": 5000, "to": "bob"}, "time": "2026-11-26T12:00:00Z"}"#).unwrap();
        let c = d.into_call(&Registry::empty()).unwrap();
        assert_eq!(c.agent.name, "billing-bot");
        assert_eq!(c.time.unix_timestamp(), 1_795_694_400);
        assert_eq!(c.args["amount"], 5000);
    }

    #[test]
    fn agent_omitted_is_unregistered_and_bad_input_is_rejected() {
        let c = CallDescription::from_json(r#"{"server":"s","tool":"t","time":0}"#)
            .unwrap()
            .into_call(&Registry::empty())
            .unwrap();
        assert_eq!(c.agent.name, "unregistered");
        for bad in [
            r#"{"tool":"t","bogus":1}"#,
            r#"{"tool":"t","time":"yesterday"}"#,
            r#"{"server":"s"}"#,
            r#"{"tool":"t","process":{"pid":-1}}"#,
            r#"[1,2]"#,
            "",
            r#"{"tool":"t","time":99999999999999999}"#,
        ] {
            let r = CallDescription::from_json(bad).and_then(|d| d.into_call(&Registry::empty()));
            assert!(r.is_err(), "{bad}");
        }
        let r = CallDescription::from_json(&" ".repeat(MAX_CALL_BYTES + 1));
        assert!(r.unwrap_err().contains("larger"));
    }
}
