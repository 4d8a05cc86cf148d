//! Held calls: released, denied, timed out, cancelled, abandoned; progress while held.

mod proxy_support;

use std::time::Duration;

use http_body_util::BodyExt;
use kya_agent::intercept::http::{HttpVersion, Limits};
use proxy_support::*;
use serde_json::json;

fn limits() -> Limits {
    Limits {
        progress_interval: Duration::from_millis(100),
        ..Limits::default()
    }
}

#[tokio::test]
async fn hold_released_forwards_after_approval() {
    let up = upstream().await;
    let gov = default_gov();
    let addr = proxy(up.addr, gov.clone(), limits(), HttpVersion::H1, None).await;
    let mut c = Client::h1(addr).await;
    let g = gov.clone();
    let seen = up.seen.clone();
    let releaser = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(seen.lock().unwrap().is_empty(), "forwarded before approval");
        g.release("transfer", true).await;
    });
    let (s, _, b) = c
        .post(
            "/mcp",
            call(1, "transfer", json!({"amount": 5000, "to": "bob"})).to_string(),
            &[("accept", "application/json")],
        )
        .await;
    releaser.await.unwrap();
    assert_eq!(s, 200);
    let v = json_of(&b);
    assert_eq!(v["id"], json!(1));
    assert!(v["result"]["content"][0]["text"]
        .as_str()
        .unwrap()
        .starts_with("ran transfer"));
    assert_eq!(up.tools_called(), vec!["transfer"]);
}

#[tokio::test]
async fn hold_denied_by_owner() {
    let up = upstream().await;
    let gov = default_gov();
    let addr = proxy(up.addr, gov.clone(), limits(), HttpVersion::H1, None).await;
    let mut c = Client::h1(addr).await;
    let g = gov.clone();
    tokio::spawn(async move { g.release("transfer", false).await });
    let (_, _, b) = c
        .post("/mcp", call(1, "transfer", json!({})).to_string(), &[])
        .await;
    let v = json_of(&b);
    assert_eq!(v["result"]["isError"], json!(true));
    assert!(v["result"]["content"][0]["text"]
        .as_str()
        .unwrap()
        .contains("denied by the owner"));
    assert!(up.seen().is_empty());
}

#[tokio::test]
async fn hold_times_out_into_a_denial() {
    let up = upstream().await;
    let gov = FakeGov::new(&[("transfer", Act::Hold(Duration::from_millis(200)))]);
    let addr = proxy(up.addr, gov, limits(), HttpVersion::H1, None).await;
    let mut c = Client::h1(addr).await;
    let (_, _, b) = c
        .post("/mcp", call(1, "transfer", json!({})).to_string(), &[])
        .await;
    assert!(json_of(&b)["result"]["content"][0]["text"]
        .as_str()
        .unwrap()
        .contains("hold timed out"));
    assert!(up.seen().is_empty());
}

#[tokio::test]
async fn progress_notifications_while_held_then_the_result() {
    let up = upstream().await;
    let gov = default_gov();
    let addr = proxy(up.addr, gov.clone(), limits(), HttpVersion::H1, None).await;
    let mut c = Client::h1(addr).await;
    let body = json!({"jsonrpc":"2.0","id":5,"method":"tools/call",
        "params":{"name":"transfer","arguments":{"amount":5000},"_meta":{"progressToken":"pt-1"}}});
    let resp = c.send(post_req("/mcp", &body, true, &[])).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut incoming = resp.into_body();
    let first = read_events(&mut incoming, 2, Duration::from_secs(5)).await;
    assert!(first.len() >= 2);
    for p in &first {
        assert_eq!(p["method"], json!("notifications/progress"));
        assert_eq!(p["params"]["progressToken"], json!("pt-1"));
        assert_eq!(
            p["params"]["message"],
            json!("waiting for approval by alice, code WXYZ")
        );
    }
    assert!(up.seen().is_empty());
    gov.release("transfer", true).await;
    let rest = incoming.collect().await.unwrap().to_bytes();
    let msgs = sse_messages(&rest);
    let last = msgs.last().expect("a final message");
    assert_eq!(last["id"], json!(5));
    assert!(last["result"]["content"][0]["text"]
        .as_str()
        .unwrap()
        .starts_with("ran transfer"));
    assert_eq!(up.tools_called(), vec!["transfer"]);
}

#[tokio::test]
async fn progress_stream_ends_with_the_denial() {
    let up = upstream().await;
    let gov = default_gov();
    let addr = proxy(up.addr, gov.clone(), limits(), HttpVersion::H1, None).await;
    let mut c = Client::h1(addr).await;
    let body = json!({"jsonrpc":"2.0","id":6,"method":"tools/call",
        "params":{"name":"transfer","_meta":{"progressToken":7}}});
    let resp = c.send(post_req("/mcp", &body, true, &[])).await;
    let g = gov.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(250)).await;
        g.release("transfer", false).await;
    });
    let all = sse_messages(&resp.into_body().collect().await.unwrap().to_bytes());
    let last = all.last().unwrap();
    assert_eq!(last["id"], json!(6));
    assert_eq!(last["result"]["isError"], json!(true));
    assert!(all.iter().any(|m| m["method"] == "notifications/progress"));
    assert!(up.seen().is_empty());
}

#[tokio::test]
async fn cancelled_notification_ends_the_hold() {
    let up = upstream().await;
    let gov = default_gov();
    let addr = proxy(up.addr, gov.clone(), limits(), HttpVersion::H1, None).await;
    let held = tokio::spawn(async move {
        let mut c = Client::h1(addr).await;
        c.post(
            "/mcp",
            call(42, "transfer", json!({})).to_string(),
            &[("mcp-session-id", "S1")],
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut c2 = Client::h1(addr).await;
    let cancel = json!({"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":42,"reason":"user"}});
    let (s, _, _) = c2
        .post("/mcp", cancel.to_string(), &[("mcp-session-id", "S1")])
        .await;
    assert_eq!(s, 202);
    let (_, _, b) = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .unwrap()
        .unwrap();
    assert!(json_of(&b)["result"]["content"][0]["text"]
        .as_str()
        .unwrap()
        .contains("cancelled by the client"));
    assert!(up.tools_called().is_empty());
    assert_eq!(gov.abandoned.lock().unwrap().clone(), vec!["transfer"]);
}

#[tokio::test]
async fn cancel_for_another_session_does_not_end_the_hold() {
    let up = upstream().await;
    let gov = FakeGov::new(&[("transfer", Act::Hold(Duration::from_millis(600)))]);
    let addr = proxy(up.addr, gov.clone(), limits(), HttpVersion::H1, None).await;
    let held = tokio::spawn(async move {
        let mut c = Client::h1(addr).await;
        c.post(
            "/mcp",
            call(43, "transfer", json!({})).to_string(),
            &[("mcp-session-id", "A")],
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut c2 = Client::h1(addr).await;
    let cancel =
        json!({"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":43}});
    c2.post("/mcp", cancel.to_string(), &[("mcp-session-id", "B")])
        .await;
    let (_, _, b) = held.await.unwrap();
    assert!(json_of(&b)["result"]["content"][0]["text"]
        .as_str()
        .unwrap()
        .contains("hold timed out"));
}

#[tokio::test]
async fn client_disconnect_abandons_the_hold() {
    let up = upstream().await;
    let gov = default_gov();
    let addr = proxy(up.addr, gov.clone(), limits(), HttpVersion::H1, None).await;
    let mut c = Client::h1(addr).await;
    let body = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"transfer","_meta":{"progressToken":1}}});
    let resp = c.send(post_req("/mcp", &body, true, &[])).await;
    let mut incoming = resp.into_body();
    assert!(!read_events(&mut incoming, 1, Duration::from_secs(5))
        .await
        .is_empty());
    drop(incoming);
    drop(c);
    let mut abandoned = false;
    for _ in 0..100 {
        if !gov.abandoned.lock().unwrap().is_empty() {
            abandoned = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(abandoned, "the governor was not told");
    assert!(up.seen().is_empty());
}

#[tokio::test]
async fn too_many_holds_on_one_connection_are_denied() {
    let up = upstream().await;
    let gov = default_gov();
    let l = Limits {
        max_held_per_conn: 1,
        ..limits()
    };
    let addr = proxy(up.addr, gov.clone(), l, HttpVersion::H1, None).await;
    let mut c = Client::h1(addr).await;
    let batch = json!([
        call(1, "transfer", json!({})),
        call(2, "transfer", json!({}))
    ]);
    let (_, _, b) = c.post("/mcp", batch.to_string(), &[]).await;
    let v = json_of(&b);
    for m in v.as_array().unwrap() {
        assert!(m["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("too many calls held"));
    }
    assert!(up.seen().is_empty());
}

#[tokio::test]
async fn disconnect_without_sse_abandons_the_hold() {
    let up = upstream().await;
    let gov = default_gov();
    let addr = proxy(up.addr, gov.clone(), limits(), HttpVersion::H1, None).await;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = call(1, "transfer", json!({})).to_string();
    use tokio::io::AsyncWriteExt;
    s.write_all(
        format!("POST /mcp HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\naccept: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len()).as_bytes(),
    )
    .await
    .unwrap();
    gov.wait_for_hold("transfer").await;
    drop(s);
    let mut abandoned = false;
    for _ in 0..100 {
        if !gov.abandoned.lock().unwrap().is_empty() {
            abandoned = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(abandoned, "the governor was not told of the disconnect");
    assert!(up.seen().is_empty());
}

#[tokio::test]
async fn h2_hold_with_progress_and_stream_reset_abandons() {
    let up = upstream().await;
    let gov = default_gov();
    let addr = proxy(up.addr, gov.clone(), limits(), HttpVersion::Detect, None).await;
    let mut c = Client::h2(addr).await;
    let body = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"transfer","_meta":{"progressToken":1}}});
    let uri = format!("http://127.0.0.1:{}/mcp", addr.port());
    let resp = c.send(post_req(&uri, &body, true, &[])).await;
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let mut incoming = resp.into_body();
    let first = read_events(&mut incoming, 1, Duration::from_secs(5)).await;
    assert_eq!(first[0]["method"], json!("notifications/progress"));
    // Resetting the stream (dropping the body) while the connection stays up.
    drop(incoming);
    let mut abandoned = false;
    for _ in 0..100 {
        if !gov.abandoned.lock().unwrap().is_empty() {
            abandoned = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(abandoned, "the governor was not told");
    // The connection still serves: an allowed call on it succeeds.
    let (s, _, _) = c
        .post("/mcp", call(2, "search_docs", json!({})).to_string(), &[])
        .await;
    assert_eq!(s, 200);
    assert_eq!(up.tools_called(), vec!["search_docs"]);
}

/// Two client sessions of one process, without `Mcp-Session-Id` (a stateless
/// server), may hold calls with the same JSON-RPC id at once: both are held
/// and both are released, neither is refused as a duplicate.
#[tokio::test]
async fn same_id_held_twice_without_a_session_id() {
    let up = upstream().await;
    let gov = FakeGov::new(&[
        ("transfer", Act::Hold(Duration::from_secs(10))),
        ("refund", Act::Hold(Duration::from_secs(10))),
    ]);
    let addr = proxy(up.addr, gov.clone(), limits(), HttpVersion::H1, None).await;
    let mut a = Client::h1(addr).await;
    let mut b = Client::h1(addr).await;
    let first = tokio::spawn(async move {
        a.post("/mcp", call(1, "transfer", json!({})).to_string(), &[])
            .await
    });
    gov.wait_for_hold("transfer").await;
    let second = tokio::spawn(async move {
        b.post("/mcp", call(1, "refund", json!({})).to_string(), &[])
            .await
    });
    gov.wait_for_hold("refund").await;
    gov.release("refund", true).await;
    gov.release("transfer", true).await;
    for r in [first.await.unwrap(), second.await.unwrap()] {
        let v = json_of(&r.2);
        assert!(
            v["result"]["content"][0]["text"]
                .as_str()
                .unwrap_or_default()
                .starts_with("ran "),
            "{v}"
        );
    }
    let mut ran = up.tools_called();
    ran.sort();
    assert_eq!(ran, vec!["refund", "transfer"]);
}
