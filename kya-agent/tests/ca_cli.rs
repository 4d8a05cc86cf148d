//! `kya ca init|cert|install` as a user runs them, against a temp `--state-dir`.
//!
//! `kya ca install` changes the host trust store, so it runs only inside a
//! private mount namespace (`unshare -m`) with tmpfs over the trust store
//! directories: the host is never touched. That needs root; without root the
//! test is skipped, except under CI=true where skipping would hide a gap.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

const KYA: &str = env!("CARGO_BIN_EXE_kya");

fn kya(args: &[&str], state: &Path) -> Output {
    Command::new(KYA)
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_creates_the_ca_and_refuses_to_overwrite_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out = kya(&["ca", "init"], &state);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("created kya local CA"));
    assert_eq!(mode(&state.join("ca-key.pem")), 0o600);
    assert_eq!(mode(&state.join("ca.pem")), 0o644);
    let first = std::fs::read(state.join("ca.pem")).unwrap();

    let again = kya(&["ca", "init"], &state);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        text(&again.stderr).contains("--force"),
        "{}",
        text(&again.stderr)
    );
    assert_eq!(std::fs::read(state.join("ca.pem")).unwrap(), first);

    let forced = kya(&["ca", "init", "--force"], &state);
    assert!(forced.status.success(), "{}", text(&forced.stderr));
    assert_ne!(std::fs::read(state.join("ca.pem")).unwrap(), first);
    assert_eq!(mode(&state.join("ca-key.pem")), 0o600);
}

#[test]
fn cert_prints_the_pem_or_says_how_to_create_one() {
    let dir = tempfile::tempdir().unwrap();
    let missing = kya(&["ca", "cert"], dir.path());
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        text(&missing.stderr).contains("kya ca init"),
        "{}",
        text(&missing.stderr)
    );
    assert!(missing.stdout.is_empty());

    assert!(kya(&["ca", "init"], dir.path()).status.success());
    let out = kya(&["ca", "cert"], dir.path());
    assert!(out.status.success());
    assert_eq!(
        out.stdout,
        std::fs::read(dir.path().join("ca.pem")).unwrap()
    );
    assert!(text(&out.stdout).starts_with("-----BEGIN CERTIFICATE-----"));
    // The key never goes to stdout.
    assert!(!text(&out.stdout).contains("PRIVATE KEY"));
}

#[test]
fn a_tampered_or_exposed_key_is_refused_by_cert() {
    let dir = tempfile::tempdir().unwrap();
    assert!(kya(&["ca", "init"], dir.path()).status.success());
    let key = dir.path().join("ca-key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = kya(&["ca", "cert"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("readable by group or others"));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&key, "garbage").unwrap();
    assert_eq!(kya(&["ca", "cert"], dir.path()).status.code(), Some(1));
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn install_and_uninstall_in_a_private_mount_namespace() {
    if !is_root() || Command::new("unshare").arg("--help").output().is_err() {
        kya_testkit::skip(
            "install_and_uninstall_in_a_private_mount_namespace",
            "needs root and unshare for a private mount namespace",
        );
        return;
    }
    if !Path::new("/usr/sbin/update-ca-certificates").exists() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI must have update-ca-certificates (Debian ca-certificates)"
        );
        eprintln!("skipping: not a Debian-family host");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let instance = kya_agent::ca::trust_store::instance_name(&state);
    let anchor = format!("/usr/local/share/ca-certificates/kya-{instance}.crt");
    let script = format!(
        r#"set -eu
mount -t tmpfs tmpfs /usr/local/share/ca-certificates
mount -t tmpfs tmpfs /etc/ssl/certs
"$KYA" ca install --state-dir "$STATE"
test -f "{anchor}"
openssl verify -CAfile /etc/ssl/certs/ca-certificates.crt "$STATE/ca.pem"
echo INSTALLED-OK
"$KYA" ca install --state-dir "$STATE"
test "$(ls /usr/local/share/ca-certificates | wc -l)" = 1
"$KYA" ca install --uninstall --state-dir "$STATE"
test ! -e "{anchor}"
if openssl verify -CAfile /etc/ssl/certs/ca-certificates.crt "$STATE/ca.pem"; then exit 9; fi
"$KYA" ca install --uninstall --state-dir "$STATE"
echo REMOVED-OK
"#
    );
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .env("KYA", KYA)
        .env("STATE", &state)
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        text(&out.stderr)
    );
    assert!(
        stdout.contains("INSTALLED-OK") && stdout.contains("REMOVED-OK"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("NODE_EXTRA_CA_CERTS={anchor}")),
        "{stdout}"
    );
    assert!(stdout.contains("SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"));
    assert!(stdout.contains("is not installed; nothing to do"));
    // The host's store never saw it.
    assert!(!Path::new(&anchor).exists());
}
