//! The end-to-end benchmark's report: a table with ratios on stdout, the same
//! as markdown for BENCHMARKS.md, the raw results as JSON, and a latency CDF
//! plot (PNG, matplotlib in the private venv) of the kept-alive workload.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::peers::Venv;
use super::Options;

/// The path a request takes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Via {
    Direct,
    Kya,
    Mitmproxy,
}

impl Via {
    pub(super) fn name(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Kya => "kya",
            Via::Mitmproxy => "mitmproxy",
        }
    }
}

/// One load-client run.
pub(super) struct Row {
    pub workload: &'static str,
    pub via: Via,
    pub result: Value,
}

pub(super) struct Report<'a> {
    pub rows: Vec<Row>,
    /// Approval sent → upstream received the call, per held call.
    pub held: Vec<Duration>,
    /// (h) and (i), through kya.
    pub scale: Vec<super::scale::Figure>,
    /// (j), through kya.
    pub floods: Option<super::flood::Floods>,
    pub mitmproxy_version: String,
    pub load: String,
    pub opts: &'a Options,
}

/// What a workload is and which figures describe it.
const WORKLOADS: &[(&str, &str, &[Metric])] = &[
    ("a-c1", "(a) tools/call, kept alive, 1 client", LATENCY),
    ("a-c64", "(a) tools/call, kept alive, 64 clients", LATENCY),
    (
        "a-splice-c1",
        "(a) tools/call to a passthrough name, kept alive, 1 client (kya: spliced, not decrypted: the relay's own cost)",
        LATENCY,
    ),
    (
        "a-splice-c64",
        "(a) tools/call to a passthrough name, kept alive, 64 clients (kya: spliced)",
        LATENCY,
    ),
    (
        "b-cached",
        "(b) new TLS connection per call, same SNI (kya: leaf cached)",
        LATENCY,
    ),
    (
        "b-fresh",
        "(b) new TLS connection per call, new SNI each (kya: leaf not cached)",
        LATENCY,
    ),
    (
        "e-sse",
        "(e) 1 MiB tool result as SSE, 1 client",
        &[Metric::MBps, Metric::P50],
    ),
    (
        "f-bulk",
        "(f) bulk download, not MCP (kya: passthrough)",
        &[Metric::MBps],
    ),
    (
        "sdk-c1",
        "(a) against the Python SDK server, 1 client",
        LATENCY,
    ),
    (
        "sdk-c64",
        "(a) against the Python SDK server, 64 clients",
        LATENCY,
    ),
    ("c-deny", "(c) denied tools/call, request → denial", LATENCY),
    (
        "g-first",
        "(g) first call of a new process (its connection already open; median and slowest of the processes)",
        &[Metric::P50, Metric::Max],
    ),
];

const LATENCY: &[Metric] = &[Metric::P50, Metric::P99, Metric::P999, Metric::Rps];

#[derive(Clone, Copy)]
enum Metric {
    P50,
    P99,
    P999,
    Rps,
    MBps,
    Max,
}

impl Metric {
    fn label(self) -> &'static str {
        match self {
            Metric::P50 => "p50 ms",
            Metric::P99 => "p99 ms",
            Metric::P999 => "p99.9 ms",
            Metric::Rps => "req/s",
            Metric::MBps => "MB/s",
            Metric::Max => "max ms",
        }
    }

    fn value(self, v: &Value) -> Option<f64> {
        let ms = |k: &str| v[k].as_f64().map(|us| us / 1000.0);
        match self {
            Metric::P50 => ms("p50_us"),
            Metric::P99 => ms("p99_us"),
            Metric::P999 => ms("p999_us"),
            Metric::Rps => v["rps"].as_f64(),
            Metric::MBps => v["bytes_per_s"].as_f64().map(|b| b / 1e6),
            Metric::Max => ms("max_us"),
        }
    }
}

fn fmt(x: Option<f64>) -> String {
    match x {
        None => "–".into(),
        Some(x) if x >= 100.0 => format!("{x:.0}"),
        Some(x) if x >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.2}"),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "–".into(),
    }
}

impl Report<'_> {
    fn get(&self, workload: &str, via: Via) -> Option<&Value> {
        self.rows
            .iter()
            .find(|r| r.workload == workload && r.via == via)
            .map(|r| &r.result)
    }

    /// Table lines (markdown, also readable on a terminal).
    fn table(&self) -> Vec<String> {
        let mut lines: Vec<String> = Vec::new();
        if !self.rows.is_empty() || !self.held.is_empty() {
            lines.push(
                "| workload | figure | direct | kya | mitmproxy | kya/direct | kya/mitmproxy |"
                    .into(),
            );
            lines.push("| --- | --- | ---: | ---: | ---: | ---: | ---: |".into());
        }
        for (key, title, metrics) in WORKLOADS {
            if self.rows.iter().all(|r| r.workload != *key) {
                continue;
            }
            for (i, m) in metrics.iter().enumerate() {
                let val = |via| self.get(key, via).and_then(|v| m.value(v));
                let (d, k, p) = (val(Via::Direct), val(Via::Kya), val(Via::Mitmproxy));
                lines.push(format!(
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    if i == 0 { *title } else { "" },
                    m.label(),
                    fmt(d),
                    fmt(k),
                    fmt(p),
                    ratio(k, d),
                    ratio(k, p),
                ));
            }
        }
        if !self.held.is_empty() {
            let mut ms: Vec<f64> = self.held.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
            ms.sort_by(f64::total_cmp);
            let median = ms[ms.len() / 2];
            let max = ms[ms.len() - 1];
            lines.push(format!(
                "| (d) held call: approval sent → upstream receives the call ({} calls) | median / max ms | – | {} / {} | – | – | – |",
                ms.len(),
                fmt(Some(median)),
                fmt(Some(max))
            ));
        }
        if !self.scale.is_empty() {
            lines.push(String::new());
            lines.push("| (h) scale and (i) unselected processes, through kya | figure |".into());
            lines.push("| --- | --- |".into());
            for f in &self.scale {
                lines.push(format!("| {} | {} |", f.what, f.value));
            }
        }
        if let Some(f) = &self.floods {
            lines.extend(f.lines());
        }
        for r in &self.rows {
            let failed = r.result["failed"].as_u64().unwrap_or(0);
            if failed > 0 {
                lines.push(String::new());
                lines.push(format!(
                    "Failed requests: {} via {}: {failed} of {}; first error: {}",
                    r.workload,
                    r.via.name(),
                    failed + r.result["ok"].as_u64().unwrap_or(0),
                    r.result["first_error"]
                ));
            }
        }
        lines
    }

    fn heading(&self) -> String {
        let quick = if self.opts.quick { " (--quick)" } else { "" };
        if !self.opts.runs(super::Workload::Standard) {
            let names: Vec<&str> = self.opts.workloads.iter().map(|w| w.name()).collect();
            return format!(
                "workloads {}{quick}; load average {}",
                names.join(", "),
                self.load
            );
        }
        format!(
            "{} s per workload{quick}; bulk download {} MiB; mitmproxy {}; load average {}",
            self.opts.duration.as_secs_f64(),
            self.opts.bulk_bytes >> 20,
            self.mitmproxy_version,
            self.load
        )
    }

    pub(super) fn print(&self) {
        println!("\n{}\n", self.heading());
        for l in self.table() {
            println!("{l}");
        }
    }

    pub(super) fn markdown(&self) -> String {
        let mut s = format!("{}\n\n", self.heading());
        for l in self.table() {
            s.push_str(&l);
            s.push('\n');
        }
        s
    }

    pub(super) fn json(&self) -> Value {
        json!({
            "heading": self.heading(),
            "runs": self.rows.iter().map(|r| json!({
                "workload": r.workload, "via": r.via.name(), "result": r.result,
            })).collect::<Vec<_>>(),
            "held_ms": self.held.iter().map(|d| d.as_secs_f64() * 1000.0).collect::<Vec<_>>(),
            "scale": self.scale.iter().map(|f| json!({"what": f.what, "value": f.value})).collect::<Vec<_>>(),
            "flood": self.floods.as_ref().map(super::flood::Floods::json),
        })
    }

    /// The latency CDF of (a), both concurrencies, the three paths.
    pub(super) fn plot(&self, venv: &Venv, png: &Path) -> Result<()> {
        let mut series = serde_json::Map::new();
        for key in ["a-c1", "a-c64"] {
            let mut per = serde_json::Map::new();
            for via in [Via::Direct, Via::Kya, Via::Mitmproxy] {
                if let Some(v) = self.get(key, via) {
                    per.insert(via.name().into(), v["cdf_us"].clone());
                }
            }
            series.insert(key.into(), Value::Object(per));
        }
        let data = png.with_extension("cdf.json");
        std::fs::write(&data, Value::Object(series).to_string()).context("CDF data")?;
        let status = Command::new(venv.bin("python"))
            .arg("-c")
            .arg(PLOT)
            .arg(&data)
            .arg(png)
            .arg(self.heading())
            .status()
            .context("run matplotlib")?;
        if !status.success() {
            bail!("plotting the CDF failed ({status})");
        }
        Ok(())
    }
}

const PLOT: &str = r#"
import json, math, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
data = json.load(open(sys.argv[1]))
titles = {"a-c1": "tools/call, kept alive, 1 client", "a-c64": "tools/call, kept alive, 64 clients"}
fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
ticks = [0, 0.9, 0.99, 0.999, 0.9999]
for ax, key in zip(axes, ["a-c1", "a-c64"]):
    for via, pts in data.get(key, {}).items():
        xs = [p[0] / 1000.0 for p in pts]
        ys = [-math.log10(max(1 - p[1], 1e-6)) for p in pts]
        ax.plot(xs, ys, label=via)
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms)")
    ax.set_yticks([-math.log10(max(1 - t, 1e-6)) for t in ticks])
    ax.set_yticklabels(["0", "90%", "99%", "99.9%", "99.99%"])
    ax.set_ylabel("percentile")
    ax.set_title(titles[key])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
fig.suptitle(sys.argv[3], fontsize=8)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
"#;
