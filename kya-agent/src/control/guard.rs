//! The gate every state-changing control operation passes: an agent never
//! answers for its human.
//!
//! Agents usually run as their owner's uid, so the `SO_PEERCRED` uid of a
//! control connection says nothing about whether a human or the agent itself
//! is asking. Before a state-changing operation (answering an approval,
//! issuing or revoking a credential, suspending or resuming an agent) reaches
//! its handler, the [`Gate`] takes the peer's pid (from `SO_PEERCRED`, the
//! kernel's word) and asks kya's selection about it and about every one of
//! its ancestors (the `ppid` chain in `/proc`). A selected process, or a
//! descendant of one, is refused, and the attempt is recorded in the audit
//! log. A peer whose pid is unknown, or whose process or ancestry cannot be
//! read, is refused too: in doubt, nothing changes.
//!
//! Handlers cannot skip the gate: the server admits every operation a
//! handler does not declare read-only only through [`Gate::admit`], and the
//! handler methods that change state take the [`Unselected`] proof it hands
//! out, which nothing else can make.

use super::protocol::{Caller, ErrorCode, Request, Response};
use crate::audit::event::{
    AgentInfo, ApprovalInfo, DecisionEvent, Destination, EventKind, McpInfo, ProcessInfo,
};
use kya_common::Verdict;
use serde_json::Value;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

/// Bound on the ancestry walk (a racing `/proc` can show anything; a real
/// process tree is far shallower).
pub(crate) const MAX_ANCESTRY: usize = 128;

/// The rule name recorded for a refused control operation.
pub(crate) const REFUSED_RULE: &str = "kya:selected-caller";

/// Why the selection could not be asked about a process.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct SelectionUnknown(pub String);

/// Kya's selection, asked about one running process (not its ancestors: the
/// gate walks those). The daemon answers from its BPF maps.
pub(crate) trait SelectionOracle: Send + Sync {
    /// Is the process `tgid` selected right now? An error when it cannot
    /// tell (the process is gone, `/proc` unreadable, the maps failed).
    fn is_selected(&self, tgid: u32) -> Result<bool, SelectionUnknown>;
}

/// Proof that the caller of this request was checked and is neither
/// selected nor a descendant of a selected process. Only the gate makes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Unselected {
    _sealed: (),
}

impl Unselected {
    /// A proof for unit tests of handlers (the gate has its own tests).
    #[cfg(test)]
    pub(crate) fn for_tests() -> Self {
        Unselected { _sealed: () }
    }
}

/// Why the gate refused a caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The caller (`selected == peer`) or its ancestor `selected` is selected.
    Selected { peer: u32, selected: u32 },
    /// The caller could not be checked.
    Unresolvable { peer: Option<i32>, why: String },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const HOW: &str = "an agent may not answer for its human: run this from a session \
                           outside kya's selection, or answer through CIBA";
        match self {
            Refusal::Selected { peer, selected } if peer == selected => write!(
                f,
                "refused: the calling process (pid {peer}) is selected by kya as an agent; {HOW}"
            ),
            Refusal::Selected { peer, selected } => write!(
                f,
                "refused: the calling process (pid {peer}) descends from pid {selected}, which \
                 kya selects as an agent; {HOW}"
            ),
            Refusal::Unresolvable { peer, why } => {
                let who = peer.map_or("unknown".to_string(), |p| p.to_string());
                write!(
                    f,
                    "refused: kya could not check that the calling process (pid {who}) is \
                     outside its selection ({why}); state-changing commands are refused in doubt"
                )
            }
        }
    }
}

/// Where refusals are recorded (the audit log and the live event stream).
pub(crate) type Recorder =
    Arc<dyn Fn(DecisionEvent) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// The gate. See the module docs.
pub(crate) struct Gate {
    oracle: Arc<dyn SelectionOracle>,
    proc_root: PathBuf,
    recorder: Option<Recorder>,
    host: String,
    socket: String,
}

impl Gate {
    /// A gate asking `oracle`, reading `/proc`, recording nothing.
    pub(crate) fn new(oracle: Arc<dyn SelectionOracle>) -> Self {
        Self {
            oracle,
            proc_root: PathBuf::from("/proc"),
            recorder: None,
            host: crate::host::host_name(),
            socket: super::SOCKET_NAME.to_string(),
        }
    }

    /// Record refusals with `recorder`, naming the control socket `socket`.
    pub(crate) fn with_recorder(mut self, recorder: Recorder, socket: &Path) -> Self {
        self.recorder = Some(recorder);
        self.socket = socket.display().to_string();
        self
    }

    /// Read processes under another proc root (tests).
    #[cfg(test)]
    pub(crate) fn with_proc_root(mut self, root: impl Into<PathBuf>) -> Self {
        self.proc_root = root.into();
        self
    }

    /// Check the process `pid` and its ancestors (blocking: reads `/proc`).
    pub(crate) fn check(&self, pid: Option<i32>) -> Result<Unselected, Refusal> {
        let unresolvable = |why: String| Refusal::Unresolvable { peer: pid, why };
        let peer = match pid {
            Some(p) if p > 0 => p as u32,
            _ => return Err(unresolvable("the kernel reported no pid".into())),
        };
        let mut cur = peer;
        for _ in 0..MAX_ANCESTRY {
            match self.oracle.is_selected(cur) {
                Ok(true) => {
                    return Err(Refusal::Selected {
                        peer,
                        selected: cur,
                    })
                }
                Ok(false) => {}
                Err(e) => return Err(unresolvable(format!("pid {cur}: {e}"))),
            }
            let stat = self.proc_root.join(cur.to_string()).join("stat");
            let ppid = std::fs::read(&stat)
                .map_err(|e| unresolvable(format!("{}: {e}", stat.display())))?;
            let ppid = crate::procinfo::parse_stat_ppid(&ppid)
                .ok_or_else(|| unresolvable(format!("{}: no parent pid", stat.display())))?;
            if ppid == 0 {
                return Ok(Unselected { _sealed: () });
            }
            if ppid == cur {
                return Err(unresolvable(format!("pid {cur} is its own parent")));
            }
            cur = ppid;
        }
        Err(unresolvable(format!(
            "ancestry deeper than {MAX_ANCESTRY} processes"
        )))
    }

    /// Admit `request` from `caller`: the caller with its [`Unselected`]
    /// proof, or the refusal to send (recorded before it is returned).
    /// `pidfd` pins the peer process: it must still be alive after the walk,
    /// or the pid the walk started from may have named another process. The
    /// `/proc` walk runs on the blocking pool.
    pub(crate) async fn admit(
        self: &Arc<Self>,
        caller: Caller,
        pidfd: Option<Arc<OwnedFd>>,
        request: &Request,
    ) -> Result<Caller, Response> {
        let gate = self.clone();
        let checked = tokio::task::spawn_blocking(move || {
            let verdict = gate.check(caller.pid).and_then(|proof| match pidfd {
                Some(fd) if super::peer::is_alive(&fd) => Ok(proof),
                Some(_) => Err(Refusal::Unresolvable {
                    peer: caller.pid,
                    why: "the calling process has exited; its pid may name another process now"
                        .into(),
                }),
                None => Err(Refusal::Unresolvable {
                    peer: caller.pid,
                    why: "no pidfd for the calling process".into(),
                }),
            });
            let facts = match (&verdict, caller.pid) {
                (Err(_), Some(pid)) if pid > 0 => {
                    Some(crate::procinfo::read_at(&gate.proc_root, pid as u32))
                }
                _ => None,
            };
            (verdict, facts)
        })
        .await;
        let (verdict, facts) = match checked {
            Ok(v) => v,
            Err(e) => (
                Err(Refusal::Unresolvable {
                    peer: caller.pid,
                    why: format!("the check failed: {e}"),
                }),
                None,
            ),
        };
        match verdict {
            Ok(proof) => Ok(Caller {
                clearance: Some(proof),
                ..caller
            }),
            Err(refusal) => {
                tracing::warn!(op = %request.op, uid = caller.uid, pid = ?caller.pid, %refusal, "control operation refused");
                if let Some(record) = &self.recorder {
                    let event =
                        self.refusal_event(caller, request, &refusal, facts.unwrap_or_default());
                    record(event).await;
                }
                Err(Response::error(ErrorCode::Forbidden, refusal.to_string()))
            }
        }
    }

    /// The audit record of a refused operation.
    fn refusal_event(
        &self,
        caller: Caller,
        request: &Request,
        refusal: &Refusal,
        facts: crate::procinfo::ProcFacts,
    ) -> DecisionEvent {
        use rand::Rng;
        let pid = caller.pid.and_then(|p| u32::try_from(p).ok()).unwrap_or(0);
        let process = ProcessInfo {
            pid,
            tgid: pid,
            uid: caller.uid,
            gid: caller.gid,
            exe: facts.exe,
            comm: facts.comm,
            cmdline: facts.cmdline,
            ppid: facts.ppid,
            cgroup: facts.cgroup,
            ..Default::default()
        };
        let mut mcp = McpInfo {
            method: request.op.clone(),
            ..Default::default()
        };
        // The arguments name what was attempted (an approval or credential
        // id, an agent); they are small and hold no secrets. A huge request
        // is recorded by digest only.
        let small = crate::audit::event::canonical_json(&request.args).len() <= MAX_RECORDED_ARGS;
        mcp.set_args(&request.args, small, &[]);
        let approval = request
            .op
            .starts_with("approvals.")
            .then(|| request.args.get("id").and_then(Value::as_str))
            .flatten()
            .filter(|id| id.len() <= 128)
            .map(|id| ApprovalInfo {
                id: id.to_string(),
                approver: crate::host::user_name(caller.uid),
                channel: Some("local".into()),
                id_token_sha256: None,
            });
        DecisionEvent {
            decision_id: format!("ctl_{:016x}", rand::thread_rng().gen::<u64>()),
            kind: EventKind::ControlRefused,
            time: time::OffsetDateTime::now_utc(),
            host: self.host.clone(),
            process,
            agent: AgentInfo::default(),
            destination: Destination {
                host: self.socket.clone(),
                ..Default::default()
            },
            mcp,
            verdict: Verdict::Deny,
            rule: Some(REFUSED_RULE.into()),
            reason: refusal.to_string(),
            policy_version: String::new(),
            approval,
            credential_id: None,
            hold_id: None,
            latency_us: 0,
        }
    }
}

/// Largest canonical argument object recorded in full with a refusal.
const MAX_RECORDED_ARGS: usize = 4096;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::sync::Mutex;

    /// Selected by tgid only; pids in `broken` cannot be read.
    struct Fake {
        selected: BTreeSet<u32>,
        broken: BTreeSet<u32>,
    }

    impl SelectionOracle for Fake {
        fn is_selected(&self, tgid: u32) -> Result<bool, SelectionUnknown> {
            if self.broken.contains(&tgid) {
                return Err(SelectionUnknown(format!("/proc/{tgid}: gone")));
            }
            Ok(self.selected.contains(&tgid))
        }
    }

    /// A fake /proc: pid -> ppid.
    fn proc_tree(tree: &[(u32, u32)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (pid, ppid) in tree {
            let dir = d.path().join(pid.to_string());
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("stat"), format!("{pid} (a b) c) S {ppid} 1 1 0")).unwrap();
        }
        d
    }

    fn gate(root: &Path, selected: &[u32], broken: &[u32]) -> Gate {
        Gate::new(Arc::new(Fake {
            selected: selected.iter().copied().collect(),
            broken: broken.iter().copied().collect(),
        }))
        .with_proc_root(root)
    }

    // init(1) -> shell(10) -> agent(20) -> tool(30) -> kya(40); human(50) under init.
    const TREE: [(u32, u32); 6] = [(1, 0), (10, 1), (20, 10), (30, 20), (40, 30), (50, 1)];

    #[test]
    fn unselected_callers_are_admitted() {
        let root = proc_tree(&TREE);
        let g = gate(root.path(), &[20], &[]);
        assert!(g.check(Some(50)).is_ok());
        assert!(
            g.check(Some(10)).is_ok(),
            "the agent's parent is not its child"
        );
    }

    #[test]
    fn a_selected_caller_is_refused() {
        let root = proc_tree(&TREE);
        let g = gate(root.path(), &[20], &[]);
        let r = g.check(Some(20)).unwrap_err();
        assert_eq!(
            r,
            Refusal::Selected {
                peer: 20,
                selected: 20
            }
        );
        assert!(
            r.to_string().contains("is selected by kya as an agent"),
            "{r}"
        );
    }

    #[test]
    fn a_descendant_of_a_selected_process_is_refused() {
        let root = proc_tree(&TREE);
        let g = gate(root.path(), &[20], &[]);
        let r = g.check(Some(40)).unwrap_err();
        assert_eq!(
            r,
            Refusal::Selected {
                peer: 40,
                selected: 20
            }
        );
        assert!(r.to_string().contains("descends from pid 20"), "{r}");
    }

    #[test]
    fn unresolvable_callers_are_refused() {
        let root = proc_tree(&TREE);
        let g = gate(root.path(), &[], &[30]);
        for pid in [None, Some(0), Some(-5), Some(999)] {
            assert!(
                matches!(g.check(pid), Err(Refusal::Unresolvable { .. })),
                "{pid:?}"
            );
        }
        // An ancestor that cannot be asked about refuses its descendants.
        assert!(matches!(
            g.check(Some(40)),
            Err(Refusal::Unresolvable { .. })
        ));
        // A parent that vanished from /proc mid-walk: refused.
        let root = proc_tree(&[(40, 30)]);
        let g = gate(root.path(), &[], &[]);
        assert!(matches!(
            g.check(Some(40)),
            Err(Refusal::Unresolvable { .. })
        ));
    }

    #[test]
    fn hostile_proc_contents_are_refused_not_followed() {
        // A loop, a self-parent, a malformed stat, an endless chain.
        let root = proc_tree(&[(5, 6), (6, 5)]);
        let g = gate(root.path(), &[], &[]);
        assert!(matches!(
            g.check(Some(5)),
            Err(Refusal::Unresolvable { .. })
        ));
        let root = proc_tree(&[(7, 7)]);
        assert!(matches!(
            gate(root.path(), &[], &[]).check(Some(7)),
            Err(Refusal::Unresolvable { .. })
        ));
        let root = proc_tree(&[]);
        std::fs::create_dir(root.path().join("8")).unwrap();
        std::fs::write(root.path().join("8/stat"), "8 (noclose S 1").unwrap();
        assert!(matches!(
            gate(root.path(), &[], &[]).check(Some(8)),
            Err(Refusal::Unresolvable { .. })
        ));
        let chain: Vec<(u32, u32)> = (2..400).map(|p| (p, p + 1)).collect();
        let root = proc_tree(&chain);
        assert!(matches!(
            gate(root.path(), &[], &[]).check(Some(2)),
            Err(Refusal::Unresolvable { .. })
        ));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn refusals_are_recorded_and_admissions_carry_the_proof() {
        let root = proc_tree(&TREE);
        let seen: Arc<Mutex<Vec<DecisionEvent>>> = Arc::default();
        let sink = seen.clone();
        let recorder: Recorder = Arc::new(move |e| {
            sink.lock().unwrap().push(e);
            Box::pin(async {})
        });
        let g = Arc::new(
            gate(root.path(), &[20], &[]).with_recorder(recorder, Path::new("/run/kya/kya.sock")),
        );
        let caller = |pid| Caller {
            uid: 1000,
            gid: 1000,
            pid: Some(pid),
            clearance: None,
        };
        let req = Request::new(
            "approvals.approve",
            serde_json::json!({"id": "apr_1", "reason": "me"}),
        );
        let me = || {
            super::super::peer::peer_pidfd(
                std::fs::File::open("/dev/null").unwrap(),
                Some(std::process::id() as i32),
            )
            .map(Arc::new)
        };
        let ok = g.admit(caller(50), me(), &req).await.unwrap();
        assert!(ok.clearance.is_some());
        assert!(seen.lock().unwrap().is_empty());

        // Without a live pidfd nothing is admitted.
        assert!(g.admit(caller(50), None, &req).await.is_err());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = super::super::peer::peer_pidfd(
            std::fs::File::open("/dev/null").unwrap(),
            Some(child.id() as i32),
        )
        .map(Arc::new);
        child.wait().unwrap();
        match g.admit(caller(50), gone, &req).await {
            Err(Response::Error { error, .. }) => assert!(error.contains("has exited"), "{error}"),
            other => panic!("{other:?}"),
        }
        seen.lock().unwrap().clear();

        match g.admit(caller(40), me(), &req).await {
            Err(Response::Error {
                code: ErrorCode::Forbidden,
                error,
            }) => {
                assert!(error.contains("descends from pid 20"), "{error}")
            }
            other => panic!("{other:?}"),
        }
        let events = seen.lock().unwrap().clone();
        assert_eq!(events.len(), 1);
        let e = &events[0];
        e.validate().unwrap();
        assert_eq!(e.kind, EventKind::ControlRefused);
        assert_eq!(e.verdict, Verdict::Deny);
        assert_eq!(e.mcp.method, "approvals.approve");
        assert_eq!(e.mcp.args.as_ref().unwrap()["id"], "apr_1");
        assert_eq!(e.approval.as_ref().unwrap().id, "apr_1");
        assert_eq!(e.process.pid, 40);
        assert_eq!(e.process.uid, 1000);
        assert_eq!(e.destination.host, "/run/kya/kya.sock");
        assert_eq!(e.rule.as_deref(), Some(REFUSED_RULE));

        // A huge request is recorded by digest only.
        let big = Request::new(
            "credential.issue",
            serde_json::json!({"x": "y".repeat(10_000)}),
        );
        assert!(g.admit(caller(20), me(), &big).await.is_err());
        let e = seen.lock().unwrap()[1].clone();
        assert!(e.mcp.args.is_none() && e.mcp.args_sha256.is_some());
        assert!(e.approval.is_none());
    }
}
