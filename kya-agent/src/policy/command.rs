//! The `kya policy check|test` command handlers (the CLI edge: anyhow here).

use super::call::{CallDescription, MAX_CALL_BYTES};
use super::check::check;
use super::diag::Diagnostics;
use super::load::{detect_kind, expand, read_source, FileKind};
use super::model::Policy;
use super::registry::Registry;
use super::testfile;
use crate::cli::{PolicyArgs, PolicyCheckArgs, PolicyCommand, PolicyTestArgs};
use anyhow::Context as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Dispatch `kya policy ...`.
pub fn run(args: PolicyArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        PolicyCommand::Check(a) => check_command(&a),
        PolicyCommand::Test(a) => test_command(&a),
    }
}

fn print_diags(d: &Diagnostics) {
    for x in &d.0 {
        eprintln!("{x}");
    }
}

/// `kya policy check PATH...`: errors (and warnings) on stderr, exit 1 on errors.
pub fn check_command(args: &PolicyCheckArgs) -> anyhow::Result<ExitCode> {
    let d = check(&args.paths);
    print_diags(&d);
    Ok(if d.has_errors() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// `kya policy test PATH... [--agents FILE] [--call FILE|-] [--explain]`.
pub fn test_command(args: &PolicyTestArgs) -> anyhow::Result<ExitCode> {
    let registry = match &args.agents {
        Some(p) => match Registry::load_with_warnings(p) {
            Ok((r, w)) => {
                print_diags(&w);
                r
            }
            Err(d) => {
                print_diags(&d);
                return Ok(ExitCode::from(1));
            }
        },
        None => Registry::empty(),
    };
    // Split the paths into rule files (the policy) and test files.
    let files = match expand(&args.paths, true) {
        Ok(f) => f,
        Err(d) => {
            print_diags(&d);
            return Ok(ExitCode::from(1));
        }
    };
    let mut tests: Vec<PathBuf> = Vec::new();
    let mut rule_paths: Vec<PathBuf> = Vec::new();
    for f in &files {
        let src = match read_source(f) {
            Ok(s) => s,
            Err(d) => {
                print_diags(&Diagnostics(vec![d]));
                return Ok(ExitCode::from(1));
            }
        };
        match detect_kind(&src) {
            Ok(FileKind::Tests) => tests.push(f.clone()),
            Ok(FileKind::Rules) => rule_paths.push(f.clone()),
            Ok(FileKind::Agents) => {}
            Err(d) => {
                print_diags(&Diagnostics(vec![d]));
                return Ok(ExitCode::from(1));
            }
        }
    }
    let policy = if rule_paths.is_empty() {
        None
    } else {
        match Policy::load(&rule_paths) {
            Ok(p) => Some(p),
            Err(d) => {
                print_diags(&d);
                return Ok(ExitCode::from(1));
            }
        }
    };

    if let Some(call_path) = &args.call {
        if !tests.is_empty() {
            anyhow::bail!(
                "--call evaluates one call against rule files; do not pass test files with it"
            );
        }
        let policy = policy.context("no rule files given")?;
        let text = read_call(call_path)?;
        let call = CallDescription::from_json(&text)
            .and_then(|d| d.into_call(&registry))
            .map_err(|e| anyhow::anyhow!("{}: {e}", call_path.display()))?;
        // Budgets are evaluated against empty windows: a single call can
        // still exceed one (or fail closed computing its amount).
        let budgets = super::budget::BudgetState::in_memory();
        let decision = policy.decide_with(&call, Some(&budgets), args.explain);
        out(&serde_json::to_string_pretty(&decision)?);
        return Ok(ExitCode::SUCCESS);
    }

    if tests.is_empty() {
        anyhow::bail!(
            "no [[test]] files found (give test files, or --call FILE to evaluate one call)"
        );
    }
    let (mut passed, mut failed) = (0usize, 0usize);
    for t in &tests {
        let src = match read_source(t) {
            Ok(s) => s,
            Err(d) => {
                print_diags(&Diagnostics(vec![d]));
                failed += 1;
                continue;
            }
        };
        let dir = t.parent().map(Path::to_path_buf).unwrap_or_default();
        let outcomes = testfile::parse(&src, &dir)
            .and_then(|file| testfile::run(&file, policy.as_ref(), &registry));
        match outcomes {
            Ok(outcomes) => {
                for o in outcomes {
                    match o.failure {
                        None => {
                            passed += 1;
                            out(&format!("ok   {}", o.label));
                        }
                        Some(why) => {
                            failed += 1;
                            out(&format!("FAIL {}: {why}", o.label));
                        }
                    }
                }
            }
            Err(d) => {
                print_diags(&d);
                failed += 1;
            }
        }
    }
    out(&format!("{passed} passed, {failed} failed"));
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Print a line on stdout; a closed pipe (`| head`) is not an error worth a panic.
fn out(line: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
}

fn read_call(path: &Path) -> anyhow::Result<String> {
    let mut buf = Vec::new();
    let limit = (MAX_CALL_BYTES + 1) as u64;
    if path == Path::new("-") {
        std::io::stdin()
            .take(limit)
            .read_to_end(&mut buf)
            .context("reading the call from stdin")?;
    } else {
        std::fs::File::open(path)
            .with_context(|| format!("opening {}", path.display()))?
            .take(limit)
            .read_to_end(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
    }
    String::from_utf8(buf).context("the call description is not UTF-8")
}
