//! `kya ca init|cert|install`: the CLI edge of the CA (anyhow lives here only).

use super::trust_store::{instance_name, TrustStore};
use super::LocalCa;
use crate::cli::{CaAction, CaArgs};
use crate::config::Config;
use anyhow::Context;
use std::path::PathBuf;
use std::process::ExitCode;

/// Run one `kya ca` action.
pub fn run(args: CaArgs) -> anyhow::Result<ExitCode> {
    // The same resolution as `kya run`: the flag, else the default config
    // file's [state] dir, else /var/lib/kya; so `kya ca install` installs the
    // CA the daemon will actually use.
    let dir = |state_dir: Option<PathBuf>| -> anyhow::Result<PathBuf> {
        let args = crate::config::Overrides {
            state_dir,
            ..Default::default()
        };
        Ok(Config::load(&args)
            .context("resolving the state directory")?
            .state_dir)
    };
    match args.action {
        CaAction::Init { state_dir, force } => {
            let state_dir = dir(state_dir)?;
            let ca = LocalCa::init(&state_dir, force)?;
            println!(
                "created kya local CA {} at {}",
                ca.fingerprint(),
                ca.cert_path().display()
            );
            println!("next: `kya ca install` adds it to the system trust store");
        }
        CaAction::Cert { state_dir } => {
            let ca = LocalCa::load(&dir(state_dir)?)?;
            print!("{}", ca.cert_pem());
        }
        CaAction::Install {
            state_dir,
            uninstall,
        } => {
            let state_dir = dir(state_dir)?;
            let instance = instance_name(&state_dir);
            let cert_path = state_dir.join(super::CA_CERT_FILE);
            let store = TrustStore::detect(&cert_path)?;
            if uninstall {
                let anchor = store.anchor_path(&instance);
                if store
                    .uninstall(&instance)
                    .with_context(|| format!("removing {}", anchor.display()))?
                {
                    println!(
                        "removed {} and ran {}",
                        anchor.display(),
                        store.refresh.join(" ")
                    );
                } else {
                    println!("{} is not installed; nothing to do", anchor.display());
                }
            } else {
                let ca = LocalCa::load_or_init(&state_dir)?;
                let anchor = store
                    .install(&instance, ca.cert_pem())
                    .context("installing the CA into the system trust store")?;
                println!(
                    "installed kya local CA {} as {} and ran {}",
                    ca.fingerprint(),
                    anchor.display(),
                    store.refresh.join(" ")
                );
                print!("{}", store.runtime_hints(&anchor));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
