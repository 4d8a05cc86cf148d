//! Privileged integration tests of the eBPF redirect: real programs, real
//! cgroups, real processes, loopback only.
//!
//! As root they run; without root they skip with a message, except under
//! `CI=true`, where not being root is a failure (CI must run them).
//!
//! Each test owns its cgroup, pin directory, listen port (9xx) and upstream
//! port, so they can run in parallel; every guard cleans up on drop, also
//! when an assertion fails.

use kya_agent::bpf::{self, mark_socket, Origin, OriginTable, RedirectConfig, Redirector};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::process::Command;

const PYTHON: &str = "/usr/bin/python3";
const EPERM: i64 = 1;
const ECONNREFUSED: i64 = 111;

/// True when the test may run; panics under CI=true without root.
fn privileged(test: &str) -> bool {
    kya_testkit::root_or_skip(test, "needs root (CAP_BPF, CAP_NET_ADMIN, cgroup writes)")
}

/// A fresh cgroup under the cgroup2 mount, emptied and removed on drop.
struct TestCgroup {
    dir: PathBuf,
    rel: String,
}

impl TestCgroup {
    fn new(name: &str) -> TestCgroup {
        let mount = bpf::cgroup2_mount().unwrap();
        let rel = format!("/kya-test-{name}-{}", std::process::id());
        let dir = mount.join(rel.trim_start_matches('/'));
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).unwrap();
        TestCgroup { dir, rel }
    }
    /// A nested cgroup (declare it after its parent: dropped first).
    fn child(&self, name: &str) -> TestCgroup {
        let dir = self.dir.join(name);
        std::fs::create_dir(&dir).unwrap();
        TestCgroup {
            dir,
            rel: format!("{}/{name}", self.rel),
        }
    }
    fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if let Ok(s) = std::fs::read_to_string(self.procs()) {
                for pid in s.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    // SAFETY: plain kill(2) of a process in our test cgroup.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "warning: could not remove test cgroup {}",
            self.dir.display()
        );
    }
}

/// A pin directory that is removed (with whatever a test left) on drop.
struct PinDir(PathBuf);

impl PinDir {
    fn new(name: &str) -> PinDir {
        PinDir(PathBuf::from(format!(
            "/sys/fs/bpf/kya-test-{name}-{}",
            std::process::id()
        )))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Ok(rd) = std::fs::read_dir(&self.0) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A child process killed on drop.
struct Child(Option<tokio::process::Child>);

impl Drop for Child {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.start_kill();
        }
    }
}

/// What the in-test interceptor saw on one accepted connection.
#[derive(Debug, Clone)]
struct Accepted {
    peer: SocketAddr,
    origin: Option<Origin>,
}

/// A minimal interceptor: accepts on 127.0.0.1 and ::1 at the listen port,
/// takes the origin, connects (marked) to the original destination and
/// relays one request and one answer.
struct Interceptor {
    seen: Arc<Mutex<Vec<Accepted>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Interceptor {
    async fn start(port: u16, origins: OriginTable) -> Interceptor {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for addr in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
            let l = TcpListener::bind(&addr).await.unwrap();
            let (seen, origins) = (seen.clone(), origins.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let Ok((mut s, peer)) = l.accept().await else {
                        return;
                    };
                    let local = s.local_addr().unwrap();
                    let origin = origins.take(peer, local, 0).unwrap();
                    seen.lock().unwrap().push(Accepted {
                        peer,
                        origin: origin.clone(),
                    });
                    let Some(origin) = origin else { continue };
                    tokio::spawn(async move {
                        let sock = if origin.dst.is_ipv4() {
                            TcpSocket::new_v4()
                        } else {
                            TcpSocket::new_v6()
                        }
                        .unwrap();
                        mark_socket(&sock).unwrap();
                        let Ok(mut up) = sock.connect(origin.dst).await else {
                            return;
                        };
                        let mut buf = [0u8; 64];
                        let n = s.read(&mut buf).await.unwrap_or(0);
                        let _ = up.write_all(&buf[..n]).await;
                        let n = up.read(&mut buf).await.unwrap_or(0);
                        let _ = s.write_all(&buf[..n]).await;
                    });
                }
            }));
        }
        Interceptor { seen, tasks }
    }
    fn seen(&self) -> Vec<Accepted> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Interceptor {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Upstream servers on 127.0.0.2:port and [::1]:port: read a request,
/// answer "pong", remember the peer they saw.
struct Upstream {
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Upstream {
    async fn start(port: u16) -> Upstream {
        let peers = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for addr in [format!("127.0.0.2:{port}"), format!("[::1]:{port}")] {
            let l = TcpListener::bind(&addr).await.unwrap();
            let peers = peers.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let Ok((mut s, peer)) = l.accept().await else {
                        return;
                    };
                    peers.lock().unwrap().push(peer);
                    tokio::spawn(async move {
                        let mut buf = [0u8; 64];
                        let _ = s.read(&mut buf).await;
                        let _ = s.write_all(b"pong").await;
                    });
                }
            }));
        }
        Upstream { peers, tasks }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The agent stand-in: one TCP or UDP attempt, reported as JSON.
const CLIENT: &str = r#"
import json, os, socket, sys, threading
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
def tcp(mark=None):
    out = {"pid": os.getpid()}
    try:
        s = socket.socket(fam, socket.SOCK_STREAM)
        if mark is not None:
            s.setsockopt(socket.SOL_SOCKET, 36, mark)  # SO_MARK
        s.settimeout(5)
        s.connect((host, port))
        out["peer"] = "[%s]:%d" % s.getpeername()[:2] if fam == socket.AF_INET6 else "%s:%d" % s.getpeername()[:2]
        out["local"] = s.getsockname()[1]
        s.sendall(b"ping")
        out["got"] = s.recv(64).decode()
        s.close()
    except OSError as e:
        out["errno"] = e.errno
    return out
if mode == "tcp":
    out = tcp()
elif mode == "marked":
    out = tcp(int(sys.argv[4]))
elif mode == "thread":
    res = {}
    def run():
        res.update(tcp()); res["tid"] = threading.get_native_id()
    t = threading.Thread(target=run); t.start(); t.join()
    out = res
elif mode == "fork":
    # the child execs the (unselected) system python, which connects
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.dup2(w, 1)
        os.execv(sys.argv[4], [sys.argv[4], "-c", sys.argv[5], "tcp", host, str(port)])
    os.close(w)
    data = os.read(r, 65536).decode()
    os.waitpid(pid, 0)
    out = {"parent": os.getpid(), "child": json.loads(data)}
elif mode == "wait":
    # started before kya: wait for the go file, then connect
    import time
    while not os.path.exists(sys.argv[4]):
        time.sleep(0.02)
    out = tcp()
elif mode == "bound":
    # from a fixed source port; the listener need not accept (the kernel
    # completes the handshake), so only the connect is reported
    out = {"pid": os.getpid()}
    try:
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", int(sys.argv[4])))
        s.settimeout(5)
        s.connect((host, port))
        out["local"] = "%s:%d" % s.getsockname()[:2]
        s.close()
    except OSError as e:
        out["errno"] = e.errno
elif mode == "udp":
    s = socket.socket(fam, socket.SOCK_DGRAM)
    out = {"pid": os.getpid()}
    try:
        s.sendto(b"x", (host, port)); out["sendto"] = "ok"
    except OSError as e:
        out["sendto"] = e.errno
    try:
        s.connect((host, port)); out["connect"] = "ok"
    except OSError as e:
        out["connect"] = e.errno
print(json.dumps(out))
"#;

/// Spawns `exe -c CLIENT args...`, optionally moved into `cgroup` before it
/// execs (via `sh`, which writes its own pid to cgroup.procs and then execs).
fn spawn_client(exe: &str, cgroup: Option<&TestCgroup>, args: &[&str]) -> tokio::process::Child {
    let mut cmd = match cgroup {
        Some(cg) => {
            let mut c = Command::new("/bin/sh");
            c.arg("-c")
                .arg(format!(
                    "echo $$ > {} && exec \"$0\" \"$@\"",
                    cg.procs().display()
                ))
                .arg(exe);
            c
        }
        None => Command::new(exe),
    };
    cmd.arg("-c").arg(CLIENT).args(args);
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    cmd.kill_on_drop(true);
    cmd.spawn().unwrap()
}

async fn finish(child: tokio::process::Child) -> Value {
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("client timed out")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("client output {stdout:?}: {e}"))
}

async fn run_client(exe: &str, cgroup: Option<&TestCgroup>, args: &[&str]) -> Value {
    finish(spawn_client(exe, cgroup, args)).await
}

fn config(cg: Option<&TestCgroup>, port: u16, listen: u16, pins: &PinDir) -> RedirectConfig {
    RedirectConfig {
        cgroups: cg.map(|c| vec![c.rel.clone()]).unwrap_or_default(),
        ports: vec![port],
        listen_port: listen,
        pin_dir: pins.0.clone(),
        ..RedirectConfig::default()
    }
}

/// The interceptor's record for a client identified by its pid.
fn accepted_for(i: &Interceptor, pid: u64) -> Option<Accepted> {
    i.seen()
        .into_iter()
        .find(|a| a.origin.as_ref().is_some_and(|o| u64::from(o.pid) == pid))
}

fn assert_pong(v: &Value) {
    assert_eq!(
        v["got"], "pong",
        "client did not get the server's bytes: {v}"
    );
}

/// True when bpftool still knows any of these program ids.
fn any_program_loaded(ids: &[(&str, u32)]) -> bool {
    ids.iter().any(|(_, id)| {
        std::process::Command::new("bpftool")
            .args(["prog", "show", "id", &id.to_string()])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    })
}

async fn wait_unloaded(ids: &[(&str, u32)]) {
    for _ in 0..100 {
        if !any_program_loaded(ids) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("programs still loaded after shutdown: {ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cgroup_selection_redirects_tcp_v4_v6_mapped_and_refuses_udp() {
    if !privileged("cgroup_selection_redirects_tcp_v4_v6_mapped_and_refuses_udp") {
        return;
    }
    let (port, listen) = (18443u16, 931u16);
    let cg = TestCgroup::new("cg");
    let pins = PinDir::new("cg");
    let mut cfg = config(Some(&cg), port, listen, &pins);
    let mut r = Redirector::start(&cfg).unwrap();
    r.spawn_event_reader().unwrap();
    let ids = r.program_ids();
    // connect4/6, sendmsg4/6, getpeername4/6, sockops, exec, fork, exit,
    // cgroup_attach_task and the script hook (loaded, attached only for scripts).
    assert_eq!(ids.len(), 12);
    let icpt = Interceptor::start(listen, r.origins()).await;
    let up = Upstream::start(port).await;

    // IPv4, selected
    let v = run_client(PYTHON, Some(&cg), &["tcp", "127.0.0.2", &port.to_string()]).await;
    assert_pong(&v);
    assert_eq!(
        v["peer"],
        format!("127.0.0.2:{port}"),
        "getpeername must report the original peer"
    );
    let a = accepted_for(&icpt, v["pid"].as_u64().unwrap())
        .expect("interceptor did not see the selected client");
    let o = a.origin.unwrap();
    assert_eq!(
        o.dst,
        format!("127.0.0.2:{port}").parse::<SocketAddr>().unwrap()
    );
    assert_eq!(o.uid, 0);
    assert_eq!(o.gid, 0);
    assert_eq!(o.tid, o.pid, "single-threaded client");
    assert!(o.comm.starts_with("python3"), "comm {:?}", o.comm);
    assert_eq!(a.peer.port(), v["local"].as_u64().unwrap() as u16);
    let ident = o.identity();
    // the process has exited; the kernel's facts and its cgroup remain
    assert_eq!(ident.pid, o.pid);
    assert_eq!(ident.cgroup, cg.rel);
    assert_eq!(ident.comm, o.comm);
    // the upstream saw the interceptor's socket, not the client's
    assert!(!up
        .peers
        .lock()
        .unwrap()
        .iter()
        .any(|p| p.port() == a.peer.port()));

    // IPv6, from a nested cgroup (a selected cgroup selects its descendants)
    let sub = cg.child("nested");
    let v = run_client(PYTHON, Some(&sub), &["tcp", "::1", &port.to_string()]).await;
    assert_pong(&v);
    assert_eq!(v["peer"], format!("[::1]:{port}"));
    let o = accepted_for(&icpt, v["pid"].as_u64().unwrap())
        .unwrap()
        .origin
        .unwrap();
    assert_eq!(
        o.dst,
        format!("[::1]:{port}").parse::<SocketAddr>().unwrap()
    );

    // IPv4-mapped IPv6 (never reaches connect4)
    let v = run_client(
        PYTHON,
        Some(&cg),
        &["tcp", "::ffff:127.0.0.2", &port.to_string()],
    )
    .await;
    assert_pong(&v);
    assert_eq!(v["peer"], format!("[::ffff:127.0.0.2]:{port}"));
    let a = accepted_for(&icpt, v["pid"].as_u64().unwrap()).unwrap();
    assert_eq!(
        a.origin.unwrap().dst,
        format!("127.0.0.2:{port}").parse::<SocketAddr>().unwrap()
    );
    assert!(a.peer.is_ipv4(), "the IPv4 listener accepted it");

    // a thread of a selected process
    let v = run_client(
        PYTHON,
        Some(&cg),
        &["thread", "127.0.0.2", &port.to_string()],
    )
    .await;
    assert_pong(&v);
    let o = accepted_for(&icpt, v["pid"].as_u64().unwrap())
        .unwrap()
        .origin
        .unwrap();
    assert_eq!(u64::from(o.tid), v["tid"].as_u64().unwrap());
    assert_ne!(o.tid, o.pid);

    // UDP from the selected process: refused with EPERM (sendto and connect)
    for host in ["127.0.0.2", "::1", "::ffff:127.0.0.2"] {
        let v = run_client(PYTHON, Some(&cg), &["udp", host, &port.to_string()]).await;
        assert_eq!(v["sendto"], EPERM, "{host}: {v}");
        assert_eq!(v["connect"], EPERM, "{host}: {v}");
    }
    // ... and from an unselected one it works
    let v = run_client(PYTHON, None, &["udp", "127.0.0.2", &port.to_string()]).await;
    assert_eq!(v["sendto"], "ok");
    assert_eq!(v["connect"], "ok");

    // an unselected process goes direct: the interceptor sees nothing
    let before = icpt.seen().len();
    let v = run_client(PYTHON, None, &["tcp", "127.0.0.2", &port.to_string()]).await;
    assert_pong(&v);
    assert_eq!(icpt.seen().len(), before);
    assert!(up
        .peers
        .lock()
        .unwrap()
        .iter()
        .any(|p| u64::from(p.port()) == v["local"].as_u64().unwrap()));

    // a selected process's socket carrying kya's mark goes direct
    let mark = bpf::KYA_SKIP_MARK.to_string();
    let v = run_client(
        PYTHON,
        Some(&cg),
        &["marked", "127.0.0.2", &port.to_string(), &mark],
    )
    .await;
    assert_pong(&v);
    assert_eq!(icpt.seen().len(), before);

    // the daemon itself, even when selected (here by pid; in a selected
    // cgroup it is the same map lookup), is in the skip map and goes direct.
    // Done last: from now on the daemon's children would be selected too.
    cfg.pids = vec![std::process::id()];
    r.update_selection(&cfg).unwrap();
    let skipped = r.stats().unwrap().skipped_tgid;
    let mut s = TcpStream::connect(("127.0.0.2", port)).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
    assert_eq!(icpt.seen().len(), before);
    assert!(r.stats().unwrap().skipped_tgid > skipped);

    // a connection the kernel did not redirect has no origin
    let direct = TcpStream::connect(("127.0.0.1", listen)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let last = icpt.seen().pop().unwrap();
    assert_eq!(last.peer, direct.local_addr().unwrap());
    assert!(last.origin.is_none());

    tokio::time::sleep(Duration::from_millis(200)).await; // let the event reader drain
    let stats = r.stats().unwrap();
    eprintln!(
        "kernel stats (cgroup test): {}",
        serde_json::to_string(&stats).unwrap()
    );
    assert_eq!(stats.redirected4, 2);
    assert_eq!(stats.redirected6, 1);
    assert_eq!(stats.redirected_v4mapped, 1);
    assert_eq!(stats.established, 4);
    assert_eq!(stats.refused_dgram, 6);
    assert!(stats.skipped_mark >= 1);
    assert!(stats.skipped_tgid >= 1);
    assert!(stats.getpeername >= 3);
    assert_eq!(stats.map_full, 0);
    assert!(stats.events_read >= 6, "refusals are reported as events");

    // clean shutdown: nothing pinned, nothing attached
    assert!(pins.0.join("kya_connect4").exists());
    r.shutdown().unwrap();
    assert!(!pins.0.exists(), "pin dir must be gone");
    wait_unloaded(&ids).await;
    let v = run_client(PYTHON, Some(&cg), &["tcp", "127.0.0.2", &port.to_string()]).await;
    assert_pong(&v);
    assert!(accepted_for(&icpt, v["pid"].as_u64().unwrap()).is_none());
}

/// A private copy of python: selecting it by exe cannot select the python of
/// other tests running in parallel (a different inode).
fn private_python(dir: &Path) -> String {
    let p = dir.join("kya-agent-py");
    std::fs::copy("/usr/bin/python3.11", &p)
        .or_else(|_| std::fs::copy(std::fs::canonicalize(PYTHON).unwrap(), &p))
        .unwrap();
    p.to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exe_selection_at_exec_before_start_and_fork() {
    if !privileged("exe_selection_at_exec_before_start_and_fork") {
        return;
    }
    let (port, listen) = (18444u16, 932u16);
    let tmp = tempfile::tempdir().unwrap();
    let agent = private_python(tmp.path());
    // a symlink to it: exec through the link selects the same inode
    let link = tmp.path().join("agent-link");
    std::os::unix::fs::symlink(&agent, &link).unwrap();
    let go = tmp.path().join("go");
    let pins = PinDir::new("exe");
    let up = Upstream::start(port).await;

    // started before kya
    let before = Child(Some(spawn_client(
        &agent,
        None,
        &["wait", "127.0.0.2", &port.to_string(), go.to_str().unwrap()],
    )));
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut cfg = config(None, port, listen, &pins);
    cfg.exes = vec![format!("{}/kya-agent-*", tmp.path().display())];
    let mut r = Redirector::start(&cfg).unwrap();
    r.spawn_event_reader().unwrap();
    let icpt = Interceptor::start(listen, r.origins()).await;

    std::fs::write(&go, b"").unwrap();
    let mut before = before;
    let v = finish(before.0.take().unwrap()).await;
    assert_pong(&v);
    assert!(
        accepted_for(&icpt, v["pid"].as_u64().unwrap()).is_some(),
        "process running before start: {v}"
    );

    // started after: connects right after exec
    let v = run_client(&agent, None, &["tcp", "127.0.0.2", &port.to_string()]).await;
    assert_pong(&v);
    let o = accepted_for(&icpt, v["pid"].as_u64().unwrap())
        .expect("exe selected at exec")
        .origin
        .unwrap();
    assert_eq!(o.comm, "kya-agent-py");
    let v = run_client(
        link.to_str().unwrap(),
        None,
        &["tcp", "::1", &port.to_string()],
    )
    .await;
    assert_pong(&v);
    assert!(
        accepted_for(&icpt, v["pid"].as_u64().unwrap()).is_some(),
        "exec through a symlink"
    );

    // fork + exec of an unselected binary: the child stays selected
    let v = run_client(
        &agent,
        None,
        &["fork", "127.0.0.2", &port.to_string(), PYTHON, CLIENT],
    )
    .await;
    let child = &v["child"];
    assert_pong(child);
    let o = accepted_for(&icpt, child["pid"].as_u64().unwrap())
        .expect("forked child selected")
        .origin
        .unwrap();
    assert!(o.comm.starts_with("python3"));

    // a thread of an exe-selected process is covered by its tgid, and is
    // never inserted as a tgid itself
    let v = run_client(&agent, None, &["thread", "127.0.0.2", &port.to_string()]).await;
    assert_pong(&v);
    let t = accepted_for(&icpt, v["pid"].as_u64().unwrap())
        .expect("thread selected")
        .origin
        .unwrap();
    assert_ne!(t.tid, t.pid);

    // every selected process above has exited: none is left selected, so a
    // recycled pid cannot select a stranger
    let sel = r.selected_processes().unwrap();
    for pid in [o.pid, t.pid, t.tid] {
        assert!(!sel.contains_key(&pid), "{pid} still selected: {sel:?}");
    }

    // the system python (another inode) is not selected
    let n = icpt.seen().len();
    let v = run_client(PYTHON, None, &["tcp", "127.0.0.2", &port.to_string()]).await;
    assert_pong(&v);
    assert_eq!(icpt.seen().len(), n);

    let stats = r.stats().unwrap();
    eprintln!(
        "kernel stats (exe test): {}",
        serde_json::to_string(&stats).unwrap()
    );
    assert_eq!(
        stats.selected_exec, 4,
        "four execs of the selected binary after start"
    );
    assert!(stats.selected_fork >= 1);
    assert!(
        stats.tgid_exited >= 3,
        "exited selected processes are forgotten"
    );
    assert_eq!(stats.redirected4 + stats.redirected6, 5);
    assert_eq!(stats.events_read, 4, "one exe-selected event per exec");
    drop(up);
    r.shutdown().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_after_a_crash_restart_replaces_pins_and_fail_open_leaves_nothing() {
    if !privileged("fail_closed_after_a_crash_restart_replaces_pins_and_fail_open_leaves_nothing") {
        return;
    }
    let (port, listen) = (18445u16, 933u16);
    let cg = TestCgroup::new("fc");
    let pins = PinDir::new("fc");
    let _up = Upstream::start(port).await;
    let cfg = config(Some(&cg), port, listen, &pins);

    // "kill -9": the instance goes away without shutdown (fds closed as at
    // process death); the pinned links keep redirecting to the dead port
    let r = Redirector::start(&cfg).unwrap();
    let old_ids = r.program_ids();
    drop(r);
    assert!(pins.0.join("kya_connect4").exists());
    let v = run_client(PYTHON, Some(&cg), &["tcp", "127.0.0.2", &port.to_string()]).await;
    assert_eq!(v["errno"], ECONNREFUSED, "fail closed: {v}");
    let v = run_client(PYTHON, Some(&cg), &["tcp", "::1", &port.to_string()]).await;
    assert_eq!(v["errno"], ECONNREFUSED, "fail closed (v6): {v}");
    // the server is still up and reachable by unselected processes
    let v = run_client(PYTHON, None, &["tcp", "127.0.0.2", &port.to_string()]).await;
    assert_pong(&v);

    // restart on the same pin dir replaces the stale state
    let r = Redirector::start(&cfg).unwrap();
    wait_unloaded(&old_ids).await;
    let icpt = Interceptor::start(listen, r.origins()).await;
    let v = run_client(PYTHON, Some(&cg), &["tcp", "127.0.0.2", &port.to_string()]).await;
    assert_pong(&v);
    assert!(accepted_for(&icpt, v["pid"].as_u64().unwrap()).is_some());
    let ids = r.program_ids();
    r.shutdown().unwrap();
    assert!(!pins.0.exists());
    wait_unloaded(&ids).await;
    drop(icpt);

    // fail-open: nothing pinned; when it dies, selected processes go direct
    let open = RedirectConfig {
        fail_open: true,
        ..cfg.clone()
    };
    let r = Redirector::start(&open).unwrap();
    assert!(!pins.0.exists(), "fail-open pins nothing");
    let ids = r.program_ids();
    drop(r);
    wait_unloaded(&ids).await;
    let v = run_client(PYTHON, Some(&cg), &["tcp", "127.0.0.2", &port.to_string()]).await;
    assert_pong(&v);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pid_and_uid_selection_and_update() {
    if !privileged("pid_and_uid_selection_and_update") {
        return;
    }
    let (port, listen) = (18446u16, 934u16);
    let tmp = tempfile::tempdir().unwrap();
    let go = tmp.path().join("go");
    let pins = PinDir::new("pid");
    let _up = Upstream::start(port).await;
    // a running process selected by pid; it forks a child that connects
    let mut waiting = Child(Some(
        Command::new(PYTHON)
            .arg("-c")
            .arg(format!(
                "import os, subprocess, sys, time\n\
                 while not os.path.exists({go:?}): time.sleep(0.02)\n\
                 sys.stdout.write(subprocess.run([{PYTHON:?}, '-c', sys.argv[1], 'tcp', '127.0.0.2', '{port}'], \
                 capture_output=True, text=True).stdout)\n",
                go = go.to_str().unwrap()
            ))
            .arg(CLIENT)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap(),
    ));
    let pid = waiting.0.as_ref().unwrap().id().unwrap();
    let mut cfg = config(None, port, listen, &pins);
    cfg.pids = vec![pid];
    let mut r = Redirector::start(&cfg).unwrap();
    let icpt = Interceptor::start(listen, r.origins()).await;
    std::fs::write(&go, b"").unwrap();
    let v = finish(waiting.0.take().unwrap()).await;
    assert_pong(&v);
    assert!(
        accepted_for(&icpt, v["pid"].as_u64().unwrap()).is_some(),
        "child of a pid-selected process"
    );

    // uid selection: a process running as uid 65534 (nobody), added by update
    let nobody = |v: &[&str]| {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            PYTHON,
            "-c",
            CLIENT,
        ])
        .args(v);
        c.stdout(std::process::Stdio::piped()).kill_on_drop(true);
        c.spawn().unwrap()
    };
    let v = finish(nobody(&["tcp", "127.0.0.2", &port.to_string()])).await;
    assert_pong(&v);
    assert!(
        accepted_for(&icpt, v["pid"].as_u64().unwrap()).is_none(),
        "uid not selected yet"
    );
    cfg.uids = vec![65534];
    r.update_selection(&cfg).unwrap();
    let v = finish(nobody(&["tcp", "127.0.0.2", &port.to_string()])).await;
    assert_pong(&v);
    let o = accepted_for(&icpt, v["pid"].as_u64().unwrap())
        .expect("uid-selected")
        .origin
        .unwrap();
    assert_eq!((o.uid, o.gid), (65534, 65534));
    // and removed again
    cfg.uids.clear();
    r.update_selection(&cfg).unwrap();
    let v = finish(nobody(&["tcp", "127.0.0.2", &port.to_string()])).await;
    assert!(accepted_for(&icpt, v["pid"].as_u64().unwrap()).is_none());
    r.shutdown().unwrap();
}

#[test]
fn start_refuses_bad_settings_and_the_reader_needs_a_runtime() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // a valid instance that selects nothing, outside any runtime
        let pins = PinDir::new("noruntime");
        let cfg = RedirectConfig {
            ports: vec![18449],
            listen_port: 939,
            pin_dir: pins.0.clone(),
            ..RedirectConfig::default()
        };
        let mut r = Redirector::start(&cfg).unwrap();
        assert!(matches!(
            r.spawn_event_reader(),
            Err(bpf::BpfError::NoRuntime)
        ));
        let rt = tokio::runtime::Runtime::new().unwrap();
        let _g = rt.enter();
        r.spawn_event_reader().unwrap();
        assert!(matches!(
            r.spawn_event_reader(),
            Err(bpf::BpfError::ReaderRunning)
        ));
        assert!(r.selected_processes().unwrap().is_empty());
        let bad = RedirectConfig {
            cgroups: vec!["/kya-no-such-cgroup".into()],
            ..cfg.clone()
        };
        assert!(r.update_selection(&bad).is_err());
        r.shutdown().unwrap();
        assert!(!pins.0.exists());

        // as root: a bad pin dir is refused before anything is loaded
        let cfg = RedirectConfig {
            ports: vec![443],
            listen_port: 935,
            pin_dir: PathBuf::from("/sys/fs/bpf"),
            ..RedirectConfig::default()
        };
        assert!(Redirector::start(&cfg).is_err());
        let cfg = RedirectConfig {
            listen_port: 8080,
            ..cfg
        };
        assert!(Redirector::start(&cfg).is_err());
        return;
    }
    let cfg = RedirectConfig {
        ports: vec![443],
        listen_port: 935,
        pin_dir: PathBuf::from("/sys/fs/bpf/kya-test-noroot"),
        ..RedirectConfig::default()
    };
    assert!(Redirector::start(&cfg).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_side_by_side_keep_their_own_selection() {
    if !privileged("two_instances_side_by_side_keep_their_own_selection") {
        return;
    }
    let port = 18447u16;
    let (cg_a, cg_b) = (TestCgroup::new("side-a"), TestCgroup::new("side-b"));
    let (pins_a, pins_b) = (PinDir::new("side-a"), PinDir::new("side-b"));
    let _up = Upstream::start(port).await;
    let ra = Redirector::start(&config(Some(&cg_a), port, 936, &pins_a)).unwrap();
    let rb = Redirector::start(&config(Some(&cg_b), port, 937, &pins_b)).unwrap();
    let ia = Interceptor::start(936, ra.origins()).await;
    let ib = Interceptor::start(937, rb.origins()).await;

    for host in ["127.0.0.2", "::1", "::ffff:127.0.0.2"] {
        let v = run_client(PYTHON, Some(&cg_a), &["tcp", host, &port.to_string()]).await;
        assert_pong(&v);
        let pid = v["pid"].as_u64().unwrap();
        assert!(
            accepted_for(&ia, pid).is_some(),
            "A redirects its own selection ({host})"
        );
        assert!(ib
            .seen()
            .iter()
            .all(|a| a.origin.as_ref().map(|o| u64::from(o.pid)) != Some(pid)));
        let v = run_client(PYTHON, Some(&cg_b), &["tcp", host, &port.to_string()]).await;
        assert_pong(&v);
        let pid = v["pid"].as_u64().unwrap();
        assert!(
            accepted_for(&ib, pid).is_some(),
            "B redirects its own selection ({host})"
        );
        assert!(ia
            .seen()
            .iter()
            .all(|a| a.origin.as_ref().map(|o| u64::from(o.pid)) != Some(pid)));
    }
    assert_eq!(ia.seen().len(), 3);
    assert_eq!(ib.seen().len(), 3);
    let (sa, sb) = (ra.stats().unwrap(), rb.stats().unwrap());
    assert_eq!(sa.redirected4 + sa.redirected6 + sa.redirected_v4mapped, 3);
    assert_eq!(sb.redirected4 + sb.redirected6 + sb.redirected_v4mapped, 3);
    // shutting one down leaves the other working
    ra.shutdown().unwrap();
    let v = run_client(
        PYTHON,
        Some(&cg_b),
        &["tcp", "127.0.0.2", &port.to_string()],
    )
    .await;
    assert!(accepted_for(&ib, v["pid"].as_u64().unwrap()).is_some());
    rb.shutdown().unwrap();
}

const HELPER_ENV: &str = "KYA_TEST_DAEMON_HELPER";

/// Not a test on its own: the "daemon" half of
/// `daemon_inside_its_selected_cgroup_does_not_loop`, run in a re-exec of
/// this binary placed in the selected cgroup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_helper() {
    let Ok(spec) = std::env::var(HELPER_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split(',').collect();
    let cfg = RedirectConfig {
        cgroups: vec![parts[0].to_string()],
        ports: vec![parts[1].parse().unwrap()],
        listen_port: parts[2].parse().unwrap(),
        pin_dir: PathBuf::from(parts[3]),
        ..RedirectConfig::default()
    };
    let r = Redirector::start(&cfg).unwrap();
    let icpt = Interceptor::start(cfg.listen_port, r.origins()).await;
    println!(
        "KYA_HELPER:ready:{}",
        bpf::cgroup_path_of_pid(std::process::id()).unwrap()
    );
    let mut line = String::new();
    let _ = tokio::io::AsyncBufReadExt::read_line(
        &mut tokio::io::BufReader::new(tokio::io::stdin()),
        &mut line,
    )
    .await;
    let with_origin = icpt.seen().iter().filter(|a| a.origin.is_some()).count();
    println!(
        "KYA_HELPER:done:{with_origin}:{}",
        serde_json::to_string(&r.stats().unwrap()).unwrap()
    );
    r.shutdown().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_inside_its_selected_cgroup_does_not_loop() {
    if std::env::var(HELPER_ENV).is_ok()
        || !privileged("daemon_inside_its_selected_cgroup_does_not_loop")
    {
        return;
    }
    use tokio::io::AsyncBufReadExt;
    let (port, listen) = (18448u16, 938u16);
    let cg = TestCgroup::new("self");
    let pins = PinDir::new("self");
    let _up = Upstream::start(port).await;
    let exe = std::env::current_exe().unwrap();
    let mut daemon = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {} && exec \"$0\" \"$@\"",
            cg.procs().display()
        ))
        .arg(&exe)
        .args([
            "daemon_helper",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            HELPER_ENV,
            format!("{},{port},{listen},{}", cg.rel, pins.0.display()),
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(daemon.stdout.take().unwrap()).lines();
    let mut next_helper_line = async || loop {
        let l = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("helper timed out")
            .unwrap()
            .expect("helper exited early");
        // libtest may print "test daemon_helper ... " on the same line
        if let Some(i) = l.find("KYA_HELPER:") {
            return l[i + "KYA_HELPER:".len()..].to_string();
        }
    };
    let ready = next_helper_line().await;
    assert_eq!(
        ready,
        format!("ready:{}", cg.rel),
        "the daemon runs inside the selected cgroup"
    );

    let v = run_client(PYTHON, Some(&cg), &["tcp", "127.0.0.2", &port.to_string()]).await;
    assert_pong(&v);
    let v = run_client(PYTHON, Some(&cg), &["tcp", "::1", &port.to_string()]).await;
    assert_pong(&v);

    drop(daemon.stdin.take()); // EOF: report and shut down
    let done = next_helper_line().await;
    let rest = done.strip_prefix("done:").unwrap();
    let (n, stats) = rest.split_once(':').unwrap();
    assert_eq!(
        n, "2",
        "exactly the two client connections, no loop: {rest}"
    );
    let stats: Value = serde_json::from_str(stats).unwrap();
    eprintln!("kernel stats (daemon in selected cgroup): {stats}");
    assert_eq!(stats["established"], 2);
    assert!(stats["skipped_mark"].as_u64().unwrap() >= 2);
    let status = tokio::time::timeout(Duration::from_secs(20), daemon.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    assert!(!pins.0.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_daemon_fails_closed_until_restarted() {
    if std::env::var(HELPER_ENV).is_ok()
        || !privileged("sigkilled_daemon_fails_closed_until_restarted")
    {
        return;
    }
    use tokio::io::AsyncBufReadExt;
    let (port, listen) = (18451u16, 941u16);
    let cg = TestCgroup::new("kill9");
    let pins = PinDir::new("kill9");
    let _up = Upstream::start(port).await;
    let mut daemon = Command::new(std::env::current_exe().unwrap())
        .args([
            "daemon_helper",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            HELPER_ENV,
            format!("{},{port},{listen},{}", cg.rel, pins.0.display()),
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(daemon.stdout.take().unwrap()).lines();
    loop {
        let l = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("helper timed out")
            .unwrap()
            .expect("helper exited early");
        if l.contains("KYA_HELPER:ready") {
            break;
        }
    }
    let v = run_client(PYTHON, Some(&cg), &["tcp", "127.0.0.2", &port.to_string()]).await;
    assert_pong(&v);

    daemon.start_kill().unwrap(); // SIGKILL
    daemon.wait().await.unwrap();
    assert!(
        pins.0.join("kya_connect4").exists(),
        "pins survive the daemon"
    );
    let v = run_client(PYTHON, Some(&cg), &["tcp", "127.0.0.2", &port.to_string()]).await;
    assert_eq!(v["errno"], ECONNREFUSED, "fail closed after SIGKILL: {v}");
    let v = run_client(PYTHON, None, &["tcp", "127.0.0.2", &port.to_string()]).await;
    assert_pong(&v);

    let cfg = config(Some(&cg), port, listen, &pins);
    let r = Redirector::start(&cfg).unwrap();
    let icpt = Interceptor::start(listen, r.origins()).await;
    let v = run_client(PYTHON, Some(&cg), &["tcp", "127.0.0.2", &port.to_string()]).await;
    assert_pong(&v);
    assert!(accepted_for(&icpt, v["pid"].as_u64().unwrap()).is_some());
    let ids = r.program_ids();
    r.shutdown().unwrap();
    assert!(!pins.0.exists());
    wait_unloaded(&ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selected_process_in_an_unserved_netns_is_refused() {
    if !privileged("selected_process_in_an_unserved_netns_is_refused") {
        return;
    }
    let (port, listen) = (18452u16, 952u16);
    let cg = TestCgroup::new("netns");
    let pins = PinDir::new("netns");
    let r = Redirector::start(&config(Some(&cg), port, listen, &pins)).unwrap();
    // 127.0.0.1 in a fresh netns is not the interceptor (it could be a
    // container's own service), and no kya listener was opened there: the
    // kernel side refuses the selected process's connect (fail closed)
    let child = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {} && exec unshare -n /bin/sh -c 'ip link set lo up; exec \"$0\" \"$@\"' \"$0\" \"$@\"",
            cg.procs().display()
        ))
        .arg(PYTHON)
        .arg("-c")
        .arg(CLIENT)
        .args(["tcp", "127.0.0.2", &port.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let v = finish(child).await;
    assert_eq!(
        v["errno"], ECONNREFUSED,
        "refused in a namespace kya does not serve: {v}"
    );
    let stats = r.stats().unwrap();
    assert_eq!(stats.refused_netns, 1, "{stats:?}");
    assert_eq!(stats.redirected4, 0, "{stats:?}");
    r.shutdown().unwrap();
}

/// A network namespace created for one test (`ip netns add`), loopback up;
/// removed with its processes on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("kya-test-{tag}-{}", std::process::id());
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .output();
        for args in [
            vec!["netns", "add", &name],
            vec!["-n", &name, "link", "set", "lo", "up"],
        ] {
            let out = std::process::Command::new("ip")
                .args(&args)
                .output()
                .unwrap();
            assert!(out.status.success(), "ip {args:?}: {out:?}");
        }
        Netns(name)
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }

    /// A listener on `addr` inside the namespace, and the namespace's cookie.
    fn listen(&self, addr: &str) -> (std::net::TcpListener, u64) {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(self.path()).unwrap();
        let addr = addr.to_string();
        std::thread::spawn(move || {
            // SAFETY: a valid namespace fd; only this thread changes namespace.
            assert_eq!(
                unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            let l = std::net::TcpListener::bind(&addr).unwrap();
            let mut cookie = 0u64;
            let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
            // SAFETY: valid socket fd, out-pointer to a u64 with its length.
            let r = unsafe {
                libc::getsockopt(
                    l.as_raw_fd(),
                    libc::SOL_SOCKET,
                    71, // SO_NETNS_COOKIE
                    &mut cookie as *mut u64 as *mut libc::c_void,
                    &mut len,
                )
            };
            assert_eq!(r, 0);
            (l, cookie)
        })
        .join()
        .unwrap()
    }

    /// The test client inside the namespace and `cg`.
    async fn client(&self, cg: &TestCgroup, args: &[&str]) -> Value {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path()))
            .arg("/bin/sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {} && exec \"$0\" \"$@\"",
                cg.procs().display()
            ))
            .arg(PYTHON)
            .arg("-c")
            .arg(CLIENT)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        finish(cmd.spawn().unwrap()).await
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(out) = std::process::Command::new("ip")
            .args(["netns", "pids", &self.0])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = std::process::Command::new("kill")
                    .args(["-9", pid])
                    .output();
            }
        }
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_loopback_tuples_in_two_namespaces_keep_their_own_origins() {
    if !privileged("identical_loopback_tuples_in_two_namespaces_keep_their_own_origins") {
        return;
    }
    let (port_a, port_b, listen, src) = (18453u16, 18454u16, 953u16, "40953");
    let cg = TestCgroup::new("netns2");
    let pins = PinDir::new("netns2");
    let mut cfg = config(Some(&cg), port_a, listen, &pins);
    cfg.ports.push(port_b);
    let mut r = Redirector::start(&cfg).unwrap();
    let (a, b) = (Netns::new("bpfa"), Netns::new("bpfb"));
    // each namespace's own "kya listener" at the same loopback address
    let (_la, cookie_a) = a.listen(&format!("127.0.0.1:{listen}"));
    let (_lb, cookie_b) = b.listen(&format!("127.0.0.1:{listen}"));
    assert_ne!(cookie_a, cookie_b);
    r.serve_netns(cookie_a).unwrap();
    r.serve_netns(cookie_b).unwrap();
    // the very same 4-tuple, 127.0.0.1:40953 -> 127.0.0.1:953, in both
    let va = a
        .client(&cg, &["bound", "127.0.0.7", &port_a.to_string(), src])
        .await;
    let vb = b
        .client(&cg, &["bound", "127.0.0.7", &port_b.to_string(), src])
        .await;
    assert_eq!(va["local"], format!("127.0.0.1:{src}"), "{va}");
    assert_eq!(vb["local"], format!("127.0.0.1:{src}"), "{vb}");
    let peer: SocketAddr = format!("127.0.0.1:{src}").parse().unwrap();
    let local: SocketAddr = format!("127.0.0.1:{listen}").parse().unwrap();
    let origins = r.origins();
    assert!(
        origins.take(peer, local, 0).unwrap().is_none(),
        "the host's key is another key"
    );
    let oa = origins
        .take(peer, local, cookie_a)
        .unwrap()
        .expect("a's origin");
    let ob = origins
        .take(peer, local, cookie_b)
        .unwrap()
        .expect("b's origin");
    assert_eq!(oa.dst, format!("127.0.0.7:{port_a}").parse().unwrap());
    assert_eq!(ob.dst, format!("127.0.0.7:{port_b}").parse().unwrap());
    assert_eq!(u64::from(oa.pid), va["pid"].as_u64().unwrap());
    assert_eq!(u64::from(ob.pid), vb["pid"].as_u64().unwrap());
    assert_eq!((oa.netns_cookie, ob.netns_cookie), (cookie_a, cookie_b));
    // once unserved, the namespace's selected connects are refused again
    r.unserve_netns(cookie_a).unwrap();
    let v = a
        .client(&cg, &["tcp", "127.0.0.7", &port_a.to_string()])
        .await;
    assert_eq!(v["errno"], ECONNREFUSED, "{v}");
    let stats = r.stats().unwrap();
    assert_eq!(stats.redirected4, 2, "{stats:?}");
    assert_eq!(stats.refused_netns, 1, "{stats:?}");
    r.shutdown().unwrap();
}
