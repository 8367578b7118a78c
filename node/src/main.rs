//! `corvid`: wires the command line to the library; errors become exit codes here.

use std::process::ExitCode;

use clap::Parser;
use corvid_node::cli::{Cli, init_tracing, run};

fn main() -> ExitCode {
    quiet_device_select();
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

/// Mesa's Vulkan device-selection layer (an implicit layer every Vulkan program loads) connects
/// to a Wayland display to find the default GPU, and libwayland prints "XDG_RUNTIME_DIR is
/// invalid" on a machine without a desktop session, twice per start. Corvid picks its adapter
/// itself, so the layer has nothing to do here: it is turned off, the way its manifest
/// provides, unless the user set the variable.
fn quiet_device_select() {
    const VAR: &str = "NODEVICE_SELECT";
    if std::env::var_os(VAR).is_none() {
        // SAFETY: the first thing `main` does, while this process has one thread: nothing can
        // read the environment concurrently. The executor processes inherit it.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var(VAR, "1");
        }
    }
}
