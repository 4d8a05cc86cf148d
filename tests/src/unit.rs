//! systemd unit files as the tests read them: the assignments of one
//! section, every assignment of each key in order (systemd's own semantics for
//! list settings such as `SystemCallFilter=`, where later lines add to or take
//! from earlier ones).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The shipped unit, `packaging/kya.service`.
pub fn shipped_unit() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/kya.service")
}

/// The assignments of the `[section]` section: every value of each key, in order.
/// Comments and blank lines are skipped; a line without `=` is ignored.
pub fn section_settings(text: &str, section: &str) -> BTreeMap<String, Vec<String>> {
    let header = format!("[{section}]");
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut inside = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            inside = line == header;
            continue;
        }
        if !inside || line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            out.entry(k.trim().to_string())
                .or_default()
                .push(v.trim().to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_every_assignment_of_a_key_and_only_the_named_section() {
        let text = "[Unit]\nDescription=x\n[Service]\n# c\nA=1\n\nA=~2\nB = b c \n[Install]\nA=3\n";
        let s = section_settings(text, "Service");
        assert_eq!(s["A"], vec!["1", "~2"]);
        assert_eq!(s["B"], vec!["b c"]);
        assert!(!s.contains_key("Description"));
        assert!(section_settings(text, "Nope").is_empty());
    }
}
