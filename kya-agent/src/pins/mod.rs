//! Pinned tool definitions: what each server announced the first time kya
//! saw its `tools/list`, and whether what it announces now differs.
//!
//! * [`listing`]: a `tools/list` result read into canonical definitions
//!   (refused whole when kya cannot pin it: duplicate or non-string names,
//!   too many tools, too large a definition).
//! * [`store`]: the pins and the current definitions per server, persisted
//!   in the state directory.
//! * [`diff`]: what changed, field by field.
//! * [`handler`], [`command`]: `kya tools list|diff|accept` over the control
//!   socket.
//!
//! Pins are kept per server *and port* ([`server_key`]).
//!
//! The decision path asks the store how the called tool stands (the
//! `tool_pin` fact policy conditions read) and applies `tool_drift` to a
//! call of a changed, new or removed tool.

pub mod command;
pub(crate) mod diff;
pub(crate) mod handler;
pub(crate) mod listing;
pub mod store;

pub use diff::{Change, FieldChange};

/// The key a server's pins are kept under: its name as policy sees it
/// (SNI or `Host`, lower case, port stripped) and the port the agent reached
/// it on, so two servers on one host are pinned apart (`127.0.0.1:8000`,
/// `[::1]:443`, `mcp.example.com:443`).
pub(crate) fn server_key(server: &str, port: u16) -> String {
    let name = crate::policy::engine::normalize_server(server);
    if name.contains(':') {
        format!("[{name}]:{port}")
    } else {
        format!("{name}:{port}")
    }
}

/// Whether the pin key `key` is what `wanted` names: the key itself (a
/// name with a port), or its server name (every port).
pub(crate) fn names_key(key: &str, wanted: &str) -> bool {
    let has_port = wanted.rsplit_once(':').is_some_and(|(h, p)| {
        !p.is_empty()
            && p.bytes().all(|b| b.is_ascii_digit())
            && (h.ends_with(']') || !h.contains(':'))
    });
    if has_port {
        return key.eq_ignore_ascii_case(wanted.trim());
    }
    let name = key
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .unwrap_or(key);
    name == crate::policy::engine::normalize_server(wanted)
}
pub use store::{PinError, PinStore, ToolRow};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_what_names_them() {
        assert_eq!(
            server_key("MCP.Example.com:8443", 443),
            "mcp.example.com:443"
        );
        assert_eq!(server_key("[::1]:80", 8000), "[::1]:8000");
        assert_eq!(server_key("::1", 8000), "[::1]:8000");
        assert!(names_key("mcp.example.com:443", "mcp.example.com"));
        assert!(names_key("mcp.example.com:443", "MCP.example.com:443"));
        assert!(!names_key("mcp.example.com:443", "mcp.example.com:8443"));
        assert!(!names_key("mcp.example.com:443", "example.com"));
        assert!(names_key("[::1]:8000", "::1"));
        assert!(names_key("[::1]:8000", "[::1]:8000"));
        assert!(!names_key("[::1]:8000", "[::1]:80"));
    }
}
