//! `kya audit verify FILE... [--key PUB] [--state-dir DIR] [--checkpoints FILE]`.
//!
//! Key choice, reported on stdout so the operator knows what was proven:
//! `--key` pins that key and only that key; otherwise kya's public key in the
//! state dir (`signing-key.pub.pem`) is used if present; otherwise the key named
//! in the checkpoints themselves, which proves integrity but not authorship.

use super::ends::{At, EndsReport};
use super::merkle::Hash;
use super::verify::{verify, TrustedKey, VerifyOptions};
use crate::cli::{AuditArgs, AuditCommand, AuditVerifyArgs};
use crate::keys;
use anyhow::Context;
use base64::Engine;
use std::path::PathBuf;
use std::process::ExitCode;

/// Default state directory (as `kya run`).
const DEFAULT_STATE_DIR: &str = "/var/lib/kya";

/// Dispatch `kya audit ...`.
pub fn run(args: AuditArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        AuditCommand::Verify(v) => run_verify(v),
    }
}

fn run_verify(args: AuditVerifyArgs) -> anyhow::Result<ExitCode> {
    let (key, source) = match &args.key {
        Some(path) => {
            let vk =
                keys::load_public(path).with_context(|| format!("--key {}", path.display()))?;
            (
                TrustedKey::Pinned(vk),
                format!("{} (--key)", path.display()),
            )
        }
        None => {
            let dir = args
                .state_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
            let path = dir.join(keys::PUBLIC_KEY_FILE);
            if path.exists() {
                let vk = keys::load_public(&path)
                    .with_context(|| format!("state dir key {}", path.display()))?;
                (
                    TrustedKey::Pinned(vk),
                    format!("{} (state dir)", path.display()),
                )
            } else {
                (
                    TrustedKey::Embedded,
                    "the key named in the checkpoint file (no --key and no key in the state dir: this proves the log is intact, not who wrote it)".to_string(),
                )
            }
        }
    };
    let opts = VerifyOptions {
        key,
        checkpoints: args.checkpoints.clone(),
        allow_torn_tail: true,
        ends: Some(args.closed),
    };
    match verify(&args.files, &opts) {
        Ok(report) => {
            println!("key: {source}");
            if let Some(signer) = &report.signer {
                println!("signer: {signer}");
            }
            println!(
                "ok: {} file(s), {} records, {} checkpoint(s) verified, root {}",
                report.files.len(),
                report.records,
                report.checkpoints,
                b64(&report.root)
            );
            let covered = report.last_checkpoint.unwrap_or(0);
            if report.records > covered {
                println!(
                    "note: the last {} record(s) come after the last checkpoint (size {covered}): they are verified by the hash chain only",
                    report.records - covered
                );
            }
            if let Some(t) = &report.torn_checkpoint {
                println!(
                    "note: {}:{}: incomplete final checkpoint (cut mid-write) ignored",
                    report.checkpoint_file.display(),
                    t.line
                );
            }
            if let Some(t) = &report.torn_tail {
                println!(
                    "note: {}:{}: incomplete final record (cut mid-write, never acknowledged) ignored",
                    t.file.display(),
                    t.line
                );
            }
            match &report.ends {
                Some(ends) if ends.has_findings() => {
                    report_ends(ends);
                    Ok(ExitCode::from(1))
                }
                Some(ends) => {
                    report_ends(ends);
                    Ok(ExitCode::SUCCESS)
                }
                None => Ok(ExitCode::SUCCESS),
            }
        }
        Err(fault) => {
            println!("key: {source}");
            eprintln!("kya audit verify: FAILED: {fault}");
            Ok(ExitCode::from(1))
        }
    }
}

/// Lines printed per kind of completeness result.
const MAX_LISTED: usize = 20;

/// Decisions without exactly one final record.
fn report_ends(ends: &EndsReport) {
    let list = |what: &str, items: &[At], to_err: bool| {
        for at in items.iter().take(MAX_LISTED) {
            if to_err {
                eprintln!("kya audit verify: FINDING: {at}: {what}");
            } else {
                println!("open: {at}: {what}");
            }
        }
        if items.len() > MAX_LISTED {
            let more = items.len() - MAX_LISTED;
            if to_err {
                eprintln!("kya audit verify: FINDING: ... and {more} more");
            } else {
                println!("open: ... and {more} more");
            }
        }
    };
    list(
        "held call with no final record (it cannot still be waiting)",
        &ends.unended,
        true,
    );
    list(
        "second final record for a decision that had already ended",
        &ends.repeated,
        true,
    );
    list(
        "held call not ended yet (it may still be waiting; --closed if the daemon is stopped)",
        &ends.open,
        false,
    );
    if ends.unparsed > 0 {
        println!(
            "note: {} record(s) could not be read for the completeness check",
            ends.unparsed
        );
    }
    if ends.has_findings() {
        eprintln!(
            "kya audit verify: FAILED: {} decision(s) without exactly one final record",
            ends.unended.len() + ends.repeated.len()
        );
    }
}

fn b64(h: &Hash) -> String {
    base64::engine::general_purpose::STANDARD.encode(h)
}
