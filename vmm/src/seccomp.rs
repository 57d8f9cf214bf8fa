//! Seccomp filters: one per kind of thread, each allowing only the system
//! calls that kind of thread makes (found by tracing guests that boot,
//! move traffic, reload virtio-net, reboot and get SIGTERM, under
//! `strace -f` and with `--seccomp log` and the kernel's audit records). Each thread
//! installs its own filter before it does anything a guest can influence.
//!
//! Filters are inherited by threads started later and stack, so the vCPU
//! filter also allows what starting and joining a virtio-net IO thread
//! takes and everything that thread does; the IO thread then narrows it
//! with the net filter.

use std::collections::BTreeMap;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// `--seccomp`: what happens to a thread that makes a system call outside
/// its list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SeccompMode {
    /// The whole process is killed (SIGSYS).
    #[default]
    On,
    /// No filters at all.
    Off,
    /// The call goes through and the kernel logs it (audit type 1326).
    Log,
}

/// The kinds of threads xskvm runs, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// Runs the event loop (signals, console input, the API's actions,
    /// vCPU reports) until the VM ends, then stops the others and tears down.
    Main,
    /// Runs KVM_RUN and the device emulation behind port and MMIO exits.
    Vcpu,
    /// Moves frames for one virtio-net queue pair.
    NetIo,
    /// Follows the host interfaces over rtnetlink and reopens a NIC whose
    /// interface came back (XDP program, AF_XDP sockets, UMEM).
    NicWatch,
    /// Serves `--api-socket`.
    Api,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 5] = [
        Self::Main,
        Self::Vcpu,
        Self::NetIo,
        Self::NicWatch,
        Self::Api,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Main => "main",
            Self::Vcpu => "vCPU",
            Self::NetIo => "net IO",
            Self::NicWatch => "NIC watcher",
            Self::Api => "API",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("invalid seccomp rule: {0}")]
    Rule(seccompiler::BackendError),
    #[error("cannot build the {kind} seccomp filter: {source}")]
    Build {
        kind: &'static str,
        source: seccompiler::BackendError,
    },
    #[error("cannot install the {kind} seccomp filter: {source} (--seccomp off runs without)")]
    Install {
        kind: &'static str,
        source: seccompiler::Error,
    },
    #[error("cannot start thread {name}: {source}")]
    Spawn {
        name: String,
        source: std::io::Error,
    },
    #[error("thread {0} ended before installing its seccomp filter")]
    ThreadGone(String),
}

/// `enum bpf_cmd` (linux/bpf.h): BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM,
/// BPF_MAP_DELETE_ELEM, BPF_MAP_GET_NEXT_KEY: element access on an open map.
const BPF_MAP_ELEMENT_COMMANDS: [u64; 4] = [1, 2, 3, 4];

/// `_IO(KVMIO, 0x80)`: the ioctl a vCPU thread makes while the guest runs.
const KVM_RUN: u64 = 0xae80;

/// What a vCPU thread sets to reset itself on a reboot (its state before
/// it first ran; see `cpu::InitialState`): KVM_SET_MP_STATE, KVM_SET_REGS,
/// KVM_SET_SREGS, KVM_SET_FPU, KVM_SET_XCRS, KVM_SET_DEBUGREGS,
/// KVM_SET_LAPIC, KVM_SET_MSRS, KVM_SET_VCPU_EVENTS (linux/kvm.h).
const KVM_VCPU_RESET_IOCTLS: [u64; 9] = [
    0x4004_ae99,
    0x4090_ae82,
    0x4138_ae84,
    0x41a0_ae8d,
    0x4188_aea7,
    0x4080_aea2,
    0x4400_ae8f,
    0x4008_ae89,
    0x4040_aea0,
];

/// What the main thread sets to reset the VM on a reboot: KVM_SET_IRQCHIP
/// (the PICs and the I/O APIC) and KVM_SET_PIT2.
const KVM_VM_RESET_IOCTLS: [u64; 2] = [0x8208_ae63, 0x4070_aea0];

/// One rule set under construction: syscall number to rules, where an
/// empty rule list allows the call with any arguments.
struct Rules(BTreeMap<i64, Vec<SeccompRule>>);

impl Rules {
    fn new() -> Self {
        Self(BTreeMap::new())
    }

    fn allow(&mut self, syscalls: &[libc::c_long]) {
        for &nr in syscalls {
            self.0.insert(nr, Vec::new());
        }
    }

    /// Allows `nr` when every `(argument index, value)` matches (32-bit
    /// compares: all the arguments checked here are ints).
    fn allow_when(&mut self, nr: libc::c_long, args: &[(u8, u64)]) -> Result<(), SeccompError> {
        self.allow_when_op(nr, args.iter().map(|&(i, v)| (i, SeccompCmpOp::Eq, v)))
    }

    fn allow_when_op(
        &mut self,
        nr: libc::c_long,
        args: impl Iterator<Item = (u8, SeccompCmpOp, u64)>,
    ) -> Result<(), SeccompError> {
        let build = SeccompError::Rule;
        let conditions = args
            .map(|(index, op, value)| {
                SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value).map_err(build)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let rule = SeccompRule::new(conditions).map_err(build)?;
        match self.0.get_mut(&nr) {
            // Already allowed whatever the arguments.
            Some(rules) if rules.is_empty() => {}
            Some(rules) => rules.push(rule),
            None => {
                self.0.insert(nr, vec![rule]);
            }
        }
        Ok(())
    }
}

/// What every thread needs: memory allocation (glibc malloc may use brk,
/// mmap, mremap, and mprotect to grow a thread's arena), locks, logging
/// to stderr, the terminal restore of the panic hook, and ending the
/// thread (Rust tears down the signal stack, glibc releases the stack).
fn common(rules: &mut Rules) -> Result<(), SeccompError> {
    rules.allow(&[
        libc::SYS_brk,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_mprotect,
        libc::SYS_madvise,
        libc::SYS_futex,
        libc::SYS_clock_gettime,
        libc::SYS_write,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sigaltstack,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ]);
    // Rust's OwnedFd checks that a descriptor is still open before closing
    // it (seen in debug builds).
    rules.allow_when(libc::SYS_fcntl, &[(1, libc::F_GETFD as u64)])?;
    // tcsetattr(stdin, TCSANOW) restoring the terminal (panic hook, exit).
    rules.allow_when(
        libc::SYS_ioctl,
        &[(0, libc::STDIN_FILENO as u64), (1, libc::TCSETS)],
    )
}

/// The virtio-net IO thread: its epoll loop over eventfds and the AF_XDP
/// socket (a zero-length sendto kicks TX; recvfrom wakes the driver to
/// refill RX when the socket asks for it).
fn net_io(rules: &mut Rules) -> Result<(), SeccompError> {
    common(rules)?;
    rules.allow(&[
        libc::SYS_read,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_sendto,
        libc::SYS_recvfrom,
        libc::SYS_close,
        // A worker whose queue broke waits for its stop event.
        libc::SYS_poll,
    ]);
    // The AF_XDP socket's drop counters, logged when the pair stops.
    rules.allow_when(
        libc::SYS_getsockopt,
        &[(1, libc::SOL_XDP as u64), (2, libc::XDP_STATISTICS as u64)],
    )?;
    // The guest's receive mode (control queue; reset on a vCPU) goes into
    // the XDP program's filter maps, through fds already open.
    for command in BPF_MAP_ELEMENT_COMMANDS {
        rules.allow_when(libc::SYS_bpf, &[(0, command)])?;
    }
    Ok(())
}

/// The vCPU thread: KVM_RUN, device emulation (eventfd writes for
/// interrupts, the UART's stdout), and virtio-net activation and reset,
/// which start and join the IO threads: so it also allows their calls.
fn vcpu(rules: &mut Rules) -> Result<(), SeccompError> {
    net_io(rules)?;
    rules.allow_when(libc::SYS_ioctl, &[(1, KVM_RUN)])?;
    for request in KVM_VCPU_RESET_IOCTLS {
        rules.allow_when(libc::SYS_ioctl, &[(1, request)])?;
    }
    rules.allow(&[
        // Starting a thread: glibc uses clone3; the new thread registers
        // rseq and its robust list, and Rust's stack guard setup
        // (pthread_getattr_np) asks for its tid and CPU affinity.
        libc::SYS_clone3,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_gettid,
        libc::SYS_sched_getaffinity,
        // The IO thread's stop eventfd, and clones of queue eventfds.
        libc::SYS_eventfd2,
    ]);
    rules.allow_when(libc::SYS_fcntl, &[(1, libc::F_DUPFD_CLOEXEC as u64)])?;
    // clone only for threads (glibc's fallback when clone3 is missing), never a fork.
    let thread = libc::CLONE_THREAD as u64;
    rules.allow_when_op(
        libc::SYS_clone,
        [(0, SeccompCmpOp::MaskedEq(thread), thread)].into_iter(),
    )?;
    // Naming the IO thread, and the IO thread installing its own filter.
    rules.allow_when(libc::SYS_prctl, &[(0, libc::PR_SET_NAME as u64)])?;
    rules.allow_when(libc::SYS_prctl, &[(0, libc::PR_SET_NO_NEW_PRIVS as u64)])?;
    rules.allow_when(
        libc::SYS_seccomp,
        &[(0, u64::from(libc::SECCOMP_SET_MODE_FILTER))],
    )?;
    Ok(())
}

/// The main thread once the guest runs: its event-manager loop (eventfds,
/// the signalfd, and non-blocking reads of stdin for the console), kicking vCPUs with the kick signal and joining them,
/// rebooting the VM in place (resetting devices, which joins virtio-net IO
/// threads and resets the receive filter's maps; reloading the kernel and
/// initramfs from the files kept open; resetting the interrupt
/// controllers), and tearing down devices, AF_XDP sockets and the XDP
/// program's link.
fn main_thread(rules: &mut Rules) -> Result<(), SeccompError> {
    common(rules)?;
    rules.allow(&[
        libc::SYS_read,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_close,
        // pthread_kill: tgkill(getpid(), tid, sig).
        libc::SYS_getpid,
        libc::SYS_clock_nanosleep,
        // Peak RSS for the exit log line.
        libc::SYS_getrusage,
        // event-manager keeps its subscribers in HashMaps, whose RandomState
        // seeds itself from getrandom the first time a thread makes one.
        libc::SYS_getrandom,
        // Reloading the kernel and initramfs on a reboot (seek, then read).
        libc::SYS_lseek,
    ]);
    rules.allow_when(libc::SYS_tgkill, &[(2, crate::vcpu::kick_signal() as u64)])?;
    for request in KVM_VM_RESET_IOCTLS {
        rules.allow_when(libc::SYS_ioctl, &[(1, request)])?;
    }
    // A NIC dropped here (no watcher thread) takes its sockets out of a
    // map-path XSKMAP; a device reset on reboot clears the receive
    // filter's maps, as a reset on a vCPU does.
    for command in BPF_MAP_ELEMENT_COMMANDS {
        rules.allow_when(libc::SYS_bpf, &[(0, command)])?;
    }
    Ok(())
}

/// The NIC watcher: its netlink socket and poll loop, sysfs reads of the
/// carrier, and everything opening a NIC again takes (libbpf loading the
/// XDP program and its map, the BPF link, AF_XDP sockets with their UMEM
/// and rings, interface ioctls, RLIMIT_MEMLOCK).
fn nic_watch(rules: &mut Rules) -> Result<(), SeccompError> {
    common(rules)?;
    rules.allow(&[
        libc::SYS_read,
        libc::SYS_poll,
        libc::SYS_openat,
        libc::SYS_close,
        libc::SYS_newfstatat,
        libc::SYS_fstat,
        libc::SYS_lseek,
        libc::SYS_statfs,
        libc::SYS_fstatfs,
        libc::SYS_uname,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_prlimit64,
        libc::SYS_socket,
        libc::SYS_bind,
        libc::SYS_getsockname,
        libc::SYS_setsockopt,
        libc::SYS_getsockopt,
        libc::SYS_sendto,
        libc::SYS_sendmsg,
        libc::SYS_recvfrom,
        libc::SYS_recvmsg,
        libc::SYS_bpf,
        libc::SYS_eventfd2,
        libc::SYS_faccessat,
        libc::SYS_faccessat2,
        libc::SYS_readlink,
        libc::SYS_readlinkat,
        libc::SYS_getrandom,
        libc::SYS_sched_getaffinity,
        // Seen in --seccomp log runs: libbpf's feature probes and fd moves.
        libc::SYS_memfd_create,
        libc::SYS_dup3,
    ]);
    rules.allow_when(libc::SYS_fcntl, &[(1, libc::F_DUPFD_CLOEXEC as u64)])?;
    rules.allow_when(libc::SYS_fcntl, &[(1, libc::F_GETFL as u64)])?;
    rules.allow_when(libc::SYS_fcntl, &[(1, libc::F_SETFL as u64)])?;
    // Interface index, flags and MTU; ethtool (queue counts, features).
    for request in [
        libc::SIOCGIFINDEX,
        libc::SIOCGIFFLAGS,
        libc::SIOCGIFMTU,
        libc::SIOCETHTOOL,
    ] {
        rules.allow_when(libc::SYS_ioctl, &[(1, request)])?;
    }
    Ok(())
}

/// The API thread: its poll loop over the listening socket, a stop
/// eventfd and every open connection (non-blocking, accepted with accept4,
/// so no fcntl), reading AF_XDP kernel statistics and the receive filter's
/// map, the guest's link (an eventfd write to raise its interrupt),
/// waiting on the main thread's answers, and removing the socket file at
/// the end.
fn api(rules: &mut Rules) -> Result<(), SeccompError> {
    common(rules)?;
    rules.allow(&[
        libc::SYS_read,
        libc::SYS_poll,
        libc::SYS_accept4,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_close,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
    ]);
    rules.allow_when(
        libc::SYS_getsockopt,
        &[(1, libc::SOL_XDP as u64), (2, libc::XDP_STATISTICS as u64)],
    )?;
    // Reading the receive filter's count of frames kept from the guest.
    rules.allow_when(libc::SYS_bpf, &[(0, BPF_MAP_ELEMENT_COMMANDS[0])])?;
    Ok(())
}

/// Compiles the filter of `kind`: calls outside its list kill the process
/// (`On`) or are logged (`Log`). `None` for `Off`.
pub fn compile(kind: ThreadKind, mode: SeccompMode) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::On => SeccompAction::KillProcess,
        SeccompMode::Log => SeccompAction::Log,
    };
    let mut rules = Rules::new();
    match kind {
        ThreadKind::Main => main_thread(&mut rules)?,
        ThreadKind::Vcpu => vcpu(&mut rules)?,
        ThreadKind::NetIo => net_io(&mut rules)?,
        ThreadKind::NicWatch => nic_watch(&mut rules)?,
        ThreadKind::Api => api(&mut rules)?,
    }
    let build = |source| SeccompError::Build {
        kind: kind.name(),
        source,
    };
    let filter = SeccompFilter::new(rules.0, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(build)?;
    BpfProgram::try_from(filter).map(Some).map_err(build)
}

/// Installs `filter` (if any) on the calling thread.
pub fn install(kind: ThreadKind, filter: Option<&BpfProgram>) -> Result<(), SeccompError> {
    match filter {
        Some(program) => {
            seccompiler::apply_filter(program).map_err(|source| SeccompError::Install {
                kind: kind.name(),
                source,
            })
        }
        None => Ok(()),
    }
}

/// The compiled filters of one run; all `None` with `--seccomp off`.
#[derive(Clone, Default)]
pub struct Filters {
    pub main: Option<Arc<BpfProgram>>,
    pub vcpu: Option<Arc<BpfProgram>>,
    pub net_io: Option<Arc<BpfProgram>>,
    pub nic_watch: Option<Arc<BpfProgram>>,
    pub api: Option<Arc<BpfProgram>>,
}

/// Keeps every thread on glibc's main malloc arena. glibc opens
/// /proc/sys/vm/overcommit_memory the first time it shrinks the heap of a
/// thread arena, which no filter allows (openat): with `umem=guest` and a
/// NIC opened again, xskvm's main thread died of SIGSYS at exit freeing
/// memory that another thread had allocated. The main arena shrinks with
/// brk, and the datapath allocates nothing per packet, so one arena costs
/// no contention. Call before any other thread starts.
pub fn single_malloc_arena() {
    // SAFETY: mallopt only sets an allocator parameter.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
}

impl Filters {
    /// Compiles the filters (none with `--seccomp off`); keeps malloc on
    /// one arena first ([`single_malloc_arena`]).
    pub fn new(mode: SeccompMode) -> Result<Self, SeccompError> {
        single_malloc_arena();
        let get = |kind| compile(kind, mode).map(|p| p.map(Arc::new));
        Ok(Self {
            main: get(ThreadKind::Main)?,
            vcpu: get(ThreadKind::Vcpu)?,
            net_io: get(ThreadKind::NetIo)?,
            nic_watch: get(ThreadKind::NicWatch)?,
            api: get(ThreadKind::Api)?,
        })
    }

    /// For `NetConfig::on_thread_start`: installs the net IO filter.
    pub fn net_io_hook(&self) -> Option<devices::virtio::net::ThreadStartHook> {
        let filter = self.net_io.clone()?;
        Some(devices::virtio::net::ThreadStartHook(Arc::new(move || {
            install(ThreadKind::NetIo, Some(&filter)).map_err(|e| e.to_string())
        })))
    }
}

/// Starts thread `name`, which installs `filter` and then runs `body`.
/// Returns once the filter is in place, so the caller knows the thread
/// never ran unfiltered; if it could not be installed, `body` never runs.
pub fn spawn_filtered(
    name: String,
    kind: ThreadKind,
    filter: Option<Arc<BpfProgram>>,
    body: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>, SeccompError> {
    let (tx, rx) = mpsc::sync_channel(1);
    let handle = std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let installed = install(kind, filter.as_deref());
            let ok = installed.is_ok();
            // The spawner waits for this; it only fails if the spawner is gone.
            let _ = tx.send(installed);
            if ok {
                body();
            }
        })
        .map_err(|source| SeccompError::Spawn {
            name: name.clone(),
            source,
        })?;
    match rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(SeccompError::ThreadGone(name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles_for_x86_64_in_both_modes() {
        for kind in ThreadKind::ALL {
            for mode in [SeccompMode::On, SeccompMode::Log] {
                let program = compile(kind, mode).unwrap().expect("a program");
                // A BPF program holds at most 4096 instructions.
                assert!(
                    !program.is_empty() && program.len() < 4096,
                    "{kind:?}: {} instructions",
                    program.len()
                );
            }
            assert!(compile(kind, SeccompMode::Off).unwrap().is_none());
        }
        let filters = Filters::new(SeccompMode::On).unwrap();
        assert!(filters.net_io_hook().is_some());
        assert!(Filters::new(SeccompMode::Off)
            .unwrap()
            .net_io_hook()
            .is_none());
    }

    /// Forks; the child installs `kind`'s filter in `mode` and runs `call`,
    /// then exits 0. Returns the child's wait status.
    fn in_filtered_child(kind: ThreadKind, mode: SeccompMode, call: fn() -> i64) -> i32 {
        // Built before the fork: the child only makes system calls.
        let program = compile(kind, mode).unwrap().expect("a program");
        // SAFETY: the child runs only async-signal-safe code (prctl,
        // seccomp, the call under test, _exit) before it exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            // No core file from the SIGSYS this test expects.
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: a valid rlimit; affects only this child.
            unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
            let code = match seccompiler::apply_filter(&program) {
                Ok(()) => {
                    call();
                    0
                }
                Err(_) => 3,
            };
            // SAFETY: ends the child without running the parent's atexit
            // handlers or destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child; `status` is a valid out-pointer.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(waited, pid, "waitpid: {}", std::io::Error::last_os_error());
        status
    }

    /// A call no thread kind allows (the NIC watcher may create sockets,
    /// but none may make a socket pair).
    fn open_socket_pair() -> i64 {
        let mut fds = [0i32; 2];
        // SAFETY: fds has room for the two descriptors socketpair writes.
        i64::from(unsafe {
            libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr())
        })
    }

    fn kvm_create_vm_ioctl() -> i64 {
        // SAFETY: an ioctl on a bad descriptor touches no memory.
        i64::from(unsafe { libc::ioctl(-1, 0xae01, 0) })
    }

    fn nothing() -> i64 {
        0
    }

    fn killed_by_sigsys(status: i32) -> bool {
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
    }

    /// `_IOW`/`_IOR(KVMIO, nr, T)` from the structure sizes, to check the
    /// numbers written out above.
    fn kvm_ioctl<T>(read: bool, nr: u64) -> u64 {
        let dir: u64 = if read { 2 } else { 1 };
        (dir << 30) | ((std::mem::size_of::<T>() as u64) << 16) | (0xae << 8) | nr
    }

    #[test]
    fn reset_ioctl_numbers_match_the_kvm_structures() {
        use kvm_bindings::*;
        assert_eq!(
            KVM_VCPU_RESET_IOCTLS,
            [
                kvm_ioctl::<kvm_mp_state>(false, 0x99),
                kvm_ioctl::<kvm_regs>(false, 0x82),
                kvm_ioctl::<kvm_sregs>(false, 0x84),
                kvm_ioctl::<kvm_fpu>(false, 0x8d),
                kvm_ioctl::<kvm_xcrs>(false, 0xa7),
                kvm_ioctl::<kvm_debugregs>(false, 0xa2),
                kvm_ioctl::<kvm_lapic_state>(false, 0x8f),
                kvm_ioctl::<kvm_msrs>(false, 0x89),
                kvm_ioctl::<kvm_vcpu_events>(false, 0xa0),
            ]
        );
        assert_eq!(
            KVM_VM_RESET_IOCTLS,
            [
                kvm_ioctl::<kvm_irqchip>(true, 0x63),
                kvm_ioctl::<kvm_pit_state2>(false, 0xa0),
            ]
        );
    }

    fn kvm_set_irqchip_ioctl() -> i64 {
        // SAFETY: an ioctl on a bad descriptor touches no memory.
        i64::from(unsafe { libc::ioctl(-1, KVM_VM_RESET_IOCTLS[0], 0) })
    }

    fn kvm_set_regs_ioctl() -> i64 {
        // SAFETY: as above.
        i64::from(unsafe { libc::ioctl(-1, KVM_VCPU_RESET_IOCTLS[1], 0) })
    }

    #[test]
    fn reset_ioctls_are_allowed_only_where_a_reboot_makes_them() {
        let exited = |status: i32| libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
        let main = in_filtered_child(ThreadKind::Main, SeccompMode::On, kvm_set_irqchip_ioctl);
        assert!(exited(main), "main: status {main:#x}");
        let vcpu = in_filtered_child(ThreadKind::Vcpu, SeccompMode::On, kvm_set_regs_ioctl);
        assert!(exited(vcpu), "vCPU: status {vcpu:#x}");
        // The main thread does not set vCPU registers; nor does the API.
        for (kind, call) in [
            (ThreadKind::Main, kvm_set_regs_ioctl as fn() -> i64),
            (ThreadKind::Api, kvm_set_irqchip_ioctl),
            (ThreadKind::Vcpu, kvm_set_irqchip_ioctl),
        ] {
            let status = in_filtered_child(kind, SeccompMode::On, call);
            assert!(killed_by_sigsys(status), "{kind:?}: status {status:#x}");
        }
    }

    #[test]
    fn forbidden_calls_kill_the_process() {
        for kind in ThreadKind::ALL {
            let status = in_filtered_child(kind, SeccompMode::On, open_socket_pair);
            assert!(
                killed_by_sigsys(status),
                "{kind:?}: socket() left status {status:#x}"
            );
        }
        // ioctl is allowed on vCPU threads, but only KVM_RUN.
        let status = in_filtered_child(ThreadKind::Vcpu, SeccompMode::On, kvm_create_vm_ioctl);
        assert!(killed_by_sigsys(status), "status {status:#x}");
    }

    #[test]
    fn allowed_calls_and_exit_go_through() {
        for kind in ThreadKind::ALL {
            let status = in_filtered_child(kind, SeccompMode::On, nothing);
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "{kind:?}: status {status:#x}"
            );
        }
    }

    #[test]
    fn log_mode_does_not_kill() {
        for kind in ThreadKind::ALL {
            let status = in_filtered_child(kind, SeccompMode::Log, open_socket_pair);
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "{kind:?}: status {status:#x}"
            );
        }
    }
}
