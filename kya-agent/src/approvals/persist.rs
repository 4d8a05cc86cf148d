//! The on-disk record of pending approvals: an append-only journal,
//! `STATE_DIR/approvals.journal`.
//!
//! After a crash or restart the daemon reads it to learn which calls were held
//! when it stopped, and records them as denied ("the daemon restarted while
//! the call was held") instead of losing them silently. The HTTP exchanges
//! themselves cannot survive a restart: their sockets died with the process.
//!
//! # Format
//!
//! JSON lines (UTF-8, one object per `\n`-terminated line):
//!
//! ```text
//! {"journal":"kya-approvals","version":1}
//! {"add":{"view":{...},"request":{...}}}
//! {"end":"apr_0123456789abcdef"}
//! ```
//!
//! The first line is the header. `add` carries the whole [`PendingRecord`] of
//! a newly held call; `end` names one that is no longer pending (answered,
//! expired, cancelled, the agent gone). The pending set is the adds minus the
//! ends, in file order.
//!
//! # Guarantees
//!
//! * An `add` is written and made durable (`fdatasync`) before
//!   [`Persist::add`] returns, and [`super::Approvals::submit`] returns (and
//!   shows the approval to anyone) only after that: a held call is never lost
//!   by a crash. Concurrent adds share one `fdatasync` (group commit); the I/O
//!   is done under the journal's own lock, never under the approvals map's.
//! * An `end` is appended without waiting for the disk (the next add's
//!   `fdatasync`, or the next compaction, carries it). A crash may lose the
//!   last ends: the restarted daemon then reports those calls as interrupted
//!   holds too, which is safe (their sockets are gone either way; nothing is
//!   released on the strength of this file).
//! * A crash in the middle of an append leaves a torn final line; it is
//!   ignored on replay (it was never acknowledged). Any other line that does
//!   not parse, a missing header, or a file larger than [`MAX_FILE`] is an
//!   error (fail closed: the caller logs it and starts empty).
//! * The file is compacted (rewritten atomically with only the live set:
//!   temp file, fsync, rename, directory fsync) when it has grown well beyond
//!   the live set (more than `2 × live + 1024` lines, or `2 × live bytes +
//!   1 MiB`), when a write failed, when the journal is first used by a process,
//!   and by [`Persist::take_interrupted`] at startup.
//! * The first use of a journal by a process (its first add or end) rewrites
//!   it with that process's live set, discarding what was there, exactly as
//!   the earlier whole-file record did: a daemon reads what was left with
//!   [`Persist::take_interrupted`] before it holds anything.
//!
//! The earlier format, `STATE_DIR/approvals.json` (a JSON array of
//! [`PendingRecord`]s rewritten on every change), is still read by
//! [`Persist::take_interrupted`] and removed once taken.

use super::request::{ActionRequest, ApprovalView};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// The journal's file name inside the state directory.
pub const JOURNAL: &str = "approvals.journal";
/// The earlier whole-set file, read once for the upgrade.
pub const FILE: &str = "approvals.json";
/// Largest file accepted at load (the set is bounded; anything bigger is not ours).
pub const MAX_FILE: u64 = 256 * 1024 * 1024;
/// Largest legacy `approvals.json` accepted.
pub const MAX_LEGACY_FILE: u64 = 64 * 1024 * 1024;
/// Compaction slack: lines and bytes beyond twice the live set tolerated.
const SLACK_LINES: u64 = 1024;
const SLACK_BYTES: u64 = 1024 * 1024;
const HEADER: &str = "{\"journal\":\"kya-approvals\",\"version\":1}\n";

/// One pending approval as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingRecord {
    pub view: ApprovalView,
    pub request: ActionRequest,
}

/// Errors reading or writing the record.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a pending-approvals file: {message}")]
    Format { path: PathBuf, message: String },
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
enum Line {
    Add(Box<PendingRecord>),
    End(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    journal: String,
    version: u32,
}

/// The pending-approvals journal of one state directory. Clones share it.
#[derive(Clone)]
pub struct Persist {
    journal: Arc<Journal>,
}

impl std::fmt::Debug for Persist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Persist")
            .field("path", &self.journal.path)
            .finish()
    }
}

struct Journal {
    path: PathBuf,
    legacy: PathBuf,
    state: Mutex<State>,
    /// Signalled when a group `fdatasync` ends.
    synced: Condvar,
}

#[derive(Default)]
struct State {
    /// The open journal; `None` before first use or after a failed write
    /// (then the next change compacts, which re-establishes the file).
    file: Option<Arc<File>>,
    /// Live ids with their serialized `add` line (what a compaction writes).
    live: HashMap<String, Vec<u8>>,
    live_bytes: u64,
    /// Lines and bytes in the file.
    lines: u64,
    bytes: u64,
    /// Adds written (a sequence number) and the highest one known durable.
    written: u64,
    durable: u64,
    /// A leader is in `fdatasync`.
    syncing: bool,
    /// The last failed group sync: adds up to this sequence failed with this.
    failed: Option<(u64, std::io::ErrorKind, String)>,
}

impl Persist {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            journal: Arc::new(Journal {
                path: state_dir.join(JOURNAL),
                legacy: state_dir.join(FILE),
                state: Mutex::new(State::default()),
                synced: Condvar::new(),
            }),
        }
    }

    /// The journal file.
    pub fn path(&self) -> &Path {
        &self.journal.path
    }

    /// The legacy whole-set file (read once, then removed).
    pub fn legacy_path(&self) -> &Path {
        &self.journal.legacy
    }

    /// Tests: hold the journal's lock (as a compaction would) until `release`
    /// fires, telling `locked` once it is held; whether `release` fired
    /// within `guard` (a hang guard).
    #[cfg(test)]
    pub(crate) fn stall(
        &self,
        locked: std::sync::mpsc::Sender<()>,
        release: std::sync::mpsc::Receiver<()>,
        guard: std::time::Duration,
    ) -> bool {
        let _st = self.lock();
        let _ = locked.send(());
        release.recv_timeout(guard).is_ok()
    }

    fn io(&self) -> impl Fn(std::io::Error) -> PersistError + '_ {
        |source| PersistError::Io {
            path: self.journal.path.clone(),
            source,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update keeps the state consistent; a panic elsewhere must not
        // wedge every held call.
        self.journal.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Record a newly pending approval, durably: returns once the line is on
    /// disk. Concurrent callers share one `fdatasync`.
    pub fn add(&self, record: &PendingRecord) -> Result<(), PersistError> {
        let id = record.view.id.clone();
        let mut line = serde_json::to_vec(&Line::Add(Box::new(record.clone())))
            .map_err(|e| self.io()(std::io::Error::other(e)))?;
        line.push(b'\n');
        let mut st = self.lock();
        let seq = match self.append(&mut st, &line) {
            Ok(()) => {
                st.live_bytes += line.len() as u64;
                st.live.insert(id.clone(), line);
                st.written += 1;
                st.written
            }
            Err(e) => return Err(e),
        };
        loop {
            if st.durable >= seq {
                return Ok(());
            }
            if let Some((upto, kind, msg)) = &st.failed {
                if *upto >= seq {
                    let err = std::io::Error::new(*kind, msg.clone());
                    drop(st);
                    // Not acknowledged: forget it (a later compaction drops
                    // it; if the line did reach the disk, a restart reports
                    // one extra interrupted hold, which is safe).
                    self.end(&id).ok();
                    return Err(self.io()(err));
                }
            }
            if st.syncing {
                st = self
                    .journal
                    .synced
                    .wait(st)
                    .unwrap_or_else(|e| e.into_inner());
                continue;
            }
            // Lead a group sync covering every add written so far.
            let Some(file) = st.file.clone() else {
                // Not reached: whatever closes the file settles `durable` or
                // `failed` first. Fail rather than claim durability.
                broken(&mut st, &std::io::Error::other("the journal was closed"));
                continue;
            };
            let target = st.written;
            st.syncing = true;
            drop(st);
            let r = file.sync_data();
            st = self.lock();
            st.syncing = false;
            match r {
                Ok(()) => st.durable = st.durable.max(target),
                // The kernel may have dropped the dirty pages: rewrite the
                // whole live set on the next change.
                Err(e) => broken(&mut st, &e),
            }
            self.journal.synced.notify_all();
        }
    }

    /// Record that `id` is no longer pending. Not waited for (see the module
    /// documentation); an id this journal does not hold is ignored.
    pub fn end(&self, id: &str) -> Result<(), PersistError> {
        let mut st = self.lock();
        let Some(line) = st.live.remove(id) else {
            return Ok(());
        };
        st.live_bytes -= line.len() as u64;
        let mut end = serde_json::to_vec(&Line::End(id.to_string()))
            .map_err(|e| self.io()(std::io::Error::other(e)))?;
        end.push(b'\n');
        self.append(&mut st, &end)?;
        if st.lines > 2 * st.live.len() as u64 + SLACK_LINES
            || st.bytes > 2 * st.live_bytes + SLACK_BYTES
        {
            self.compact(&mut st)?;
        }
        Ok(())
    }

    /// Append `line`, opening (compacting) the journal first when needed. On a
    /// failed write the file is truncated back, or dropped for a compaction.
    fn append(&self, st: &mut State, line: &[u8]) -> Result<(), PersistError> {
        if st.file.is_none() {
            self.compact(st)?;
        }
        let file = st.file.clone().expect("opened by compact");
        if let Err(e) = (&*file).write_all(line) {
            // Never leave a partial line for the next append to follow.
            if file.set_len(st.bytes).is_err() {
                broken(st, &e);
            }
            return Err(self.io()(e));
        }
        st.lines += 1;
        st.bytes += line.len() as u64;
        Ok(())
    }

    /// Rewrite the journal with the live set only, atomically and durably,
    /// and reopen it for appending.
    fn compact(&self, st: &mut State) -> Result<(), PersistError> {
        let mut bytes = Vec::with_capacity(HEADER.len() + st.live_bytes as usize);
        bytes.extend_from_slice(HEADER.as_bytes());
        for line in st.live.values() {
            bytes.extend_from_slice(line);
        }
        let opened = crate::fsutil::write_atomic(&self.journal.path, &bytes).and_then(|()| {
            std::fs::OpenOptions::new()
                .append(true)
                .mode(0o600)
                .open(&self.journal.path)
        });
        let file = match opened {
            Ok(f) => f,
            Err(e) => {
                broken(st, &e);
                return Err(self.io()(e));
            }
        };
        st.file = Some(Arc::new(file));
        st.lines = 1 + st.live.len() as u64;
        st.bytes = bytes.len() as u64;
        // Everything written so far is in the new file, which is durable.
        st.durable = st.written;
        self.journal.synced.notify_all();
        Ok(())
    }

    /// What a previous run left pending (the legacy `approvals.json` and the
    /// journal), without clearing it: the caller records their end, then calls
    /// [`Persist::take_interrupted`].
    pub fn interrupted(&self) -> Result<Vec<PendingRecord>, PersistError> {
        let st = self.lock();
        let mut records = self.read_legacy()?;
        let mut left = replay(&self.journal.path)?;
        left.retain(|r| !st.live.contains_key(&r.view.id));
        records.retain(|r| !left.iter().any(|l| l.view.id == r.view.id));
        records.extend(left);
        Ok(records)
    }

    /// Read what a previous run left pending (the legacy `approvals.json` and
    /// the journal), then clear it: the journal is rewritten with this
    /// handle's own live set (empty at startup) and the legacy file removed.
    /// A missing file means nothing was pending.
    pub fn take_interrupted(&self) -> Result<Vec<PendingRecord>, PersistError> {
        let mut st = self.lock();
        let mut records = self.read_legacy()?;
        let mut left = replay(&self.journal.path)?;
        left.retain(|r| !st.live.contains_key(&r.view.id));
        records.retain(|r| !left.iter().any(|l| l.view.id == r.view.id));
        records.extend(left);
        self.compact(&mut st)?;
        match std::fs::remove_file(&self.journal.legacy) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(PersistError::Io {
                    path: self.journal.legacy.clone(),
                    source,
                })
            }
        }
        Ok(records)
    }

    fn read_legacy(&self) -> Result<Vec<PendingRecord>, PersistError> {
        let path = &self.journal.legacy;
        let io = |source| PersistError::Io {
            path: path.clone(),
            source,
        };
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(e)),
        };
        if meta.len() > MAX_LEGACY_FILE {
            return Err(PersistError::Format {
                path: path.clone(),
                message: format!("{} bytes is larger than any pending set", meta.len()),
            });
        }
        let bytes = std::fs::read(path).map_err(io)?;
        serde_json::from_slice(&bytes).map_err(|e| PersistError::Format {
            path: path.clone(),
            message: e.to_string(),
        })
    }
}

/// Close the journal after a failed write or sync: adds not yet durable fail,
/// and the next change compacts (rewrites the live set) first.
fn broken(st: &mut State, e: &std::io::Error) {
    st.file = None;
    if st.written > st.durable {
        st.failed = Some((st.written, e.kind(), e.to_string()));
    }
}

/// The pending set a journal describes: adds minus ends, in order of addition.
fn replay(path: &Path) -> Result<Vec<PendingRecord>, PersistError> {
    let format = |message: String| PersistError::Format {
        path: path.to_path_buf(),
        message,
    };
    let io = |source| PersistError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    let len = file.metadata().map_err(io)?.len();
    if len > MAX_FILE {
        return Err(format(format!(
            "{len} bytes is larger than any pending set"
        )));
    }
    if len == 0 {
        return Ok(Vec::new());
    }
    let mut reader = std::io::BufReader::new(file.take(MAX_FILE));
    let mut order: Vec<String> = Vec::new();
    let mut live: HashMap<String, PendingRecord> = HashMap::new();
    let mut buf = Vec::new();
    let mut n = 0u64;
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf).map_err(io)? == 0 {
            break;
        }
        n += 1;
        let terminated = buf.last() == Some(&b'\n');
        let last = !terminated || reader.fill_buf().map_err(io)?.is_empty();
        let parsed = if n == 1 {
            serde_json::from_slice::<Header>(&buf)
                .map_err(|e| e.to_string())
                .and_then(|h| {
                    if h.journal == "kya-approvals" && h.version == 1 {
                        Ok(None)
                    } else {
                        Err(format!(
                            "unsupported journal {} version {}",
                            h.journal, h.version
                        ))
                    }
                })
        } else {
            serde_json::from_slice::<Line>(&buf)
                .map(Some)
                .map_err(|e| e.to_string())
        };
        match parsed {
            Ok(None) => {}
            Ok(Some(Line::Add(r))) => {
                let id = r.view.id.clone();
                if live.insert(id.clone(), *r).is_none() {
                    order.push(id);
                }
            }
            Ok(Some(Line::End(id))) => {
                live.remove(&id);
            }
            // A crash mid-append: the line was never acknowledged.
            Err(e) if last && n > 1 => {
                tracing::warn!(path = %path.display(), line = n, error = %e, "ignoring a torn last line in the pending-approvals journal");
            }
            Err(e) => return Err(format(format!("line {n}: {e}"))),
        }
        if order.len() > 4 * live.len() + 4096 {
            order.retain(|id| live.contains_key(id));
        }
    }
    Ok(order
        .into_iter()
        .filter_map(|id| live.remove(&id))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::approvals::pending::tests::action;
    use crate::approvals::Approvals;
    use std::time::Duration;

    fn record(i: usize) -> PendingRecord {
        let request = action("bot", "alice");
        PendingRecord {
            view: ApprovalView {
                id: format!("apr_{i:016x}"),
                agent: request.agent.clone(),
                tool: request.tool.clone(),
                server: request.server.clone(),
                owner: request.owner.clone(),
                binding_message: "m".into(),
                created: "2026-11-26T12:00:00Z".into(),
                expires: "2026-11-26T12:05:00Z".into(),
                args_digest: request.args_digest.clone(),
                rule: request.rule.clone(),
                reason: request.reason.clone(),
                pid: 42,
                decision_id: format!("dec_{i}"),
                tool_change: None,
            },
            request,
        }
    }

    fn ids(records: &[PendingRecord]) -> Vec<String> {
        records.iter().map(|r| r.view.id.clone()).collect()
    }

    fn lines(path: &Path) -> usize {
        std::fs::read_to_string(path).unwrap().lines().count()
    }

    #[tokio::test]
    async fn pending_approvals_survive_a_crash_as_interrupted_records() {
        let dir = tempfile::tempdir().unwrap();
        let persist = Persist::new(dir.path());
        let a = Approvals::new(8, Some(persist.clone()));
        let h = a
            .submit(action("bot", "alice"), Duration::from_secs(60))
            .unwrap();
        let id = h.id.clone();
        let done = a
            .submit(action("bot", "alice"), Duration::from_secs(60))
            .unwrap();
        drop(done);
        // Simulate a crash: the handle is never dropped normally.
        std::mem::forget(h);
        let again = Persist::new(dir.path());
        let left = again.take_interrupted().unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].view.id, id);
        assert_eq!(left[0].request.tool, "transfer");
        assert!(again.take_interrupted().unwrap().is_empty(), "taken once");
    }

    #[test]
    fn a_torn_last_line_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let p = Persist::new(dir.path());
        for i in 0..3 {
            p.add(&record(i)).unwrap();
        }
        p.end(&record(1).view.id).unwrap();
        // A crash in the middle of appending the next add.
        let mut torn = serde_json::to_vec(&Line::Add(Box::new(record(9)))).unwrap();
        torn.truncate(torn.len() / 2);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(p.path())
            .unwrap();
        f.write_all(&torn).unwrap();
        drop(f);
        let left = Persist::new(dir.path()).take_interrupted().unwrap();
        assert_eq!(ids(&left), ids(&[record(0), record(2)]));
        // Taken and compacted: the torn line is gone too.
        assert_eq!(lines(p.path()), 1);
        assert!(Persist::new(dir.path())
            .take_interrupted()
            .unwrap()
            .is_empty());
    }

    #[test]
    fn lost_ends_only_add_interrupted_reports() {
        let dir = tempfile::tempdir().unwrap();
        let p = Persist::new(dir.path());
        for i in 0..4 {
            p.add(&record(i)).unwrap();
        }
        let durable = std::fs::read(p.path()).unwrap();
        p.end(&record(0).view.id).unwrap();
        p.end(&record(3).view.id).unwrap();
        // The crash lost the ends (never synced): the file is as after the adds.
        std::fs::write(p.path(), &durable).unwrap();
        let left = Persist::new(dir.path()).take_interrupted().unwrap();
        assert_eq!(
            ids(&left),
            ids(&[record(0), record(1), record(2), record(3)])
        );
    }

    #[test]
    fn many_adds_and_ends_compact_and_keep_the_live_set() {
        let dir = tempfile::tempdir().unwrap();
        let p = Persist::new(dir.path());
        let mut live = Vec::new();
        for i in 0..2500 {
            p.add(&record(i)).unwrap();
            if i % 7 == 0 {
                live.push(record(i));
            } else {
                p.end(&record(i).view.id).unwrap();
            }
        }
        // Bounded by the compaction rule, not by the history.
        let n = lines(p.path());
        assert!(n <= 2 * live.len() + 1024 + 2, "{n} lines");
        assert!(n < 2500, "{n} lines");
        // Ending unknown or already-ended ids is a no-op.
        p.end("apr_nope").unwrap();
        p.end(&record(1).view.id).unwrap();
        let mut left = Persist::new(dir.path()).take_interrupted().unwrap();
        left.sort_by(|a, b| a.view.id.cmp(&b.view.id));
        live.sort_by(|a, b| a.view.id.cmp(&b.view.id));
        assert_eq!(left, live);
    }

    #[test]
    fn compaction_preserves_the_live_set() {
        let dir = tempfile::tempdir().unwrap();
        let p = Persist::new(dir.path());
        for i in 0..10 {
            p.add(&record(i)).unwrap();
        }
        for i in 0..5 {
            p.end(&record(i).view.id).unwrap();
        }
        p.compact(&mut p.lock()).unwrap();
        assert_eq!(lines(p.path()), 6, "header and the 5 live adds");
        // Appends continue after a compaction.
        p.add(&record(10)).unwrap();
        p.end(&record(5).view.id).unwrap();
        let mut left = ids(&Persist::new(dir.path()).take_interrupted().unwrap());
        left.sort();
        assert_eq!(left, ids(&(6..11).map(record).collect::<Vec<_>>()));
    }

    #[test]
    fn hostile_files_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let p = Persist::new(dir.path());
        assert!(p.take_interrupted().unwrap().is_empty());
        // Legacy whole-set file.
        for bad in [&b"{"[..], b"[1,2]", b"\xff\xfe", b"{\"view\":1}"] {
            std::fs::write(p.legacy_path(), bad).unwrap();
            assert!(matches!(
                p.take_interrupted(),
                Err(PersistError::Format { .. })
            ));
        }
        std::fs::remove_file(p.legacy_path()).unwrap();
        // Journal: a bad line anywhere but last, a bad or missing header.
        let add = String::from_utf8(serde_json::to_vec(&Line::Add(Box::new(record(1)))).unwrap())
            .unwrap();
        for bad in [
            format!("{HEADER}garbage\n{add}\n"),
            format!("{HEADER}{{\"add\":1}}\n{add}\n"),
            format!("{HEADER}{{\"end\":\"x\",\"add\":null}}\n{add}\n"),
            format!("{HEADER}\u{0}\n{add}\n"),
            format!("{add}\n"),
            "{\"journal\":\"kya-approvals\",\"version\":2}\n".to_string(),
            "{\"journal\":\"other\",\"version\":1}\n".to_string(),
            "\u{0}\u{0}\u{0}".to_string(),
        ] {
            std::fs::write(p.path(), &bad).unwrap();
            assert!(
                matches!(p.take_interrupted(), Err(PersistError::Format { .. })),
                "{bad:?}"
            );
        }
        let f = File::create(p.path()).unwrap();
        f.set_len(MAX_FILE + 1).unwrap();
        assert!(matches!(
            p.take_interrupted(),
            Err(PersistError::Format { .. })
        ));
        // After an error, the journal's next use starts it over.
        let fresh = Persist::new(dir.path());
        fresh.add(&record(3)).unwrap();
        assert_eq!(
            ids(&Persist::new(dir.path()).take_interrupted().unwrap()),
            ids(&[record(3)])
        );
    }

    #[test]
    fn the_legacy_file_is_taken_once_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let p = Persist::new(dir.path());
        let old = vec![record(1), record(2)];
        std::fs::write(p.legacy_path(), serde_json::to_vec_pretty(&old).unwrap()).unwrap();
        assert_eq!(p.take_interrupted().unwrap(), old);
        assert!(!p.legacy_path().exists());
        assert!(p.take_interrupted().unwrap().is_empty());
    }

    #[test]
    fn concurrent_adds_and_ends_share_syncs_and_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = Persist::new(dir.path());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let p = p.clone();
                std::thread::spawn(move || {
                    for i in 0..200 {
                        let r = record(t * 1000 + i);
                        p.add(&r).unwrap();
                        if i % 2 == 0 {
                            p.end(&r.view.id).unwrap();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut left = ids(&Persist::new(dir.path()).take_interrupted().unwrap());
        left.sort();
        let mut want: Vec<String> = (0..8)
            .flat_map(|t| (0..200).filter(|i| i % 2 == 1).map(move |i| t * 1000 + i))
            .map(|i| record(i).view.id)
            .collect();
        want.sort();
        assert_eq!(left, want);
    }
}
