//! The `kya` binary: parse the command line, set up logging, dispatch.

use clap::Parser;
use kya_agent::cli::{Cli, Command};

#[global_allocator]
static ALLOCATOR: kya_agent::allocator::Allocator = mimalloc::MiMalloc;

/// The allocator's options are set by an ELF constructor, before the Rust
/// runtime's first allocation (options read at mimalloc's start-up, such as
/// eager arena commit, are not changed later).
#[used]
#[link_section = ".init_array"]
static CONFIGURE_ALLOCATOR: extern "C" fn() = configure_allocator;

extern "C" fn configure_allocator() {
    kya_agent::allocator::configure();
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    kya_agent::cli::init_tracing(cli.log_format);
    let result = match cli.command {
        Command::Run(args) => kya_agent::daemon::run(*args),
        Command::Approvals(args) => {
            use kya_agent::approvals::command;
            use kya_agent::cli::ApprovalsCommand as A;
            let dir = &args.state.state_dir;
            match args.command {
                A::List { json } => command::list(dir, json),
                A::Approve {
                    id,
                    reason,
                    standing_for,
                } => command::answer(dir, &id, true, reason.as_deref(), standing_for.as_deref()),
                A::Deny { id, reason } => command::answer(dir, &id, false, reason.as_deref(), None),
            }
        }
        Command::Events(args) => kya_agent::decision::events::command::run(
            &args.state.state_dir,
            kya_agent::decision::events::command::EventsQuery {
                follow: args.follow,
                json: args.json,
                pid: args.pid,
                agent: args.agent.as_deref(),
                verdict: args.verdict.as_deref(),
                since: args.since.as_deref(),
            },
        ),
        Command::Agents(args) => {
            use kya_agent::agents::command;
            use kya_agent::cli::AgentsCommand as A;
            let dir = &args.state.state_dir;
            match args.command {
                A::List { json } => command::list(dir, json),
                A::Suspend { name } => command::set(dir, &name, true),
                A::Resume { name } => command::set(dir, &name, false),
            }
        }
        Command::Tools(args) => {
            use kya_agent::cli::ToolsCommand as T;
            use kya_agent::pins::command;
            let dir = &args.state.state_dir;
            match args.command {
                T::List { server, json } => command::list(dir, server.as_deref(), json),
                T::Diff { server, tool, json } => {
                    command::diff(dir, server.as_deref(), tool.as_deref(), json)
                }
                T::Accept { server, tools } => command::accept(dir, &server, &tools),
            }
        }
        Command::Status(args) => kya_agent::status::command::run(&args.state.state_dir, args.json),
        Command::Ca(args) => kya_agent::ca::command::run(args),
        Command::Policy(args) => kya_agent::policy::command::run(args),
        Command::Credential(cmd) => kya_agent::credential::command::run(*cmd),
        Command::Audit(args) => kya_agent::audit::command::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("kya: error: {err:#}");
            std::process::ExitCode::from(1)
        }
    }
}
