//! Once started, the daemon gives up every capability it does not need to keep
//! running, on every one of its threads, and sets `no_new_privs`.
//!
//! Linux keeps capability sets, the bounding set and `no_new_privs` per
//! thread, and the async runtime's threads exist before start-up ends, so a
//! drop on the calling thread alone would leave the threads that parse agent
//! and server bytes with everything. Each thread is therefore made to drop its
//! own: a real-time signal is sent to every thread of the process, whose
//! handler makes the same few system calls (all async-signal-safe). The result
//! is then read back from the kernel (`/proc/self/task/TID/status`) for every
//! thread, threads still privileged (started meanwhile) are signalled again,
//! and the drop fails unless every thread ends with no capability outside the
//! kept set. A thread started later inherits its creator's reduced sets.
//!
//! Under the shipped unit the process already has only the kept set, as the
//! user `kya`; this makes `kya run` started by hand as root keep no more. It
//! stays uid 0 there: switching users would also change which files it owns
//! (the state directory, the pins), which the unit arranges and a hand-started
//! root daemon does not.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::privileges::{parse_masks, Masks};

/// What the daemon keeps, and why (the same set the unit grants):
/// `CAP_NET_BIND_SERVICE` (a listener below 1024 in a container's namespace
/// that appears later), `CAP_NET_ADMIN` (`SO_MARK` on upstream sockets,
/// attaching programs), `CAP_SYS_PTRACE` (other users' `/proc/PID/exe` and
/// `ns/net`), `CAP_SYS_ADMIN` (`setns` into containers), `CAP_PERFMON` and
/// `CAP_BPF` (a policy reload that selects by script loads one more program).
pub(crate) const KEEP: u64 = (1 << 10) | (1 << 12) | (1 << 19) | (1 << 21) | (1 << 38) | (1 << 39);

/// Why the capabilities could not be dropped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CapDropError {
    #[error("installing the capability-drop signal handler: {0}")]
    Handler(#[source] std::io::Error),
    #[error("reading the capability sets: {0}")]
    Read(String),
    #[error(
        "thread {tid} still has capabilities outside the kept set after {rounds} rounds: {why}"
    )]
    Kept { tid: i32, rounds: u32, why: String },
}

/// The mask to keep, for the handler (a signal handler reads only statics).
static MASK: AtomicU64 = AtomicU64::new(0);
/// The inheritable set to keep (the current one, less what is dropped).
static INHERIT: AtomicU64 = AtomicU64::new(0);
/// The highest capability number this kernel knows.
static LAST_CAP: AtomicU64 = AtomicU64::new(40);
/// Whether the bounding set is dropped too (needs `CAP_SETPCAP`).
static BOUNDING: AtomicBool = AtomicBool::new(true);
/// Handler runs that failed a system call.
static FAILED: AtomicUsize = AtomicUsize::new(0);

/// The signal: a real-time one above those the C library keeps for itself.
fn signal() -> libc::c_int {
    libc::SIGRTMIN() + 6
}

/// Drop, on this thread, every capability outside `MASK` from the bounding,
/// permitted, effective and inheritable sets, and set `no_new_privs`. Only
/// async-signal-safe system calls; `errno` is left as it was found.
fn drop_here() -> bool {
    // SAFETY: prctl and capset with valid arguments; errno is saved and restored.
    unsafe {
        let errno = *libc::__errno_location();
        let keep = MASK.load(Ordering::SeqCst);
        let inherit = INHERIT.load(Ordering::SeqCst) & keep;
        let mut ok = libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0;
        let bounding = BOUNDING.load(Ordering::SeqCst);
        for cap in 0..=LAST_CAP.load(Ordering::SeqCst).min(63) {
            if !bounding || keep & (1 << cap) != 0 {
                continue;
            }
            // Dropping needs CAP_SETPCAP; a bit already gone needs nothing.
            if libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) == 1
                && libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0
            {
                ok = false;
            }
        }
        let header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let mut data = [CapData::default(); 2];
        if libc::syscall(libc::SYS_capget, &header, data.as_mut_ptr()) != 0 {
            ok = false;
        } else {
            for (i, d) in data.iter_mut().enumerate() {
                let shift = 32 * i;
                let k = (keep >> shift) as u32;
                d.effective &= k;
                d.permitted &= k;
                d.inheritable = (inherit >> shift) as u32 & d.permitted;
            }
            if libc::syscall(libc::SYS_capset, &header, data.as_ptr()) != 0 {
                ok = false;
            }
        }
        *libc::__errno_location() = errno;
        ok
    }
}

extern "C" fn on_signal(_: libc::c_int) {
    if !drop_here() {
        FAILED.fetch_add(1, Ordering::SeqCst);
    }
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
const CAP_SETPCAP: u32 = 8;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// What a thread has beyond `keep` (`None`: nothing, and `no_new_privs` is
/// set); the bounding set counts when `bounding`.
fn excess(m: &Masks, keep: u64, bounding: bool) -> Option<String> {
    let mut why = Vec::new();
    for (set, mask) in [
        ("effective", m.effective),
        ("permitted", m.permitted),
        ("inheritable", m.inheritable),
        ("ambient", m.ambient),
        ("bounding", if bounding { m.bounding } else { 0 }),
    ] {
        if mask & !keep != 0 {
            why.push(format!("{set} {:#x}", mask & !keep));
        }
    }
    if !m.no_new_privs {
        why.push("no_new_privs unset".into());
    }
    (!why.is_empty()).then(|| why.join(", "))
}

/// The threads of this process that still have something beyond `keep`.
fn threads_over(keep: u64, bounding: bool) -> Result<Vec<(i32, String)>, CapDropError> {
    let unreadable = |e: std::io::Error| CapDropError::Read(format!("/proc/self/task: {e}"));
    let mut over = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").map_err(unreadable)? {
        let entry = entry.map_err(unreadable)?;
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<i32>().ok())
        else {
            continue;
        };
        // A thread that ended meanwhile has nothing left to drop.
        let Ok(text) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let m = parse_masks(&text)
            .ok_or_else(|| CapDropError::Read(format!("unexpected status of thread {tid}")))?;
        if let Some(why) = excess(&m, keep, bounding) {
            over.push((tid, why));
        }
    }
    Ok(over)
}

/// Drop every capability outside [`KEEP`] on every thread of this process and
/// set `no_new_privs`, checked afterwards against the kernel's own account of
/// each thread. Returns how many signals it took.
pub(crate) fn drop_to_kept() -> Result<usize, CapDropError> {
    drop_all_but(KEEP)
}

fn drop_all_but(keep: u64) -> Result<usize, CapDropError> {
    let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .unwrap_or(63);
    LAST_CAP.store(last, Ordering::SeqCst);
    MASK.store(keep, Ordering::SeqCst);
    let own = std::fs::read_to_string("/proc/thread-self/status")
        .ok()
        .and_then(|t| parse_masks(&t))
        .ok_or_else(|| CapDropError::Read("/proc/thread-self/status".into()))?;
    INHERIT.store(own.inheritable, Ordering::SeqCst);
    // Without CAP_SETPCAP (a non-root daemon given its capabilities another
    // way) the bounding set cannot shrink. It then gives nothing back:
    // with no_new_privs set, no execve can raise what a thread permits.
    let bounding = own.effective & (1 << CAP_SETPCAP) != 0;
    if !bounding && own.bounding & !keep != 0 {
        tracing::warn!(
            bounding = format_args!("{:#x}", own.bounding),
            "without CAP_SETPCAP the bounding set stays as it is (no_new_privs keeps it unused)"
        );
    }
    BOUNDING.store(bounding, Ordering::SeqCst);
    FAILED.store(0, Ordering::SeqCst);
    let sig = signal();
    install(sig).map_err(CapDropError::Handler)?;
    let pid = std::process::id() as libc::pid_t;
    let mut signalled = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut rounds = 0;
    loop {
        let over = threads_over(keep, bounding)?;
        let Some((tid, why)) = over.first().cloned() else {
            return Ok(signalled);
        };
        if FAILED.load(Ordering::SeqCst) > 0 || Instant::now() > deadline {
            return Err(CapDropError::Kept { tid, rounds, why });
        }
        rounds += 1;
        for (tid, _) in over {
            // SAFETY: tgkill to a thread of this process; the handler is installed.
            if unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, sig) } == 0 {
                signalled += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Install [`on_signal`] for `sig`.
fn install(sig: libc::c_int) -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; the handler only makes
    // async-signal-safe system calls and touches atomics.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masks(eff: u64, bnd: u64, nnp: bool) -> Masks {
        Masks {
            effective: eff,
            permitted: eff,
            inheritable: 0,
            bounding: bnd,
            ambient: 0,
            no_new_privs: nnp,
        }
    }

    #[test]
    fn only_the_kept_set_with_no_new_privs_is_enough() {
        assert_eq!(excess(&masks(KEEP, KEEP, true), KEEP, true), None);
        assert_eq!(excess(&masks(0, 0, true), KEEP, true), None);
        let root = excess(&masks(0x1ff_ffff_ffff, 0x1ff_ffff_ffff, false), KEEP, true).unwrap();
        assert!(root.contains("effective"), "{root}");
        assert!(root.contains("bounding"), "{root}");
        assert!(root.contains("no_new_privs"), "{root}");
        // One capability past the set in the bounding set alone is too much.
        let one = excess(&masks(KEEP, KEEP | 1, true), KEEP, true).unwrap();
        assert_eq!(one, "bounding 0x1");
        // Unless it cannot shrink (no CAP_SETPCAP); no_new_privs still counts.
        assert_eq!(excess(&masks(KEEP, KEEP | 1, true), KEEP, false), None);
        assert!(excess(&masks(KEEP, KEEP, false), KEEP, false).is_some());
    }

    const CHILD: &str = "KYA_CAPDROP_CHILD";

    /// The drop is for the whole process, so it runs in a child process of
    /// this test binary: threads started before it (asleep, blocked on a
    /// channel, the async runtime's) and after it all end with no more than
    /// the kept set, and as root a dropped capability is really gone.
    #[test]
    fn every_thread_drops_and_threads_started_later_inherit() {
        if std::env::var_os(CHILD).is_some() {
            child();
            return;
        }
        crate::test_child::rerun_alone(
            "capdrop::tests::every_thread_drops_and_threads_started_later_inherit",
            (CHILD, "1"),
            &[],
            "capdrop child: ok",
        );
    }

    fn child() {
        use std::sync::mpsc;
        use std::thread;
        let root = nix::unistd::geteuid().is_root();
        let (tx, rx) = mpsc::channel::<u32>();
        let waiter = thread::spawn(move || rx.recv().unwrap());
        let sleeper = thread::spawn(|| thread::sleep(Duration::from_millis(300)));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let signalled = drop_to_kept().unwrap();
        if root {
            // At least the runtime's workers, the waiter, the sleeper and this one.
            assert!(signalled >= 5, "{signalled}");
        }
        // Threads blocked when signalled carry on.
        tx.send(7).unwrap();
        assert_eq!(waiter.join().unwrap(), 7);
        sleeper.join().unwrap();
        assert_eq!(
            rt.block_on(async { tokio::spawn(async { 1 }).await.unwrap() }),
            1
        );
        let later = thread::spawn(|| {
            parse_masks(&std::fs::read_to_string("/proc/thread-self/status").unwrap()).unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(later.effective & !KEEP, 0);
        assert!(later.no_new_privs);
        let bounding = root;
        assert_eq!(threads_over(KEEP, bounding).unwrap(), vec![]);
        if root {
            assert_eq!(later.bounding & !KEEP, 0);
            // CAP_CHOWN is gone: root cannot give its own file away.
            let dir = tempfile::tempdir().unwrap();
            let f = dir.path().join("f");
            std::fs::write(&f, "x").unwrap();
            assert_eq!(
                nix::unistd::chown(&f, Some(nix::unistd::Uid::from_raw(1)), None),
                Err(nix::errno::Errno::EPERM)
            );
        }
        println!("capdrop child: ok");
    }

    #[test]
    fn kept_is_the_units_set() {
        let unit = include_str!("../../packaging/kya.service");
        let line = unit
            .lines()
            .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
            .unwrap();
        let names: Vec<&str> = line.split_whitespace().collect();
        let mut mask = 0u64;
        for n in &names {
            let bit = crate::privileges::bit(n).unwrap_or_else(|| panic!("unknown {n}"));
            mask |= 1 << bit;
        }
        assert_eq!(mask, KEEP);
    }
}
