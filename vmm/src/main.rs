//! The `xskvm` command.

use std::process::ExitCode;

use clap::Parser;
use vmm::cli::Args;
use vmm::vm::{self, VmConfig, VmExit};

fn main() -> ExitCode {
    let args = Args::parse();
    env_logger::Builder::new()
        .filter_level(args.log_level)
        // virtio-queue logs every bad ring or descriptor a guest hands it,
        // unlimited; the devices report those themselves, rate-limited.
        .filter_module("virtio_queue", log::LevelFilter::Off)
        .format_timestamp_millis()
        .init();

    let mut config = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        memory: args.memory,
        vcpus: args.vcpus,
        kvm_device: args.kvm_device,
        nets: Vec::new(),
    };
    // Bad paths and sizes are reported before any XDP program is attached.
    if let Err(e) = vm::check_config(&config) {
        eprintln!("xskvm: {e}");
        return ExitCode::FAILURE;
    }
    for (index, spec) in args.net.iter().enumerate() {
        match vmm::afxdp::open_net_device(index, spec) {
            Ok(device) => config.nets.push(device),
            Err(e) => {
                eprintln!("xskvm: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    match vm::run(config) {
        Ok(exit) => {
            let how = match exit {
                VmExit::PowerOff => "guest powered off".to_string(),
                VmExit::Reset => "guest rebooted".to_string(),
                VmExit::Quit => "quit from the console".to_string(),
                VmExit::Signal(sig) => format!("stopped by signal {sig}"),
            };
            log::info!("{how}; peak RSS {}", peak_rss());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("xskvm: {e}");
            ExitCode::FAILURE
        }
    }
}

/// VmHWM from /proc/self/status: what the guest and xskvm touched at most.
fn peak_rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}
