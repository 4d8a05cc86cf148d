//! Connection-setup overhead, measured with real processes and real sockets:
//!
//! * direct, no kya running (baseline);
//! * kya running, process *not* selected (the BPF programs' early exit);
//! * kya running, process selected (redirected to the interceptor and spliced).
//!
//! Each figure is the median and p99 over COUNT sequential connects of
//! `kya-probe bench`, timed from `connect()` to the echo of one byte.

use anyhow::{bail, Context, Result};
use kya_e2e::{run_json, Daemon, DaemonOptions, TcpEcho, TestCgroup};
use serde_json::Value;
use std::path::Path;
use std::process::Command;

pub(crate) fn run(root: &Path, count: usize) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench-connect loads BPF programs and creates cgroups: run it as root");
    }
    crate::cargo(
        root,
        &[
            "build",
            "--release",
            "-p",
            "kya-agent",
            "-p",
            "kya-e2e",
            "--bins",
        ],
    )?;
    let bin_dir = root.join("target/release");
    std::env::set_var("KYA_BIN_DIR", &bin_dir);
    let probe = bin_dir.join("kya-probe");
    let echo = TcpEcho::start("127.0.0.2:18443");
    let port = echo.addr.port().to_string();
    let bench = |cmd: &mut Command| -> Result<Value> {
        cmd.args(["bench", "127.0.0.2", &port, &count.to_string()]);
        let out = run_json(std::mem::replace(cmd, Command::new("true")));
        if out.get("error").is_some() {
            bail!("probe failed: {out}");
        }
        Ok(out)
    };
    let direct = bench(&mut Command::new(&probe)).context("baseline")?;
    let cg = TestCgroup::new("bench");
    let daemon =
        Daemon::start(DaemonOptions::new(998).args(["--cgroup", &cg.rel, "--port", &port]));
    let unselected = bench(&mut Command::new(&probe)).context("unselected")?;
    let selected = bench(&mut cg.command(&probe, &[])).context("selected")?;
    drop(daemon);
    let us = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN) / 1000.0;
    println!("| path ({count} connects, connect → 1-byte echo) | median µs | p99 µs |");
    println!("| --- | ---: | ---: |");
    for (name, v) in [
        ("direct, no kya", &direct),
        (
            "kya running, process not selected (BPF early exit)",
            &unselected,
        ),
        (
            "kya running, process selected (redirect + splice)",
            &selected,
        ),
    ] {
        println!(
            "| {name} | {:.1} | {:.1} |",
            us(v, "median_ns"),
            us(v, "p99_ns")
        );
    }
    println!(
        "\nadded by redirect + splice: median {:.1} µs; by the early exit: median {:.1} µs",
        us(&selected, "median_ns") - us(&direct, "median_ns"),
        us(&unselected, "median_ns") - us(&direct, "median_ns"),
    );
    Ok(())
}
