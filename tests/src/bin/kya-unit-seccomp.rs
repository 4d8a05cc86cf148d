//! `kya-unit-seccomp UNIT -- COMMAND [ARGS...]`: runs COMMAND under the
//! system call filters systemd installs for the `[Service]` settings of
//! UNIT, for machines where PID 1 is not systemd.
//!
//! It emulates, with libseccomp (what systemd itself uses) and the group
//! definitions of the local systemd (`systemd-analyze syscall-filter`):
//! `SystemCallFilter=` (every line, in order: an allow list, `@default`
//! included, minus later `~` lines), `SystemCallErrorNumber=`,
//! `SystemCallArchitectures=native`, `MemoryDenyWriteExecute=`,
//! `RestrictAddressFamilies=`, `RestrictNamespaces=`, `LockPersonality=`,
//! `RestrictRealtime=` and `RestrictSUIDSGID=`, each with systemd's rules
//! and errors (`EPERM`, `EAFNOSUPPORT`, `ENOSYS` for `clone3`/`openat2`).
//! A value of one of these settings it cannot emulate is an error, never
//! skipped. The caller sets `no_new_privs` first (as `NoNewPrivileges=`
//! does), or runs as root.

use anyhow::{bail, Context, Result};
use kya_e2e::unit::section_settings;
use libseccomp::{scmp_cmp, ScmpAction, ScmpArgCompare, ScmpFilterContext, ScmpSyscall};
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        // `run` only returns when exec failed or the unit could not be applied.
        Ok(never) => match never {},
        Err(e) => {
            eprintln!("kya-unit-seccomp: {e:#}");
            ExitCode::from(125)
        }
    }
}

enum Never {}

fn run(args: &[String]) -> Result<Never> {
    let (unit, command) = match args {
        [unit, sep, command @ ..] if sep == "--" && !command.is_empty() => (unit, command),
        _ => bail!("usage: kya-unit-seccomp UNIT -- COMMAND [ARGS...]"),
    };
    let text = std::fs::read_to_string(unit).with_context(|| format!("reading {unit}"))?;
    let settings = section_settings(&text, "Service");
    for (i, filter) in filters_of(&settings)?.into_iter().enumerate() {
        filter
            .load()
            .with_context(|| format!("loading seccomp filter {i}"))?;
    }
    let err = Command::new(&command[0]).args(&command[1..]).exec();
    bail!("exec {}: {err}", command[0])
}

/// The one value of a setting systemd reads as a boolean, or false.
fn flag(s: &BTreeMap<String, Vec<String>>, key: &str) -> Result<bool> {
    match s.get(key).and_then(|v| v.last()).map(String::as_str) {
        None | Some("no" | "false" | "0" | "off") => Ok(false),
        Some("yes" | "true" | "1" | "on") => Ok(true),
        Some(other) => bail!("{key}={other}: not a boolean"),
    }
}

/// Every filter the settings ask for, in the order they are loaded.
fn filters_of(s: &BTreeMap<String, Vec<String>>) -> Result<Vec<ScmpFilterContext>> {
    let mut out = Vec::new();
    if flag(s, "MemoryDenyWriteExecute")? {
        out.push(deny_write_execute()?);
    }
    if let Some(lines) = s.get("RestrictAddressFamilies") {
        out.push(address_families(lines)?);
    }
    if let Some(lines) = s.get("RestrictNamespaces") {
        if let Some(f) = namespaces(lines)? {
            out.push(f);
        }
    }
    if flag(s, "LockPersonality")? {
        out.push(lock_personality()?);
    }
    if flag(s, "RestrictRealtime")? {
        out.push(restrict_realtime()?);
    }
    if flag(s, "RestrictSUIDSGID")? {
        out.push(restrict_suid_sgid()?);
    }
    // Last, as systemd does: it may refuse seccomp() itself.
    if let Some(lines) = s.get("SystemCallFilter") {
        match s.get("SystemCallArchitectures").map(Vec::as_slice) {
            Some([a]) if a == "native" => {}
            other => bail!("SystemCallArchitectures={other:?}: only `native` is emulated"),
        }
        let errno = match s.get("SystemCallErrorNumber").and_then(|v| v.last()) {
            None => None,
            Some(name) => Some(errno_named(name)?),
        };
        out.push(syscall_filter(lines, errno)?);
    }
    Ok(out)
}

fn errno_named(name: &str) -> Result<i32> {
    Ok(match name {
        "EPERM" => libc::EPERM,
        "EACCES" => libc::EACCES,
        "ENOSYS" => libc::ENOSYS,
        "EINVAL" => libc::EINVAL,
        other => bail!("SystemCallErrorNumber={other}: not emulated"),
    })
}

/// The groups as the local systemd defines them: `@name` lines, each
/// followed by its members (system calls and other groups), indented.
fn syscall_groups() -> Result<BTreeMap<String, Vec<String>>> {
    let out = Command::new("systemd-analyze")
        .args(["syscall-filter", "--no-pager"])
        .output()
        .context("running systemd-analyze syscall-filter")?;
    if !out.status.success() {
        bail!("systemd-analyze syscall-filter: {}", out.status);
    }
    let text = String::from_utf8(out.stdout).context("systemd-analyze's output")?;
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if line.starts_with('@') {
            current = Some(line.trim().to_string());
            groups.entry(line.trim().to_string()).or_default();
        } else if line.starts_with(' ') {
            let item = line.trim();
            if item.is_empty() || item.starts_with('#') {
                continue;
            }
            if let Some(g) = &current {
                groups.entry(g.clone()).or_default().push(item.to_string());
            }
        } else {
            current = None;
        }
    }
    if !groups.contains_key("@system-service") || !groups.contains_key("@default") {
        bail!("systemd-analyze syscall-filter listed no @system-service or @default");
    }
    Ok(groups)
}

/// `name` (a system call or a `@group`, recursively) as system call names.
fn expand(
    name: &str,
    groups: &BTreeMap<String, Vec<String>>,
    out: &mut BTreeSet<String>,
    depth: usize,
) -> Result<()> {
    if depth > 16 {
        bail!("system call groups nest too deep at {name}");
    }
    if name.starts_with('@') {
        let members = groups
            .get(name)
            .with_context(|| format!("no system call group {name}"))?;
        for m in members {
            expand(m, groups, out, depth + 1)?;
        }
    } else {
        out.insert(name.to_string());
    }
    Ok(())
}

/// `SystemCallFilter=` lines as systemd's parser reads them: the first line
/// decides between an allow list (`@default` added) and a deny list (`~`);
/// later lines of the same kind add to it, of the other kind take from it.
fn filter_set(
    lines: &[String],
    groups: &BTreeMap<String, Vec<String>>,
) -> Result<(bool, BTreeSet<String>)> {
    let mut set = BTreeSet::new();
    let mut allow_list = None;
    for (i, line) in lines.iter().enumerate() {
        let (invert, rest) = match line.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, line.as_str()),
        };
        let allow = *allow_list.get_or_insert(!invert);
        let mut names = BTreeSet::new();
        if i == 0 && allow {
            expand("@default", groups, &mut names, 0)?;
        }
        for item in rest.split_whitespace() {
            if item.contains(':') {
                bail!("SystemCallFilter= item {item}: per-call error numbers are not emulated");
            }
            expand(item, groups, &mut names, 0)?;
        }
        // Same kind as the first line (allow, or ~deny): adds.
        if invert != allow {
            set.extend(names);
        } else {
            set.retain(|n| !names.contains(n));
        }
    }
    Ok((allow_list.unwrap_or(true), set))
}

/// Adds a rule, skipping calls libseccomp does not know, and calls this
/// architecture does not have (its `EDOM` for a pseudo call), as systemd does.
fn add(
    f: &mut ScmpFilterContext,
    action: ScmpAction,
    name: &str,
    cmp: &[ScmpArgCompare],
) -> Result<()> {
    let Ok(call) = ScmpSyscall::from_name(name) else {
        return Ok(());
    };
    let added = if cmp.is_empty() {
        f.add_rule_exact(action, call)
    } else {
        f.add_rule_conditional_exact(action, call, cmp)
    };
    match added {
        Ok(_) => Ok(()),
        Err(e) if matches!(e.errno(), Some(libseccomp::error::SeccompErrno::EDOM)) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("a rule for {name}")),
    }
}

fn syscall_filter(lines: &[String], errno: Option<i32>) -> Result<ScmpFilterContext> {
    let groups = syscall_groups()?;
    let (allow_list, set) = filter_set(lines, &groups)?;
    let refuse = match errno {
        Some(e) => ScmpAction::Errno(e),
        None => ScmpAction::KillProcess,
    };
    let (default, action) = if allow_list {
        (refuse, ScmpAction::Allow)
    } else {
        (ScmpAction::Allow, refuse)
    };
    let mut f = ScmpFilterContext::new(default).context("a seccomp filter")?;
    for name in &set {
        add(&mut f, action, name, &[])?;
    }
    Ok(f)
}

fn allow_by_default() -> Result<ScmpFilterContext> {
    ScmpFilterContext::new(ScmpAction::Allow).context("a seccomp filter")
}

/// `MemoryDenyWriteExecute=yes`: no mapping both writable and executable, and
/// no page made executable later.
fn deny_write_execute() -> Result<ScmpFilterContext> {
    let mut f = allow_by_default()?;
    let eperm = ScmpAction::Errno(libc::EPERM);
    let wx = (libc::PROT_WRITE | libc::PROT_EXEC) as u64;
    let x = libc::PROT_EXEC as u64;
    add(&mut f, eperm, "mmap", &[scmp_cmp!($arg2 & wx == wx)])?;
    add(&mut f, eperm, "mprotect", &[scmp_cmp!($arg2 & x == x)])?;
    add(&mut f, eperm, "pkey_mprotect", &[scmp_cmp!($arg2 & x == x)])?;
    let shm_exec = libc::SHM_EXEC as u64;
    add(
        &mut f,
        eperm,
        "shmat",
        &[scmp_cmp!($arg2 & shm_exec == shm_exec)],
    )?;
    Ok(f)
}

/// `RestrictAddressFamilies=` (an allow list): `socket()` of any other family
/// fails with `EAFNOSUPPORT`.
fn address_families(lines: &[String]) -> Result<ScmpFilterContext> {
    let mut allowed = BTreeSet::new();
    for line in lines {
        if line.starts_with('~') || line == "none" {
            bail!("RestrictAddressFamilies={line}: only an allow list is emulated");
        }
        for name in line.split_whitespace() {
            allowed.insert(match name {
                "AF_UNIX" => libc::AF_UNIX,
                "AF_INET" => libc::AF_INET,
                "AF_INET6" => libc::AF_INET6,
                "AF_NETLINK" => libc::AF_NETLINK,
                "AF_PACKET" => libc::AF_PACKET,
                other => bail!("RestrictAddressFamilies: {other} is not in the emulator's table"),
            } as u64);
        }
    }
    let mut f = allow_by_default()?;
    let refuse = ScmpAction::Errno(libc::EAFNOSUPPORT);
    // Every family the kernel has (AF_MAX is below 64), and anything above.
    const FAMILIES: u64 = 64;
    for family in (0..FAMILIES).filter(|f| !allowed.contains(f)) {
        add(&mut f, refuse, "socket", &[scmp_cmp!($arg0 == family)])?;
    }
    add(&mut f, refuse, "socket", &[scmp_cmp!($arg0 >= FAMILIES)])?;
    Ok(f)
}

const NAMESPACES: [(&str, u64); 8] = [
    ("cgroup", libc::CLONE_NEWCGROUP as u64),
    ("ipc", libc::CLONE_NEWIPC as u64),
    ("net", libc::CLONE_NEWNET as u64),
    ("mnt", libc::CLONE_NEWNS as u64),
    ("pid", libc::CLONE_NEWPID as u64),
    ("user", libc::CLONE_NEWUSER as u64),
    ("uts", libc::CLONE_NEWUTS as u64),
    ("time", 0x80),
];

/// `RestrictNamespaces=`: `unshare`, `clone` and `setns` of any namespace
/// kind not kept fail with `EPERM`, as does `setns` with no kind named;
/// `clone3` (whose flags a filter cannot read) fails with `ENOSYS`, so the
/// C library falls back to `clone`.
fn namespaces(lines: &[String]) -> Result<Option<ScmpFilterContext>> {
    let all = NAMESPACES.iter().fold(0, |a, (_, f)| a | f);
    let mut keep: u64 = 0;
    for line in lines {
        match line.as_str() {
            "no" | "false" => keep = all,
            "yes" | "true" => keep = 0,
            l if l.starts_with('~') => bail!("RestrictNamespaces={l}: not emulated"),
            l => {
                for name in l.split_whitespace() {
                    let (_, f) = NAMESPACES
                        .iter()
                        .find(|(n, _)| *n == name)
                        .with_context(|| format!("RestrictNamespaces: no namespace {name}"))?;
                    keep |= f;
                }
            }
        }
    }
    if keep & all == all {
        return Ok(None);
    }
    let mut f = allow_by_default()?;
    let eperm = ScmpAction::Errno(libc::EPERM);
    if keep == 0 {
        add(&mut f, eperm, "setns", &[])?;
    } else {
        add(&mut f, eperm, "setns", &[scmp_cmp!($arg1 == 0)])?;
    }
    for (_, flag) in NAMESPACES.iter().filter(|(_, f)| keep & f == 0) {
        let flag = *flag;
        add(&mut f, eperm, "unshare", &[scmp_cmp!($arg0 & flag == flag)])?;
        add(&mut f, eperm, "clone", &[scmp_cmp!($arg0 & flag == flag)])?;
        if keep != 0 {
            add(&mut f, eperm, "setns", &[scmp_cmp!($arg1 & flag == flag)])?;
        }
    }
    add(&mut f, ScmpAction::Errno(libc::ENOSYS), "clone3", &[])?;
    Ok(Some(f))
}

/// `LockPersonality=yes`: the execution domain stays what it is now (a
/// query, `personality(0xffffffff)`, is refused too, as under systemd).
fn lock_personality() -> Result<ScmpFilterContext> {
    // SAFETY: personality(0xffffffff) only reads the current persona.
    let current = unsafe { libc::personality(0xffff_ffff) };
    if current < 0 {
        bail!(
            "reading the personality: {}",
            std::io::Error::last_os_error()
        );
    }
    let current = current as u64;
    let mut f = allow_by_default()?;
    add(
        &mut f,
        ScmpAction::Errno(libc::EPERM),
        "personality",
        &[scmp_cmp!($arg0 != current)],
    )?;
    Ok(f)
}

/// `RestrictRealtime=yes`: no real-time scheduling policy.
fn restrict_realtime() -> Result<ScmpFilterContext> {
    let mut f = allow_by_default()?;
    let eperm = ScmpAction::Errno(libc::EPERM);
    let mask = !(libc::SCHED_RESET_ON_FORK as u64) & 0xffff_ffff;
    for policy in [
        libc::SCHED_FIFO,
        libc::SCHED_RR,
        6, /* SCHED_DEADLINE */
    ] {
        let policy = policy as u64;
        add(
            &mut f,
            eperm,
            "sched_setscheduler",
            &[scmp_cmp!($arg1 & mask == policy)],
        )?;
    }
    Ok(f)
}

/// `RestrictSUIDSGID=yes`: no file made set-user-ID or set-group-ID
/// (executable by its group), by `chmod` or by creating it so;
/// `openat2` (whose mode a filter cannot read) fails with `ENOSYS`.
fn restrict_suid_sgid() -> Result<ScmpFilterContext> {
    let mut f = allow_by_default()?;
    let eperm = ScmpAction::Errno(libc::EPERM);
    let suid = libc::S_ISUID as u64;
    let sgid = (libc::S_ISGID | libc::S_IXGRP) as u64;
    let creat = libc::O_CREAT as u64;
    for (call, mode_arg, flags_arg) in [
        ("chmod", 1u32, None),
        ("fchmod", 1, None),
        ("fchmodat", 2, None),
        ("creat", 1, None),
        ("open", 2, Some(1u32)),
        ("openat", 3, Some(2)),
    ] {
        for bits in [suid, sgid] {
            let mut cmp = vec![ScmpArgCompare::new(
                mode_arg,
                libseccomp::ScmpCompareOp::MaskedEqual(bits),
                bits,
            )];
            if let Some(flags) = flags_arg {
                cmp.push(ScmpArgCompare::new(
                    flags,
                    libseccomp::ScmpCompareOp::MaskedEqual(creat),
                    creat,
                ));
            }
            add(&mut f, eperm, call, &cmp)?;
        }
    }
    add(&mut f, ScmpAction::Errno(libc::ENOSYS), "openat2", &[])?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups() -> BTreeMap<String, Vec<String>> {
        let g = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        BTreeMap::from([
            ("@default".to_string(), g(&["execve", "exit"])),
            ("@resources".to_string(), g(&["setrlimit", "prlimit64"])),
            ("@inner".to_string(), g(&["read", "@resources"])),
            (
                "@system-service".to_string(),
                g(&["@default", "@inner", "bpf_not"]),
            ),
        ])
    }

    fn lines(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn an_allow_list_gets_default_and_loses_what_later_lines_take() {
        let (allow, set) =
            filter_set(&lines(&["@inner bpf", "~@resources"]), &groups()).expect("parsed");
        assert!(allow);
        let want: BTreeSet<String> = ["bpf", "execve", "exit", "read"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(set, want);
    }

    #[test]
    fn a_deny_list_first_stays_a_deny_list() {
        let (allow, set) =
            filter_set(&lines(&["~@resources", "setrlimit"]), &groups()).expect("parsed");
        assert!(!allow);
        assert_eq!(set.into_iter().collect::<Vec<_>>(), vec!["prlimit64"]);
    }

    #[test]
    fn unknown_groups_and_per_call_errors_are_refused() {
        assert!(filter_set(&lines(&["@nope"]), &groups()).is_err());
        assert!(filter_set(&lines(&["read:EACCES"]), &groups()).is_err());
    }

    #[test]
    fn settings_it_cannot_emulate_are_refused() {
        assert!(address_families(&lines(&["~AF_PACKET"])).is_err());
        assert!(address_families(&lines(&["AF_BLUETOOTH"])).is_err());
        assert!(namespaces(&lines(&["~net"])).is_err());
        assert!(namespaces(&lines(&["nets"])).is_err());
        assert!(errno_named("EWHATEVER").is_err());
        let s = BTreeMap::from([("LockPersonality".to_string(), lines(&["maybe"]))]);
        assert!(flag(&s, "LockPersonality").is_err());
    }
}
