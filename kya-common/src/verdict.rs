//! The outcome of a policy decision.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// What kya does with a call.
///
/// Ordered by precedence: `Deny > Hold > Allow` (`Ord` follows it), so the
/// strongest verdict among matching rules is `max()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Forward the call.
    Allow,
    /// Keep the call open and ask its owner.
    Hold,
    /// Answer the agent with a denial.
    Deny,
}

impl Verdict {
    /// The lowercase name used in policies, JSON and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Hold => "hold",
            Verdict::Deny => "deny",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error for a string that names no verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownVerdict(pub String);

impl fmt::Display for UnknownVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown verdict {:?} (expected allow, deny or hold)",
            self.0
        )
    }
}

impl std::error::Error for UnknownVerdict {}

impl FromStr for Verdict {
    type Err = UnknownVerdict;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "allow" => Ok(Verdict::Allow),
            "hold" => Ok(Verdict::Hold),
            "deny" => Ok(Verdict::Deny),
            other => Err(UnknownVerdict(other.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_is_deny_hold_allow() {
        assert!(Verdict::Deny > Verdict::Hold);
        assert!(Verdict::Hold > Verdict::Allow);
        let all = [Verdict::Allow, Verdict::Deny, Verdict::Hold];
        assert_eq!(all.iter().max(), Some(&Verdict::Deny));
    }

    #[test]
    fn names_round_trip_and_reject_others() {
        for v in [Verdict::Allow, Verdict::Hold, Verdict::Deny] {
            assert_eq!(v.as_str().parse::<Verdict>(), Ok(v));
            assert_eq!(serde_json::to_string(&v).unwrap(), format!("\"{v}\""));
        }
        assert!("Allow".parse::<Verdict>().is_err());
        assert!("".parse::<Verdict>().is_err());
        assert!(serde_json::from_str::<Verdict>("\"permit\"").is_err());
    }
}
