//! `kya run`: wire the redirect, the interceptor and the decision path together.

use crate::cli::RunArgs;
use crate::config::Config;
use anyhow::Context;
use std::process::ExitCode;

/// Run the daemon until SIGINT/SIGTERM.
pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&args).context("loading configuration")?;
    tracing::info!(?config, "configuration loaded");
    anyhow::bail!("the daemon is being assembled: redirect and interceptor are not wired yet")
}
