//! Real containers for the end-to-end tests: Podman (daemonless), images
//! imported from a root filesystem made on the machine (no registry is
//! reachable), a bridge network with a private subnet created by the test,
//! and containers in a cgroup parent of the test's own. Everything is named
//! `kya-test-...` and removed on drop; `cargo xtask clean-host` removes
//! leftovers of a crashed run by the same prefix.
//!
//! The image holds no programs: the host's `/usr` is bind-mounted read-only
//! (and the test peers' directory), so the unmodified MCP client runs inside
//! the container with the host's Python and the peers' virtual environment.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Name prefix of every container, network and image the tests create.
pub const PREFIX: &str = "kya-test-";

/// Global flags for every `podman` call: the cgroupfs manager (no systemd
/// here) and runc, which supports the hybrid cgroup layout (v1 controllers
/// with a cgroup2 hierarchy beside them) that crun refuses.
const GLOBAL: &[&str] = &["--cgroup-manager", "cgroupfs", "--runtime", "runc"];

/// `podman ARGS` with the global flags.
pub fn podman(args: &[&str]) -> Command {
    let mut c = Command::new("podman");
    c.args(GLOBAL).args(args).stdin(Stdio::null());
    c
}

/// `podman ARGS`, failing the test on a non-zero exit; its stdout, trimmed.
pub fn podman_ok(args: &[&str]) -> String {
    let out = podman(args).output().expect("run podman");
    assert!(
        out.status.success(),
        "podman {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// True when Podman is installed; otherwise the test is skipped (a failure
/// under `CI=true`).
pub fn available(test: &str) -> bool {
    let ok = Command::new("podman")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        kya_testkit::skip(test, "needs podman (apt-get install podman runc)");
    }
    ok
}

/// An image with an empty root filesystem (directories, the merged-/usr
/// symlinks, `/etc/passwd`), imported with `podman import`.
pub struct TestImage {
    pub name: String,
}

impl TestImage {
    pub fn new(tag: &str) -> Self {
        let name = format!("localhost/{PREFIX}{tag}-{}:latest", std::process::id());
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("rootfs");
        for d in [
            "usr", "etc", "proc", "sys", "dev", "tmp", "run", "var", "root",
        ] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir rootfs");
        }
        for l in ["bin", "lib", "lib64", "sbin"] {
            std::os::unix::fs::symlink(format!("usr/{l}"), root.join(l)).expect("symlink");
        }
        std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").expect("passwd");
        std::fs::write(root.join("etc/group"), "root:x:0:\n").expect("group");
        let tar = dir.path().join("rootfs.tar");
        let out = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .output()
            .expect("tar");
        assert!(out.status.success(), "tar: {out:?}");
        let _ = podman(&["rmi", "-f", &name]).output();
        podman_ok(&["import", tar.to_str().expect("utf-8"), &name]);
        Self { name }
    }
}

impl Drop for TestImage {
    fn drop(&mut self) {
        let _ = podman(&["rmi", "-f", &self.name]).output();
    }
}

/// A bridge network `kya-test-TAG-PID` with the private subnet
/// 10.233.X.0/24 (gateway 10.233.X.1 on the host), no DNS.
pub struct TestNetwork {
    pub name: String,
    pub gateway: String,
}

impl TestNetwork {
    pub fn new(tag: &str) -> Self {
        let pid = std::process::id();
        let name = format!("{PREFIX}{tag}-{pid}");
        let third = pid % 250;
        let subnet = format!("10.233.{third}.0/24");
        let gateway = format!("10.233.{third}.1");
        let _ = podman(&["network", "rm", "-f", &name]).output();
        podman_ok(&[
            "network",
            "create",
            "--disable-dns",
            "--subnet",
            &subnet,
            "--gateway",
            &gateway,
            &name,
        ]);
        Self { name, gateway }
    }
}

impl Drop for TestNetwork {
    fn drop(&mut self) {
        let _ = podman(&["network", "rm", "-f", &self.name]).output();
    }
}

/// A cgroup parent `/kya-test-TAG-PID` for the test's containers (in every
/// cgroup hierarchy: runc creates it in the v1 ones too); removed on drop.
pub struct CgroupParent {
    /// Relative to the cgroup roots, e.g. `/kya-test-ctr-1234`.
    pub rel: String,
}

impl CgroupParent {
    pub fn new(tag: &str) -> Self {
        let p = Self {
            rel: format!("/{PREFIX}{tag}-{}", std::process::id()),
        };
        p.remove();
        p
    }

    /// Removes it from every hierarchy; what is still in it (the engine's
    /// monitor processes outlive a removed container briefly) is killed.
    fn remove(&self) {
        for mount in cgroup_mounts() {
            let dir = mount.join(self.rel.trim_start_matches('/'));
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                remove_tree(&dir);
                if !dir.exists() || std::time::Instant::now() > deadline {
                    break;
                }
                kill_tree(&dir);
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
}

impl Drop for CgroupParent {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Every cgroup (v1 and v2) mount point.
pub fn cgroup_mounts() -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            (fstype == "cgroup" || fstype == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
                .flatten()
        })
        .collect()
}

/// SIGKILL every process in a cgroup tree.
fn kill_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                kill_tree(&e.path());
            }
        }
    }
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// rmdir a cgroup tree, children first (processes must be gone).
fn remove_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// The installation the peers' virtual environment runs on (the parent of
/// `home` in its `pyvenv.cfg`), when it is not the system's.
fn python_home() -> Option<String> {
    let cfg = std::fs::read_to_string(crate::peers().join(".venv/pyvenv.cfg")).ok()?;
    let home = cfg.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == "home").then(|| v.trim().to_string())
    })?;
    let prefix = Path::new(&home).parent()?.to_str()?.to_string();
    Some(prefix)
}

/// A running container, removed (`podman rm -f`) on drop.
pub struct TestContainer {
    pub name: String,
    pub id: String,
}

impl TestContainer {
    /// `podman run -d` of `cmd` in `image` on `net`, under `parent`, with
    /// the host's `/usr`, the test peers and the Python installation their
    /// virtual environment runs on mounted read-only.
    pub fn run(
        image: &TestImage,
        net: &TestNetwork,
        parent: &CgroupParent,
        tag: &str,
        cmd: &[&str],
    ) -> Self {
        let name = format!("{PREFIX}{tag}-{}", std::process::id());
        let _ = podman(&["rm", "-f", "-t", "0", &name]).output();
        let peers = crate::peers();
        let peers = peers.to_str().expect("utf-8");
        let mut args = vec![
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            &net.name,
            "--cgroup-parent",
            &parent.rel,
            // explicit limits: the defaults may exceed what this host allows
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=4096:4096",
            "-v",
            "/usr:/usr:ro",
        ];
        let peers_mount = format!("{peers}:{peers}:ro");
        args.extend(["-v", &peers_mount]);
        // a virtual environment linked in from elsewhere: mounted where it is
        let venv_mount = std::fs::canonicalize(crate::peers().join(".venv"))
            .ok()
            .and_then(|v| v.to_str().map(str::to_string))
            .filter(|v| !v.starts_with(peers))
            .map(|v| format!("{v}:{v}:ro"));
        if let Some(m) = &venv_mount {
            args.extend(["-v", m]);
        }
        let python_mount = python_home()
            .filter(|h| !h.starts_with("/usr"))
            .map(|h| format!("{h}:{h}:ro"));
        if let Some(m) = &python_mount {
            args.extend(["-v", m]);
        }
        args.push(&image.name);
        args.extend_from_slice(cmd);
        let id = podman_ok(&args);
        assert!(
            id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "podman run printed {id:?}"
        );
        Self { name, id }
    }

    /// The pid (on the host) of its main process.
    pub fn pid(&self) -> u32 {
        podman_ok(&["inspect", "--format", "{{.State.Pid}}", &self.name])
            .parse()
            .expect("pid")
    }

    /// Its network namespace's inode.
    pub fn netns_inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/proc/{}/ns/net", self.pid()))
            .expect("netns of the container")
            .ino()
    }

    /// Its cgroup v2 path (relative to the cgroup2 mount).
    pub fn cgroup(&self) -> String {
        let text = std::fs::read_to_string(format!("/proc/{}/cgroup", self.pid()))
            .expect("cgroup of the container");
        text.lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("a cgroup2 line")
            .to_string()
    }

    /// `podman exec NAME ARGS`, to completion.
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut all = vec!["exec", self.name.as_str()];
        all.extend_from_slice(args);
        podman(&all).output().expect("podman exec")
    }

    /// Stop and remove it now.
    pub fn remove(&self) {
        podman_ok(&["rm", "-f", "-t", "0", &self.name]);
    }
}

impl Drop for TestContainer {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", "-t", "0", &self.name]).output();
    }
}

/// The privileges `kya` runs with as a container, exactly as the README's
/// `podman run`/`docker run` line gives them (the test checks the README
/// has each). CAP_SYS_ADMIN (needed to enter other network namespaces)
/// also grants what CAP_BPF and CAP_PERFMON would for loading and attaching
/// the programs; the engine's default seccomp profile allows `bpf()` and
/// `setns()` with it. CAP_NET_ADMIN marks kya's own connections (SO_MARK).
pub const KYA_PRIVILEGES: &[&str] = &[
    "--pid=host",
    "--network=host",
    "--cgroupns=host",
    "--cap-drop=ALL",
    "--cap-add=SYS_ADMIN",
    "--cap-add=NET_ADMIN",
    "--cap-add=SYS_PTRACE",
    "--cap-add=NET_BIND_SERVICE",
    "--cap-add=DAC_READ_SEARCH",
    "--security-opt=apparmor=unconfined",
    "--read-only",
    "--tmpfs=/tmp",
    "--volume=/sys/fs/bpf:/sys/fs/bpf",
    "--volume=/sys/fs/cgroup:/sys/fs/cgroup:ro",
];

impl TestImage {
    /// A minimal runtime image for `binary`: only the shared libraries
    /// `ldd` names (at their paths), the CA certificates, `/etc/passwd`,
    /// and empty directories;
    /// the binary itself is mounted at run time.
    pub fn runtime(tag: &str, binary: &Path) -> Self {
        let name = format!("localhost/{PREFIX}{tag}-{}:latest", std::process::id());
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("rootfs");
        for d in [
            "etc",
            "proc",
            "sys",
            "dev",
            "tmp",
            "run",
            "var/lib/kya",
            "etc/kya",
            "usr/local/bin",
        ] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir rootfs");
        }
        std::fs::write(
            root.join("etc/passwd"),
            "root:x:0:0:root:/root:/sbin/nologin\n",
        )
        .expect("passwd");
        // the CA certificates the real image installs (upstream TLS trust)
        let certs = Path::new("/etc/ssl/certs/ca-certificates.crt");
        if certs.exists() {
            std::fs::create_dir_all(root.join("etc/ssl/certs")).expect("mkdir");
            std::fs::copy(certs, root.join("etc/ssl/certs/ca-certificates.crt")).expect("certs");
        }
        let out = Command::new("ldd").arg(binary).output().expect("ldd");
        let text = String::from_utf8_lossy(&out.stdout);
        for lib in text.split_whitespace().filter(|w| w.starts_with('/')) {
            let src = std::fs::canonicalize(lib).expect("library");
            let dst = root.join(lib.trim_start_matches('/'));
            std::fs::create_dir_all(dst.parent().expect("parent")).expect("mkdir");
            std::fs::copy(&src, &dst).expect("copy library");
        }
        let tar = dir.path().join("rootfs.tar");
        let out = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .output()
            .expect("tar");
        assert!(out.status.success(), "tar: {out:?}");
        let _ = podman(&["rmi", "-f", &name]).output();
        podman_ok(&["import", tar.to_str().expect("utf-8"), &name]);
        Self { name }
    }
}

/// The kya daemon running as a container with [`KYA_PRIVILEGES`]: the
/// locally built binary mounted at `/usr/local/bin/kya`, the state dir a
/// volume. Stopped with SIGTERM on drop (it unpins what it pinned), then removed.
pub struct KyaContainer {
    pub name: String,
    pub state_dir: tempfile::TempDir,
    pub pin_dir: PathBuf,
}

impl KyaContainer {
    /// Starts it with `kya run ARGS --listen-port PORT --pin-dir ... --state-dir
    /// /var/lib/kya` and waits until its control socket answers.
    pub fn start(
        image: &TestImage,
        listen_port: u16,
        extra_volumes: &[String],
        args: &[&str],
    ) -> Self {
        let name = format!("{PREFIX}kya-{}", std::process::id());
        let _ = podman(&["rm", "-f", "-t", "10", &name]).output();
        let state_dir = tempfile::tempdir().expect("state dir");
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/kya-e2e-{}-{listen_port}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&pin_dir);
        let kya = crate::kya_bin();
        let bin = format!("--volume={}:/usr/local/bin/kya:ro", kya.display());
        let state = format!("--volume={}:/var/lib/kya", state_dir.path().display());
        let mut all: Vec<String> = vec!["run".into(), "-d".into(), format!("--name={name}")];
        all.extend(KYA_PRIVILEGES.iter().map(|s| s.to_string()));
        all.extend([
            "--ulimit=nofile=1024:1024".to_string(),
            "--ulimit=nproc=4096:4096".to_string(),
            bin,
            state,
        ]);
        all.extend(extra_volumes.iter().cloned());
        all.extend([
            "--entrypoint=/usr/local/bin/kya".to_string(),
            image.name.clone(),
            "run".into(),
            "--config".into(),
            "/dev/null".into(),
            "--listen-port".into(),
            listen_port.to_string(),
            "--pin-dir".into(),
            pin_dir.display().to_string(),
            "--state-dir".into(),
            "/var/lib/kya".into(),
        ]);
        all.extend(args.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        podman_ok(&refs);
        let k = Self {
            name,
            state_dir,
            pin_dir,
        };
        let deadline = std::time::Instant::now() + crate::patience() * 30;
        loop {
            let out = Command::new(crate::kya_bin())
                .args(["status", "--json", "--state-dir"])
                .arg(k.state_dir.path())
                .output()
                .expect("kya status");
            if out.status.success() {
                break;
            }
            let running = podman_ok(&["inspect", "--format", "{{.State.Running}}", &k.name]);
            assert!(
                running == "true" && std::time::Instant::now() < deadline,
                "kya did not start as a container (running: {running}):\n{}",
                k.logs()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        k
    }

    /// What kya logged (its stderr, the container log).
    pub fn logs(&self) -> String {
        let out = podman(&["logs", &self.name]).output().expect("podman logs");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// `kya ARGS --state-dir <its state dir>` from the host.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(crate::kya_bin())
            .args(args)
            .arg("--state-dir")
            .arg(self.state_dir.path())
            .output()
            .expect("kya client command")
    }

    /// Stop it (SIGTERM, as `podman stop` sends) and wait for the exit;
    /// the container's exit code.
    pub fn stop(&self) -> i32 {
        let _ = podman(&["stop", "-t", "20", &self.name]).output();
        podman_ok(&["inspect", "--format", "{{.State.ExitCode}}", &self.name])
            .parse()
            .unwrap_or(-1)
    }
}

impl Drop for KyaContainer {
    fn drop(&mut self) {
        let _ = podman(&["stop", "-t", "20", &self.name]).output();
        let _ = podman(&["rm", "-f", "-t", "0", &self.name]).output();
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}
