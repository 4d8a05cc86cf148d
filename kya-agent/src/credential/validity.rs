//! How long a credential may be valid: what the CLI, the control socket and
//! an approver's "for an hour" all parse.

use std::time::Duration;

/// Longest validity a standing credential gets: standing permissions are
/// meant for days ("until Friday"), not for ever.
pub const MAX_VALID_FOR: Duration = Duration::from_secs(366 * 24 * 3600);

/// A validity that is not a duration, is zero, or is over [`MAX_VALID_FOR`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct BadValidity(String);

/// Parse a validity such as `15m` or `4days`: more than zero, at most [`MAX_VALID_FOR`].
pub(crate) fn parse_valid_for(text: &str) -> Result<Duration, BadValidity> {
    let d = humantime::parse_duration(text)
        .map_err(|e| BadValidity(format!("valid_for {text:?}: {e}")))?;
    if d.is_zero() || d > MAX_VALID_FOR {
        return Err(BadValidity(
            "valid_for must be more than 0 and at most 366 days".into(),
        ));
    }
    Ok(d)
}
