//! TLS building blocks of the interceptor: classify and read the agent's
//! ClientHello, decide passthrough, connect upstream with verification, and
//! terminate the agent's TLS with a minted leaf speaking the upstream's ALPN.
//!
//! [`TlsContext`] bundles the shared, per-daemon pieces built from the config.

pub(crate) mod agreed_alpn;
pub mod client_hello;
pub mod leaf_cache;
pub mod passthrough;
pub mod terminate;
pub mod upstream;

use crate::ca::{CaError, LocalCa};
use crate::config::Config;
use std::num::NonZeroUsize;
use std::sync::Arc;

/// Errors building the TLS context at daemon start (each names its cause).
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("local CA: {0}")]
    Ca(#[from] CaError),
    #[error("intercept.passthrough: {0}")]
    Passthrough(#[from] passthrough::PatternError),
    #[error("upstream trust: {0}")]
    Upstream(#[from] upstream::UpstreamError),
}

/// The per-daemon TLS state every connection shares (all cheap to clone).
#[derive(Debug, Clone)]
pub struct TlsContext {
    pub ca: Arc<LocalCa>,
    pub terminator: terminate::Terminator,
    pub upstream: upstream::UpstreamConnector,
    pub passthrough: passthrough::Passthrough,
    /// What each upstream agreed last time (both handshakes of a new
    /// connection to a known upstream run at once).
    pub(crate) agreed_alpn: Arc<agreed_alpn::AgreedAlpn>,
}

impl TlsContext {
    /// Load (or create) the CA in `state_dir`, trust the system roots plus
    /// `--upstream-ca`, compile `intercept.passthrough`.
    pub fn from_config(config: &Config) -> Result<Self, TlsSetupError> {
        let passthrough = passthrough::Passthrough::new(&config.passthrough)?;
        let upstream =
            upstream::UpstreamConnector::with_system_roots(config.upstream_ca.as_deref())?;
        Self::new(
            &config.state_dir,
            upstream,
            passthrough,
            leaf_cache::DEFAULT_CAPACITY,
        )
    }

    /// Assemble from parts (tests pass a connector trusting only a test CA).
    pub fn new(
        state_dir: &std::path::Path,
        upstream: upstream::UpstreamConnector,
        passthrough: passthrough::Passthrough,
        cache_capacity: NonZeroUsize,
    ) -> Result<Self, TlsSetupError> {
        let ca = Arc::new(LocalCa::load_or_init(state_dir)?);
        let cache = leaf_cache::LeafCache::new(ca.clone(), cache_capacity);
        Ok(TlsContext {
            ca,
            terminator: terminate::Terminator::new(cache),
            upstream,
            passthrough,
            agreed_alpn: Arc::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FileConfig, InterceptSection};

    fn config(
        dir: &std::path::Path,
        passthrough: &[&str],
        upstream_ca: Option<std::path::PathBuf>,
    ) -> Config {
        let file = FileConfig {
            intercept: InterceptSection {
                passthrough: passthrough.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
            ..Default::default()
        };
        let args = crate::config::Overrides {
            state_dir: Some(dir.to_path_buf()),
            upstream_ca,
            ..Default::default()
        };
        Config::merge(file, &args).unwrap()
    }

    #[test]
    fn from_config_builds_everything_and_names_bad_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let extra = dir.path().join("extra.pem");
        let other = tempfile::tempdir().unwrap();
        std::fs::write(
            &extra,
            LocalCa::init(other.path(), false).unwrap().cert_pem(),
        )
        .unwrap();

        let ctx =
            TlsContext::from_config(&config(dir.path(), &["*.pinned.test"], Some(extra))).unwrap();
        assert!(ctx.passthrough.is_passthrough("a.pinned.test"));
        assert!(dir.path().join(crate::ca::CA_KEY_FILE).exists());
        assert_eq!(
            ctx.terminator.cache().capacity(),
            leaf_cache::DEFAULT_CAPACITY
        );

        assert!(matches!(
            TlsContext::from_config(&config(dir.path(), &["bad..pattern"], None)),
            Err(TlsSetupError::Passthrough(_))
        ));
        assert!(matches!(
            TlsContext::from_config(&config(dir.path(), &[], Some(dir.path().join("nope.pem")))),
            Err(TlsSetupError::Upstream(_))
        ));
    }
}
