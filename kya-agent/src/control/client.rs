//! The blocking control-socket client used by the `kya` subcommands.

use super::protocol::{ErrorCode, Request, Response};
use super::SOCKET_NAME;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// Longest answer line accepted from the daemon.
pub(crate) const MAX_RESPONSE: usize = 16 * 1024 * 1024;

/// Errors talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    #[error("cannot reach the kya daemon at {path}: {source} (is `kya run` running with this --state-dir?)")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot reach the kya daemon at {path}: permission denied: only root and members of the control socket's approvers group (`[control] group` in kya.toml) may connect")]
    NotAllowed { path: PathBuf },
    #[error("control socket I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the daemon sent an invalid answer: {0}")]
    Protocol(String),
    #[error("{message}")]
    Refused { code: ErrorCode, message: String },
}

/// A connection to one daemon.
pub(crate) struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    /// Connect to `STATE_DIR/kya.sock`.
    pub(crate) fn connect(state_dir: &Path) -> Result<Self, ClientError> {
        let path = state_dir.join(SOCKET_NAME);
        let stream = UnixStream::connect(&path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::PermissionDenied {
                ClientError::NotAllowed { path: path.clone() }
            } else {
                ClientError::Connect {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        let writer = stream.try_clone()?;
        Ok(Self {
            reader: BufReader::new(stream),
            writer,
        })
    }

    fn send(&mut self, request: &Request) -> Result<(), ClientError> {
        let mut line =
            serde_json::to_vec(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
        line.push(b'\n');
        self.writer.write_all(&line)?;
        Ok(())
    }

    fn recv(&mut self) -> Result<Option<Response>, ClientError> {
        let mut line = Vec::new();
        let n = Read::by_ref(&mut self.reader)
            .take(MAX_RESPONSE as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(None);
        }
        if line.len() > MAX_RESPONSE {
            return Err(ClientError::Protocol("answer too long".into()));
        }
        serde_json::from_slice(&line)
            .map(Some)
            .map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// One request, one answer.
    pub(crate) fn call(&mut self, request: &Request) -> Result<Value, ClientError> {
        self.send(request)?;
        match self.recv()? {
            Some(Response::Ok { result }) => Ok(result),
            Some(Response::Error { code, error }) => Err(ClientError::Refused {
                code,
                message: error,
            }),
            Some(other) => Err(ClientError::Protocol(format!(
                "unexpected answer {other:?}"
            ))),
            None => Err(ClientError::Protocol(
                "the daemon closed the connection".into(),
            )),
        }
    }

    /// A streaming request: `on_item` is called for each item until the
    /// stream ends or `on_item` returns false.
    pub(crate) fn stream(
        &mut self,
        request: &Request,
        mut on_item: impl FnMut(Value) -> bool,
    ) -> Result<(), ClientError> {
        self.send(request)?;
        loop {
            match self.recv()? {
                Some(Response::Item { item }) => {
                    if !on_item(item) {
                        return Ok(());
                    }
                }
                Some(Response::End) | None => return Ok(()),
                Some(Response::Error { code, error }) => {
                    return Err(ClientError::Refused {
                        code,
                        message: error,
                    })
                }
                Some(Response::Ok { result }) => {
                    // A one-shot answer to a streaming op: hand it over as one item.
                    on_item(result);
                    return Ok(());
                }
            }
        }
    }
}

/// Connect, send one request, return its answer.
pub(crate) fn call(state_dir: &Path, request: &Request) -> Result<Value, ClientError> {
    Client::connect(state_dir)?.call(request)
}
