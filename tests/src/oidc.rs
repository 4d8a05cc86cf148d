//! The real OpenID Provider of the tests (npm `oidc-provider`,
//! `tests/peers/oidc_provider.mjs`), started on loopback ports, with the
//! control API through which a test plays the human on the authentication
//! device and reads the provider's own record.

use crate::{ensure_peers, peers, Daemon};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `oidc_provider.mjs`; its process group is killed on drop (also
/// when the test fails), and its stderr is shown when the test fails.
pub struct Provider {
    child: Child,
    pub control_port: u16,
    pub issuer: String,
    pub log: PathBuf,
}

impl Provider {
    pub fn start(dir: &Path, op_port: u16, control_port: u16, env: &[(&str, String)]) -> Self {
        use std::os::unix::process::CommandExt;
        // Installs node_modules (oidc-provider) if needed; fails without node.
        ensure_peers();
        let log = dir.join(format!("oidc-provider-{op_port}.log"));
        let mut cmd = Command::new("node");
        cmd.process_group(0)
            .arg(peers().join("oidc_provider.mjs"))
            .current_dir(peers())
            .env("OP_PORT", op_port.to_string())
            .env("CONTROL_PORT", control_port.to_string())
            .env("CLIENT_ID", "kya")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("provider log"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!("this test needs node for tests/peers/oidc_provider.mjs: {e}")
        });
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        // Read the ready line, then keep draining so node never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if v["ready"] == true {
                        let _ = tx.send(v);
                    }
                }
            }
        });
        let mut provider = Self {
            child,
            control_port,
            issuer: String::new(),
            log,
        };
        let ready = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                panic!(
                    "the OpenID Provider did not report ready:\n{}",
                    std::fs::read_to_string(&provider.log).unwrap_or_default()
                )
            });
        provider.issuer = ready["issuer"].as_str().expect("issuer").to_string();
        assert_eq!(provider.issuer, format!("http://127.0.0.1:{op_port}"));
        provider
    }

    /// One request to the control API (HTTP/1.0: no chunking, closed at the end).
    pub fn control(&self, method: &str, path: &str) -> (u16, Value) {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.control_port))
            .expect("connect to the provider's control API");
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"
        )
        .expect("send");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        (status, serde_json::from_str(body).unwrap_or(Value::Null))
    }

    /// The provider's own record of the authentication requests it received.
    pub fn requests(&self) -> Vec<Value> {
        let (status, v) = self.control("GET", "/requests");
        assert_eq!(status, 200, "{v}");
        v.as_array().cloned().unwrap_or_default()
    }

    pub fn request(&self, id: &str) -> Value {
        self.requests()
            .into_iter()
            .find(|r| r["id"] == id)
            .unwrap_or_else(|| panic!("no request {id} at the provider"))
    }

    /// Wait for the authentication request kya sent for the held call shown
    /// with `binding_message`.
    pub fn wait_request(&self, binding_message: &str, daemon: &Daemon) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(r) = self
                .requests()
                .into_iter()
                .find(|r| r["binding_message"] == binding_message)
            {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "kya never sent a backchannel authentication request for {binding_message:?}; \
                 the provider has {:?}\n{}",
                self.requests(),
                daemon.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The human answers on their device: `approve` or `deny`.
    pub fn answer(&self, id: &str, verb: &str) {
        let (status, v) = self.control("POST", &format!("/requests/{id}/{verb}"));
        assert_eq!(status, 200, "{verb} {id}: {v}");
    }

    /// Rewrite the ID token of the next token responses (`none` to stop).
    pub fn tamper(&self, mode: &str) {
        let (status, v) = self.control("POST", &format!("/tamper?mode={mode}"));
        assert_eq!(status, 200, "tamper {mode}: {v}");
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(-(self.child.id() as i32));
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- oidc-provider stderr ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}
