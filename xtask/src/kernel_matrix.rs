//! `cargo xtask kernel-matrix [--kernel 6.1]`: boots each kernel of the
//! matrix in QEMU (virtme-ng, the host's filesystem read-only, TCG: no KVM
//! needed) and runs the kernel-dependent end-to-end test
//! (`tests/tests/kernel_matrix.rs`) inside it with the binaries already built
//! here. The machine's own kernel runs the same test in the normal suite.
//!
//! Kernels come from `scripts/install-deps.sh`: Debian's packages extracted
//! under `$KYA_KERNELS` (default `/var/cache/kya-kernels/<release>/`).
//! Each kernel's console, test output (with the daemon's log and any verifier
//! output on failure) and dmesg are kept in `target/kernel-matrix/<label>/`.

use anyhow::{bail, Context, Result};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// (label, release prefix): the kernels the matrix boots.
pub(crate) const KERNELS: [(&str, &str); 2] = [("6.1", "6.1."), ("6.12", "6.12.")];

const TEST_FILE: &str = "kernel_matrix";
const TEST_NAME: &str = "kernel_dependent_guarantees_hold_on_this_kernel";
/// A boot plus the test takes about 1.5 minutes under TCG; this is the bound
/// on a hung guest.
const GUEST_TIMEOUT: Duration = Duration::from_secs(600);

fn kernels_dir() -> PathBuf {
    std::env::var_os("KYA_KERNELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/kya-kernels"))
}

fn vng() -> Option<PathBuf> {
    let venv = std::env::var_os("KYA_VNG_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/kya-vng"));
    let p = venv.join("bin/vng");
    p.exists().then_some(p)
}

/// The newest extracted kernel whose release starts with `prefix`.
fn find_kernel(prefix: &str) -> Option<(String, PathBuf)> {
    let mut found: Vec<String> = std::fs::read_dir(kernels_dir())
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix) && !n.ends_with(".part"))
        .collect();
    found.sort_by_key(|n| version_key(n));
    let release = found.pop()?;
    let image = kernels_dir()
        .join(&release)
        .join("boot")
        .join(format!("vmlinuz-{release}"));
    image.exists().then_some((release, image))
}

/// "6.1.0-57-amd64" -> [6, 1, 0, 57, ...]: numeric order, not string order.
fn version_key(release: &str) -> Vec<u64> {
    release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// True when every kernel of the matrix and virtme-ng are installed.
pub(crate) fn installed() -> bool {
    vng().is_some() && KERNELS.iter().all(|(_, p)| find_kernel(p).is_some())
}

/// Builds what the guest runs, then boots each selected kernel in turn.
/// Fails if any kernel fails (after running them all).
pub(crate) fn run(root: &Path, only: Option<&str>) -> Result<()> {
    let selected: Vec<(&str, &str)> = KERNELS
        .iter()
        .copied()
        .filter(|(label, _)| only.is_none_or(|o| o == *label))
        .collect();
    if selected.is_empty() {
        let labels: Vec<&str> = KERNELS.iter().map(|(l, _)| *l).collect();
        bail!("no kernel {:?} in the matrix (one of {labels:?})", only);
    }
    let vng = vng().context(
        "virtme-ng is not installed (scripts/install-deps.sh installs it into /opt/kya-vng)",
    )?;
    super::cargo(root, &["build", "--workspace", "--bins"])?;
    let test_bin = build_test(root)?;
    // The guest sees the host read-only: the MCP peers must be set up here.
    let status = Command::new("sh")
        .arg(root.join("tests/peers/setup.sh"))
        .stdout(Stdio::null())
        .status()
        .context("running tests/peers/setup.sh")?;
    if !status.success() {
        bail!("tests/peers/setup.sh failed ({status})");
    }
    let target = test_bin
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .context("the test binary lives in target/<profile>/deps")?
        .to_path_buf();

    let started = Instant::now();
    let (mut passed, mut failed) = (0u32, 0u32);
    for (label, prefix) in selected {
        let Some((release, image)) = find_kernel(prefix) else {
            eprintln!(
                "kernel-matrix: {label}: no kernel {prefix}* under {} (scripts/install-deps.sh installs it)",
                kernels_dir().display()
            );
            failed += 1;
            continue;
        };
        let logs = target.join("kernel-matrix").join(label);
        let mut outcome = boot(root, &vng, &image, &test_bin, &logs);
        if outcome.is_err() {
            if let Some(why) = emulator_crash(&logs) {
                // The emulator failed before the guest ran the test (QEMU's
                // TCG has rare races of its own): that says nothing of kya,
                // so the guest is booted once more, and it says so.
                println!("kernel-matrix: {label} ({release}): the emulator crashed before the test ran ({why}); booting once more");
                outcome = boot(root, &vng, &image, &test_bin, &logs);
            }
        }
        match outcome {
            Ok(took) => {
                println!(
                    "kernel-matrix: {label} ({release}): passed in {} s (logs: {})",
                    took.as_secs(),
                    logs.display()
                );
                passed += 1;
            }
            Err(e) => {
                println!("kernel-matrix: {label} ({release}): FAILED: {e:#}");
                show_tail(&logs.join("test.log"), 80);
                println!("kernel-matrix: logs in {}", logs.display());
                failed += 1;
            }
        }
    }
    println!(
        "kernel-matrix: {passed} passed, {failed} failed in {} s",
        started.elapsed().as_secs()
    );
    if failed > 0 {
        bail!("kernel matrix: {failed} kernel(s) failed");
    }
    Ok(())
}

/// `cargo test --no-run` for the matrix test; its executable's path.
fn build_test(root: &Path) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "test",
            "-p",
            "kya-e2e",
            "--test",
            TEST_FILE,
            "--no-run",
            "--message-format=json",
        ])
        .current_dir(root)
        .stderr(Stdio::inherit())
        .output()
        .context("building the kernel matrix test")?;
    if !out.status.success() {
        bail!("building the kernel matrix test failed ({})", out.status);
    }
    out.stdout
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
        .filter(|m| m["target"]["name"] == TEST_FILE)
        .filter_map(|m| m["executable"].as_str().map(PathBuf::from))
        .last()
        .context("cargo did not report the kernel matrix test executable")
}

/// Boots `image` and runs the test in it; Ok(wall time) when it passed.
/// The guest's scratch tmpfs (state directories, control sockets, temporary files).
const GUEST_TMP: &str = "/run/kya-matrix";

fn boot(root: &Path, vng: &Path, image: &Path, test_bin: &Path, logs: &Path) -> Result<Duration> {
    let _ = std::fs::remove_dir_all(logs);
    std::fs::create_dir_all(logs).with_context(|| format!("creating {}", logs.display()))?;
    let rc = logs.join("rc");
    let ci = std::env::var("CI").unwrap_or_default();
    // The host's filesystem is a read-only 9p/virtiofs share, where Unix
    // sockets do not work: the daemon's state (control socket) and every
    // temporary file go to a tmpfs of the guest's own. It is mounted on a
    // directory of its own under /run (the guest's tmpfs), never over /tmp,
    // which may hold the checkout and the logs directory itself.
    let script = format!(
        "#!/bin/sh\n\
         set -e\n\
         mkdir -p {GUEST_TMP}\n\
         mount -t tmpfs -o mode=1777 tmpfs {GUEST_TMP}\n\
         set +e\n\
         export TMPDIR={GUEST_TMP} HOME={GUEST_TMP} CI='{ci}' RUST_BACKTRACE=1 KYA_E2E_PATIENCE=6\n\
         cd '{root}'\n\
         echo \"guest: kernel $(uname -r), up $(cut -d' ' -f1 /proc/uptime) s\" > '{logs}/test.log'\n\
         '{bin}' --exact {TEST_NAME} --nocapture --test-threads=1 >> '{logs}/test.log' 2>&1\n\
         echo $? > '{rc}'\n\
         dmesg > '{logs}/dmesg.log' 2>&1\n",
        root = root.display(),
        logs = logs.display(),
        bin = test_bin.display(),
        rc = rc.display(),
    );
    let script_path = logs.join("guest.sh");
    std::fs::write(&script_path, script).context("writing the guest script")?;
    set_executable(&script_path)?;
    let console = std::fs::File::create(logs.join("console.log")).context("console log")?;
    let path = format!(
        "{}:{}",
        vng.parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        std::env::var("PATH").unwrap_or_default()
    );
    let started = Instant::now();
    eprintln!("kernel-matrix: booting {} (TCG)", image.display());
    let mut child = Command::new(vng)
        .arg("--run")
        .arg(image)
        .args([
            "--disable-kvm",
            "--memory",
            "2G",
            "--cpus",
            "2",
            "--verbose",
        ])
        .arg("--rwdir")
        .arg(logs)
        .arg("--exec")
        .arg(&script_path)
        .env("PATH", path)
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(console.try_clone().context("console log")?)
        .stderr(console)
        .spawn()
        .context("starting virtme-ng")?;
    loop {
        if child.try_wait().context("waiting for the guest")?.is_some() {
            break;
        }
        if started.elapsed() > GUEST_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the guest did not finish within {} s",
                GUEST_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let took = started.elapsed();
    // virtme-ng's own exit code does not carry the script's: the script
    // writes it to a file on the shared log directory.
    let code = std::fs::read_to_string(&rc).with_context(|| {
        format!(
            "the guest wrote no result (boot failure? see {})",
            logs.join("console.log").display()
        )
    })?;
    match code.trim() {
        "0" => Ok(took),
        other => bail!("the test exited with {other} in the guest"),
    }
}

/// The emulator's own failure, when it ended before the guest started the
/// test: no test log was written and the console has QEMU's last words.
fn emulator_crash(logs: &Path) -> Option<String> {
    if logs.join("test.log").exists() || logs.join("rc").exists() {
        return None;
    }
    let console = std::fs::read_to_string(logs.join("console.log")).ok()?;
    console
        .lines()
        .find(|l| l.starts_with("qemu-system") && (l.contains("Assertion") || l.contains("error")))
        .map(|l| l.trim().to_string())
}

fn set_executable(p: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod {}", p.display()))
}

/// The lines that say why (panics, errors, the verifier's refusals), then
/// the last `n` lines.
fn show_tail(p: &Path, n: usize) {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    const WHY: [&str; 6] = [
        "panicked at",
        "error:",
        "unknown func ",
        "invalid func ",
        "cannot use helper ",
        "lacks ",
    ];
    let mut seen = std::collections::BTreeSet::new();
    for l in lines.iter().filter(|l| WHY.iter().any(|w| l.contains(w))) {
        if seen.insert(*l) && seen.len() <= 20 {
            println!("  ! {}", l.chars().take(2000).collect::<String>());
        }
    }
    for l in &lines[lines.len().saturating_sub(n)..] {
        println!("  | {l}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_numerically() {
        let mut v = ["6.1.0-9-amd64", "6.1.0-57-amd64", "6.1.0-10-amd64"];
        v.sort_by_key(|n| version_key(n));
        assert_eq!(v.last(), Some(&"6.1.0-57-amd64"));
        assert!(version_key("6.12.95+deb12-amd64") > version_key("6.12.9+deb12-amd64"));
        assert!(version_key("garbage").is_empty());
    }

    #[test]
    fn only_an_emulator_crash_before_the_test_is_booted_again() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path();
        let crash = "qemu-system-x86_64: hw/pci/msix.c:228: msix_table_mmio_write: Assertion `x' failed.\n[    0.0] Linux version\n";
        std::fs::write(logs.join("console.log"), crash).unwrap();
        assert!(emulator_crash(logs)
            .unwrap()
            .contains("msix_table_mmio_write"));
        // The guest got as far as the test: its failure is the test's.
        std::fs::write(logs.join("test.log"), "guest: kernel 6.12\n").unwrap();
        assert_eq!(emulator_crash(logs), None);
        std::fs::remove_file(logs.join("test.log")).unwrap();
        // A boot that just stopped, with no word from QEMU, is not retried.
        std::fs::write(logs.join("console.log"), "[    1.6] pci 0000:00:06.0\n").unwrap();
        assert_eq!(emulator_crash(logs), None);
    }
}
