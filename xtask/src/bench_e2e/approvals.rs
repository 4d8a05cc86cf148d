//! Held calls approved by a second process: this one, speaking kya's control
//! protocol (one JSON object per line on `STATE_DIR/kya.sock`) directly, so
//! that the figure is the daemon's, not the `kya` CLI's start-up.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::peers::Upstream;

fn call(state_dir: &Path, op: &str, args: Value) -> Result<Value> {
    let path = state_dir.join("kya.sock");
    let mut stream =
        UnixStream::connect(&path).with_context(|| format!("connect {}", path.display()))?;
    let mut line = json!({"op": op, "args": args}).to_string();
    line.push('\n');
    stream.write_all(line.as_bytes()).context("send")?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .context("read the answer")?;
    let v: Value = serde_json::from_str(&answer).with_context(|| format!("answer {answer:?}"))?;
    if v["type"] != "ok" {
        bail!("{op}: {v}");
    }
    Ok(v["result"].clone())
}

fn pending_ids(state_dir: &Path) -> Result<Vec<String>> {
    let list = call(state_dir, "approvals.list", json!({}))?;
    let items = list
        .as_array()
        .or_else(|| list["approvals"].as_array())
        .cloned()
        .unwrap_or_default();
    Ok(items
        .iter()
        .filter_map(|a| a["id"].as_str().map(str::to_string))
        .collect())
}

/// How many calls the daemon holds for approval.
pub(super) fn pending_count(state_dir: &Path) -> Result<usize> {
    Ok(pending_ids(state_dir)?.len())
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Approve `count` held `tool` calls as they appear; for each, the time from
/// sending the approval to the upstream's own record of the call.
pub(super) fn approve_each(
    state_dir: &Path,
    upstream: &Upstream,
    tool: &str,
    count: usize,
) -> Result<Vec<Duration>> {
    let mut seen: Vec<String> = Vec::new();
    let mut delays = Vec::new();
    for i in 0..count {
        let deadline = Instant::now() + Duration::from_secs(30);
        let id = loop {
            if let Some(id) = pending_ids(state_dir)?
                .into_iter()
                .find(|id| !seen.contains(id))
            {
                break id;
            }
            if Instant::now() > deadline {
                bail!("held call {i}: no approval appeared within 30 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let ran_before = upstream.ran(tool).len();
        if ran_before != i {
            bail!("the upstream ran {ran_before} held calls before {i} were approved");
        }
        let sent = now_nanos();
        call(state_dir, "approvals.approve", json!({"id": id}))
            .with_context(|| format!("approve {id}"))?;
        seen.push(id);
        let deadline = Instant::now() + Duration::from_secs(30);
        let arrived = loop {
            if let Some(t) = upstream.ran(tool).get(i) {
                break *t;
            }
            if Instant::now() > deadline {
                bail!("approved call {i} did not reach the upstream within 30 s");
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        delays.push(Duration::from_nanos(
            u64::try_from(arrived.saturating_sub(sent)).unwrap_or(u64::MAX),
        ));
    }
    Ok(delays)
}
