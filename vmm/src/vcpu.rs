//! vCPU threads: run KVM_RUN in a loop and route port and MMIO exits to the
//! device buses. A vCPU that cannot go on records why and wakes the main
//! thread; the main thread stops the others with [`VcpuHandle::stop`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::Bus;
use kvm_ioctls::{VcpuExit, VcpuFd};
use seccompiler::BpfProgram;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::seccomp::{self, SeccompError, ThreadKind};

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;

/// Why a vCPU ended the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    PowerOff,
    Reset,
    Crash(String),
}

/// Where vCPUs report that the VM must end: the first report wins.
pub struct StopReport {
    reason: Mutex<Option<VcpuStop>>,
    wake: EventFd,
}

impl StopReport {
    pub fn new(wake: EventFd) -> Self {
        Self {
            reason: Mutex::new(None),
            wake,
        }
    }

    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    pub(crate) fn report(&self, stop: VcpuStop) {
        let mut reason = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if reason.is_none() {
            *reason = Some(stop);
        }
        if let Err(e) = self.wake.write(1) {
            log::error!("cannot wake the main thread: {e}");
        }
    }

    pub fn take(&self) -> Option<VcpuStop> {
        self.reason.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

pub struct Vcpu {
    pub index: u8,
    pub fd: VcpuFd,
    /// What a VM reset puts back.
    pub initial: crate::cpu::InitialState,
    pub pio: Bus,
    pub mmio: Bus,
    pub report: Arc<StopReport>,
    pub stop: Arc<AtomicBool>,
    pub pause: Arc<PauseControl>,
    pub exits: Arc<VcpuExitCounters>,
}

/// Why KVM_RUN returned, counted per vCPU (read by the API).
#[derive(Debug, Default)]
pub struct VcpuExitCounters {
    pub io_in: AtomicU64,
    pub io_out: AtomicU64,
    pub mmio_read: AtomicU64,
    pub mmio_write: AtomicU64,
    /// KVM_RUN interrupted by a signal (a kick) or asked to retry.
    pub interrupted: AtomicU64,
    /// Everything else (system events, failures): they end the VM.
    pub other: AtomicU64,
}

impl VcpuExitCounters {
    /// (name, value) of every counter.
    pub fn values(&self) -> [(&'static str, u64); 6] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("io_in", get(&self.io_in)),
            ("io_out", get(&self.io_out)),
            ("mmio_read", get(&self.mmio_read)),
            ("mmio_write", get(&self.mmio_write)),
            ("interrupted", get(&self.interrupted)),
            ("other", get(&self.other)),
        ]
    }
}

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Pauses and resumes vCPUs: a paused vCPU waits here, outside KVM_RUN,
/// until it is resumed or the VM stops. The main thread sets the request,
/// kicks the threads out of KVM_RUN and waits until all of them parked.
#[derive(Default)]
pub struct PauseControl {
    /// Read on every loop turn by the vCPUs, without the lock.
    requested: AtomicBool,
    state: Mutex<PauseState>,
    changed: Condvar,
}

#[derive(Default)]
struct PauseState {
    paused: bool,
    /// vCPUs waiting in `park`.
    parked: usize,
    /// Raised by [`PauseControl::reset_parked`]: each parked vCPU that has
    /// not seen this value yet resets itself.
    reset_epoch: u64,
    /// vCPUs that reset themselves for the current epoch, and how those
    /// that could not failed.
    reset_done: usize,
    reset_errors: Vec<String>,
}

impl PauseControl {
    /// Asks the vCPUs to park; they do so at their next loop turn.
    pub fn request_pause(&self) {
        self.lock().paused = true;
        self.requested.store(true, Ordering::Release);
    }

    /// Waits until `count` vCPUs are parked, at most `timeout`; calls
    /// `kick` between checks (a kick can land just before KVM_RUN and be
    /// lost, so it is repeated). Returns whether they all parked.
    pub fn wait_parked(&self, count: usize, timeout: Duration, mut kick: impl FnMut()) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if state.parked >= count {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            kick();
            let wait = (deadline - now).min(Duration::from_millis(2));
            state = self
                .changed
                .wait_timeout(state, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Lets parked vCPUs go back to the guest (also used to release them
    /// when the VM stops: they check the stop flag first).
    pub fn resume(&self) {
        self.requested.store(false, Ordering::Release);
        self.lock().paused = false;
        self.changed.notify_all();
    }

    /// Has the `count` parked vCPUs reset themselves (their registers, as
    /// before they first ran: each vCPU's state is its thread's to set)
    /// and waits for all of them, at most `timeout`. Call it only while
    /// they are parked; they stay parked.
    pub fn reset_parked(&self, count: usize, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        state.reset_epoch += 1;
        state.reset_done = 0;
        state.reset_errors.clear();
        self.changed.notify_all();
        while state.reset_done < count {
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "{} of {count} vCPU(s) reset within {timeout:?}",
                    state.reset_done
                ));
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        match state.reset_errors.is_empty() {
            true => Ok(()),
            false => Err(state.reset_errors.join("; ")),
        }
    }

    /// Called by a vCPU thread between two KVM_RUNs when a pause is asked;
    /// runs `reset` once for each [`Self::reset_parked`] it has not seen
    /// (`seen_epoch` is the thread's own record).
    fn park(
        &self,
        stop: &AtomicBool,
        seen_epoch: &mut u64,
        reset: &mut dyn FnMut() -> Result<(), String>,
    ) {
        let mut state = self.lock();
        state.parked += 1;
        self.changed.notify_all();
        loop {
            if stop.load(Ordering::Acquire) {
                break;
            }
            if state.reset_epoch != *seen_epoch {
                *seen_epoch = state.reset_epoch;
                // Under the lock: a few ioctls, and the main thread waits anyway.
                if let Err(e) = reset() {
                    state.reset_errors.push(e);
                }
                state.reset_done += 1;
                self.changed.notify_all();
                continue;
            }
            if !state.paused {
                break;
            }
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.parked -= 1;
        self.changed.notify_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PauseState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running vCPU thread.
pub struct VcpuHandle {
    thread: JoinHandle<()>,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: the signal only makes KVM_RUN return EINTR.
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub(crate) fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the kick handler; call once before starting vCPUs.
pub fn install_kick_handler() -> std::io::Result<()> {
    register_signal_handler(kick_signal(), kick_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// Holds vCPU threads back until the main thread is ready (its own
/// seccomp filter in place), or tells them not to run at all.
#[derive(Default)]
pub struct StartGate {
    go: Mutex<Option<bool>>,
    opened: Condvar,
}

impl StartGate {
    pub fn open(&self, go: bool) {
        *self.go.lock().unwrap_or_else(|p| p.into_inner()) = Some(go);
        self.opened.notify_all();
    }

    fn wait(&self) -> bool {
        let mut go = self.go.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match *go {
                Some(go) => return go,
                None => go = self.opened.wait(go).unwrap_or_else(|p| p.into_inner()),
            }
        }
    }
}

impl Vcpu {
    /// Starts the thread; it installs `filter` (if any) before returning
    /// here, then waits for `gate` before entering the guest.
    pub fn spawn(
        self,
        filter: Option<Arc<BpfProgram>>,
        gate: Arc<StartGate>,
    ) -> Result<VcpuHandle, SeccompError> {
        let thread = seccomp::spawn_filtered(
            format!("xskvm-vcpu{}", self.index),
            ThreadKind::Vcpu,
            filter,
            move || {
                if gate.wait() {
                    self.run();
                }
            },
        )?;
        Ok(VcpuHandle { thread })
    }

    fn run(mut self) {
        let mut seen_reset = 0;
        while !self.stop.load(Ordering::Acquire) {
            if self.pause.requested.load(Ordering::Acquire) {
                let (fd, initial, index) = (&mut self.fd, &self.initial, self.index);
                self.pause.park(&self.stop, &mut seen_reset, &mut || {
                    finish_pending_io(fd, index)?;
                    initial.restore(fd).map_err(|e| e.to_string())
                });
                continue;
            }
            if let Some(stop) = self.run_once() {
                log::debug!("vCPU {}: {stop:?}", self.index);
                self.report.report(stop);
                return;
            }
        }
    }

    /// One KVM_RUN; returns why the VM must stop, if it must.
    fn run_once(&mut self) -> Option<VcpuStop> {
        let index = self.index;
        let exits = &self.exits;
        let stop = match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                count(&exits.io_in);
                if !self.pio.read(u64::from(port), data) {
                    // Nothing there: a floating ISA bus reads as all ones.
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                count(&exits.io_out);
                self.pio.write(u64::from(port), data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                count(&exits.mmio_read);
                if !self.mmio.read(addr, data) {
                    devices::log_ratelimited!(
                        log::Level::Debug,
                        "vCPU {index}: read of unmapped MMIO {addr:#x}"
                    );
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                count(&exits.mmio_write);
                if !self.mmio.write(addr, data) {
                    devices::log_ratelimited!(
                        log::Level::Debug,
                        "vCPU {index}: write to unmapped MMIO {addr:#x}"
                    );
                }
                None
            }
            Ok(VcpuExit::Shutdown) => Some(VcpuStop::Crash(format!(
                "vCPU {index}: guest triple fault (KVM_EXIT_SHUTDOWN)"
            ))),
            Ok(VcpuExit::SystemEvent(kind, _)) => Some(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => VcpuStop::PowerOff,
                KVM_SYSTEM_EVENT_RESET => VcpuStop::Reset,
                KVM_SYSTEM_EVENT_CRASH => {
                    VcpuStop::Crash(format!("vCPU {index}: guest reported a crash"))
                }
                other => VcpuStop::Crash(format!("vCPU {index}: unknown system event {other}")),
            }),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(VcpuStop::Crash(format!(
                "vCPU {index}: KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"
            ))),
            Ok(VcpuExit::InternalError) => {
                // SAFETY: after KVM_EXIT_INTERNAL_ERROR, `internal` is the active union member.
                let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                Some(VcpuStop::Crash(format!(
                    "vCPU {index}: KVM internal error (suberror {suberror}{})",
                    if suberror == 1 { ": instruction emulation failure" } else { "" }
                )))
            }
            Ok(VcpuExit::Hlt) => Some(VcpuStop::Crash(format!(
                "vCPU {index}: unexpected HLT exit (the in-kernel irqchip should handle it)"
            ))),
            Ok(other) => Some(VcpuStop::Crash(format!(
                "vCPU {index}: unexpected KVM exit {other:?}"
            ))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                count(&exits.interrupted);
                // Kicked (the loop checks the stop flag) or asked to retry.
                None
            }
            Err(e) => Some(VcpuStop::Crash(format!("vCPU {index}: KVM_RUN failed: {e}"))),
        };
        if stop.is_some() {
            count(&exits.other);
        }
        stop
    }
}

/// KVM_RUN rounds [`finish_pending_io`] allows (a `rep ins`/`outs` may
/// need several).
const PENDING_IO_ROUNDS: usize = 1024;

/// Lets KVM finish the instruction behind the vCPU's last I/O or MMIO exit
/// without running the guest (`immediate_exit`). KVM completes it on the
/// next KVM_RUN from state userspace cannot see; after a reset that would
/// be the new boot's first KVM_RUN, and the old instruction's completion
/// would write its registers and return address over the reset state (seen
/// as a triple fault when vm.reboot came while the guest took interrupts).
/// Reads in between get all ones and writes go nowhere: the guest is being
/// reset.
fn finish_pending_io(fd: &mut VcpuFd, index: u8) -> Result<(), String> {
    fd.set_kvm_immediate_exit(1);
    let mut result = Err(format!(
        "vCPU {index}: I/O still pending after {PENDING_IO_ROUNDS} KVM_RUN rounds"
    ));
    for _ in 0..PENDING_IO_ROUNDS {
        match fd.run() {
            Ok(VcpuExit::IoIn(_, data)) | Ok(VcpuExit::MmioRead(_, data)) => data.fill(0xff),
            Ok(VcpuExit::IoOut(..)) | Ok(VcpuExit::MmioWrite(..)) => {}
            // Anything else ends that instruction too.
            Ok(_) => {}
            Err(e) if e.errno() == libc::EINTR => {
                result = Ok(());
                break;
            }
            Err(e) => {
                result = Err(format!("vCPU {index}: KVM_RUN before the reset: {e}"));
                break;
            }
        }
    }
    fd.set_kvm_immediate_exit(0);
    result
}

impl VcpuHandle {
    /// Interrupts KVM_RUN on this vCPU's thread (if it is in it).
    pub fn kick(&self) {
        if let Err(e) = self.thread.kill(kick_signal()) {
            devices::warn_ratelimited!("cannot kick a vCPU thread: {e}");
        }
    }

    /// Stops the thread: the caller has set the shared stop flag; kick the
    /// thread out of KVM_RUN until it notices, then join it.
    pub fn stop(self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.thread.is_finished() && Instant::now() < deadline {
            // A kick that lands just before KVM_RUN is lost, so keep kicking.
            if let Err(e) = self.thread.kill(kick_signal()) {
                log::warn!("cannot kick a vCPU thread: {e}");
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if self.thread.is_finished() {
            if self.thread.join().is_err() {
                log::error!("a vCPU thread panicked");
            }
        } else {
            log::warn!("a vCPU thread did not stop in {timeout:?}; leaving it");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Stand-ins for vCPU threads: park while a pause is asked, count
    /// their resets (the second one fails if `fail_second`).
    fn fake_vcpus(
        pause: &Arc<PauseControl>,
        stop: &Arc<AtomicBool>,
        fail_second: bool,
    ) -> (Vec<JoinHandle<()>>, Arc<AtomicUsize>) {
        let resets = Arc::new(AtomicUsize::new(0));
        let threads = (0..2)
            .map(|i| {
                let (pause, stop, resets) = (pause.clone(), stop.clone(), resets.clone());
                std::thread::spawn(move || {
                    let mut seen = 0;
                    while !stop.load(Ordering::Acquire) {
                        if pause.requested.load(Ordering::Acquire) {
                            pause.park(&stop, &mut seen, &mut || {
                                resets.fetch_add(1, Ordering::SeqCst);
                                match fail_second && i == 1 {
                                    true => Err("vCPU 1 broke".into()),
                                    false => Ok(()),
                                }
                            });
                        } else {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                })
            })
            .collect();
        (threads, resets)
    }

    #[test]
    fn parked_vcpus_reset_themselves_once_per_request() {
        let pause = Arc::new(PauseControl::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (threads, resets) = fake_vcpus(&pause, &stop, false);
        pause.request_pause();
        assert!(pause.wait_parked(2, Duration::from_secs(5), || {}));
        assert_eq!(
            resets.load(Ordering::SeqCst),
            0,
            "parking alone resets nothing"
        );
        pause.reset_parked(2, Duration::from_secs(5)).unwrap();
        assert_eq!(resets.load(Ordering::SeqCst), 2);
        pause.reset_parked(2, Duration::from_secs(5)).unwrap();
        assert_eq!(resets.load(Ordering::SeqCst), 4);
        // Waiting for a vCPU that is not there times out.
        let err = pause
            .reset_parked(3, Duration::from_millis(50))
            .unwrap_err();
        assert!(err.contains("2 of 3"), "{err}");
        pause.resume();
        stop.store(true, Ordering::Release);
        threads.into_iter().for_each(|t| t.join().unwrap());
    }

    #[test]
    fn a_failed_vcpu_reset_is_reported() {
        let pause = Arc::new(PauseControl::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (threads, resets) = fake_vcpus(&pause, &stop, true);
        pause.request_pause();
        assert!(pause.wait_parked(2, Duration::from_secs(5), || {}));
        let err = pause.reset_parked(2, Duration::from_secs(5)).unwrap_err();
        assert_eq!(err, "vCPU 1 broke");
        assert_eq!(resets.load(Ordering::SeqCst), 2);
        stop.store(true, Ordering::Release);
        pause.resume();
        threads.into_iter().for_each(|t| t.join().unwrap());
    }
}
