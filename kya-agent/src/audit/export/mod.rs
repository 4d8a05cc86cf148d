//! Export sinks: the decision stream as OCSF JSON lines for a SIEM, on
//! stdout (journald, container logs), in a size-rotated file, or as RFC 5424
//! syslog messages (local `/dev/log`, UDP or TCP: see [`syslog`]).
//!
//! Each sink follows the decision stream (a broadcast receiver per sink, from
//! the daemon's event hub): a sink too slow to keep up
//! loses events (counted, visible in `kya status`) and never slows a
//! decision; the audit log is the record that never drops.

pub(crate) mod health;
pub(crate) mod syslog;

use crate::audit::ocsf::to_ocsf;
use crate::audit::DecisionEvent;
use health::fail;
pub(crate) use health::SinkHealth;
use std::io::Write;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use syslog::{SyslogSink, SyslogSpec};
use tokio::sync::broadcast;

/// A rotated file is renamed to `.1` (the previous `.1` is dropped) past this size.
pub(crate) const ROTATE_BYTES: u64 = 64 << 20;

/// Where a sink writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkSpec {
    Stdout,
    File(PathBuf),
    Syslog(SyslogSpec),
}

impl FromStr for SinkSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdout" => Ok(SinkSpec::Stdout),
            other => {
                if let Some(rest) = other.strip_prefix("syslog") {
                    return SyslogSpec::parse(rest).map(SinkSpec::Syslog);
                }
                match other.strip_prefix("file:") {
                    Some(p) if p.starts_with('/') => Ok(SinkSpec::File(PathBuf::from(p))),
                    _ => Err(format!(
                        "unknown sink {other:?} (expected \"stdout\", \"file:/absolute/path\", \"syslog\", \"syslog:unix:/path\", \"syslog:udp://HOST:PORT\" or \"syslog:tcp://HOST:PORT\")"
                    )),
                }
            }
        }
    }
}

/// Start one task per sink; returns their health handles.
pub(crate) fn spawn(
    subscribe: impl Fn() -> broadcast::Receiver<Arc<DecisionEvent>>,
    specs: &[SinkSpec],
) -> Vec<Arc<SinkHealth>> {
    specs
        .iter()
        .map(|spec| {
            let health = Arc::new(SinkHealth {
                sink: match spec {
                    SinkSpec::Stdout => "stdout".into(),
                    SinkSpec::File(p) => format!("file:{}", p.display()),
                    SinkSpec::Syslog(s) => s.name(),
                },
                ..Default::default()
            });
            let rx = subscribe();
            let h = health.clone();
            let spec = spec.clone();
            // Writes are blocking I/O: a thread of its own per sink.
            std::thread::Builder::new()
                .name("kya-sink".into())
                .spawn(move || run(spec, rx, &h))
                .map_err(|e| tracing::error!(error = %e, "cannot start an export sink"))
                .ok();
            health
        })
        .collect()
}

fn run(
    spec: SinkSpec,
    mut rx: broadcast::Receiver<Arc<crate::audit::DecisionEvent>>,
    health: &SinkHealth,
) {
    let mut out: Box<dyn Write> = match &spec {
        SinkSpec::Syslog(s) => return run_syslog(SyslogSink::new(s.clone()), rx, health),
        SinkSpec::Stdout => Box::new(std::io::stdout()),
        SinkSpec::File(p) => match open(p) {
            Ok(f) => Box::new(f),
            Err(e) => {
                fail(health, format!("{}: {e}", p.display()));
                return;
            }
        },
    };
    loop {
        let event = match rx.blocking_recv() {
            Ok(e) => e,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                health.dropped.fetch_add(n, Ordering::Relaxed);
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let mut line = to_ocsf(&event).to_string();
        line.push('\n');
        if let Err(e) = out.write_all(line.as_bytes()).and_then(|()| out.flush()) {
            fail(health, e.to_string());
            continue;
        }
        health.written.fetch_add(1, Ordering::Relaxed);
        if let SinkSpec::File(p) = &spec {
            if std::fs::metadata(p)
                .map(|m| m.len() >= ROTATE_BYTES)
                .unwrap_or(false)
            {
                match rotate(p) {
                    Ok(f) => out = Box::new(f),
                    Err(e) => fail(health, format!("rotating {}: {e}", p.display())),
                }
            }
        }
    }
}

fn run_syslog(
    mut sink: SyslogSink,
    mut rx: broadcast::Receiver<Arc<crate::audit::DecisionEvent>>,
    health: &SinkHealth,
) {
    loop {
        match rx.blocking_recv() {
            Ok(e) => sink.emit(&e, health),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                health.dropped.fetch_add(n, Ordering::Relaxed);
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

fn open(p: &std::path::Path) -> std::io::Result<std::fs::File> {
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
}

fn rotate(p: &std::path::Path) -> std::io::Result<std::fs::File> {
    let old = p.with_extension(format!(
        "{}.1",
        p.extension().and_then(|e| e.to_str()).unwrap_or("log")
    ));
    std::fs::rename(p, old)?;
    open(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_reject_garbage() {
        assert_eq!("stdout".parse::<SinkSpec>(), Ok(SinkSpec::Stdout));
        assert_eq!(
            "file:/var/log/kya.jsonl".parse::<SinkSpec>(),
            Ok(SinkSpec::File("/var/log/kya.jsonl".into()))
        );
        assert!(matches!(
            "syslog".parse::<SinkSpec>(),
            Ok(SinkSpec::Syslog(_))
        ));
        assert!(matches!(
            "syslog:udp://127.0.0.1:514".parse::<SinkSpec>(),
            Ok(SinkSpec::Syslog(_))
        ));
        for bad in [
            "",
            "file:",
            "file:relative.jsonl",
            "syslog:",
            "syslogx",
            "STDOUT",
            "http://x",
        ] {
            assert!(bad.parse::<SinkSpec>().is_err(), "{bad:?}");
        }
    }
}
