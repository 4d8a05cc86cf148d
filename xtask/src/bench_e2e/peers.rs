//! The processes the end-to-end benchmark runs besides kya: its own upstream
//! (`kya-bench-upstream`) and mitmproxy (`mitmdump`, reverse-proxy mode,
//! from PyPI into a private venv). Each runs in a process group of its own,
//! killed whole on drop.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process group, killed on drop.
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        let group = -(self.0.id() as i32);
        // SAFETY: kill(2) on our own child's process group.
        unsafe { libc::kill(group, libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

fn wait_listening(addr: &str, what: &str, child: &mut Child) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(addr).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            bail!("{what} exited ({status}) before listening on {addr}");
        }
        if Instant::now() > deadline {
            bail!("{what} did not listen on {addr} within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The benchmark's upstream MCP server.
pub(super) struct Upstream {
    _group: Group,
    pub record: PathBuf,
}

impl Upstream {
    /// Serve on `addrs` with `dir/srv.pem`; calls it must record go to `dir/upstream.log`.
    pub(super) fn start(bin: &Path, dir: &Path, addrs: &[&str]) -> Result<Self> {
        let record = dir.join("upstream.log");
        std::fs::write(&record, "").context("upstream record")?;
        let mut child = Command::new(bin)
            .process_group(0)
            .arg("--cert")
            .arg(dir.join("srv.pem"))
            .arg("--key")
            .arg(dir.join("srv.key"))
            .arg("--record")
            .arg(&record)
            .args(addrs)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = BufReader::new(out).read_line(&mut line);
        }
        let group = Group(child);
        if line.trim() != "ready" {
            bail!("the upstream did not start (it printed {line:?})");
        }
        Ok(Self {
            _group: group,
            record,
        })
    }

    /// The times (Unix nanoseconds) at which the upstream ran `tool`.
    pub(super) fn ran(&self, tool: &str) -> Vec<u128> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(name, _)| *name == tool)
            .filter_map(|(_, t)| t.parse().ok())
            .collect()
    }
}

/// The private venv with mitmproxy (and matplotlib for the plot).
pub(super) struct Venv {
    pub dir: PathBuf,
}

impl Venv {
    /// Create `dir` and install the packages unless they are already there.
    pub(super) fn ensure(dir: &Path) -> Result<Self> {
        let venv = Self {
            dir: dir.to_path_buf(),
        };
        if venv.bin("mitmdump").exists() && venv.bin("python").exists() && venv.has_matplotlib() {
            return Ok(venv);
        }
        eprintln!(
            "bench-e2e: installing mitmproxy and matplotlib into {}",
            dir.display()
        );
        run(Command::new("python3").arg("-m").arg("venv").arg(dir))?;
        run(Command::new(venv.bin("pip")).args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "mitmproxy",
            "matplotlib",
        ]))?;
        Ok(venv)
    }

    pub(super) fn bin(&self, name: &str) -> PathBuf {
        self.dir.join("bin").join(name)
    }

    fn has_matplotlib(&self) -> bool {
        Command::new(self.bin("python"))
            .args(["-c", "import matplotlib"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// `mitmdump --version`'s mitmproxy line.
    pub(super) fn mitmproxy_version(&self) -> String {
        Command::new(self.bin("mitmdump"))
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .find(|l| l.starts_with("Mitmproxy"))
                    .map(|l| l.trim_start_matches("Mitmproxy:").trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into())
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// `mitmdump` in reverse-proxy mode in front of the upstream.
pub(super) struct Mitmproxy {
    _group: Group,
    /// The CA mitmproxy signs its leaves with (the client trusts it).
    pub ca: PathBuf,
}

impl Mitmproxy {
    /// Listen on `127.0.0.1:listen_port`, forward to `https://upstream`
    /// (upstream certificate not verified: mitmproxy has no hosts file for
    /// the test names), streaming bodies over 64 KiB instead of buffering them.
    pub(super) fn start(
        venv: &Venv,
        confdir: &Path,
        listen_port: u16,
        upstream: &str,
    ) -> Result<Self> {
        std::fs::create_dir_all(confdir).context("mitmproxy confdir")?;
        let mut child = Command::new(venv.bin("mitmdump"))
            .process_group(0)
            .arg("--mode")
            .arg(format!("reverse:https://{upstream}"))
            .args(["--listen-host", "127.0.0.1", "--listen-port"])
            .arg(listen_port.to_string())
            .arg("--set")
            .arg(format!("confdir={}", confdir.display()))
            .args([
                "--set",
                "ssl_insecure=true",
                "--set",
                "stream_large_bodies=64k",
                "--set",
                "flow_detail=0",
                "--set",
                "termlog_verbosity=error",
                "-q",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start mitmdump")?;
        let addr = format!("127.0.0.1:{listen_port}");
        let waited = wait_listening(&addr, "mitmdump", &mut child);
        let group = Group(child);
        waited?;
        let ca = confdir.join("mitmproxy-ca-cert.pem");
        if !ca.exists() {
            bail!("mitmdump created no CA at {}", ca.display());
        }
        Ok(Self { _group: group, ca })
    }
}
