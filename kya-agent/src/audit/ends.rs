//! Whether every decision in a log ended: each decision id has exactly one
//! final record (`decision`, `approved`, `rejected`, `expired`, `cancelled`,
//! `interrupted`, `control_refused`); a `hold` is the only record that does
//! not end its decision.
//!
//! A hold without a final record is one of two things:
//! * **open**: the daemon may still be waiting for an answer (the live tail
//!   of a running daemon). Reported, not a finding.
//! * **unended**: it cannot still be pending, and its end is missing: a
//!   finding. A hold is unended when the log goes on more than
//!   [`MAX_PENDING`] past it (no hold lasts that long, whatever the policy),
//!   or when the caller says the log is closed (`kya audit verify --closed`:
//!   the daemon is stopped, and a stopped daemon leaves no hold open: it ends
//!   held calls as `interrupted` at shutdown, or at its next start when it
//!   was killed).
//!
//! A decision id with more than one final record is always a finding.

use super::event::EventKind;
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use time::OffsetDateTime;

/// Longer than any hold can be pending: the longest hold timeout a policy
/// accepts, plus a minute of slack.
pub(crate) const MAX_PENDING: std::time::Duration =
    std::time::Duration::from_secs(crate::policy::load::MAX_HOLD_TIMEOUT.as_secs() + 60);

/// Where a record is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct At {
    pub decision_id: String,
    pub file: PathBuf,
    /// 1-based line.
    pub line: u64,
}

impl std::fmt::Display for At {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}: decision {}",
            self.file.display(),
            self.line,
            self.decision_id
        )
    }
}

/// What [`Ends`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndsReport {
    /// Holds that may still be pending (no finding).
    pub open: Vec<At>,
    /// Holds that cannot be pending and never ended (finding).
    pub unended: Vec<At>,
    /// Final records of a decision that had already ended (finding; `At` is
    /// the repeated record).
    pub repeated: Vec<At>,
    /// Records whose event could not be read for this check.
    pub unparsed: u64,
}

impl EndsReport {
    /// Whether anything is wrong.
    pub fn has_findings(&self) -> bool {
        !self.unended.is_empty() || !self.repeated.is_empty()
    }
}

#[derive(Deserialize)]
struct Line {
    event: Event,
}

#[derive(Deserialize)]
struct Event {
    decision_id: String,
    kind: EventKind,
    #[serde(with = "time::serde::rfc3339")]
    time: OffsetDateTime,
}

/// Follows the records of a log, in order.
#[derive(Default, Clone)]
pub(crate) struct Ends {
    /// Holds not ended yet: id → (where, when).
    held: HashMap<String, (At, OffsetDateTime)>,
    /// Decisions that ended (compact keys: kya's ids are 64-bit hex).
    ended: HashSet<u64>,
    repeated: Vec<At>,
    unparsed: u64,
    latest: Option<OffsetDateTime>,
}

impl Ends {
    /// Note one record line (its chain already checked).
    pub(crate) fn note(&mut self, line: &[u8], file: &Path, line_no: u64) {
        let Ok(Line { event }) = serde_json::from_slice::<Line>(line) else {
            self.unparsed += 1;
            return;
        };
        self.latest = Some(self.latest.map_or(event.time, |t| t.max(event.time)));
        let at = || At {
            decision_id: event.decision_id.clone(),
            file: file.to_path_buf(),
            line: line_no,
        };
        if !event.kind.is_final() {
            self.held
                .insert(event.decision_id.clone(), (at(), event.time));
            return;
        }
        self.held.remove(&event.decision_id);
        if !self.ended.insert(key(&event.decision_id)) {
            self.repeated.push(at());
        }
    }

    /// The verdict on the whole log; `closed`: no hold may still be pending.
    pub(crate) fn finish(self, closed: bool) -> EndsReport {
        let mut report = EndsReport {
            repeated: self.repeated,
            unparsed: self.unparsed,
            ..EndsReport::default()
        };
        let mut held: Vec<(At, OffsetDateTime)> = self.held.into_values().collect();
        held.sort_by(|a, b| (&a.0.file, a.0.line).cmp(&(&b.0.file, b.0.line)));
        for (at, when) in held {
            let stale = self
                .latest
                .is_some_and(|latest| latest - when > MAX_PENDING);
            if closed || stale {
                report.unended.push(at);
            } else {
                report.open.push(at);
            }
        }
        report
    }
}

/// Which of `ids` already have a final record in the log whose live file is
/// `base` (its rotated files included). Lines that cannot be read as records
/// are skipped; a missing log has none.
pub(crate) fn ended_among(base: &Path, ids: &HashSet<String>) -> std::io::Result<HashSet<String>> {
    use std::io::BufRead;
    let mut found = HashSet::new();
    if ids.is_empty() {
        return Ok(found);
    }
    let mut paths: Vec<PathBuf> = super::files::rotated(base)?
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    paths.push(base.to_path_buf());
    let mut buf = Vec::new();
    for path in paths {
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mut reader = std::io::BufReader::with_capacity(64 * 1024, file);
        loop {
            buf.clear();
            if reader.read_until(b'\n', &mut buf)? == 0 {
                break;
            }
            if let Ok(Line { event }) = serde_json::from_slice::<Line>(&buf) {
                if event.kind.is_final() && ids.contains(&event.decision_id) {
                    found.insert(event.decision_id);
                }
            }
        }
    }
    Ok(found)
}

/// A compact key for a decision id: `dec_` + 16 hex digits is the number
/// itself; anything else is hashed.
fn key(id: &str) -> u64 {
    if let Some(hex) = id.strip_prefix("dec_") {
        if hex.len() == 16 {
            if let Ok(n) = u64::from_str_radix(hex, 16) {
                return n;
            }
        }
    }
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(id.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::event::tests::sample;

    fn line(kind: EventKind, id: &str, time: OffsetDateTime) -> Vec<u8> {
        let mut e = sample(kind, 1);
        e.decision_id = id.into();
        e.time = time;
        serde_json::to_vec(&serde_json::json!({"seq": 0, "prev": "00", "event": e})).unwrap()
    }

    #[test]
    fn holds_end_once_and_open_ones_are_told_apart() {
        let t0 = OffsetDateTime::now_utc();
        let f = Path::new("audit.jsonl");
        let mut ends = Ends::default();
        let recs = [
            line(EventKind::Decision, "dec_0000000000000001", t0),
            line(EventKind::Hold, "dec_0000000000000002", t0),
            line(EventKind::Approved, "dec_0000000000000002", t0),
            line(EventKind::Hold, "dec_0000000000000003", t0),
            line(EventKind::Hold, "dec_0000000000000004", t0),
            line(EventKind::Cancelled, "dec_0000000000000004", t0),
            line(EventKind::Interrupted, "dec_0000000000000004", t0),
        ];
        for (i, r) in recs.iter().enumerate() {
            ends.note(r, f, i as u64 + 1);
        }
        let report = ends.clone().finish(false);
        assert_eq!(report.open.len(), 1, "{report:?}");
        assert_eq!(report.open[0].decision_id, "dec_0000000000000003");
        assert!(report.unended.is_empty());
        assert_eq!(report.repeated.len(), 1);
        assert_eq!(report.repeated[0].line, 7);
        assert!(report.has_findings(), "a second final record is a finding");

        let closed = ends.finish(true);
        assert_eq!(closed.unended.len(), 1);
        assert_eq!(closed.unended[0].line, 4);
        assert!(closed.open.is_empty());
    }

    #[test]
    fn a_hold_the_log_outlived_is_unended_even_while_live() {
        let t0 = OffsetDateTime::now_utc();
        let f = Path::new("audit.jsonl");
        let mut ends = Ends::default();
        ends.note(&line(EventKind::Hold, "dec_00000000000000aa", t0), f, 1);
        let later = t0 + MAX_PENDING + time::Duration::seconds(1);
        ends.note(
            &line(EventKind::Decision, "dec_00000000000000ab", later),
            f,
            2,
        );
        let report = ends.finish(false);
        assert_eq!(report.unended.len(), 1);
        assert!(report.open.is_empty());
    }

    #[test]
    fn odd_ids_and_garbage_do_not_panic() {
        let f = Path::new("x");
        let mut ends = Ends::default();
        ends.note(b"not json", f, 1);
        ends.note(br#"{"event":{"decision_id":"x","kind":"nope"}}"#, f, 2);
        let t = OffsetDateTime::now_utc();
        ends.note(&line(EventKind::Decision, "odd-id", t), f, 3);
        ends.note(&line(EventKind::Decision, "odd-id", t), f, 4);
        let r = ends.finish(true);
        assert_eq!(r.repeated.len(), 1);
        assert_eq!(r.unparsed, 2);
    }
}
