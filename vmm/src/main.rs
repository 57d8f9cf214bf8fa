//! The `xskvm` command.

use std::process::ExitCode;

use clap::Parser;
use vmm::cli::Args;
use vmm::net::NetSpec;
use vmm::vm::{self, GuestRam, VmConfig, VmExit};
use vmm::VmmError;

fn main() -> ExitCode {
    // Before any thread: see single_malloc_arena.
    vmm::seccomp::single_malloc_arena();
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
        memory: args.memory.size,
        hugepages: args.memory.hugepages,
        vcpus: args.vcpus,
        kvm_device: args.kvm_device,
        nets: Vec::new(),
        seccomp: args.seccomp,
        api_socket: args.api_socket,
        name: args.name,
        capabilities: args.capabilities,
        guest_memory: None,
    };
    // Bad paths and sizes are reported before any XDP program is attached.
    if let Err(e) = vm::check_config(&config).and_then(|_| vm::check_net_count(args.net.len())) {
        eprintln!("xskvm: {e}");
        return ExitCode::FAILURE;
    }
    if let Err(e) = open_nics(&args.net, &mut config) {
        eprintln!("xskvm: {e}");
        return ExitCode::FAILURE;
    }
    match vm::run(config) {
        Ok(exit) => {
            let how = match exit {
                VmExit::PowerOff => "guest powered off".to_string(),
                VmExit::Reset => "guest rebooted".to_string(),
                VmExit::Quit => "quit from the console".to_string(),
                VmExit::Signal(sig) => format!("stopped by signal {sig}"),
                VmExit::ShutdownTimeout => {
                    "stopped: the guest did not power off within the shutdown timeout".to_string()
                }
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

/// Opens every `--net`. With `umem=guest` NICs, guest memory is made
/// first (in one mapping with their queues' area after it), since they
/// register it as their UMEM.
fn open_nics(specs: &[NetSpec], config: &mut VmConfig) -> Result<(), VmmError> {
    vmm::afxdp::check_one_nic_per_interface(specs)?;
    let areas = specs
        .iter()
        .map(vmm::afxdp::guest_umem_area)
        .collect::<Result<Vec<u64>, _>>()?;
    let total: u64 = areas.iter().sum();
    let umem = if total > 0 {
        let (mem, umem) = vm::create_guest_memory(config.memory, config.hugepages, total)?;
        config.guest_memory = Some(GuestRam { mem, umem });
        umem
    } else {
        None
    };
    let mut offset = 0;
    for (index, (spec, area)) in specs.iter().zip(areas).enumerate() {
        let region = match (umem, area) {
            (Some(mapping), 1..) => Some(mapping.region(offset)?),
            _ => None,
        };
        offset += area;
        config
            .nets
            .push(vmm::afxdp::open_net_device(index, spec, region)?);
    }
    Ok(())
}

/// The peak resident set size: what the guest and xskvm touched at most.
/// getrusage rather than /proc/self/status, which the seccomp filter of
/// the main thread does not let it open.
fn peak_rss() -> String {
    // SAFETY: rusage is plain data, filled by getrusage below.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid out-pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } == 0 {
        format!("{} kB", usage.ru_maxrss)
    } else {
        "unknown".into()
    }
}
