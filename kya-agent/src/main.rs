//! The `kya` binary: parse the command line, set up logging, dispatch.

use clap::Parser;
use kya_agent::cli::{Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    kya_agent::cli::init_tracing(cli.log_format);
    let result = match cli.command {
        Command::Run(args) => kya_agent::daemon::run(args),
        Command::Ca(args) => kya_agent::ca::command::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("kya: error: {err:#}");
            std::process::ExitCode::from(1)
        }
    }
}
