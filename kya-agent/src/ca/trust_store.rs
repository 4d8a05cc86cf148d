//! Adding kya's CA to the host's trust store: the one host-level step of
//! installing kya, so it is explicit (`kya ca install`) and reversible
//! (`kya ca install --uninstall`).
//!
//! Supported: Debian/Ubuntu (`/usr/local/share/ca-certificates` and
//! `update-ca-certificates`) and RHEL/Fedora (`/etc/pki/ca-trust/source/anchors`
//! and `update-ca-trust extract`). The anchor file is `kya-<instance>.crt`, where
//! the instance is derived from the state dir, so side-by-side daemons install
//! side-by-side anchors and reinstalling replaces rather than accumulates.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The families of system trust store kya knows how to update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Debian,
    Rhel,
}

/// Where anchors go, how the bundle is rebuilt, and where the bundle ends up.
#[derive(Debug, Clone)]
pub struct TrustStore {
    pub kind: StoreKind,
    pub anchor_dir: PathBuf,
    pub refresh: Vec<String>,
    pub bundle: PathBuf,
}

/// Errors installing or removing the anchor.
#[derive(Debug, thiserror::Error)]
pub enum TrustStoreError {
    #[error("no supported trust store found (need update-ca-certificates or update-ca-trust); add {cert} to your system's trust store by hand")]
    Unsupported { cert: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Refresh {
        command: String,
        status: String,
        stderr: String,
    },
}

const SEARCH_PATH: &[&str] = &["/usr/sbin", "/usr/bin", "/sbin", "/bin"];

fn find_program(name: &str) -> Option<PathBuf> {
    let from_env = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    from_env
        .into_iter()
        .chain(SEARCH_PATH.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

impl TrustStore {
    /// Find this host's trust store tooling. `cert` is only named in the error.
    pub fn detect(cert: &Path) -> Result<Self, TrustStoreError> {
        if let Some(prog) = find_program("update-ca-certificates") {
            return Ok(TrustStore {
                kind: StoreKind::Debian,
                anchor_dir: PathBuf::from("/usr/local/share/ca-certificates"),
                refresh: vec![prog.display().to_string()],
                bundle: PathBuf::from("/etc/ssl/certs/ca-certificates.crt"),
            });
        }
        if let Some(prog) = find_program("update-ca-trust") {
            return Ok(TrustStore {
                kind: StoreKind::Rhel,
                anchor_dir: PathBuf::from("/etc/pki/ca-trust/source/anchors"),
                refresh: vec![prog.display().to_string(), "extract".into()],
                bundle: PathBuf::from("/etc/pki/tls/certs/ca-bundle.crt"),
            });
        }
        Err(TrustStoreError::Unsupported {
            cert: cert.to_path_buf(),
        })
    }

    /// The anchor file for an instance (`.crt`: Debian ignores other extensions).
    pub fn anchor_path(&self, instance: &str) -> PathBuf {
        self.anchor_dir.join(format!("kya-{instance}.crt"))
    }

    /// Write the anchor (0644, replacing an older one of this instance) and rebuild the bundle.
    pub fn install(&self, instance: &str, cert_pem: &str) -> Result<PathBuf, TrustStoreError> {
        let path = self.anchor_path(instance);
        let io = |source| TrustStoreError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&self.anchor_dir).map_err(|source| TrustStoreError::Io {
            path: self.anchor_dir.clone(),
            source,
        })?;
        let tmp = self
            .anchor_dir
            .join(format!(".kya-{instance}.tmp.{}", rand::random::<u64>()));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&tmp)?;
            f.write_all(cert_pem.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(e));
        }
        self.run_refresh()?;
        Ok(path)
    }

    /// Remove the anchor and rebuild the bundle. `Ok(false)`: it was not installed.
    pub fn uninstall(&self, instance: &str) -> Result<bool, TrustStoreError> {
        let path = self.anchor_path(instance);
        match std::fs::remove_file(&path) {
            Ok(()) => {
                self.run_refresh()?;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(TrustStoreError::Io { path, source }),
        }
    }

    fn run_refresh(&self) -> Result<(), TrustStoreError> {
        let command = self.refresh.join(" ");
        let (prog, args) = match self.refresh.split_first() {
            Some(x) => x,
            None => {
                return Err(TrustStoreError::Refresh {
                    command,
                    status: "empty command".into(),
                    stderr: String::new(),
                })
            }
        };
        let out = Command::new(prog)
            .args(args)
            .output()
            .map_err(|source| TrustStoreError::Io {
                path: PathBuf::from(prog),
                source,
            })?;
        if !out.status.success() {
            return Err(TrustStoreError::Refresh {
                command,
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        tracing::debug!(%command, stdout = %String::from_utf8_lossy(&out.stdout).trim(), "trust store rebuilt");
        Ok(())
    }

    /// What runtimes that ignore the system store need, for the operator to copy.
    pub fn runtime_hints(&self, anchor: &Path) -> String {
        let bundle = self.bundle.display();
        let anchor = anchor.display();
        format!(
            "The system bundle {bundle} now trusts kya's CA (OpenSSL, curl, Go, Python's ssl module, mcp 2.x).\n\
             Runtimes with their own store need it named:\n\
             \x20 Node.js:  NODE_EXTRA_CA_CERTS={anchor}\n\
             \x20 Python (requests/httpx use certifi, not the system store):\n\
             \x20           SSL_CERT_FILE={bundle} REQUESTS_CA_BUNDLE={bundle}\n\
             \x20 Java:     keytool -importcert -cacerts -alias kya -file {anchor}\n\
             Set these in the agent's service environment; kya does not change the agent.\n"
        )
    }
}

/// A file-name-safe instance id from the state dir: `/var/lib/kya` → `var-lib-kya`.
/// Long paths fall back to a digest so the name stays well under NAME_MAX.
pub fn instance_name(state_dir: &Path) -> String {
    let absolute = state_dir
        .canonicalize()
        .or_else(|_| std::path::absolute(state_dir))
        .unwrap_or_else(|_| state_dir.to_path_buf());
    let text = absolute.to_string_lossy();
    let mut name = String::new();
    for c in text.chars() {
        let c = if c.is_ascii_alphanumeric() || c == '_' {
            c
        } else {
            '-'
        };
        if !(c == '-' && (name.is_empty() || name.ends_with('-'))) {
            name.push(c);
        }
    }
    let name = name.trim_end_matches('-').to_string();
    if name.is_empty() {
        return "root".into();
    }
    if name.len() > 64 {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(text.as_bytes());
        return format!("{}-{}", &name[..40], hex::encode(&digest[..8]));
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_names_are_stable_safe_and_bounded() {
        assert_eq!(instance_name(Path::new("/var/lib/kya")), "var-lib-kya");
        assert_eq!(instance_name(Path::new("/")), "root");
        assert_eq!(instance_name(Path::new("/a b/../c//d.e")), "a-b-c-d-e");
        let long = format!("/{}", "x/".repeat(200));
        let n = instance_name(Path::new(&long));
        assert!(n.len() <= 64, "{n}");
        assert_ne!(
            n,
            instance_name(Path::new(&format!("/{}", "x/".repeat(201))))
        );
        let hostile = instance_name(Path::new("/tmp/$(rm -rf)/`x`;\n\u{202e}"));
        assert!(hostile
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
    }

    #[test]
    fn install_and_uninstall_into_a_private_store() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("refreshed");
        let store = TrustStore {
            kind: StoreKind::Debian,
            anchor_dir: dir.path().join("anchors"),
            refresh: vec![
                "sh".into(),
                "-c".into(),
                format!("echo x >> {}", marker.display()),
            ],
            bundle: dir.path().join("bundle.crt"),
        };
        let path = store.install("inst", "PEM").unwrap();
        assert_eq!(path, dir.path().join("anchors/kya-inst.crt"));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "PEM");
        store.install("inst", "PEM2").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "PEM2");
        assert!(store.uninstall("inst").unwrap());
        assert!(!path.exists());
        assert!(!store.uninstall("inst").unwrap());
        assert_eq!(std::fs::read_to_string(&marker).unwrap().lines().count(), 3);
        assert!(store.runtime_hints(&path).contains("NODE_EXTRA_CA_CERTS="));
    }

    #[test]
    fn a_failing_refresh_is_an_error_naming_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let store = TrustStore {
            kind: StoreKind::Rhel,
            anchor_dir: dir.path().to_path_buf(),
            refresh: vec!["sh".into(), "-c".into(), "echo broken >&2; exit 3".into()],
            bundle: dir.path().join("b"),
        };
        match store.install("i", "PEM") {
            Err(TrustStoreError::Refresh { stderr, .. }) => assert_eq!(stderr, "broken"),
            other => panic!("{other:?}"),
        }
    }
}
