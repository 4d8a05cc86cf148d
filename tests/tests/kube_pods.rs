//! Pods selected by label through the Kubernetes API (`[kubernetes]
//! pod_selector`). No API server can run here: a stand-in on loopback
//! answers the pod list and streams watch events in the API's format, and
//! the pods' cgroups are a tree named the way the kubelet names it
//! (`kubepods-…/pod<uid>`). Judged on the MCP server's own record: a pod
//! whose labels match is governed, one whose labels do not is not, and a pod
//! relabelled through the watch is governed from then on.

use kya_e2e::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

const LISTEN: u16 = 958;
const MCP_PORT: u16 = 18463;
const API_PORT: u16 = 18464;
const NODE: &str = "kya-test-node";
const POD_A: &str = "1b2c3d4e-5f60-4718-9293-a4b5c6d7e8f9";
const POD_B: &str = "2c3d4e5f-6071-4829-93a4-b5c6d7e8f901";

/// The API stand-in: the pod list from LIST, and each watch streams the
/// lines of EVENTS as they are appended; every request is logged.
const FAKE_API: &str = r#"
import http.server, json, sys, time
LIST, EVENTS, LOG, PORT = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def do_GET(self):
        with open(LOG, "a") as f:
            f.write(json.dumps({"path": self.path, "auth": self.headers.get("Authorization")}) + "\n")
        if "watch=1" not in self.path:
            body = open(LIST, "rb").read()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent = 0
        while True:
            try:
                lines = open(EVENTS).read().splitlines()
            except FileNotFoundError:
                lines = []
            for l in lines[sent:]:
                data = (l + "\n").encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            sent = len(lines)
            time.sleep(0.05)
http.server.ThreadingHTTPServer(("127.0.0.1", PORT), H).serve_forever()
"#;

/// A container id for the pod's container (64 hex digits from its uid).
fn container_id(uid: &str) -> String {
    uid.replace('-', "").repeat(2)
}

/// The image each test pod's container runs, as the kubelet reports it.
fn image_of(app: &str) -> String {
    format!("registry.example.com/{app}:1.4")
}

fn pod(uid: &str, name: &str, app: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "agents", "uid": uid,
                     "resourceVersion": "100", "labels": {"app": app}},
        "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": image_of(app)}]},
        "status": {
            "phase": "Running", "qosClass": "BestEffort",
            "containerStatuses": [{
                "name": "c", "ready": true, "started": true,
                "containerID": format!("containerd://{}", container_id(uid)),
                "image": image_of(app),
                "imageID": format!("registry.example.com/{app}@sha256:{}", container_id(uid)),
            }]
        }
    })
}

/// The API stand-in serving `list` (and the watch events written to
/// `events.jsonl` later), and the MCP server, for a test in `d`.
fn api_and_server(d: &Path, list: &Value) -> (Proc, McpServer) {
    std::fs::write(d.join("list.json"), list.to_string()).expect("list");
    std::fs::write(d.join("events.jsonl"), "").expect("events");
    std::fs::write(d.join("token"), "kya-test-token\n").expect("token");
    std::fs::write(d.join("fake_api.py"), FAKE_API).expect("script");
    let api = Proc(
        Command::new(peers_python())
            .arg(d.join("fake_api.py"))
            .arg(d.join("list.json"))
            .arg(d.join("events.jsonl"))
            .arg(d.join("api.log"))
            .arg(API_PORT.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("API stand-in"),
    );
    let deadline = Instant::now() + patience() * 30;
    while std::net::TcpStream::connect(("127.0.0.1", API_PORT)).is_err() {
        assert!(Instant::now() < deadline, "the API stand-in did not listen");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    (api, McpServer::start(d, MCP_PORT, "peer.log"))
}

/// What the MCP server ran, in order (its own record).
fn ran_in(d: &Path) -> Vec<String> {
    std::fs::read_to_string(d.join("peer.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// One test's world: the pods' cgroups, the API stand-in serving pods A
/// (`app=agent`) and B (`app=web`), the MCP server, and the daemon with
/// `[kubernetes]` (with `selector`, or watching only), a policy of
/// [`DOCS_POLICY`] and one more `rule`, and (with `by_cgroup`) both pods
/// selected by their cgroups. Dropped daemon first, cgroups last.
struct Scene {
    daemon: Daemon,
    _server: McpServer,
    _api: Proc,
    pods: KubePods,
    dir: tempfile::TempDir,
}

impl Scene {
    fn start(rule: &str, selector: Option<&str>, by_cgroup: bool) -> Self {
        ensure_peers();
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let pods = KubePods::new();
        let list = json!({
            "kind": "PodList", "apiVersion": "v1",
            "metadata": {"resourceVersion": "4711"},
            "items": [pod(POD_A, "agent-a", "agent"), pod(POD_B, "web-b", "web")]
        });
        let (api, server) = api_and_server(d, &list);
        std::fs::write(
            d.join("policy.toml"),
            format!("{DOCS_POLICY}\n[[rule]]\n{rule}"),
        )
        .expect("policy");
        let selector = selector
            .map(|s| format!("pod_selector = \"{s}\"\n"))
            .unwrap_or_default();
        std::fs::write(
            d.join("kya.toml"),
            format!(
                "[kubernetes]\n{selector}node = \"{NODE}\"\napi = \"http://127.0.0.1:{API_PORT}\"\ntoken_file = \"{}\"\n",
                d.join("token").display()
            ),
        )
        .expect("config");
        let mut opts = DaemonOptions::new(LISTEN)
            .args(["--policy", d.join("policy.toml").to_str().expect("utf-8")])
            .args(["--port", &MCP_PORT.to_string()]);
        if by_cgroup {
            opts = opts
                .args(["--cgroup", &pods.rel(POD_A)])
                .args(["--cgroup", &pods.rel(POD_B)]);
        }
        opts.config = Some(d.join("kya.toml"));
        let daemon = Daemon::start(opts);
        Self {
            daemon,
            _server: server,
            _api: api,
            pods,
            dir,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{MCP_PORT}/mcp")
    }
}

/// The stand-in for the kubelet's cgroup tree: `/kubepods-kya-test-PID`
/// with one `pod<uid>` cgroup per pod; processes killed and removed on drop.
struct KubePods {
    root: PathBuf,
}

impl KubePods {
    fn new() -> Self {
        let root = cgroup2_mount().join(format!("kubepods-kya-test-{}", std::process::id()));
        let me = Self { root };
        me.remove();
        for uid in [POD_A, POD_B] {
            std::fs::create_dir_all(me.container(uid)).expect("pod cgroup");
        }
        me
    }

    fn pod(&self, uid: &str) -> PathBuf {
        self.root.join(format!("pod{uid}"))
    }

    /// The pod's one container (named by its id, as CRI runtimes do).
    fn container(&self, uid: &str) -> PathBuf {
        self.pod(uid).join(container_id(uid))
    }

    fn rel(&self, uid: &str) -> String {
        let p = self.pod(uid);
        format!(
            "/{}",
            p.strip_prefix(cgroup2_mount())
                .expect("under the mount")
                .display()
        )
    }

    fn remove(&self) {
        for uid in [POD_A, POD_B] {
            for p in [self.container(uid), self.pod(uid)] {
                let _ = std::fs::write(p.join("cgroup.kill"), "1");
                let deadline = Instant::now() + std::time::Duration::from_secs(5);
                while p.exists() && std::fs::remove_dir(&p).is_err() && Instant::now() < deadline {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
        }
        let _ = std::fs::remove_dir(&self.root);
    }
}

impl Drop for KubePods {
    fn drop(&mut self) {
        self.remove();
    }
}

/// A process killed on drop (the API stand-in).
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn client_in(dir: &Path, url: &str, args: &[&str]) -> Value {
    let script = peers().join("client.py");
    let mut all: Vec<&str> = vec![script.to_str().expect("utf-8"), url];
    all.extend_from_slice(args);
    mcp_result(
        in_cgroup(dir, peers_python(), &all)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start MCP client"),
    )
}

/// Wait until the daemon's selection holds cgroup `rel`.
fn wait_selected(daemon: &Daemon, rel: &str) {
    let deadline = Instant::now() + patience() * 30;
    loop {
        let s = kya_status(daemon);
        let live = s["selection_live"].as_array().cloned().unwrap_or_default();
        if live.iter().any(|e| e["selector"] == rel) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{rel} never selected: {live:?}\n{}",
            daemon.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn pods_are_selected_by_label_through_the_api_watch() {
    if !privileged("pods_are_selected_by_label_through_the_api_watch") {
        return;
    }
    let _g = serial();
    // and a rule on the pod's name, which only the API knows
    let scene = Scene::start(
        "id = \"not-from-web\"\ntool = \"search_docs\"\nwhen = 'process.container.pod_namespace == \"agents\" && process.container.pod_name == \"web-b\"'\nverdict = \"deny\"\nreason = \"web pods may not search\"\n",
        Some("app=agent"),
        false,
    );
    let (d, pods, url) = (scene.dir.path(), &scene.pods, scene.url());
    let daemon = &scene.daemon;
    let ran = || ran_in(d);

    // pod A's labels match: governed
    wait_selected(daemon, &pods.rel(POD_A));
    let r = client_in(
        &pods.container(POD_A),
        &url,
        &["search_docs", r#"{"query": "pod"}"#],
    );
    assert_eq!(r["text"], "found 3 documents about pod", "{r}");
    let r = client_in(
        &pods.container(POD_A),
        &url,
        &["delete_records", r#"{"table": "t"}"#],
    );
    assert_eq!(r["isError"], true, "{r}");
    assert_eq!(ran(), ["search_docs"], "the denied call never ran");
    let ev = tool_call_events(daemon);
    assert_eq!(ev.len(), 2, "{ev:?}");
    for e in &ev {
        assert_eq!(e["process"]["pod_uid"], POD_A, "{e}");
        assert_eq!(e["process"]["container_id"], container_id(POD_A), "{e}");
        // the pod's namespace and name, from the API
        assert_eq!(e["process"]["pod_namespace"], "agents", "{e}");
        assert_eq!(e["process"]["pod_name"], "agent-a", "{e}");
        // and the container's image, from the pod's status
        assert_eq!(e["process"]["container_image"], image_of("agent"), "{e}");
    }

    // pod B's do not: kya does not touch it (its delete runs)
    let r = client_in(
        &pods.container(POD_B),
        &url,
        &["delete_records", r#"{"table": "t"}"#],
    );
    assert_eq!(r["isError"], false, "{r}");
    assert_eq!(ran(), ["search_docs", "delete_records"]);
    assert_eq!(tool_call_events(daemon).len(), 2, "not intercepted");

    // relabelled through the watch: governed from then on
    let mut b = pod(POD_B, "web-b", "agent");
    b["metadata"]["resourceVersion"] = json!("4800");
    let ev = json!({"type": "MODIFIED", "object": b});
    std::fs::write(d.join("events.jsonl"), format!("{ev}\n")).expect("event");
    wait_selected(daemon, &pods.rel(POD_B));
    let r = client_in(
        &pods.container(POD_B),
        &url,
        &["delete_records", r#"{"table": "t"}"#],
    );
    assert_eq!(r["isError"], true, "{r}");
    let r = client_in(
        &pods.container(POD_B),
        &url,
        &["search_docs", r#"{"query": "web"}"#],
    );
    assert_eq!(r["isError"], true, "{r}");
    assert!(
        r["text"].as_str().unwrap_or("").contains("not-from-web"),
        "decided on the pod's name: {r}"
    );
    assert_eq!(
        ran(),
        ["search_docs", "delete_records"],
        "the relabelled pod's calls never ran"
    );

    // what kya asked the API: this node's pods, with the token, then a
    // watch from the list's resourceVersion
    let log: Vec<Value> = std::fs::read_to_string(d.join("api.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(log.len() >= 2, "{log:?}");
    for req in &log {
        assert_eq!(req["auth"], "Bearer kya-test-token", "{req}");
        let path = req["path"].as_str().unwrap_or("");
        assert!(
            path.contains(&format!("fieldSelector=spec.nodeName%3D{NODE}")),
            "{path}"
        );
    }
    assert!(!log[0]["path"].as_str().unwrap_or("").contains("watch=1"));
    let watch = log[1]["path"].as_str().unwrap_or("");
    assert!(
        watch.contains("watch=1") && watch.contains("resourceVersion=4711"),
        "{watch}"
    );
}

#[test]
fn pods_selected_by_cgroup_are_named_and_decided_on_their_image_from_the_watch() {
    if !privileged("pods_selected_by_cgroup_are_named_and_decided_on_their_image_from_the_watch") {
        return;
    }
    let _g = serial();
    // only the agent image may search; an image kya does not know is no
    // exception (the default denies). [kubernetes] without a pod selector:
    // the watch names pods and images, the cgroups select.
    let scene = Scene::start(
        &format!(
            "id = \"agent-image-only\"\ntool = \"search_docs\"\nwhen = 'process.container.image != \"{}\"'\nverdict = \"deny\"\nreason = \"only the agent image may search\"\n",
            image_of("agent")
        ),
        None,
        true,
    );
    let (d, pods, url) = (scene.dir.path(), &scene.pods, scene.url());
    let daemon = &scene.daemon;
    let deadline = Instant::now() + patience() * 30;
    while !daemon.log_text().contains("listed this node's pods") {
        assert!(
            Instant::now() < deadline,
            "the pods were never listed\n{}",
            daemon.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    let r = client_in(
        &pods.container(POD_A),
        &url,
        &["search_docs", r#"{"query": "pod"}"#],
    );
    assert_eq!(r["text"], "found 3 documents about pod", "{r}");
    let r = client_in(
        &pods.container(POD_B),
        &url,
        &["search_docs", r#"{"query": "web"}"#],
    );
    assert_eq!(r["isError"], true, "{r}");
    assert!(
        r["text"]
            .as_str()
            .unwrap_or("")
            .contains("agent-image-only"),
        "decided on the image: {r}"
    );
    assert_eq!(ran_in(d), ["search_docs"], "the web image's call never ran");
    let ev = tool_call_events(daemon);
    assert_eq!(ev.len(), 2, "{ev:?}");
    for (e, (uid, name, app)) in ev
        .iter()
        .zip([(POD_A, "agent-a", "agent"), (POD_B, "web-b", "web")])
    {
        assert_eq!(e["process"]["pod_uid"], uid, "{e}");
        assert_eq!(e["process"]["pod_name"], name, "{e}");
        assert_eq!(e["process"]["container_image"], image_of(app), "{e}");
        assert_eq!(e["process"]["container_image_id"], container_id(uid), "{e}");
    }
}

#[test]
fn a_bad_pod_selector_stops_the_start() {
    if !privileged("a_bad_pod_selector_stops_the_start") {
        return;
    }
    let _g = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    for (conf, why) in [
        (
            "[kubernetes]\npod_selector = \"app in ()\"\nnode = \"n\"\napi = \"http://127.0.0.1:1\"\n",
            "pod_selector",
        ),
        (
            "[kubernetes]\npod_selector = \"app=agent\"\nnode = \"N/../x\"\napi = \"http://127.0.0.1:1\"\n",
            "node name",
        ),
        (
            "[kubernetes]\npod_selector = \"app=agent\"\nnode = \"n\"\napi = \"http://10.0.0.1:6443\"\n",
            "only loopback hosts",
        ),
    ] {
        let path = dir.path().join("kya.toml");
        std::fs::write(&path, conf).expect("config");
        let out = Command::new(kya_bin())
            .args(["run", "--config"])
            .arg(&path)
            .args(["--listen-port", "958", "--state-dir"])
            .arg(dir.path())
            .stdin(Stdio::null())
            .output()
            .expect("kya run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{conf}: {err}");
        assert!(err.contains(why), "{conf}: {err}");
    }
}
