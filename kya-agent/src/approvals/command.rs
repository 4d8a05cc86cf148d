//! `kya approvals list|approve|deny`.

use crate::control::client;
use crate::control::protocol::Request;
use serde_json::{json, Value};
use std::path::Path;
use std::process::ExitCode;

/// `kya approvals list [--json]`.
pub fn list(state_dir: &Path, as_json: bool) -> anyhow::Result<ExitCode> {
    let items = client::call(state_dir, &Request::new("approvals.list", Value::Null))?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&items)?);
        return Ok(ExitCode::SUCCESS);
    }
    let rows = items.as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        println!("no pending approvals");
    }
    for a in rows {
        let s = |k: &str| a[k].as_str().unwrap_or("").to_string();
        println!(
            "{}  {}  agent={} tool={} server={} owner={} expires={} rule={}",
            s("id"),
            s("binding_message"),
            s("agent"),
            s("tool"),
            s("server"),
            s("owner"),
            s("expires"),
            a["rule"].as_str().unwrap_or("-"),
        );
        if let Some(change) = a.get("tool_change").filter(|c| !c.is_null()) {
            println!(
                "    tool definition {} since it was pinned (kya tools diff --server {} {}):",
                change["state"].as_str().unwrap_or("changed"),
                change["server"].as_str().unwrap_or("?"),
                change["tool"].as_str().unwrap_or("?"),
            );
            for f in change["fields"].as_array().into_iter().flatten() {
                let field = f["field"].as_str().unwrap_or("?");
                println!("    - {field}: {}", f["old"].as_str().unwrap_or(""));
                println!("    + {field}: {}", f["new"].as_str().unwrap_or(""));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `kya approvals approve|deny ID [--reason TEXT]`.
pub fn answer(
    state_dir: &Path,
    id: &str,
    approve: bool,
    reason: Option<&str>,
    standing_for: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let op = if approve {
        "approvals.approve"
    } else {
        "approvals.deny"
    };
    let result = client::call(
        state_dir,
        &Request::new(
            op,
            json!({"id": id, "reason": reason, "standing_for": standing_for}),
        ),
    )?;
    let verb = if approve { "approved" } else { "denied" };
    println!(
        "{id} {verb} by {}{}",
        result["approver"].as_str().unwrap_or("?"),
        match standing_for {
            Some(d) => format!(" (and its tool for {d})"),
            None => String::new(),
        }
    );
    Ok(ExitCode::SUCCESS)
}
