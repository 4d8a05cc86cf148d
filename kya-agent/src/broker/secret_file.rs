//! A secret kept in a file only its owner can read: read at start, and again
//! whenever the file changes (one `stat` per use), so a rotated token is used
//! from the next request on without a restart.
//!
//! The file must belong to root or to the daemon's own user and grant nothing
//! to group or others; a file that stops meeting that is refused (the
//! requests that need it get an error) rather than used. The value is the
//! file's content without surrounding whitespace; it must be a valid header
//! value and at most [`MAX_SECRET`] bytes. Nothing here ever prints the value.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Longest secret accepted (a large JWT fits).
pub(crate) const MAX_SECRET: u64 = 16 * 1024;

/// Why a secret file cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SecretFileError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: owned by uid {owner}: it must belong to root or to kya's user (uid {me})", path.display())]
    Owner { path: PathBuf, owner: u32, me: u32 },
    #[error("{}: mode {mode:o} lets others read it: chmod 600", path.display())]
    Mode { path: PathBuf, mode: u32 },
    #[error("{}: {why}", path.display())]
    Content { path: PathBuf, why: &'static str },
}

/// The identity of one version of the file: a change of any of these means
/// the content is read again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Version {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
}

struct Loaded {
    version: Version,
    value: String,
}

/// A secret file and its last good content.
pub(crate) struct SecretFile {
    path: PathBuf,
    loaded: Mutex<Option<Loaded>>,
}

impl std::fmt::Debug for SecretFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretFile")
            .field("path", &self.path)
            .field("value", &"<redacted>")
            .finish()
    }
}

impl SecretFile {
    /// Open and read `path` now (so a bad file stops the start, not a request).
    pub(crate) fn open(path: &Path) -> Result<SecretFile, SecretFileError> {
        let f = SecretFile {
            path: path.to_path_buf(),
            loaded: Mutex::new(None),
        };
        f.value()?;
        Ok(f)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The current value: the cached one while the file is unchanged.
    pub(crate) fn value(&self) -> Result<String, SecretFileError> {
        let io = |source| SecretFileError::Io {
            path: self.path.clone(),
            source,
        };
        let md = std::fs::metadata(&self.path).map_err(io)?;
        self.check(&md)?;
        let version = Version {
            dev: md.dev(),
            ino: md.ino(),
            len: md.len(),
            mtime: md.mtime(),
            mtime_nsec: md.mtime_nsec(),
        };
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = loaded.as_ref() {
            if l.version == version {
                return Ok(l.value.clone());
            }
        }
        let value = self.read()?;
        *loaded = Some(Loaded {
            version,
            value: value.clone(),
        });
        Ok(value)
    }

    fn check(&self, md: &std::fs::Metadata) -> Result<(), SecretFileError> {
        let me = nix::unistd::geteuid().as_raw();
        if md.uid() != 0 && md.uid() != me {
            return Err(SecretFileError::Owner {
                path: self.path.clone(),
                owner: md.uid(),
                me,
            });
        }
        let mode = md.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(SecretFileError::Mode {
                path: self.path.clone(),
                mode,
            });
        }
        if !md.is_file() {
            return Err(SecretFileError::Content {
                path: self.path.clone(),
                why: "not a regular file",
            });
        }
        if md.len() > MAX_SECRET {
            return Err(SecretFileError::Content {
                path: self.path.clone(),
                why: "larger than 16 KiB",
            });
        }
        Ok(())
    }

    fn read(&self) -> Result<String, SecretFileError> {
        use std::io::Read;
        let content = |why| SecretFileError::Content {
            path: self.path.clone(),
            why,
        };
        let file = std::fs::File::open(&self.path).map_err(|source| SecretFileError::Io {
            path: self.path.clone(),
            source,
        })?;
        let mut raw = Vec::new();
        file.take(MAX_SECRET + 1)
            .read_to_end(&mut raw)
            .map_err(|source| SecretFileError::Io {
                path: self.path.clone(),
                source,
            })?;
        if raw.len() as u64 > MAX_SECRET {
            return Err(content("larger than 16 KiB"));
        }
        let text = String::from_utf8(raw).map_err(|_| content("not UTF-8"))?;
        let value = text.trim();
        if value.is_empty() {
            return Err(content("empty"));
        }
        if !value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(content(
                "holds characters a header value cannot carry (only printable ASCII)",
            ));
        }
        Ok(value.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write(dir: &Path, name: &str, content: &[u8], mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn reads_the_trimmed_value_and_rereads_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "t", b"  tok-1\n", 0o600);
        let f = SecretFile::open(&p).unwrap();
        assert_eq!(f.value().unwrap(), "tok-1");
        // A rotation (a new file renamed over, as tools do) is seen at once.
        let q = write(dir.path(), "t.new", b"tok-2-longer\n", 0o600);
        std::fs::rename(&q, &p).unwrap();
        assert_eq!(f.value().unwrap(), "tok-2-longer");
    }

    #[test]
    fn refuses_files_others_can_read() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660] {
            let p = write(dir.path(), "t", b"tok", mode);
            let e = SecretFile::open(&p).unwrap_err();
            assert!(matches!(e, SecretFileError::Mode { .. }), "{mode:o}: {e}");
        }
    }

    #[test]
    fn a_file_that_becomes_readable_by_others_is_refused_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "t", b"tok", 0o600);
        let f = SecretFile::open(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(f.value().is_err());
    }

    #[test]
    fn hostile_contents_are_refused_without_echoing_them() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&[u8], &str); 5] = [
            (b"", "empty"),
            (b"  \n\t", "empty"),
            (b"tok\r\nX-Evil: 1", "printable"),
            (b"tok\x00", "printable"),
            (&[0xff, 0xfe], "UTF-8"),
        ];
        for (content, why) in cases {
            let p = write(dir.path(), "t", content, 0o600);
            let e = SecretFile::open(&p).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
            assert!(!e.contains("X-Evil"), "{e}");
        }
        let huge = vec![b'a'; (MAX_SECRET + 1) as usize];
        let p = write(dir.path(), "t", &huge, 0o600);
        assert!(SecretFile::open(&p)
            .unwrap_err()
            .to_string()
            .contains("16 KiB"));
        let e = SecretFile::open(dir.path()).unwrap_err();
        assert!(e.to_string().contains("not a regular file") || e.to_string().contains("mode"));
        assert!(SecretFile::open(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn debug_never_shows_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "t", b"very-secret-token", 0o600);
        let f = SecretFile::open(&p).unwrap();
        assert!(!format!("{f:?}").contains("very-secret"));
    }
}
