//! `kya status`: what a running daemon is doing, served over the control socket.
//!
//! The daemon registers a [`StatusHandler`] built from shared handles of its
//! components; the CLI half ([`command`]) asks for it and prints it.

use crate::bpf::Redirector;
use crate::config::Config;
use crate::control::protocol::{Caller, ErrorCode, Request, Response};
use crate::control::server::{Handler, Reply, ReplyFuture};
use crate::intercept::listener::InterceptStats;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

/// Computes one section of the status document at request time.
pub type SectionFn = Arc<dyn Fn() -> Value + Send + Sync>;

/// Answers `status`.
pub struct StatusHandler {
    config: Config,
    started: Instant,
    started_at: SystemTime,
    redirector: Arc<Mutex<Option<Redirector>>>,
    intercept: Arc<InterceptStats>,
    /// Extra sections other components contribute (policy, approvals, audit).
    sections: Vec<(&'static str, SectionFn)>,
}

impl StatusHandler {
    pub fn new(
        config: Config,
        redirector: Arc<Mutex<Option<Redirector>>>,
        intercept: Arc<InterceptStats>,
    ) -> Self {
        Self {
            config,
            started: Instant::now(),
            started_at: SystemTime::now(),
            redirector,
            intercept,
            sections: Vec::new(),
        }
    }

    /// Add a named section computed at each request.
    pub fn section(mut self, name: &'static str, f: SectionFn) -> Self {
        self.sections.push((name, f));
        self
    }

    /// The status document.
    pub fn snapshot(&self) -> Value {
        let (kernel, live, support) = match self.redirector.lock() {
            Ok(guard) => match guard.as_ref() {
                Some(r) => (
                    match r.stats() {
                        Ok(s) => json!(s),
                        Err(e) => json!({ "error": e.to_string() }),
                    },
                    match r.selector_counts() {
                        Ok(c) => json!(c),
                        Err(e) => json!({ "error": e.to_string() }),
                    },
                    Some(r.kernel_support().clone()),
                ),
                None => (
                    json!({ "error": "redirect detached" }),
                    json!({ "error": "redirect detached" }),
                    None,
                ),
            },
            Err(_) => (
                json!({ "error": "redirect state unavailable" }),
                json!({ "error": "redirect state unavailable" }),
                None,
            ),
        };
        // The kernel version and the features kya uses on it.
        let host_kernel = match support {
            Some(s) => json!({ "release": s.release, "features": s.features }),
            None => json!({ "release": crate::bpf::kernel_release(), "features": [] }),
        };
        let c = &self.config;
        let pins_present = c.pin_dir.is_dir();
        let started = time::OffsetDateTime::from(self.started_at)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let mut doc = json!({
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "started": started,
            "uptime_seconds": self.started.elapsed().as_secs(),
            "listen_port": c.listen_port,
            // "all_tcp_ports": every TCP connection of a selected process is
            // redirected (guarded_ports then only names where UDP is refused);
            // "listed_ports": only connections to guarded_ports are.
            "redirect_mode": if c.all_ports { "all_tcp_ports" } else { "listed_ports" },
            "guarded_ports": c.ports,
            "splice_ports": c.splice_ports,
            "fail_open": c.fail_open,
            "pin_dir": c.pin_dir,
            "pins_present": pins_present,
            "state_dir": c.state_dir,
            "selection": {
                "cgroups": c.selection.cgroups,
                "containers": c.selection.containers,
                "cgroup_globs": c.selection.cgroup_globs,
                "images": c.selection.images,
                "uids": c.selection.uids,
                "exes": c.selection.exes,
                "pids": c.selection.pids,
            },
            // live processes each selector holds (matched it, or descend
            // from one that did), from the kernel's sticky set
            "selection_live": live,
            "kernel": kernel,
            "host_kernel": host_kernel,
            "interceptor": {
                "accepted": self.intercept.accepted.load(Ordering::Relaxed),
                "unknown_refused": self.intercept.unknown.load(Ordering::Relaxed),
                "upstream_failed": self.intercept.upstream_failed.load(Ordering::Relaxed),
                "spliced": self.intercept.spliced.load(Ordering::Relaxed),
                "open": self.intercept.open.load(Ordering::Relaxed),
                "refused_total_limit": self.intercept.refused_total_limit.load(Ordering::Relaxed),
                "refused_process_limit": self.intercept.refused_process_limit.load(Ordering::Relaxed),
                "refused_unrecorded": self.intercept.refused_unrecorded.load(Ordering::Relaxed),
            },
        });
        for (name, f) in &self.sections {
            doc[*name] = f();
        }
        doc
    }
}

impl Handler for StatusHandler {
    fn read_only(&self, _op: &str) -> bool {
        true
    }

    fn handle(&self, _caller: Caller, request: Request) -> ReplyFuture {
        let resp = if request.op == "status" {
            Response::ok(self.snapshot())
        } else {
            Response::error(
                ErrorCode::UnknownOp,
                format!("unknown operation {:?}", request.op),
            )
        };
        Box::pin(async move { Reply::Once(resp) })
    }
}

/// The CLI half.
pub mod command {
    use crate::control::client;
    use crate::control::protocol::Request;
    use serde_json::{json, Value};
    use std::path::Path;

    /// `kya status [--json]`.
    pub fn run(state_dir: &Path, as_json: bool) -> anyhow::Result<std::process::ExitCode> {
        let status = client::call(state_dir, &Request::new("status", Value::Null))?;
        if as_json {
            println!("{}", serde_json::to_string_pretty(&status)?);
        } else {
            print!("{}", render(&status));
        }
        Ok(std::process::ExitCode::SUCCESS)
    }

    /// Human-readable rendering: one `key: value` line per fact.
    pub fn render(s: &Value) -> String {
        let mut out = String::new();
        let line = |out: &mut String, k: &str, v: &Value| {
            let text = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            out.push_str(&format!("{k:<18} {text}\n"));
        };
        for key in [
            "version",
            "pid",
            "started",
            "listen_port",
            "redirect_mode",
            "guarded_ports",
            "splice_ports",
            "fail_open",
            "pin_dir",
            "pins_present",
        ] {
            line(&mut out, key, &s[key]);
        }
        if let Some(sel) = s["selection"].as_object() {
            for (k, v) in sel {
                line(&mut out, &format!("select.{k}"), v);
            }
        }
        for c in s["selection_live"].as_array().into_iter().flatten() {
            let kind = c["kind"].as_str().unwrap_or("?");
            let sel = c["selector"].as_str().unwrap_or("?");
            line(
                &mut out,
                &format!("live.{kind} {sel}"),
                &json!(format!("{} processes", c["processes"])),
            );
        }
        if let Some(hk) = s["host_kernel"].as_object() {
            line(&mut out, "kernel.release", &hk["release"]);
            let features: Vec<&str> = hk["features"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            line(
                &mut out,
                "kernel.features",
                &Value::from(features.join(", ")),
            );
        }
        for n in s["namespaces"].as_array().into_iter().flatten() {
            let mut text = format!(
                "{} ({} processes, pid {}, listeners {}, since {})",
                n["state"].as_str().unwrap_or("?"),
                n["processes"],
                n["example_pid"],
                n["listeners"],
                n["since"].as_str().unwrap_or("?"),
            );
            if let Some(id) = n["container"]["id"].as_str() {
                let runtime = n["container"]["runtime"].as_str().unwrap_or("?");
                text.push_str(&format!(
                    ", {runtime} container {}",
                    id.get(..12).unwrap_or(id)
                ));
            }
            if let Some(e) = n["error"].as_str() {
                text.push_str(&format!(": {e}"));
            }
            line(
                &mut out,
                &format!("netns net:[{}]", n["inode"]),
                &Value::from(text),
            );
        }
        for c in s["images"]["containers"].as_array().into_iter().flatten() {
            let id = c["container"].as_str().unwrap_or("?");
            let refs: Vec<&str> = c["refs"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let text = format!(
                "{} (image {}, matches {}) in {}",
                c["image"].as_str().unwrap_or("-"),
                c["image_id"]
                    .as_str()
                    .map_or("?", |i| i.get(..12).unwrap_or(i)),
                refs.join(", "),
                c["cgroup"].as_str().unwrap_or("?"),
            );
            line(
                &mut out,
                &format!("image container {}", id.get(..12).unwrap_or(id)),
                &Value::from(text),
            );
        }
        for b in s["broker"].as_array().into_iter().flatten() {
            line(
                &mut out,
                &format!("broker {}", b["server"].as_str().unwrap_or("?")),
                &b["source"],
            );
        }
        for section in ["kernel", "interceptor"] {
            if let Some(obj) = s[section].as_object() {
                for (k, v) in obj {
                    line(&mut out, &format!("{section}.{k}"), v);
                }
            }
        }
        if let Some(obj) = s.as_object() {
            for (k, v) in obj {
                if v.is_object()
                    && ![
                        "selection",
                        "kernel",
                        "host_kernel",
                        "interceptor",
                        "images",
                    ]
                    .contains(&k.as_str())
                {
                    line(&mut out, k, v);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn namespaces_are_rendered_one_line_each() {
        let s = json!({
            "namespaces": [
                {"inode": 4026532305u64, "cookie": 4725, "state": "ready", "processes": 2,
                 "example_pid": 42, "listeners": ["127.0.0.1:1021"], "since": "2026-12-07T00:00:00Z",
                 "container": {"id": "3f4e8a1b2c3d4e5f60718293a4b5c6d7e8f90123456789abcdef0123456789ab", "runtime": "docker"}},
                {"inode": 4026532306u64, "cookie": 0, "state": "failed", "processes": 1,
                 "example_pid": 43, "listeners": [], "since": "2026-12-07T00:00:01Z",
                 "error": "cannot listen on 127.0.0.1:1021: Cannot assign requested address"}
            ]
        });
        let out = super::command::render(&s);
        let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("netns ")).collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert!(
            lines[0].contains("net:[4026532305]") && lines[0].contains("ready"),
            "{out}"
        );
        assert!(lines[0].contains("docker container 3f4e8a1b2c3d"), "{out}");
        assert!(
            lines[1].contains("failed") && lines[1].contains("Cannot assign"),
            "{out}"
        );
    }

    #[test]
    fn image_matches_are_rendered_one_line_each() {
        let s = json!({
            "selection": {"images": ["agent"]},
            "images": {"selectors": ["agent"], "containers": [
                {"container": "a6d0922ee25759935500b1ac114c202d5e4ed54072824888b41044039ff794b4",
                 "cgroup": "/libpod_parent/libpod-a6d0922ee257", "image": "localhost/agent:1.2",
                 "image_id": "dec98d5f5d7686bb20a235ee4b98429239e2b492231e028f5fb453a7a2362229",
                 "refs": ["agent"]}
            ]}
        });
        let out = super::command::render(&s);
        assert!(out.contains("select.images"), "{out}");
        let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("image ")).collect();
        assert_eq!(lines.len(), 1, "{out}");
        assert!(
            lines[0].contains("a6d0922ee257")
                && lines[0].contains("localhost/agent:1.2")
                && lines[0].contains("dec98d5f5d76")
                && lines[0].contains("matches agent"),
            "{out}"
        );
    }
}
