//! Real MCP software through the proxy: the official Python SDK client and Node SDK
//! client → kya's proxy (plain HTTP on loopback, the client pointed at the proxy) →
//! a real Python SDK server (Streamable HTTP with SSE or JSON answers, and the legacy
//! SSE transport) or npm `server-everything`. The peers are installed by
//! `tests/peers/setup.sh` (run here; idempotent) from the package registries.

mod proxy_support;

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use kya_agent::intercept::http::{HttpVersion, Limits};
use proxy_support::*;
use serde_json::Value;

/// The Python server, recording the tools that really ran into `log`.
async fn python_server(extra: &[&str], log: &std::path::Path) -> (Peer, u16) {
    ensure_peers();
    let port = free_port();
    let child = tokio::process::Command::new(peers().join(".venv/bin/python"))
        .arg(peers().join("server.py"))
        .args(["--port", &port.to_string()])
        .args(extra)
        .env("KYA_PEER_LOG", log)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_listening(port).await;
    (Peer(child), port)
}

fn ran(log: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

async fn py_client(url: &str, args: &[&str]) -> Value {
    let out = tokio::process::Command::new(peers().join(".venv/bin/python"))
        .arg(peers().join("client.py"))
        .arg(url)
        .args(args)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|_| {
        panic!(
            "client output: {stdout} / {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

async fn node_client(url: &str, args: &[&str]) -> Value {
    let out = tokio::process::Command::new("node")
        .arg(peers().join("client.mjs"))
        .arg(url)
        .args(args)
        .current_dir(peers())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|_| {
        panic!(
            "node output: {stdout} / {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn limits() -> Limits {
    Limits {
        progress_interval: Duration::from_millis(200),
        ..Limits::default()
    }
}

async fn through_proxy(port: u16, gov: Arc<FakeGov>) -> std::net::SocketAddr {
    let upstream = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    proxy(upstream, gov, limits(), HttpVersion::Detect, None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_streamable_http_allow_deny_hold() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("ran");
    let (_srv, port) = python_server(&[], &log).await;
    let gov = default_gov();
    let addr = through_proxy(port, gov.clone()).await;
    let url = format!("http://{addr}/mcp");

    let v = py_client(&url, &["search_docs", r#"{"query":"kya"}"#]).await;
    assert_eq!(v["isError"], Value::Bool(false), "{v}");
    assert_eq!(v["text"], "found 3 documents about kya");

    let v = py_client(&url, &["delete_records", r#"{"table":"users"}"#]).await;
    assert_eq!(v["isError"], Value::Bool(true), "{v}");
    assert!(v["text"]
        .as_str()
        .unwrap()
        .starts_with("kya denied this call: delete_records is not allowed"));

    // Held, with progress, then approved by the "owner".
    let g = gov.clone();
    let release = tokio::spawn(async move {
        // Several progress ticks (every 200 ms) before the approval.
        g.wait_for_hold("transfer").await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        g.release("transfer", true).await;
    });
    let v = py_client(
        &url,
        &["transfer", r#"{"amount":5000,"to":"bob"}"#, "--progress"],
    )
    .await;
    release.await.unwrap();
    assert_eq!(v["isError"], Value::Bool(false), "{v}");
    assert_eq!(v["text"], "transferred 5000 to bob");
    let progress = v["progress"].as_array().unwrap();
    assert!(!progress.is_empty(), "no progress while held: {v}");
    assert_eq!(progress[0], "waiting for approval by alice, code WXYZ");

    // Held and denied by the owner.
    let g = gov.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        g.release("transfer", false).await;
    });
    let v = py_client(&url, &["transfer", r#"{"amount":7,"to":"eve"}"#]).await;
    assert_eq!(v["isError"], Value::Bool(true), "{v}");
    assert!(v["text"].as_str().unwrap().contains("denied by the owner"));

    // The server's own record: only the allowed and approved calls ran.
    assert_eq!(ran(&log), vec!["search_docs", "transfer"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_hold_times_out_and_tools_list_is_filtered() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("ran");
    let (_srv, port) = python_server(&["--json"], &log).await;
    let gov = FakeGov::new(&[("transfer", Act::Hold(Duration::from_millis(800)))]);
    gov.hidden.lock().unwrap().push("delete_records".into());
    let addr = through_proxy(port, gov.clone()).await;
    let url = format!("http://{addr}/mcp");
    let v = py_client(&url, &["transfer", r#"{"amount":1,"to":"x"}"#]).await;
    assert_eq!(v["isError"], Value::Bool(true), "{v}");
    assert!(v["text"].as_str().unwrap().contains("hold timed out"));
    let v = py_client(&url, &["--list"]).await;
    assert_eq!(v["tools"], serde_json::json!(["search_docs", "transfer"]));
    assert!(ran(&log).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_node_sdk_over_legacy_sse() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("ran");
    let (_srv, port) = python_server(&["--transport", "sse"], &log).await;
    let gov = default_gov();
    let addr = through_proxy(port, gov.clone()).await;
    let url = format!("http://{addr}/sse");
    let v = py_client(&url, &["search_docs", r#"{"query":"legacy"}"#, "--sse"]).await;
    assert_eq!(v["text"], "found 3 documents about legacy", "{v}");
    let v = py_client(&url, &["delete_records", r#"{"table":"t"}"#, "--sse"]).await;
    assert_eq!(v["isError"], Value::Bool(true), "{v}");
    assert!(v["text"].as_str().unwrap().contains("kya denied this call"));
    let v = node_client(&url, &["delete_records", r#"{"table":"t"}"#, "--sse"]).await;
    assert_eq!(v["isError"], Value::Bool(true), "{v}");
    let v = node_client(&url, &["search_docs", r#"{"query":"node"}"#, "--sse"]).await;
    assert_eq!(v["text"], "found 3 documents about node", "{v}");
    // A held call over the legacy transport: 202 at once, progress and the result
    // on the session's stream once the owner approves.
    let g = gov.clone();
    tokio::spawn(async move {
        g.wait_for_hold("transfer").await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        g.release("transfer", true).await;
    });
    let v = py_client(
        &url,
        &[
            "transfer",
            r#"{"amount":9000,"to":"carol"}"#,
            "--sse",
            "--progress",
        ],
    )
    .await;
    assert_eq!(v["text"], "transferred 9000 to carol", "{v}");
    assert!(!v["progress"].as_array().unwrap().is_empty(), "{v}");
    assert_eq!(ran(&log), vec!["search_docs", "search_docs", "transfer"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_sdk_streamable_http_allow_and_deny() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("ran");
    let (_srv, port) = python_server(&[], &log).await;
    let gov = default_gov();
    let addr = through_proxy(port, gov.clone()).await;
    let url = format!("http://{addr}/mcp");
    let v = node_client(&url, &["search_docs", r#"{"query":"n"}"#]).await;
    assert_eq!(v["text"], "found 3 documents about n", "{v}");
    let v = node_client(&url, &["delete_records", r#"{"table":"t"}"#]).await;
    assert_eq!(v["isError"], Value::Bool(true), "{v}");
    assert_eq!(ran(&log), vec!["search_docs"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_everything_through_the_proxy() {
    ensure_peers();
    let port = free_port();
    let child = tokio::process::Command::new("node")
        .arg(peers().join("node_modules/@modelcontextprotocol/server-everything/dist/index.js"))
        .arg("streamableHttp")
        .env("PORT", port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let _srv = Peer(child);
    wait_listening(port).await;
    let gov = FakeGov::new(&[("get-env", Act::Deny)]);
    gov.hidden.lock().unwrap().push("get-env".into());
    let addr = through_proxy(port, gov.clone()).await;
    let url = format!("http://{addr}/mcp");
    let v = py_client(&url, &["echo", r#"{"message":"through kya"}"#]).await;
    assert_eq!(v["text"], "Echo: through kya", "{v}");
    let v = py_client(&url, &["get-env", "{}"]).await;
    assert_eq!(v["isError"], Value::Bool(true), "{v}");
    assert!(
        !v["text"].as_str().unwrap().contains("PATH"),
        "environment leaked: {v}"
    );
    let v = node_client(&url, &["--list"]).await;
    let tools: Vec<&str> = v["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert!(
        tools.contains(&"echo") && !tools.contains(&"get-env"),
        "{v}"
    );
    assert!(gov.decided_tools().contains(&"get-env".to_string()));
}
