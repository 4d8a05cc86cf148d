//! `kya credential issue|verify|revoke|list`: the offline credential commands.
//!
//! `issue` signs with kya's key in the state dir, so it works for whoever can
//! read that key (root / the kya service user); the approver recorded as
//! evidence is the invoking Unix user. The daemon will serve the same over its
//! control socket, where the approver comes from `SO_PEERCRED` and only an
//! agent's owner may issue for it.

use super::action::{self, AgentSubject, Channel, Environment, Evidence, Scope};
use super::header;
use super::jcs;
use super::multikey;
use super::service;
use super::store::CredentialStore;
use super::verify::{self, Call, VerifyError};
use crate::cli::{
    CredentialCommand, CredentialIssueArgs, CredentialListArgs, CredentialRevokeArgs,
    CredentialVerifyArgs,
};
use crate::config::DEFAULT_STATE_DIR;
use crate::control::client::{self, ClientError};
use crate::control::protocol::Request;
use crate::keys;
use anyhow::{bail, Context};
use ed25519_dalek::VerifyingKey;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use time::OffsetDateTime;

/// Longest validity `kya credential issue` grants.
pub use super::validity::MAX_VALID_FOR;

/// Run one `kya credential` subcommand.
pub fn run(cmd: CredentialCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        CredentialCommand::Issue(args) => issue(*args),
        CredentialCommand::Verify(args) => verify(args),
        CredentialCommand::Revoke(args) => revoke(args),
        CredentialCommand::List(args) => list(args),
    }
}

fn state_dir(dir: &Option<PathBuf>) -> PathBuf {
    dir.clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
}

fn issue(args: CredentialIssueArgs) -> anyhow::Result<ExitCode> {
    let dir = state_dir(&args.state_dir);
    if args.agents.is_none() && !args.offline {
        match client::Client::connect(&dir) {
            Ok(mut c) => return issue_via_daemon(&mut c, args),
            Err(ClientError::Connect { path, .. }) => eprintln!(
                "kya: no daemon answers at {}; issuing offline with the key in {}",
                path.display(),
                dir.display()
            ),
            Err(e) => return Err(e.into()),
        }
    }
    let valid_for = super::validity::parse_valid_for(&args.valid_for).context("--valid-for")?;
    let (approver, approver_uid) = invoking_user();
    let now = OffsetDateTime::now_utc();
    let registered = match &args.agents {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let entry = registered_agent(&text, &args.agent, &approver, approver_uid, now.date())
                .with_context(|| format!("agent registry {}", path.display()))?;
            Some(entry)
        }
        None => None,
    };
    let selectors = registered.map(|a| a.selectors).unwrap_or_default();
    let uid = service::merge_binding("--uid", args.uid, selectors.uid)?;
    let cgroup = service::merge_binding("--cgroup", args.cgroup, selectors.cgroup)?;
    let exe_sha256 = match (&args.exe, &args.exe_sha256, &selectors.exe) {
        (Some(path), _, _) => Some(file_sha256(path)?),
        (None, Some(hex), _) => Some(hex.to_ascii_lowercase()),
        (None, None, Some(path)) => Some(file_sha256(path)?),
        (None, None, None) => None,
    };
    let host = match args.host {
        Some(h) => h,
        None => local_hostname()?,
    };
    let scope = Scope {
        server: args.server,
        tool: args.tool,
        args_sha256: args.args_digest.as_deref().map(str::to_ascii_lowercase),
        arg_bounds: service::parse_bounds(&args.min_args, &args.max_args)?,
        single_use: args.single_use || args.args_digest.is_some(),
    };
    let subject = AgentSubject {
        agent: args.agent,
        exe_sha256,
        uid,
        environment: Environment { host, cgroup },
        scope,
    };
    let until = now + valid_for;
    let mut evidence = Evidence::approval(&approver, Channel::CliIssue, now)?;
    evidence.approver_uid = Some(approver_uid);
    let key = keys::load_or_create(&dir).context("loading kya's signing key")?;
    let (document, credential) = action::issue(&key, subject, now, until, vec![evidence])?;
    let store = CredentialStore::open(&dir)?;
    store.add_standing(&document, &credential, now)?;
    let text = serde_json::to_string_pretty(&document)? + "\n";
    match &args.out {
        Some(path) => {
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?
        }
        None => print!("{text}"),
    }
    eprintln!(
        "kya: issued credential {} for agent {:?}, tool {:?}, valid until {}",
        credential.id,
        credential.subject.agent,
        credential.subject.scope.tool,
        action::format_time(credential.valid_until)?
    );
    Ok(ExitCode::SUCCESS)
}

/// Issue through the running daemon: the issuer is who the kernel says we are
/// (`SO_PEERCRED`), checked against the daemon's live agent registry.
fn issue_via_daemon(c: &mut client::Client, args: CredentialIssueArgs) -> anyhow::Result<ExitCode> {
    let exe_sha256 = match (&args.exe, &args.exe_sha256) {
        (Some(path), _) => Some(file_sha256(path)?),
        (None, hex) => hex.clone(),
    };
    let req = service::IssueRequest {
        agent: args.agent.clone(),
        tool: args.tool,
        server: args.server,
        args_digest: args.args_digest,
        min_args: args.min_args,
        max_args: args.max_args,
        valid_for: args.valid_for,
        uid: args.uid,
        cgroup: args.cgroup,
        exe_sha256,
        host: args.host,
        single_use: args.single_use,
    };
    let result = c.call(&Request::new(
        "credential.issue",
        serde_json::to_value(&req)?,
    ))?;
    let document = result
        .get("credential")
        .context("the daemon sent no credential")?;
    let text = serde_json::to_string_pretty(document)? + "\n";
    match &args.out {
        Some(path) => {
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?
        }
        None => print!("{text}"),
    }
    let released = result
        .get("released")
        .and_then(Value::as_array)
        .map(Vec::len)
        .unwrap_or(0);
    eprintln!(
        "kya: issued credential {} for agent {:?}, tool {:?}, valid until {}{}",
        result["id"].as_str().unwrap_or_default(),
        req.agent,
        document["credentialSubject"]["scope"]["tool"]
            .as_str()
            .unwrap_or_default(),
        document["validUntil"].as_str().unwrap_or_default(),
        if released > 0 {
            format!("; released {released} held call(s)")
        } else {
            String::new()
        }
    );
    Ok(ExitCode::SUCCESS)
}

fn verify(args: CredentialVerifyArgs) -> anyhow::Result<ExitCode> {
    let bytes = match (&args.header, &args.file) {
        (Some(h), _) => h.clone().into_bytes(),
        (None, Some(file)) => read_input(file)?,
        (None, None) => bail!("give a credential FILE or --header VALUE"),
    };
    let trusted = match (&args.key, &args.state_dir) {
        (Some(k), _) => parse_trusted_key(k)?,
        (None, dir) => {
            let path = state_dir(dir).join(keys::PUBLIC_KEY_FILE);
            keys::load_public(&path).context("loading kya's public key (or pass --key)")?
        }
    };
    if let Some(value) = header_value(&bytes) {
        return verify_receipt(&args, value, &trusted);
    }
    if args.body.is_some() {
        bail!("--body checks a decision receipt (a Kya-Decision header value), not a credential");
    }
    // Revocations apply when a state dir is in play (given, or the default one
    // whose key is trusted); a state dir without a credential store has none.
    let store_dir = match (&args.key, &args.state_dir) {
        (Some(_), None) => None,
        (_, dir) => Some(state_dir(dir)),
    };
    let store = match store_dir {
        Some(d) if args.consume || d.join(super::store::DIR_NAME).is_dir() => {
            Some(CredentialStore::open(&d)?)
        }
        _ => None,
    };
    if args.consume && store.is_none() {
        bail!("--consume needs a state dir (--state-dir) to record spent credentials");
    }
    let call = match &args.call {
        Some(path) => Some(parse_call(&read_input(path)?)?),
        None => None,
    };
    let now = match (&args.now, &call) {
        (Some(t), _) => action::parse_time(t).context("--now")?,
        (None, Some((_, Some(t)))) => *t,
        _ => OffsetDateTime::now_utc(),
    };
    let outcome = (|| -> Result<action::ActionCredential, VerifyError> {
        let doc = jcs::parse_strict(&bytes, jcs::MAX_INPUT_BYTES)?;
        let cred = verify::verify_document(&doc, &trusted)?;
        verify::check_window(&cred, now)?;
        if let Some((call, _)) = &call {
            verify::check_binding(&cred, call)?;
            verify::check_scope(&cred, call)?;
        }
        if let (true, Some(store)) = (args.consume, &store) {
            verify::redeem(&cred, now, store)?;
        } else if let Some(store) = &store {
            if store.is_revoked(&cred.id).map_err(VerifyError::Store)? {
                return Err(VerifyError::Revoked(cred.id.clone()));
            }
            if cred.subject.scope.single_use
                && store.is_spent(&cred.id).map_err(VerifyError::Store)?
            {
                return Err(VerifyError::Replayed(cred.id.clone()));
            }
        }
        Ok(cred)
    })();
    match outcome {
        Ok(cred) => {
            let report = json!({
                "valid": true,
                "id": cred.id,
                "issuer": cred.issuer,
                "agent": cred.subject.agent,
                "validFrom": action::format_time(cred.valid_from)?,
                "validUntil": action::format_time(cred.valid_until)?,
                "scope": cred.scope_json(),
                "checked": {
                    "call": call.is_some(),
                    "consumed": args.consume && cred.subject.scope.single_use,
                    "revocation": store.is_some(),
                    "at": action::format_time(now)?,
                },
            });
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(err) => {
            let report = json!({"valid": false, "reason": err.code(), "error": err.to_string()});
            println!("{}", serde_json::to_string_pretty(&report)?);
            eprintln!("kya: credential invalid: {err}");
            Ok(ExitCode::from(1))
        }
    }
}

/// The `Kya-Decision` value in `bytes`, unless they are a JSON credential:
/// surrounding whitespace and a leading `Kya-Decision:` are ignored.
fn header_value(bytes: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(bytes).ok()?.trim();
    if text.starts_with('{') {
        return None;
    }
    let text = match text.split_once(':') {
        Some((name, rest)) if name.trim().eq_ignore_ascii_case(header::HEADER_NAME) => rest.trim(),
        _ => text,
    };
    Some(text)
}

/// Verify a decision receipt (a `Kya-Decision` header value), with `--body`
/// its binding to the request body, and report valid/invalid as JSON.
fn verify_receipt(
    args: &CredentialVerifyArgs,
    value: &str,
    trusted: &VerifyingKey,
) -> anyhow::Result<ExitCode> {
    if args.call.is_some() || args.consume {
        bail!("--call and --consume apply to credentials, not to decision receipts (use --body)");
    }
    let body = match &args.body {
        Some(path) => {
            Some(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?)
        }
        None => None,
    };
    let now = match &args.now {
        Some(t) => action::parse_time(t).context("--now")?,
        None => OffsetDateTime::now_utc(),
    };
    match header::verify(value, trusted, now, body.as_deref()) {
        Ok(v) => {
            let r = &v.receipt;
            let s = &r.subject;
            let calls: Vec<Value> = s
                .calls
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let cred = v.credentials.iter().find(|(j, _)| *j == i).map(|(_, c)| c);
                    json!({
                        "decision": c.decision,
                        "method": c.method,
                        "tool": c.tool,
                        "argsSha256": c.args_sha256,
                        "credential": cred.map(|c| json!({
                            "id": c.id,
                            "approver": c.evidence.first().map(|e| e.approver.clone()),
                            "scope": c.scope_json(),
                        })),
                    })
                })
                .collect();
            let report = json!({
                "valid": true,
                "kind": "decision_receipt",
                "id": r.id,
                "issuer": r.issuer,
                "validFrom": action::format_time(r.valid_from)?,
                "validUntil": action::format_time(r.valid_until)?,
                "host": s.host,
                "server": s.server,
                "request": s.request,
                "agent": s.agent,
                "calls": calls,
                "checked": {
                    "body": v.body_checked,
                    "at": action::format_time(now)?,
                },
            });
            println!("{}", serde_json::to_string_pretty(&report)?);
            if !v.body_checked {
                eprintln!(
                    "kya: receipt valid; its body binding was not checked (pass --body FILE)"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(err) => {
            let report = json!({"valid": false, "kind": "decision_receipt", "reason": err.code(), "error": err.to_string()});
            println!("{}", serde_json::to_string_pretty(&report)?);
            eprintln!("kya: decision receipt invalid: {err}");
            Ok(ExitCode::from(1))
        }
    }
}

fn revoke(args: CredentialRevokeArgs) -> anyhow::Result<ExitCode> {
    let dir = state_dir(&args.state_dir);
    if !args.offline {
        match client::Client::connect(&dir) {
            Ok(mut c) => {
                let r = c.call(&Request::new("credential.revoke", json!({"id": args.id})))?;
                if r["already"] == true {
                    println!("{} was already revoked", args.id);
                } else {
                    println!("revoked {}", args.id);
                }
                return Ok(ExitCode::SUCCESS);
            }
            Err(ClientError::Connect { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let store = CredentialStore::open(&dir)?;
    if store.revoke(&args.id, OffsetDateTime::now_utc())? {
        println!("revoked {}", args.id);
    } else {
        println!("{} was already revoked", args.id);
    }
    Ok(ExitCode::SUCCESS)
}

fn list(args: CredentialListArgs) -> anyhow::Result<ExitCode> {
    let dir = state_dir(&args.state_dir);
    let now = OffsetDateTime::now_utc();
    let mut rows = Vec::new();
    // A running daemon lists what the caller may manage (root: all); without
    // one, the store is read directly (needs access to the state dir).
    let from_daemon = match client::Client::connect(&dir) {
        Ok(mut c) => Some(c.call(&Request::new("credential.list", Value::Null))?),
        Err(ClientError::Connect { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    if let Some(Value::Array(items)) = from_daemon {
        rows = items;
    } else if dir.join(super::store::DIR_NAME).is_dir() {
        let store = CredentialStore::open(&dir)?;
        for s in store.standing()? {
            let c = &s.credential;
            rows.push(json!({
                "id": c.id,
                "agent": c.subject.agent,
                "tool": c.subject.scope.tool,
                "scope": c.scope_json(),
                "validUntil": action::format_time(c.valid_until)?,
                "expired": c.valid_until <= now,
                "spent": c.subject.scope.single_use && store.is_spent(&c.id)?,
            }));
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        for r in &rows {
            println!(
                "{}  agent={}  tool={}  until={}{}{}{}",
                r["id"].as_str().unwrap_or_default(),
                r["agent"].as_str().unwrap_or_default(),
                r["tool"].as_str().unwrap_or_default(),
                r["validUntil"].as_str().unwrap_or_default(),
                if r["expired"] == true {
                    "  (expired)"
                } else {
                    ""
                },
                if r["spent"] == true { "  (spent)" } else { "" },
                if r["revoked"] == true {
                    "  (revoked)"
                } else {
                    ""
                },
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The part of an agent registry (`[[agent]]`, see `policies/README.md`) that issuing
/// needs. Other keys are ignored here; the policy module owns the full format.
#[derive(Debug, Deserialize)]
struct Registry {
    #[serde(default)]
    agent: Vec<RegisteredAgent>,
}

#[derive(Debug, Deserialize)]
struct RegisteredAgent {
    name: String,
    owner: Option<String>,
    expires: Option<toml::Value>,
    #[serde(default, rename = "match")]
    selectors: Selectors,
}

#[derive(Debug, Default, Deserialize)]
struct Selectors {
    exe: Option<PathBuf>,
    uid: Option<u32>,
    cgroup: Option<String>,
}

/// Find `name` in the registry and check that `user` (uid `uid`) may issue
/// for it: its owner, or root. An expired agent (orphaned) gets nothing, and a
/// name registered twice is ambiguous and refused.
fn registered_agent(
    text: &str,
    name: &str,
    user: &str,
    uid: u32,
    today: time::Date,
) -> anyhow::Result<RegisteredAgent> {
    let registry: Registry = toml::from_str(text)?;
    let mut matches = registry.agent.into_iter().filter(|a| a.name == name);
    let agent = matches
        .next()
        .with_context(|| format!("agent {name:?} is not registered"))?;
    if matches.next().is_some() {
        bail!("agent {name:?} is registered more than once");
    }
    if let Some(expires) = &agent.expires {
        let text = match expires {
            toml::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let date = time::Date::parse(
            &text,
            time::macros::format_description!("[year]-[month]-[day]"),
        )
        .with_context(|| format!("agent {name:?}: expires {text:?} is not a date"))?;
        if date < today {
            bail!("agent {name:?} expired on {text} (orphaned): no credentials for it");
        }
    }
    let is_owner = agent.owner.as_deref() == Some(user);
    if !is_owner && uid != 0 {
        bail!(
            "{user} is not the owner of agent {name:?} (owner: {})",
            agent.owner.as_deref().unwrap_or("none")
        );
    }
    Ok(agent)
}

/// `--key`: a did:key (with or without fragment), a `z6Mk…` multikey, or a PEM file.
fn parse_trusted_key(text: &str) -> anyhow::Result<VerifyingKey> {
    if let Some(rest) = text.strip_prefix("did:key:") {
        let mb = rest.split('#').next().unwrap_or(rest);
        return Ok(multikey::decode_public(mb)?);
    }
    if text.starts_with("z6Mk") && !Path::new(text).exists() {
        return Ok(multikey::decode_public(text)?);
    }
    Ok(keys::load_public(Path::new(text))?)
}

/// The `kya policy test` call description, plus the fields a credential binds to.
#[derive(Debug, Deserialize)]
struct CallFile {
    agent: Option<String>,
    process: Option<ProcessFile>,
    #[serde(default)]
    server: String,
    #[serde(default = "tools_call")]
    method: String,
    tool: Option<String>,
    #[serde(default)]
    args: Option<Value>,
    time: Option<String>,
    /// The host the call happens on (default: this host).
    host: Option<String>,
}

fn tools_call() -> String {
    "tools/call".to_owned()
}

#[derive(Debug, Deserialize)]
struct ProcessFile {
    uid: Option<u32>,
    #[serde(default)]
    cgroup: String,
    /// SHA-256 (hex) of the executable; needed when the credential binds one.
    exe_sha256: Option<String>,
}

fn parse_call(bytes: &[u8]) -> anyhow::Result<(Call, Option<OffsetDateTime>)> {
    let value = jcs::parse_strict(bytes, jcs::MAX_INPUT_BYTES).context("call description")?;
    let file: CallFile = serde_json::from_value(value).context("call description")?;
    let agent = file
        .agent
        .context("call description has no \"agent\" (credentials bind to a named agent)")?;
    let process = file
        .process
        .context("call description has no \"process\"")?;
    let uid = process.uid.context("call description has no process.uid")?;
    let tool = file.tool.context("call description has no \"tool\"")?;
    let time = match &file.time {
        Some(t) => Some(action::parse_time(t).context("call description time")?),
        None => None,
    };
    let host = match file.host {
        Some(h) => h,
        None => local_hostname()?,
    };
    Ok((
        Call {
            agent,
            uid,
            cgroup: process.cgroup,
            exe_sha256: process.exe_sha256,
            host,
            server: file.server,
            method: file.method,
            tool,
            args: file.args.unwrap_or_else(|| json!({})),
        },
        time,
    ))
}

/// Read a file or stdin (`-`), refusing more than the JSON size limit.
fn read_input(path: &Path) -> anyhow::Result<Vec<u8>> {
    let limit = jcs::MAX_INPUT_BYTES as u64 + 1;
    let mut buf = Vec::new();
    if path == Path::new("-") {
        std::io::stdin().take(limit).read_to_end(&mut buf)?;
    } else {
        std::fs::File::open(path)
            .with_context(|| format!("opening {}", path.display()))?
            .take(limit)
            .read_to_end(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
    }
    if buf.len() as u64 >= limit {
        bail!(
            "{}: larger than {} bytes",
            path.display(),
            jcs::MAX_INPUT_BYTES
        );
    }
    Ok(buf)
}

fn file_sha256(path: &Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// This host's name, as the kernel reports it (what the daemon binds to).
pub fn local_hostname() -> anyhow::Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("reading /proc/sys/kernel/hostname")?;
    let name = name.trim();
    if name.is_empty() {
        bail!("this host has no name");
    }
    Ok(name.to_owned())
}

/// The invoking user: name (or `uid:N` when it has none) and uid. The real
/// uid, so `sudo` still records who ran it only if sudo preserved it: that is
/// why the control-socket path (SO_PEERCRED) is the one for real approvals.
fn invoking_user() -> (String, u32) {
    let uid = nix::unistd::Uid::current();
    let name = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| format!("uid:{uid}"));
    (name, uid.as_raw())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credential::service::{merge_binding, parse_bounds};
    use serde_json::Number;

    #[test]
    fn bounds_merge_per_argument_and_refuse_garbage() {
        let b = parse_bounds(
            &["amount=0".into()],
            &["amount=500".into(), "fee=2.5".into()],
        )
        .unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].min, Some(0.into()));
        assert_eq!(b[0].max, Some(500.into()));
        assert_eq!(b[1].max.as_ref().and_then(Number::as_f64), Some(2.5));
        for bad in [
            "amount",
            "=5",
            "amount=",
            "amount=NaN",
            "amount=inf",
            "amount=5x",
        ] {
            assert!(parse_bounds(&[], &[bad.into()]).is_err(), "{bad}");
        }
        assert!(parse_bounds(&[], &["a=1".into(), "a=2".into()]).is_err());
    }

    #[test]
    fn call_descriptions_are_parsed_strictly() {
        let (call, time) = parse_call(
            br#"{"agent":"billing-bot","process":{"pid":42,"uid":1000,"exe":"/usr/bin/python3","comm":"python3","cgroup":"/agents/billing"},
                "server":"mcp.example.com","method":"tools/call","tool":"transfer","args":{"amount":5000,"to":"bob"},
                "time":"2026-11-26T12:00:00Z","host":"h"}"#,
        )
        .unwrap();
        assert_eq!(call.uid, 1000);
        assert_eq!(call.args["amount"], 5000);
        assert!(time.is_some());
        for bad in [
            &br#"{"process":{"uid":1},"tool":"t"}"#[..],
            br#"{"agent":"a","tool":"t"}"#,
            br#"{"agent":"a","process":{},"tool":"t"}"#,
            br#"{"agent":"a","process":{"uid":1}}"#,
            br#"{"agent":"a","process":{"uid":"1"},"tool":"t"}"#,
            br#"{"agent":"a","agent":"b","process":{"uid":1},"tool":"t"}"#,
            br#"{"agent":"a","process":{"uid":1},"tool":"t","time":"noon"}"#,
            b"[]",
        ] {
            assert!(parse_call(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn registry_owner_and_expiry_checks() {
        let text = r#"
[[agent]]
name = "billing-bot"
owner = "alice"
created = "2026-11-01"
expires = "2027-05-01"
match = { exe = "/usr/bin/python3", uid = 1001, cgroup = "/agents/billing" }

[[agent]]
name = "old-bot"
owner = "alice"
expires = 2026-01-01

[[agent]]
name = "twice"
owner = "alice"
[[agent]]
name = "twice"
owner = "bob"
"#;
        let today = time::macros::date!(2026 - 11 - 26);
        let a = registered_agent(text, "billing-bot", "alice", 1000, today).unwrap();
        assert_eq!(a.selectors.uid, Some(1001));
        assert_eq!(a.selectors.cgroup.as_deref(), Some("/agents/billing"));
        // Root may issue for anyone; another user may not.
        registered_agent(text, "billing-bot", "root", 0, today).unwrap();
        let err = registered_agent(text, "billing-bot", "mallory", 1002, today).unwrap_err();
        assert!(err.to_string().contains("not the owner"), "{err}");
        assert!(registered_agent(text, "nobody", "alice", 1000, today).is_err());
        assert!(registered_agent(text, "old-bot", "alice", 1000, today).is_err());
        assert!(registered_agent(text, "twice", "alice", 1000, today).is_err());
        assert!(registered_agent(
            text,
            "billing-bot",
            "alice",
            1000,
            time::macros::date!(2027 - 05 - 02)
        )
        .is_err());
        assert!(registered_agent("[[agent]]\nname = 5", "x", "root", 0, today).is_err());
        assert!(registered_agent("not toml [", "x", "root", 0, today).is_err());
        assert_eq!(merge_binding("uid", Some(1), Some(1)).unwrap(), Some(1));
        assert_eq!(merge_binding("uid", None, Some(2)).unwrap(), Some(2));
        assert!(merge_binding("uid", Some(1), Some(2)).is_err());
    }

    #[test]
    fn header_values_are_told_from_credentials() {
        assert_eq!(header_value(b"eyJhIjoxfQ\n"), Some("eyJhIjoxfQ"));
        assert_eq!(
            header_value(b"Kya-Decision: eyJhIjoxfQ"),
            Some("eyJhIjoxfQ")
        );
        assert_eq!(
            header_value(b"  kya-decision:eyJhIjoxfQ "),
            Some("eyJhIjoxfQ")
        );
        assert_eq!(header_value(b" {\"id\": 1}"), None);
        assert_eq!(header_value(b"\xff\xfe"), None);
        // Another header's name stays part of the value (and fails to verify).
        assert_eq!(header_value(b"X-Other: abc"), Some("X-Other: abc"));
    }

    #[test]
    fn trusted_key_forms() {
        let vk = ed25519_dalek::SigningKey::from_bytes(&[4; 32]).verifying_key();
        assert_eq!(parse_trusted_key(&multikey::did_key(&vk)).unwrap(), vk);
        assert_eq!(
            parse_trusted_key(&multikey::verification_method(&vk)).unwrap(),
            vk
        );
        assert_eq!(
            parse_trusted_key(&multikey::encode_public(&vk)).unwrap(),
            vk
        );
        assert!(parse_trusted_key("did:key:zzz").is_err());
        assert!(parse_trusted_key("/nonexistent/key.pem").is_err());
    }
}
