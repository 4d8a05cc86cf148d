//! Harness for kya's end-to-end tests: the real `kya` daemon, real sockets,
//! real cgroups, and records kept by the peers themselves.
//!
//! Everything a test creates (cgroups, pinned BPF objects, daemons, probe
//! processes) is cleaned up by `Drop`, so a failing assertion leaves nothing
//! behind. Tests touch only loopback addresses.

pub mod oidc;
pub mod podman;
pub mod unit;

use serde_json::Value;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// True when the test may run. Privileged tests skip without root on a
/// laptop; under `CI=true` a skip is a failure.
pub fn privileged(test: &str) -> bool {
    kya_testkit::root_or_skip(test, "needs root for BPF and cgroups")
}

/// End-to-end tests share the host's cgroup root and BPF attachments: run them one at a time.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// One "second" of waiting for a peer, a daemon or a record before giving
/// up (`patience() * 30`): `KYA_E2E_PATIENCE` seconds (default 1) on slow
/// machines such as the kernel matrix's emulated guests. A bound on a hang, never a
/// measurement: no test asserts on elapsed time.
pub fn patience() -> Duration {
    let factor: u32 = std::env::var("KYA_E2E_PATIENCE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|f| (1..=100).contains(f))
        .unwrap_or(1);
    Duration::from_secs(u64::from(factor))
}

/// The directory holding the workspace's built binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("KYA_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // Test executables live in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .expect("test binary lives in target/<profile>/deps")
}

fn built(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` first (cargo xtask test does)",
        path.display()
    );
    path
}

/// The `kya` binary under test.
pub fn kya_bin() -> PathBuf {
    built("kya")
}

/// The probe client.
pub fn probe_bin() -> PathBuf {
    built("kya-probe")
}

/// The emulator of a unit's system call filters (`kya-unit-seccomp`).
pub fn unit_seccomp_bin() -> PathBuf {
    built("kya-unit-seccomp")
}

/// A copy of the probe at a path of its own, executable by every user
/// (the build tree may sit in a directory other users cannot enter).
pub struct ProbeCopy {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl ProbeCopy {
    pub fn new(name: &str) -> Self {
        Self::of(&probe_bin(), name)
    }

    /// A world-executable copy of any built binary (e.g. `kya` for a non-root user).
    pub fn of(src: &Path, name: &str) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("kya-e2e-probe-")
            .tempdir()
            .expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let path = dir.path().join(name);
        std::fs::copy(src, &path).expect("copy binary");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Self { _dir: dir, path }
    }
}

/// A local user created for a test (`useradd`), removed on drop.
pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl TestUser {
    pub fn new(name: &str) -> Self {
        let _ = Command::new("userdel").arg(name).output();
        let out = Command::new("useradd")
            .args(["--no-create-home", "--shell", "/usr/sbin/nologin", name])
            .output()
            .expect("useradd");
        assert!(
            out.status.success(),
            "useradd {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let id = |flag: &str| -> u32 {
            let out = Command::new("id").args([flag, name]).output().expect("id");
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .expect("numeric id")
        };
        Self {
            name: name.to_string(),
            uid: id("-u"),
            gid: id("-g"),
        }
    }

    /// A command run as this user (real and effective uid/gid, and the
    /// supplementary groups the user is a member of, e.g. a [`TestGroup`]).
    pub fn command(&self, program: impl AsRef<Path>) -> Command {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid",
            &self.uid.to_string(),
            "--regid",
            &self.gid.to_string(),
            "--init-groups",
            "--",
        ])
        .arg(program.as_ref());
        c
    }
}

/// A local group created for a test (`groupadd`), removed on drop.
pub struct TestGroup {
    pub name: String,
}

impl TestGroup {
    /// The group, with `members` in it.
    pub fn new(name: &str, members: &[&TestUser]) -> Self {
        let _ = Command::new("groupdel").arg(name).output();
        let out = Command::new("groupadd")
            .arg(name)
            .output()
            .expect("groupadd");
        assert!(
            out.status.success(),
            "groupadd {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let group = Self {
            name: name.to_string(),
        };
        for m in members {
            group.add(m);
        }
        group
    }

    /// Make `user` a member.
    pub fn add(&self, user: &TestUser) {
        let out = Command::new("usermod")
            .args(["-a", "-G", &self.name, &user.name])
            .output()
            .expect("usermod");
        assert!(
            out.status.success(),
            "usermod -aG {} {}: {}",
            self.name,
            user.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for TestGroup {
    fn drop(&mut self) {
        let _ = Command::new("groupdel").arg(&self.name).output();
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).output();
    }
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup` or `/sys/fs/cgroup/unified`).
pub fn cgroup2_mount() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    for line in info.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() == Some("cgroup2") {
            if let Some(mp) = left.split_whitespace().nth(4) {
                return PathBuf::from(mp);
            }
        }
    }
    panic!("no cgroup2 mount found");
}

/// A cgroup created for one test under the cgroup2 root; its processes are
/// killed and the directory removed on drop.
pub struct TestCgroup {
    /// Path relative to the cgroup2 mount, as `kya run --cgroup` takes it.
    pub rel: String,
    /// Absolute directory.
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new(tag: &str) -> Self {
        let rel = format!("/kya-e2e-{tag}-{}", std::process::id());
        let path = cgroup2_mount().join(rel.trim_start_matches('/'));
        if path.exists() {
            kill_and_remove(&path);
        }
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { rel, path }
    }

    /// A child cgroup (selection covers descendants).
    pub fn child(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::create_dir_all(&p).expect("mkdir child cgroup");
        p
    }

    /// A command that moves itself into this cgroup, then execs `program`:
    /// the program is in the cgroup from its first instruction.
    pub fn command(&self, program: impl AsRef<Path>, args: &[&str]) -> Command {
        in_cgroup(&self.path, program, args)
    }

    /// Pids currently in the cgroup (not descendants).
    pub fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

/// `sh` writes its own pid into `cgroup.procs` and then execs the program.
pub fn in_cgroup(dir: &Path, program: impl AsRef<Path>, args: &[&str]) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("echo $$ > \"$0/cgroup.procs\" && exec \"$@\"")
        .arg(dir)
        .arg(program.as_ref())
        .args(args);
    cmd
}

fn kill_and_remove(path: &Path) {
    // Children first (rmdir needs an empty subtree).
    if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                kill_and_remove(&e.path());
            }
        }
    }
    let _ = std::fs::write(path.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if std::fs::remove_dir(path).is_ok() || !path.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("warning: could not remove cgroup {}", path.display());
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        kill_and_remove(&self.path);
    }
}

/// Run a probe command to completion and parse its JSON line.
pub fn run_json(mut cmd: Command) -> Value {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or("");
    serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "{cmd:?} printed no JSON ({e}): stdout={stdout:?} stderr={:?}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A probe started now that waits for a line on stdin before it acts.
pub struct WaitingProbe {
    child: Child,
}

impl WaitingProbe {
    pub fn spawn(mut cmd: Command) -> Self {
        let child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn waiting probe");
        Self { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Let it act and collect its JSON line.
    pub fn go(mut self) -> Value {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.write_all(b"go\n");
        }
        let mut out = String::new();
        if let Some(mut stdout) = self.child.stdout.take() {
            let _ = stdout.read_to_string(&mut out);
        }
        let _ = self.child.wait();
        serde_json::from_str(out.lines().last().unwrap_or(""))
            .unwrap_or_else(|e| panic!("waiting probe printed no JSON ({e}): {out:?}"))
    }
}

impl Drop for WaitingProbe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A peer the echo server saw, with the pid owning the peer socket when looked up.
pub type PeerRecord = (SocketAddr, Option<u32>);

/// A TCP echo server on a loopback address that records every peer it sees.
pub struct TcpEcho {
    pub addr: SocketAddr,
    peers: Arc<Mutex<Vec<PeerRecord>>>,
    stop: Arc<AtomicBool>,
    /// A handle on the listening socket, to wake `accept` at drop.
    wake: Option<TcpListener>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TcpEcho {
    /// Start; peers are recorded without their owning process.
    pub fn start(addr: &str) -> Self {
        Self::start_inner(addr, false)
    }

    /// Start; for every peer also record which process owns the peer socket
    /// (looked up while the connection is open; slow, for assertions only).
    pub fn start_with_owners(addr: &str) -> Self {
        Self::start_inner(addr, true)
    }

    fn start_inner(addr: &str, owners: bool) -> Self {
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        let addr = listener.local_addr().expect("local addr");
        let peers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peers.clone(), stop.clone());
        let wake = listener.try_clone().ok();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut conn) = conn else {
                    if s.load(Ordering::SeqCst) {
                        return;
                    }
                    continue;
                };
                if let Ok(peer) = conn.peer_addr() {
                    let owner = if owners {
                        // The connection stays open (nothing is echoed until
                        // this is done); a /proc scan racing process churn on a
                        // busy machine can miss once, so look again.
                        (0..10).find_map(|i| {
                            if i > 0 {
                                std::thread::sleep(std::time::Duration::from_millis(20));
                            }
                            socket_owner(peer)
                        })
                    } else {
                        None
                    };
                    p.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((peer, owner));
                }
                std::thread::spawn(move || {
                    let _ = conn.set_nodelay(true);
                    let mut buf = [0u8; 4096];
                    loop {
                        match conn.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if conn.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        Self {
            addr,
            peers,
            stop,
            wake,
            thread: Some(thread),
        }
    }

    /// Peers seen so far, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|p| p.0)
            .collect()
    }

    /// Peers with the pid owning the peer socket (only with [`TcpEcho::start_with_owners`]).
    pub fn peers_with_owners(&self) -> Vec<PeerRecord> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for TcpEcho {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        self.stop.store(true, Ordering::SeqCst);
        // shutdown(2) on a listening socket wakes a blocked accept (EINVAL);
        // then the thread exits and the port is free for the next test.
        if let Some(l) = &self.wake {
            // SAFETY: a valid socket fd owned by `l`.
            unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A UDP echo server on a loopback address.
pub struct UdpEcho {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UdpEcho {
    pub fn start(addr: &str) -> Self {
        let sock = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
        let addr = sock.local_addr().expect("local addr");
        let _ = sock.set_read_timeout(Some(Duration::from_millis(100)));
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::SeqCst) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        Self {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Options for one daemon under test.
#[derive(Clone)]
pub struct DaemonOptions {
    pub listen_port: u16,
    pub args: Vec<String>,
    /// Start the daemon itself inside this cgroup directory.
    pub in_cgroup: Option<PathBuf>,
    /// Keep what an earlier daemon left pinned in the same pin directory (restart tests).
    pub reuse_pins: bool,
    /// Config file (default: none, `/dev/null`).
    pub config: Option<PathBuf>,
    /// Copy the signing key from this state directory into the new one, so a
    /// restarted daemon continues the same audit log (crash tests).
    pub key_from: Option<PathBuf>,
    /// Run the daemon in a mount namespace of its own whose /etc/hosts is this
    /// file (names the test's servers without any DNS query).
    pub hosts: Option<PathBuf>,
    /// Guarded ports where kya splices what is neither TLS nor HTTP (the
    /// tests' byte echo); written to a config file of the daemon's own.
    pub splice_ports: Vec<u16>,
    /// Files (name, bytes) written into the new state directory before the
    /// daemon starts (a restart on what an earlier daemon left there).
    pub state_files: Vec<(String, Vec<u8>)>,
    /// Run the daemon through this command (program and arguments; the
    /// daemon's command line follows), e.g. a sandbox. The command finds the
    /// daemon's state and (host) pin directories in `KYA_E2E_STATE_DIR` and
    /// `KYA_E2E_PIN_DIR`.
    pub wrapper: Vec<String>,
    /// The uid and gid the daemon runs as (through `wrapper`): its state and
    /// pin directories are made its own before it starts.
    pub owner: Option<(u32, u32)>,
    /// The daemon's `--pin-dir`, relative to its state directory, where
    /// `wrapper` binds the real pin directory (default: the pin directory).
    pub pin_dir_in_state: Option<String>,
}

impl DaemonOptions {
    pub fn new(listen_port: u16) -> Self {
        Self {
            listen_port,
            args: Vec::new(),
            in_cgroup: None,
            reuse_pins: false,
            config: None,
            key_from: None,
            hosts: None,
            splice_ports: Vec::new(),
            state_files: Vec::new(),
            wrapper: Vec::new(),
            owner: None,
            pin_dir_in_state: None,
        }
    }

    /// Splice non-HTTP bytes on `port` (which must also be guarded with `--port`).
    pub fn splice(mut self, port: u16) -> Self {
        self.splice_ports.push(port);
        self
    }

    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, a: I) -> Self {
        self.args.extend(a.into_iter().map(Into::into));
        self
    }
}

/// A running `kya run`, with its log, pin directory and state directory.
/// Dropping it kills the daemon and removes its pins.
pub struct Daemon {
    child: Option<Child>,
    pub pid: u32,
    pub log: PathBuf,
    pub pin_dir: PathBuf,
    pub state_dir: tempfile::TempDir,
    pub listen_port: u16,
}

impl Daemon {
    pub fn start(opts: DaemonOptions) -> Self {
        let state_dir = tempfile::Builder::new()
            .prefix("kya-e2e-state-")
            .tempdir()
            .expect("state tempdir");
        let log = state_dir.path().join("daemon.log");
        if let Some(from) = &opts.key_from {
            for name in ["signing-key.pem", "signing-key.pub.pem"] {
                let dst = state_dir.path().join(name);
                std::fs::copy(from.join(name), &dst).expect("copy the signing key");
            }
        }
        for (name, bytes) in &opts.state_files {
            std::fs::write(state_dir.path().join(name), bytes).expect("seed the state directory");
        }
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/kya-e2e-{}-{}",
            std::process::id(),
            opts.listen_port
        ));
        if !opts.reuse_pins {
            let _ = std::fs::remove_dir_all(&pin_dir);
        }
        let pin_arg = match &opts.pin_dir_in_state {
            Some(rel) => {
                let at = state_dir.path().join(rel);
                std::fs::create_dir_all(&at).expect("the pin directory's mount point");
                at
            }
            None => pin_dir.clone(),
        };
        if let Some((uid, gid)) = opts.owner {
            use std::os::unix::fs::PermissionsExt;
            // What the systemd unit's ExecStartPre= and StateDirectory= do.
            std::fs::create_dir_all(&pin_dir).expect("create the pin directory");
            std::fs::set_permissions(&pin_dir, std::fs::Permissions::from_mode(0o700))
                .expect("chmod the pin directory");
            for dir in [pin_dir.as_path(), state_dir.path(), pin_arg.as_path()] {
                std::os::unix::fs::chown(dir, Some(uid), Some(gid))
                    .expect("give the daemon's user its directory");
            }
        }
        let config = match (&opts.config, opts.splice_ports.is_empty()) {
            (Some(path), true) => path.display().to_string(),
            (None, true) => "/dev/null".into(),
            (None, false) => {
                let path = state_dir.path().join("kya.toml");
                let ports: Vec<String> = opts.splice_ports.iter().map(u16::to_string).collect();
                std::fs::write(
                    &path,
                    format!("[intercept]\nsplice_ports = [{}]\n", ports.join(", ")),
                )
                .expect("write the daemon's config");
                path.display().to_string()
            }
            (Some(_), false) => panic!("set splice_ports in the test's own config file"),
        };
        let mut args: Vec<String> = vec![
            "--log-format".into(),
            "json".into(),
            "run".into(),
            "--config".into(),
            config,
            "--listen-port".into(),
            opts.listen_port.to_string(),
            "--pin-dir".into(),
            pin_arg.display().to_string(),
            "--state-dir".into(),
            state_dir.path().display().to_string(),
        ];
        args.extend(opts.args);
        let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut cmd = match (&opts.in_cgroup, &opts.hosts) {
            _ if !opts.wrapper.is_empty() => {
                assert!(
                    opts.in_cgroup.is_none() && opts.hosts.is_none(),
                    "a wrapper does not combine with in_cgroup or hosts"
                );
                let mut c = Command::new(&opts.wrapper[0]);
                c.args(&opts.wrapper[1..])
                    .arg(kya_bin())
                    .args(&arg_refs)
                    .env("KYA_E2E_STATE_DIR", state_dir.path())
                    .env("KYA_E2E_PIN_DIR", &pin_dir);
                c
            }
            (Some(dir), _) => in_cgroup(dir, kya_bin(), &arg_refs),
            (None, Some(hosts)) => {
                // unshare and sh exec: the daemon keeps the child's pid.
                let script = format!("mount --bind {} /etc/hosts && exec \"$@\"", hosts.display());
                let mut c = Command::new("unshare");
                c.args(["-m", "--propagation", "private", "sh", "-c", &script, "sh"])
                    .arg(kya_bin())
                    .args(&arg_refs);
                c
            }
            (None, None) => {
                let mut c = Command::new(kya_bin());
                c.args(&arg_refs);
                c
            }
        };
        let log_file = std::fs::File::create(&log).expect("daemon log");
        cmd.env("RUST_LOG", "info,kya_agent=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        let child = cmd.spawn().expect("spawn kya run");
        let pid = child.id();
        let mut daemon = Self {
            child: Some(child),
            pid,
            log,
            pin_dir,
            state_dir,
            listen_port: opts.listen_port,
        };
        daemon.wait_ready();
        daemon
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + patience() * 30;
        while Instant::now() < deadline {
            if self.events().iter().any(|e| message(e) == "kya is running") {
                return;
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("kya run exited early ({status}):\n{}", self.log_text());
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("kya run not ready after 30 s:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every JSON log record so far.
    pub fn events(&self) -> Vec<Value> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The daemon's "intercepted connection" records (their `fields`).
    pub fn connections(&self) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| message(e) == "intercepted connection")
            .map(|e| e["fields"].clone())
            .collect()
    }

    /// Wait until at least `n` connections were logged.
    pub fn wait_connections(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + patience() * 10;
        loop {
            let c = self.connections();
            if c.len() >= n || Instant::now() > deadline {
                return c;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no cleanup runs in the daemon.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("daemon already stopped");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + patience() * 15;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "kya run did not stop within 15 s of SIGTERM:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        // Unpinning the links detaches the programs a killed daemon left behind.
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        if std::thread::panicking() {
            eprintln!("--- daemon log ---\n{}", self.log_text());
        }
    }
}

/// The `fields.message` of a tracing JSON record.
pub fn message(event: &Value) -> &str {
    event["fields"]["message"].as_str().unwrap_or("")
}

/// Ids and names of the BPF programs attached anywhere in the cgroup2 tree.
pub fn attached_programs() -> BTreeSet<(u64, String)> {
    let out = Command::new("bpftool")
        .args(["-j", "cgroup", "tree"])
        .arg(cgroup2_mount())
        .output()
        .expect("bpftool (apt-get install bpftool)");
    assert!(
        out.status.success(),
        "bpftool cgroup tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let mut set = BTreeSet::new();
    for cg in v.as_array().into_iter().flatten() {
        for p in cg["programs"].as_array().into_iter().flatten() {
            if let Some(id) = p["id"].as_u64() {
                set.insert((id, p["name"].as_str().unwrap_or("").to_string()));
            }
        }
    }
    set
}

/// Every tgid in every `kya_skip_tgids` map loaded in the kernel (all kya
/// instances; tests run serially).
pub fn skip_tgids() -> BTreeSet<u32> {
    let out = Command::new("bpftool")
        .args(["-j", "map", "show"])
        .output()
        .expect("bpftool (apt-get install bpftool)");
    let maps: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let mut tgids = BTreeSet::new();
    for m in maps.as_array().into_iter().flatten() {
        if m["name"] != "kya_skip_tgids" {
            continue;
        }
        let Some(id) = m["id"].as_u64() else { continue };
        let dump = Command::new("bpftool")
            .args(["-j", "map", "dump", "id", &id.to_string()])
            .output()
            .expect("bpftool map dump");
        let entries: Value = serde_json::from_slice(&dump.stdout).unwrap_or(Value::Null);
        for e in entries.as_array().into_iter().flatten() {
            // With BTF the key is a number; without, little-endian hex bytes.
            let key = match &e["key"] {
                Value::Number(n) => n.as_u64().map(|k| k as u32),
                Value::Array(bytes) => {
                    let b: Vec<u8> = bytes
                        .iter()
                        .filter_map(|x| x.as_str())
                        .filter_map(|x| u8::from_str_radix(x.trim_start_matches("0x"), 16).ok())
                        .collect();
                    b.get(..4)
                        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                }
                _ => None,
            };
            tgids.extend(key);
        }
    }
    tgids
}

/// The pid owning the TCP socket whose local address is `local` (from
/// `/proc/net/tcp{,6}` and `/proc/*/fd`), if any.
pub fn socket_owner(local: SocketAddr) -> Option<u32> {
    let inode = socket_inode(local)?;
    let target = format!("socket:[{inode}]");
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = proc_entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path())
                .map(|l| l.to_string_lossy() == target)
                .unwrap_or(false)
            {
                return Some(pid);
            }
        }
    }
    None
}

fn socket_inode(local: SocketAddr) -> Option<u64> {
    let (file, want) = match local {
        SocketAddr::V4(a) => (
            "/proc/net/tcp",
            format!(
                "{:08X}:{:04X}",
                u32::from_le_bytes(a.ip().octets()),
                a.port()
            ),
        ),
        SocketAddr::V6(a) => {
            let o = a.ip().octets();
            let words: String = o
                .chunks(4)
                .map(|c| format!("{:08X}", u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect();
            ("/proc/net/tcp6", format!("{words}:{:04X}", a.port()))
        }
    };
    let text = std::fs::read_to_string(file).ok()?;
    // A socket in TIME_WAIT (inode 0) may hold the same local address from
    // an earlier connection: look on past it.
    text.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.get(1) == Some(&want.as_str()))
            .then(|| f.get(9).and_then(|i| i.parse::<u64>().ok()))
            .flatten()
            .filter(|i| *i != 0)
    })
}

/// GET `path` from a loopback HTTP server (metrics); returns the whole response.
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: kya\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// The real MCP peers (tests/peers): a Python venv and node_modules.
pub fn peers() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers")
}

/// Whether a TCP socket of this network namespace listens on `host:port`
/// (an address; a name is checked by connecting), read from
/// `/proc/net/tcp{,6}`. A successful connect proves nothing where the default
/// route leads to something that accepts any connection.
pub fn listening_on(host: &str, port: u16) -> bool {
    let Ok(want) = host.parse::<std::net::IpAddr>() else {
        return std::net::TcpStream::connect((host, port)).is_ok();
    };
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|file| {
        std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .filter_map(proc_net_listener)
            .any(|(ip, p)| {
                p == port && (ip == want || ip.is_unspecified() && (ip.is_ipv6() || want.is_ipv4()))
            })
    })
}

/// The local address of a `/proc/net/tcp{,6}` line in state LISTEN.
fn proc_net_listener(line: &str) -> Option<(std::net::IpAddr, u16)> {
    let mut fields = line.split_whitespace();
    let local = fields.nth(1)?;
    if fields.nth(1)? != "0A" {
        return None;
    }
    let (addr, port) = local.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    // Each 32-bit word is printed as the host-order number of its
    // network-order bytes.
    let mut bytes = Vec::with_capacity(16);
    for i in (0..addr.len()).step_by(8) {
        let word = u32::from_str_radix(addr.get(i..i + 8)?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip = match bytes.len() {
        4 => std::net::IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => std::net::IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some((ip, port))
}

/// Install the peers (idempotent and fast once installed).
pub fn ensure_peers() {
    let out = Command::new("sh")
        .arg(peers().join("setup.sh"))
        .output()
        .expect("run tests/peers/setup.sh");
    assert!(
        out.status.success(),
        "tests/peers/setup.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---- Real MCP peers (tests/peers) and the kya client, for tests that drive
// ---- a real MCP client through the redirect.

/// The peers' Python interpreter (tests/peers/.venv).
pub fn peers_python() -> PathBuf {
    peers().join(".venv/bin/python")
}

/// A registered agent `e2e-agent` in a cgroup of its own, owned by a non-root
/// user the test creates (`owner`), another non-root user (`other`), both in
/// the control socket's approvers group (`approvers`), the policy and
/// registry files, and a copy of `kya` other users can execute.
pub struct AgentScene {
    pub dir: tempfile::TempDir,
    pub cg: TestCgroup,
    // Declared before the users: the group goes first on drop.
    pub approvers: TestGroup,
    pub owner: TestUser,
    pub other: TestUser,
    pub kya_copy: ProbeCopy,
}

impl AgentScene {
    pub fn new(tag: &str, policy: &str) -> Self {
        ensure_peers();
        let dir = tempfile::tempdir().expect("tempdir");
        let cg = TestCgroup::new(tag);
        let owner = TestUser::new(&format!("kya-e2e-{tag}-own"));
        let other = TestUser::new(&format!("kya-e2e-{tag}-oth"));
        std::fs::write(dir.path().join("policy.toml"), policy).expect("policy");
        std::fs::write(
            dir.path().join("agents.toml"),
            format!(
                "[[agent]]\nname = \"e2e-agent\"\nowner = \"{}\"\ncreated = \"2026-01-01\"\nmatch = {{ cgroup = \"{}\" }}\n",
                owner.name, cg.rel
            ),
        )
        .expect("agents");
        let approvers = TestGroup::new(&format!("kya-e2e-{tag}-apr"), &[&owner, &other]);
        Self {
            dir,
            cg,
            approvers,
            owner,
            other,
            kya_copy: ProbeCopy::of(&kya_bin(), "kya"),
        }
    }

    /// `--policy`, `--agents` and the approvers group (`--control-group`) for the daemon.
    pub fn daemon_args(&self) -> Vec<String> {
        let p = |f: &str| self.dir.path().join(f).display().to_string();
        vec![
            "--policy".into(),
            p("policy.toml"),
            "--agents".into(),
            p("agents.toml"),
            "--control-group".into(),
            self.approvers.name.clone(),
        ]
    }

    /// Daemon options: listen port, this scene's policy and registry, one guarded port.
    pub fn daemon_options(&self, listen: u16, guarded: u16) -> DaemonOptions {
        DaemonOptions::new(listen)
            .args(self.daemon_args())
            .args(["--port", &guarded.to_string()])
    }

    /// Run `kya ARGS --state-dir ...` as a local user.
    pub fn as_user(&self, daemon: &Daemon, user: &TestUser, args: &[&str]) -> std::process::Output {
        let mut c = user.command(&self.kya_copy.path);
        c.args(args).arg("--state-dir").arg(daemon.state_dir.path());
        c.output().expect("kya as a user")
    }
}

/// The real MCP server (`tests/peers/server.py`) on a loopback port, in a
/// process group of its own (killed whole on drop), recording every tool that
/// really ran in its own log.
pub struct McpServer {
    child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl McpServer {
    /// Start on `port`, logging to `dir/log_name`; waits until it listens.
    pub fn start(dir: &Path, port: u16, log_name: &str) -> Self {
        Self::start_with(dir, port, &[], log_name)
    }

    /// [`McpServer::start`] with more server arguments (`--transport sse`).
    pub fn start_with(dir: &Path, port: u16, extra: &[&str], log_name: &str) -> Self {
        Self::start_on(dir, "127.0.0.1", port, extra, log_name)
    }

    /// [`McpServer::start_with`] listening on `host` (an address of an
    /// interface the test created).
    pub fn start_on(dir: &Path, host: &str, port: u16, extra: &[&str], log_name: &str) -> Self {
        use std::os::unix::process::CommandExt;
        let log = dir.join(log_name);
        std::fs::write(&log, "").expect("peer log");
        let child = Command::new(peers_python())
            .process_group(0)
            .arg(peers().join("server.py"))
            .args(["--port", &port.to_string(), "--host", host])
            .args(extra)
            .env("KYA_PEER_LOG", &log)
            .env("KYA_PEER_AUTH_LOG", log.with_extension("auth"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start MCP server");
        let server = Self { child, port, log };
        let deadline = Instant::now() + patience() * 30;
        while !listening_on(host, port) {
            assert!(Instant::now() < deadline, "MCP server did not listen");
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    /// Its Streamable HTTP URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/mcp", self.port)
    }

    /// The bearer tokens the server accepted, in order (its own record, when
    /// it requires one: `--require-token`, `--introspect`).
    pub fn accepted_tokens(&self) -> Vec<Value> {
        std::fs::read_to_string(self.log.with_extension("auth"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Tools that really ran, in order (the server's own record).
    pub fn ran(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for McpServer {
    fn drop(&mut self) {
        // The whole process group: nothing may keep the port after the test.
        let group = nix::unistd::Pid::from_raw(-(self.child.id() as i32));
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Start the real MCP client (`tests/peers/client.py URL ARGS...`) inside the
/// cgroup; its pid is the client's (`sh` execs it).
pub fn mcp_client(cg: &TestCgroup, url: &str, args: &[&str]) -> Child {
    let script = peers().join("client.py");
    let mut all: Vec<&str> = vec![script.to_str().expect("utf-8"), url];
    all.extend_from_slice(args);
    cg.command(peers_python(), &all)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start MCP client")
}

/// Wait for an MCP client and parse the JSON line it printed.
pub fn mcp_result(child: Child) -> Value {
    let out = child.wait_with_output().expect("client output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| {
        panic!(
            "client printed no JSON ({e}): {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// `kya ARGS --state-dir <the daemon's>` as root.
pub fn kya_cli(daemon: &Daemon, args: &[&str]) -> std::process::Output {
    Command::new(kya_bin())
        .args(args)
        .arg("--state-dir")
        .arg(daemon.state_dir.path())
        .output()
        .expect("kya client command")
}

/// `kya status --json` of a running daemon.
pub fn kya_status(daemon: &Daemon) -> Value {
    let out = kya_cli(daemon, &["status", "--json"]);
    assert!(
        out.status.success(),
        "kya status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

/// The pending approvals (`kya approvals list --json`).
pub fn approvals_pending(daemon: &Daemon) -> Vec<Value> {
    let out = kya_cli(daemon, &["approvals", "list", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Value>(&out.stdout)
        .expect("approvals JSON")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Wait (up to 20 s) for a pending approval whose id is not in `seen`.
pub fn wait_new_approval(daemon: &Daemon, seen: &[&str]) -> Value {
    let deadline = Instant::now() + patience() * 20;
    loop {
        if let Some(a) = approvals_pending(daemon)
            .into_iter()
            .find(|a| !seen.contains(&a["id"].as_str().unwrap_or("")))
        {
            return a;
        }
        assert!(
            Instant::now() < deadline,
            "no approval appeared:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The daemon's recent decisions on `tools/call` (`kya events --json`).
pub fn tool_call_events(daemon: &Daemon) -> Vec<Value> {
    let ev = kya_cli(daemon, &["events", "--json"]);
    assert!(
        ev.status.success(),
        "{}",
        String::from_utf8_lossy(&ev.stderr)
    );
    String::from_utf8_lossy(&ev.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|e: &Value| e["mcp"]["method"] == "tools/call")
        .collect()
}

/// Run `cmd` in `dir` through `sh -c`, failing the test on a non-zero exit.
pub fn sh(cmd: &str, dir: &Path) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(dir)
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// In `dir`: a test CA (`test-ca.pem`), a server certificate for mcp.test and
/// pinned.test (`srv.pem`, `srv.key`), and a hosts file naming the test
/// servers: mcp.test and pinned.test at 127.0.0.2, trusted.test at 127.0.0.5.
pub fn test_pki(dir: &Path) {
    sh("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out test-ca.pem -days 2 -subj /CN=kya-e2e-test-ca 2>/dev/null", dir);
    sh("openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout srv.key -out srv.csr -subj /CN=mcp.test 2>/dev/null", dir);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:mcp.test,DNS:pinned.test\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext");
    sh("openssl x509 -req -in srv.csr -CA test-ca.pem -CAkey ca.key -CAcreateserial -out srv.pem -days 2 -extfile ext.cnf 2>/dev/null", dir);
    std::fs::write(
        dir.join("hosts"),
        "127.0.0.1 localhost\n127.0.0.2 mcp.test pinned.test\n127.0.0.5 trusted.test\n",
    )
    .expect("hosts");
}

/// The test MCP server as an ASGI app (`tests/peers/asgi.py`: stateless, JSON
/// answers) under hypercorn, on one or more loopback addresses, recording the
/// tools that really ran in `dir/peer.log`. Its process group is killed on drop.
pub struct Hypercorn {
    child: Child,
    binds: Vec<String>,
}

impl Hypercorn {
    /// Over TLS with `dir/srv.pem` (see [`test_pki`]).
    pub fn start_tls(dir: &Path, binds: &[&str]) -> Self {
        Self::start(dir, binds, true)
    }

    /// Over plaintext HTTP.
    pub fn start_plain(dir: &Path, binds: &[&str]) -> Self {
        Self::start(dir, binds, false)
    }

    fn start(dir: &Path, binds: &[&str], tls: bool) -> Self {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(peers().join(".venv/bin/hypercorn"));
        // Its own process group: hypercorn runs workers in child processes,
        // and all of them must go at drop.
        cmd.process_group(0);
        if tls {
            cmd.arg("--certfile")
                .arg(dir.join("srv.pem"))
                .arg("--keyfile")
                .arg(dir.join("srv.key"));
        }
        for b in binds {
            cmd.args(["--bind", b]);
        }
        let child = cmd
            .arg("asgi:app")
            .current_dir(peers())
            .env("KYA_PEER_LOG", dir.join("peer.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start hypercorn");
        let server = Self {
            child,
            binds: binds.iter().map(|b| b.to_string()).collect(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        for b in &server.binds {
            while std::net::TcpStream::connect(b.as_str()).is_err() {
                assert!(Instant::now() < deadline, "hypercorn did not listen on {b}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        server
    }
}

impl Drop for Hypercorn {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(-(self.child.id() as i32));
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
        // The ports must be free for the next test.
        let deadline = Instant::now() + Duration::from_secs(10);
        for b in &self.binds {
            while std::net::TcpStream::connect(b.as_str()).is_ok() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// A real HTTP CONNECT proxy (`tests/peers/connect_proxy.py`) on a loopback
/// address, resolving names from `dir/hosts` only (see [`test_pki`]) and
/// recording each tunnel it opened in `dir/proxy.log`. Killed on drop.
pub struct ConnectProxy {
    child: Child,
    pub addr: SocketAddr,
    log: PathBuf,
}

impl ConnectProxy {
    pub fn start(dir: &Path, listen: &str) -> Self {
        let addr: SocketAddr = listen.parse().expect("proxy address");
        let log = dir.join("proxy.log");
        let child = Command::new(peers_python())
            .arg(peers().join("connect_proxy.py"))
            .args(["--listen", listen, "--hosts"])
            .arg(dir.join("hosts"))
            .arg("--log")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the CONNECT proxy");
        let proxy = Self { child, addr, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "the CONNECT proxy did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        proxy
    }

    /// The tunnels it opened, as `host:port` lines.
    pub fn tunnels(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run `prog ARGS` in the cgroup and in a mount namespace whose /etc/hosts is
/// `dir/hosts` (see [`test_pki`]), with `env`; parse the last line it printed
/// as JSON.
pub fn run_in_agent_ns(
    cg: &TestCgroup,
    dir: &Path,
    prog: &[PathBuf],
    args: &[&str],
    env: &[(&str, &Path)],
) -> Value {
    let script = format!(
        "mount --bind {hosts} /etc/hosts && echo $$ > {procs} && exec \"$@\"",
        hosts = dir.join("hosts").display(),
        procs = cg.path.join("cgroup.procs").display()
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "--propagation", "private", "sh", "-c", &script, "sh"])
        .args(prog)
        .args(args)
        .current_dir(peers());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| {
        panic!(
            "client printed no JSON ({e}): {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The policy several end-to-end tests run: `search_docs` (the test MCP
/// server's harmless tool) allowed, `delete_*` denied with a reason, every
/// other tool denied, non-call methods allowed.
pub const DOCS_POLICY: &str = r#"
[defaults]
verdict = "deny"
methods = "allow"

[[rule]]
id = "docs-ok"
tool = "search_docs"
verdict = "allow"

[[rule]]
id = "no-delete"
tool = "delete_*"
verdict = "deny"
reason = "deleting records is not allowed from agents"
"#;

// ---- Network namespaces the tests create (containers without an engine).

/// Name prefix of the network namespaces tests create (`ip netns`);
/// `cargo xtask clean-host` removes leftovers with it.
pub const TEST_NETNS_PREFIX: &str = "kya-test-";
/// Name prefix of the veth interfaces tests create (host ends).
pub const TEST_VETH_PREFIX: &str = "kyat";

/// A network namespace (`ip netns add kya-test-TAG-PID`) joined to the host by
/// a veth pair with private addresses: the host end is `host_addr`
/// (10.231.X.1/30), the namespace end `ns_addr` (10.231.X.2/30), the
/// namespace's default route goes through the host end. On drop its
/// processes are killed and the veth and the namespace removed.
pub struct TestNetns {
    pub name: String,
    pub host_if: String,
    pub host_addr: String,
    pub ns_addr: String,
    /// The namespace's inode (`net:[INODE]`).
    pub inode: u64,
}

impl TestNetns {
    /// `idx` (0..4) tells the namespaces of one test apart; `lo_up`: bring
    /// its loopback interface up (down: nothing can listen on 127.0.0.1 there).
    pub fn new(tag: &str, idx: u32, lo_up: bool) -> Self {
        use std::os::unix::fs::MetadataExt;
        assert!(idx < 4, "at most 4 namespaces per test");
        let pid = std::process::id();
        let name = format!("{TEST_NETNS_PREFIX}{tag}-{pid}");
        let short = format!("{}{idx}", pid % 100_000);
        let host_if = format!("{TEST_VETH_PREFIX}{short}h");
        let ns_if = format!("{TEST_VETH_PREFIX}{short}n");
        let third = (pid % 60) * 4 + idx;
        let host_addr = format!("10.231.{third}.1");
        let ns_addr = format!("10.231.{third}.2");
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let mut ns = Self {
            name: name.clone(),
            host_if: host_if.clone(),
            host_addr: host_addr.clone(),
            ns_addr: ns_addr.clone(),
            inode: 0,
        };
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("run ip");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if, "netns", &name,
        ]);
        ip(&["addr", "add", &format!("{host_addr}/30"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{ns_addr}/30"),
            "dev",
            &ns_if,
        ]);
        ip(&["-n", &name, "link", "set", &ns_if, "up"]);
        ip(&["-n", &name, "route", "add", "default", "via", &host_addr]);
        if lo_up {
            ip(&["-n", &name, "link", "set", "lo", "up"]);
        }
        ns.inode = std::fs::metadata(ns.path()).expect("netns file").ino();
        ns
    }

    /// `/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `program args` inside the namespace (only the network namespace
    /// changes), moved first into the cgroup directory `cgroup` if given.
    pub fn command(
        &self,
        cgroup: Option<&Path>,
        program: impl AsRef<Path>,
        args: &[&str],
    ) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()));
        match cgroup {
            Some(dir) => {
                cmd.args(["sh", "-c", "echo $$ > \"$0/cgroup.procs\" && exec \"$@\""])
                    .arg(dir)
                    .arg(program.as_ref())
                    .args(args);
            }
            None => {
                cmd.arg(program.as_ref()).args(args);
            }
        }
        cmd
    }

    /// Runs `f` on a thread inside the namespace (sockets it opens live there).
    pub fn run_inside<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(self.path()).expect("open netns");
        std::thread::spawn(move || {
            // SAFETY: a valid namespace fd; only this thread changes namespace.
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("thread inside the namespace")
    }

    /// Pids of the processes in the namespace.
    pub fn pids(&self) -> Vec<u32> {
        let out = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        out.split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

#[cfg(test)]
mod listening_tests {
    use super::*;

    #[test]
    fn a_listening_socket_is_seen_and_a_closed_port_is_not() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        assert!(listening_on("127.0.0.1", port));
        assert!(!listening_on("127.0.0.2", port));
        drop(l);
        assert!(!listening_on("127.0.0.1", port));
        let any = std::net::TcpListener::bind("0.0.0.0:0").expect("bind");
        let port = any.local_addr().expect("addr").port();
        assert!(listening_on("127.0.0.9", port));
        assert!(!listening_on("::1", port));
    }

    #[test]
    fn proc_net_lines_are_parsed_strictly() {
        let v4 = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1";
        assert_eq!(
            proc_net_listener(v4),
            Some(("127.0.0.1".parse().expect("ip"), 8080))
        );
        let established = v4.replace(" 0A ", " 01 ");
        assert_eq!(proc_net_listener(&established), None);
        let v6 = "   0: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 0";
        assert_eq!(
            proc_net_listener(v6),
            Some(("::1".parse().expect("ip"), 80))
        );
        for bad in [
            "",
            "0:",
            "0: zz:1 0 0A",
            "0: 0100007F:ZZZZ 0 0A",
            "0: 01007F:0050 0 0A",
        ] {
            assert_eq!(proc_net_listener(bad), None, "{bad}");
        }
    }
}
