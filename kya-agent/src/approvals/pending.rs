//! The bounded set of pending approvals.
//!
//! A held call [`Approvals::submit`]s its action and awaits
//! [`ApprovalHandle::wait`]; an owner's answer (any channel) resolves it. The
//! first answer wins; a later one is refused. Dropping the handle (the agent
//! disconnected, cancelled, or the hold was released another way) removes the
//! approval.
//!
//! With a [`Persist`] journal, a new approval is on disk (durably) before it is
//! visible to anyone (listed, put to channels, answerable), and its end is
//! journaled when it is removed (see [`super::persist`] for the guarantees).
//! The journal I/O is done outside the map's mutex: a slot is reserved under
//! the mutex (so the bound holds), the record is written, then the approval
//! is inserted. Concurrent submissions share the journal's `fdatasync`.

use super::answer::{Answer, ApprovalError};
use super::binding;
use super::channel::{Answers, ApprovalChannel, Ask};
use super::persist::{PendingRecord, Persist};
use super::request::{ActionRequest, ApprovalView};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::{oneshot, watch};

/// Default bound on pending approvals.
pub(crate) const DEFAULT_MAX_PENDING: usize = 1024;

/// How a pending approval ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Approved(Answer),
    Denied(Answer),
    /// Nobody answered before the hold timeout.
    Expired,
    /// Ended by kya (agent suspended, daemon shutting down...).
    Cancelled(String),
}

enum Resolution {
    Answer(Answer),
    Cancel(String),
}

struct Entry {
    request: ActionRequest,
    binding_message: String,
    created: OffsetDateTime,
    expires: OffsetDateTime,
    resolve: Option<oneshot::Sender<Resolution>>,
    /// Dropped with the entry: tells channels the approval is no longer pending.
    _ended: watch::Sender<()>,
}

/// The pending approvals of one daemon.
pub struct Approvals {
    pending: Mutex<HashMap<String, Entry>>,
    /// Slots taken by submissions being journaled (changed under `pending`'s lock).
    reserved: AtomicUsize,
    max_pending: usize,
    persist: Option<Persist>,
    channels: std::sync::RwLock<Vec<Arc<dyn ApprovalChannel>>>,
}

impl Approvals {
    /// An in-memory set (tests); `persist` adds the on-disk record.
    pub fn new(max_pending: usize, persist: Option<Persist>) -> Arc<Self> {
        Arc::new(Self {
            pending: Mutex::new(HashMap::new()),
            reserved: AtomicUsize::new(0),
            max_pending,
            persist,
            channels: std::sync::RwLock::new(Vec::new()),
        })
    }

    /// Add a backchannel: every approval submitted from now on is put to it.
    pub fn add_channel(&self, channel: Arc<dyn ApprovalChannel>) {
        self.channels
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(channel);
    }

    /// Names of the backchannels in use (besides the local one).
    pub fn channel_names(&self) -> Vec<&'static str> {
        self.channels
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|c| c.name())
            .collect()
    }

    /// True while `id` waits for an answer.
    pub fn is_pending(&self, id: &str) -> bool {
        self.lock().get(id).is_some_and(|e| e.resolve.is_some())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A panic elsewhere must not wedge every held call: the map itself is
        // always consistent (each operation is a single insert/remove).
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Register a held call. Fails when the bound is reached (the caller denies).
    pub fn submit(
        self: &Arc<Self>,
        request: ActionRequest,
        timeout: Duration,
    ) -> Result<ApprovalHandle, ApprovalError> {
        let id = new_id();
        let code = binding::new_code();
        let binding_message = binding::message(&code, &request.agent, &request.tool);
        let created = OffsetDateTime::now_utc();
        let expires = created + timeout;
        let (tx, rx) = oneshot::channel();
        let (ended_tx, ended_rx) = watch::channel(());
        let ask_request = request.clone();
        {
            let map = self.lock();
            if map.len() + self.reserved.load(Ordering::Relaxed) >= self.max_pending {
                return Err(ApprovalError::TooMany(self.max_pending));
            }
            self.reserved.fetch_add(1, Ordering::Relaxed);
        }
        let entry = Entry {
            request,
            binding_message: binding_message.clone(),
            created,
            expires,
            resolve: Some(tx),
            _ended: ended_tx,
        };
        // Durable before anyone sees it; outside the map's lock.
        let saved = match &self.persist {
            Some(p) => p.add(&PendingRecord {
                view: view(&id, &entry),
                request: entry.request.clone(),
            }),
            None => Ok(()),
        };
        {
            let mut map = self.lock();
            self.reserved.fetch_sub(1, Ordering::Relaxed);
            saved?;
            map.insert(id.clone(), entry);
        }
        let channels = self
            .channels
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for channel in channels {
            let ask = Ask::new(
                id.clone(),
                binding_message.clone(),
                expires,
                ask_request.clone(),
                ended_rx.clone(),
            );
            channel.ask(ask, self.clone() as Arc<dyn Answers>);
        }
        Ok(ApprovalHandle {
            id,
            binding_message,
            expires,
            timeout,
            rx: Some(rx),
            approvals: self.clone(),
        })
    }

    /// Answer a pending approval. The first answer wins.
    pub fn answer(&self, id: &str, answer: Answer) -> Result<(), ApprovalError> {
        self.resolve(id, Resolution::Answer(answer))
    }

    /// End a pending approval without an answer (e.g. the agent was suspended).
    pub fn cancel(&self, id: &str, why: &str) -> Result<(), ApprovalError> {
        self.resolve(id, Resolution::Cancel(why.to_string()))
    }

    /// Cancel every pending approval of `agent`; returns how many.
    pub fn cancel_agent(&self, agent: &str, why: &str) -> usize {
        let ids: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, e)| e.request.agent == agent)
            .map(|(id, _)| id.clone())
            .collect();
        ids.iter().filter(|id| self.cancel(id, why).is_ok()).count()
    }

    /// Cancel every pending approval (kya is stopping); returns how many.
    pub fn cancel_all(&self, why: &str) -> usize {
        let ids: Vec<String> = self.lock().keys().cloned().collect();
        ids.iter().filter(|id| self.cancel(id, why).is_ok()).count()
    }

    fn resolve(&self, id: &str, r: Resolution) -> Result<(), ApprovalError> {
        let mut map = self.lock();
        let entry = map
            .get_mut(id)
            .ok_or_else(|| ApprovalError::NotFound(id.to_string()))?;
        let tx = entry
            .resolve
            .take()
            .ok_or_else(|| ApprovalError::AlreadyAnswered(id.to_string()))?;
        // The waiter may have gone (agent disconnected) at this very moment;
        // then the answer has no call to release, which is fine.
        let _ = tx.send(r);
        Ok(())
    }

    /// The request behind a pending approval (for authorisation checks).
    pub fn request(&self, id: &str) -> Option<ActionRequest> {
        self.lock().get(id).map(|e| e.request.clone())
    }

    /// The actions of the approvals not yet answered, with their ids.
    pub fn pending(&self) -> Vec<(String, ActionRequest)> {
        self.lock()
            .iter()
            .filter(|(_, e)| e.resolve.is_some())
            .map(|(id, e)| (id.clone(), e.request.clone()))
            .collect()
    }

    /// Pending approvals not yet answered, oldest first.
    pub fn list(&self) -> Vec<ApprovalView> {
        let map = self.lock();
        let mut v: Vec<(OffsetDateTime, ApprovalView)> = map
            .iter()
            .filter(|(_, e)| e.resolve.is_some())
            .map(|(id, e)| (e.created, view(id, e)))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.id.cmp(&b.1.id)));
        v.into_iter().map(|(_, view)| view).collect()
    }

    /// Number of pending approvals.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn remove(&self, id: &str) {
        let removed = self.lock().remove(id);
        // The entry (and its `_ended` sender) is dropped outside the lock.
        if removed.is_some() {
            if let Some(p) = &self.persist {
                if let Err(e) = p.end(id) {
                    tracing::error!(error = %e, "cannot journal the end of approval {id}");
                }
            }
        }
    }
}

impl Answers for Approvals {
    fn answer(&self, id: &str, answer: Answer) -> Result<(), ApprovalError> {
        Approvals::answer(self, id, answer)
    }
}

fn view(id: &str, e: &Entry) -> ApprovalView {
    ApprovalView {
        id: id.to_string(),
        agent: e.request.agent.clone(),
        tool: e.request.tool.clone(),
        server: e.request.server.clone(),
        owner: e.request.owner.clone(),
        binding_message: e.binding_message.clone(),
        created: rfc3339(e.created),
        expires: rfc3339(e.expires),
        args_digest: e.request.args_digest.clone(),
        rule: e.request.rule.clone(),
        reason: e.request.reason.clone(),
        pid: e.request.process.pid,
        decision_id: e.request.decision_id.clone(),
        tool_change: e.request.tool_change.clone(),
    }
}

/// RFC 3339 text of a time (always representable for times kya makes).
pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// Approval ids: `apr_` + 16 random hex digits; short enough to type.
fn new_id() -> String {
    use rand::Rng;
    format!("apr_{:016x}", rand::thread_rng().gen::<u64>())
}

/// A held call's stake in its approval.
pub struct ApprovalHandle {
    pub id: String,
    pub binding_message: String,
    pub expires: OffsetDateTime,
    timeout: Duration,
    rx: Option<oneshot::Receiver<Resolution>>,
    approvals: Arc<Approvals>,
}

impl ApprovalHandle {
    /// Wait for the answer, the timeout, or a cancellation; the approval is
    /// removed when this returns.
    pub async fn wait(mut self) -> Outcome {
        let outcome = self.outcome().await;
        self.approvals.remove(&self.id);
        outcome
    }

    /// Wait for the answer, the timeout, or a cancellation, keeping the
    /// approval (no longer pending: it cannot be answered again) in the table
    /// and the journal until the handle is dropped, so its end is journaled
    /// only once the caller has recorded it.
    pub async fn outcome(&mut self) -> Outcome {
        let Some(rx) = self.rx.take() else {
            return Outcome::Cancelled("approval already awaited".into());
        };
        let outcome = match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(Resolution::Answer(a))) if a.approve => Outcome::Approved(a),
            Ok(Ok(Resolution::Answer(a))) => Outcome::Denied(a),
            Ok(Ok(Resolution::Cancel(why))) => Outcome::Cancelled(why),
            Ok(Err(_)) => Outcome::Cancelled("approval record dropped".into()),
            Err(_) => Outcome::Expired,
        };
        // Expired: no answer may arrive any more.
        if let Some(e) = self.approvals.lock().get_mut(&self.id) {
            e.resolve = None;
        }
        outcome
    }
}

impl Drop for ApprovalHandle {
    fn drop(&mut self) {
        // Waiting ended early (client gone) or completed: either way the
        // approval is no longer pending.
        self.approvals.remove(&self.id);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use kya_common::ProcessIdentity;

    pub(crate) fn action(agent: &str, owner: &str) -> ActionRequest {
        ActionRequest {
            agent: agent.into(),
            owner: owner.into(),
            approvers: vec![],
            process: ProcessIdentity {
                pid: 42,
                ..Default::default()
            },
            server: "mcp.test".into(),
            tool: "transfer".into(),
            args: serde_json::json!({"amount": 5000}),
            args_digest: "ab".repeat(32),
            policy_version: "v1".into(),
            rule: Some("large-transfer".into()),
            reason: "large transfer".into(),
            decision_id: "dec_1".into(),
            tool_change: None,
        }
    }

    fn yes(by: &str) -> Answer {
        Answer {
            approve: true,
            approver: by.into(),
            channel: "local".into(),
            reason: None,
            evidence: None,
        }
    }

    #[tokio::test]
    async fn first_answer_wins_and_later_ones_are_refused() {
        let a = Approvals::new(8, None);
        let h = a
            .submit(action("bot", "alice"), Duration::from_secs(5))
            .unwrap();
        let id = h.id.clone();
        assert_eq!(a.list().len(), 1);
        assert_eq!(a.list()[0].binding_message, h.binding_message);
        a.answer(&id, yes("alice")).unwrap();
        assert!(matches!(
            a.answer(&id, yes("mallory")),
            Err(ApprovalError::AlreadyAnswered(_))
        ));
        assert!(a.list().is_empty(), "answered approvals are not listed");
        match h.wait().await {
            Outcome::Approved(ans) => assert_eq!(ans.approver, "alice"),
            other => panic!("{other:?}"),
        }
        assert!(a.is_empty());
        assert!(matches!(
            a.answer(&id, yes("alice")),
            Err(ApprovalError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn deny_timeout_cancel_and_drop() {
        let a = Approvals::new(8, None);
        let h = a
            .submit(action("bot", "alice"), Duration::from_secs(5))
            .unwrap();
        a.answer(
            &h.id.clone(),
            Answer {
                approve: false,
                ..yes("alice")
            },
        )
        .unwrap();
        assert!(matches!(h.wait().await, Outcome::Denied(_)));

        let h = a
            .submit(action("bot", "alice"), Duration::from_millis(30))
            .unwrap();
        assert_eq!(h.wait().await, Outcome::Expired);

        let h = a
            .submit(action("bot", "alice"), Duration::from_secs(5))
            .unwrap();
        let other = a
            .submit(action("other", "bob"), Duration::from_secs(5))
            .unwrap();
        assert_eq!(a.cancel_agent("bot", "agent suspended"), 1);
        assert_eq!(h.wait().await, Outcome::Cancelled("agent suspended".into()));
        assert_eq!(a.len(), 1);
        drop(other);
        assert!(a.is_empty(), "a dropped handle removes its approval");
    }

    #[tokio::test]
    async fn an_ended_approval_stays_journaled_until_its_handle_is_dropped() {
        use crate::approvals::persist::Persist;
        let dir = tempfile::tempdir().unwrap();
        let a = Approvals::new(8, Some(Persist::new(dir.path())));
        let mut h = a
            .submit(action("bot", "alice"), Duration::from_secs(5))
            .unwrap();
        let id = h.id.clone();
        a.answer(&id, yes("alice")).unwrap();
        assert!(matches!(h.outcome().await, Outcome::Approved(_)));
        // What a crash now would leave: the approval, whose end is not recorded yet.
        let left = Persist::new(dir.path()).interrupted().unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].view.id, id);
        assert!(a.list().is_empty(), "ended: not listed as pending");
        assert!(matches!(
            a.answer(&id, yes("alice")),
            Err(ApprovalError::AlreadyAnswered(_))
        ));
        drop(h);
        assert!(a.is_empty());
        assert!(Persist::new(dir.path()).interrupted().unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_bound_holds() {
        let a = Approvals::new(2, None);
        let _h1 = a
            .submit(action("bot", "alice"), Duration::from_secs(5))
            .unwrap();
        let _h2 = a
            .submit(action("bot", "alice"), Duration::from_secs(5))
            .unwrap();
        assert!(matches!(
            a.submit(action("bot", "alice"), Duration::from_secs(5)),
            Err(ApprovalError::TooMany(2))
        ));
    }

    #[test]
    fn concurrent_submissions_keep_the_bound_and_the_journal_exact() {
        use crate::approvals::persist::Persist;
        let dir = tempfile::tempdir().unwrap();
        let a = Approvals::new(40, Some(Persist::new(dir.path())));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let a = a.clone();
                std::thread::spawn(move || {
                    let mut kept = Vec::new();
                    let mut refused = 0;
                    for i in 0..10 {
                        match a.submit(action("bot", "alice"), Duration::from_secs(60)) {
                            // Every other one ends (answered and gone).
                            Ok(h) if (t + i) % 2 == 0 => drop(h),
                            Ok(h) => kept.push(h),
                            Err(ApprovalError::TooMany(40)) => refused += 1,
                            Err(e) => panic!("{e}"),
                        }
                    }
                    (kept, refused)
                })
            })
            .collect();
        let mut kept = Vec::new();
        for t in threads {
            let (k, _refused) = t.join().unwrap();
            kept.extend(k);
        }
        assert!(kept.len() <= 40);
        assert_eq!(a.len(), kept.len());
        let mut want: Vec<String> = kept.iter().map(|h| h.id.clone()).collect();
        want.sort();
        let mut listed: Vec<String> = a.list().into_iter().map(|v| v.id).collect();
        listed.sort();
        assert_eq!(listed, want);
        // What a crash now would leave: exactly the pending set.
        let mut left: Vec<String> = Persist::new(dir.path())
            .take_interrupted()
            .unwrap()
            .into_iter()
            .map(|r| r.view.id)
            .collect();
        left.sort();
        assert_eq!(left, want);
        std::mem::forget(kept);
    }

    /// A channel that answers every ask itself, as a backchannel would.
    struct AutoAnswer {
        approve: bool,
        seen: Mutex<Vec<String>>,
    }

    impl ApprovalChannel for AutoAnswer {
        fn name(&self) -> &'static str {
            "auto"
        }
        fn ask(&self, ask: Ask, approvals: Arc<dyn Answers>) {
            self.seen.lock().unwrap().push(ask.binding_message.clone());
            let approve = self.approve;
            tokio::spawn(async move {
                let _ = approvals.answer(
                    &ask.id,
                    Answer {
                        approve,
                        channel: "auto".into(),
                        ..yes("robot")
                    },
                );
            });
        }
    }

    #[tokio::test]
    async fn channels_are_asked_and_their_answer_releases_the_call() {
        let a = Approvals::new(8, None);
        let ch = Arc::new(AutoAnswer {
            approve: true,
            seen: Mutex::new(Vec::new()),
        });
        a.add_channel(ch.clone());
        assert_eq!(a.channel_names(), vec!["auto"]);
        let h = a
            .submit(action("bot", "alice"), Duration::from_secs(5))
            .unwrap();
        assert_eq!(*ch.seen.lock().unwrap(), vec![h.binding_message.clone()]);
        match h.wait().await {
            Outcome::Approved(ans) => assert_eq!(ans.channel, "auto"),
            other => panic!("{other:?}"),
        }
    }

    /// A channel that only waits for the end of the approval.
    struct Watcher(Arc<tokio::sync::Notify>);

    impl ApprovalChannel for Watcher {
        fn name(&self) -> &'static str {
            "watcher"
        }
        fn ask(&self, ask: Ask, _approvals: Arc<dyn Answers>) {
            let done = self.0.clone();
            tokio::spawn(async move {
                ask.ended().await;
                done.notify_one();
            });
        }
    }

    #[tokio::test]
    async fn a_channel_learns_when_the_approval_ends() {
        let a = Approvals::new(8, None);
        let done = Arc::new(tokio::sync::Notify::new());
        a.add_channel(Arc::new(Watcher(done.clone())));
        let h = a
            .submit(action("bot", "alice"), Duration::from_secs(60))
            .unwrap();
        assert!(a.is_pending(&h.id));
        let ended = tokio::time::timeout(Duration::from_millis(50), done.notified()).await;
        assert!(
            ended.is_err(),
            "still pending: the channel must keep asking"
        );
        a.answer(&h.id.clone(), yes("alice")).unwrap();
        assert!(!a.is_pending(&h.id), "answered is no longer pending");
        assert!(matches!(h.wait().await, Outcome::Approved(_)));
        tokio::time::timeout(Duration::from_secs(5), done.notified())
            .await
            .expect("the channel is told the approval ended");
    }
}
