//! The live decision stream for the SOC: `kya events [--follow]`.
//!
//! Every recorded decision is published here after the audit log accepted it.
//! Followers get a bounded broadcast: a consumer too slow to keep up loses
//! events (counted, and told), and never slows a decision down. The audit log
//! is the record that never drops; this is the live view. The last
//! [`RECENT`] events are kept for `kya events` without `--follow` and `--since`.

use crate::audit::DecisionEvent;
use crate::control::protocol::{Caller, ErrorCode, Request, Response};
use crate::control::server::{Handler, Reply, ReplyFuture};
use serde::Deserialize;
use serde_json::Value;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use time::OffsetDateTime;
use tokio::sync::{broadcast, mpsc};

/// Events kept for listing.
pub const RECENT: usize = 1024;
/// Events a follower may lag behind before it loses some.
pub const FOLLOW_BUFFER: usize = 4096;

/// The hub every decision is published to.
pub struct EventHub {
    tx: broadcast::Sender<Arc<DecisionEvent>>,
    recent: Mutex<VecDeque<Arc<DecisionEvent>>>,
    dropped: AtomicU64,
    published: AtomicU64,
}

impl Default for EventHub {
    fn default() -> Self {
        let (tx, _) = broadcast::channel(FOLLOW_BUFFER);
        Self {
            tx,
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
            dropped: AtomicU64::new(0),
            published: AtomicU64::new(0),
        }
    }
}

impl EventHub {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Publish one decision (never blocks).
    pub fn publish(&self, event: DecisionEvent) {
        let event = Arc::new(event);
        {
            let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(event.clone());
        }
        self.published.fetch_add(1, Ordering::Relaxed);
        // No follower is not an error.
        let _ = self.tx.send(event);
    }

    /// A follower of every event published from now on (bounded: a slow
    /// follower loses events and learns how many).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<DecisionEvent>> {
        self.tx.subscribe()
    }

    /// Events lost by slow followers so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Events published so far.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    fn recent(&self) -> Vec<Arc<DecisionEvent>> {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

/// Which events a client wants.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    pub pid: Option<u32>,
    pub agent: Option<String>,
    pub verdict: Option<String>,
    /// RFC 3339: only events at or after this time.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub since: Option<OffsetDateTime>,
}

impl Filter {
    pub fn matches(&self, e: &DecisionEvent) -> bool {
        self.pid.is_none_or(|p| e.process.pid == p)
            && self.agent.as_ref().is_none_or(|a| &e.agent.name == a)
            && self
                .verdict
                .as_ref()
                .is_none_or(|v| e.verdict.as_str() == v || e.kind.as_str() == v)
            && self.since.is_none_or(|t| e.time >= t)
    }
}

/// Serves `events.list` and `events.follow`.
pub struct EventsHandler {
    hub: Arc<EventHub>,
}

impl EventsHandler {
    pub fn new(hub: Arc<EventHub>) -> Self {
        Self { hub }
    }
}

fn to_json(e: &DecisionEvent) -> Value {
    serde_json::to_value(e).unwrap_or(Value::Null)
}

impl Handler for EventsHandler {
    fn read_only(&self, _op: &str) -> bool {
        true
    }

    fn handle(&self, _caller: Caller, request: Request) -> ReplyFuture {
        let filter: Filter = if request.args.is_null() {
            Filter::default()
        } else {
            match serde_json::from_value(request.args.clone()) {
                Ok(f) => f,
                Err(e) => {
                    let resp = Response::error(ErrorCode::BadRequest, format!("bad filter: {e}"));
                    return Box::pin(async move { Reply::Once(resp) });
                }
            }
        };
        let hub = self.hub.clone();
        match request.op.as_str() {
            "events.list" => {
                let items: Vec<Value> = hub
                    .recent()
                    .iter()
                    .filter(|e| filter.matches(e))
                    .map(|e| to_json(e))
                    .collect();
                Box::pin(async move { Reply::Once(Response::ok(Value::Array(items))) })
            }
            "events.follow" => {
                // Subscribe before replaying the backlog, so nothing falls between.
                let mut rx = hub.tx.subscribe();
                let backlog: Vec<Arc<DecisionEvent>> = match filter.since {
                    Some(_) => hub.recent(),
                    None => Vec::new(),
                };
                let (tx, out) = mpsc::channel(256);
                tokio::spawn(async move {
                    for e in backlog.iter().filter(|e| filter.matches(e)) {
                        if tx.send(to_json(e)).await.is_err() {
                            return;
                        }
                    }
                    loop {
                        match rx.recv().await {
                            Ok(e) if filter.matches(&e) => {
                                if tx.send(to_json(&e)).await.is_err() {
                                    return;
                                }
                            }
                            Ok(_) => {}
                            Err(broadcast::error::RecvError::Lagged(n)) => {
                                hub.dropped.fetch_add(n, Ordering::Relaxed);
                                let note = serde_json::json!({"kya_dropped": n});
                                if tx.send(note).await.is_err() {
                                    return;
                                }
                            }
                            Err(broadcast::error::RecvError::Closed) => return,
                        }
                    }
                });
                Box::pin(async move { Reply::Stream(out) })
            }
            other => {
                let resp =
                    Response::error(ErrorCode::UnknownOp, format!("unknown operation {other:?}"));
                Box::pin(async move { Reply::Once(resp) })
            }
        }
    }
}

/// The CLI half: `kya events`.
pub mod command {
    use crate::control::client::Client;
    use crate::control::protocol::Request;
    use serde_json::{json, Value};
    use std::io::Write;
    use std::path::Path;
    use std::process::ExitCode;

    /// Arguments of `kya events`.
    pub struct EventsQuery<'a> {
        pub follow: bool,
        pub json: bool,
        pub pid: Option<u32>,
        pub agent: Option<&'a str>,
        pub verdict: Option<&'a str>,
        pub since: Option<&'a str>,
    }

    pub fn run(state_dir: &Path, q: EventsQuery<'_>) -> anyhow::Result<ExitCode> {
        let args = json!({"pid": q.pid, "agent": q.agent, "verdict": q.verdict, "since": q.since});
        let mut client = Client::connect(state_dir)?;
        let stdout = std::io::stdout();
        let print = |v: &Value| -> bool {
            let line = if q.json { v.to_string() } else { compact(v) };
            writeln!(stdout.lock(), "{line}").is_ok()
        };
        if q.follow {
            client.stream(&Request::new("events.follow", args), |v| print(&v))?;
        } else {
            let items = client.call(&Request::new("events.list", args))?;
            for v in items.as_array().into_iter().flatten() {
                if !print(v) {
                    break;
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    }

    /// One line per decision, like `tetra getevents -o compact`.
    pub fn compact(v: &Value) -> String {
        if let Some(n) = v.get("kya_dropped") {
            return format!("!! {n} events dropped (consumer too slow)");
        }
        let s = |p: &str| {
            v.pointer(p)
                .and_then(Value::as_str)
                .unwrap_or("-")
                .to_string()
        };
        format!(
            "{} {:<6} {:<8} pid={} exe={} agent={} {} {} tool={} rule={} {}",
            s("/time"),
            s("/verdict"),
            s("/kind"),
            v.pointer("/process/pid")
                .map(Value::to_string)
                .unwrap_or_default(),
            s("/process/exe"),
            s("/agent/name"),
            s("/destination/host"),
            s("/mcp/method"),
            s("/mcp/tool"),
            s("/rule"),
            json!(s("/reason")),
        )
    }
}
