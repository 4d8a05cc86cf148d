//! What the running daemon may do: its uids, gids and capability sets, as the
//! kernel reports them in `/proc/self/status` (for `kya status`, and to check
//! that capabilities were dropped).

use serde::Serialize;

/// Capability names by bit number (`linux/capability.h`).
const CAP_NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The daemon's privileges (the `privileges` section of `kya status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Privileges {
    /// Real, effective, saved and file-system uid.
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    pub groups: Vec<u32>,
    /// Effective capabilities: what the daemon may use now.
    pub effective: Vec<String>,
    /// The bounding set: the most it could ever regain.
    pub bounding: Vec<String>,
    pub ambient: Vec<String>,
    pub no_new_privs: bool,
}

/// The bit number of a capability name (`CAP_BPF` is 39).
#[cfg(test)]
pub(crate) fn bit(name: &str) -> Option<usize> {
    CAP_NAMES.iter().position(|n| *n == name)
}

/// Names of the bits set in a capability mask (unknown bits as `cap_N`).
fn names(mask: u64) -> Vec<String> {
    (0..64)
        .filter(|bit| mask & (1u64 << bit) != 0)
        .map(|bit| match CAP_NAMES.get(bit) {
            Some(n) => (*n).to_string(),
            None => format!("cap_{bit}"),
        })
        .collect()
}

/// A thread's capability sets as masks, and `no_new_privs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Masks {
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
    pub bounding: u64,
    pub ambient: u64,
    pub no_new_privs: bool,
}

/// A `Name:\tvalue` line of a `/proc/PID/status` text.
fn field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// The capability masks of a `/proc/PID/status` text; `None` when a set it
/// needs is missing or malformed.
pub(crate) fn parse_masks(text: &str) -> Option<Masks> {
    let mask = |name: &str| u64::from_str_radix(field(text, name)?, 16).ok();
    Some(Masks {
        effective: mask("CapEff")?,
        permitted: mask("CapPrm")?,
        inheritable: mask("CapInh")?,
        bounding: mask("CapBnd")?,
        ambient: mask("CapAmb").unwrap_or(0),
        no_new_privs: field(text, "NoNewPrivs") == Some("1"),
    })
}

/// Parse the text of a `/proc/PID/status` file; `None` when a line it needs
/// is missing or malformed.
pub(crate) fn parse_status(text: &str) -> Option<Privileges> {
    let ids = |name: &str| -> Option<Vec<u32>> {
        field(text, name)?
            .split_whitespace()
            .map(|v| v.parse().ok())
            .collect()
    };
    let m = parse_masks(text)?;
    Some(Privileges {
        uids: ids("Uid")?,
        gids: ids("Gid")?,
        groups: ids("Groups").unwrap_or_default(),
        effective: names(m.effective),
        bounding: names(m.bounding),
        ambient: names(m.ambient),
        no_new_privs: m.no_new_privs,
    })
}

/// This process's privileges now, as JSON (an `error` when unreadable).
pub(crate) fn own() -> serde_json::Value {
    match std::fs::read_to_string("/proc/self/status") {
        Ok(text) => match parse_status(&text) {
            Some(p) => serde_json::json!(p),
            None => serde_json::json!({"error": "unexpected /proc/self/status"}),
        },
        Err(e) => serde_json::json!({"error": format!("/proc/self/status: {e}")}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tkya\nUid:\t998\t998\t998\t998\nGid:\t997\t997\t997\t997\n\
Groups:\t1001 \nNoNewPrivs:\t1\nCapInh:\t000000c000281400\nCapPrm:\t000000c000281400\n\
CapEff:\t000000c000281400\nCapBnd:\t000000c000281400\nCapAmb:\t000000c000281400\n";

    #[test]
    fn the_units_user_and_capabilities_are_read_by_name() {
        let p = parse_status(STATUS).unwrap();
        assert_eq!(p.uids, vec![998; 4]);
        assert_eq!(p.gids, vec![997; 4]);
        assert_eq!(p.groups, vec![1001]);
        assert!(p.no_new_privs);
        assert_eq!(
            p.effective,
            [
                "CAP_NET_BIND_SERVICE",
                "CAP_NET_ADMIN",
                "CAP_SYS_PTRACE",
                "CAP_SYS_ADMIN",
                "CAP_PERFMON",
                "CAP_BPF"
            ]
        );
        assert_eq!(p.bounding, p.effective);
        assert_eq!(names(1 << 50), ["cap_50"]);
    }

    #[test]
    fn a_malformed_status_is_none_not_a_guess() {
        assert_eq!(parse_status(""), None);
        assert_eq!(
            parse_status("Uid:\tx\nGid:\t0\nCapInh:\t0\nCapPrm:\t0\nCapEff:\t0\nCapBnd:\t0\n"),
            None
        );
        assert_eq!(
            parse_status("Uid:\t0\nGid:\t0\nCapInh:\t0\nCapPrm:\t0\nCapEff:\tzz\nCapBnd:\t0\n"),
            None
        );
        let root = parse_status(
            "Uid:\t0\t0\t0\t0\nGid:\t0\nCapInh:\t0\nCapPrm:\t0\nCapEff:\t0\nCapBnd:\t1ffffffffff\n",
        )
        .unwrap();
        assert!(root.effective.is_empty());
        assert_eq!(root.bounding.len(), 41);
        assert!(!root.no_new_privs);
        // Every set is needed to tell whether capabilities were dropped.
        assert_eq!(
            parse_masks("CapInh:\t0\nCapEff:\t0\nCapBnd:\t0\nNoNewPrivs:\t1\n"),
            None
        );
    }

    #[test]
    fn masks_are_read_as_the_kernel_wrote_them() {
        let m = parse_masks(STATUS).unwrap();
        assert_eq!(m.effective, 0xc0_0028_1400);
        assert_eq!(m.permitted, m.effective);
        assert_eq!(m.inheritable, m.effective);
        assert_eq!(m.bounding, m.effective);
        assert_eq!(m.ambient, m.effective);
        assert!(m.no_new_privs);
        assert_eq!(m.effective, crate::capdrop::KEEP);
    }

    #[test]
    fn this_process_reports_something() {
        let v = own();
        assert!(v.get("uids").is_some(), "{v}");
    }
}
