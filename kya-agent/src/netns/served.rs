//! The namespaces kya serves: one listener pair per network namespace that
//! holds selected processes, opened inside it, announced to the kernel once
//! ready, closed when the namespace has no selected process left.

use super::enter::Namespace;
use crate::bpf::Redirector;
use crate::intercept::listener::{bind_socket, Acceptor};
use kya_common::maps::KYA_MAX_NETNS;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::net::TcpSocket;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

/// How often the selected processes' namespaces are looked at without a
/// kernel report.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);
/// The least time between two looks (a flood of refused connects costs at
/// most this many scans).
const RECONCILE_MIN_GAP: Duration = Duration::from_millis(50);
/// How long a namespace whose listener could not be opened waits before
/// the next attempt.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// One namespace as `kya status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServedNamespace {
    /// The namespace's inode (`net:[INODE]`).
    pub inode: u64,
    /// The kernel's cookie of the namespace (0 until it was joined).
    pub cookie: u64,
    /// `ready` (the kernel redirects there) or `failed` (no listener: the
    /// selected processes' guarded connects are refused).
    pub state: &'static str,
    /// The listeners open in it (`127.0.0.1:PORT`, `[::1]:PORT`).
    pub listeners: Vec<String>,
    /// Selected processes in it.
    pub processes: usize,
    /// One of them (to find the namespace: `/proc/PID/ns/net`).
    pub example_pid: u32,
    /// The container that process runs in, by its cgroup path (informative:
    /// a namespace can be shared by several containers, as in a pod).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<kya_common::ContainerIdentity>,
    /// Since when it is in this state (RFC 3339).
    pub since: String,
    /// Why the listener could not be opened (`failed`), or why IPv6 is not
    /// served there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

struct Entry {
    ns: Option<Arc<Namespace>>,
    view: ServedNamespace,
    loops: Vec<JoinHandle<()>>,
    tried: Instant,
}

impl Entry {
    /// A namespace not served (yet): no listener, no thread; `error` says why
    /// when that is known already.
    fn failed(
        inode: u64,
        pid: u32,
        processes: usize,
        container: Option<kya_common::ContainerIdentity>,
        error: Option<String>,
    ) -> Self {
        Entry {
            ns: None,
            view: ServedNamespace {
                inode,
                cookie: 0,
                state: "failed",
                listeners: Vec::new(),
                processes,
                example_pid: pid,
                container,
                since: now(),
                error,
            },
            loops: Vec::new(),
            tried: Instant::now(),
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        for l in &self.loops {
            l.abort();
        }
    }
}

/// Errors opening a namespace's listener.
#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Enter(#[from] super::enter::EnterError),
    #[error("{0}")]
    Listen(#[from] crate::intercept::listener::ListenError),
    #[error("the process left the namespace while it was being joined")]
    Raced,
    #[error("the redirect is stopped")]
    Stopped,
    #[error("{0}")]
    Bpf(#[from] crate::bpf::BpfError),
}

/// Serves every network namespace holding selected processes.
pub struct NetnsServer {
    port: u16,
    acceptor: Acceptor,
    redirector: Arc<Mutex<Option<Redirector>>>,
    host_inode: Option<u64>,
    served: Mutex<BTreeMap<u64, Entry>>,
    runtime: tokio::runtime::Handle,
}

impl NetnsServer {
    /// A server for listen port `port`, feeding `acceptor`. Needs a tokio
    /// runtime.
    pub fn new(
        port: u16,
        acceptor: Acceptor,
        redirector: Arc<Mutex<Option<Redirector>>>,
    ) -> Arc<NetnsServer> {
        let host_inode = std::fs::metadata("/proc/self/ns/net").map(|m| m.ino()).ok();
        Arc::new(NetnsServer {
            port,
            acceptor,
            redirector,
            host_inode,
            served: Mutex::new(BTreeMap::new()),
            runtime: tokio::runtime::Handle::current(),
        })
    }

    /// Reconciles now, then whenever `wake` fires and at least every
    /// second, until `stop` turns true; then closes every namespace's
    /// listeners (the kernel refuses their connects from then on).
    pub fn spawn(
        self: Arc<Self>,
        wake: Arc<Notify>,
        mut stop: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                let me = self.clone();
                if let Err(e) = tokio::task::spawn_blocking(move || me.reconcile()).await {
                    tracing::error!(error = %e, "network namespace reconcile failed");
                }
                tokio::time::sleep(RECONCILE_MIN_GAP).await;
                tokio::select! {
                    _ = stop.changed() => break,
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(RECONCILE_EVERY) => {}
                }
            }
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.clear()).await;
        })
    }

    /// The namespaces served now, by inode.
    pub fn status(&self) -> Vec<ServedNamespace> {
        match self.served.lock() {
            Ok(s) => s.values().map(|e| e.view.clone()).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// One look: the namespaces of the selected processes are served, the
    /// others are not. Blocking (reads /proc, joins namespaces).
    pub fn reconcile(&self) {
        let Some(pids) = self.selected_pids() else {
            return;
        };
        // inode -> (processes, one pid)
        let mut wanted: BTreeMap<u64, (usize, u32)> = BTreeMap::new();
        for pid in pids {
            let Ok(md) = std::fs::metadata(format!("/proc/{pid}/ns/net")) else {
                continue; // exited
            };
            if Some(md.ino()) == self.host_inode {
                continue;
            }
            let e = wanted.entry(md.ino()).or_insert((0, pid));
            e.0 += 1;
        }
        let Ok(mut served) = self.served.lock() else {
            return;
        };
        let gone: Vec<u64> = served
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        for inode in gone {
            if let Some(entry) = served.remove(&inode) {
                self.retire(entry);
            }
        }
        for (inode, (processes, pid)) in wanted {
            if let Some(e) = served.get_mut(&inode) {
                e.view.processes = processes;
                e.view.example_pid = pid;
                if e.view.state == "ready" || e.tried.elapsed() < RETRY_AFTER {
                    continue;
                }
            }
            let last_error = served.get(&inode).and_then(|e| e.view.error.clone());
            let ready = served.values().filter(|e| e.view.state == "ready").count();
            let entry = if ready >= KYA_MAX_NETNS as usize {
                // bounded: the kernel's map holds this many; the rest stay
                // refused, without a thread or a socket each
                self.refuse(inode, pid, processes, last_error.as_deref())
            } else {
                self.open(inode, pid, processes, last_error.as_deref())
            };
            served.insert(inode, entry);
        }
    }

    fn selected_pids(&self) -> Option<BTreeSet<u32>> {
        let guard = self.redirector.lock().ok()?;
        let r = guard.as_ref()?;
        if r.host_netns_cookie() == 0 {
            return None; // the kernel cannot tell namespaces apart
        }
        match r.selected_processes() {
            Ok(m) => Some(m.into_keys().collect()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the selected processes");
                None
            }
        }
    }

    /// A new attempt to serve namespace `inode` (through `/proc/PID/ns/net`);
    /// `last_error`: why the previous attempt failed (the same failure again
    /// is not logged as a warning again).
    fn open(&self, inode: u64, pid: u32, processes: usize, last_error: Option<&str>) -> Entry {
        let container = crate::bpf::cgroup_path_of_pid(pid)
            .ok()
            .and_then(|cg| kya_common::container_of_cgroup(&cg));
        let mut entry = Entry::failed(inode, pid, processes, container, None);
        match self.try_open(inode, pid, &mut entry) {
            Ok(()) => {
                entry.view.state = "ready";
                tracing::info!(
                    netns = inode,
                    cookie = entry.view.cookie,
                    pid,
                    listeners = ?entry.view.listeners,
                    "serving a network namespace"
                );
            }
            Err(e) => {
                for l in entry.loops.drain(..) {
                    l.abort();
                }
                entry.ns = None; // its thread ends
                entry.view.listeners.clear();
                let error = e.to_string();
                if last_error == Some(error.as_str()) {
                    tracing::debug!(netns = inode, pid, %error, "still cannot serve a network namespace");
                } else {
                    tracing::warn!(netns = inode, pid, %error, "cannot serve a network namespace; its selected processes' connections are refused");
                }
                entry.view.error = Some(error);
            }
        }
        entry
    }

    /// A namespace kya will not serve because it serves as many as the
    /// kernel's map holds already.
    fn refuse(&self, inode: u64, pid: u32, processes: usize, last_error: Option<&str>) -> Entry {
        let error = format!("kya serves {KYA_MAX_NETNS} network namespaces already");
        if last_error != Some(error.as_str()) {
            tracing::warn!(netns = inode, pid, %error, "cannot serve a network namespace; its selected processes' connections are refused");
        }
        Entry::failed(inode, pid, processes, None, Some(error))
    }

    fn try_open(&self, inode: u64, pid: u32, entry: &mut Entry) -> Result<(), ServeError> {
        let file = File::open(format!("/proc/{pid}/ns/net"))?;
        if file.metadata()?.ino() != inode {
            return Err(ServeError::Raced);
        }
        let ns = Arc::new(Namespace::enter(file, inode)?);
        entry.view.cookie = ns.cookie();
        entry.ns = Some(ns.clone());
        let _rt = self.runtime.enter();
        // IPv4 is required; a namespace without IPv6 (common in containers)
        // is served on IPv4 only, and its IPv6 connects find no listener
        // (refused).
        let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let l4 = self.listen_in(&ns, v4)?;
        entry.loops.push(self.acceptor.spawn(l4, Some(ns.clone())));
        entry.view.listeners.push(v4.to_string());
        let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, self.port));
        match self.listen_in(&ns, v6) {
            Ok(l6) => {
                entry.loops.push(self.acceptor.spawn(l6, Some(ns.clone())));
                entry.view.listeners.push(v6.to_string());
            }
            // no ::1 there: nobody else can listen on it either
            Err(e) if no_ipv6(&e) => entry.view.error = Some(format!("IPv6 not served: {e}")),
            // ::1 exists and something else holds the port: its IPv6
            // connects would reach that instead of kya, so not served at all
            Err(e) => return Err(e),
        }
        let mut guard = self.redirector.lock().map_err(|_| ServeError::Stopped)?;
        let r = guard.as_mut().ok_or(ServeError::Stopped)?;
        r.serve_netns(ns.cookie())?;
        Ok(())
    }

    fn listen_in(
        &self,
        ns: &Namespace,
        addr: SocketAddr,
    ) -> Result<tokio::net::TcpListener, ServeError> {
        let fd = ns.socket_blocking(addr.is_ipv6())?;
        let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
        Ok(bind_socket(socket, addr)?)
    }

    /// The kernel forgets the namespace first (its connects are refused from
    /// now on), then its listeners close. Open connections run to their end.
    fn retire(&self, entry: Entry) {
        if entry.view.state == "ready" {
            if let Ok(mut guard) = self.redirector.lock() {
                if let Some(r) = guard.as_mut() {
                    if let Err(e) = r.unserve_netns(entry.view.cookie) {
                        tracing::error!(netns = entry.view.inode, error = %e, "cannot remove a network namespace from the kernel's served set");
                    }
                }
            }
        }
        tracing::info!(
            netns = entry.view.inode,
            cookie = entry.view.cookie,
            "network namespace no longer served (no selected process left in it)"
        );
        drop(entry);
    }

    /// Stops serving every namespace.
    fn clear(&self) {
        let entries: Vec<Entry> = match self.served.lock() {
            Ok(mut s) => std::mem::take(&mut *s).into_values().collect(),
            Err(_) => return,
        };
        for e in entries {
            self.retire(e);
        }
    }
}

/// The namespace has no IPv6 loopback (IPv6 disabled, as in many
/// containers), as opposed to a port someone else holds.
fn no_ipv6(e: &ServeError) -> bool {
    let io = match e {
        ServeError::Io(io) => io,
        ServeError::Listen(crate::intercept::listener::ListenError::Bind { source, .. }) => source,
        _ => return false,
    };
    matches!(
        io.raw_os_error(),
        Some(libc::EADDRNOTAVAIL | libc::EAFNOSUPPORT | libc::EPROTONOSUPPORT)
    )
}

fn now() -> String {
    time::OffsetDateTime::from(SystemTime::now())
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intercept::listener::ListenError;

    fn bind_err(errno: i32) -> ServeError {
        ServeError::Listen(ListenError::Bind {
            addr: SocketAddr::from((Ipv6Addr::LOCALHOST, 1)),
            source: std::io::Error::from_raw_os_error(errno),
        })
    }

    #[test]
    fn only_a_missing_ipv6_loopback_lets_a_namespace_be_served_on_ipv4_alone() {
        for errno in [
            libc::EADDRNOTAVAIL,
            libc::EAFNOSUPPORT,
            libc::EPROTONOSUPPORT,
        ] {
            assert!(no_ipv6(&bind_err(errno)), "{errno}");
        }
        // someone else holds [::1]:PORT, or anything else: not served
        for errno in [libc::EADDRINUSE, libc::EACCES, libc::EMFILE] {
            assert!(!no_ipv6(&bind_err(errno)), "{errno}");
        }
        assert!(!no_ipv6(&ServeError::Raced));
        assert!(!no_ipv6(&ServeError::Stopped));
    }
}
