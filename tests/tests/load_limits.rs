//! The connection limits with the real daemon: a process past its own limit
//! is refused, on record, while another process is served.

use kya_e2e::*;

const GUARDED: u16 = 18443;

#[test]
fn a_process_past_its_connection_limit_is_refused_on_record_and_others_are_served() {
    if !privileged("a_process_past_its_connection_limit_is_refused_on_record_and_others_are_served")
    {
        return;
    }
    let _g = serial();
    let cg = TestCgroup::new("loadlim");
    let _echo = TcpEcho::start("127.0.0.2:18443");
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("kya.toml");
    std::fs::write(
        &config,
        format!("[intercept]\nsplice_ports = [{GUARDED}]\nmax_connections_per_process = 2\n"),
    )
    .expect("config");
    let mut opts =
        DaemonOptions::new(943).args(["--cgroup", &cg.rel, "--port", &GUARDED.to_string()]);
    opts.config = Some(config);
    let daemon = Daemon::start(opts);
    let probe = probe_bin();

    // One process opens three connections and keeps them: two are served,
    // the third is refused.
    let port = GUARDED.to_string();
    let out = run_json(cg.command(&probe, &["hold", "127.0.0.2", &port, "3"]));
    let conns = out["connections"].as_array().expect("connections");
    assert_eq!(conns[0]["reply"], "hold-0", "{out}");
    assert_eq!(conns[1]["reply"], "hold-1", "{out}");
    assert!(conns[2].get("error").is_some(), "{out}");

    // On record with the process, before the agent saw the reset.
    let audit =
        std::fs::read_to_string(daemon.state_dir.path().join("audit.jsonl")).unwrap_or_default();
    let pid = out["pid"].as_u64().unwrap_or(0);
    let record = audit
        .lines()
        .find(|l| l.contains("max_connections_per_process"))
        .unwrap_or_else(|| panic!("no record of the refusal: {audit}"));
    assert!(record.contains(&pid.to_string()), "{record}");

    // The daemon said what open-files limit it runs with.
    assert!(
        daemon.log_text().contains("open-files limit"),
        "{}",
        daemon.log_text()
    );

    // Another process is served.
    let other = run_json(cg.command(
        &probe,
        &["tcp", "127.0.0.2", &port, "--payload", "other-process"],
    ));
    assert_eq!(other["reply"], "other-process", "{other}");
}
