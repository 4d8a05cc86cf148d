//! Reading an agent's request: which server it addresses and whether its body is
//! JSON-RPC (`Mcp-*` header agreement is [`crate::mcp::headers`]).
//!
//! MCP is recognised by content, not by port or path: any body whose first
//! significant byte opens a JSON object or array, or that is declared JSON, is read
//! with the strict parser. A JSON body that is not JSON-RPC at all (no `jsonrpc`,
//! `method`, `result` or `error` key, in any case) is ordinary API traffic and is
//! forwarded untouched; a body that *is* JSON-RPC but fails the strict model, or any
//! JSON-looking body that is not strict JSON, is refused: fail closed.

use http::{HeaderMap, Uri};
use serde_json::Value;

use crate::mcp::headers;
use crate::mcp::json::{self, fold_case, JsonLimits};
use crate::mcp::jsonrpc::{self, Payload};

use super::governor::ConnFacts;

/// A protocol-level refusal: the request is answered without a policy decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub String);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a request body is.
#[derive(Debug)]
pub enum Body {
    /// Not JSON-RPC; forward the bytes as they came.
    Opaque,
    /// JSON-RPC, strictly parsed. `value` is what the policy sees and, re-serialised
    /// canonically, what is forwarded.
    JsonRpc { payload: Payload, value: Value },
}

/// Whether the first significant byte opens a JSON object or array.
pub fn looks_like_json(body: &[u8]) -> bool {
    matches!(
        body.iter()
            .find(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n')),
        Some(b'{') | Some(b'[')
    )
}

/// Whether a content type declares JSON (`application/json`, `+json`, ...).
pub fn declares_json(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|ct| {
        let essence = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        essence == "application/json" || essence.ends_with("+json") || essence.ends_with("/json")
    })
}

/// Whether a parsed value is meant as JSON-RPC. Keys are compared case-folded so a
/// `"JSONRPC"` key cannot slip a message past as "not JSON-RPC".
pub fn is_jsonrpc(value: &Value) -> bool {
    fn obj(v: &Value) -> bool {
        v.as_object().is_some_and(|m| {
            m.keys().any(|k| {
                let k = fold_case(k.trim());
                matches!(k.as_str(), "jsonrpc" | "method" | "result" | "error")
            })
        })
    }
    match value {
        // An empty array can only be meant as an (invalid) empty batch.
        Value::Array(items) => items.is_empty() || items.iter().any(obj),
        other => obj(other),
    }
}

/// Classify and strictly parse a (decoded) request body.
pub fn read_body(
    content_type: Option<&str>,
    body: &[u8],
    limits: &JsonLimits,
    max_batch: usize,
) -> Result<Body, Refusal> {
    if !declares_json(content_type) && !looks_like_json(body) {
        return Ok(Body::Opaque);
    }
    if body.iter().all(|b| b.is_ascii_whitespace()) && !declares_json(content_type) {
        return Ok(Body::Opaque);
    }
    let value =
        json::parse(body, limits).map_err(|e| Refusal(format!("body is not strict JSON: {e}")))?;
    if !is_jsonrpc(&value) {
        return Ok(Body::Opaque);
    }
    let payload = jsonrpc::parse_payload(&value, max_batch)
        .map_err(|e| Refusal(format!("body is not an acceptable JSON-RPC message: {e}")))?;
    Ok(Body::JsonRpc { payload, value })
}

fn single_header<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, Refusal> {
    let mut it = headers.get_all(name).iter();
    let Some(first) = it.next() else {
        return Ok(None);
    };
    if it.next().is_some() {
        return Err(Refusal(format!("more than one {name} header")));
    }
    first
        .to_str()
        .map(Some)
        .map_err(|_| Refusal(format!("{name} header is not visible ASCII")))
}

fn normalize(host: &str) -> Result<String, Refusal> {
    headers::normalize_host(host).map_err(|e| Refusal(e.to_string()))
}

/// The server a request addresses: SNI, else `Host` (or the URI's authority), else
/// the destination IP. A `Host` that disagrees with the SNI is domain fronting: the
/// TLS layer authorised one name, the HTTP layer addresses another.
pub fn server_name(conn: &ConnFacts, headers: &HeaderMap, uri: &Uri) -> Result<String, Refusal> {
    let host_header = single_header(headers, "host")?.map(normalize).transpose()?;
    let uri_host = uri.authority().map(|a| normalize(a.as_str())).transpose()?;
    if let (Some(h), Some(u)) = (&host_header, &uri_host) {
        if h != u {
            return Err(Refusal(format!(
                "Host {h:?} disagrees with the request target {u:?}"
            )));
        }
    }
    let host = host_header.or(uri_host);
    match (&conn.sni, host) {
        (Some(sni), Some(host)) => {
            let sni = normalize(sni)?;
            if sni != host {
                return Err(Refusal(format!(
                    "Host {host:?} does not match the TLS SNI {sni:?} (domain fronting)"
                )));
            }
            Ok(sni)
        }
        (Some(sni), None) => normalize(sni),
        (None, Some(host)) => Ok(host),
        (None, None) => Ok(conn.dst.ip().to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use std::sync::Arc;

    fn conn(sni: Option<&str>) -> Arc<ConnFacts> {
        Arc::new(ConnFacts {
            process: Default::default(),
            dst: "127.0.0.1:443".parse().unwrap(),
            sni: sni.map(str::to_string),
            tls: sni.is_some(),
            conn_id: 1,
        })
    }

    fn rb(ct: Option<&str>, body: &[u8]) -> Result<Body, Refusal> {
        read_body(ct, body, &JsonLimits::default(), 64)
    }

    #[test]
    fn opaque_and_jsonrpc_bodies() {
        assert!(matches!(rb(Some("text/plain"), b"hello"), Ok(Body::Opaque)));
        assert!(matches!(rb(None, b"{\"a\":1}"), Ok(Body::Opaque)));
        assert!(matches!(rb(None, b""), Ok(Body::Opaque)));
        let ok = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}}"#;
        assert!(matches!(
            rb(Some("application/json"), ok),
            Ok(Body::JsonRpc { .. })
        ));
        // Not declared JSON: recognised by content.
        assert!(matches!(
            rb(Some("text/plain"), ok),
            Ok(Body::JsonRpc { .. })
        ));
    }

    #[test]
    fn hostile_bodies_are_refused() {
        let cases: &[&[u8]] = &[
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","name":"b"}}"#,
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","Name":"b"}}"#,
            br#"{"JSONRPC":"2.0","id":1,"method":"tools/call","params":{"name":"a"}}"#,
            br#"{"jsonrpc":"2.0","id":1,"method":"Tools/Call","params":{"name":"a"}}"#,
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a"}} x"#,
            b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"\xff\"}}",
            b"[]",
            b"{",
            br#"{"jsonrpc":"2.0","id":1e400,"method":"ping"}"#,
        ];
        for c in cases {
            assert!(
                rb(Some("application/json"), c).is_err(),
                "{}",
                String::from_utf8_lossy(c)
            );
        }
        // Declared JSON but garbage.
        assert!(rb(Some("application/json"), b"garbage").is_err());
    }

    #[test]
    fn escaped_method_is_read_as_the_real_method() {
        let b = br#"{"jsonrpc":"2.0","id":1,"method":"tools\u002fcall","params":{"name":"x"}}"#;
        match rb(Some("application/json"), b).unwrap() {
            Body::JsonRpc { payload, .. } => {
                assert!(matches!(
                    payload.messages[0],
                    crate::mcp::jsonrpc::Message::ToolCall(_)
                ))
            }
            Body::Opaque => panic!("opaque"),
        }
    }

    #[test]
    fn server_name_and_fronting() {
        let uri: Uri = "/mcp".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("MCP.Example.com:443"));
        assert_eq!(
            server_name(&conn(Some("mcp.example.com")), &h, &uri).unwrap(),
            "mcp.example.com"
        );
        assert!(server_name(&conn(Some("other.example.com")), &h, &uri).is_err());
        assert_eq!(
            server_name(&conn(None), &h, &uri).unwrap(),
            "mcp.example.com"
        );
        assert_eq!(
            server_name(&conn(None), &HeaderMap::new(), &uri).unwrap(),
            "127.0.0.1"
        );
        let abs: Uri = "http://evil.example/mcp".parse().unwrap();
        assert!(server_name(&conn(None), &h, &abs).is_err());
        let mut two = HeaderMap::new();
        two.append("host", HeaderValue::from_static("a"));
        two.append("host", HeaderValue::from_static("b"));
        assert!(server_name(&conn(None), &two, &uri).is_err());
        let mut bad = HeaderMap::new();
        bad.insert("host", HeaderValue::from_static("a b"));
        assert!(server_name(&conn(None), &bad, &uri).is_err());
    }
}
