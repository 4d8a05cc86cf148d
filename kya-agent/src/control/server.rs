//! The control socket listener.

use super::guard::Gate;
use super::protocol::{Caller, ErrorCode, Request, Response};
use super::{MAX_REQUEST, SOCKET_NAME};
use serde_json::Value;
use std::collections::BTreeMap;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};

/// What a handler answers: one response, or a stream of items.
pub(crate) enum Reply {
    Once(Response),
    Stream(mpsc::Receiver<Value>),
}

/// A boxed future of a reply.
pub(crate) type ReplyFuture = Pin<Box<dyn Future<Output = Reply> + Send>>;

/// Serves the operations of one namespace (`approvals`, `events`, ...).
pub(crate) trait Handler: Send + Sync + 'static {
    /// Does `op` change nothing (list, status, follow)? Every other operation
    /// of the namespace, including ones added later and unknown ones, reaches
    /// [`Handler::handle`] only through the [`Gate`], with the caller's
    /// `clearance` set.
    fn read_only(&self, op: &str) -> bool;

    fn handle(&self, caller: Caller, request: Request) -> ReplyFuture;
}

/// Routes `ns.op` (or `ns`) to the handler registered for `ns`, through the
/// gate for every operation that is not read-only.
#[derive(Clone)]
pub(crate) struct Router {
    routes: BTreeMap<String, Arc<dyn Handler>>,
    gate: Arc<Gate>,
}

impl Router {
    pub(crate) fn new(gate: Arc<Gate>) -> Self {
        Self {
            routes: BTreeMap::new(),
            gate,
        }
    }

    /// Register the handler of a namespace (the part of `op` before the first '.').
    pub(crate) fn route(mut self, namespace: &str, handler: Arc<dyn Handler>) -> Self {
        self.routes.insert(namespace.to_string(), handler);
        self
    }

    fn handler_for(&self, op: &str) -> Option<&Arc<dyn Handler>> {
        let ns = op.split('.').next().unwrap_or(op);
        self.routes.get(ns)
    }
}

/// Errors starting the control socket.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ServerError {
    #[error("{path}: another kya daemon is already serving this state directory")]
    InUse { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("[control] group {group:?} does not exist: create it (groupadd {group}) and add the approvers to it")]
    UnknownGroup { group: String },
    #[error("[control] group {group:?}: cannot look it up: {source}")]
    GroupLookup { group: String, source: nix::Error },
    #[error("cannot give the control socket {path} to group {group:?}: {source} (kya must be a member of the group, e.g. SupplementaryGroups={group} in its systemd unit, or hold CAP_CHOWN)")]
    Chown {
        path: PathBuf,
        group: String,
        source: std::io::Error,
    },
}

/// Mode of the control socket: its owner (the daemon's user) and its group.
pub(crate) const SOCKET_MODE: u32 = 0o660;

/// The bound control socket.
pub(crate) struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlServer {
    /// Bind `STATE_DIR/kya.sock`. A stale socket file (no daemon answers on
    /// it) is replaced; a live one is an error (one daemon per state dir).
    ///
    /// The socket is mode 0660 ([`SOCKET_MODE`]), never world-connectable:
    /// with an approvers `group`, the socket is that group's, so its members
    /// (owners who answer approvals for their own agents) may connect;
    /// without one, it keeps the daemon's own group (root's when kya runs as
    /// root), so only root may. What each caller may do is then decided per
    /// request on its `SO_PEERCRED` uid.
    pub(crate) fn bind(state_dir: &Path, group: Option<&str>) -> Result<Self, ServerError> {
        let path = state_dir.join(SOCKET_NAME);
        let io = |source| ServerError::Io {
            path: path.clone(),
            source,
        };
        // Resolved before anything is bound: an unknown group stops the start.
        let gid = match group {
            None => None,
            Some(name) => match nix::unistd::Group::from_name(name) {
                Ok(Some(g)) => Some((name, g.gid)),
                Ok(None) => {
                    return Err(ServerError::UnknownGroup {
                        group: name.to_string(),
                    })
                }
                Err(source) => {
                    return Err(ServerError::GroupLookup {
                        group: name.to_string(),
                        source,
                    })
                }
            },
        };
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                return Err(ServerError::InUse { path });
            }
            std::fs::remove_file(&path).map_err(io)?;
        }
        // The socket file's initial mode is 0777 minus the umask: a process
        // that is not the daemon's user needs write permission to connect, so
        // with any umask that masks it (022, 077) nobody else can connect
        // before the mode below is set.
        let listener = UnixListener::bind(&path).map_err(io)?;
        if let Some((name, gid)) = gid {
            std::os::unix::fs::chown(&path, None, Some(gid.as_raw())).map_err(|source| {
                let _ = std::fs::remove_file(&path);
                ServerError::Chown {
                    path: path.clone(),
                    group: name.to_string(),
                    source,
                }
            })?;
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(SOCKET_MODE))
            .map_err(io)?;
        Ok(Self { listener, path })
    }

    /// Where the socket is.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Serve until `shutdown` turns true; the socket file is removed then.
    pub(crate) async fn serve(self, router: Router, mut shutdown: watch::Receiver<bool>) {
        let router = Arc::new(router);
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let router = router.clone();
                        let stop = shutdown.clone();
                        tasks.spawn(async move { serve_conn(stream, router, stop).await });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "control socket accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        tasks.abort_all();
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn serve_conn(stream: UnixStream, router: Arc<Router>, mut stop: watch::Receiver<bool>) {
    let caller = match stream.peer_cred() {
        Ok(c) => Caller {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid(),
            clearance: None,
        },
        Err(e) => {
            tracing::warn!(error = %e, "control connection without peer credentials; closing");
            return;
        }
    };
    let pidfd = super::peer::peer_pidfd(&stream, caller.pid).map(Arc::new);
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let line = match read_line_bounded(&mut reader).await {
            Ok(Some(line)) => line,
            Ok(None) => return,
            Err(resp) => {
                let _ = send(&mut write, &resp).await;
                return;
            }
        };
        let request: Request = match serde_json::from_slice(&line) {
            Ok(r) => r,
            Err(e) => {
                let resp = Response::error(ErrorCode::BadRequest, format!("not a request: {e}"));
                if send(&mut write, &resp).await.is_err() {
                    return;
                }
                continue;
            }
        };
        let Some(handler) = router.handler_for(&request.op) else {
            let resp = Response::error(
                ErrorCode::UnknownOp,
                format!("unknown operation {:?}", request.op),
            );
            if send(&mut write, &resp).await.is_err() {
                return;
            }
            continue;
        };
        tracing::debug!(op = %request.op, uid = caller.uid, pid = ?caller.pid, "control request");
        let caller = if handler.read_only(&request.op) {
            caller
        } else {
            match router.gate.admit(caller, pidfd.clone(), &request).await {
                Ok(cleared) => cleared,
                Err(refused) => {
                    if send(&mut write, &refused).await.is_err() {
                        return;
                    }
                    continue;
                }
            }
        };
        match handler.handle(caller, request).await {
            Reply::Once(resp) => {
                if send(&mut write, &resp).await.is_err() {
                    return;
                }
            }
            Reply::Stream(mut items) => {
                loop {
                    tokio::select! {
                        _ = stop.changed() => break,
                        item = items.recv() => match item {
                            Some(item) => {
                                if send(&mut write, &Response::Item { item }).await.is_err() {
                                    return;
                                }
                            }
                            None => break,
                        },
                    }
                }
                let _ = send(&mut write, &Response::End).await;
                return;
            }
        }
    }
}

/// Read one line of at most [`MAX_REQUEST`] bytes. `Ok(None)` at EOF.
async fn read_line_bounded<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
) -> Result<Option<Vec<u8>>, Response> {
    let mut line = Vec::new();
    loop {
        let buf = reader
            .fill_buf()
            .await
            .map_err(|e| Response::error(ErrorCode::BadRequest, e.to_string()))?;
        if buf.is_empty() {
            return Ok(if line.is_empty() { None } else { Some(line) });
        }
        let (take, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if line.len() + take > MAX_REQUEST + 1 {
            return Err(Response::error(
                ErrorCode::BadRequest,
                format!("request longer than {MAX_REQUEST} bytes"),
            ));
        }
        line.extend_from_slice(&buf[..take]);
        reader.consume(take);
        if done {
            line.pop();
            return Ok(Some(line));
        }
    }
}

async fn send(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    resp: &Response,
) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(resp).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    write.write_all(&bytes).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::client::{self, ClientError};
    use serde_json::json;
    use std::io::{BufRead, Write};

    struct Echo;

    impl Handler for Echo {
        fn read_only(&self, op: &str) -> bool {
            op != "echo.change"
        }

        fn handle(&self, caller: Caller, request: Request) -> ReplyFuture {
            Box::pin(async move {
                if request.op == "echo.stream" {
                    let (tx, rx) = mpsc::channel(4);
                    tokio::spawn(async move {
                        for i in 0..3 {
                            let _ = tx.send(json!(i)).await;
                        }
                    });
                    return Reply::Stream(rx);
                }
                if request.op == "echo.deny" {
                    return Reply::Once(Response::error(ErrorCode::Forbidden, "not yours"));
                }
                Reply::Once(Response::ok(json!({
                    "uid": caller.uid,
                    "pid": caller.pid,
                    "args": request.args,
                    "cleared": caller.clearance.is_some(),
                })))
            })
        }
    }

    /// Selects exactly the pids listed.
    struct Pids(Vec<u32>);

    impl crate::control::guard::SelectionOracle for Pids {
        fn is_selected(&self, tgid: u32) -> Result<bool, crate::control::guard::SelectionUnknown> {
            Ok(self.0.contains(&tgid))
        }
    }

    async fn start() -> (
        tempfile::TempDir,
        watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
    ) {
        start_selecting(vec![]).await
    }

    async fn start_selecting(
        pids: Vec<u32>,
    ) -> (
        tempfile::TempDir,
        watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let server = ControlServer::bind(dir.path(), None).unwrap();
        let (tx, rx) = watch::channel(false);
        let gate = Arc::new(Gate::new(Arc::new(Pids(pids))));
        let router = Router::new(gate).route("echo", Arc::new(Echo));
        let task = tokio::spawn(server.serve(router, rx));
        (dir, tx, task)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn caller_identity_comes_from_the_kernel() {
        let (dir, stop, task) = start().await;
        let path = dir.path().to_path_buf();
        let got = tokio::task::spawn_blocking(move || {
            client::call(
                &path,
                &Request::new("echo.hi", json!({"uid": 0, "claimed": "root"})),
            )
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(got["uid"], nix::unistd::getuid().as_raw());
        assert_eq!(got["pid"], std::process::id());
        stop.send(true).unwrap();
        task.await.unwrap();
        assert!(
            !dir.path().join(SOCKET_NAME).exists(),
            "socket file must be removed at shutdown"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn state_changing_operations_pass_the_gate_and_read_only_ones_do_not() {
        // Unselected: admitted with the gate's proof; read-only: no proof needed.
        let (dir, stop, task) = start().await;
        let path = dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || {
            let got = client::call(&path, &Request::new("echo.change", json!({}))).unwrap();
            assert_eq!(got["cleared"], true);
            let got = client::call(&path, &Request::new("echo.list", json!({}))).unwrap();
            assert_eq!(got["cleared"], false);
        })
        .await
        .unwrap();
        stop.send(true).unwrap();
        task.await.unwrap();

        // This process selected: the state-changing operation never reaches
        // the handler; reading still works.
        let (dir, stop, task) = start_selecting(vec![std::process::id()]).await;
        let path = dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || {
            let err = client::call(&path, &Request::new("echo.change", json!({}))).unwrap_err();
            assert!(
                matches!(
                    err,
                    ClientError::Refused {
                        code: ErrorCode::Forbidden,
                        ..
                    }
                ),
                "{err}"
            );
            assert!(err.to_string().contains("selected by kya"), "{err}");
            let got = client::call(&path, &Request::new("echo.list", json!({}))).unwrap();
            assert_eq!(got["cleared"], false);
        })
        .await
        .unwrap();
        stop.send(true).unwrap();
        task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn refusals_streams_and_hostile_lines() {
        let (dir, stop, task) = start().await;
        let path = dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || {
            let err = client::call(&path, &Request::new("nope.x", json!({}))).unwrap_err();
            assert!(matches!(err, ClientError::Refused { code: ErrorCode::UnknownOp, .. }), "{err}");
            let err = client::call(&path, &Request::new("echo.deny", json!({}))).unwrap_err();
            assert!(matches!(err, ClientError::Refused { code: ErrorCode::Forbidden, .. }));

            let mut items = Vec::new();
            client::Client::connect(&path)
                .unwrap()
                .stream(&Request::new("echo.stream", json!({})), |v| {
                    items.push(v);
                    true
                })
                .unwrap();
            assert_eq!(items, vec![json!(0), json!(1), json!(2)]);

            // Garbage, then a valid request on the same connection.
            let mut raw = std::os::unix::net::UnixStream::connect(path.join(SOCKET_NAME)).unwrap();
            raw.write_all(b"{not json\n[1,2]\n{\"op\":\"echo.x\",\"args\":{},\"extra\":1}\n{\"op\":\"echo.ok\"}\n").unwrap();
            let mut r = std::io::BufReader::new(raw.try_clone().unwrap());
            for expect in ["bad_request", "bad_request", "bad_request", "ok"] {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                let kind = if v["type"] == "ok" { "ok" } else { v["code"].as_str().unwrap() };
                assert_eq!(kind, expect, "{line}");
            }

            // An endless line is cut off with an error, not buffered.
            let mut raw = std::os::unix::net::UnixStream::connect(path.join(SOCKET_NAME)).unwrap();
            let big = vec![b'a'; MAX_REQUEST * 2];
            let _ = raw.write_all(&big);
            let mut line = String::new();
            std::io::BufReader::new(raw).read_line(&mut line).unwrap();
            assert!(line.contains("bad_request"), "{line}");
        })
        .await
        .unwrap();
        stop.send(true).unwrap();
        task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn one_daemon_per_state_dir_and_stale_sockets_are_replaced() {
        let (dir, stop, task) = start().await;
        assert!(matches!(
            ControlServer::bind(dir.path(), None),
            Err(ServerError::InUse { .. })
        ));
        stop.send(true).unwrap();
        task.await.unwrap();
        // A stale socket file (nobody listening) is replaced.
        let stale = std::os::unix::net::UnixListener::bind(dir.path().join(SOCKET_NAME)).unwrap();
        drop(stale);
        assert!(dir.path().join(SOCKET_NAME).exists());
        ControlServer::bind(dir.path(), None).unwrap();
        let err = client::call(
            &dir.path().join("elsewhere"),
            &Request::new("echo", json!({})),
        )
        .unwrap_err();
        assert!(err.to_string().contains("is `kya run` running"), "{err}");
    }

    #[tokio::test]
    async fn the_socket_is_0660_never_world_connectable_and_an_unknown_group_stops_the_start() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let server = ControlServer::bind(dir.path(), None).unwrap();
        let md = std::fs::metadata(server.path()).unwrap();
        assert_eq!(md.mode() & 0o777, 0o660);
        assert_eq!(md.gid(), nix::unistd::getegid().as_raw());
        drop(server);

        let other = tempfile::tempdir().unwrap();
        let Err(e) = ControlServer::bind(other.path(), Some("kya-no-such-group-x")) else {
            panic!("an unknown group was accepted");
        };
        assert!(matches!(e, ServerError::UnknownGroup { .. }), "{e}");
        assert!(e.to_string().contains("groupadd"), "{e}");
        assert!(
            !other.path().join(SOCKET_NAME).exists(),
            "nothing is bound for an unknown group"
        );
    }

    #[tokio::test]
    async fn with_an_approvers_group_the_socket_is_that_groups() {
        use std::os::unix::fs::MetadataExt;
        // A group this process may hand a file to: root may use any; others
        // their own primary group.
        let gid = nix::unistd::getegid();
        let Ok(Some(group)) = nix::unistd::Group::from_gid(if nix::unistd::geteuid().is_root() {
            nix::unistd::Gid::from_raw(65534)
        } else {
            gid
        }) else {
            return; // no such group on this machine
        };
        let dir = tempfile::tempdir().unwrap();
        let server = ControlServer::bind(dir.path(), Some(&group.name)).unwrap();
        let md = std::fs::metadata(server.path()).unwrap();
        assert_eq!(md.mode() & 0o777, 0o660);
        assert_eq!(md.gid(), group.gid.as_raw());
    }
}
