//! How a test that needs something the machine does not give it (root, BPF,
//! a mount namespace) says so.
//!
//! libtest has no runtime skip: a test that returns early counts as passed.
//! So a test that cannot run calls [`skip`] (or [`root_or_skip`]) before it
//! returns. Under `CI=true` that is a failure (CI must run everything);
//! elsewhere the skip is printed and appended to the file named by
//! `KYA_SKIP_LOG`, which `cargo xtask test` reads to count these tests as
//! skipped, not passed, in its summary line.

use std::io::Write;

/// The environment variable naming the file skips are appended to.
pub const SKIP_LOG_ENV: &str = "KYA_SKIP_LOG";

/// True when running as root. Otherwise records `test` as skipped (panicking
/// under `CI=true`) and returns false: the caller returns at once.
pub fn root_or_skip(test: &str, needs: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    skip(test, needs);
    false
}

/// Records that `test` could not run because of `why`. Panics under
/// `CI=true`, where every test must run.
pub fn skip(test: &str, why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: cannot run ({why}), and CI=true forbids skipping");
    }
    eprintln!("SKIPPED {test}: {why}");
    let Some(path) = std::env::var_os(SKIP_LOG_ENV) else {
        return;
    };
    // One short line per skip, appended with O_APPEND: test binaries running
    // in parallel do not interleave within a line.
    let line = format!(
        "{}\t{}\n",
        test.replace(['\t', '\n'], " "),
        why.replace(['\t', '\n'], " ")
    );
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        // The summary would then count this test as passed: make that loud.
        panic!("{test}: skipped, but the skip could not be recorded in {path:?}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skip_is_appended_to_the_log_named_by_the_environment() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            // skip() panics under CI by design; that path is the one checked here.
            let r = std::panic::catch_unwind(|| skip("t", "why"));
            assert!(r.is_err());
            return;
        }
        let dir = std::env::temp_dir().join(format!("kya-testkit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("skips");
        // The only test in this crate that sets the variable: no race with others.
        std::env::set_var(SKIP_LOG_ENV, &log);
        skip("first\ttest", "needs\nroot");
        skip("second", "needs bpf");
        std::env::remove_var(SKIP_LOG_ENV);
        let text = std::fs::read_to_string(&log).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(text, "first test\tneeds root\nsecond\tneeds bpf\n");
    }
}
