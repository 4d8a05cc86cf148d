//! The agent kill switch: `kya agents list|suspend|resume`.
//!
//! Suspending an agent denies its next call (the decision path checks the set
//! before the policy) and ends every call of it that is currently held. The
//! set is persisted in `STATE_DIR/suspended.json` (atomically), so a restart
//! keeps an agent suspended. Root or the agent's owner may suspend or resume it.

use crate::approvals::Approvals;
use crate::control::guard::Unselected;
use crate::control::protocol::{Caller, ErrorCode, Request, Response};
use crate::control::server::{Handler, Reply, ReplyFuture};
use crate::host::user_name;
use crate::policy::PolicyEngine;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// File name inside the state directory.
pub const FILE: &str = "suspended.json";

/// Errors of the suspension set.
#[derive(Debug, thiserror::Error)]
pub enum SuspendError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a suspension list: {message}")]
    Format { path: PathBuf, message: String },
}

/// Suspended agents: name → who suspended it and why.
pub struct Suspensions {
    path: PathBuf,
    set: RwLock<BTreeMap<String, Value>>,
}

impl Suspensions {
    /// Load the persisted set (missing file: nobody is suspended).
    pub fn open(state_dir: &Path) -> Result<Self, SuspendError> {
        let path = state_dir.join(FILE);
        let set = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| SuspendError::Format {
                path: path.clone(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(SuspendError::Io { path, source }),
        };
        Ok(Self {
            path,
            set: RwLock::new(set),
        })
    }

    /// Why `agent` is suspended, if it is.
    pub fn get(&self, agent: &str) -> Option<Value> {
        self.set
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(agent)
            .cloned()
    }

    fn update(&self, f: impl FnOnce(&mut BTreeMap<String, Value>)) -> Result<(), SuspendError> {
        let mut set = self.set.write().unwrap_or_else(|e| e.into_inner());
        let mut next = set.clone();
        f(&mut next);
        self.save(&next)?;
        *set = next;
        Ok(())
    }

    fn save(&self, set: &BTreeMap<String, Value>) -> Result<(), SuspendError> {
        let io = |source| SuspendError::Io {
            path: self.path.clone(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(set).map_err(|e| io(std::io::Error::other(e)))?;
        crate::fsutil::write_atomic(&self.path, &bytes).map_err(io)
    }
}

/// Serves `agents.list`, `agents.suspend`, `agents.resume`.
pub struct AgentsHandler {
    engine: Arc<PolicyEngine>,
    suspensions: Arc<Suspensions>,
    approvals: Arc<Approvals>,
}

impl AgentsHandler {
    pub fn new(
        engine: Arc<PolicyEngine>,
        suspensions: Arc<Suspensions>,
        approvals: Arc<Approvals>,
    ) -> Self {
        Self {
            engine,
            suspensions,
            approvals,
        }
    }

    fn list(&self) -> Response {
        let now = time::OffsetDateTime::now_utc();
        let registry = self.engine.registry();
        let agents: Vec<Value> = registry
            .agents()
            .iter()
            .map(|a| {
                let info = registry.by_name(&a.name, now);
                json!({
                    "name": a.name,
                    "owner": a.owner,
                    "orphaned": info.map(|i| i.orphaned).unwrap_or(false),
                    "suspended": self.suspensions.get(&a.name),
                    "origin": a.origin,
                })
            })
            .collect();
        Response::ok(Value::Array(agents))
    }

    fn set(
        &self,
        caller: Caller,
        _cleared: Unselected,
        request: &Request,
        suspend: bool,
    ) -> Response {
        let Some(name) = request.args.get("name").and_then(Value::as_str) else {
            return Response::error(ErrorCode::BadRequest, "missing agent name");
        };
        let registry = self.engine.registry();
        let Some(agent) = registry.agents().iter().find(|a| a.name == name) else {
            return Response::error(ErrorCode::NotFound, format!("no registered agent {name:?}"));
        };
        let user = user_name(caller.uid).unwrap_or_else(|| format!("uid {}", caller.uid));
        if caller.uid != 0 && agent.owner.as_deref() != Some(user.as_str()) {
            return Response::error(
                ErrorCode::Forbidden,
                format!("{user} may not change {name}: only root or its owner may"),
            );
        }
        let result = if suspend {
            let record = json!({"by": user, "at": crate::approvals::pending::rfc3339(time::OffsetDateTime::now_utc())});
            self.suspensions.update(|s| {
                s.insert(name.to_string(), record);
            })
        } else {
            self.suspensions.update(|s| {
                s.remove(name);
            })
        };
        if let Err(e) = result {
            return Response::error(ErrorCode::Internal, e.to_string());
        }
        let ended = if suspend {
            self.approvals
                .cancel_agent(name, &format!("agent {name} was suspended by {user}"))
        } else {
            0
        };
        tracing::warn!(agent = name, by = %user, suspend, held_calls_ended = ended, "agent kill switch");
        Response::ok(json!({"name": name, "suspended": suspend, "held_calls_ended": ended}))
    }
}

impl Handler for AgentsHandler {
    fn read_only(&self, op: &str) -> bool {
        op == "agents.list"
    }

    fn handle(&self, caller: Caller, request: Request) -> ReplyFuture {
        let resp = match request.op.as_str() {
            "agents.list" => self.list(),
            op @ ("agents.suspend" | "agents.resume") => match caller.cleared() {
                Ok(cleared) => self.set(caller, cleared, &request, op == "agents.suspend"),
                Err(refused) => refused,
            },
            other => Response::error(ErrorCode::UnknownOp, format!("unknown operation {other:?}")),
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
    use std::process::ExitCode;

    pub fn list(state_dir: &Path, as_json: bool) -> anyhow::Result<ExitCode> {
        let agents = client::call(state_dir, &Request::new("agents.list", Value::Null))?;
        if as_json {
            println!("{}", serde_json::to_string_pretty(&agents)?);
            return Ok(ExitCode::SUCCESS);
        }
        for a in agents.as_array().into_iter().flatten() {
            let state = if !a["suspended"].is_null() {
                format!(
                    "SUSPENDED by {}",
                    a["suspended"]["by"].as_str().unwrap_or("?")
                )
            } else if a["orphaned"] == true {
                "orphaned".to_string()
            } else {
                "active".to_string()
            };
            println!(
                "{:<24} owner={:<12} {}",
                a["name"].as_str().unwrap_or(""),
                a["owner"].as_str().unwrap_or("-"),
                state
            );
        }
        Ok(ExitCode::SUCCESS)
    }

    pub fn set(state_dir: &Path, name: &str, suspend: bool) -> anyhow::Result<ExitCode> {
        let op = if suspend {
            "agents.suspend"
        } else {
            "agents.resume"
        };
        let r = client::call(state_dir, &Request::new(op, json!({"name": name})))?;
        if suspend {
            println!(
                "{name} suspended; {} held call(s) ended",
                r["held_calls_ended"]
            );
        } else {
            println!("{name} resumed");
        }
        Ok(ExitCode::SUCCESS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suspensions_persist_and_hostile_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let s = Suspensions::open(dir.path()).unwrap();
        assert!(s.get("bot").is_none());
        s.update(|m| {
            m.insert("bot".into(), json!({"by": "root"}));
        })
        .unwrap();
        let again = Suspensions::open(dir.path()).unwrap();
        assert_eq!(again.get("bot").unwrap()["by"], "root");
        again
            .update(|m| {
                m.remove("bot");
            })
            .unwrap();
        assert!(Suspensions::open(dir.path()).unwrap().get("bot").is_none());
        for bad in [&b"["[..], b"[1]", b"\xff"] {
            std::fs::write(dir.path().join(FILE), bad).unwrap();
            assert!(matches!(
                Suspensions::open(dir.path()),
                Err(SuspendError::Format { .. })
            ));
        }
    }
}
