//! The upstream's connection lifecycle, limits and answers, as the agent sees
//! them through the proxy: a server closing, resetting or idling out its
//! connection, answers kya stops relaying, and which answers kya judges. The
//! upstream here is raw TCP so each test controls exactly which bytes, and
//! when FINs, are sent.

mod proxy_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kya_agent::intercept::http::{HttpVersion, Limits};
use proxy_support::*;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// Generous bound on anything that must happen; a hang fails the test.
const PATIENCE: Duration = Duration::from_secs(20);

/// Read one HTTP/1.1 request (head and Content-Length body); None at EOF.
async fn read_request(r: &mut BufReader<TcpStream>) -> Option<(String, Vec<u8>)> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body).await.ok()?;
    Some((head, body))
}

fn response(extra: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

fn result_for(body: &[u8], text: &str) -> Vec<u8> {
    let req: Value = serde_json::from_slice(body).unwrap();
    serde_json::to_vec(&json!({"jsonrpc": "2.0", "id": req["id"], "result": {
        "content": [{"type": "text", "text": text}], "isError": false}}))
    .unwrap()
}

fn call_bytes(id: u64, tool: &str) -> Vec<u8> {
    serde_json::to_vec(&call(id, tool, json!({}))).unwrap()
}

/// A raw HTTP/1.1 POST from the agent, then everything until the proxy closes.
async fn post_until_eof(proxy: std::net::SocketAddr, body: &[u8]) -> String {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let head = format!(
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut out))
        .await
        .expect("the proxy must close the agent's connection")
        .ok();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn connection_close_from_the_server_is_forwarded_and_the_agent_side_closes() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut r = BufReader::new(s);
                if let Some((_, body)) = read_request(&mut r).await {
                    let out = response("Connection: close\r\n", &result_for(&body, "done"));
                    let _ = r.get_mut().write_all(&out).await;
                }
            });
        }
    });
    let proxy = proxy(up, default_gov(), Limits::default(), HttpVersion::H1, None).await;
    let got = post_until_eof(proxy, &call_bytes(1, "search")).await;
    let lower = got.to_ascii_lowercase();
    assert!(lower.starts_with("http/1.1 200"), "{got}");
    assert!(lower.contains("\r\nconnection: close\r\n"), "{got}");
    assert!(got.contains("\"text\":\"done\""), "{got}");
}

#[tokio::test]
async fn a_request_the_server_may_have_read_is_never_sent_twice() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut r = BufReader::new(s);
                // Read the request, then close without an answer (a crash).
                if read_request(&mut r).await.is_some() {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    });
    let proxy = proxy(up, default_gov(), Limits::default(), HttpVersion::H1, None).await;
    let got = post_until_eof(proxy, &call_bytes(1, "search")).await;
    // As direct: the connection ends without an answer, not with kya's 502.
    assert_eq!(got, "", "the agent must see the server's close");
    assert_eq!(seen.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_call_approved_after_the_server_closed_the_idle_connection_goes_over_a_new_one() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    let (held_tx, held_rx) = oneshot::channel::<()>();
    let (noticed_tx, noticed_rx) = oneshot::channel::<()>();
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    tokio::spawn(async move {
        // First connection: idle while the call is held, then timed out by
        // the server; it waits until the proxy has closed its side too.
        let (first, _) = listener.accept().await.unwrap();
        let _ = held_rx.await;
        let mut first = first;
        first.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let _ = first.read_to_end(&mut rest).await;
        assert!(rest.is_empty(), "nothing was sent on the idle connection");
        let _ = noticed_tx.send(());
        // The next connection carries the approved call.
        let (second, _) = listener.accept().await.unwrap();
        let mut r = BufReader::new(second);
        if let Some((_, body)) = read_request(&mut r).await {
            counter.fetch_add(1, Ordering::SeqCst);
            let out = response("", &result_for(&body, "transferred"));
            let _ = r.get_mut().write_all(&out).await;
        }
    });
    let gov = FakeGov::new(&[("transfer", Act::Hold(Duration::from_secs(60)))]);
    let proxy = proxy(up, gov.clone(), Limits::default(), HttpVersion::H1, None).await;
    let mut client = Client::h1(proxy).await;
    let call = tokio::spawn(async move {
        client
            .post(
                "/mcp",
                call_bytes(7, "transfer"),
                &[("accept", "application/json")],
            )
            .await
    });
    gov.wait_for_hold("transfer").await;
    held_tx.send(()).unwrap();
    tokio::time::timeout(PATIENCE, noticed_rx)
        .await
        .expect("the proxy closes its side of the ended connection")
        .unwrap();
    gov.release("transfer", true).await;
    let (status, _, body) = tokio::time::timeout(PATIENCE, call)
        .await
        .expect("the approved call is answered")
        .unwrap();
    assert_eq!(status, 200);
    let v = json_of(&body);
    assert_eq!(v["id"], 7, "{v}");
    assert_eq!(v["result"]["content"][0]["text"], "transferred", "{v}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_event_over_the_limit_is_an_immediate_error_for_the_call() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    let (done_tx, done_rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let mut r = BufReader::new(s);
        let Some(_) = read_request(&mut r).await else {
            return;
        };
        let w = r.get_mut();
        w.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .await
        .unwrap();
        let event = format!("event: message\ndata: {}\n\n", "x".repeat(4096));
        let chunk = format!("{:x}\r\n{event}\r\n", event.len());
        w.write_all(chunk.as_bytes()).await.unwrap();
        // The stream stays open: only kya can end this exchange.
        let _ = done_rx.await;
    });
    let limits = Limits {
        max_sse_event: 1024,
        ..Limits::default()
    };
    let gov = default_gov();
    let proxy = proxy(up, gov.clone(), limits.clone(), HttpVersion::H1, None).await;
    let mut client = Client::h1(proxy).await;
    let req = post_req("/mcp", &call(9, "search", json!({})), true, &[]);
    let mut resp = client.send(req).await;
    let events = read_events(resp.body_mut(), 1, PATIENCE).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["id"], 9, "{events:?}");
    let msg = events[0]["error"]["message"].as_str().unwrap_or("");
    assert!(msg.contains("not delivered"), "{msg}");
    assert!(
        gov.refusals
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.contains("event stream refused")),
        "audited"
    );
    assert_eq!(
        limits
            .refusals
            .sse_event
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "counted"
    );
    let _ = done_tx.send(());
}

#[tokio::test]
async fn a_json_answer_over_the_limit_is_an_error_for_each_request() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut r = BufReader::new(s);
                while let Some((_, body)) = read_request(&mut r).await {
                    let big = "y".repeat(8192);
                    let out = response("", &result_for(&body, &big));
                    if r.get_mut().write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let limits = Limits {
        max_response_body: 4096,
        ..Limits::default()
    };
    let gov = default_gov();
    let proxy = proxy(up, gov.clone(), limits.clone(), HttpVersion::H1, None).await;
    let mut client = Client::h1(proxy).await;
    let (status, _, body) = client.post("/mcp", call_bytes(3, "search"), &[]).await;
    assert_eq!(status, 200);
    let v = json_of(&body);
    assert_eq!(v["id"], 3, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not delivered") && m.contains("4096")),
        "{v}"
    );
    assert!(!gov.refusals.lock().unwrap().is_empty(), "audited");
    assert_eq!(
        limits
            .refusals
            .response
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "counted"
    );
    // A batch: an error for each of its requests, as an array.
    let batch = serde_json::to_vec(&json!([
        call(5, "search", json!({})),
        call(6, "search", json!({}))
    ]))
    .unwrap();
    let (status, _, body) = client.post("/mcp", batch, &[]).await;
    assert_eq!(status, 200);
    let v = json_of(&body);
    let ids: Vec<&Value> = v
        .as_array()
        .map(|a| a.iter().map(|e| &e["id"]).collect())
        .unwrap_or_default();
    assert_eq!(ids, [&json!(5), &json!(6)], "{v}");
}

/// A raw upstream answering every request with `answer(request body)`.
async fn answering(answer: fn(&[u8]) -> Vec<u8>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut r = BufReader::new(s);
                while let Some((_, body)) = read_request(&mut r).await {
                    if r.get_mut().write_all(&answer(&body)).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    up
}

fn tools_list(id: u64) -> Vec<u8> {
    serde_json::to_vec(&json!({"jsonrpc": "2.0", "id": id, "method": "tools/list"})).unwrap()
}

#[tokio::test]
async fn a_tools_list_behind_a_bom_is_still_filtered() {
    let up = answering(|body| {
        let req: Value = serde_json::from_slice(body).unwrap();
        let mut out = b"\xef\xbb\xbf".to_vec();
        out.extend(
            serde_json::to_vec(&json!({"jsonrpc": "2.0", "id": req["id"], "result": {
                "tools": [{"name": "search"}, {"name": "secret_wipe"}]}}))
            .unwrap(),
        );
        response("", &out)
    })
    .await;
    let gov = default_gov();
    gov.hidden.lock().unwrap().push("secret_wipe".into());
    let proxy = proxy(up, gov, Limits::default(), HttpVersion::H1, None).await;
    let mut client = Client::h1(proxy).await;
    let (status, _, body) = client.post("/mcp", tools_list(1), &[]).await;
    assert_eq!(status, 200);
    let v = json_of(&body);
    assert_eq!(v["result"]["tools"], json!([{"name": "search"}]), "{v}");
}

#[tokio::test]
async fn json_rpc_in_utf16_from_the_server_is_refused() {
    let up = answering(|_| {
        let text = r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"secret_wipe"}]}}"#;
        let mut out = vec![0xff, 0xfe];
        for u in text.encode_utf16() {
            out.extend_from_slice(&u.to_le_bytes());
        }
        response("", &out)
    })
    .await;
    let gov = default_gov();
    let proxy = proxy(up, gov.clone(), Limits::default(), HttpVersion::H1, None).await;
    let mut client = Client::h1(proxy).await;
    let (status, _, body) = client.post("/mcp", tools_list(1), &[]).await;
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&body));
    assert!(!String::from_utf8_lossy(&body).contains("secret"));
    assert!(!gov.refusals.lock().unwrap().is_empty(), "audited");
}

#[tokio::test]
async fn oauth_errors_and_id_less_answers_pass_byte_for_byte() {
    let up = answering(|body| {
        let req: Value = serde_json::from_slice(body).unwrap();
        if req["method"] == "initialize" {
            let b = br#"{"error":"invalid_token","error_description":"Missing Authorization header"}"#;
            let mut out = format!(
                "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nWWW-Authenticate: Bearer resource_metadata=\"http://127.0.0.1/.well-known/oauth-protected-resource\"\r\nContent-Length: {}\r\n\r\n",
                b.len()
            )
            .into_bytes();
            out.extend_from_slice(b);
            out
        } else {
            response("", br#"{ "jsonrpc" : "2.0", "result" : {} }"#)
        }
    })
    .await;
    let proxy = proxy(up, default_gov(), Limits::default(), HttpVersion::H1, None).await;
    let mut client = Client::h1(proxy).await;
    let init = serde_json::to_vec(&json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}))
    .unwrap();
    let (status, headers, body) = client.post("/mcp", init, &[]).await;
    assert_eq!(status, 401);
    assert!(headers
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Bearer resource_metadata=")));
    assert_eq!(
        &body[..],
        br#"{"error":"invalid_token","error_description":"Missing Authorization header"}"#
    );
    let note =
        serde_json::to_vec(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .unwrap();
    let (status, _, body) = client.post("/mcp", note, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(&body[..], br#"{ "jsonrpc" : "2.0", "result" : {} }"#);
}

#[tokio::test]
async fn judged_answers_delivered_whole_keep_the_servers_bytes() {
    let up = answering(|body| {
        let req: Value = serde_json::from_slice(body).unwrap();
        let text = if req["method"] == "tools/list" {
            format!(
                r#"{{ "jsonrpc": "2.0", "id": {}, "result": {{ "tools": [ {{ "name": "search" }}, {{ "name": "secret_wipe" }} ] }} }}"#,
                req["id"]
            )
        } else {
            format!(
                r#"{{ "result": {{ "content": [ {{ "type": "text", "text": "caf\u00e9 1.50" }} ] }}, "id": {}, "jsonrpc": "2.0" }}"#,
                req["id"]
            )
        };
        response("", text.as_bytes())
    })
    .await;
    let gov = default_gov();
    gov.hidden.lock().unwrap().push("secret_wipe".into());
    let proxy = proxy(up, gov, Limits::default(), HttpVersion::H1, None).await;
    let mut client = Client::h1(proxy).await;
    // A result nothing in kya changes: the server's own bytes.
    let (status, _, body) = client.post("/mcp", call_bytes(2, "search_docs"), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(
        String::from_utf8_lossy(&body),
        r#"{ "result": { "content": [ { "type": "text", "text": "caf\u00e9 1.50" } ] }, "id": 2, "jsonrpc": "2.0" }"#
    );
    // A tools/list kya filters: rewritten, without the hidden tool.
    let (status, _, body) = client.post("/mcp", tools_list(3), &[]).await;
    assert_eq!(status, 200);
    let v = json_of(&body);
    assert_eq!(v["result"]["tools"], json!([{"name": "search"}]), "{v}");
}
