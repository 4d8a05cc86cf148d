//! Connection setup overhead of the eBPF redirect (run as root:
//! `cargo bench -p kya-agent --bench redirect`).
//!
//! Each iteration is one TCP connect + "ping"/"pong" round trip + close,
//! made by a client *process* (a re-exec of this binary), because the
//! benchmarking process is the daemon and the daemon is never redirected:
//! * `direct_no_bpf`: nothing attached (baseline),
//! * `unselected_bpf_attached`: kya attached, client not selected (the
//!   programs' early exit),
//! * `selected_redirected_spliced`: client in the selected cgroup; redirected
//!   to the in-bench interceptor, which takes the origin and splices to the
//!   upstream over a marked socket.
//!
//! Without root it prints a message and measures nothing.

use criterion::Criterion;
use kya_agent::bpf::{cgroup2_mount, mark_socket, RedirectConfig, Redirector};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};

const CLIENT_ENV: &str = "KYA_BENCH_CLIENT";
const UPSTREAM_PORT: u16 = 18450;
const LISTEN_PORT: u16 = 940;

/// Client mode: read an iteration count per line, run that many
/// connect/round-trip/close cycles, answer the elapsed nanoseconds; or
/// `lat N`: answer the N single-connect latencies.
fn client(target: &str) {
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let line = line.unwrap_or_default();
        if let Some(n) = line.trim().strip_prefix("lat ") {
            // one latency per connect, for medians
            let n: usize = n.parse().unwrap_or(0);
            let mut lat = Vec::with_capacity(n);
            for _ in 0..n {
                let start = Instant::now();
                let mut s = std::net::TcpStream::connect(target).expect("connect");
                s.write_all(b"ping").expect("write");
                let mut buf = [0u8; 4];
                s.read_exact(&mut buf).expect("read");
                lat.push(start.elapsed().as_nanos().to_string());
            }
            writeln!(out, "{}", lat.join(" ")).expect("stdout");
            out.flush().expect("flush");
            continue;
        }
        let Ok(n) = line.trim().parse::<u64>() else {
            return;
        };
        let start = Instant::now();
        for _ in 0..n {
            let mut s = std::net::TcpStream::connect(target).expect("connect");
            s.write_all(b"ping").expect("write");
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).expect("read");
        }
        writeln!(out, "{}", start.elapsed().as_nanos()).expect("stdout");
        out.flush().expect("flush");
    }
}

struct Client {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Client {
    fn spawn(cgroup_procs: Option<&PathBuf>) -> Client {
        let exe = std::env::current_exe().expect("current exe");
        let mut cmd = match cgroup_procs {
            Some(p) => {
                let mut c = Command::new("/bin/sh");
                c.arg("-c")
                    .arg(format!("echo $$ > {} && exec \"$0\"", p.display()))
                    .arg(exe);
                c
            }
            None => Command::new(exe),
        };
        cmd.env(CLIENT_ENV, format!("127.0.0.2:{UPSTREAM_PORT}"));
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn client");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Client {
            child,
            stdin,
            stdout,
        }
    }
    fn latencies(&mut self, n: usize) -> Vec<u64> {
        writeln!(self.stdin, "lat {n}").expect("to client");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("from client");
        line.split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect()
    }
    fn run(&mut self, iters: u64) -> Duration {
        writeln!(self.stdin, "{iters}").expect("to client");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("from client");
        Duration::from_nanos(line.trim().parse().expect("client answer"))
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The upstream: reads "ping", answers "pong".
fn upstream(rt: &tokio::runtime::Runtime) {
    rt.spawn(async {
        let l = TcpListener::bind(("127.0.0.2", UPSTREAM_PORT))
            .await
            .expect("upstream bind");
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4];
                if s.read_exact(&mut buf).await.is_ok() {
                    let _ = s.write_all(b"pong").await;
                }
            });
        }
    });
}

/// A minimal interceptor: take the origin, splice to it over a marked socket.
fn interceptor(
    rt: &tokio::runtime::Runtime,
    origins: kya_agent::bpf::OriginTable,
    port: u16,
) -> tokio::task::JoinHandle<()> {
    rt.spawn(async move {
        let l = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("interceptor bind");
        loop {
            let Ok((mut s, peer)) = l.accept().await else {
                return;
            };
            let Ok(local) = s.local_addr() else { continue };
            let Ok(Some(origin)) = origins.take(peer, local, 0) else {
                continue;
            };
            tokio::spawn(async move {
                let Ok(sock) = TcpSocket::new_v4() else {
                    return;
                };
                if mark_socket(&sock).is_err() {
                    return;
                }
                let Ok(mut up) = sock.connect(origin.dst).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
            });
        }
    })
}

/// Criterion runs its cases one after the other, so on a shared, loaded
/// machine a load change between cases shows up as "overhead". This pass
/// interleaves the cases in rounds (attach/detach between them) and reports
/// the median, p10 and p90 of single connects per case over all rounds.
fn interleaved(rt: &tokio::runtime::Runtime, cg_rel: &str, procs: &PathBuf) {
    const ROUNDS: u16 = 10;
    const PER_BATCH: usize = 200;
    let mut outside = Client::spawn(None);
    let mut inside = Client::spawn(Some(procs));
    let (mut direct, mut unselected, mut selected) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        direct.extend(outside.latencies(PER_BATCH));
        // a fresh listen port per round: no rebinding race with the last one
        let port = LISTEN_PORT + 2 + round;
        let cfg = RedirectConfig {
            cgroups: vec![cg_rel.to_string()],
            ports: vec![UPSTREAM_PORT],
            listen_port: port,
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/kya-bench-il-{}", std::process::id())),
            fail_open: true,
            ..RedirectConfig::default()
        };
        let r = Redirector::start(&cfg).expect("redirector");
        let task = interceptor(rt, r.origins(), port);
        std::thread::sleep(Duration::from_millis(20));
        unselected.extend(outside.latencies(PER_BATCH));
        selected.extend(inside.latencies(PER_BATCH));
        r.shutdown().expect("shutdown");
        task.abort();
    }
    let report = |name: &str, v: &mut Vec<u64>| {
        v.sort_unstable();
        if v.is_empty() {
            return;
        }
        let q = |p: f64| v[((v.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
        eprintln!(
            "interleaved {name}: n={} median={:.1}us p10={:.1}us p90={:.1}us",
            v.len(),
            q(0.5),
            q(0.1),
            q(0.9)
        );
    };
    report("direct_no_bpf", &mut direct);
    report("unselected_bpf_attached", &mut unselected);
    report("selected_redirected_spliced", &mut selected);
}

fn main() {
    if let Ok(target) = std::env::var(CLIENT_ENV) {
        client(&target);
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("redirect bench: needs root (loads BPF, creates a cgroup); nothing measured");
        return;
    }
    let mut c = Criterion::default()
        .sample_size(30)
        .measurement_time(Duration::from_secs(5))
        .configure_from_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");

    let cg_rel = format!("/kya-bench-{}", std::process::id());
    let cg_dir = cgroup2_mount()
        .expect("cgroup2")
        .join(cg_rel.trim_start_matches('/'));
    std::fs::create_dir_all(&cg_dir).expect("bench cgroup");
    let procs = cg_dir.join("cgroup.procs");

    let mut g = c.benchmark_group("connect_roundtrip");
    {
        upstream(&rt);
        let mut outside = Client::spawn(None);
        let mut inside = Client::spawn(Some(&procs));
        g.bench_function("direct_no_bpf", |b| b.iter_custom(|n| outside.run(n)));

        let cfg = RedirectConfig {
            cgroups: vec![cg_rel.clone()],
            ports: vec![UPSTREAM_PORT],
            listen_port: LISTEN_PORT,
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/kya-bench-{}", std::process::id())),
            fail_open: true,
            ..RedirectConfig::default()
        };
        let r = Redirector::start(&cfg).expect("redirector");
        let _icpt = interceptor(&rt, r.origins(), LISTEN_PORT);
        std::thread::sleep(Duration::from_millis(100));
        g.bench_function("unselected_bpf_attached", |b| {
            b.iter_custom(|n| outside.run(n))
        });
        g.bench_function("selected_redirected_spliced", |b| {
            b.iter_custom(|n| inside.run(n))
        });
        g.finish();
        let stats = r.stats().expect("stats");
        eprintln!(
            "kernel stats after the bench: {}",
            serde_json::to_string(&stats).unwrap_or_default()
        );
        drop(outside);
        drop(inside);
        r.shutdown().expect("shutdown");
    }
    interleaved(&rt, &cg_rel, &procs);
    for _ in 0..50 {
        if std::fs::remove_dir(&cg_dir).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    c.final_summary();
}
