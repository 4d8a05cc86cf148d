//! Tests that must change the whole process (its capabilities, its user) run
//! again in a child process of the test binary, so the other tests are
//! untouched.

/// Run this test binary's test `name` alone in a child process, with `env`
/// set (how the test knows it is the child), under `wrapper` (a command and
/// its arguments, e.g. `setpriv` to change users) when given. Panics unless
/// the child succeeded and printed `marker`.
pub(crate) fn rerun_alone(name: &str, env: (&str, &str), wrapper: &[&str], marker: &str) {
    let exe = std::env::current_exe().expect("the test binary");
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = std::process::Command::new(program);
            c.args(args).arg(&exe);
            c
        }
        None => std::process::Command::new(&exe),
    };
    let out = cmd
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(env.0, env.1)
        .output()
        .expect("running the test binary again");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains(marker), "{text}");
}
