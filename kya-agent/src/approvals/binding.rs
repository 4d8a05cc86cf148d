//! Binding messages: a short code shown to the approver (in the CLI, in the
//! CIBA push) and written to the audit log, so a human can tell that *this*
//! prompt is about *this* call.

use rand::Rng;

/// Letters and digits that cannot be confused when read aloud or on a phone
/// (no 0/O, 1/I/L, 5/S, 2/Z, 8/B).
const ALPHABET: &[u8] = b"ACDEFGHJKMNPQRTUVWXY34679";

/// A fresh code such as `KYA-7MQC-ART4`: 8 symbols of a 25-letter alphabet,
/// about 37 bits, plenty for telling concurrent prompts apart.
pub(crate) fn new_code() -> String {
    let mut rng = rand::thread_rng();
    let mut sym = || ALPHABET[rng.gen_range(0..ALPHABET.len())] as char;
    let a: String = (0..4).map(|_| sym()).collect();
    let b: String = (0..4).map(|_| sym()).collect();
    format!("KYA-{a}-{b}")
}

/// The human-readable binding message: the code plus what is being approved,
/// bounded and plain ASCII (CIBA providers display it on small screens).
pub(crate) fn message(code: &str, agent: &str, tool: &str) -> String {
    let clean = |s: &str, max: usize| -> String {
        s.chars()
            .filter(|c| c.is_ascii_graphic() || *c == ' ')
            .take(max)
            .collect()
    };
    format!("{code} {} wants {}", clean(agent, 32), clean(tool, 48))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_have_the_documented_shape_and_differ() {
        let a = new_code();
        assert_eq!(a.len(), 13);
        assert!(a.starts_with("KYA-"));
        assert!(a[4..]
            .chars()
            .all(|c| c == '-' || ALPHABET.contains(&(c as u8))));
        let many: std::collections::HashSet<String> = (0..1000).map(|_| new_code()).collect();
        assert_eq!(many.len(), 1000);
    }

    #[test]
    fn messages_strip_control_and_non_ascii_and_are_bounded() {
        let m = message("KYA-AAAA-CCCC", "bot\u{1b}[31m\n", &"x".repeat(500));
        assert!(m.is_ascii());
        assert!(!m.contains('\n') && !m.contains('\u{1b}'));
        assert!(m.len() < 120, "{}", m.len());
    }
}
