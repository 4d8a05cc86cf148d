//! Server-sent events: SSE answers with server→client requests, the GET stream,
//! tools/list filtering inside SSE, and the legacy HTTP+SSE transport.

mod proxy_support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use kya_agent::intercept::http::{Direction, HttpVersion, Limits};
use proxy_support::*;
use serde_json::json;

#[tokio::test]
async fn sse_answer_server_requests_are_decided() {
    let up = upstream().await;
    let gov = FakeGov::new(&[
        ("sampling/createMessage", Act::Deny),
        ("elicitation/create", Act::Allow),
    ]);
    let addr = proxy(
        up.addr,
        gov.clone(),
        Limits::default(),
        HttpVersion::H1,
        None,
    )
    .await;
    let mut c = Client::h1(addr).await;
    let resp = c
        .send(post_req(
            "/mcp-sse",
            &call(1, "search_docs", json!({})),
            true,
            &[],
        ))
        .await;
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let msgs = sse_messages(&resp.into_body().collect().await.unwrap().to_bytes());
    let methods: Vec<_> = msgs.iter().map(|m| m["method"].clone()).collect();
    assert_eq!(
        methods,
        vec![json!("elicitation/create"), json!(null)],
        "{msgs:?}"
    );
    assert_eq!(msgs[1]["id"], json!(1));
    let calls = gov.calls.lock().unwrap().clone();
    let s2c: Vec<_> = calls
        .iter()
        .filter(|c| c.direction == Direction::ServerToClient)
        .map(|c| c.method.clone())
        .collect();
    assert_eq!(s2c, vec!["sampling/createMessage", "elicitation/create"]);
    assert_eq!(calls[1].jsonrpc_id, Some(json!("srv-1")));
}

#[tokio::test]
async fn tools_list_in_sse_is_filtered() {
    let up = upstream().await;
    let gov = default_gov();
    gov.hidden.lock().unwrap().push("transfer".into());
    let addr = proxy(
        up.addr,
        gov.clone(),
        Limits::default(),
        HttpVersion::H1,
        None,
    )
    .await;
    let mut c = Client::h1(addr).await;
    let resp = c
        .send(post_req(
            "/mcp-sse",
            &json!({"jsonrpc":"2.0","id":3,"method":"tools/list"}),
            true,
            &[],
        ))
        .await;
    let msgs = sse_messages(&resp.into_body().collect().await.unwrap().to_bytes());
    let last = msgs.last().unwrap();
    let names: Vec<_> = last["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["search_docs", "delete_records"]);
}

#[tokio::test]
async fn get_stream_server_requests_are_decided() {
    let up = upstream().await;
    let gov = FakeGov::new(&[("sampling/createMessage", Act::Deny)]);
    let addr = proxy(
        up.addr,
        gov.clone(),
        Limits::default(),
        HttpVersion::H1,
        None,
    )
    .await;
    let mut c = Client::h1(addr).await;
    let req = hyper::Request::get("/stream")
        .header("host", "127.0.0.1")
        .header("accept", "text/event-stream")
        .header("mcp-session-id", "S9")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = c.send(req).await;
    let mut body = resp.into_body();
    let msgs = read_events(&mut body, 1, Duration::from_secs(5)).await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0]["method"], json!("notifications/message"));
    let calls = gov.calls.lock().unwrap().clone();
    assert_eq!(calls[0].method, "sampling/createMessage");
    assert_eq!(calls[0].session.as_deref(), Some("S9"));
}

#[tokio::test]
async fn legacy_sse_transport_with_injected_denial() {
    let up = upstream().await;
    let gov = default_gov();
    let addr = proxy(
        up.addr,
        gov.clone(),
        Limits::default(),
        HttpVersion::H1,
        None,
    )
    .await;
    let mut stream_conn = Client::h1(addr).await;
    let req = hyper::Request::get("/sse")
        .header("host", "127.0.0.1")
        .header("accept", "text/event-stream")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let mut events = stream_conn.send(req).await.into_body();
    let text = read_raw_until(&mut events, "session_id=", Duration::from_secs(5)).await;
    let endpoint = text
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .expect("endpoint event")
        .to_string();
    assert!(endpoint.starts_with("/messages?session_id="));

    let mut poster = Client::h1(addr).await;
    // Allowed: the server answers 202 and the result arrives on the stream.
    let (s, _, _) = poster
        .post(
            &endpoint,
            call(1, "search_docs", json!({})).to_string(),
            &[],
        )
        .await;
    assert_eq!(s, 202);
    let msgs = read_events(&mut events, 1, Duration::from_secs(5)).await;
    assert_eq!(msgs[0]["id"], json!(1));
    assert!(msgs[0]["result"]["content"][0]["text"]
        .as_str()
        .unwrap()
        .starts_with("ran search_docs"));
    // Denied: kya answers 202 too and injects the denial into the same stream.
    let (s, _, b) = poster
        .post(
            &endpoint,
            call(2, "delete_records", json!({})).to_string(),
            &[],
        )
        .await;
    assert_eq!(s, 202);
    assert!(b.is_empty());
    // (read_events starts a fresh buffer: the first message was consumed above.)
    let msgs = read_events(&mut events, 1, Duration::from_secs(5)).await;
    assert_eq!(msgs[0]["id"], json!(2));
    assert_eq!(msgs[0]["result"]["isError"], json!(true));
    assert_eq!(up.tools_called(), vec!["search_docs"]);
    // A tools/list POSTed to the session: its answer on the stream is
    // filtered; a tool result shaped like one is not.
    gov.hidden.lock().unwrap().push("transfer".into());
    for body in [
        json!({"jsonrpc":"2.0","id":3,"method":"tools/list"}),
        call(4, "list_like", json!({})),
    ] {
        let (s, _, _) = poster.post(&endpoint, body.to_string(), &[]).await;
        assert_eq!(s, 202);
    }
    let msgs = read_events(&mut events, 2, Duration::from_secs(5)).await;
    assert_eq!(msgs[0]["id"], json!(3));
    assert_eq!(msgs[0]["result"]["tools"].as_array().map(Vec::len), Some(2));
    assert_eq!(msgs[1]["id"], json!(4));
    assert_eq!(msgs[1]["result"]["tools"].as_array().map(Vec::len), Some(3));
}

#[tokio::test]
async fn cross_origin_endpoint_is_not_delivered() {
    // A raw upstream that announces an endpoint on another origin.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).await;
        let body = "event: endpoint\ndata: http://127.0.0.9:1/messages\n\nevent: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{}}\n\n";
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(body.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    });
    let gov = default_gov();
    let addr = proxy(
        up_addr,
        gov.clone(),
        Limits::default(),
        HttpVersion::H1,
        None,
    )
    .await;
    let mut c = Client::h1(addr).await;
    let req = hyper::Request::get("/sse")
        .header("host", "127.0.0.1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let text = String::from_utf8_lossy(
        &c.send(req)
            .await
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes(),
    )
    .into_owned();
    assert!(!text.contains("127.0.0.9"), "{text}");
    assert!(text.contains("notifications/message"));
    assert!(gov.refusals.lock().unwrap()[0].contains("endpoint"));
}

#[tokio::test]
async fn garbage_json_rpc_event_in_an_mcp_stream_is_dropped() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
        let body = concat!(
            "data: {\"jsonrpc\":\"2.0\",\"id\":\"x\",\"method\":\"sampling/createMessage\",\"method\":\"ping\"}\n\n",
            "data: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\n\n"
        );
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(body.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    });
    let gov = default_gov();
    let addr = proxy(
        up_addr,
        gov.clone(),
        Limits::default(),
        HttpVersion::H1,
        None,
    )
    .await;
    let mut c = Client::h1(addr).await;
    let resp = c
        .send(post_req(
            "/mcp",
            &call(1, "search_docs", json!({})),
            true,
            &[],
        ))
        .await;
    let msgs = sse_messages(&resp.into_body().collect().await.unwrap().to_bytes());
    assert_eq!(msgs, vec![json!({"jsonrpc":"2.0","id":1,"result":{}})]);
    assert!(gov.refusals.lock().unwrap()[0].contains("duplicate key"));
}

#[tokio::test]
async fn legacy_sse_hold_answers_202_at_once_then_streams_progress_and_result() {
    let up = upstream().await;
    let gov = default_gov();
    let limits = Limits {
        progress_interval: Duration::from_millis(100),
        ..Limits::default()
    };
    let addr = proxy(up.addr, gov.clone(), limits, HttpVersion::H1, None).await;
    let mut stream_conn = Client::h1(addr).await;
    let req = hyper::Request::get("/sse")
        .header("host", "127.0.0.1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let mut events = stream_conn.send(req).await.into_body();
    let text = read_raw_until(&mut events, "session_id=", Duration::from_secs(5)).await;
    let endpoint = text
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .unwrap()
        .to_string();
    let mut poster = Client::h1(addr).await;
    let held = json!({"jsonrpc":"2.0","id":11,"method":"tools/call",
        "params":{"name":"transfer","arguments":{"amount":5000},"_meta":{"progressToken":"p"}}});
    let (s, _, _) = tokio::time::timeout(
        Duration::from_secs(2),
        poster.post(&endpoint, held.to_string(), &[]),
    )
    .await
    .expect("the POST must not wait for the approval");
    assert_eq!(s, 202);
    let progress = read_events(&mut events, 2, Duration::from_secs(5)).await;
    assert!(
        progress
            .iter()
            .all(|m| m["method"] == "notifications/progress"),
        "{progress:?}"
    );
    assert!(up.tools_called().is_empty());
    gov.release("transfer", true).await;
    let mut result = None;
    for _ in 0..50 {
        let msgs = read_events(&mut events, 1, Duration::from_millis(200)).await;
        if let Some(m) = msgs.into_iter().find(|m| m["id"] == json!(11)) {
            result = Some(m);
            break;
        }
    }
    let result = result.expect("the result on the stream");
    assert!(result["result"]["content"][0]["text"]
        .as_str()
        .unwrap()
        .starts_with("ran transfer"));
    assert_eq!(up.tools_called(), vec!["transfer"]);
}

/// A raw upstream answering every request with `body` as `content_type`.
async fn raw_upstream(content_type: &'static str, body: &'static str) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(body.as_bytes()).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn ambiguous_json_answer_from_the_server_is_refused() {
    let up = raw_upstream(
        "application/json",
        r#"{"jsonrpc":"2.0","id":1,"result":{"content":[]},"result":{"isError":true}}"#,
    )
    .await;
    let gov = default_gov();
    let addr = proxy(up, gov.clone(), Limits::default(), HttpVersion::H1, None).await;
    let mut c = Client::h1(addr).await;
    let (s, _, _) = c
        .post("/mcp", call(1, "search_docs", json!({})).to_string(), &[])
        .await;
    assert_eq!(s, 502);
    assert!(gov.refusals.lock().unwrap()[0].contains("duplicate key"));
}

#[tokio::test]
async fn tools_without_a_name_are_hidden() {
    let up = raw_upstream(
        "application/json",
        r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"search_docs"},{"title":"nameless"},{"name":7}]}}"#,
    )
    .await;
    let gov = default_gov();
    let addr = proxy(up, gov, Limits::default(), HttpVersion::H1, None).await;
    let mut c = Client::h1(addr).await;
    let (_, _, b) = c
        .post(
            "/mcp",
            json!({"jsonrpc":"2.0","id":1,"method":"tools/list"}).to_string(),
            &[],
        )
        .await;
    assert_eq!(
        json_of(&b)["result"]["tools"],
        json!([{"name":"search_docs"}])
    );
}

#[tokio::test]
async fn non_mcp_json_answers_pass_unchanged() {
    let up = raw_upstream("application/json", r#"{"b": 1,   "a": [1, 2]}"#).await;
    let gov = default_gov();
    let addr = proxy(up, gov, Limits::default(), HttpVersion::H1, None).await;
    let mut c = Client::h1(addr).await;
    let req = hyper::Request::get("/api/thing")
        .header("host", "127.0.0.1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let body = c
        .send(req)
        .await
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(&body[..], br#"{"b": 1,   "a": [1, 2]}"#);
}

fn tool_names(answer: &serde_json::Value) -> Vec<String> {
    answer["result"]["tools"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

const ALL: [&str; 3] = ["search_docs", "delete_records", "transfer"];
const VISIBLE: [&str; 2] = ["search_docs", "delete_records"];

/// Only the answer to a `tools/list` request is filtered: a tool result shaped
/// like one passes byte for byte, alone or next to a real one in a batch.
#[tokio::test]
async fn only_answers_to_tools_list_requests_are_filtered() {
    let up = upstream().await;
    let gov = default_gov();
    gov.hidden.lock().unwrap().push("transfer".into());
    let addr = proxy(up.addr, gov, Limits::default(), HttpVersion::H1, None).await;
    let mut c = Client::h1(addr).await;
    let session = [("mcp-session-id", "only-answers")];
    let (_, _, b) = c
        .post(
            "/mcp",
            call(4, "list_like", json!({})).to_string(),
            &session,
        )
        .await;
    assert_eq!(
        tool_names(&json_of(&b)),
        ALL,
        "a tool result is not rewritten"
    );
    assert_eq!(
        &b[..],
        tools_shaped(&json!(4)).to_string().as_bytes(),
        "the server's bytes"
    );
    let batch = json!([
        {"jsonrpc":"2.0","id":1,"method":"tools/list"},
        call(2, "list_like", json!({})),
    ]);
    let (_, _, b) = c.post("/mcp", batch.to_string(), &session).await;
    let answers = json_of(&b);
    assert_eq!(tool_names(&answers[0]), VISIBLE);
    assert_eq!(tool_names(&answers[1]), ALL);
}

/// The latest request with an id says what its answer is: an id reused by a
/// tools/call is no longer a tools/list id, and `"10"` is not `10`.
#[tokio::test]
async fn ids_reused_across_methods_and_types() {
    let up = upstream().await;
    let gov = default_gov();
    gov.hidden.lock().unwrap().push("transfer".into());
    let addr = proxy(up.addr, gov, Limits::default(), HttpVersion::H1, None).await;
    let mut c = Client::h1(addr).await;
    let session = [("mcp-session-id", "reused-ids")];
    let list = |id: serde_json::Value| json!({"jsonrpc":"2.0","id":id,"method":"tools/list"});
    let (_, _, b) = c.post("/mcp", list(json!(9)).to_string(), &session).await;
    assert_eq!(tool_names(&json_of(&b)), VISIBLE);
    let (_, _, b) = c
        .post(
            "/mcp",
            call(9, "list_like", json!({})).to_string(),
            &session,
        )
        .await;
    assert_eq!(tool_names(&json_of(&b)), ALL, "id 9 now names a tools/call");
    let (_, _, b) = c
        .post("/mcp", list(json!("10")).to_string(), &session)
        .await;
    assert_eq!(tool_names(&json_of(&b)), VISIBLE);
    let (_, _, b) = c
        .post(
            "/mcp",
            call(10, "list_like", json!({})).to_string(),
            &session,
        )
        .await;
    assert_eq!(tool_names(&json_of(&b)), ALL, "10 is not \"10\"");
}

/// A tools/list answer the server sends on the session's GET stream instead of
/// the POST's answer is filtered, each time it is sent; a tools/list-shaped
/// answer on that stream to an id that was no tools/list request is not.
#[tokio::test]
async fn tools_list_answer_on_the_get_stream() {
    let up = upstream().await;
    let gov = default_gov();
    gov.hidden.lock().unwrap().push("transfer".into());
    let addr = proxy(up.addr, gov, Limits::default(), HttpVersion::H1, None).await;
    let mut c = Client::h1(addr).await;
    let session = [("mcp-session-id", "get-stream")];
    let (_, _, b) = c
        .post(
            "/mcp",
            json!({"jsonrpc":"2.0","id":5,"method":"tools/list"}).to_string(),
            &session,
        )
        .await;
    assert_eq!(tool_names(&json_of(&b)), VISIBLE);
    // Another connection, as a client's pool would use.
    let mut c2 = Client::h1(addr).await;
    let (_, _, body) = c2
        .get(
            "/stream-answers?ids=%5B5%2C6%2C%225%22%5D",
            &[("accept", "text/event-stream"), session[0]],
        )
        .await;
    let msgs = sse_messages(&body);
    let by_id: Vec<(serde_json::Value, Vec<String>)> = msgs
        .iter()
        .map(|m| (m["id"].clone(), tool_names(m)))
        .collect();
    let visible: Vec<String> = VISIBLE.iter().map(|s| s.to_string()).collect();
    let all: Vec<String> = ALL.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        by_id,
        vec![
            (json!(5), visible.clone()),
            (json!(6), all.clone()),
            (json!("5"), all.clone()),
            (json!(5), visible),
            (json!(6), all.clone()),
            (json!("5"), all),
        ]
    );
    // The same ids in another session are not this session's tools/list.
    let (_, _, body) = c2
        .get(
            "/stream-answers?ids=%5B5%5D",
            &[
                ("accept", "text/event-stream"),
                ("mcp-session-id", "other-session"),
            ],
        )
        .await;
    assert_eq!(tool_names(&sse_messages(&body)[0]), ALL);
}

/// An agent-side stream that records what each write call carried.
struct Recorder {
    inner: tokio::net::TcpStream,
    writes: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
}

impl tokio::io::AsyncRead for Recorder {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Recorder {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            self.writes.lock().unwrap().push(buf[..*n].to_vec());
        }
        r
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            self.writes.lock().unwrap().push(all[..*n].to_vec());
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// When the server sends its answer's head, its last event and the end of
/// its event stream together, the agent gets them together too (in one
/// write): a client that
/// has read the answer it waited for may otherwise drop the connection whose
/// end is still to come, and a connection it would have reused is gone. The
/// server here gives its stream a length, so its end is known with its last
/// byte; a chunked stream's end is its own frame, joined when it is already
/// there (best effort: hyper hands it over a moment later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_event_and_the_end_of_a_stream_reach_the_agent_together() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The server: head and one event, the whole body, in one write; the
    // agent must get head, event and end in one write as well.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                loop {
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    let event = "event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"content\":[{\"type\":\"text\",\"text\":\"done\"}]}}\n\n";
                    let all = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n{event}",
                        event.len()
                    );
                    if s.write_all(all.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let writes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let agent_side = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = agent_side.local_addr().unwrap();
    let w = writes.clone();
    let gov = default_gov();
    tokio::spawn(async move {
        while let Ok((agent, _)) = agent_side.accept().await {
            let agent = Recorder {
                inner: agent,
                writes: w.clone(),
            };
            let upstream = tokio::net::TcpStream::connect(up).await.unwrap();
            let conn = std::sync::Arc::new(kya_agent::intercept::http::ConnFacts {
                process: Default::default(),
                dst: up,
                sni: None,
                tls: false,
                conn_id: 1,
                tunnel: None,
            });
            let gov: std::sync::Arc<dyn kya_agent::intercept::http::Governor> =
                std::sync::Arc::new(GovHandle(gov.clone()));
            tokio::spawn(async move {
                let _ = kya_agent::intercept::http::serve_http(
                    agent,
                    upstream,
                    HttpVersion::H1,
                    conn,
                    gov,
                    &Limits::default(),
                    std::sync::Arc::new(kya_agent::intercept::names::NameResolver::with_table(
                        Default::default(),
                    )),
                    None,
                )
                .await;
            });
        }
    });
    let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = call(1, "search_docs", json!({})).to_string();
    for round in 0..20 {
        writes.lock().unwrap().clear();
        let req = format!(
            "POST /mcp HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        client.write_all(req.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.ends_with(b"0\r\n\r\n") {
            let n = tokio::time::timeout(Duration::from_secs(10), client.read(&mut buf))
                .await
                .expect("the answer came")
                .unwrap();
            assert!(n > 0, "closed after {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        assert!(String::from_utf8_lossy(&got).contains("\"text\":\"done\""));
        // The recorder notes a write once it has returned, which may be after
        // the client has read its bytes.
        for _ in 0..500 {
            if writes.lock().unwrap().concat().ends_with(b"0\r\n\r\n") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let writes = writes.lock().unwrap().clone();
        let last = writes.last().expect("writes");
        let text = String::from_utf8_lossy(last);
        assert!(
            text.starts_with("HTTP/1.1 200")
                && text.contains("\"id\":1")
                && text.ends_with("0\r\n\r\n"),
            "round {round}: the last event and the end came apart: {:?}",
            writes
                .iter()
                .map(|w| String::from_utf8_lossy(w).into_owned())
                .collect::<Vec<_>>()
        );
    }
}
