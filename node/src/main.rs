//! `corvid`: wires the command line to the library; errors become exit codes here.

use std::process::ExitCode;

use clap::Parser;
use corvid_node::cli::{Cli, init_tracing, run};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli.log);
    // The executor confines itself while it is still one thread: before any runtime starts.
    #[cfg(target_os = "linux")]
    if let corvid_node::cli::Command::Executor(args) = cli.command {
        return corvid_node::sandbox::child::main(args);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
