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

/// Whether a content type declares JSON. As wide as the most lenient real
/// server: the official TypeScript SDK accepts any `Content-Type` that merely
/// contains `application/json`, so anything mentioning `json` counts.
pub fn declares_json(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|ct| ct.to_ascii_lowercase().contains("json"))
}

/// The UTF-8 byte-order mark, which the TypeScript SDK's decoder and Python's
/// `json.loads` on bytes both skip.
const UTF8_BOM: &[u8] = b"\xef\xbb\xbf";

/// The UTF-16/32 encodings a JSON reader may detect in a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WideEncoding {
    Utf16Le,
    Utf16Be,
    Utf32Le,
    Utf32Be,
}

impl WideEncoding {
    fn name(self) -> &'static str {
        match self {
            WideEncoding::Utf16Le => "UTF-16LE",
            WideEncoding::Utf16Be => "UTF-16BE",
            WideEncoding::Utf32Le => "UTF-32LE",
            WideEncoding::Utf32Be => "UTF-32BE",
        }
    }

    fn unit(self) -> usize {
        match self {
            WideEncoding::Utf16Le | WideEncoding::Utf16Be => 2,
            WideEncoding::Utf32Le | WideEncoding::Utf32Be => 4,
        }
    }

    fn code_unit(self, b: &[u8]) -> u32 {
        match self {
            WideEncoding::Utf16Le => u32::from(u16::from_le_bytes([b[0], b[1]])),
            WideEncoding::Utf16Be => u32::from(u16::from_be_bytes([b[0], b[1]])),
            WideEncoding::Utf32Le => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            WideEncoding::Utf32Be => u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        }
    }
}

/// The encoding Python's `json.loads` would read `body` in, when not UTF-8:
/// a UTF-16/32 byte-order mark, or zero bytes among the first four (RFC 4627 §3).
fn wide_encoding(body: &[u8]) -> Option<WideEncoding> {
    if body.starts_with(b"\xff\xfe\x00\x00") {
        return Some(WideEncoding::Utf32Le);
    }
    if body.starts_with(b"\x00\x00\xfe\xff") {
        return Some(WideEncoding::Utf32Be);
    }
    if body.starts_with(b"\xff\xfe") {
        return Some(WideEncoding::Utf16Le);
    }
    if body.starts_with(b"\xfe\xff") {
        return Some(WideEncoding::Utf16Be);
    }
    match body {
        [0, b1, ..] if body.len() >= 4 => Some(if *b1 != 0 {
            WideEncoding::Utf16Be
        } else {
            WideEncoding::Utf32Be
        }),
        [_, 0, b2, b3, ..] => Some(if *b2 != 0 || *b3 != 0 {
            WideEncoding::Utf16Le
        } else {
            WideEncoding::Utf32Le
        }),
        [0, _] => Some(WideEncoding::Utf16Be),
        [_, 0] => Some(WideEncoding::Utf16Le),
        _ => None,
    }
}

/// Whether `body`, read in `enc`, opens a JSON object or array (after a BOM
/// and JSON whitespace). Only the first significant character is decoded.
fn wide_looks_like_json(body: &[u8], enc: WideEncoding) -> bool {
    for unit in body.chunks_exact(enc.unit()) {
        match enc.code_unit(unit) {
            0xfeff | 0x20 | 0x09 | 0x0a | 0x0d => continue,
            c => return c == u32::from(b'{') || c == u32::from(b'['),
        }
    }
    false
}

/// A `charset` parameter other than UTF-8 (or its ASCII subset), if declared.
fn foreign_charset(content_type: Option<&str>) -> Option<String> {
    let ct = content_type?;
    ct.split(';').skip(1).find_map(|param| {
        let (name, value) = param.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("charset") {
            return None;
        }
        let value = value.trim().trim_matches('"').to_ascii_lowercase();
        (!matches!(value.as_str(), "utf-8" | "utf8" | "us-ascii" | "ascii")).then_some(value)
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
///
/// What some real server would read as JSON is judged as JSON here: a UTF-8
/// BOM is skipped (and absent from the canonical bytes forwarded), and a body a
/// server would decode as UTF-16/32 JSON, or JSON declared in a charset other
/// than UTF-8, is refused rather than forwarded unread.
pub fn read_body(
    content_type: Option<&str>,
    body: &[u8],
    limits: &JsonLimits,
    max_batch: usize,
) -> Result<Body, Refusal> {
    let declared = declares_json(content_type);
    if let Some(enc) = wide_encoding(body) {
        if declared || wide_looks_like_json(body, enc) {
            return Err(Refusal(format!(
                "body is JSON in {}: only UTF-8 JSON is accepted",
                enc.name()
            )));
        }
        return Ok(Body::Opaque);
    }
    let text = body.strip_prefix(UTF8_BOM).unwrap_or(body);
    if !declared && !looks_like_json(text) {
        return Ok(Body::Opaque);
    }
    if text.iter().all(|b| b.is_ascii_whitespace()) && !declared {
        return Ok(Body::Opaque);
    }
    // Before judging what the JSON means: a server decoding another charset
    // (the TypeScript SDK honours `charset`, UTF-7 included) may read keys kya
    // would not recognise as JSON-RPC at all.
    if let Some(charset) = foreign_charset(content_type) {
        return Err(Refusal(format!(
            "JSON declared in charset {charset:?}: only UTF-8 is accepted"
        )));
    }
    let value =
        json::parse(text, limits).map_err(|e| Refusal(format!("body is not strict JSON: {e}")))?;
    if !is_jsonrpc(&value) {
        return Ok(Body::Opaque);
    }
    let payload = jsonrpc::parse_payload(&value, max_batch)
        .map_err(|e| Refusal(format!("body is not an acceptable JSON-RPC message: {e}")))?;
    Ok(Body::JsonRpc { payload, value })
}

/// What a server→client body (or SSE `data`) is to a client.
///
/// The agent→server direction is judged by [`read_body`]: whatever a server
/// would read as JSON-RPC. This direction is judged by what a client would
/// *act on*: the official SDKs accept a message only with `"jsonrpc": "2.0"`,
/// so JSON without a `jsonrpc` member (an OAuth error, metadata, any REST
/// answer) is ordinary HTTP and passes unchanged, and so does a message no
/// client can match to anything it sent or answer (no `id` and no `method`:
/// a "response" to a notification). Anything that claims JSON-RPC in any way a
/// lenient client could read (a case variant of the key, a BOM, UTF-16/32,
/// JSON that only a lenient parser accepts) is judged strictly or refused.
#[derive(Debug)]
pub enum ServerData {
    /// No client acts on it as JSON-RPC: pass the bytes unchanged.
    Inert,
    /// Strict JSON that claims JSON-RPC: judge it (strictly parsed).
    JsonRpc(Value),
    /// Claims (or may claim) JSON-RPC in a form kya does not judge: refuse.
    Ambiguous(String),
}

/// Whether a parsed value claims to be JSON-RPC: an object (or a batch
/// element) with a member that case-folds to `jsonrpc`.
pub fn claims_jsonrpc(value: &Value) -> bool {
    fn obj(v: &Value) -> bool {
        v.as_object()
            .is_some_and(|m| m.keys().any(|k| fold_case(k.trim()) == "jsonrpc"))
    }
    match value {
        Value::Array(items) => items.iter().any(obj),
        other => obj(other),
    }
}

/// Whether a message claiming JSON-RPC can still be acted on by no client: it
/// has no member that case-folds to `id` or `method`, so it neither answers a
/// request nor asks anything. In a batch, every element must be so.
fn inert_message(value: &Value) -> bool {
    fn obj(v: &Value) -> bool {
        v.as_object().is_some_and(|m| {
            !m.keys().any(|k| {
                let k = fold_case(k.trim());
                k == "id" || k == "method"
            })
        })
    }
    match value {
        Value::Array(items) => !items.is_empty() && items.iter().all(obj),
        other => obj(other),
    }
}

/// Whether text that is not strict JSON could still hold a `jsonrpc` key for a
/// lenient parser: the word in any case, or a `\u` escape that may spell it.
fn may_mention_jsonrpc(text: &str) -> bool {
    text.contains("\\u") || fold_case(text).contains("jsonrpc")
}

fn decode_wide(body: &[u8], enc: WideEncoding) -> String {
    let units = body.chunks_exact(enc.unit()).map(|u| enc.code_unit(u));
    match enc {
        WideEncoding::Utf16Le | WideEncoding::Utf16Be => {
            let u16s: Vec<u16> = units.map(|u| u as u16).collect();
            char::decode_utf16(u16s)
                .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
                .collect()
        }
        WideEncoding::Utf32Le | WideEncoding::Utf32Be => units
            .map(|u| char::from_u32(u).unwrap_or(char::REPLACEMENT_CHARACTER))
            .collect(),
    }
}

/// Classify a (decoded) server→client body or SSE `data`; see [`ServerData`].
pub fn server_data(body: &[u8], limits: &JsonLimits) -> ServerData {
    if let Some(enc) = wide_encoding(body) {
        if wide_looks_like_json(body, enc) && may_mention_jsonrpc(&decode_wide(body, enc)) {
            return ServerData::Ambiguous(format!(
                "server message is JSON in {} that may claim JSON-RPC: only UTF-8 is judged",
                enc.name()
            ));
        }
        return ServerData::Inert;
    }
    let text = body.strip_prefix(UTF8_BOM).unwrap_or(body);
    if !looks_like_json(text) {
        return ServerData::Inert;
    }
    match json::parse(text, limits) {
        Ok(v) if !claims_jsonrpc(&v) || inert_message(&v) => ServerData::Inert,
        Ok(v) => ServerData::JsonRpc(v),
        Err(e) if may_mention_jsonrpc(&String::from_utf8_lossy(text)) => ServerData::Ambiguous(
            format!("server message may claim JSON-RPC but is not strict JSON: {e}"),
        ),
        Err(_) => ServerData::Inert,
    }
}

/// The `charset` a response declares when it is not UTF-8 (see [`read_body`]).
pub fn foreign_response_charset(content_type: Option<&str>) -> Option<String> {
    foreign_charset(content_type)
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
    if let (Some(t), Some(h)) = (&conn.tunnel, &host) {
        // Inside a followed tunnel the server is the CONNECT authority: a
        // request for another host is not sent through it.
        if *h != t.host {
            return Err(Refusal(format!(
                "Host {h:?} is not the target of the CONNECT tunnel ({t})"
            )));
        }
    }
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
            tunnel: None,
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

    fn utf16le(s: &str, bom: bool) -> Vec<u8> {
        let mut out = if bom { vec![0xff, 0xfe] } else { Vec::new() };
        for u in s.encode_utf16() {
            out.extend_from_slice(&u.to_le_bytes());
        }
        out
    }

    fn utf32be(s: &str) -> Vec<u8> {
        s.chars().flat_map(|c| u32::from(c).to_be_bytes()).collect()
    }

    const CALL: &str =
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"transfer"}}"#;

    #[test]
    fn a_utf8_bom_is_skipped_and_the_call_judged() {
        let mut b = b"\xef\xbb\xbf".to_vec();
        b.extend_from_slice(CALL.as_bytes());
        // Declared as JSON in any spelling a lenient server accepts, or not at all.
        for ct in [
            Some("application/json"),
            Some("application/json-x; charset=utf-8"),
            Some("text/plain, application/json"),
            Some("TEXT/JSON"),
            Some("text/plain"),
            None,
        ] {
            match rb(ct, &b) {
                Ok(Body::JsonRpc { payload, .. }) => assert!(matches!(
                    payload.messages[0],
                    crate::mcp::jsonrpc::Message::ToolCall(_)
                )),
                other => panic!("{ct:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn utf16_and_utf32_json_is_refused_never_opaque() {
        let bodies = [
            utf16le(CALL, true),
            utf16le(CALL, false),
            utf16le(&format!("  {CALL}"), false),
            utf32be(CALL),
            {
                let mut b = vec![0x00, 0x00, 0xfe, 0xff];
                b.extend(utf32be(CALL));
                b
            },
        ];
        for b in &bodies {
            for ct in [Some("application/json"), Some("text/plain"), None] {
                assert!(rb(ct, b).is_err(), "{ct:?}: {b:?}");
            }
        }
        // Binary that merely has zero bytes and is not JSON in any encoding.
        assert!(matches!(
            rb(Some("application/octet-stream"), b"\x00\x01\x02\x03binary"),
            Ok(Body::Opaque)
        ));
        assert!(rb(Some("application/json"), b"\x00\x01\x02\x03").is_err());
    }

    #[test]
    fn json_rpc_in_another_charset_is_refused() {
        for ct in [
            "application/json; charset=iso-8859-1",
            "application/json;charset=\"UTF-16\"",
            "text/plain; CHARSET=latin1",
        ] {
            assert!(rb(Some(ct), CALL.as_bytes()).is_err(), "{ct}");
        }
        for ct in [
            "application/json; charset=utf-8",
            "application/json; charset=\"UTF8\"",
        ] {
            assert!(
                matches!(rb(Some(ct), CALL.as_bytes()), Ok(Body::JsonRpc { .. })),
                "{ct}"
            );
        }
        // JSON that is not JSON-RPC as UTF-8 may be JSON-RPC in the declared
        // charset: in UTF-7, "+AGo-sonrpc" is "jsonrpc".
        let utf7 = br#"{"+AGo-sonrpc":"2.0","id":1,"+AG0-ethod":"tools/call","params":{"name":"delete_records"}}"#;
        assert!(rb(Some("application/json; charset=utf-7"), utf7).is_err());
        assert!(rb(Some("application/json; charset=latin1"), br#"{"a":1}"#).is_err());
        // Undeclared charset: UTF-8, judged as usual.
        assert!(matches!(
            rb(Some("application/json"), br#"{"a":1}"#),
            Ok(Body::Opaque)
        ));
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

    fn sd(body: &[u8]) -> ServerData {
        server_data(body, &JsonLimits::default())
    }

    #[test]
    fn server_answers_without_jsonrpc_are_inert() {
        let inert: &[&[u8]] = &[
            // OAuth bearer errors (RFC 6750), the TypeScript SDK's requireBearerAuth.
            br#"{"error":"invalid_token","error_description":"Missing Authorization header"}"#,
            br#"{"error":"insufficient_scope","error_description":"x","error_uri":"https://a"}"#,
            // Metadata documents.
            br#"{"issuer":"https://as.example","authorization_endpoint":"https://as.example/a"}"#,
            br#"{"resource":"https://mcp.example/mcp","authorization_servers":["https://as"]}"#,
            br#"{"method":"GET","result":1,"id":3}"#,
            br#"[{"error":"x"},{"result":1}]"#,
            b"[]",
            b"<html>redirect</html>",
            b"",
            b"  ",
            // Not strict JSON, and nothing in it can spell jsonrpc.
            br#"{"a":1,"a":2}"#,
            b"{not json",
            // A JSON-RPC "response" no client can match: no id, no method.
            br#"{"jsonrpc":"2.0","result":{}}"#,
            br#"{"jsonrpc":"2.0","result":{"tools":[{"name":"delete_records"}]}}"#,
            br#"{"jsonrpc":"2.0","error":{"code":1,"message":"m","extra":1}}"#,
            br#"[{"jsonrpc":"2.0","result":{}},{"jsonrpc":"2.0","error":{}}]"#,
            // Binary with zero bytes that is no JSON in any encoding.
            b"\x00\x01\x02\x03binary",
        ];
        for b in inert {
            assert!(
                matches!(sd(b), ServerData::Inert),
                "{}",
                String::from_utf8_lossy(b)
            );
        }
    }

    #[test]
    fn server_messages_claiming_jsonrpc_are_judged() {
        let judged: &[&[u8]] = &[
            br#"{"jsonrpc":"2.0","id":1,"result":{"tools":[]}}"#,
            br#"{"jsonrpc":"2.0","id":1,"error":{"code":1,"message":"m"}}"#,
            br#"{"jsonrpc":"2.0","method":"sampling/createMessage","id":"s"}"#,
            br#"{"jsonrpc":"2.0","method":"notifications/message"}"#,
            // Case variants and escapes of the key: judged (and refused there).
            br#"{"JSONRPC":"2.0","id":1,"result":{}}"#,
            br#"{"jsonrpc":"2.0","id":1,"result":{}}"#,
            br#"{"jsonrpc":"1.0","id":1,"result":{}}"#,
            br#"{"jsonrpc":"2.0","ID":1,"result":{}}"#,
            br#"{"jsonrpc":"2.0","id":null,"result":{}}"#,
            br#"[{"jsonrpc":"2.0","result":{}},{"jsonrpc":"2.0","id":2,"result":{}}]"#,
            br#"[{"a":1},{"jsonrpc":"2.0","id":2,"result":{}}]"#,
            // A UTF-8 BOM, which fetch's json() and Python skip.
            b"\xef\xbb\xbf{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}",
        ];
        for b in judged {
            assert!(
                matches!(sd(b), ServerData::JsonRpc(_)),
                "{}",
                String::from_utf8_lossy(b)
            );
        }
    }

    #[test]
    fn server_messages_that_may_claim_jsonrpc_unjudged_are_refused() {
        let mut wide = Vec::new();
        for u in r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[]}}"#.encode_utf16() {
            wide.extend_from_slice(&u.to_le_bytes());
        }
        let ambiguous: Vec<Vec<u8>> = vec![
            // Lenient parsers keep the last duplicate key.
            br#"{"jsonrpc":"2.0","id":1,"result":{},"result":{"tools":[]}}"#.to_vec(),
            br#"{"JsonRpc":"2.0","id":1,"result":{}} trailing"#.to_vec(),
            br#"{"jsonrpc":"2.0","id":1,"result":{},}"#.to_vec(),
            b"{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"t\":\"\xff\"},}".to_vec(),
            br#"{"jsonrpc":"2.0","id":1,"result":{"n":NaN}}"#.to_vec(),
            wide,
        ];
        for b in &ambiguous {
            assert!(
                matches!(sd(b), ServerData::Ambiguous(_)),
                "{}",
                String::from_utf8_lossy(b)
            );
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

    #[test]
    fn inside_a_tunnel_the_host_must_be_the_connect_target() {
        use crate::intercept::http::governor::TunnelTarget;
        let tunnel = |sni: Option<&str>| {
            let mut c = (*conn(sni)).clone();
            c.tunnel = Some(TunnelTarget {
                host: "mcp.example.com".into(),
                port: 443,
            });
            c
        };
        let uri: Uri = "/mcp".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("MCP.example.com.:443"));
        assert_eq!(
            server_name(&tunnel(Some("mcp.example.com")), &h, &uri).unwrap(),
            "mcp.example.com"
        );
        assert_eq!(
            server_name(&tunnel(None), &h, &uri).unwrap(),
            "mcp.example.com"
        );
        let mut other = HeaderMap::new();
        other.insert("host", HeaderValue::from_static("trusted.example.com"));
        let e = server_name(&tunnel(None), &other, &uri).unwrap_err();
        assert!(
            e.0.contains("not the target of the CONNECT tunnel"),
            "{}",
            e.0
        );
        let abs: Uri = "http://trusted.example.com/mcp".parse().unwrap();
        assert!(server_name(&tunnel(None), &HeaderMap::new(), &abs).is_err());
    }
}
