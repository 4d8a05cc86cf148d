//! MCP request headers, their agreement with the body, and Host/SNI agreement.
//!
//! The 2026-07-28 revision (SEP-2243) lets clients state the method and the tool or
//! resource name in `Mcp-Method` / `Mcp-Name` headers so that servers and gateways
//! can route without reading the body. A gateway that routes or authorises on the
//! header while kya judged the body would be judging two different requests, so a
//! header that disagrees with the body is a denial reason. The same goes for a TLS
//! SNI that names one host while `Host` names another (domain fronting).

use base64::Engine;
use http::HeaderMap;
use serde_json::Value;

use super::jsonrpc::Message;

pub(crate) const MCP_SESSION_ID: &str = "mcp-session-id";
pub(crate) const MCP_PROTOCOL_VERSION: &str = "mcp-protocol-version";
pub(crate) const MCP_METHOD: &str = "mcp-method";
pub(crate) const MCP_NAME: &str = "mcp-name";

/// Longest session id accepted: ids are opaque tokens, not payloads.
const MAX_SESSION_ID: usize = 1024;

/// The MCP headers of one request, validated and decoded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct McpHeaders {
    pub session_id: Option<String>,
    pub protocol_version: Option<String>,
    pub method: Option<String>,
    /// `Mcp-Name`, with the `=?base64?…?=` form decoded.
    pub name: Option<String>,
}

/// Why the headers are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HeaderError {
    #[error("header {0} appears more than once")]
    Repeated(&'static str),
    #[error("header {0} is not visible ASCII")]
    NotText(&'static str),
    #[error("Mcp-Session-Id must be 1 to {MAX_SESSION_ID} visible ASCII characters")]
    BadSessionId,
    #[error("MCP-Protocol-Version {0:?} is not a YYYY-MM-DD version")]
    BadProtocolVersion(String),
    #[error("Mcp-Name has a malformed =?base64?...?= value")]
    BadNameEncoding,
    #[error("header Mcp-Method {header:?} disagrees with the body's method {body:?}")]
    MethodMismatch {
        header: String,
        body: Option<String>,
    },
    #[error("header Mcp-Name {header:?} disagrees with the body's name {body:?}")]
    NameMismatch {
        header: String,
        body: Option<String>,
    },
    #[error("malformed Host {0:?}")]
    BadHost(String),
}

fn single<'a>(h: &'a HeaderMap, name: &'static str) -> Result<Option<&'a str>, HeaderError> {
    let mut values = h.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(HeaderError::Repeated(name));
    }
    first
        .to_str()
        .map(|s| Some(s.trim_matches([' ', '\t'])))
        .map_err(|_| HeaderError::NotText(name))
}

/// Read and validate the MCP headers.
pub(crate) fn read_mcp_headers(h: &HeaderMap) -> Result<McpHeaders, HeaderError> {
    let session_id = match single(h, MCP_SESSION_ID)? {
        None => None,
        Some(s) => {
            if s.is_empty()
                || s.len() > MAX_SESSION_ID
                || !s.bytes().all(|b| (0x21..=0x7E).contains(&b))
            {
                return Err(HeaderError::BadSessionId);
            }
            Some(s.to_string())
        }
    };
    let protocol_version = match single(h, MCP_PROTOCOL_VERSION)? {
        None => None,
        Some(v) => {
            let b = v.as_bytes();
            let ok = b.len() == 10
                && b.iter().enumerate().all(|(i, c)| match i {
                    4 | 7 => *c == b'-',
                    _ => c.is_ascii_digit(),
                });
            if !ok {
                return Err(HeaderError::BadProtocolVersion(v.to_string()));
            }
            Some(v.to_string())
        }
    };
    let method = single(h, MCP_METHOD)?.map(str::to_string);
    let name = single(h, MCP_NAME)?.map(decode_name).transpose()?;
    Ok(McpHeaders {
        session_id,
        protocol_version,
        method,
        name,
    })
}

/// SEP-2243 value encoding: values that are not plain printable ASCII travel as
/// `=?base64?{standard base64 of the UTF-8}?=`; anything wearing the markers is encoded.
pub(crate) fn decode_name(raw: &str) -> Result<String, HeaderError> {
    match raw
        .strip_prefix("=?base64?")
        .and_then(|r| r.strip_suffix("?="))
    {
        Some(b64) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|_| HeaderError::BadNameEncoding)?;
            String::from_utf8(bytes).map_err(|_| HeaderError::BadNameEncoding)
        }
        None => Ok(raw.to_string()),
    }
}

/// The name a message's `Mcp-Name` must carry: `params.name` (tools, prompts), else
/// `params.uri` (resources).
fn body_name(m: &Message) -> Option<String> {
    if let Message::ToolCall(t) = m {
        return Some(t.name.clone());
    }
    let params = m.params()?;
    match (params.get("name"), params.get("uri")) {
        (Some(Value::String(n)), _) => Some(n.clone()),
        (_, Some(Value::String(u))) => Some(u.clone()),
        _ => None,
    }
}

/// Check that `Mcp-Method` and `Mcp-Name`, when present, agree with every message of
/// the body that has a method. Absent headers are fine (older clients send none).
pub(crate) fn check_agreement(h: &McpHeaders, messages: &[Message]) -> Result<(), HeaderError> {
    let with_method: Vec<&Message> = messages.iter().filter(|m| m.method().is_some()).collect();
    if let Some(header) = &h.method {
        if with_method.is_empty() {
            return Err(HeaderError::MethodMismatch {
                header: header.clone(),
                body: None,
            });
        }
        for m in &with_method {
            if m.method() != Some(header.as_str()) {
                return Err(HeaderError::MethodMismatch {
                    header: header.clone(),
                    body: m.method().map(str::to_string),
                });
            }
        }
    }
    if let Some(header) = &h.name {
        if with_method.is_empty() {
            return Err(HeaderError::NameMismatch {
                header: header.clone(),
                body: None,
            });
        }
        for m in &with_method {
            let body = body_name(m);
            if body.as_deref() != Some(header.as_str()) {
                return Err(HeaderError::NameMismatch {
                    header: header.clone(),
                    body,
                });
            }
        }
    }
    Ok(())
}

/// A host name as compared for Host/SNI agreement: port stripped (IPv6 brackets
/// kept off), one trailing dot removed, ASCII lower case.
pub(crate) fn normalize_host(host: &str) -> Result<String, HeaderError> {
    let bad = || HeaderError::BadHost(host.to_string());
    let h = host.trim();
    let name = if let Some(rest) = h.strip_prefix('[') {
        let (inner, after) = rest.split_once(']').ok_or_else(bad)?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(valid_port)) {
            return Err(bad());
        }
        inner
    } else {
        match h.rsplit_once(':') {
            Some((name, port)) if !name.contains(':') => {
                if !valid_port(port) {
                    return Err(bad());
                }
                name
            }
            Some(_) => h, // a bare IPv6 address (SNI never carries one; Host must bracket it)
            None => h,
        }
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':'))
    {
        return Err(bad());
    }
    Ok(name.to_ascii_lowercase())
}

fn valid_port(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 5
        && p.bytes().all(|b| b.is_ascii_digit())
        && p.parse::<u16>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mcp::jsonrpc::parse_message;
    use http::HeaderValue;
    use proptest::prelude::*;
    use serde_json::json;

    fn headers(pairs: &[(&'static str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_bytes(v).unwrap());
        }
        h
    }

    fn call(name: &str) -> Message {
        parse_message(&json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":name}}))
            .unwrap()
    }

    #[test]
    fn reads_and_validates_headers() {
        let h = headers(&[
            ("Mcp-Session-Id", b"abc-123"),
            ("MCP-Protocol-Version", b"2025-06-18"),
            ("mcp-method", b"tools/call"),
            ("Mcp-Name", b"=?base64?w6ljaG8=?="),
        ]);
        assert_eq!(
            read_mcp_headers(&h).unwrap(),
            McpHeaders {
                session_id: Some("abc-123".into()),
                protocol_version: Some("2025-06-18".into()),
                method: Some("tools/call".into()),
                name: Some("écho".into()),
            }
        );
        assert_eq!(
            read_mcp_headers(&HeaderMap::new()).unwrap(),
            McpHeaders::default()
        );
    }

    #[test]
    fn hostile_headers() {
        let cases: Vec<(HeaderMap, HeaderError)> = vec![
            (
                headers(&[("mcp-method", b"ping"), ("mcp-method", b"tools/call")]),
                HeaderError::Repeated(MCP_METHOD),
            ),
            (
                headers(&[("mcp-session-id", b"a"), ("mcp-session-id", b"b")]),
                HeaderError::Repeated(MCP_SESSION_ID),
            ),
            (
                headers(&[("mcp-name", b"\xc3\xa9")]),
                HeaderError::NotText(MCP_NAME),
            ),
            (
                headers(&[("mcp-session-id", b"a b")]),
                HeaderError::BadSessionId,
            ),
            (
                headers(&[("mcp-session-id", b"")]),
                HeaderError::BadSessionId,
            ),
            (
                headers(&[("mcp-session-id", "x".repeat(2000).as_bytes())]),
                HeaderError::BadSessionId,
            ),
            (
                headers(&[("mcp-protocol-version", b"latest")]),
                HeaderError::BadProtocolVersion("latest".into()),
            ),
            (
                headers(&[("mcp-protocol-version", b"2025-6-18")]),
                HeaderError::BadProtocolVersion("2025-6-18".into()),
            ),
            (
                headers(&[("mcp-name", b"=?base64?***?=")]),
                HeaderError::BadNameEncoding,
            ),
            (
                headers(&[("mcp-name", b"=?base64?/w==?=")]),
                HeaderError::BadNameEncoding,
            ),
        ];
        for (h, want) in cases {
            assert_eq!(read_mcp_headers(&h), Err(want), "{h:?}");
        }
    }

    #[test]
    fn header_body_agreement() {
        let hdr = |m: Option<&str>, n: Option<&str>| McpHeaders {
            method: m.map(str::to_string),
            name: n.map(str::to_string),
            ..McpHeaders::default()
        };
        let read = parse_message(
            &json!({"jsonrpc":"2.0","id":2,"method":"resources/read","params":{"uri":"file:///etc/passwd"}}),
        )
        .unwrap();
        let resp = parse_message(&json!({"jsonrpc":"2.0","id":2,"result":{}})).unwrap();
        assert!(check_agreement(&hdr(None, None), &[call("rm")]).is_ok());
        assert!(check_agreement(&hdr(Some("tools/call"), Some("rm")), &[call("rm")]).is_ok());
        assert!(check_agreement(
            &hdr(Some("resources/read"), Some("file:///etc/passwd")),
            std::slice::from_ref(&read)
        )
        .is_ok());
        assert!(matches!(
            check_agreement(
                &hdr(Some("tools/call"), Some("search")),
                &[call("delete_all")]
            ),
            Err(HeaderError::NameMismatch { .. })
        ));
        assert!(matches!(
            check_agreement(&hdr(Some("tools/list"), None), &[call("rm")]),
            Err(HeaderError::MethodMismatch { .. })
        ));
        // Case matters: names and methods are compared exactly.
        assert!(check_agreement(&hdr(None, Some("RM")), &[call("rm")]).is_err());
        // A batch: every member must agree.
        assert!(matches!(
            check_agreement(&hdr(Some("tools/call"), Some("a")), &[call("a"), call("b")]),
            Err(HeaderError::NameMismatch { .. })
        ));
        // A header that names something the body does not have.
        assert!(
            check_agreement(&hdr(Some("tools/call"), None), std::slice::from_ref(&resp)).is_err()
        );
        assert!(check_agreement(&hdr(None, Some("x")), &[resp]).is_err());
        let ping = parse_message(&json!({"jsonrpc":"2.0","id":3,"method":"ping"})).unwrap();
        assert!(matches!(
            check_agreement(&hdr(Some("ping"), Some("x")), &[ping]),
            Err(HeaderError::NameMismatch { body: None, .. })
        ));
    }

    #[test]
    fn bad_hosts() {
        for bad in [
            "", ":443", "a:99999", "a:b", "[::1", "[::1]x", "a b", "a/b", "a@b", "host:",
        ] {
            assert!(
                matches!(normalize_host(bad), Err(HeaderError::BadHost(_))),
                "{bad:?}: {:?}",
                normalize_host(bad)
            );
        }
    }

    proptest! {
        #[test]
        fn random_header_values_never_panic(v in prop::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(hv) = HeaderValue::from_bytes(&v) {
                for name in [MCP_SESSION_ID, MCP_PROTOCOL_VERSION, MCP_METHOD, MCP_NAME] {
                    let mut h = HeaderMap::new();
                    h.insert(name, hv.clone());
                    let _ = read_mcp_headers(&h);
                }
            }
            let s = String::from_utf8_lossy(&v);
            let _ = normalize_host(&s);
            let _ = decode_name(&s);
        }

        #[test]
        fn encoded_names_round_trip(name in "\\PC{0,30}") {
            let enc = format!(
                "=?base64?{}?=",
                base64::engine::general_purpose::STANDARD.encode(name.as_bytes())
            );
            prop_assert_eq!(decode_name(&enc).unwrap(), name);
        }
    }
}
