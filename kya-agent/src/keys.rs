//! kya's own Ed25519 signing key: signs audit checkpoints, webhook notifications
//! and the verifiable credentials kya issues.
//!
//! Stored as PKCS#8 PEM at `STATE_DIR/signing-key.pem`, mode 0600, created on first use.
//! The public half is written beside it (`signing-key.pub.pem`) so verifiers
//! (`kya audit verify --key`, credential verifiers) need no access to the secret.

use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{SigningKey, VerifyingKey};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// File name of the private key inside the state directory.
pub const SIGNING_KEY_FILE: &str = "signing-key.pem";
/// File name of the public key inside the state directory.
pub const PUBLIC_KEY_FILE: &str = "signing-key.pub.pem";

/// Errors loading or creating the signing key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not an Ed25519 PKCS#8 PEM key: {message}")]
    Format { path: PathBuf, message: String },
    #[error(
        "{path}: private key is readable by group or others (mode {mode:o}); refusing to use it"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("cannot encode key: {0}")]
    Encode(String),
}

/// Load the key at `STATE_DIR/signing-key.pem`, or create it (0600) when absent.
pub fn load_or_create(state_dir: &Path) -> Result<SigningKey, KeyError> {
    let path = state_dir.join(SIGNING_KEY_FILE);
    match std::fs::metadata(&path) {
        Ok(_) => load(&path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(state_dir, &path),
        Err(source) => Err(KeyError::Io { path, source }),
    }
}

/// Load an existing private key, refusing one that others can read.
pub fn load(path: &Path) -> Result<SigningKey, KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    let pem = std::fs::read_to_string(path).map_err(io)?;
    SigningKey::from_pkcs8_pem(&pem).map_err(|e| KeyError::Format {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Load a public key (SPKI PEM), e.g. for `kya audit verify --key`.
pub fn load_public(path: &Path) -> Result<VerifyingKey, KeyError> {
    use ed25519_dalek::pkcs8::DecodePublicKey;
    let pem = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    VerifyingKey::from_public_key_pem(&pem).map_err(|e| KeyError::Format {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Write the public half of `key` to `STATE_DIR/signing-key.pub.pem`
/// (world-readable) unless it is already there; returns its path. Never the
/// secret.
pub fn export_public(state_dir: &Path, key: &SigningKey) -> Result<PathBuf, KeyError> {
    let path = state_dir.join(PUBLIC_KEY_FILE);
    if let Ok(existing) = load_public(&path) {
        if existing == key.verifying_key() {
            return Ok(path);
        }
    }
    let public = key
        .verifying_key()
        .to_public_key_pem(Default::default())
        .map_err(|e| KeyError::Encode(e.to_string()))?;
    let tmp = state_dir.join(format!("{PUBLIC_KEY_FILE}.tmp"));
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| KeyError::Io { path: p, source }
    };
    std::fs::write(&tmp, public).map_err(io(&tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    Ok(path)
}

fn create(state_dir: &Path, path: &Path) -> Result<SigningKey, KeyError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| KeyError::Io { path: p, source }
    };
    std::fs::create_dir_all(state_dir).map_err(io(state_dir))?;
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let pem = key
        .to_pkcs8_pem(Default::default())
        .map_err(|e| KeyError::Encode(e.to_string()))?;
    // create_new: never overwrite a key another instance created concurrently.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    file.write_all(pem.as_bytes()).map_err(io(path))?;
    file.sync_all().map_err(io(path))?;
    let public = key
        .verifying_key()
        .to_public_key_pem(Default::default())
        .map_err(|e| KeyError::Encode(e.to_string()))?;
    let pub_path = state_dir.join(PUBLIC_KEY_FILE);
    std::fs::write(&pub_path, public).map_err(io(&pub_path))?;
    tracing::info!(path = %path.display(), "created kya signing key");
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_then_loads_the_same_key_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(dir.path()).unwrap();
        let b = load_or_create(dir.path()).unwrap();
        assert_eq!(a.to_bytes(), b.to_bytes());
        let mode = std::fs::metadata(dir.path().join(SIGNING_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let public = load_public(&dir.path().join(PUBLIC_KEY_FILE)).unwrap();
        assert_eq!(public, a.verifying_key());
    }

    #[test]
    fn the_public_key_is_exported_when_missing_or_stale() {
        let dir = tempfile::tempdir().unwrap();
        let key = load_or_create(dir.path()).unwrap();
        let path = dir.path().join(PUBLIC_KEY_FILE);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(export_public(dir.path(), &key).unwrap(), path);
        assert_eq!(load_public(&path).unwrap(), key.verifying_key());
        std::fs::write(&path, "stale").unwrap();
        export_public(dir.path(), &key).unwrap();
        assert_eq!(load_public(&path).unwrap(), key.verifying_key());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("PUBLIC KEY") && !text.contains("PRIVATE"),
            "{text}"
        );
    }

    #[test]
    fn rejects_world_readable_and_garbage_keys() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create(dir.path()).unwrap();
        let path = dir.path().join(SIGNING_KEY_FILE);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(load(&path), Err(KeyError::Permissions { .. })));
        std::fs::write(
            &path,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(load(&path), Err(KeyError::Format { .. })));
        std::fs::write(dir.path().join("pub.pem"), "not a key").unwrap();
        assert!(load_public(&dir.path().join("pub.pem")).is_err());
    }
}
