//! xskvm's VM core: guest memory, boot, ACPI, vCPUs and the event loop that
//! runs a guest until it powers off, resets or fails.

pub mod acpi;
pub mod afxdp;
pub mod api;
pub mod boot;
pub mod cli;
pub mod console;
pub mod cpu;
pub mod event_loop;
pub mod layout;
pub mod net;
pub mod net_helper;
pub mod nic_watch;
pub mod privileges;
pub mod seccomp;
pub mod terminal;
pub mod vcpu;
pub mod vm;
pub mod wait;

use std::path::PathBuf;

/// Everything that can end xskvm with an error. Each message is meant for
/// the user: it says what failed and, where possible, what to do.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    #[error(transparent)]
    Device(#[from] devices::BusError),
    #[error("--memory must be at least {min} MiB (got {got} bytes)")]
    MemoryTooSmall { got: u64, min: u64 },
    #[error("--memory {requested_mib} MiB is more than this host's {host_mib} MiB of RAM")]
    MemoryTooLarge { requested_mib: u64, host_mib: u64 },
    #[error("--memory ...,hugepages=on needs {needed} free {page} hugepages and the host has {}: reserve them first, e.g. `echo {needed} > /sys/kernel/mm/hugepages/{}/nr_hugepages` (more if other programs use hugepages)", match .available { Some(n) => n.to_string(), None => "none of that size (its kernel offers no such pages)".to_string() }, .page.sysfs_name())]
    HugePages {
        needed: u64,
        page: crate::cli::HugePageSize,
        available: Option<u64>,
    },
    #[error("cannot allocate {size_mib} MiB of guest memory: {reason}")]
    GuestMemory { size_mib: u64, reason: String },
    #[error("--vcpus must be at least 1")]
    NoVcpus,
    #[error("--vcpus {requested} is more than this host's KVM supports ({max})")]
    TooManyVcpus { requested: u32, max: u32 },
    #[error("{path} does not exist: KVM is not available here (load kvm_intel or kvm_amd, or enable virtualization in the firmware)")]
    NoKvm { path: PathBuf },
    #[error("no permission to open {path}: run as root or add this user to the group that owns it (usually 'kvm')")]
    KvmPermission { path: PathBuf },
    #[error("cannot open {path}: {source}")]
    KvmOpen {
        path: PathBuf,
        source: kvm_ioctls::Error,
    },
    #[error("KVM lacks {0}, which xskvm needs")]
    MissingCapability(&'static str),
    #[error("KVM refused to {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{0}: {1}")]
    VirtioDevice(String, String),
    #[error("{0}")]
    Net(String),
    #[error(transparent)]
    Resources(#[from] devices::ResourceError),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error(transparent)]
    Privileges(#[from] privileges::PrivilegeError),
    #[error(transparent)]
    Api(#[from] api::ApiError),
    #[error("main event loop: {0}")]
    EventLoop(event_manager::Error),
    #[error("guest stopped: {0}")]
    GuestCrash(String),
    #[error("cannot reboot the VM: {0}")]
    Reboot(String),
}
