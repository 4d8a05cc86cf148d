//! The shipped systemd unit (`packaging/kya.service`): its sandbox scores an
//! exposure of at most 2.5 on `systemd-analyze security`, and the real daemon
//! works under that sandbox.
//!
//! PID 1 is not systemd on every test machine, so the smoke test applies the
//! unit's own settings, read from the unit file, with util-linux: a private
//! mount namespace (`unshare -m`) where everything is read-only except the
//! state directory and the pin directory, a `/proc` with `hidepid=invisible`
//! and `subset=pid`, then `setpriv` to a non-root user with the unit's
//! bounding and ambient capability sets and `no_new_privs`, under its umask;
//! last, `kya-unit-seccomp` loads the unit's system call filters as systemd
//! does (`SystemCallFilter=` with the local systemd's groups,
//! `MemoryDenyWriteExecute=`, `RestrictAddressFamilies=`,
//! `RestrictNamespaces=`, ...) and execs the daemon.

use kya_e2e::unit::{section_settings, shipped_unit};
use kya_e2e::*;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const LISTEN: u16 = 947;
const GUARDED: u16 = 18470;
/// The guarded port of the server only a network namespace reaches.
const NS_GUARDED: u16 = 18474;
/// Highest overall exposure the unit may score ("OK" and below).
const MAX_EXPOSURE: f64 = 2.5;
/// The seccomp filters the unit's settings make: `SystemCallFilter=`,
/// `MemoryDenyWriteExecute=`, `RestrictAddressFamilies=`,
/// `RestrictNamespaces=`, `LockPersonality=`, `RestrictRealtime=`,
/// `RestrictSUIDSGID=`.
const UNIT_FILTERS: u32 = 7;

/// The one value of `key` (the unit must set it exactly once).
fn one<'a>(s: &'a BTreeMap<String, Vec<String>>, key: &str) -> &'a str {
    match s.get(key).map(Vec::as_slice) {
        Some([v]) => v,
        other => panic!("kya.service must set {key}= once, found {other:?}"),
    }
}

/// `CAP_BPF CAP_NET_ADMIN` as setpriv wants it: `-all,+bpf,+net_admin`.
fn setpriv_caps(value: &str) -> String {
    let mut s = String::from("-all");
    for cap in value.split_whitespace() {
        let name = cap
            .strip_prefix("CAP_")
            .unwrap_or_else(|| panic!("not a capability: {cap}"));
        s.push_str(",+");
        s.push_str(&name.to_ascii_lowercase());
    }
    s
}

/// Parses "Overall exposure level for kya.service: 2.4 OK".
fn overall_exposure(output: &str) -> Option<f64> {
    let line = output
        .lines()
        .find(|l| l.contains("Overall exposure level"))?;
    let (_, rest) = line.split_once(": ")?;
    rest.split_whitespace().next()?.parse().ok()
}

#[test]
fn exposure_parsing_reads_the_overall_line_and_nothing_else() {
    assert_eq!(
        overall_exposure("x\n→ Overall exposure level for kya.service: 2.4 OK 🙂\n"),
        Some(2.4)
    );
    assert_eq!(
        overall_exposure("→ Overall exposure level for kya.service: 9.6 UNSAFE 😨"),
        Some(9.6)
    );
    assert_eq!(overall_exposure("✗ PrivateNetwork= 0.5"), None);
    assert_eq!(overall_exposure(""), None);
    assert_eq!(
        overall_exposure("Overall exposure level for kya.service: high"),
        None
    );
}

#[test]
fn the_shipped_unit_scores_an_exposure_of_at_most_2_5() {
    let unit = shipped_unit();
    let out = match Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            kya_testkit::skip(
                "the_shipped_unit_scores_an_exposure_of_at_most_2_5",
                &format!("systemd-analyze is not available: {e}"),
            );
            return;
        }
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let exposure = overall_exposure(&text)
        .unwrap_or_else(|| panic!("no overall exposure in systemd-analyze's output:\n{text}"));
    assert!(
        exposure <= MAX_EXPOSURE,
        "kya.service scores {exposure} (at most {MAX_EXPOSURE} allowed):\n{text}"
    );
}

/// What each probe (a Python one-liner under the filters) must get: the
/// error systemd's filters give for the unit's settings.
const FILTER_PROBES: [(&str, &str, &str); 7] = [
    // Not in @system-service.
    (
        "mount",
        "import ctypes; l = ctypes.CDLL(None, use_errno=True); \
         r = l.mount(b'none', b'/nonexistent-kya', b'tmpfs', 0, None); \
         print(ctypes.get_errno() if r else 0)",
        "EPERM",
    ),
    // @resources, taken away by the second SystemCallFilter= line.
    (
        "sched_setaffinity",
        "import os\ntry:\n os.sched_setaffinity(0, os.sched_getaffinity(0)); print(0)\nexcept OSError as e:\n print(e.errno)",
        "EPERM",
    ),
    // MemoryDenyWriteExecute=
    (
        "mmap(W|X)",
        "import mmap\ntry:\n mmap.mmap(-1, 4096, prot=7); print(0)\nexcept OSError as e:\n print(e.errno)",
        "EPERM",
    ),
    // RestrictAddressFamilies=
    (
        "socket(AF_NETLINK)",
        "import socket\ntry:\n socket.socket(socket.AF_NETLINK, socket.SOCK_RAW); print(0)\nexcept OSError as e:\n print(e.errno)",
        "EAFNOSUPPORT",
    ),
    // RestrictNamespaces=net: a mount namespace is refused.
    (
        "unshare(CLONE_NEWNS)",
        "import ctypes; l = ctypes.CDLL(None, use_errno=True); \
         print(ctypes.get_errno() if l.unshare(0x20000) else 0)",
        "EPERM",
    ),
    // What a service needs stays: TCP sockets, threads.
    (
        "socket(AF_INET)",
        "import socket; socket.socket(socket.AF_INET, socket.SOCK_STREAM); print(0)",
        "0",
    ),
    // A thread (clone3 is ENOSYS, the C library falls back to clone).
    (
        "thread",
        "import threading; t = threading.Thread(target=lambda: None); t.start(); t.join(); print(0)",
        "0",
    ),
];

/// The emulated filters refuse what systemd's refuse for this unit, with
/// the same errors, and leave what a service needs: a check that the
/// daemon's run under them below means something.
#[test]
fn the_units_system_call_filters_refuse_what_systemd_refuses() {
    let name = "the_units_system_call_filters_refuse_what_systemd_refuses";
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        kya_testkit::skip(name, "systemd-analyze is not available");
        return;
    }
    let errno_name = |n: i32| match n {
        0 => "0".to_string(),
        libc::EPERM => "EPERM".into(),
        libc::EAFNOSUPPORT => "EAFNOSUPPORT".into(),
        other => format!("errno {other}"),
    };
    for (what, code, want) in FILTER_PROBES {
        // Without the filters, as root, as a baseline: none of the probes is
        // refused with the filters' error for another reason (without root,
        // mount and unshare are refused for want of privilege).
        let run = |filtered: bool| -> String {
            let mut c = Command::new("setpriv");
            c.args(["--no-new-privs", "--"]);
            if filtered {
                c.arg(unit_seccomp_bin()).arg(shipped_unit()).arg("--");
            }
            let out = c
                .args(["python3", "-c", code])
                .output()
                .expect("run the probe");
            let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
            assert!(
                out.status.success(),
                "{what} (filtered: {filtered}): {}\n{text}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            errno_name(text.parse().unwrap_or_else(|_| panic!("{what}: {text}")))
        };
        assert_eq!(run(true), want, "{what} under the unit's filters");
        if want != "0" && nix::unistd::geteuid().is_root() {
            assert_ne!(run(false), want, "{what} without the filters");
        }
    }
}

/// The unit's sandbox as a wrapper command for [`DaemonOptions::wrapper`]
/// (and the `--pin-dir` the unit gives, relative to the state directory).
struct Sandbox {
    wrapper: Vec<String>,
    caps: String,
}

fn sandbox_of_unit(script_dir: &Path, user: &TestUser) -> Sandbox {
    let text = std::fs::read_to_string(shipped_unit()).expect("read kya.service");
    let s = section_settings(&text, "Service");
    assert_eq!(one(&s, "ProtectSystem"), "strict");
    assert_eq!(one(&s, "NoNewPrivileges"), "yes");
    assert_eq!(one(&s, "ProtectProc"), "invisible");
    assert_eq!(one(&s, "ProcSubset"), "pid");
    assert_ne!(one(&s, "User"), "root");
    let bounding = one(&s, "CapabilityBoundingSet");
    let ambient = one(&s, "AmbientCapabilities");
    // The only writable path besides the unit's own directories is the pin
    // directory, bound where ExecStart's --pin-dir points.
    let rw = one(&s, "ReadWritePaths");
    let (bind_from, bind_to) = one(&s, "BindPaths")
        .split_once(':')
        .expect("BindPaths=SRC:DST");
    assert_eq!(
        rw, bind_from,
        "the writable path is the bound pin directory"
    );
    assert!(
        one(&s, "ExecStart").contains(&format!("--pin-dir {bind_to}")),
        "ExecStart's --pin-dir is where BindPaths= puts the pins"
    );
    let umask = one(&s, "UMask");
    assert!(umask.chars().all(|c| c.is_ascii_digit()), "UMask={umask}");

    // Every mount of the host (as the test sees it) becomes read-only, but
    // the API file systems /proc and /dev (systemd gives the service its own).
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let mut remounts = String::new();
    for line in mountinfo.lines() {
        let Some(point) = line.split(' ').nth(4) else {
            continue;
        };
        let under = |root: &str| point == root || point.starts_with(&format!("{root}/"));
        if under("/proc") || under("/dev") {
            continue;
        }
        // mountinfo escapes space, tab, newline and backslash as \ooo; the
        // shell gets the escaped form back as printf %b input.
        remounts.push_str(&format!(
            "m=$(printf '%b' '{}'); mount -o remount,bind,ro \"$m\" 2>/dev/null || echo \"kya-sandbox: $m stays writable\" >&2\n",
            point.replace('\'', "")
        ));
    }
    let script = format!(
        "set -eu\n\
         # StateDirectory= and BindPaths= (the pins) stay writable.\n\
         mount --bind \"$KYA_E2E_STATE_DIR\" \"$KYA_E2E_STATE_DIR\"\n\
         mount --bind \"$KYA_E2E_PIN_DIR\" \"$KYA_E2E_STATE_DIR/bpf\"\n\
         # ProtectSystem=strict, ProtectKernelTunables=, ProtectControlGroups=\n\
         {remounts}\
         # ProtectProc=invisible, ProcSubset=pid\n\
         mount -t proc -o hidepid=invisible,subset=pid proc /proc\n\
         umask {umask}\n\
         # systemd's default LimitNOFILE= for services, 1024:524288 (the unit\n\
         # sets none); the hard limit only lowered, raising it takes CAP_SYS_RESOURCE.\n\
         hard=$(ulimit -Hn)\n\
         if [ \"$hard\" = unlimited ] || [ \"$hard\" -gt 524288 ]; then ulimit -Hn 524288; fi\n\
         ulimit -Sn 1024\n\
         exec \"$@\"\n"
    );
    let path = script_dir.join("sandbox.sh");
    std::fs::write(&path, script).expect("write the sandbox script");
    let caps = setpriv_caps(ambient);
    let wrapper = vec![
        "unshare".into(),
        "-m".into(),
        "--propagation".into(),
        "private".into(),
        "sh".into(),
        path.display().to_string(),
        "setpriv".into(),
        "--reuid".into(),
        user.uid.to_string(),
        "--regid".into(),
        user.gid.to_string(),
        // The user's own groups: the approvers group, as the unit's
        // SupplementaryGroups= drop-in gives it when `[control] group` is set.
        "--init-groups".into(),
        "--inh-caps".into(),
        caps.clone(),
        "--ambient-caps".into(),
        caps.clone(),
        "--bounding-set".into(),
        setpriv_caps(bounding),
        "--no-new-privs".into(),
        "--".into(),
        unit_seccomp_bin().display().to_string(),
        shipped_unit().display().to_string(),
        "--".into(),
    ];
    Sandbox { wrapper, caps }
}

/// A child process killed (and reaped) on drop.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A capability mask of `/proc/PID/status` (hex) as a set of numbers.
fn cap_bits(status: &str, field: &str) -> u64 {
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in status"));
    u64::from_str_radix(line.trim(), 16).expect("hex capability mask")
}

/// The bit of each capability setpriv was given (`-all,+bpf,...`).
fn expected_bits(setpriv: &str) -> u64 {
    let number = |name: &str| -> u64 {
        match name {
            "net_bind_service" => 10,
            "net_admin" => 12,
            "sys_ptrace" => 19,
            "sys_admin" => 21,
            "perfmon" => 38,
            "bpf" => 39,
            other => panic!("add capability {other} to the test's table"),
        }
    };
    setpriv
        .split(',')
        .filter_map(|c| c.strip_prefix('+'))
        .fold(0, |acc, c| acc | (1u64 << number(c)))
}

#[test]
fn the_daemon_works_under_the_units_sandbox() {
    if !privileged("the_daemon_works_under_the_units_sandbox") {
        return;
    }
    let _g = serial();
    let scene = AgentScene::new("sbx", DOCS_POLICY);
    // The unit's user reads the policy and the registry (root's 0700 tempdir otherwise).
    std::fs::set_permissions(scene.dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod the scene dir");
    let service_user = TestUser::new("kya-e2e-sbx-svc");
    scene.approvers.add(&service_user);
    let sandbox = sandbox_of_unit(scene.dir.path(), &service_user);
    let server = McpServer::start(scene.dir.path(), GUARDED, "peer.log");
    let mut opts = scene
        .daemon_options(LISTEN, GUARDED)
        .args(["--port", &NS_GUARDED.to_string()]);
    opts.wrapper = sandbox.wrapper.clone();
    opts.owner = Some((service_user.uid, service_user.gid));
    opts.pin_dir_in_state = Some("bpf".into());
    let mut daemon = Daemon::start(opts);

    // The daemon really runs as the unit says.
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", daemon.pid)).expect("daemon status");
    let uid_line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .expect("Uid line");
    assert!(
        uid_line
            .split_whitespace()
            .skip(1)
            .all(|u| u == service_user.uid.to_string()),
        "{uid_line}"
    );
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    // Under the unit's system call filters (seccomp mode 2, one filter per setting).
    assert!(status.contains("Seccomp:\t2"), "{status}");
    let filters: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp_filters:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("Seccomp_filters");
    assert!(filters >= UNIT_FILTERS, "{filters} filters: {status}");
    let want = expected_bits(&sandbox.caps);
    assert_eq!(cap_bits(&status, "CapEff"), want, "{status}");
    assert_eq!(cap_bits(&status, "CapBnd") & !want, 0, "{status}");
    // `kya status` says the same.
    let privileges = &kya_status(&daemon)["privileges"];
    assert_eq!(
        privileges["uids"],
        serde_json::json!(vec![service_user.uid; 4]),
        "{privileges}"
    );
    assert_eq!(privileges["no_new_privs"], true, "{privileges}");
    let unit_caps: Vec<String> = sandbox
        .caps
        .split(',')
        .filter_map(|c| c.strip_prefix('+'))
        .map(|c| format!("CAP_{}", c.to_ascii_uppercase()))
        .collect();
    let mut shown: Vec<String> = privileges["effective"]
        .as_array()
        .expect("effective capabilities")
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    let mut want_names = unit_caps.clone();
    shown.sort();
    want_names.sort();
    assert_eq!(shown, want_names, "{privileges}");
    let mounts = std::fs::read_to_string(format!("/proc/{}/mountinfo", daemon.pid))
        .expect("daemon mountinfo");
    let root = mounts
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/"))
        .expect("root mount");
    assert!(
        root.split(' ').nth(5).unwrap_or("").starts_with("ro"),
        "{root}"
    );

    // An allowed call and a denied one, judged on the server's own record.
    let url = server.url();
    let allowed = mcp_result(mcp_client(
        &scene.cg,
        &url,
        &["search_docs", r#"{"query": "kya"}"#],
    ));
    assert_eq!(allowed["isError"], false, "{allowed}");
    assert_eq!(allowed["text"], "found 3 documents about kya");
    let denied = mcp_result(mcp_client(
        &scene.cg,
        &url,
        &["delete_records", r#"{"table": "users"}"#],
    ));
    assert_eq!(denied["isError"], true, "{denied}");
    assert_eq!(
        server.ran(),
        vec!["search_docs".to_string()],
        "the server ran exactly the allowed call"
    );
    // It was intercepted (not a direct connection that happened to work).
    assert!(!daemon.wait_connections(1).is_empty(), "no interception");
    // It raised its open-files limit from systemd's default soft limit.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", daemon.pid)).expect("limits");
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let fields: Vec<&str> = nofile.split_whitespace().collect();
    assert!(
        fields[3] != "1024" && fields[3] == fields[4],
        "soft limit raised to the hard one: {nofile}"
    );

    // A "container": a selected process in a network namespace that appears
    // now. Serving it takes every capability the unit keeps: reading a root
    // process's /proc/PID/ns/net (CAP_SYS_PTRACE, through hidepid=invisible),
    // setns() (CAP_SYS_ADMIN), a listener below 1024 in there
    // (CAP_NET_BIND_SERVICE), marked upstream sockets (CAP_NET_ADMIN).
    let ns = TestNetns::new("sbx", 0, true);
    let ns_dir = scene.dir.path().join("ns");
    std::fs::create_dir(&ns_dir).expect("ns peer dir");
    let ns_server = McpServer::start_on(&ns_dir, &ns.host_addr, NS_GUARDED, &[], "peer.log");
    let sleeper = ns
        .command(Some(&scene.cg.path), "sleep", &["600"])
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("a process in the namespace");
    let _sleeper = KillOnDrop(sleeper);
    let deadline = Instant::now() + patience() * 20;
    loop {
        let status = kya_status(&daemon);
        let ready = status["namespaces"].as_array().is_some_and(|all| {
            all.iter()
                .any(|n| n["inode"] == ns.inode && n["state"] == "ready")
        });
        if ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the namespace was not served: {}\n{}",
            status["namespaces"],
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let script = peers().join("client.py");
    let ns_url = format!("http://{}:{NS_GUARDED}/mcp", ns.host_addr);
    let run_in_ns = |tool: &str, args: &str| {
        let child = ns
            .command(
                Some(&scene.cg.path),
                peers_python(),
                &[script.to_str().expect("utf-8"), &ns_url, tool, args],
            )
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("MCP client in the namespace");
        mcp_result(child)
    };
    let r = run_in_ns("search_docs", r#"{"query": "ns"}"#);
    assert_eq!(r["text"], "found 3 documents about ns", "{r}");
    let r = run_in_ns("delete_records", r#"{"table": "users"}"#);
    assert_eq!(r["isError"], true, "{r}");
    assert_eq!(ns_server.ran(), vec!["search_docs".to_string()]);
    let in_ns = tool_call_events(&daemon)
        .into_iter()
        .filter(|e| e["process"]["netns"] == ns.inode)
        .count();
    assert_eq!(in_ns, 2, "both calls were decided inside the namespace");

    // Its files follow the unit's UMask (0077): nothing group- or world-readable
    // but the CA certificate (0644 by design) and the state dir itself.
    for entry in std::fs::read_dir(daemon.state_dir.path()).expect("state dir") {
        let entry = entry.expect("entry");
        let name = entry.file_name().to_string_lossy().into_owned();
        let md = entry.metadata().expect("metadata");
        if ["ca.pem", "daemon.log", "kya.sock", "bpf"].contains(&name.as_str()) {
            continue;
        }
        assert_eq!(
            md.permissions().mode() & 0o077,
            0,
            "{name} is open to others: {:o}",
            md.permissions().mode()
        );
    }

    // SIGHUP (the unit's ExecReload=) reloads the policy.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("SIGHUP");
    let deadline = Instant::now() + patience() * 10;
    while !daemon
        .events()
        .iter()
        .any(|e| e["fields"]["trigger"] == "SIGHUP")
    {
        assert!(Instant::now() < deadline, "no reload on SIGHUP");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Nothing the daemon asked of the kernel was refused by the filters (a
    // refusal it expects, such as raising RLIMIT_MEMLOCK on kernels that
    // do not need it, is logged at debug level).
    let log = daemon.log_text();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(r#""level":"WARN""#) || l.contains(r#""level":"ERROR""#))
        .filter(|l| {
            [
                "Operation not permitted",
                "Function not implemented",
                "not supported",
            ]
            .iter()
            .any(|r| l.contains(r))
        })
        .collect();
    assert!(
        refused.is_empty(),
        "refused calls in the daemon's log: {refused:#?}"
    );

    // It stops cleanly: pins removed, though the pin directory is a mount point.
    let exit = daemon.terminate();
    assert!(exit.success(), "{exit}:\n{}", daemon.log_text());
    let left: Vec<_> = std::fs::read_dir(&daemon.pin_dir)
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "pins left behind: {left:?}");
}
