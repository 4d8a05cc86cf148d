//! `kya-probe`: a plain, unmodified network client for kya's end-to-end tests.
//!
//! It knows nothing about kya: it connects where it is told and reports, as one
//! JSON line on stdout, what the kernel told *it* (its own address, the peer it
//! believes it talks to, the bytes it got back). Tests compare that with the
//! server's and the daemon's own records.
//!
//! ```text
//! kya-probe tcp HOST PORT [--payload TEXT] [--thread] [--fork-exec] [--wait-stdin]
//! kya-probe udp HOST PORT [--wait-stdin]
//! kya-probe bench HOST PORT COUNT
//! kya-probe hold HOST PORT COUNT
//! ```

use serde_json::{json, Value};
use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = match run(&args) {
        Ok(v) => v,
        Err(e) => json!({ "error": e.to_string(), "errno": e.raw_os_error() }),
    };
    let failed = out.get("error").is_some();
    println!("{out}");
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn flag(args: &[String], name: &str) -> bool {
    args.iter().any(|a| a == name)
}

fn opt<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn target(args: &[String]) -> std::io::Result<SocketAddr> {
    let (host, port) = match (args.get(1), args.get(2)) {
        (Some(h), Some(p)) => (h, p),
        _ => return Err(std::io::Error::other("usage: kya-probe MODE HOST PORT")),
    };
    let port: u16 = port.parse().map_err(std::io::Error::other)?;
    (host.trim_matches(|c| c == '[' || c == ']'), port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other("no address"))
}

fn run(args: &[String]) -> std::io::Result<Value> {
    if flag(args, "--wait-stdin") {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
    }
    let mode = args.first().map(String::as_str).unwrap_or("");
    match mode {
        "tcp" if flag(args, "--fork-exec") => fork_exec(args),
        "tcp" if flag(args, "--thread") => {
            let a = args.to_vec();
            std::thread::spawn(move || tcp(&a))
                .join()
                .map_err(|_| std::io::Error::other("thread panicked"))?
                .map(|mut v| {
                    v["in_thread"] = json!(true);
                    v
                })
        }
        "tcp" => tcp(args),
        "udp" => udp(args),
        "bench" => bench(args),
        "hold" => hold(args),
        _ => Err(std::io::Error::other(
            "usage: kya-probe tcp|udp|bench|hold HOST PORT ...",
        )),
    }
}

fn tcp(args: &[String]) -> std::io::Result<Value> {
    let dst = target(args)?;
    let payload = opt(args, "--payload").unwrap_or("hello from kya-probe");
    let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let local = s.local_addr()?;
    let peer = s.peer_addr()?;
    s.write_all(payload.as_bytes())?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply)?;
    Ok(json!({
        "pid": std::process::id(),
        "tid": nix::unistd::gettid().as_raw(),
        "local": local.to_string(),
        "peer": peer.to_string(),
        "reply": String::from_utf8_lossy(&reply),
    }))
}

fn fork_exec(args: &[String]) -> std::io::Result<Value> {
    let exe = std::env::current_exe()?;
    let child_args: Vec<&String> = args.iter().filter(|a| *a != "--fork-exec").collect();
    let out = std::process::Command::new(exe).args(child_args).output()?;
    let child: Value = serde_json::from_slice(&out.stdout).map_err(std::io::Error::other)?;
    Ok(json!({ "pid": std::process::id(), "child": child }))
}

fn udp(args: &[String]) -> std::io::Result<Value> {
    let dst = target(args)?;
    let bind: SocketAddr = if dst.is_ipv4() {
        "0.0.0.0:0".parse().map_err(std::io::Error::other)?
    } else {
        "[::]:0".parse().map_err(std::io::Error::other)?
    };
    let s = UdpSocket::bind(bind)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    // Both paths QUIC clients use: sendto on an unconnected socket, then connect + send.
    s.send_to(b"udp-probe", dst)?;
    let mut buf = [0u8; 64];
    let (n, from) = s.recv_from(&mut buf)?;
    s.connect(dst)?;
    s.send(b"udp-probe")?;
    Ok(json!({
        "pid": std::process::id(),
        "reply": String::from_utf8_lossy(&buf[..n]),
        "from": from.to_string(),
    }))
}

/// COUNT connections opened one after the other and all kept open: each
/// sends a line and waits for its echo; the answer lists, for each, the
/// echo it got or how it ended (a connection refused by a limit is reset).
fn hold(args: &[String]) -> std::io::Result<Value> {
    let dst = target(args)?;
    let count: usize = args
        .get(3)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("hold needs COUNT"))?;
    let mut open = Vec::with_capacity(count);
    let mut outcomes = Vec::with_capacity(count);
    for i in 0..count {
        let payload = format!("hold-{i}");
        let outcome = (|| -> std::io::Result<(TcpStream, String)> {
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(10))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(payload.as_bytes())?;
            let mut b = vec![0u8; payload.len()];
            let mut got = 0;
            while got < b.len() {
                match s.read(&mut b[got..])? {
                    0 => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
                    n => got += n,
                }
            }
            Ok((s, String::from_utf8_lossy(&b).into_owned()))
        })();
        match outcome {
            Ok((s, reply)) => {
                open.push(s);
                outcomes.push(json!({ "reply": reply }));
            }
            Err(e) => outcomes.push(json!({ "error": e.to_string() })),
        }
    }
    Ok(json!({ "pid": std::process::id(), "connections": outcomes }))
}

/// COUNT sequential connects, each timed from `connect` to the echo of one byte.
fn bench(args: &[String]) -> std::io::Result<Value> {
    let dst = target(args)?;
    let count: usize = args
        .get(3)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("bench needs COUNT"))?;
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let start = Instant::now();
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(10))?;
        s.set_nodelay(true)?;
        s.write_all(b"x")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        samples.push(start.elapsed().as_nanos() as u64);
    }
    samples.sort_unstable();
    let pct = |p: f64| samples[((samples.len() as f64 - 1.0) * p).round() as usize];
    Ok(json!({
        "count": count,
        "median_ns": pct(0.5),
        "p99_ns": pct(0.99),
        "min_ns": samples.first(),
        "max_ns": samples.last(),
    }))
}
