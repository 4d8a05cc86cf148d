//! Names on this host: its own (what credentials bind to and decision
//! records carry) and its users' (who answered, issued or suspended).

/// This host's name: what credentials bind to (`environment.host`) and what
/// decision records carry.
pub(crate) fn host_name() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "localhost".into())
}

/// The user name of a uid, from the system's user database.
pub(crate) fn user_name(uid: u32) -> Option<String> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
}
