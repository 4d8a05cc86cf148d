//! The persisted credential state in `STATE_DIR/credentials/`:
//!
//! * `revoked.json`: revoked credential ids (`kya credential revoke`);
//! * `spent.json`: single-use credential ids already used (replay protection);
//! * `standing.json`: standing credentials issued ahead of time, which the
//!   decision path queries ("is there a valid credential covering this call?").
//!
//! Several processes share these files (the daemon, and offline `kya credential`
//! commands), so every change is a read-modify-write under an exclusive `flock`
//! on `credentials/lock`, written atomically (temp file, fsync, rename, fsync of
//! the directory): a crash leaves the old or the new file, never a torn one, and
//! a spent id survives a restart. Readers re-read a file when its identity
//! (inode, size, mtime, ctime) changed, so a revocation written by another
//! process is seen on the next call with one `stat`.
//!
//! Entries expire with their credential (an expired credential fails its window
//! check anyway), which keeps the files bounded; they are pruned on each write.
//! A corrupt or oversized file is an error, and callers fail closed on it.

use super::action::ActionCredential;
use super::jcs;
use super::proof::{self, ASSERTION_METHOD};
use super::verify::{self, Call};
use ed25519_dalek::VerifyingKey;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use time::OffsetDateTime;

/// Subdirectory of the state dir holding the credential files.
pub const DIR_NAME: &str = "credentials";
const REVOKED_FILE: &str = "revoked.json";
const SPENT_FILE: &str = "spent.json";
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
    spent: Cached<BTreeMap<String, Option<i64>>>,
    standing: Cached<Vec<Standing>>,
}

/// Handle on `STATE_DIR/credentials/`.
pub struct CredentialStore {
    dir: PathBuf,
    cache: Mutex<Cache>,
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
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let path = self.dir.join(SPENT_FILE);
        refresh(&path, &mut cache.spent, read_ids)?;
        Ok(cache.spent.value.contains_key(id))
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
        let path = self.dir.join(SPENT_FILE);
        let mut ids = read_ids(&path)?;
        if ids.contains_key(id) {
            return Err(StoreError::AlreadySpent(id.to_owned()));
        }
        prune(&mut ids, now);
        if ids.len() >= MAX_IDS {
            return Err(StoreError::Full {
                what: "spent-credential list",
                max: MAX_IDS,
            });
        }
        ids.insert(id.to_owned(), Some(until.unix_timestamp()));
        write_ids(&path, &ids)
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
    /// not revoked, not spent, whose window, binding and scope cover `call`
    /// at `now`. Finding one does not spend it: call
    /// [`verify::redeem`] when the call is actually released on its strength.
    pub fn find_covering(
        &self,
        call: &Call,
        now: OffsetDateTime,
        trusted: &VerifyingKey,
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
        refresh(&self.dir.join(SPENT_FILE), &mut cache.spent, read_ids)?;
        let cache = &*cache;
        let found = cache.standing.value.iter().find(|s| {
            let id = &s.credential.id;
            s.signer == *trusted
                && !cache.revoked.value.contains_key(id)
                && !(s.credential.subject.scope.single_use && cache.spent.value.contains_key(id))
                && verify::check_call(&s.credential, call, now).is_ok()
        });
        Ok(found.map(|s| Covering {
            credential: s.credential.clone(),
            document: s.document.clone(),
        }))
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
        assert!(store.find_covering(&call(1), NOW, &vk).unwrap().is_none());
        let (doc, cred) = standing("transfer", 500, false, datetime!(2026-11-26 14:00:00 UTC));
        store.add_standing(&doc, &cred, NOW).unwrap();
        store.add_standing(&doc, &cred, NOW).unwrap();
        assert_eq!(store.standing().unwrap().len(), 1);
        let found = store.find_covering(&call(500), NOW, &vk).unwrap().unwrap();
        assert_eq!(found.credential.id, cred.id);
        assert_eq!(found.credential.scope_json()["tool"], "transfer");
        assert!(store.find_covering(&call(501), NOW, &vk).unwrap().is_none());
        // Another trusted key: not covered.
        let other = SigningKey::from_bytes(&[1; 32]).verifying_key();
        assert!(store
            .find_covering(&call(1), NOW, &other)
            .unwrap()
            .is_none());
        // After the window: not covered.
        assert!(store
            .find_covering(&call(1), datetime!(2026-11-26 14:00:00 UTC), &vk)
            .unwrap()
            .is_none());
    }

    #[test]
    fn revocation_by_another_handle_takes_effect_on_the_next_query() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = CredentialStore::open(dir.path()).unwrap();
        let cli = CredentialStore::open(dir.path()).unwrap();
        let vk = key().verifying_key();
        let (doc, cred) = standing("transfer", 500, false, datetime!(2026-11-26 14:00:00 UTC));
        cli.add_standing(&doc, &cred, NOW).unwrap();
        assert!(daemon.find_covering(&call(1), NOW, &vk).unwrap().is_some());
        assert!(cli.revoke(&cred.id, NOW).unwrap());
        assert!(!cli.revoke(&cred.id, NOW).unwrap());
        assert!(daemon.is_revoked(&cred.id).unwrap());
        assert!(daemon.find_covering(&call(1), NOW, &vk).unwrap().is_none());
        assert!(daemon.standing().unwrap().is_empty());
        // Survives reopening.
        let reopened = CredentialStore::open(dir.path()).unwrap();
        assert!(reopened.is_revoked(&cred.id).unwrap());
    }

    #[test]
    fn single_use_standing_credential_is_skipped_once_spent() {
        let dir = tempfile::tempdir().unwrap();
        let store = CredentialStore::open(dir.path()).unwrap();
        let vk = key().verifying_key();
        let (doc, cred) = standing("transfer", 500, true, datetime!(2026-11-26 14:00:00 UTC));
        store.add_standing(&doc, &cred, NOW).unwrap();
        let found = store.find_covering(&call(5), NOW, &vk).unwrap().unwrap();
        verify::redeem(&found.credential, NOW, &store).unwrap();
        assert!(store.find_covering(&call(5), NOW, &vk).unwrap().is_none());
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
        assert!(store
            .find_covering(&call(40000), NOW, &vk)
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
