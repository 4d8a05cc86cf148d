//! `kya tools list|diff|accept`.

use super::diff::Change;
use super::store::ToolRow;
use crate::control::client;
use crate::control::protocol::Request;
use serde_json::json;
use std::path::Path;
use std::process::ExitCode;

/// `kya tools list [--server S] [--json]`.
pub fn list(state_dir: &Path, server: Option<&str>, as_json: bool) -> anyhow::Result<ExitCode> {
    let v = client::call(
        state_dir,
        &Request::new("tools.list", json!({"server": server})),
    )?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<ToolRow> = serde_json::from_value(v)?;
    if rows.is_empty() {
        println!("no tools pinned");
    }
    for r in rows {
        let short = |d: &Option<String>| {
            d.as_deref()
                .map_or("-".to_string(), |d| d.chars().take(12).collect())
        };
        println!(
            "{:<32} {:<32} {:<9} pinned={} now={}",
            r.server,
            r.tool,
            r.state.as_str(),
            short(&r.pinned_sha256),
            short(&r.current_sha256)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `kya tools diff [--server S] [TOOL] [--json]`. Exit status 1 when
/// something differs from the pins (like `diff`).
pub fn diff(
    state_dir: &Path,
    server: Option<&str>,
    tool: Option<&str>,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    let v = client::call(
        state_dir,
        &Request::new("tools.diff", json!({"server": server, "tool": tool})),
    )?;
    let changes: Vec<Change> = serde_json::from_value(v.clone())?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if changes.is_empty() {
        println!("no tool differs from its pin");
    }
    if !as_json {
        for c in &changes {
            println!("{} {} ({})", c.server, c.tool, c.state);
            for line in c.lines() {
                println!("  {line}");
            }
        }
    }
    Ok(if changes.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `kya tools accept --server S [TOOL...]`.
pub fn accept(state_dir: &Path, server: &str, tools: &[String]) -> anyhow::Result<ExitCode> {
    let v = client::call(
        state_dir,
        &Request::new("tools.accept", json!({"server": server, "tools": tools})),
    )?;
    let accepted: Vec<String> = serde_json::from_value(v["accepted"].clone()).unwrap_or_default();
    if accepted.is_empty() {
        println!("{server}: nothing to accept");
    } else {
        println!("{server}: pinned {}", accepted.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}
