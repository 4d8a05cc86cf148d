//! Offline verification of an audit log (one file or a rotated set) against
//! its checkpoint file: the work behind `kya audit verify`, also run by the
//! writer when it reopens an existing log.
//!
//! What is checked, in order:
//! 1. every checkpoint in `<log>.checkpoints` parses, carries a valid Ed25519
//!    signature by the trusted key, names the same origin, and sizes never shrink;
//! 2. every record line is valid, has the next `seq`, and its `prev` is the
//!    SHA-256 of the line before it (across file boundaries);
//! 3. when the recomputed tree reaches a checkpoint's size, its root must equal
//!    the signed root: the signed checkpoints are therefore consistent with each
//!    other and with the file (an RFC 6962 consistency proof between two
//!    checkpoints would show the same thing; recomputing is stronger);
//! 4. the log is at least as long as the last checkpoint (truncation below it is
//!    detected). Records after the last checkpoint are protected by the chain
//!    alone: they can be cut off the end undetected until the next checkpoint.
//!
//! The first fault stops verification and names its file and 1-based line.

use super::checkpoint::{self, Checkpoint, SignedNote};
use super::ends::{Ends, EndsReport};
use super::files;
use super::merkle::Hash;
use super::record::{read_line, Chain, LineStatus, MAX_LINE_BYTES};
use ed25519_dalek::VerifyingKey;
use std::fmt;
use std::io::BufReader;
use std::path::{Path, PathBuf};

/// Checkpoint files bigger than this are refused rather than read into memory.
pub const MAX_CHECKPOINT_FILE_BYTES: u64 = 256 << 20;

/// Which key checkpoints must be signed by.
#[derive(Debug, Clone)]
pub enum TrustedKey {
    /// This key and only this key (`--key`, or kya's own key in the state dir).
    Pinned(VerifyingKey),
    /// The key named in the checkpoints' `kya-vkey` line: proves the log is
    /// intact relative to that key, not who signed it.
    Embedded,
}

/// Options for [`verify`].
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    pub key: TrustedKey,
    /// The checkpoint file; default: beside the last file, `<base>.checkpoints`.
    pub checkpoints: Option<PathBuf>,
    /// Accept an incomplete final line in the last file (a write cut short by a
    /// crash; it was never acknowledged) and report it instead of failing.
    pub allow_torn_tail: bool,
    /// Also check that every decision ended (`Some(closed)`; see
    /// [`super::ends`]); the writer's own check at open does not.
    pub ends: Option<bool>,
}

/// A verification failure: where, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub file: PathBuf,
    /// 1-based line; 0 when the fault concerns the file as a whole.
    pub line: u64,
    pub what: String,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.what)
        } else {
            write!(f, "{}:{}: {}", self.file.display(), self.line, self.what)
        }
    }
}

impl std::error::Error for Fault {}

/// An incomplete final line that was tolerated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    pub file: PathBuf,
    pub line: u64,
    /// Byte offset where the incomplete line starts (the writer truncates here).
    pub offset: u64,
}

/// What a successful verification established.
#[derive(Debug, Clone)]
pub struct Report {
    pub files: Vec<PathBuf>,
    pub records: u64,
    pub checkpoints: usize,
    /// Size covered by the last checkpoint.
    pub last_checkpoint: Option<u64>,
    pub origin: Option<String>,
    /// `name (key id)` of the key the checkpoints were verified with.
    pub signer: Option<String>,
    pub root: Hash,
    pub chain: Chain,
    pub torn_tail: Option<TornTail>,
    /// An incomplete final checkpoint that was tolerated (crash mid-write).
    pub torn_checkpoint: Option<checkpoint::TornNote>,
    pub checkpoint_file: PathBuf,
    /// Whether every decision ended (see [`super::ends`]); `None` unless
    /// [`VerifyOptions::ends`] asked for it.
    pub ends: Option<EndsReport>,
}

struct Expected {
    size: u64,
    root: Hash,
    line: u64,
}

/// Verify `files` (in chain order) against their checkpoint file.
pub fn verify(files: &[PathBuf], opts: &VerifyOptions) -> Result<Report, Fault> {
    let Some(last) = files.last() else {
        return Err(Fault {
            file: PathBuf::from("-"),
            line: 0,
            what: "no files to verify".into(),
        });
    };
    let ck_path = opts
        .checkpoints
        .clone()
        .unwrap_or_else(|| files::checkpoints_path(&files::base_of(last)));
    let Loaded {
        expected,
        origin,
        signer,
        torn: torn_checkpoint,
    } = load_checkpoints(&ck_path, &opts.key, opts.allow_torn_tail)?.unwrap_or_default();
    let have_checkpoint_file = !expected.is_empty() || ck_path.exists();

    let mut chain = Chain::default();
    let mut next_expected = 0usize;
    let mut check = |chain: &Chain, file: &Path, line: u64| -> Result<(), Fault> {
        while let Some(e) = expected.get(next_expected) {
            if e.size != chain.tree.size() {
                break;
            }
            if e.root != chain.tree.root() {
                return Err(Fault {
                    file: file.to_path_buf(),
                    line,
                    what: format!(
                        "the tree of the first {} records does not match the signed checkpoint at {}:{}: a record at or before this line was altered",
                        e.size,
                        ck_path.display(),
                        e.line
                    ),
                });
            }
            next_expected += 1;
        }
        Ok(())
    };
    check(&chain, files.first().unwrap_or(last), 0)?;

    let mut ends = opts.ends.map(|_| Ends::default());
    let mut torn_tail = None;
    let mut last_pos: (PathBuf, u64) = (last.clone(), 0);
    let mut buf = Vec::new();
    for (index, path) in files.iter().enumerate() {
        let is_last = index + 1 == files.len();
        let file = std::fs::File::open(path).map_err(|e| Fault {
            file: path.clone(),
            line: 0,
            what: format!("cannot open: {e}"),
        })?;
        let mut reader = BufReader::with_capacity(64 * 1024, file);
        let mut line_no = 0u64;
        let mut offset = 0u64;
        loop {
            let status = read_line(&mut reader, &mut buf, MAX_LINE_BYTES).map_err(|e| Fault {
                file: path.clone(),
                line: line_no + 1,
                what: format!("read error: {e}"),
            })?;
            let fault = |what: String| Fault {
                file: path.clone(),
                line: line_no + 1,
                what,
            };
            match status {
                LineStatus::Eof => break,
                LineStatus::TooLong => {
                    return Err(fault(format!("record longer than {MAX_LINE_BYTES} bytes")));
                }
                LineStatus::Unterminated => {
                    if is_last && opts.allow_torn_tail {
                        torn_tail = Some(TornTail {
                            file: path.clone(),
                            line: line_no + 1,
                            offset,
                        });
                        break;
                    }
                    return Err(fault(
                        "incomplete record: the line has no newline (cut mid-write or truncated)"
                            .into(),
                    ));
                }
                LineStatus::Complete => {
                    chain.accept(&buf).map_err(&fault)?;
                    line_no += 1;
                    if let Some(ends) = ends.as_mut() {
                        ends.note(&buf, path, line_no);
                    }
                    offset += buf.len() as u64 + 1;
                    last_pos = (path.clone(), line_no);
                    check(&chain, path, line_no)?;
                }
            }
        }
    }

    let records = chain.tree.size();
    if let Some(e) = expected.get(next_expected) {
        return Err(Fault {
            file: last_pos.0,
            line: last_pos.1 + 1,
            what: format!(
                "log truncated: it ends after {records} records but the signed checkpoint at {}:{} covers {}",
                ck_path.display(),
                e.line,
                e.size
            ),
        });
    }
    if !have_checkpoint_file && records > 0 {
        return Err(Fault {
            file: ck_path,
            line: 0,
            what: "checkpoint file missing: truncation and rewriting of the log cannot be detected"
                .into(),
        });
    }
    Ok(Report {
        files: files.to_vec(),
        records,
        checkpoints: next_expected,
        last_checkpoint: next_expected
            .checked_sub(1)
            .and_then(|i| expected.get(i))
            .map(|e| e.size),
        origin,
        signer,
        root: chain.tree.root(),
        chain,
        torn_tail,
        torn_checkpoint,
        checkpoint_file: ck_path,
        ends: ends.map(|e| e.finish(opts.ends.unwrap_or(false))),
    })
}

#[derive(Default)]
struct Loaded {
    expected: Vec<Expected>,
    origin: Option<String>,
    signer: Option<String>,
    torn: Option<checkpoint::TornNote>,
}

/// Read, parse and authenticate every checkpoint. `Ok(None)`: no file.
fn load_checkpoints(
    path: &Path,
    key: &TrustedKey,
    allow_torn_tail: bool,
) -> Result<Option<Loaded>, Fault> {
    let fault = |line: u64, what: String| Fault {
        file: path.to_path_buf(),
        line,
        what,
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(fault(0, format!("cannot read: {e}"))),
    };
    if meta.len() > MAX_CHECKPOINT_FILE_BYTES {
        return Err(fault(
            0,
            format!("larger than {MAX_CHECKPOINT_FILE_BYTES} bytes"),
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| fault(0, format!("cannot read: {e}")))?;
    let text = checkpoint_text(bytes).map_err(|line| fault(line, "not UTF-8".into()))?;
    let parsed = checkpoint::parse_file(&text).map_err(|f| fault(f.line, f.what))?;
    if let Some(torn) = parsed.torn {
        if !allow_torn_tail {
            return Err(fault(
                torn.line,
                "incomplete final checkpoint (a write cut short by a crash; kya removes it when it next opens the log)".into(),
            ));
        }
    }
    let notes = parsed.notes;
    if notes.is_empty() {
        return Err(fault(0, "no checkpoints in the checkpoint file".into()));
    }

    let mut expected: Vec<Expected> = Vec::with_capacity(notes.len());
    let mut origin: Option<String> = None;
    let mut anchor: Option<(String, VerifyingKey)> = None;
    for n in &notes {
        let cp = Checkpoint::parse_body(&n.note.body).map_err(|e| fault(n.line, e.to_string()))?;
        let (name, vk) = match key {
            TrustedKey::Pinned(vk) => {
                let name = signer_name(&n.note, vk).ok_or_else(|| {
                    fault(
                        n.line,
                        format!(
                            "checkpoint is not signed by the trusted key (signatures present: {})",
                            describe_sigs(&n.note)
                        ),
                    )
                })?;
                (name, *vk)
            }
            TrustedKey::Embedded => {
                let embedded = cp
                    .embedded_key()
                    .ok_or_else(|| {
                        fault(
                            n.line,
                            "checkpoint names no key (kya-vkey line) and no key was given".into(),
                        )
                    })?
                    .map_err(|e| fault(n.line, e.to_string()))?;
                match &anchor {
                    None => anchor = Some(embedded.clone()),
                    Some(a) if *a != embedded => {
                        return Err(fault(
                            n.line,
                            "checkpoint names a different key than the first checkpoint".into(),
                        ));
                    }
                    Some(_) => {}
                }
                embedded
            }
        };
        n.note
            .verify(&name, &vk)
            .map_err(|e| fault(n.line, e.to_string()))?;
        match &origin {
            None => origin = Some(cp.origin.clone()),
            Some(o) if *o != cp.origin => {
                return Err(fault(
                    n.line,
                    format!("origin {:?} differs from {:?}", cp.origin, o),
                ));
            }
            Some(_) => {}
        }
        if let Some(prev) = expected.last() {
            if cp.size < prev.size {
                return Err(fault(
                    n.line,
                    format!(
                        "tree size {} is smaller than the previous checkpoint's {}",
                        cp.size, prev.size
                    ),
                ));
            }
        }
        if anchor.is_none() {
            anchor = Some((name.clone(), vk));
        }
        expected.push(Expected {
            size: cp.size,
            root: cp.root,
            line: n.line,
        });
    }
    let signer = anchor.map(|(name, vk)| {
        format!(
            "{name} (key id {})",
            hex::encode(checkpoint::key_id(&name, &vk))
        )
    });
    Ok(Some(Loaded {
        expected,
        origin,
        signer,
        torn: parsed.torn,
    }))
}

/// The file as text. A write cut short inside the em dash of a signature line
/// leaves an incomplete UTF-8 sequence at the very end: dropped here, so the
/// parser sees the plausible torn prefix. Anything else that is not UTF-8 is an
/// error at its (1-based) line.
fn checkpoint_text(bytes: Vec<u8>) -> Result<String, u64> {
    match String::from_utf8(bytes) {
        Ok(t) => Ok(t),
        Err(e) => {
            let upto = e.utf8_error().valid_up_to();
            let bytes = e.into_bytes();
            let rest = &bytes[upto..];
            let dash = checkpoint::SIG_PREFIX.as_bytes();
            if is_cut_em_dash(rest, dash) {
                // valid up to `upto` by construction
                return String::from_utf8(bytes[..upto].to_vec()).map_err(|_| 1);
            }
            Err(bytes[..upto].iter().filter(|&&b| b == b'\n').count() as u64 + 1)
        }
    }
}

fn is_cut_em_dash(rest: &[u8], dash: &[u8]) -> bool {
    !rest.is_empty() && rest.len() < 3 && dash.starts_with(rest)
}

/// The name under which `key` signed `note`, if it did (key ids bind name and key).
fn signer_name(note: &SignedNote, key: &VerifyingKey) -> Option<String> {
    note.signatures
        .iter()
        .find(|s| s.key_id == checkpoint::key_id(&s.name, key))
        .map(|s| s.name.clone())
}

fn describe_sigs(note: &SignedNote) -> String {
    note.signatures
        .iter()
        .map(|s| format!("{} key id {}", s.name, hex::encode(s.key_id)))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::event::tests::sample;
    use crate::audit::event::EventKind;
    use crate::audit::writer::{AuditConfig, AuditLog, Durability};
    use ed25519_dalek::SigningKey;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[11; 32])
    }

    /// A small event: the exhaustive test below verifies once per byte.
    fn sparse(n: u64) -> crate::audit::DecisionEvent {
        let mut e = sample(EventKind::Decision, n);
        e.process = Default::default();
        e.destination = Default::default();
        e.mcp = crate::audit::event::McpInfo {
            method: "tools/call".into(),
            ..Default::default()
        };
        e
    }

    async fn small_log(dir: &Path, records: u64) -> PathBuf {
        let mut cfg = AuditConfig::new(dir.join("audit.jsonl"));
        cfg.origin = Some("unit/kya-audit".into());
        cfg.checkpoint_every = 3;
        let log = AuditLog::open(cfg, key()).unwrap();
        for n in 0..records {
            log.append(&sparse(n), Durability::Sync).await.unwrap();
        }
        log.close().unwrap();
        dir.join("audit.jsonl")
    }

    fn opts(torn: bool) -> VerifyOptions {
        VerifyOptions {
            ends: None,
            key: TrustedKey::Pinned(key().verifying_key()),
            checkpoints: None,
            allow_torn_tail: torn,
        }
    }

    /// Every single byte of the log and of the checkpoint file, flipped: verification
    /// fails every time, even in the permissive mode that tolerates a torn tail
    /// (strict mode only adds faults). One mask per byte keeps this affordable in
    /// debug builds, where each Ed25519 verification costs milliseconds.
    #[tokio::test]
    async fn flipping_every_byte_of_log_and_checkpoints_fails() {
        let dir = tempfile::tempdir().unwrap();
        let log = small_log(dir.path(), 2).await;
        let ck = files::checkpoints_path(&log);
        let report = verify(std::slice::from_ref(&log), &opts(false)).unwrap();
        assert_eq!((report.records, report.last_checkpoint), (2, Some(2)));
        for path in [&log, &ck] {
            let original = std::fs::read(path).unwrap();
            for pos in 0..original.len() {
                let mut bytes = original.clone();
                bytes[pos] ^= if pos % 2 == 0 { 0x01 } else { 0x80 };
                std::fs::write(path, &bytes).unwrap();
                assert!(
                    verify(std::slice::from_ref(&log), &opts(true)).is_err(),
                    "{}: byte {pos} flipped and still verified",
                    path.display()
                );
            }
            std::fs::write(path, &original).unwrap();
        }
        verify(std::slice::from_ref(&log), &opts(false)).unwrap();
    }

    #[tokio::test]
    async fn faults_name_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = small_log(dir.path(), 6).await;
        let text = std::fs::read_to_string(&log).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        lines.remove(2);
        std::fs::write(&log, lines.join("\n") + "\n").unwrap();
        let f = verify(std::slice::from_ref(&log), &opts(false)).unwrap_err();
        assert_eq!((f.file.as_path(), f.line), (log.as_path(), 3));
        assert_eq!(
            f.to_string(),
            format!("{}:3: {}", log.display(), f.what),
            "rendered as file:line: what"
        );
        assert!(verify(&[], &opts(false)).is_err());
    }

    #[tokio::test]
    async fn embedded_key_mode_requires_one_consistent_key() {
        let dir = tempfile::tempdir().unwrap();
        let log = small_log(dir.path(), 4).await;
        let embedded = VerifyOptions {
            ends: None,
            key: TrustedKey::Embedded,
            checkpoints: None,
            allow_torn_tail: false,
        };
        let r = verify(std::slice::from_ref(&log), &embedded).unwrap();
        assert!(r.signer.unwrap().starts_with("unit/kya-audit (key id "));
        // Append a checkpoint signed (validly) by another key naming itself.
        let other = SigningKey::from_bytes(&[12; 32]);
        let cp = checkpoint::Checkpoint {
            origin: "unit/kya-audit".into(),
            size: 4,
            root: r.root,
            extensions: vec![format!(
                "{}{}",
                checkpoint::VKEY_EXTENSION,
                checkpoint::verifier_key("unit/kya-audit", &other.verifying_key())
            )],
        };
        let note = checkpoint::sign(&cp.body(), "unit/kya-audit", &other).unwrap();
        let ck = files::checkpoints_path(&log);
        let mut text = std::fs::read_to_string(&ck).unwrap();
        text.push_str(&note.render());
        std::fs::write(&ck, text).unwrap();
        let f = verify(std::slice::from_ref(&log), &embedded).unwrap_err();
        assert!(f.what.contains("different key"), "{f}");
        assert!(verify(std::slice::from_ref(&log), &opts(false)).is_err());
    }
}
