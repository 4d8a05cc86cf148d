//! The proxy enforces allow / deny / batch rules and refuses hostile input, each
//! asserted on the upstream's own record, with a paired harmless request on the
//! same path that must succeed.

mod proxy_support;

use std::io::Write;
use std::time::Duration;

use kya_agent::config::DenyShape;
use kya_agent::intercept::http::{HttpVersion, Limits};
use proxy_support::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn setup(limits: Limits) -> (Upstream, std::sync::Arc<FakeGov>, Client) {
    let up = upstream().await;
    let gov = default_gov();
    let addr = proxy(up.addr, gov.clone(), limits, HttpVersion::H1, None).await;
    (up, gov, Client::h1(addr).await)
}

fn text_of(v: &Value) -> String {
    v["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[tokio::test]
async fn allow_forwards_and_returns_the_upstream_result() {
    let (up, gov, mut c) = setup(Limits::default()).await;
    let (status, _, body) = c
        .post(
            "/mcp",
            call(1, "search_docs", json!({"q": "x"})).to_string(),
            &[],
        )
        .await;
    assert_eq!(status, 200);
    let v = json_of(&body);
    assert_eq!(v["id"], json!(1));
    assert_eq!(text_of(&v), r#"ran search_docs with {"q":"x"}"#);
    assert_eq!(up.tools_called(), vec!["search_docs"]);
    assert_eq!(gov.decided_tools(), vec!["search_docs"]);
    let facts = gov.calls.lock().unwrap()[0].clone();
    assert_eq!(facts.args, json!({"q": "x"}));
    assert_eq!(facts.jsonrpc_id, Some(json!(1)));
    assert_eq!(facts.server, "127.0.0.1");
}

#[tokio::test]
async fn deny_answers_as_tool_error_and_nothing_reaches_upstream() {
    let (up, _gov, mut c) = setup(Limits::default()).await;
    let (status, _, body) = c
        .post(
            "/mcp",
            call(7, "delete_records", json!({})).to_string(),
            &[],
        )
        .await;
    assert_eq!(status, 200);
    let v = json_of(&body);
    assert_eq!(v["id"], json!(7));
    assert_eq!(v["result"]["isError"], json!(true));
    assert!(text_of(&v).starts_with(
        "kya denied this call: delete_records is not allowed (rule no-delete_records, decision d-"
    ));
    assert!(up.seen().is_empty());
    // Paired: the same path, an allowed call, on the same connection.
    let (s, _, _) = c
        .post("/mcp", call(8, "search_docs", json!({})).to_string(), &[])
        .await;
    assert_eq!(s, 200);
    assert_eq!(up.tools_called(), vec!["search_docs"]);
}

#[tokio::test]
async fn deny_answers_as_jsonrpc_error_when_configured() {
    let limits = Limits {
        deny_shape: DenyShape::JsonrpcError,
        ..Limits::default()
    };
    let (up, _gov, mut c) = setup(limits).await;
    let (_, _, body) = c
        .post(
            "/mcp",
            call(9, "delete_records", json!({})).to_string(),
            &[],
        )
        .await;
    let v = json_of(&body);
    assert_eq!(v["error"]["code"], json!(-32001));
    assert_eq!(v["error"]["data"]["rule"], json!("no-delete_records"));
    assert!(up.seen().is_empty());
}

#[tokio::test]
async fn denied_notification_gets_202_and_is_not_forwarded() {
    let up = upstream().await;
    let gov = FakeGov::new(&[("notifications/initialized", Act::Deny)]);
    let addr = proxy(up.addr, gov, Limits::default(), HttpVersion::H1, None).await;
    let mut c = Client::h1(addr).await;
    let (s, _, b) = c
        .post(
            "/mcp",
            json!({"jsonrpc":"2.0","method":"notifications/initialized"}).to_string(),
            &[],
        )
        .await;
    assert_eq!(s, 202);
    assert!(b.is_empty());
    assert!(up.seen().is_empty());
}

#[tokio::test]
async fn batch_with_a_hidden_denied_call_forwards_nothing() {
    let (up, gov, mut c) = setup(Limits::default()).await;
    let batch = json!([call(1, "search_docs", json!({})), call(2, "delete_records", json!({})),
        {"jsonrpc":"2.0","method":"notifications/initialized"}]);
    let (status, _, body) = c.post("/mcp", batch.to_string(), &[]).await;
    assert_eq!(status, 200);
    let v = json_of(&body);
    let arr = v.as_array().unwrap();
    assert_eq!(
        arr.len(),
        2,
        "one answer per request, none for the notification"
    );
    assert_eq!(arr[0]["id"], json!(1));
    assert!(text_of(&arr[0]).contains("refused: part of a batch with a denied call"));
    assert_eq!(arr[1]["id"], json!(2));
    assert!(text_of(&arr[1]).contains("delete_records is not allowed"));
    assert!(up.seen().is_empty());
    assert_eq!(
        gov.calls
            .lock()
            .unwrap()
            .iter()
            .map(|c| c.batch)
            .collect::<Vec<_>>(),
        vec![Some((0, 3)), Some((1, 3)), Some((2, 3))]
    );
    // Paired: an all-allowed batch goes through as one canonical body.
    let ok = json!([
        call(3, "search_docs", json!({})),
        call(4, "search_docs", json!({"a": 1}))
    ]);
    let (_, _, body) = c.post("/mcp", ok.to_string(), &[]).await;
    assert_eq!(json_of(&body).as_array().unwrap().len(), 2);
    assert_eq!(up.tools_called(), vec!["search_docs", "search_docs"]);
}

/// Send a hostile body, assert it was refused and never reached the upstream, then a
/// harmless request on the same path that must succeed.
async fn hostile(body: &[u8], headers: &[(&str, &str)]) -> (u16, Value, std::sync::Arc<FakeGov>) {
    let (up, gov, mut c) = setup(Limits::default()).await;
    let (status, _, resp) = c.post("/mcp", body.to_vec(), headers).await;
    let v: Value = serde_json::from_slice(&resp).unwrap_or(Value::Null);
    assert!(
        up.seen().is_empty(),
        "hostile request reached upstream: {:?}",
        up.seen()
    );
    let mut c2 = Client::h1(c.addr).await;
    let (s, _, b) = c2
        .post("/mcp", call(99, "search_docs", json!({})).to_string(), &[])
        .await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(up.tools_called(), vec!["search_docs"]);
    (status, v, gov)
}

#[tokio::test]
async fn duplicate_keys_refused() {
    let b = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_docs","name":"delete_records"}}"#;
    let (status, v, gov) = hostile(b, &[]).await;
    assert_eq!(status, 400);
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("duplicate key"));
    assert_eq!(gov.refusals.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn case_variant_keys_refused() {
    let b = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_docs","Name":"delete_records"}}"#;
    let (status, _, _) = hostile(b, &[]).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn escaped_method_is_decided_as_tools_call() {
    let b = br#"{"jsonrpc":"2.0","id":1,"method":"tools\u002fcall","params":{"name":"delete_records"}}"#;
    let (status, v, gov) = hostile(b, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(v["result"]["isError"], json!(true));
    assert_eq!(gov.decided_tools()[0], "delete_records");
}

#[tokio::test]
async fn escaped_allowed_call_is_forwarded_canonically() {
    let (up, _gov, mut c) = setup(Limits::default()).await;
    let b =
        br#"{ "params":{"name":"search_docs"}, "id":1,"method":"tools\u002fcall","jsonrpc":"2.0"}"#;
    let (s, _, _) = c.post("/mcp", b.to_vec(), &[]).await;
    assert_eq!(s, 200);
    let seen = up.seen();
    assert_eq!(
        &seen[0].body[..],
        br#"{"id":1,"jsonrpc":"2.0","method":"tools/call","params":{"name":"search_docs"}}"#
    );
    assert_eq!(
        seen[0].headers["content-length"],
        seen[0].body.len().to_string().as_str()
    );
}

#[tokio::test]
async fn not_declared_json_is_still_inspected() {
    let (up, _gov, mut c) = setup(Limits::default()).await;
    let req = hyper::Request::post("/mcp")
        .header("host", "127.0.0.1")
        .header("content-type", "text/plain")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            call(1, "delete_records", json!({})).to_string(),
        )))
        .unwrap();
    let resp = c.send(req).await;
    assert_eq!(resp.status(), 200);
    assert!(up.seen().is_empty());
}

#[tokio::test]
async fn oversize_body_refused() {
    let limits = Limits {
        max_body: 1024,
        ..Limits::default()
    };
    let (up, _gov, mut c) = setup(limits).await;
    let big = call(1, "search_docs", json!({"q": "x".repeat(2000)})).to_string();
    let (s, _, _) = c.post("/mcp", big, &[]).await;
    assert_eq!(s, 413);
    assert!(up.seen().is_empty());
    let mut c2 = Client::h1(c.addr).await;
    let (s, _, _) = c2
        .post("/mcp", call(2, "search_docs", json!({})).to_string(), &[])
        .await;
    assert_eq!(s, 200);
    assert_eq!(up.tools_called(), vec!["search_docs"]);
}

#[tokio::test]
async fn mcp_name_header_mismatch_refused() {
    let body = call(1, "delete_records", json!({})).to_string();
    let (status, v, _) = hostile(
        body.as_bytes(),
        &[("mcp-method", "tools/call"), ("mcp-name", "search_docs")],
    )
    .await;
    assert_eq!(status, 200);
    assert!(text_of(&v).contains("header Mcp-Name"), "{v}");
}

#[tokio::test]
async fn mcp_headers_that_agree_pass() {
    let (up, _gov, mut c) = setup(Limits::default()).await;
    let (s, _, _) = c
        .post(
            "/mcp",
            call(1, "search_docs", json!({})).to_string(),
            &[("mcp-method", "tools/call"), ("mcp-name", "search_docs")],
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(up.tools_called(), vec!["search_docs"]);
}

#[tokio::test]
async fn host_not_matching_sni_refused() {
    let up = upstream().await;
    let gov = default_gov();
    let addr = proxy(
        up.addr,
        gov.clone(),
        Limits::default(),
        HttpVersion::H1,
        Some("mcp.test"),
    )
    .await;
    let mut c = Client::h1(addr).await;
    // Client::post sends Host: 127.0.0.1:PORT, which is not the SNI.
    let (s, _, _) = c
        .post("/mcp", call(1, "search_docs", json!({})).to_string(), &[])
        .await;
    assert_eq!(s, 421);
    assert!(up.seen().is_empty());
    assert!(gov.refusals.lock().unwrap()[0].contains("domain fronting"));
    // Paired: the right Host on a new connection.
    let mut c2 = Client::h1(addr).await;
    let req = hyper::Request::post("/mcp")
        .header("host", "MCP.test:443")
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            call(2, "search_docs", json!({})).to_string(),
        )))
        .unwrap();
    assert_eq!(c2.send(req).await.status(), 200);
    assert_eq!(up.tools_called(), vec!["search_docs"]);
    assert_eq!(gov.calls.lock().unwrap()[0].server, "mcp.test");
}

#[tokio::test]
async fn slow_drip_body_gets_408_and_close() {
    let up = upstream().await;
    let gov = default_gov();
    let limits = Limits {
        body_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let addr = proxy(up.addr, gov, limits, HttpVersion::H1, None).await;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = call(1, "delete_records", json!({})).to_string();
    s.write_all(format!("POST /mcp HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n", body.len()).as_bytes()).await.unwrap();
    s.write_all(&body.as_bytes()[..5]).await.unwrap();
    let mut out = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(r.is_ok(), "connection not closed");
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(up.seen().is_empty());
    let mut c = Client::h1(addr).await;
    let (st, _, _) = c
        .post("/mcp", call(2, "search_docs", json!({})).to_string(), &[])
        .await;
    assert_eq!(st, 200);
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

#[tokio::test]
async fn gzip_body_is_decoded_and_decided() {
    let (up, gov, mut c) = setup(Limits::default()).await;
    let denied = gzip(call(1, "delete_records", json!({})).to_string().as_bytes());
    let (s, _, b) = c
        .post("/mcp", denied, &[("content-encoding", "gzip")])
        .await;
    assert_eq!(s, 200);
    assert_eq!(json_of(&b)["result"]["isError"], json!(true));
    assert!(up.seen().is_empty());
    let allowed = gzip(call(2, "search_docs", json!({})).to_string().as_bytes());
    let (s, _, _) = c
        .post("/mcp", allowed, &[("content-encoding", "gzip")])
        .await;
    assert_eq!(s, 200);
    let seen = up.seen();
    assert_eq!(up.tools_called(), vec!["search_docs"]);
    assert!(
        seen[0].headers.get("content-encoding").is_none(),
        "forwarded decoded"
    );
    assert_eq!(gov.decided_tools(), vec!["delete_records", "search_docs"]);
}

#[tokio::test]
async fn unknown_encoding_refused() {
    let body = call(1, "search_docs", json!({})).to_string();
    let (status, _, gov) = hostile(body.as_bytes(), &[("content-encoding", "zstd")]).await;
    assert_eq!(status, 415);
    assert!(gov.refusals.lock().unwrap()[0].contains("zstd"));
}

#[tokio::test]
async fn non_mcp_traffic_passes_unchanged() {
    let (up, gov, mut c) = setup(Limits::default()).await;
    let req = hyper::Request::post("/upload")
        .header("host", "127.0.0.1")
        .header("content-type", "application/octet-stream")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            b"\x00\x01binary",
        )))
        .unwrap();
    let resp = c.send(req).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(&up.seen()[0].body[..], b"\x00\x01binary");
    assert!(gov.calls.lock().unwrap().is_empty());
}

#[tokio::test]
async fn tools_list_is_filtered() {
    let (_up, gov, mut c) = setup(Limits::default()).await;
    gov.hidden.lock().unwrap().push("delete_records".into());
    let (_, _, b) = c
        .post(
            "/mcp",
            json!({"jsonrpc":"2.0","id":1,"method":"tools/list"}).to_string(),
            &[],
        )
        .await;
    let v = json_of(&b);
    let names: Vec<&str> = v["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["search_docs", "transfer"]);
}

#[tokio::test]
async fn session_headers_reach_the_governor() {
    let (_up, gov, mut c) = setup(Limits::default()).await;
    c.post(
        "/mcp",
        call(1, "search_docs", json!({})).to_string(),
        &[
            ("mcp-session-id", "sess-1"),
            ("mcp-protocol-version", "2025-06-18"),
        ],
    )
    .await;
    let f = gov.calls.lock().unwrap()[0].clone();
    assert_eq!(f.session.as_deref(), Some("sess-1"));
    assert_eq!(f.protocol_version.as_deref(), Some("2025-06-18"));
}

#[tokio::test]
async fn h2_on_both_legs() {
    let up = upstream().await;
    let gov = default_gov();
    let addr = proxy(up.addr, gov, Limits::default(), HttpVersion::Detect, None).await;
    let mut c = Client::h2(addr).await;
    let (s, _, b) = c
        .post("/mcp", call(1, "search_docs", json!({})).to_string(), &[])
        .await;
    assert_eq!(s, 200);
    assert!(text_of(&json_of(&b)).starts_with("ran search_docs"));
    let (_, _, b) = c
        .post(
            "/mcp",
            call(2, "delete_records", json!({})).to_string(),
            &[],
        )
        .await;
    assert_eq!(json_of(&b)["result"]["isError"], json!(true));
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].version, http::Version::HTTP_2);
}

#[tokio::test]
async fn h1_pipelined_requests() {
    let (up, _gov, c) = setup(Limits::default()).await;
    let mut s = tokio::net::TcpStream::connect(c.addr).await.unwrap();
    let a = call(1, "search_docs", json!({})).to_string();
    let b = call(2, "delete_records", json!({})).to_string();
    let mut wire = String::new();
    for body in [&a, &b] {
        wire.push_str(&format!("POST /mcp HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len()));
    }
    wire.push_str("GET /done HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    s.write_all(wire.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert_eq!(text.matches("HTTP/1.1 200").count(), 3, "{text}");
    assert!(text.contains("ran search_docs"));
    assert!(text.contains("kya denied this call"));
    assert_eq!(up.tools_called(), vec!["search_docs"]);
}
