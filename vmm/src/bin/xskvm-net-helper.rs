//! The `xskvm-net-helper` command: see `vmm::net_helper`.

use std::process::ExitCode;

use clap::Parser;
use vmm::net_helper::{self, HelperArgs};

fn main() -> ExitCode {
    let args = HelperArgs::parse();
    env_logger::Builder::new()
        .filter_level(args.log_level)
        .format_timestamp_millis()
        .init();
    // Returns only when it could not exec xskvm.
    let error = net_helper::run(args);
    eprintln!("xskvm-net-helper: {error}");
    ExitCode::FAILURE
}
