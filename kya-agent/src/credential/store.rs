//! The persisted credential state in `STATE_DIR/credentials/`:
//!
//! * `revoked.json`: revoked credential ids (`kya credential revoke`);
//! * `spent.log`: single-use credential ids already used (replay protection),
//!   append-only (below);
//! * `standing.json`: standing credentials issued ahead of time, which the
//!   decision path queries ("is there a valid credential covering this call?").
//!
//! Several processes share these files (the daemon, and offline `kya credential`
//! commands), so every change is made under an exclusive `flock` on
//! `credentials/lock`. `revoked.json` and `standing.json` (rare changes) are
//! read-modify-written atomically (temp file, fsync, rename, fsync of the
//! directory): a crash leaves the old or the new file, never a torn one.
//! Readers re-read a file when its identity (inode, size, mtime, ctime)
//! changed, so a revocation written by another process is seen on the next
//! call with one `stat`.
//!
//! # The spent log
//!
//! Spending happens on every approval, so it must not cost a rewrite of every
//! spent id. `spent.log` is a text file: the header line `kya-spent 1`, then
//! one line per spent id, `UNTIL ID\n` (`UNTIL`: Unix seconds after which the
//! credential is expired, so keeping its id is pointless; `ID` has no
//! whitespace or control characters, see [`MAX_ID_LEN`]).
//!
//! [`CredentialStore::spend`], under the `flock`: reads the lines other
//! processes appended since its last read (or the whole file when it was
//! replaced), refuses an id already there, appends the new line and
//! `fdatasync`s it before returning. The check and the record are therefore
//! one atomic step across processes, and a spent id survives a crash: a spend
//! that returned is on disk. Readers ([`CredentialStore::is_spent`],
//! [`CredentialStore::find_covering`]) keep the set in memory and read only
//! the file's new tail when its size or inode changed.
//!
//! A crash in the middle of an append leaves a torn last line (no `\n`): it
//! was never acknowledged, so readers ignore it and the next spender (holding
//! the lock, so certain no append is in progress) truncates it away. Any other
//! malformed line, a bad header, or a file larger than [`MAX_SPENT_LOG_BYTES`]
//! is an error, and callers fail closed on it (nothing is spent, so nothing is
//! released).
//!
//! When the log holds many more lines than unexpired ids (`2 × live + 1024`),
//! a spend compacts it under the lock: the unexpired ids are rewritten
//! atomically (temp file, fsync, rename, directory fsync); other processes see
//! the new inode and re-read it whole. An existing `spent.json` (the earlier
//! whole-file format) is merged into the log by the first spend and removed;
//! until then readers consult it too.
//!
//! Entries expire with their credential (an expired credential fails its window
//! check anyway), which keeps the files bounded; revocations are pruned on each
//! write, spent ids by compaction (and in memory, as of the latest spend's
//! clock). A corrupt or oversized file is an error, and callers fail closed on it.

use super::action::ActionCredential;
use super::jcs;
use super::proof::{self, ASSERTION_METHOD};
use ed25519_dalek::VerifyingKey;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use time::OffsetDateTime;

/// Subdirectory of the state dir holding the credential files.
pub const DIR_NAME: &str = "credentials";
const REVOKED_FILE: &str = "revoked.json";
/// The earlier whole-file spent list, merged into [`SPENT_LOG`] and removed.
const SPENT_LEGACY: &str = "spent.json";
const SPENT_LOG: &str = "spent.log";
const SPENT_HEADER: &[u8] = b"kya-spent 1\n";
/// Largest spent log read (about [`MAX_IDS`] longest ids, with compaction slack).
pub const MAX_SPENT_LOG_BYTES: u64 = 64 * 1024 * 1024;
/// Lines beyond twice the live ids tolerated before a compaction.
const SPENT_SLACK_LINES: u64 = 1024;
const STANDING_FILE: &str = "standing.json";
const LOCK_FILE: &str = "lock";
/// Largest store file read: bounds memory on a hostile or runaway file.
pub const MAX_FILE_BYTES: usize = 16 * 1024 * 1024;
/// Most ids a revocation or spent list holds (after pruning expired ones).
pub const MAX_IDS: usize = 100_000;
/// Most standing credentials held at once.
pub const MAX_STANDING: usize = 1024;
/// Longest credential id accepted.
pub const MAX_ID_LEN: usize = 256;

/// Errors of the credential store. Callers deciding a call treat any of them
/// as "not covered" / "refused" (fail closed).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: corrupt credential store file: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("{what} is full ({max} entries)")]
    Full { what: &'static str, max: usize },
    #[error("credential {0} was already used")]
    AlreadySpent(String),
    #[error("cannot lock {path}: {message}")]
    Lock { path: PathBuf, message: String },
    #[error("invalid credential id: {0}")]
    BadId(String),
}

/// One id with the time after which keeping it is pointless.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdEntry {
    id: String,
    /// Unix seconds; `None`: kept until explicitly removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    until: Option<i64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdFile {
    version: u32,
    entries: Vec<IdEntry>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StandingFile {
    version: u32,
    credentials: Vec<Value>,
}

/// A standing credential as loaded: its document, its meaning, and the key
/// that signed it (checked against the trusted key at query time).
#[derive(Debug, Clone)]
pub struct Standing {
    pub document: Value,
    pub credential: ActionCredential,
    pub signer: VerifyingKey,
}

/// A standing credential that covers a call.
#[derive(Debug, Clone)]
pub struct Covering {
    pub credential: ActionCredential,
    pub document: Value,
}

/// Identity of a file's current version.
type Stamp = (u64, u64, i64, i64, i64, i64);

#[derive(Default)]
struct Cached<T> {
    stamp: Option<Stamp>,
    value: T,
}

#[derive(Default)]
struct Cache {
    revoked: Cached<BTreeMap<String, Option<i64>>>,
    standing: Cached<Vec<Standing>>,
}

/// The spent ids as this process knows them: the log read up to `offset`.
#[derive(Default)]
struct Spent {
    /// (device, inode) of the log read, with a handle on it.
    file_id: Option<(u64, u64)>,
    file: Option<std::fs::File>,
    /// Bytes read: through the last complete line.
    offset: u64,
    /// The file's length when last looked at (a torn tail is beyond `offset`).
    seen_len: u64,
    /// Lines in the file (header included).
    lines: u64,
    /// Line count at which the next spend prunes and considers compacting.
    check_at: u64,
    /// Spent ids with their expiry (Unix seconds).
    ids: HashMap<String, i64>,
    /// The latest clock a spend ran at: ids that expired before are as
    /// good as pruned (an expired credential fails its window check anyway).
    horizon: Option<i64>,
    /// The legacy `spent.json`, while it exists.
    legacy: Cached<BTreeMap<String, Option<i64>>>,
}

/// Handle on `STATE_DIR/credentials/`.
pub struct CredentialStore {
    dir: PathBuf,
    cache: Mutex<Cache>,
    spent: Mutex<Spent>,
}

impl CredentialStore {
    /// Open (creating, mode 0700) the store under `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        let dir = state_dir.join(DIR_NAME);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io(&dir))?;
        Ok(CredentialStore {
            dir,
            cache: Mutex::new(Cache::default()),
            spent: Mutex::new(Spent::default()),
        })
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Revoke `id`. Returns false when it was already revoked. When the id is
    /// a standing credential, its entry is dropped from the standing store too.
    pub fn revoke(&self, id: &str, now: OffsetDateTime) -> Result<bool, StoreError> {
        check_id(id)?;
        let _lock = self.lock()?;
        // A broken standing file must never block a revocation: then the id is
        // kept without expiry, and the standing entry is left to fail later.
        let standing = self.load_standing_file().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "revoking without reading the standing credentials");
            Vec::new()
        });
        let until = standing
            .iter()
            .find(|s| s.credential.id == id)
            .map(|s| s.credential.valid_until.unix_timestamp());
        let path = self.dir.join(REVOKED_FILE);
        let mut ids = read_ids(&path)?;
        prune(&mut ids, now);
        if ids.contains_key(id) {
            return Ok(false);
        }
        if ids.len() >= MAX_IDS {
            return Err(StoreError::Full {
                what: "revocation list",
                max: MAX_IDS,
            });
        }
        ids.insert(id.to_owned(), until);
        write_ids(&path, &ids)?;
        if standing.iter().any(|s| s.credential.id == id) {
            // Revocation is already durable; tidying the standing file is best effort.
            if let Err(e) = self.remove_standing_locked(id, now) {
                tracing::warn!(id, error = %e, "revoked, but could not drop it from the standing file");
            }
        }
        tracing::info!(id, "credential revoked");
        Ok(true)
    }

    /// Whether `id` is revoked (re-reading the list if another process changed it).
    pub fn is_revoked(&self, id: &str) -> Result<bool, StoreError> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let path = self.dir.join(REVOKED_FILE);
        refresh(&path, &mut cache.revoked, read_ids)?;
        Ok(cache.revoked.value.contains_key(id))
    }

    /// Whether the single-use credential `id` was already used.
    pub fn is_spent(&self, id: &str) -> Result<bool, StoreError> {
        let mut spent = self.lock_spent();
        self.refresh_spent(&mut spent, false)?;
        Ok(spent.contains(id))
    }

    /// Spend a single-use credential: atomically check it is unused and record
    /// it (durably, before returning) until `until`.
    pub fn spend(
        &self,
        id: &str,
        until: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        check_id(id)?;
        let _lock = self.lock()?;
        let mut spent = self.lock_spent();
        self.migrate_spent(&mut spent)?;
        self.refresh_spent(&mut spent, true)?;
        if spent.contains(id) {
            return Err(StoreError::AlreadySpent(id.to_owned()));
        }
        let now = now.unix_timestamp();
        spent.horizon = Some(spent.horizon.map_or(now, |h| h.max(now)));
        if spent.ids.len() >= MAX_IDS || spent.lines >= spent.check_at {
            // Every so often (amortized O(1) per spend): prune, and compact
            // when the log is mostly dead lines.
            spent.prune();
            if spent.ids.len() >= MAX_IDS {
                return Err(StoreError::Full {
                    what: "spent-credential list",
                    max: MAX_IDS,
                });
            }
            if spent.lines > 2 * spent.ids.len() as u64 + SPENT_SLACK_LINES {
                self.compact_spent(&mut spent)?;
            }
            spent.check_at = spent.lines + SPENT_SLACK_LINES.max(spent.ids.len() as u64);
        }
        if spent.file.is_none() || spent.offset == 0 {
            // No log yet (or an empty one): start it atomically, with its header.
            self.compact_spent(&mut spent)?;
        }
        let path = self.dir.join(SPENT_LOG);
        let line = format!("{} {id}\n", until.unix_timestamp());
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        if file.metadata().map_err(io(&path))?.ino() != spent.file_id.map_or(0, |f| f.1) {
            // Not reachable under the lock (only lock holders replace the log).
            return Err(StoreError::Lock {
                path,
                message: "the spent log was replaced while locked".into(),
            });
        }
        if let Err(e) = file.write_all(line.as_bytes()) {
            // Never leave a partial line for the next append to follow.
            let _ = file.set_len(spent.offset);
            spent.seen_len = spent.offset;
            return Err(io(&path)(e));
        }
        // From here the id counts as spent, even if the sync fails (fail closed).
        spent.ids.insert(id.to_owned(), until.unix_timestamp());
        spent.offset += line.len() as u64;
        spent.seen_len = spent.offset;
        spent.lines += 1;
        file.sync_data().map_err(io(&path))
    }

    fn lock_spent(&self) -> std::sync::MutexGuard<'_, Spent> {
        self.spent.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bring `spent` up to date with the log: read what was appended since the
    /// last read, or all of it when the file was replaced. `writer` (the flock
    /// is held, so no append is in progress): truncate a torn last line.
    fn refresh_spent(&self, spent: &mut Spent, writer: bool) -> Result<(), StoreError> {
        let legacy = self.dir.join(SPENT_LEGACY);
        refresh(&legacy, &mut spent.legacy, read_ids)?;
        let path = self.dir.join(SPENT_LOG);
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                spent.reset(None, None);
                return Ok(());
            }
            Err(e) => return Err(io(&path)(e)),
        };
        let same = spent.file_id == Some((meta.dev(), meta.ino()));
        // Within one inode the bytes before `offset` never change (appends
        // only; a spender truncates nothing but a torn tail past it), so an
        // unchanged length means nothing new, unless a torn tail was seen: a
        // spender may have replaced it with a line of the same length.
        if same && meta.len() == spent.seen_len && spent.seen_len == spent.offset {
            return Ok(());
        }
        if !same || meta.len() < spent.offset {
            let file = std::fs::File::open(&path).map_err(io(&path))?;
            let m = file.metadata().map_err(io(&path))?;
            spent.reset(Some((m.dev(), m.ino())), Some(file));
        }
        let Some(file) = spent.file.as_ref() else {
            return Ok(());
        };
        let len = file.metadata().map_err(io(&path))?.len();
        if len > MAX_SPENT_LOG_BYTES {
            return Err(StoreError::Corrupt {
                path,
                message: format!("larger than {MAX_SPENT_LOG_BYTES} bytes"),
            });
        }
        let mut buf = vec![0; (len.saturating_sub(spent.offset)) as usize];
        std::os::unix::fs::FileExt::read_exact_at(file, &mut buf, spent.offset)
            .map_err(io(&path))?;
        let complete = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let entries = parse_spent(&path, &buf[..complete], spent.offset == 0)?;
        spent.lines += entries.len() as u64 + u64::from(spent.offset == 0 && complete > 0);
        spent.ids.extend(entries);
        spent.offset += complete as u64;
        spent.seen_len = len;
        if writer && len > spent.offset {
            tracing::warn!(path = %path.display(), "truncating a torn last line of the spent log");
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_len(spent.offset))
                .map_err(io(&path))?;
            spent.seen_len = spent.offset;
        }
        Ok(())
    }

    /// Rewrite the log with the live ids only (atomically), and read it back.
    fn compact_spent(&self, spent: &mut Spent) -> Result<(), StoreError> {
        spent.prune();
        let path = self.dir.join(SPENT_LOG);
        let mut bytes = SPENT_HEADER.to_vec();
        for (id, until) in &spent.ids {
            bytes.extend_from_slice(format!("{until} {id}\n").as_bytes());
        }
        write_atomic(&path, &bytes)?;
        let file = std::fs::File::open(&path).map_err(io(&path))?;
        let m = file.metadata().map_err(io(&path))?;
        let lines = 1 + spent.ids.len() as u64;
        spent.file_id = Some((m.dev(), m.ino()));
        spent.file = Some(file);
        spent.offset = bytes.len() as u64;
        spent.seen_len = spent.offset;
        spent.lines = lines;
        Ok(())
    }

    /// Merge a legacy `spent.json` into the log, then remove it (flock held).
    fn migrate_spent(&self, spent: &mut Spent) -> Result<(), StoreError> {
        let legacy = self.dir.join(SPENT_LEGACY);
        if !legacy.exists() {
            return Ok(());
        }
        let old = read_ids(&legacy)?;
        self.refresh_spent(spent, true)?;
        for (id, until) in old {
            spent.ids.entry(id).or_insert(until.unwrap_or(i64::MAX));
        }
        self.compact_spent(spent)?;
        std::fs::remove_file(&legacy).map_err(io(&legacy))?;
        spent.legacy = Cached::default();
        tracing::info!(path = %legacy.display(), "spent-credential list migrated to spent.log");
        Ok(())
    }

    /// Add a standing credential (already verified by the caller). Adding the
    /// same id twice keeps one copy.
    pub fn add_standing(
        &self,
        document: &Value,
        credential: &ActionCredential,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        check_id(&credential.id)?;
        let _lock = self.lock()?;
        let mut all = self.load_standing_file()?;
        all.retain(|s| s.credential.valid_until > now);
        if all.iter().any(|s| s.credential.id == credential.id) {
            return Ok(());
        }
        if all.len() >= MAX_STANDING {
            return Err(StoreError::Full {
                what: "standing credential store",
                max: MAX_STANDING,
            });
        }
        let mut docs: Vec<Value> = all.into_iter().map(|s| s.document).collect();
        docs.push(document.clone());
        self.write_standing(docs)
    }

    /// All loadable standing credentials (whatever key signed them).
    pub fn standing(&self) -> Result<Vec<Standing>, StoreError> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let path = self.dir.join(STANDING_FILE);
        refresh(&path, &mut cache.standing, read_standing)?;
        Ok(cache.standing.value.clone())
    }

    /// The first standing credential (in issue order) signed by `trusted`,
    /// not revoked, not spent, that `covers` (the call's window, binding and
    /// scope checks: `verify::find_covering`). Finding one does not spend it:
    /// `verify::redeem` does, when the call is released on its strength.
    pub fn find_covering_with(
        &self,
        trusted: &VerifyingKey,
        covers: impl Fn(&ActionCredential) -> bool,
    ) -> Result<Option<Covering>, StoreError> {
        // One lock and at most three `stat`s per query, however many
        // standing credentials there are (this runs on every held call).
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        refresh(
            &self.dir.join(STANDING_FILE),
            &mut cache.standing,
            read_standing,
        )?;
        if cache.standing.value.is_empty() {
            return Ok(None);
        }
        refresh(&self.dir.join(REVOKED_FILE), &mut cache.revoked, read_ids)?;
        let mut spent = self.lock_spent();
        self.refresh_spent(&mut spent, false)?;
        let cache = &*cache;
        let found = cache.standing.value.iter().find(|s| {
            let id = &s.credential.id;
            s.signer == *trusted
                && !cache.revoked.value.contains_key(id)
                && !(s.credential.subject.scope.single_use && spent.contains(id))
                && covers(&s.credential)
        });
        Ok(found.map(|s| Covering {
            credential: s.credential.clone(),
            document: s.document.clone(),
        }))
    }

    /// True when, as far as can be told without waiting, no standing
    /// credential exists: the standing file is absent, or unchanged since it
    /// was read and empty. One `stat`, no file read and no lock wait (a busy
    /// store answers `false`), so the decision path may ask it on an async
    /// worker and skip [`CredentialStore::find_covering`] when it is true.
    pub fn none_standing(&self) -> bool {
        let Ok(cache) = self.cache.try_lock() else {
            return false;
        };
        match stamp(&self.dir.join(STANDING_FILE)) {
            Ok(None) => true,
            Ok(now) => cache.standing.stamp == now && cache.standing.value.is_empty(),
            Err(_) => false,
        }
    }

    fn remove_standing_locked(&self, id: &str, now: OffsetDateTime) -> Result<(), StoreError> {
        let all = self.load_standing_file()?;
        if !all.iter().any(|s| s.credential.id == id) {
            return Ok(());
        }
        let docs = all
            .into_iter()
            .filter(|s| s.credential.id != id && s.credential.valid_until > now)
            .map(|s| s.document)
            .collect();
        self.write_standing(docs)
    }

    fn load_standing_file(&self) -> Result<Vec<Standing>, StoreError> {
        read_standing(&self.dir.join(STANDING_FILE))
    }

    fn write_standing(&self, credentials: Vec<Value>) -> Result<(), StoreError> {
        let file = StandingFile {
            version: 1,
            credentials,
        };
        let path = self.dir.join(STANDING_FILE);
        let bytes = serde_json::to_vec_pretty(&file).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        write_atomic(&path, &bytes)
    }

    fn lock(&self) -> Result<Flock<std::fs::File>, StoreError> {
        let path = self.dir.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io(&path))?;
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| StoreError::Lock {
            path,
            message: errno.to_string(),
        })
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn check_id(id: &str) -> Result<(), StoreError> {
    if id.is_empty()
        || id.len() > MAX_ID_LEN
        || id.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(StoreError::BadId(id.chars().take(80).collect()));
    }
    Ok(())
}

impl Spent {
    /// Whether `id` is recorded as spent (and not expired as of the horizon).
    fn contains(&self, id: &str) -> bool {
        self.ids
            .get(id)
            .is_some_and(|until| self.horizon.is_none_or(|h| *until >= h))
            || self.legacy.value.contains_key(id)
    }

    /// Forget the log read (it was replaced or removed); keep the clock.
    fn reset(&mut self, file_id: Option<(u64, u64)>, file: Option<std::fs::File>) {
        *self = Spent {
            file_id,
            file,
            horizon: self.horizon,
            legacy: std::mem::take(&mut self.legacy),
            ..Spent::default()
        };
    }

    /// Drop the ids that expired before the horizon.
    fn prune(&mut self) {
        if let Some(h) = self.horizon {
            self.ids.retain(|_, until| *until >= h);
        }
    }
}

/// Parse complete lines of the spent log (`first`: starting with the header).
fn parse_spent(path: &Path, bytes: &[u8], first: bool) -> Result<Vec<(String, i64)>, StoreError> {
    let corrupt = |n: usize, message: &str| StoreError::Corrupt {
        path: path.to_path_buf(),
        message: format!("line {n}: {message}"),
    };
    let mut lines = bytes.split_inclusive(|&b| b == b'\n');
    if first && !bytes.is_empty() && lines.next() != Some(SPENT_HEADER) {
        return Err(corrupt(1, "not a kya spent log (bad header)"));
    }
    let mut out = Vec::new();
    for (i, line) in lines.enumerate() {
        let n = i + 1 + usize::from(first);
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let text = std::str::from_utf8(line).map_err(|_| corrupt(n, "not UTF-8"))?;
        let (until, id) = text
            .split_once(' ')
            .ok_or_else(|| corrupt(n, "expected `UNTIL ID`"))?;
        let valid_number = !until.is_empty()
            && until
                .strip_prefix('-')
                .unwrap_or(until)
                .bytes()
                .all(|b| b.is_ascii_digit());
        let until: i64 = until
            .parse()
            .ok()
            .filter(|_| valid_number)
            .ok_or_else(|| corrupt(n, "bad expiry"))?;
        check_id(id).map_err(|_| corrupt(n, "bad credential id"))?;
        out.push((id.to_owned(), until));
    }
    Ok(out)
}

fn prune(ids: &mut BTreeMap<String, Option<i64>>, now: OffsetDateTime) {
    let now = now.unix_timestamp();
    ids.retain(|_, until| until.is_none_or(|u| u >= now));
}

/// Read a store file: `None` when absent; an error when unreadable or too large.
fn read_bounded(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(path)(e)),
    };
    if meta.len() > MAX_FILE_BYTES as u64 {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            message: format!("larger than {MAX_FILE_BYTES} bytes"),
        });
    }
    std::fs::read(path).map(Some).map_err(io(path))
}

fn parse_file<T: serde::de::DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T, StoreError> {
    let corrupt = |message: String| StoreError::Corrupt {
        path: path.to_path_buf(),
        message,
    };
    let value = jcs::parse_strict(bytes, MAX_FILE_BYTES).map_err(|e| corrupt(e.to_string()))?;
    serde_json::from_value(value).map_err(|e| corrupt(e.to_string()))
}

fn read_ids(path: &Path) -> Result<BTreeMap<String, Option<i64>>, StoreError> {
    let Some(bytes) = read_bounded(path)? else {
        return Ok(BTreeMap::new());
    };
    let file: IdFile = parse_file(path, &bytes)?;
    if file.version != 1 {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            message: format!("unsupported version {}", file.version),
        });
    }
    Ok(file.entries.into_iter().map(|e| (e.id, e.until)).collect())
}

fn write_ids(path: &Path, ids: &BTreeMap<String, Option<i64>>) -> Result<(), StoreError> {
    let file = IdFile {
        version: 1,
        entries: ids
            .iter()
            .map(|(id, until)| IdEntry {
                id: id.clone(),
                until: *until,
            })
            .collect(),
    };
    let bytes = serde_json::to_vec_pretty(&file).map_err(|e| StoreError::Corrupt {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    write_atomic(path, &bytes)
}

/// Load standing credentials, re-verifying each proof: a file edited by hand
/// cannot smuggle in a credential. Entries that fail are skipped with a warning
/// (one bad entry must not disable all the others).
fn read_standing(path: &Path) -> Result<Vec<Standing>, StoreError> {
    let Some(bytes) = read_bounded(path)? else {
        return Ok(Vec::new());
    };
    let file: StandingFile = parse_file(path, &bytes)?;
    if file.version != 1 {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            message: format!("unsupported version {}", file.version),
        });
    }
    let mut out = Vec::new();
    for document in file.credentials.into_iter().take(MAX_STANDING) {
        let verified = match proof::verify_proof(&document, ASSERTION_METHOD) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "skipping standing credential with a bad proof");
                continue;
            }
        };
        match ActionCredential::from_verified(&verified.document) {
            Ok(credential) => out.push(Standing {
                document,
                credential,
                signer: verified.key,
            }),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "skipping malformed standing credential")
            }
        }
    }
    Ok(out)
}

fn stamp(path: &Path) -> Result<Option<Stamp>, StoreError> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(Some((
            m.ino(),
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

/// Re-read `path` into `cached` when the file changed since the last read.
fn refresh<T: Default>(
    path: &Path,
    cached: &mut Cached<T>,
    read: fn(&Path) -> Result<T, StoreError>,
) -> Result<(), StoreError> {
    let now = stamp(path)?;
    if now.is_none() {
        *cached = Cached::default();
        return Ok(());
    }
    if cached.stamp != now {
        cached.value = read(path)?;
        cached.stamp = now;
    }
    Ok(())
}

/// [`crate::fsutil::write_atomic`], with the store's error type.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    crate::fsutil::write_atomic(path, bytes).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credential::action::{
        issue, AgentSubject, ArgBound, Channel, Environment, Evidence, Scope,
    };
    use crate::credential::verify::{self, Call};
    use ed25519_dalek::SigningKey;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-26 12:30:00 UTC);

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[8; 32])
    }

    fn standing(
        tool: &str,
        max: i64,
        single_use: bool,
        until: OffsetDateTime,
    ) -> (Value, ActionCredential) {
        let subject = AgentSubject {
            agent: "billing-bot".into(),
            exe_sha256: None,
            uid: Some(1001),
            environment: Environment {
                host: "host-1".into(),
                cgroup: None,
            },
            scope: Scope {
                server: None,
                tool: tool.into(),
                args_sha256: None,
                arg_bounds: vec![ArgBound {
                    arg: "amount".into(),
                    min: None,
                    max: Some(max.into()),
                }],
                single_use,
            },
        };
        let from = datetime!(2026-11-26 12:00:00 UTC);
        let ev = Evidence::approval("alice", Channel::CliIssue, from).unwrap();
        issue(&key(), subject, from, until, vec![ev]).unwrap()
    }

    fn call(amount: i64) -> Call {
        Call {
            agent: "billing-bot".into(),
            uid: 1001,
            cgroup: "/".into(),
            exe_sha256: None,
            host: "host-1".into(),
            server: "mcp.example.com".into(),
            method: "tools/call".into(),
            tool: "transfer".into(),
            args: serde_json::json!({ "amount": amount }),
        }
    }

    #[test]
    fn standing_credential_covers_matching_calls_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = CredentialStore::open(dir.path()).unwrap();
        let vk = key().verifying_key();
        assert!(verify::find_covering(&store, &call(1), NOW, &vk)
            .unwrap()
            .is_none());
        let (doc, cred) = standing("transfer", 500, false, datetime!(2026-11-26 14:00:00 UTC));
        store.add_standing(&doc, &cred, NOW).unwrap();
        store.add_standing(&doc, &cred, NOW).unwrap();
        assert_eq!(store.standing().unwrap().len(), 1);
        let found = verify::find_covering(&store, &call(500), NOW, &vk)
            .unwrap()
            .unwrap();
        assert_eq!(found.credential.id, cred.id);
        assert_eq!(found.credential.scope_json()["tool"], "transfer");
        assert!(verify::find_covering(&store, &call(501), NOW, &vk)
            .unwrap()
            .is_none());
        // Another trusted key: not covered.
        let other = SigningKey::from_bytes(&[1; 32]).verifying_key();
        assert!(verify::find_covering(&store, &call(1), NOW, &other)
            .unwrap()
            .is_none());
        // After the window: not covered.
        assert!(
            verify::find_covering(&store, &call(1), datetime!(2026-11-26 14:00:00 UTC), &vk)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn revocation_by_another_handle_takes_effect_on_the_next_query() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = CredentialStore::open(dir.path()).unwrap();
        let cli = CredentialStore::open(dir.path()).unwrap();
        let vk = key().verifying_key();
        let (doc, cred) = standing("transfer", 500, false, datetime!(2026-11-26 14:00:00 UTC));
        cli.add_standing(&doc, &cred, NOW).unwrap();
        assert!(verify::find_covering(&daemon, &call(1), NOW, &vk)
            .unwrap()
            .is_some());
        assert!(cli.revoke(&cred.id, NOW).unwrap());
        assert!(!cli.revoke(&cred.id, NOW).unwrap());
        assert!(daemon.is_revoked(&cred.id).unwrap());
        assert!(verify::find_covering(&daemon, &call(1), NOW, &vk)
            .unwrap()
            .is_none());
        assert!(daemon.standing().unwrap().is_empty());
        // Survives reopening.
        let reopened = CredentialStore::open(dir.path()).unwrap();
        assert!(reopened.is_revoked(&cred.id).unwrap());
    }

    /// The decision path's shortcut says "none" only when the standing file
    /// is absent, or unchanged since read and empty: a credential added by
    /// another handle (the CLI) is never skipped.
    #[test]
    fn none_standing_only_when_there_is_certainly_none() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = CredentialStore::open(dir.path()).unwrap();
        let cli = CredentialStore::open(dir.path()).unwrap();
        let vk = key().verifying_key();
        assert!(daemon.none_standing(), "no standing file");
        let (doc, cred) = standing("transfer", 500, false, datetime!(2026-11-26 14:00:00 UTC));
        cli.add_standing(&doc, &cred, NOW).unwrap();
        assert!(
            !daemon.none_standing(),
            "added by another handle, not yet read"
        );
        assert!(verify::find_covering(&daemon, &call(1), NOW, &vk)
            .unwrap()
            .is_some());
        assert!(!daemon.none_standing(), "read, and not empty");
        assert!(cli.revoke(&cred.id, NOW).unwrap());
        assert!(!daemon.none_standing(), "changed since read");
        assert!(verify::find_covering(&daemon, &call(1), NOW, &vk)
            .unwrap()
            .is_none());
        assert!(daemon.none_standing(), "the last one revoked");
        // A standing file holding no credential, once read, counts as none.
        write_atomic(
            &daemon.dir.join(STANDING_FILE),
            br#"{"version":1,"credentials":[]}"#,
        )
        .unwrap();
        assert!(!daemon.none_standing(), "changed since read");
        assert!(verify::find_covering(&daemon, &call(1), NOW, &vk)
            .unwrap()
            .is_none());
        assert!(daemon.none_standing(), "read, and empty");
        // A busy store (a spend holding the lock) is not "none".
        let held = daemon.cache.lock().unwrap();
        assert!(!daemon.none_standing());
        drop(held);
    }

    #[test]
    fn single_use_standing_credential_is_skipped_once_spent() {
        let dir = tempfile::tempdir().unwrap();
        let store = CredentialStore::open(dir.path()).unwrap();
        let vk = key().verifying_key();
        let (doc, cred) = standing("transfer", 500, true, datetime!(2026-11-26 14:00:00 UTC));
        store.add_standing(&doc, &cred, NOW).unwrap();
        let found = verify::find_covering(&store, &call(5), NOW, &vk)
            .unwrap()
            .unwrap();
        verify::redeem(&found.credential, NOW, &store).unwrap();
        assert!(verify::find_covering(&store, &call(5), NOW, &vk)
            .unwrap()
            .is_none());
        assert!(matches!(
            verify::redeem(&found.credential, NOW, &store),
            Err(verify::VerifyError::Replayed(_))
        ));
    }

    #[test]
    fn spent_ids_expire_with_their_credential() {
        let dir = tempfile::tempdir().unwrap();
        let store = CredentialStore::open(dir.path()).unwrap();
        store
            .spend("urn:uuid:a", datetime!(2026-11-26 12:40:00 UTC), NOW)
            .unwrap();
        assert!(matches!(
            store.spend("urn:uuid:a", datetime!(2026-11-26 12:40:00 UTC), NOW),
            Err(StoreError::AlreadySpent(_))
        ));
        // A later write prunes it once its credential has expired.
        store
            .spend(
                "urn:uuid:b",
                datetime!(2026-11-26 14:00:00 UTC),
                datetime!(2026-11-26 13:00:00 UTC),
            )
            .unwrap();
        assert!(!store.is_spent("urn:uuid:a").unwrap());
        assert!(store.is_spent("urn:uuid:b").unwrap());
    }

    #[test]
    fn concurrent_spends_of_one_id_succeed_exactly_once() {
        let dir = tempfile::tempdir().unwrap();
        let until = datetime!(2026-11-26 14:00:00 UTC);
        let path = dir.path().to_path_buf();
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || {
                    // Separate handles: like separate processes, only the flock serializes them.
                    let store = CredentialStore::open(&path).unwrap();
                    store.spend("urn:uuid:once", until, NOW).is_ok()
                })
            })
            .collect();
        let wins = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|ok| *ok)
            .count();
        assert_eq!(wins, 1);
    }

    #[test]
    fn corrupt_or_hostile_files_fail_closed() {
        let dir = tempfile::tempdir().unwrap();
        let store = CredentialStore::open(dir.path()).unwrap();
        let revoked = store.dir().join(REVOKED_FILE);
        for bad in [
            &b"not json"[..],
            b"{\"version\":1,\"entries\":[{\"id\":\"x\"}],\"entries\":[]}",
            b"{\"version\":2,\"entries\":[]}",
            b"{\"version\":1,\"entries\":[{\"id\":5}]}",
            b"[]",
        ] {
            std::fs::write(&revoked, bad).unwrap();
            assert!(
                matches!(store.is_revoked("x"), Err(StoreError::Corrupt { .. })),
                "{bad:?}"
            );
            assert!(store.revoke("urn:uuid:y", NOW).is_err());
        }
        // A corrupt standing file does not block revocation.
        std::fs::remove_file(&revoked).unwrap();
        std::fs::write(store.dir().join(STANDING_FILE), b"{garbage").unwrap();
        assert!(store.revoke("urn:uuid:z", NOW).unwrap());
        assert!(store.is_revoked("urn:uuid:z").unwrap());
        let f = std::fs::File::create(&revoked).unwrap();
        f.set_len(MAX_FILE_BYTES as u64 + 1).unwrap();
        assert!(matches!(
            store.is_revoked("x"),
            Err(StoreError::Corrupt { .. })
        ));
        for id in ["", "a b", "a\nb", &"x".repeat(MAX_ID_LEN + 1)] {
            assert!(matches!(
                store.spend(id, NOW, NOW),
                Err(StoreError::BadId(_))
            ));
        }
    }

    fn log_text(store: &CredentialStore) -> String {
        std::fs::read_to_string(store.dir().join(SPENT_LOG)).unwrap()
    }

    #[test]
    fn spent_log_is_appended_and_read_incrementally_by_other_handles() {
        let dir = tempfile::tempdir().unwrap();
        let until = datetime!(2026-11-26 14:00:00 UTC);
        let a = CredentialStore::open(dir.path()).unwrap();
        let b = CredentialStore::open(dir.path()).unwrap();
        assert!(!b.is_spent("urn:uuid:x").unwrap());
        a.spend("urn:uuid:x", until, NOW).unwrap();
        assert!(b.is_spent("urn:uuid:x").unwrap(), "b reads a's append");
        b.spend("urn:uuid:y", until, NOW).unwrap();
        assert!(matches!(
            a.spend("urn:uuid:y", until, NOW),
            Err(StoreError::AlreadySpent(_))
        ));
        assert!(matches!(
            b.spend("urn:uuid:x", until, NOW),
            Err(StoreError::AlreadySpent(_))
        ));
        let text = log_text(&a);
        assert_eq!(
            text,
            format!(
                "kya-spent 1\n{t} urn:uuid:x\n{t} urn:uuid:y\n",
                t = until.unix_timestamp()
            )
        );
        assert!(!dir.path().join(DIR_NAME).join(SPENT_LEGACY).exists());
    }

    #[test]
    fn a_torn_spent_line_is_ignored_then_truncated_by_the_next_spender() {
        let dir = tempfile::tempdir().unwrap();
        let until = datetime!(2026-11-26 14:00:00 UTC);
        let store = CredentialStore::open(dir.path()).unwrap();
        store.spend("urn:uuid:a", until, NOW).unwrap();
        // A writer crashed in the middle of its append.
        let path = store.dir().join(SPENT_LOG);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"1764165600 urn:uuid:to").unwrap();
        drop(f);
        let other = CredentialStore::open(dir.path()).unwrap();
        assert!(other.is_spent("urn:uuid:a").unwrap());
        assert!(!other.is_spent("urn:uuid:to").unwrap());
        assert!(!store.is_spent("urn:uuid:to").unwrap());
        other.spend("urn:uuid:b", until, NOW).unwrap();
        let t = until.unix_timestamp();
        assert_eq!(
            log_text(&store),
            format!("kya-spent 1\n{t} urn:uuid:a\n{t} urn:uuid:b\n")
        );
        assert!(store.is_spent("urn:uuid:b").unwrap());
        let reopened = CredentialStore::open(dir.path()).unwrap();
        assert!(reopened.is_spent("urn:uuid:a").unwrap());
        assert!(reopened.is_spent("urn:uuid:b").unwrap());
        // A torn header only (a crash right after creating by hand): restarted.
        std::fs::write(&path, b"kya-sp").unwrap();
        let fresh = CredentialStore::open(dir.path()).unwrap();
        assert!(!fresh.is_spent("urn:uuid:a").unwrap());
        fresh.spend("urn:uuid:c", until, NOW).unwrap();
        assert_eq!(log_text(&fresh), format!("kya-spent 1\n{t} urn:uuid:c\n"));
    }

    #[test]
    fn spent_log_compaction_drops_expired_ids_and_keeps_live_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = CredentialStore::open(dir.path()).unwrap();
        let reader = CredentialStore::open(dir.path()).unwrap();
        let path = store.dir().join(SPENT_LOG);
        // A long history: 3000 expired ids, 10 live ones.
        let expired = datetime!(2026-11-26 12:00:00 UTC).unix_timestamp();
        let live = datetime!(2026-11-26 14:00:00 UTC).unix_timestamp();
        let mut text = String::from("kya-spent 1\n");
        for i in 0..3000 {
            text.push_str(&format!("{expired} urn:uuid:old-{i}\n"));
        }
        for i in 0..10 {
            text.push_str(&format!("{live} urn:uuid:live-{i}\n"));
        }
        std::fs::write(&path, &text).unwrap();
        assert!(reader.is_spent("urn:uuid:live-3").unwrap());
        let ino = std::fs::metadata(&path).unwrap().ino();
        store
            .spend("urn:uuid:new", datetime!(2026-11-26 14:00:00 UTC), NOW)
            .unwrap();
        assert_ne!(std::fs::metadata(&path).unwrap().ino(), ino, "rewritten");
        let after = log_text(&store);
        assert_eq!(after.lines().count(), 1 + 10 + 1, "{after}");
        assert!(!after.contains("old-"));
        for s in [&store, &reader, &CredentialStore::open(dir.path()).unwrap()] {
            assert!(s.is_spent("urn:uuid:live-9").unwrap());
            assert!(s.is_spent("urn:uuid:new").unwrap());
        }
        assert!(matches!(
            reader.spend("urn:uuid:live-0", datetime!(2026-11-26 14:00:00 UTC), NOW),
            Err(StoreError::AlreadySpent(_))
        ));
        // Appends go on after a compaction, seen by the other handle.
        store
            .spend("urn:uuid:newer", datetime!(2026-11-26 14:00:00 UTC), NOW)
            .unwrap();
        assert!(reader.is_spent("urn:uuid:newer").unwrap());
    }

    #[test]
    fn legacy_spent_json_is_honoured_then_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let store = CredentialStore::open(dir.path()).unwrap();
        let legacy = store.dir().join(SPENT_LEGACY);
        let mut old = BTreeMap::new();
        old.insert("urn:uuid:old".to_string(), Some(NOW.unix_timestamp() + 600));
        old.insert("urn:uuid:forever".to_string(), None);
        write_ids(&legacy, &old).unwrap();
        assert!(
            store.is_spent("urn:uuid:old").unwrap(),
            "read before migration"
        );
        assert!(matches!(
            store.spend("urn:uuid:old", NOW, NOW),
            Err(StoreError::AlreadySpent(_))
        ));
        assert!(!legacy.exists(), "migrated by the first spend");
        store
            .spend("urn:uuid:new", datetime!(2026-11-26 14:00:00 UTC), NOW)
            .unwrap();
        let reopened = CredentialStore::open(dir.path()).unwrap();
        for id in ["urn:uuid:old", "urn:uuid:forever", "urn:uuid:new"] {
            assert!(reopened.is_spent(id).unwrap(), "{id}");
        }
        // A corrupt legacy file fails closed.
        std::fs::write(&legacy, b"{garbage").unwrap();
        assert!(matches!(
            reopened.spend("urn:uuid:z", NOW, NOW),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(reopened.is_spent("urn:uuid:z").is_err());
    }

    #[test]
    fn hostile_spent_logs_fail_closed() {
        let dir = tempfile::tempdir().unwrap();
        let store = CredentialStore::open(dir.path()).unwrap();
        let path = store.dir().join(SPENT_LOG);
        for bad in [
            &b"not a spent log\n"[..],
            b"1764165600 urn:uuid:a\n",
            b"kya-spent 2\n",
            b"kya-spent 1\ngarbage\n1764165600 urn:uuid:a\n",
            b"kya-spent 1\nx1 urn:uuid:a\n",
            b"kya-spent 1\n+1 urn:uuid:a\n",
            b"kya-spent 1\n99999999999999999999 urn:uuid:a\n",
            b"kya-spent 1\n1 urn:uuid:a b\n",
            b"kya-spent 1\n1 \n",
            b"kya-spent 1\n1 urn:\xff\n",
            b"kya-spent 1\n\0\0\0\n1 urn:uuid:a\n",
        ] {
            std::fs::write(&path, bad).unwrap();
            let fresh = CredentialStore::open(dir.path()).unwrap();
            assert!(
                matches!(
                    fresh.is_spent("urn:uuid:a"),
                    Err(StoreError::Corrupt { .. })
                ),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
            assert!(matches!(
                fresh.spend("urn:uuid:b", NOW, NOW),
                Err(StoreError::Corrupt { .. })
            ));
            // A handle that had read a good prefix fails on the bad tail too.
            assert!(store.is_spent("urn:uuid:a").is_err());
        }
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(MAX_SPENT_LOG_BYTES + 1).unwrap();
        assert!(matches!(
            store.spend("urn:uuid:b", NOW, NOW),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn tampered_standing_entries_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = CredentialStore::open(dir.path()).unwrap();
        let vk = key().verifying_key();
        let (doc, cred) = standing("transfer", 500, false, datetime!(2026-11-26 14:00:00 UTC));
        store.add_standing(&doc, &cred, NOW).unwrap();
        let path = store.dir().join(STANDING_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("\"max\": 500", "\"max\": 50000")).unwrap();
        assert!(store.standing().unwrap().is_empty());
        assert!(verify::find_covering(&store, &call(40000), NOW, &vk)
            .unwrap()
            .is_none());
    }

    #[test]
    fn atomic_write_leaves_no_temp_files_and_private_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
