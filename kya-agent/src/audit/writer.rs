//! The audit log writer. An appending caller `write(2)`s its own record (and
//! whatever others queued meanwhile, in one batch) without a thread hop: whoever
//! holds the writer state writes the queue, and a caller that finds it held
//! leaves its record to the holder (see `Records`). A sync thread `fdatasync`s
//! what was written (one sync per group) and writes signed checkpoints over
//! what is durable; a writer thread rotates the file by size and runs
//! checkpoints and shutdown.
//!
//! Durability contract:
//! * [`Durability::Sync`]: `append` returns only after the batch holding the
//!   record was written and `fdatasync`ed. Holds, approvals and the allow that
//!   follows an approval use this, so no such call is released before its
//!   record is on disk.
//! * [`Durability::Group`]: `append` returns once the record has been
//!   written to the file (`write(2)`: it is in the kernel's page cache, so a
//!   crash of kya itself, even `kill -9`, cannot lose it; only a crash of the
//!   machine can) and never waits for an `fdatasync`; the returned [`Receipt`]
//!   resolves once it is on disk. No caller waits to fill a batch or for a
//!   sync: the writer takes everything queued and writes it while the sync
//!   thread syncs the previous batches. The sync thread gathers group records
//!   for up to `GROUP_DELAY` (2 ms) before one `fdatasync` covers them (a sync
//!   record ends the gathering at once), so a busy log costs a few hundred
//!   syncs a second, not one per record. A group record is therefore durable
//!   after the time to drain what was queued ahead of it plus the gathering
//!   delay, one write and one `fdatasync` (≈2.3 ms on quiet storage); with the queue bounded at
//!   [`AuditConfig::queue_capacity`] records and batches of up to
//!   [`MAX_BATCH`], the bound is ≤ 10 ms on healthy storage (measured by
//!   `cargo bench -p kya-agent --bench audit_append`). When storage stalls the
//!   bound cannot hold; then the queue fills (a record holds its queue slot
//!   until it is durable), group callers get [`AuditError::QueueFull`] and sync
//!   callers wait: nothing is buffered without limit.
//!
//! Failure contract: a failed write or sync truncates the file back to the last
//! committed length, fails every caller in the batch with [`AuditError::Write`]
//! and makes [`AuditLog::health`] report it (and `tracing::error!`). The next
//! batch tries again, so the log heals when space returns. If even the
//! truncation fails the writer stops accepting records ([`AuditError::Unavailable`]):
//! a torn record must never be followed by more. A failed `fdatasync` also
//! stops it: the kernel may have dropped the dirty pages, so what the file
//! holds is unknown until kya restarts and verifies it. Callers deny consequential
//! calls whenever an append fails or `health()` is not writable (fail closed).
//!
//! Restart: [`AuditLog::open`] verifies the existing set (rotated files, live
//! file, checkpoints) against kya's own key, drops an incomplete final line left
//! by a crash (it was never acknowledged), and continues the chain and the tree.
//! A log that fails verification is not appended to: open fails with
//! [`AuditError::Corrupt`] and the operator must move it aside.

use super::checkpoint::{self, Checkpoint, VKEY_EXTENSION};
use super::event::DecisionEvent;
use super::files;
use super::merkle::{leaf_hash, Hash};
use super::record::{compose, Chain, MAX_LINE_BYTES};
use super::verify::{self, Fault, TrustedKey, VerifyOptions};
use ed25519_dalek::SigningKey;
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore, TryAcquireError};

/// Most records written (and synced) as one batch.
pub const MAX_BATCH: usize = 1024;

/// How long the sync thread gathers group records, which no caller waits for,
/// before one `fdatasync` covers them; a [`Durability::Sync`] record is synced
/// at once (with whatever was gathered).
const GROUP_DELAY: Duration = Duration::from_millis(2);

/// How an append must be committed before the caller proceeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Wait for `fdatasync`.
    Sync,
    /// Return at once; committed with the next batch.
    Group,
}

/// Errors from the audit log. `Clone`: one failed batch fails many callers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("audit log write failed ({path}): {message}")]
    Write {
        path: PathBuf,
        kind: io::ErrorKind,
        message: String,
    },
    #[error("existing audit log does not verify, refusing to append: {0}")]
    Corrupt(Fault),
    #[error("audit queue full")]
    QueueFull,
    #[error("audit log unavailable: {0}")]
    Unavailable(String),
    #[error("audit event too large ({size} bytes, limit {max})")]
    EventTooLarge { size: usize, max: usize },
    #[error("{0}")]
    InvalidEvent(String),
    #[error("signing key: {0}")]
    Key(String),
}

/// Writer settings.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// The live file (`audit.jsonl`); rotated files and checkpoints live beside it.
    pub path: PathBuf,
    /// Checkpoint origin and signing key name; default `<hostname>/kya-audit`.
    /// An existing log keeps the origin its checkpoints already carry.
    pub origin: Option<String>,
    /// Write a checkpoint after this many records...
    pub checkpoint_every: u64,
    /// ...or this long after the last one, whichever comes first (if there is anything new).
    pub checkpoint_interval: Duration,
    /// Rotate the live file once it reaches this many bytes.
    pub rotate_bytes: u64,
    /// Records that may wait for the writer.
    pub queue_capacity: usize,
}

impl AuditConfig {
    /// Defaults: checkpoint every 1000 records or 10 s, rotate at 64 MiB, queue 4096.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        AuditConfig {
            path: path.into(),
            origin: None,
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(10),
            rotate_bytes: 64 << 20,
            queue_capacity: 4096,
        }
    }
}

/// A record on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    pub seq: u64,
    /// The record's RFC 6962 leaf hash.
    pub leaf: Hash,
}

/// The result of an append: durable already, or pending the group commit.
#[derive(Debug)]
pub enum Receipt {
    Durable(Committed),
    Pending(oneshot::Receiver<Result<Committed, AuditError>>),
}

impl Receipt {
    /// Wait until the record is on disk.
    pub async fn committed(self) -> Result<Committed, AuditError> {
        match self {
            Receipt::Durable(c) => Ok(c),
            Receipt::Pending(rx) => rx
                .await
                .unwrap_or_else(|_| Err(AuditError::Unavailable("writer stopped".into()))),
        }
    }
}

/// Whether the log can take records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum HealthState {
    Ok,
    /// The last write failed; the next batch retries.
    Failing {
        error: String,
    },
    /// The writer stopped (closed, or could not repair a failed write).
    Stopped {
        reason: String,
    },
}

/// A snapshot of the writer's state, for `kya status` and metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Health {
    pub state: HealthState,
    pub path: PathBuf,
    /// Records in the log (the tree size).
    pub records: u64,
    /// Tree size of the last signed checkpoint.
    pub last_checkpoint: Option<u64>,
    /// Writes or syncs that failed since open.
    pub write_failures: u64,
    /// Free slots in the queue.
    pub queue_free: usize,
}

impl Health {
    /// True when records are being written.
    pub fn is_writable(&self) -> bool {
        self.state == HealthState::Ok
    }
}

/// What the writer thread does besides appending (appends are written by
/// the appending caller, see [`Records`]).
enum Msg {
    /// The live file reached its size: rotate it.
    Rotate,
    Checkpoint(mpsc::Sender<Result<(), AuditError>>),
    Shutdown(mpsc::Sender<Result<(), AuditError>>),
}

/// What the writer thread hands the sync thread.
enum SyncMsg {
    /// A batch that was written; sync it and answer its callers.
    Job(SyncJob),
    /// Sync everything before this, write a checkpoint, answer.
    Barrier(mpsc::Sender<Result<(), AuditError>>),
    /// Like `Barrier`, then stop.
    Shutdown(mpsc::Sender<Result<(), AuditError>>),
}

struct SyncJob {
    /// The file the batch went to (rotation swaps the writer's file).
    file: Arc<File>,
    /// Tree size and root once this batch is on disk.
    size: u64,
    root: Hash,
    replies: Vec<Written>,
    /// A caller waits for this batch's sync before going on (a
    /// [`Durability::Sync`] record): sync at once, without gathering.
    urgent: bool,
}

struct Written {
    reply: oneshot::Sender<Result<Committed, AuditError>>,
    committed: Committed,
    /// The queue slot is held until the record is durable, so the records
    /// waiting for a sync are bounded by the queue too.
    _permit: Option<OwnedSemaphorePermit>,
}

struct Shared {
    health: Mutex<Health>,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut Health)) {
        match self.health.lock() {
            Ok(mut h) => f(&mut h),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    /// Why the log stopped taking records, if it did (either thread may stop it).
    fn stopped(&self) -> Option<String> {
        let h = match self.health.lock() {
            Ok(h) => h,
            Err(p) => p.into_inner(),
        };
        match &h.state {
            HealthState::Stopped { reason } => Some(reason.clone()),
            _ => None,
        }
    }
}

/// The audit log handle. Cheap to share behind an `Arc`; dropping it writes a
/// final checkpoint and stops the writer.
pub struct AuditLog {
    tx: mpsc::Sender<Msg>,
    records: Arc<Records>,
    permits: Arc<Semaphore>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

fn io_err(path: &Path, e: &io::Error) -> AuditError {
    AuditError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn write_err(path: &Path, e: &io::Error) -> AuditError {
    AuditError::Write {
        path: path.to_path_buf(),
        kind: e.kind(),
        message: e.to_string(),
    }
}

/// `<hostname>/kya-audit`, restricted to characters a signed-note key name allows.
pub fn default_origin() -> String {
    // gethostname(), not /proc/sys: the service sees only PID directories of /proc.
    let host = crate::host::host_name();
    let host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-._".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let host = if host.is_empty() {
        "localhost".to_string()
    } else {
        host
    };
    format!("{host}/kya-audit")
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

impl AuditLog {
    /// Open (or create) the log at `cfg.path`, verify what is there, start the
    /// writer and sync threads.
    pub fn open(cfg: AuditConfig, key: SigningKey) -> Result<AuditLog, AuditError> {
        let base = cfg.path.clone();
        if let Some(dir) = base.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| io_err(dir, &e))?;
        }
        let file = open_append(&base).map_err(|e| io_err(&base, &e))?;
        let set = files::log_set(&base).map_err(|e| io_err(&base, &e))?;
        let ck_path = files::checkpoints_path(&base);
        let report = verify::verify(
            &set,
            &VerifyOptions {
                ends: None,
                key: TrustedKey::Pinned(key.verifying_key()),
                checkpoints: Some(ck_path.clone()),
                allow_torn_tail: true,
            },
        )
        .map_err(AuditError::Corrupt)?;
        if let Some(torn) = &report.torn_tail {
            tracing::warn!(file = %torn.file.display(), line = torn.line,
                "audit log ends in an incomplete record (crash mid-write); removing it");
            let f = OpenOptions::new()
                .write(true)
                .open(&torn.file)
                .map_err(|e| io_err(&torn.file, &e))?;
            f.set_len(torn.offset).map_err(|e| io_err(&torn.file, &e))?;
            f.sync_all().map_err(|e| io_err(&torn.file, &e))?;
        }
        if let Some(torn) = &report.torn_checkpoint {
            tracing::warn!(file = %ck_path.display(), line = torn.line,
                "checkpoint file ends in an incomplete checkpoint (crash mid-write); removing it");
            let f = OpenOptions::new()
                .write(true)
                .open(&ck_path)
                .map_err(|e| io_err(&ck_path, &e))?;
            f.set_len(torn.offset).map_err(|e| io_err(&ck_path, &e))?;
            f.sync_all().map_err(|e| io_err(&ck_path, &e))?;
        }
        let configured = cfg.origin.clone().unwrap_or_else(default_origin);
        let origin = match &report.origin {
            Some(existing) if *existing != configured => {
                tracing::info!(existing = %existing, configured = %configured,
                    "audit log keeps the origin its checkpoints already carry");
                existing.clone()
            }
            Some(existing) => existing.clone(),
            None => configured,
        };
        // Validate the origin as a key name now, not at the first checkpoint.
        checkpoint::sign("probe\n", &origin, &key).map_err(|e| AuditError::Key(e.to_string()))?;
        // Records left by a crash were written but maybe never synced: sync
        // them before a checkpoint covers them.
        file.sync_data().map_err(|e| io_err(&base, &e))?;
        let file_len = file.metadata().map_err(|e| io_err(&base, &e))?.len();
        let ck_file = open_append(&ck_path).map_err(|e| io_err(&ck_path, &e))?;
        let ck_len = ck_file.metadata().map_err(|e| io_err(&ck_path, &e))?.len();
        sync_dir(&base).map_err(|e| io_err(&base, &e))?;

        let shared = Arc::new(Shared {
            health: Mutex::new(Health {
                state: HealthState::Ok,
                path: base.clone(),
                records: report.records,
                last_checkpoint: report.last_checkpoint,
                write_failures: 0,
                queue_free: cfg.queue_capacity,
            }),
        });
        let vkey_line = format!(
            "{VKEY_EXTENSION}{}",
            checkpoint::verifier_key(&origin, &key.verifying_key())
        );
        let mut syncer = Syncer {
            base: base.clone(),
            key,
            origin,
            vkey_line,
            ck_path,
            ck_file,
            ck_len,
            durable_size: report.chain.tree.size(),
            durable_root: report.chain.tree.root(),
            last_checkpoint: report.last_checkpoint,
            last_checkpoint_at: Instant::now(),
            cfg: cfg.clone(),
            shared: shared.clone(),
            stopped: None,
        };
        // Cover what is already there (records written after the last checkpoint
        // before a crash) and create the checkpoint file on a fresh log. Failing
        // here is not fatal: health says so and appends will retry.
        if let Err(e) = syncer.checkpoint() {
            tracing::error!(error = %e, "cannot write the opening audit checkpoint");
        }
        let (sync_tx, sync_rx) = mpsc::channel();
        let sync_thread = std::thread::Builder::new()
            .name("kya-audit-sync".into())
            .spawn(move || syncer.run(sync_rx))
            .map_err(|e| AuditError::Unavailable(format!("cannot start the sync thread: {e}")))?;
        let sync_tx = ToSyncer {
            tx: sync_tx,
            thread: sync_thread.thread().clone(),
        };
        let core = Core {
            base,
            file: Arc::new(file),
            file_len,
            chain: report.chain,
            cfg: cfg.clone(),
            shared: shared.clone(),
            stopped: None,
            sync_tx,
            sync_thread: Some(sync_thread),
        };
        let permits = Arc::new(Semaphore::new(cfg.queue_capacity.max(1)));
        let (tx, rx) = mpsc::channel();
        let records = Arc::new(Records {
            core: Mutex::new(core),
            queue: Mutex::new(Vec::new()),
            tx: tx.clone(),
        });
        let writer = records.clone();
        let thread = std::thread::Builder::new()
            .name("kya-audit".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| AuditError::Unavailable(format!("cannot start the writer thread: {e}")))?;
        Ok(AuditLog {
            tx,
            records,
            permits,
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Append `event`. See the module docs for what each [`Durability`] promises.
    pub async fn append(
        &self,
        event: &DecisionEvent,
        durability: Durability,
    ) -> Result<Receipt, AuditError> {
        let json = encode(event)?;
        let slot = self.reserve(durability).await?;
        slot.send_json(json)?.await
    }

    /// Take a place in the writer's queue for one record, waiting for one
    /// (`Sync`) or failing with [`AuditError::QueueFull`] (`Group`) when the
    /// queue is full. Sending through the slot never waits, so a caller that
    /// must know whether its record was handed over (exactly once) can
    /// reserve, then send, then wait for the write.
    pub async fn reserve(&self, durability: Durability) -> Result<Slot<'_>, AuditError> {
        let permit = match durability {
            Durability::Sync => self
                .permits
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| AuditError::Unavailable("writer stopped".into()))?,
            Durability::Group => match self.permits.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(TryAcquireError::NoPermits) => return Err(AuditError::QueueFull),
                Err(TryAcquireError::Closed) => {
                    return Err(AuditError::Unavailable("writer stopped".into()))
                }
            },
        };
        Ok(Slot {
            log: self,
            permit,
            durability,
        })
    }

    /// Hand `event` to the writer without waiting for anything: for records
    /// that must be written from where nothing can be awaited (a decision
    /// dropped before it ended). Takes a queue place when one is free and
    /// goes past the bound otherwise (such records are bounded by the
    /// decisions in flight). Everything handed over before [`AuditLog::close`]
    /// is written before the final checkpoint.
    pub fn append_detached(&self, event: &DecisionEvent) -> Result<(), AuditError> {
        let json = encode(event)?;
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(TryAcquireError::NoPermits) => None,
            Err(TryAcquireError::Closed) => {
                return Err(AuditError::Unavailable("writer stopped".into()))
            }
        };
        let (reply, _) = oneshot::channel();
        self.records.submit(Pending {
            json,
            written: None,
            reply,
            _permit: permit,
        });
        Ok(())
    }

    /// The writer's current state.
    pub fn health(&self) -> Health {
        let mut h = match self.shared.health.lock() {
            Ok(h) => h.clone(),
            Err(p) => p.into_inner().clone(),
        };
        h.queue_free = self.permits.available_permits();
        h
    }

    /// Write a checkpoint now (if anything is new). Blocks until it is on disk.
    pub fn checkpoint(&self) -> Result<(), AuditError> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(Msg::Checkpoint(tx))
            .map_err(|_| AuditError::Unavailable("writer stopped".into()))?;
        rx.recv()
            .unwrap_or_else(|_| Err(AuditError::Unavailable("writer stopped".into())))
    }

    /// Commit everything queued, write the final checkpoint, stop the writer. Blocks.
    pub fn close(&self) -> Result<(), AuditError> {
        let (tx, rx) = mpsc::channel();
        let result = match self.tx.send(Msg::Shutdown(tx)) {
            Ok(()) => rx
                .recv()
                .unwrap_or_else(|_| Err(AuditError::Unavailable("writer stopped".into()))),
            Err(_) => Ok(()),
        };
        self.permits.close();
        let handle = match self.thread.lock() {
            Ok(mut t) => t.take(),
            Err(p) => p.into_inner().take(),
        };
        if let Some(h) = handle {
            if h.join().is_err() {
                tracing::error!("audit writer thread panicked");
            }
        }
        result
    }
}

/// A reserved place in the writer's queue (see [`AuditLog::reserve`]).
pub struct Slot<'a> {
    log: &'a AuditLog,
    permit: OwnedSemaphorePermit,
    durability: Durability,
}

impl Slot<'_> {
    /// Hand `event` to the writer now; the returned future resolves as
    /// [`AuditLog::append`] does. Once this returns `Ok`, the record is in the
    /// writer's queue whether or not the future is awaited.
    pub fn send(
        self,
        event: &DecisionEvent,
    ) -> Result<impl std::future::Future<Output = Result<Receipt, AuditError>>, AuditError> {
        let json = encode(event)?;
        self.send_json(json)
    }

    fn send_json(
        self,
        json: Vec<u8>,
    ) -> Result<impl std::future::Future<Output = Result<Receipt, AuditError>>, AuditError> {
        let (reply, rx) = oneshot::channel();
        let (written, written_rx) = match self.durability {
            Durability::Group => {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            }
            Durability::Sync => (None, None),
        };
        self.log.records.submit(Pending {
            json,
            written,
            reply,
            _permit: Some(self.permit),
        });
        Ok(async move {
            let receipt = Receipt::Pending(rx);
            match written_rx {
                None => Ok(Receipt::Durable(receipt.committed().await?)),
                // The record is in the file (a SIGKILL of kya cannot lose it) before
                // the caller answers anyone; its fdatasync follows in the group.
                Some(w) => match w.await {
                    Ok(Ok(_)) => Ok(receipt),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(AuditError::Unavailable("writer stopped".into())),
                },
            }
        })
    }
}

/// Check and serialise an event for the log.
fn encode(event: &DecisionEvent) -> Result<Vec<u8>, AuditError> {
    event
        .validate()
        .map_err(|e| AuditError::InvalidEvent(e.to_string()))?;
    let json = serde_json::to_vec(event).map_err(|e| AuditError::InvalidEvent(e.to_string()))?;
    // Room for the record envelope (seq, prev) around the event.
    let max = MAX_LINE_BYTES - 128;
    if json.len() > max {
        return Err(AuditError::EventTooLarge {
            size: json.len(),
            max,
        });
    }
    Ok(json)
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::error!(error = %e, "audit log did not close cleanly");
        }
    }
}

/// The writer thread: owns the live file and the chain; `write(2)`s batches
/// and never waits for `fdatasync` (except around a rotation).
struct Core {
    base: PathBuf,
    file: Arc<File>,
    file_len: u64,
    chain: Chain,
    cfg: AuditConfig,
    shared: Arc<Shared>,
    /// Why the writer refuses records, once it does.
    stopped: Option<String>,
    sync_tx: ToSyncer,
    sync_thread: Option<JoinHandle<()>>,
}

/// The way to the sync thread. While it gathers group records it sleeps
/// rather than waits on the channel, so a group record sent meanwhile wakes
/// no one (it is taken when the gathering ends: one wake-up per `fdatasync`,
/// not one per record); whatever someone waits for (a record written
/// durably, a barrier, a shutdown) wakes it.
struct ToSyncer {
    tx: mpsc::Sender<SyncMsg>,
    thread: std::thread::Thread,
}

impl ToSyncer {
    fn send(&self, msg: SyncMsg) -> Result<(), mpsc::SendError<SyncMsg>> {
        let wake = match &msg {
            SyncMsg::Job(job) => job.urgent,
            SyncMsg::Barrier(_) | SyncMsg::Shutdown(_) => true,
        };
        self.tx.send(msg)?;
        if wake {
            self.thread.unpark();
        }
        Ok(())
    }
}

struct Pending {
    json: Vec<u8>,
    written: Option<oneshot::Sender<Result<Committed, AuditError>>>,
    reply: oneshot::Sender<Result<Committed, AuditError>>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Pending {
    fn fail(self, err: AuditError) {
        if let Some(w) = self.written {
            let _ = w.send(Err(err.clone()));
        }
        let _ = self.reply.send(Err(err));
    }
}

/// The records being appended and the writer state they go through.
///
/// An appending caller writes its own record: it queues it, then, if no one
/// else is writing, takes the writer state and writes everything queued in one
/// `write(2)` (its own record and any queued meanwhile by others). If someone
/// else holds the state, the caller returns at once: the holder looks at the
/// queue again after letting go and writes what it finds. So no caller ever
/// waits for another thread to write its record, and none blocks on the lock.
struct Records {
    core: Mutex<Core>,
    queue: Mutex<Vec<Pending>>,
    /// To the writer thread (rotation, checkpoints, shutdown).
    tx: mpsc::Sender<Msg>,
}

impl Records {
    /// Queue `p` and write what is queued unless another writer is at it.
    fn submit(&self, p: Pending) {
        lock(&self.queue).push(p);
        self.write_queued();
    }

    /// Write the queue while no one else holds the writer state. Returns
    /// once the queue was seen empty after the state was let go, or someone
    /// else holds it (and will look at the queue after letting go).
    fn write_queued(&self) {
        loop {
            let mut core = match self.core.try_lock() {
                Ok(c) => c,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return,
            };
            let batch = std::mem::take(&mut *lock(&self.queue));
            let mut rotate = false;
            if !batch.is_empty() {
                core.commit(batch);
                rotate = core.due_for_rotation();
            }
            drop(core);
            if rotate {
                // The writer thread rotates, off the appending callers.
                let _ = self.tx.send(Msg::Rotate);
            }
            if lock(&self.queue).is_empty() {
                return;
            }
        }
    }

    /// The writer thread: rotation, checkpoints and shutdown, each with the
    /// writer state held (appends queue meanwhile and are written after).
    fn run(&self, rx: mpsc::Receiver<Msg>) {
        loop {
            let msg = match rx.recv() {
                Ok(m) => m,
                // Every handle is gone; `close` normally stops the thread first.
                Err(_) => return,
            };
            let shutdown = matches!(msg, Msg::Shutdown(_));
            {
                let mut core = lock(&self.core);
                let queued = std::mem::take(&mut *lock(&self.queue));
                core.commit(queued);
                match msg {
                    Msg::Rotate => {
                        if core.due_for_rotation() {
                            if let Err(e) = core.rotate() {
                                tracing::error!(error = %e, "audit log rotation failed");
                            }
                        }
                    }
                    Msg::Checkpoint(reply) => {
                        // The sync thread answers once everything is synced and signed.
                        if let Err(mpsc::SendError(SyncMsg::Barrier(reply))) =
                            core.sync_tx.send(SyncMsg::Barrier(reply))
                        {
                            let _ = reply
                                .send(Err(AuditError::Unavailable("sync thread stopped".into())));
                        }
                    }
                    Msg::Shutdown(reply) => {
                        let result = core.stop_syncer();
                        // Later appends fail; callers see it before we go.
                        core.stopped = Some("audit log closed".into());
                        core.shared.update(|h| {
                            h.state = HealthState::Stopped {
                                reason: "closed".into(),
                            }
                        });
                        let _ = reply.send(result);
                    }
                }
            }
            // Appends queued while the state was held.
            self.write_queued();
            if shutdown {
                return;
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Core {
    /// The live file reached its size and the log still takes records.
    fn due_for_rotation(&self) -> bool {
        self.stopped.is_none() && self.file_len >= self.cfg.rotate_bytes
    }

    /// Sync, checkpoint and stop the sync thread; wait for it.
    fn stop_syncer(&mut self) -> Result<(), AuditError> {
        let (tx, rx) = mpsc::channel();
        let result = match self.sync_tx.send(SyncMsg::Shutdown(tx)) {
            Ok(()) => rx
                .recv()
                .unwrap_or_else(|_| Err(AuditError::Unavailable("sync thread stopped".into()))),
            Err(_) => Err(AuditError::Unavailable("sync thread stopped".into())),
        };
        if let Some(h) = self.sync_thread.take() {
            if h.join().is_err() {
                tracing::error!("audit sync thread panicked");
            }
        }
        result
    }

    /// Sync everything written so far and write a checkpoint; wait for it.
    fn barrier(&mut self) -> Result<(), AuditError> {
        let (tx, rx) = mpsc::channel();
        self.sync_tx
            .send(SyncMsg::Barrier(tx))
            .map_err(|_| AuditError::Unavailable("sync thread stopped".into()))?;
        rx.recv()
            .unwrap_or_else(|_| Err(AuditError::Unavailable("sync thread stopped".into())))
    }

    /// Write one batch (one `write(2)`), tell group callers it is written, and
    /// hand it to the sync thread, which answers every caller once it is on disk.
    fn commit(&mut self, batch: Vec<Pending>) {
        if batch.is_empty() {
            return;
        }
        if self.stopped.is_none() {
            self.stopped = self.shared.stopped();
        }
        if let Some(reason) = &self.stopped {
            for p in batch {
                p.fail(AuditError::Unavailable(reason.clone()));
            }
            return;
        }
        let mut chain = self.chain.clone();
        let mut buf = Vec::with_capacity(batch.iter().map(|p| p.json.len() + 100).sum());
        let mut done = Vec::with_capacity(batch.len());
        for p in &batch {
            let line = compose(chain.next_seq, &chain.prev, &p.json);
            done.push(Committed {
                seq: chain.next_seq,
                leaf: leaf_hash(&line),
            });
            buf.extend_from_slice(&line);
            buf.push(b'\n');
            chain.push(&line);
        }
        match (&*self.file).write_all(&buf) {
            Ok(()) => {
                self.chain = chain;
                self.file_len += buf.len() as u64;
                self.shared.update(|h| {
                    if matches!(h.state, HealthState::Failing { .. }) {
                        tracing::info!("audit log writable again");
                        h.state = HealthState::Ok;
                    }
                });
                let mut replies = Vec::with_capacity(batch.len());
                let mut urgent = false;
                for (p, committed) in batch.into_iter().zip(done) {
                    match p.written {
                        Some(w) => {
                            let _ = w.send(Ok(committed));
                        }
                        None => urgent = true,
                    }
                    replies.push(Written {
                        reply: p.reply,
                        committed,
                        _permit: p._permit,
                    });
                }
                let job = SyncJob {
                    file: self.file.clone(),
                    size: self.chain.tree.size(),
                    root: self.chain.tree.root(),
                    replies,
                    urgent,
                };
                // If the sync thread is gone the replies drop: callers see
                // "writer stopped".
                let _ = self.sync_tx.send(SyncMsg::Job(job));
            }
            Err(e) => {
                let err = write_err(&self.base, &e);
                tracing::error!(error = %e, path = %self.base.display(), records = batch.len(),
                    "AUDIT LOG WRITE FAILED: consequential calls are denied until it recovers");
                self.repair(&err);
                for p in batch {
                    p.fail(err.clone());
                }
            }
        }
    }

    /// After a failed write: cut the file back to the last written length
    /// (batches before it are whole and are being synced).
    fn repair(&mut self, err: &AuditError) {
        let fixed = self
            .file
            .set_len(self.file_len)
            .and_then(|()| self.file.sync_data());
        let state = match fixed {
            Ok(()) => HealthState::Failing {
                error: err.to_string(),
            },
            Err(e) => {
                let reason = format!("{err}; and the partial record could not be removed: {e}");
                tracing::error!(%reason, "audit writer stopped");
                self.stopped = Some(reason.clone());
                HealthState::Stopped { reason }
            }
        };
        self.shared.update(|h| {
            h.write_failures += 1;
            h.state = state;
        });
    }

    /// Rename the live file to the next free number and start a new one; the chain continues.
    fn rotate(&mut self) -> Result<(), AuditError> {
        // Everything in the old file is synced and covered by a checkpoint first.
        self.barrier()?;
        let next = files::rotated(&self.base)
            .map_err(|e| io_err(&self.base, &e))?
            .last()
            .map(|(n, _)| n + 1)
            .unwrap_or(1);
        let target = files::rotated_name(&self.base, next);
        std::fs::rename(&self.base, &target).map_err(|e| io_err(&self.base, &e))?;
        match OpenOptions::new()
            .create_new(true)
            .append(true)
            .mode(0o640)
            .open(&self.base)
            .and_then(|f| sync_dir(&self.base).map(|()| f))
        {
            Ok(f) => {
                self.file = Arc::new(f);
                self.file_len = 0;
                tracing::info!(rotated = %target.display(), "audit log rotated");
                Ok(())
            }
            Err(e) => {
                // Keep appending to the renamed file: the chain stays intact, the
                // name is just unusual. Rotation is retried after the next batch.
                tracing::error!(error = %e, "cannot create a new audit log file after rotation");
                Err(io_err(&self.base, &e))
            }
        }
    }
}

/// The sync thread: `fdatasync`s what the writer wrote, answers the callers
/// waiting for durability, and signs checkpoints over what is durable.
struct Syncer {
    base: PathBuf,
    key: SigningKey,
    origin: String,
    vkey_line: String,
    ck_path: PathBuf,
    ck_file: File,
    ck_len: u64,
    /// Tree size and root of what is on disk.
    durable_size: u64,
    durable_root: Hash,
    last_checkpoint: Option<u64>,
    last_checkpoint_at: Instant,
    cfg: AuditConfig,
    shared: Arc<Shared>,
    stopped: Option<String>,
}

impl Syncer {
    fn run(mut self, rx: mpsc::Receiver<SyncMsg>) {
        loop {
            let due = self.last_checkpoint_at + self.cfg.checkpoint_interval;
            let wait = due.saturating_duration_since(Instant::now());
            let first = match rx.recv_timeout(wait) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => {
                    self.checkpoint_logged();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.checkpoint_logged();
                    return;
                }
            };
            let mut jobs: Vec<SyncJob> = Vec::new();
            let gathering_since = Instant::now();
            let mut next = Some(first);
            loop {
                while let Some(msg) = next.take() {
                    match msg {
                        SyncMsg::Job(job) => jobs.push(job),
                        SyncMsg::Barrier(reply) => {
                            self.sync(std::mem::take(&mut jobs));
                            let _ = reply.send(self.checkpoint());
                        }
                        SyncMsg::Shutdown(reply) => {
                            self.sync(std::mem::take(&mut jobs));
                            let _ = reply.send(self.checkpoint());
                            return;
                        }
                    }
                    // The queue's permits bound how many jobs can be waiting.
                    next = rx.try_recv().ok();
                }
                // Only group records, which no one waits for: gather more for
                // up to GROUP_DELAY, so one fdatasync covers them all instead
                // of one per record. Asleep, not waiting on the channel: the
                // group records sent meanwhile wake no one; what someone
                // waits for unparks (`ToSyncer`).
                if jobs.is_empty() || jobs.iter().any(|j| j.urgent) {
                    break;
                }
                let left =
                    (gathering_since + GROUP_DELAY).saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                std::thread::park_timeout(left);
                next = rx.try_recv().ok();
            }
            self.sync(jobs);
            let since = self.last_checkpoint.unwrap_or(0);
            if self.durable_size >= since + self.cfg.checkpoint_every.max(1)
                || Instant::now() >= self.last_checkpoint_at + self.cfg.checkpoint_interval
            {
                self.checkpoint_logged();
            }
        }
    }

    /// One `fdatasync` for everything written so far; answer every caller.
    fn sync(&mut self, jobs: Vec<SyncJob>) {
        let Some(last) = jobs.last() else {
            return;
        };
        if let Some(reason) = &self.stopped {
            let err = AuditError::Unavailable(reason.clone());
            for w in jobs.into_iter().flat_map(|j| j.replies) {
                let _ = w.reply.send(Err(err.clone()));
            }
            return;
        }
        let (size, root) = (last.size, last.root);
        // Normally one file; a batch before a rotation was synced at the barrier.
        let mut result = Ok(());
        let mut synced: Vec<&Arc<File>> = Vec::new();
        for j in &jobs {
            if !synced.iter().any(|f| Arc::ptr_eq(f, &j.file)) {
                result = j.file.sync_data();
                if result.is_err() {
                    break;
                }
                synced.push(&j.file);
            }
        }
        match result {
            Ok(()) => {
                self.durable_size = size;
                self.durable_root = root;
                self.shared.update(|h| h.records = size);
                for w in jobs.into_iter().flat_map(|j| j.replies) {
                    let _ = w.reply.send(Ok(w.committed));
                }
            }
            Err(e) => {
                // After a failed fdatasync the kernel may have dropped the dirty
                // pages: what the file holds is unknown, so nothing more is
                // appended. Restarting kya re-verifies the log.
                let err = write_err(&self.base, &e);
                let reason = format!(
                    "{err}; records written since the last successful sync may be lost; restart kya to re-verify the log"
                );
                tracing::error!(%reason, "AUDIT LOG SYNC FAILED: the audit writer stopped; consequential calls are denied");
                self.stopped = Some(reason.clone());
                self.shared.update(|h| {
                    h.write_failures += 1;
                    h.state = HealthState::Stopped { reason };
                });
                for w in jobs.into_iter().flat_map(|j| j.replies) {
                    let _ = w.reply.send(Err(err.clone()));
                }
            }
        }
    }

    fn checkpoint_logged(&mut self) {
        if let Err(e) = self.checkpoint() {
            tracing::error!(error = %e, "audit checkpoint failed");
        }
    }

    /// Sign and append a checkpoint for the durable tree, unless the last one covers it.
    fn checkpoint(&mut self) -> Result<(), AuditError> {
        self.last_checkpoint_at = Instant::now();
        let size = self.durable_size;
        if self.last_checkpoint == Some(size) || self.stopped.is_some() {
            return Ok(());
        }
        let cp = Checkpoint {
            origin: self.origin.clone(),
            size,
            root: self.durable_root,
            extensions: vec![self.vkey_line.clone()],
        };
        let note = checkpoint::sign(&cp.body(), &self.origin, &self.key)
            .map_err(|e| AuditError::Key(e.to_string()))?;
        let mut text = note.render();
        text.push('\n');
        let result = self
            .ck_file
            .write_all(text.as_bytes())
            .and_then(|()| self.ck_file.sync_data());
        match result {
            Ok(()) => {
                self.ck_len += text.len() as u64;
                self.last_checkpoint = Some(size);
                self.shared.update(|h| h.last_checkpoint = Some(size));
                Ok(())
            }
            Err(e) => {
                let err = write_err(&self.ck_path, &e);
                let fixed = self
                    .ck_file
                    .set_len(self.ck_len)
                    .and_then(|()| self.ck_file.sync_data());
                if let Err(e2) = fixed {
                    // A torn checkpoint makes the whole file unparseable: stop.
                    let reason =
                        format!("{err}; and the partial checkpoint could not be removed: {e2}");
                    self.stopped = Some(reason.clone());
                    self.shared
                        .update(|h| h.state = HealthState::Stopped { reason });
                } else {
                    self.shared.update(|h| {
                        h.write_failures += 1;
                        h.state = HealthState::Failing {
                            error: err.to_string(),
                        };
                    });
                }
                Err(err)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::event::tests::sample;
    use crate::audit::event::EventKind;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn cfg(dir: &Path) -> AuditConfig {
        let mut c = AuditConfig::new(dir.join("audit.jsonl"));
        c.origin = Some("test.example/kya-audit".into());
        c
    }

    fn verify_dir(dir: &Path, seed: u8) -> Result<verify::Report, Fault> {
        let base = dir.join("audit.jsonl");
        verify::verify(
            &files::log_set(&base).unwrap(),
            &VerifyOptions {
                ends: None,
                key: TrustedKey::Pinned(key(seed).verifying_key()),
                checkpoints: None,
                allow_torn_tail: false,
            },
        )
    }

    fn event(n: u64) -> DecisionEvent {
        sample(EventKind::ALL[(n % 5) as usize], n)
    }

    #[tokio::test]
    async fn sync_and_group_appends_commit_in_order_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(cfg(dir.path()), key(1)).unwrap();
        let mut receipts = Vec::new();
        for n in 0..20u64 {
            let d = if n % 3 == 0 {
                Durability::Sync
            } else {
                Durability::Group
            };
            let r = log.append(&event(n), d).await.unwrap();
            if d == Durability::Sync {
                assert!(matches!(r, Receipt::Durable(_)));
            }
            receipts.push(r);
        }
        for (n, r) in receipts.into_iter().enumerate() {
            assert_eq!(r.committed().await.unwrap().seq, n as u64);
        }
        assert_eq!(log.health().records, 20);
        assert!(log.health().is_writable());
        log.close().unwrap();
        assert!(matches!(log.health().state, HealthState::Stopped { .. }));
        assert!(matches!(
            log.append(&event(1), Durability::Group).await,
            Err(AuditError::Unavailable(_))
        ));
        let report = verify_dir(dir.path(), 1).unwrap();
        assert_eq!(report.records, 20);
        assert_eq!(
            report.last_checkpoint,
            Some(20),
            "shutdown writes a final checkpoint"
        );
        // The records hold the events as given.
        let text = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
        let third: serde_json::Value = serde_json::from_str(text.lines().nth(2).unwrap()).unwrap();
        let back: DecisionEvent = serde_json::from_value(third["event"].clone()).unwrap();
        assert_eq!(back, event(2));
    }

    /// What a SIGKILL of kya cannot lose: a group append has returned only
    /// once its record is in the file (written, maybe not yet synced).
    #[tokio::test]
    async fn a_group_append_is_in_the_file_when_it_returns() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(cfg(dir.path()), key(1)).unwrap();
        let path = dir.path().join("audit.jsonl");
        for n in 0..50u64 {
            let mut e = event(n);
            e.decision_id = format!("dec_written_{n}");
            let r = log.append(&e, Durability::Group).await.unwrap();
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(text.contains(&e.decision_id), "record {n} not written yet");
            drop(r);
        }
        log.close().unwrap();
        assert_eq!(verify_dir(dir.path(), 1).unwrap().records, 50);
    }

    #[tokio::test]
    async fn concurrent_appenders_get_unique_sequence_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(AuditLog::open(cfg(dir.path()), key(1)).unwrap());
        let mut tasks = Vec::new();
        for t in 0..8u64 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                let mut seqs = Vec::new();
                for i in 0..100u64 {
                    let d = if i % 10 == 0 {
                        Durability::Sync
                    } else {
                        Durability::Group
                    };
                    let r = loop {
                        match log.append(&event(t * 1000 + i), d).await {
                            Err(AuditError::QueueFull) => tokio::task::yield_now().await,
                            other => break other.unwrap(),
                        }
                    };
                    seqs.push(r.committed().await.unwrap().seq);
                }
                seqs
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all.sort();
        assert_eq!(all, (0..800).collect::<Vec<_>>());
        log.close().unwrap();
        assert_eq!(verify_dir(dir.path(), 1).unwrap().records, 800);
    }

    /// Appenders on many threads at once, while the log rotates: whoever
    /// holds the writer state writes what the others queued; every record is
    /// written exactly once, in one chain.
    #[test]
    fn appenders_on_many_threads_each_record_written_once_across_rotations() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path());
        c.rotate_bytes = 64 << 10;
        c.checkpoint_every = 100;
        let log = Arc::new(AuditLog::open(c, key(1)).unwrap());
        let threads: Vec<_> = (0..6u64)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .build()
                        .unwrap();
                    rt.block_on(async {
                        let mut seqs = Vec::new();
                        for i in 0..300u64 {
                            let n = t * 10_000 + i;
                            if i % 7 == 0 {
                                log.append_detached(&event(n)).unwrap();
                                continue;
                            }
                            let r = loop {
                                match log.append(&event(n), Durability::Group).await {
                                    Err(AuditError::QueueFull) => tokio::task::yield_now().await,
                                    other => break other.unwrap(),
                                }
                            };
                            seqs.push(r.committed().await.unwrap().seq);
                        }
                        seqs
                    })
                })
            })
            .collect();
        let mut seqs: Vec<u64> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        log.close().unwrap();
        let report = verify_dir(dir.path(), 1).unwrap();
        // 300 per thread, of which 43 detached (i % 7 == 0).
        assert_eq!(report.records, 6 * 300);
        let before = seqs.len();
        seqs.sort();
        seqs.dedup();
        assert_eq!(seqs.len(), before, "a sequence number given twice");
        let set = files::log_set(&dir.path().join("audit.jsonl")).unwrap();
        assert!(set.len() >= 3, "rotated while appending: {set:?}");
    }

    #[tokio::test]
    async fn reopen_continues_the_chain_and_the_tree() {
        let dir = tempfile::tempdir().unwrap();
        for round in 0..3u64 {
            let log = AuditLog::open(cfg(dir.path()), key(1)).unwrap();
            assert_eq!(log.health().records, round * 5);
            for n in 0..5 {
                log.append(&event(round * 5 + n), Durability::Sync)
                    .await
                    .unwrap();
            }
            drop(log); // drop closes and checkpoints
        }
        let report = verify_dir(dir.path(), 1).unwrap();
        assert_eq!(report.records, 15);
        assert_eq!(report.last_checkpoint, Some(15));
    }

    #[tokio::test]
    async fn a_torn_final_record_is_dropped_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(cfg(dir.path()), key(1)).unwrap();
        for n in 0..4 {
            log.append(&event(n), Durability::Sync).await.unwrap();
        }
        log.close().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":4,\"prev\":\"ab").unwrap();
        drop(f);
        assert!(
            verify_dir(dir.path(), 1).is_err(),
            "strict verification sees the torn line"
        );
        let log = AuditLog::open(cfg(dir.path()), key(1)).unwrap();
        assert_eq!(log.health().records, 4);
        let c = log
            .append(&event(4), Durability::Sync)
            .await
            .unwrap()
            .committed()
            .await
            .unwrap();
        assert_eq!(c.seq, 4);
        log.close().unwrap();
        assert_eq!(verify_dir(dir.path(), 1).unwrap().records, 5);
    }

    #[tokio::test]
    async fn a_torn_final_checkpoint_is_dropped_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(cfg(dir.path()), key(1)).unwrap();
        for n in 0..3 {
            log.append(&event(n), Durability::Sync).await.unwrap();
        }
        log.close().unwrap();
        let ck = dir.path().join("audit.jsonl.checkpoints");
        let whole = std::fs::read(&ck).unwrap();
        // Half of a checkpoint, as a crash mid-write leaves it.
        let mut f = OpenOptions::new().append(true).open(&ck).unwrap();
        f.write_all(b"test.example/kya-audit\n3\nAbC").unwrap();
        drop(f);
        assert!(
            verify_dir(dir.path(), 1).is_err(),
            "strict verification reports it"
        );
        let log = AuditLog::open(cfg(dir.path()), key(1)).unwrap();
        assert_eq!(
            std::fs::read(&ck).unwrap(),
            whole,
            "the torn note was removed"
        );
        log.append(&event(3), Durability::Sync).await.unwrap();
        log.close().unwrap();
        assert_eq!(verify_dir(dir.path(), 1).unwrap().records, 4);
    }

    #[tokio::test]
    async fn a_tampered_or_foreign_log_is_not_appended_to() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(cfg(dir.path()), key(1)).unwrap();
        for n in 0..4 {
            log.append(&event(n), Durability::Sync).await.unwrap();
        }
        log.close().unwrap();
        assert!(matches!(
            AuditLog::open(cfg(dir.path()), key(2)),
            Err(AuditError::Corrupt(_))
        ));
        let path = dir.path().join("audit.jsonl");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[30] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        match AuditLog::open(cfg(dir.path()), key(1)) {
            Err(AuditError::Corrupt(f)) => assert_eq!(f.line, 1, "{f}"),
            Err(other) => panic!("unexpected error {other}"),
            Ok(_) => panic!("opened a tampered log"),
        }
    }

    #[tokio::test]
    async fn rotation_keeps_one_chain_across_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path());
        c.rotate_bytes = 4000;
        c.checkpoint_every = 7;
        let log = AuditLog::open(c.clone(), key(1)).unwrap();
        for n in 0..40 {
            log.append(&event(n), Durability::Sync).await.unwrap();
        }
        log.close().unwrap();
        let set = files::log_set(&dir.path().join("audit.jsonl")).unwrap();
        assert!(set.len() >= 4, "{set:?}");
        let report = verify_dir(dir.path(), 1).unwrap();
        assert_eq!(report.records, 40);
        assert!(report.checkpoints >= 6, "{}", report.checkpoints);
        // Reopen after rotation and keep going.
        let log = AuditLog::open(c, key(1)).unwrap();
        log.append(&event(40), Durability::Sync).await.unwrap();
        log.close().unwrap();
        assert_eq!(verify_dir(dir.path(), 1).unwrap().records, 41);
        // A set with a file missing does not verify.
        let mut gap = set.clone();
        gap.remove(1);
        let opts = VerifyOptions {
            ends: None,
            key: TrustedKey::Pinned(key(1).verifying_key()),
            checkpoints: None,
            allow_torn_tail: false,
        };
        let fault = verify::verify(&gap, &opts).unwrap_err();
        assert!(fault.what.contains("sequence"), "{fault}");
    }

    #[tokio::test]
    async fn bad_events_are_refused_before_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(cfg(dir.path()), key(1)).unwrap();
        let mut e = event(0);
        e.verdict = kya_common::Verdict::Hold;
        e.kind = EventKind::Decision;
        assert!(matches!(
            log.append(&e, Durability::Sync).await,
            Err(AuditError::InvalidEvent(_))
        ));
        let mut huge = event(0);
        huge.reason = "x".repeat(MAX_LINE_BYTES);
        assert!(matches!(
            log.append(&huge, Durability::Group).await,
            Err(AuditError::EventTooLarge { .. })
        ));
        assert_eq!(log.health().records, 0);
        log.close().unwrap();
    }

    #[tokio::test]
    async fn interval_checkpoints_are_written_without_traffic() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path());
        c.checkpoint_interval = Duration::from_millis(20);
        let log = AuditLog::open(c, key(1)).unwrap();
        log.append(&event(0), Durability::Sync).await.unwrap();
        // Wait (bounded) for the timer to sign the new head.
        for _ in 0..200 {
            if log.health().last_checkpoint == Some(1) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(log.health().last_checkpoint, Some(1));
        log.close().unwrap();
    }

    #[test]
    fn unwritable_location_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, "").unwrap();
        let c = AuditConfig::new(blocker.join("audit.jsonl"));
        assert!(matches!(
            AuditLog::open(c, key(1)),
            Err(AuditError::Io { .. })
        ));
    }
}
