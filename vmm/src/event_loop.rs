//! The main thread's loop once the guest runs, on rust-vmm's
//! `event-manager`: one subscriber per concern, as in vmm-reference.
//!
//! - [`GuestEnds`]: the guest ends the VM (i8042 reset, ACPI power-off);
//! - [`ConsoleInput`]: stdin to the guest's UART, and the user's `Ctrl-A x`;
//! - [`VcpuReports`]: a vCPU stopped (system event, crash);
//! - [`StopSignals`]: SIGINT, SIGTERM, SIGHUP through a signalfd;
//! - [`ApiActions`]: what the API thread asks (pause, resume, shutdown,
//!   reboot), carried out here because this thread owns the vCPU threads;
//!   a reboot resets the VM in place through [`VmReset`].
//!
//! Packets never come here (the virtio-net IO threads move them). Each
//! subscriber records how the VM ends in the shared [`Outcome`]; the first
//! record wins and ends the loop.

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use devices::legacy::SerialConsole;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use crate::api::{Action, ActionError, ActionRequest, VmState, VmStatus};
use crate::console::ConsoleInput;
use crate::vcpu::{PauseControl, StopReport, VcpuHandle, VcpuStop};
use crate::vm::VmExit;
use crate::VmmError;

/// How long vCPUs get to leave the guest when the VM is paused.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How the VM ended, once something ended it.
#[derive(Clone, Default)]
pub struct Outcome(Rc<RefCell<Option<Result<VmExit, VmmError>>>>);

impl Outcome {
    /// Records how the VM ends, unless something else already did.
    pub(crate) fn set(&self, outcome: Result<VmExit, VmmError>) {
        let mut slot = self.0.borrow_mut();
        if slot.is_none() {
            *slot = Some(outcome);
        }
    }

    fn take(&self) -> Option<Result<VmExit, VmmError>> {
        self.0.borrow_mut().take()
    }

    /// For a subscriber whose `init` could not register its fd: the loop
    /// would never hear of it, so the VM cannot run.
    fn register(&self, ops: &mut EventOps, fd: &impl AsRawFd, tag: u32) {
        if let Err(e) = ops.add(Events::with_data(fd, tag, EventSet::IN)) {
            self.set(Err(VmmError::EventLoop(e)));
        }
    }
}

/// Puts a VM whose vCPUs are all parked back in the state it was built in:
/// devices, guest memory (kernel, initramfs, boot structures, ACPI) and the
/// in-kernel interrupt controllers and PIT. The vCPUs reset themselves
/// afterwards ([`PauseControl::reset_parked`]).
pub trait VmReset {
    fn reset(&mut self) -> Result<(), VmmError>;
}

/// What the loop waits on; borrowed from [`crate::vm::Vm::run`].
pub struct MainLoop<'a> {
    pub reset: &'a EventFd,
    pub poweroff: &'a EventFd,
    /// The console: stdin (None: no input), the UART it feeds, the UART's
    /// "input room" event, and whether `Ctrl-A x` quits (a raw terminal).
    pub stdin: Option<&'a File>,
    pub serial: &'a Mutex<SerialConsole>,
    pub input_room: &'a EventFd,
    pub watch_escape: bool,
    pub report: &'a StopReport,
    pub signals: &'a OwnedFd,
    pub api_wake: &'a EventFd,
    pub actions: &'a mpsc::Receiver<ActionRequest>,
    pub handles: &'a [VcpuHandle],
    pub pause: &'a PauseControl,
    pub status: &'a VmStatus,
    pub power_button: &'a EventFd,
    pub vm_reset: &'a mut dyn VmReset,
}

impl MainLoop<'_> {
    /// Runs until something ends the VM.
    pub fn run(self) -> Result<VmExit, VmmError> {
        let outcome = Outcome::default();
        let deadline = Rc::new(Cell::new(None));
        let mut manager: EventManager<Box<dyn MutEventSubscriber + '_>> =
            EventManager::new().map_err(VmmError::EventLoop)?;
        manager.add_subscriber(Box::new(GuestEnds {
            reset: self.reset,
            poweroff: self.poweroff,
            outcome: outcome.clone(),
        }));
        let quit = outcome.clone();
        manager.add_subscriber(Box::new(ConsoleInput::new(
            self.stdin,
            self.serial,
            self.input_room,
            self.watch_escape,
            Box::new(move || quit.set(Ok(VmExit::Quit))),
        )));
        manager.add_subscriber(Box::new(VcpuReports {
            report: self.report,
            outcome: outcome.clone(),
        }));
        manager.add_subscriber(Box::new(StopSignals {
            signals: self.signals,
            outcome: outcome.clone(),
        }));
        manager.add_subscriber(Box::new(ApiActions {
            wake: self.api_wake,
            actions: self.actions,
            handles: self.handles,
            pause: self.pause,
            status: self.status,
            power_button: self.power_button,
            vm_reset: self.vm_reset,
            shutdown_deadline: deadline.clone(),
            outcome: outcome.clone(),
        }));
        loop {
            if let Some(outcome) = outcome.take() {
                return outcome;
            }
            let timeout = match deadline.get() {
                None => -1,
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        log::warn!(
                            "the guest did not power off in time after vm.shutdown; stopping it"
                        );
                        return Ok(VmExit::ShutdownTimeout);
                    }
                    // Rounded up, so the wait does not end just before the deadline.
                    i32::try_from(left.as_millis() + 1).unwrap_or(i32::MAX)
                }
            };
            // A signal interrupting the wait is not an error (0 events).
            manager
                .run_with_timeout(timeout)
                .map_err(VmmError::EventLoop)?;
        }
    }
}

/// The guest's reset (i8042) and power-off (ACPI sleep control).
struct GuestEnds<'a> {
    reset: &'a EventFd,
    poweroff: &'a EventFd,
    outcome: Outcome,
}

impl GuestEnds<'_> {
    const RESET: u32 = 0;
    const POWEROFF: u32 = 1;
}

impl MutEventSubscriber for GuestEnds<'_> {
    fn init(&mut self, ops: &mut EventOps) {
        self.outcome.register(ops, self.reset, Self::RESET);
        self.outcome.register(ops, self.poweroff, Self::POWEROFF);
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            Self::RESET => self.outcome.set(Ok(VmExit::Reset)),
            Self::POWEROFF => self.outcome.set(Ok(VmExit::PowerOff)),
            _ => {}
        }
    }
}

/// A vCPU that cannot go on (power-off or reset as a system event, a crash).
struct VcpuReports<'a> {
    report: &'a StopReport,
    outcome: Outcome,
}

impl MutEventSubscriber for VcpuReports<'_> {
    fn init(&mut self, ops: &mut EventOps) {
        self.outcome.register(ops, self.report.wake_fd(), 0);
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        match self.report.take() {
            Some(VcpuStop::PowerOff) => self.outcome.set(Ok(VmExit::PowerOff)),
            Some(VcpuStop::Reset) => self.outcome.set(Ok(VmExit::Reset)),
            Some(VcpuStop::Crash(reason)) => self.outcome.set(Err(VmmError::GuestCrash(reason))),
            None => {}
        }
    }
}

/// The stop signals, blocked in every thread and read here.
struct StopSignals<'a> {
    signals: &'a OwnedFd,
    outcome: Outcome,
}

impl MutEventSubscriber for StopSignals<'_> {
    fn init(&mut self, ops: &mut EventOps) {
        self.outcome.register(ops, self.signals, 0);
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        if let Some(sig) = crate::vm::read_signal(self.signals) {
            self.outcome.set(Ok(VmExit::Signal(sig)));
        }
    }
}

/// The API thread's actions: each comes over `actions` with a write to
/// `wake`, and its answer goes back on its own channel.
struct ApiActions<'a> {
    wake: &'a EventFd,
    actions: &'a mpsc::Receiver<ActionRequest>,
    handles: &'a [VcpuHandle],
    pause: &'a PauseControl,
    status: &'a VmStatus,
    power_button: &'a EventFd,
    vm_reset: &'a mut dyn VmReset,
    /// After `vm.shutdown` with a timeout: when to stop waiting for the guest.
    shutdown_deadline: Rc<Cell<Option<Instant>>>,
    outcome: Outcome,
}

impl MutEventSubscriber for ApiActions<'_> {
    fn init(&mut self, ops: &mut EventOps) {
        self.outcome.register(ops, self.wake, 0);
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Cleared before draining: a request sent after the drain wakes
        // the loop again.
        let _ = self.wake.read();
        while let Ok(request) = self.actions.try_recv() {
            let (result, end) = self.act(request.action);
            // The API thread may have given up waiting.
            let _ = request.reply.send(result);
            if let Some(end) = end {
                self.outcome.set(end);
                return;
            }
        }
    }
}

/// An action's answer and, if it ended the VM, how.
type ActResult = (Result<(), ActionError>, Option<Result<VmExit, VmmError>>);

impl ApiActions<'_> {
    /// Stops every vCPU outside the guest; false if they did not all stop
    /// within [`PAUSE_TIMEOUT`] (the pause request stays up).
    fn park_vcpus(&self) -> bool {
        self.pause.request_pause();
        let handles = self.handles;
        self.pause.wait_parked(handles.len(), PAUSE_TIMEOUT, || {
            handles.iter().for_each(VcpuHandle::kick)
        })
    }

    /// Restarts the guest in place: vCPUs parked, the VM reset, each vCPU
    /// reset by its thread, all let go. A failure once the reset started
    /// leaves a VM that cannot run, so it ends xskvm.
    fn reboot(&mut self, state: VmState) -> ActResult {
        if state != VmState::Paused && !self.park_vcpus() {
            self.pause.resume();
            return (
                Err(ActionError::Failed(format!(
                    "the vCPUs did not stop within {PAUSE_TIMEOUT:?}; the VM runs on"
                ))),
                None,
            );
        }
        let reset = self.vm_reset.reset().and_then(|()| {
            self.pause
                .reset_parked(self.handles.len(), PAUSE_TIMEOUT)
                .map_err(VmmError::Reboot)
        });
        if let Err(e) = reset {
            log::error!("reboot through the API failed: {e}");
            return (
                Err(ActionError::Failed(format!(
                    "reboot failed ({e}); xskvm stops"
                ))),
                Some(Err(e)),
            );
        }
        self.shutdown_deadline.set(None);
        self.status.set_state(VmState::Running);
        self.status.count_reboot();
        self.pause.resume();
        log::info!("VM rebooted through the API");
        (Ok(()), None)
    }

    /// Carries out one action; returns its result and, for those that end
    /// the VM, how.
    fn act(&mut self, action: Action) -> ActResult {
        let state = self.status.state();
        let conflict = |what: &str| {
            Err(ActionError::Conflict(format!(
                "{what}: the VM is {}",
                state.as_str()
            )))
        };
        let result = match action {
            Action::Pause if state != VmState::Running => conflict("cannot pause"),
            Action::Pause => {
                if self.park_vcpus() {
                    self.status.set_state(VmState::Paused);
                    log::info!("VM paused through the API");
                    Ok(())
                } else {
                    self.pause.resume();
                    Err(ActionError::Failed(format!(
                        "the vCPUs did not stop within {PAUSE_TIMEOUT:?}; the VM runs on"
                    )))
                }
            }
            Action::Resume if state != VmState::Paused => conflict("cannot resume"),
            Action::Resume => {
                self.pause.resume();
                self.status.set_state(VmState::Running);
                log::info!("VM resumed through the API");
                Ok(())
            }
            Action::Shutdown { .. } if state != VmState::Running => {
                conflict("cannot shut down (a paused VM must be resumed first)")
            }
            Action::Shutdown { timeout } => match self.power_button.write(1) {
                Ok(()) => {
                    self.status.set_state(VmState::ShuttingDown);
                    self.shutdown_deadline
                        .set(timeout.map(|t| Instant::now() + t));
                    log::info!("power button pressed through the API (timeout {timeout:?})");
                    Ok(())
                }
                Err(e) => Err(ActionError::Failed(format!(
                    "cannot press the power button: {e}"
                ))),
            },
            Action::Reboot => return self.reboot(state),
        };
        (result, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    struct Fixture {
        reset: EventFd,
        poweroff: EventFd,
        /// Stands for stdin (a non-blocking pipe); its writer is `typed`.
        stdin: File,
        typed: std::io::PipeWriter,
        serial: Mutex<SerialConsole>,
        input_room: EventFd,
        report: StopReport,
        signals: OwnedFd,
        _signal_writer: std::io::PipeWriter,
        api_wake: EventFd,
        actions: mpsc::Receiver<ActionRequest>,
        sender: mpsc::Sender<ActionRequest>,
        pause: PauseControl,
        status: VmStatus,
        power_button: EventFd,
        vm_reset: FakeReset,
    }

    /// Counts resets; fails them when `fail`.
    #[derive(Default)]
    struct FakeReset {
        resets: usize,
        fail: bool,
    }

    impl VmReset for FakeReset {
        fn reset(&mut self) -> Result<(), VmmError> {
            self.resets += 1;
            match self.fail {
                true => Err(VmmError::Reboot("cannot reload the kernel".into())),
                false => Ok(()),
            }
        }
    }

    fn evt() -> EventFd {
        EventFd::new(EFD_NONBLOCK).unwrap()
    }

    fn fixture() -> Fixture {
        let (sender, actions) = mpsc::channel();
        // Never readable while the writer lives: a stand-in for the signalfd.
        let (signals, signal_writer) = std::io::pipe().unwrap();
        let (stdin, typed) = std::io::pipe().unwrap();
        let stdin = File::from(OwnedFd::from(stdin));
        // SAFETY: F_SETFL on a descriptor this test owns.
        assert_eq!(
            unsafe { libc::fcntl(stdin.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) },
            0
        );
        let input_room = evt();
        Fixture {
            reset: evt(),
            poweroff: evt(),
            stdin,
            typed,
            serial: Mutex::new(SerialConsole::with_input_room(
                devices::EventTrigger::new(evt()),
                Box::new(std::io::sink()),
                Some(devices::EventTrigger::new(input_room.try_clone().unwrap())),
            )),
            input_room,
            report: StopReport::new(evt()),
            signals: OwnedFd::from(signals),
            _signal_writer: signal_writer,
            api_wake: evt(),
            actions,
            sender,
            pause: PauseControl::default(),
            status: VmStatus::new("t".into(), 1 << 30, "/k".into(), Vec::new(), Vec::new()),
            power_button: evt(),
            vm_reset: FakeReset::default(),
        }
    }

    impl Fixture {
        fn main_loop(&mut self) -> MainLoop<'_> {
            MainLoop {
                reset: &self.reset,
                poweroff: &self.poweroff,
                stdin: Some(&self.stdin),
                serial: &self.serial,
                input_room: &self.input_room,
                watch_escape: true,
                report: &self.report,
                signals: &self.signals,
                api_wake: &self.api_wake,
                actions: &self.actions,
                handles: &[],
                pause: &self.pause,
                status: &self.status,
                power_button: &self.power_button,
                vm_reset: &mut self.vm_reset,
            }
        }

        /// Queues `action`; returns where its answer arrives.
        fn ask(&self, action: Action) -> mpsc::Receiver<Result<(), ActionError>> {
            let (reply, answer) = mpsc::channel();
            self.sender.send(ActionRequest { action, reply }).unwrap();
            self.api_wake.write(1).unwrap();
            answer
        }
    }

    #[test]
    fn each_source_ends_the_loop_its_way() {
        let mut f = fixture();
        f.poweroff.write(1).unwrap();
        assert_eq!(f.main_loop().run().unwrap(), VmExit::PowerOff);
        let mut f = fixture();
        std::io::Write::write_all(&mut f.typed, b"\x01x").unwrap();
        assert_eq!(f.main_loop().run().unwrap(), VmExit::Quit);
        let mut f = fixture();
        f.reset.write(1).unwrap();
        assert_eq!(f.main_loop().run().unwrap(), VmExit::Reset);
        let mut f = fixture();
        f.report.report(VcpuStop::Crash("boom".into()));
        assert!(matches!(
            f.main_loop().run(),
            Err(VmmError::GuestCrash(reason)) if reason == "boom"
        ));
    }

    #[test]
    fn actions_follow_the_vm_state_and_reboot_keeps_it_running() {
        let mut f = fixture();
        let answers: Vec<_> = [
            Action::Resume,
            Action::Pause,
            Action::Pause,
            Action::Shutdown { timeout: None },
            Action::Resume,
            Action::Shutdown {
                timeout: Some(Duration::from_millis(1)),
            },
            Action::Reboot,
            Action::Pause,
            Action::Reboot,
        ]
        .into_iter()
        .map(|a| f.ask(a))
        .collect();
        // Ends only when the guest powers off: neither reboot nor the
        // shutdown timeout (cleared by the reboot) ended it.
        let poweroff = f.poweroff.try_clone().unwrap();
        let guest = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            poweroff.write(1).unwrap();
        });
        assert_eq!(f.main_loop().run().unwrap(), VmExit::PowerOff);
        guest.join().unwrap();
        let answers: Vec<_> = answers.iter().map(|a| a.recv().unwrap()).collect();
        assert!(matches!(&answers[0], Err(ActionError::Conflict(m)) if m.contains("running")));
        assert_eq!(answers[1], Ok(()));
        assert!(matches!(&answers[2], Err(ActionError::Conflict(m)) if m.contains("paused")));
        assert!(matches!(&answers[3], Err(ActionError::Conflict(_))));
        assert_eq!(answers[4..], [Ok(()), Ok(()), Ok(()), Ok(()), Ok(())]);
        assert_eq!(f.vm_reset.resets, 2, "a running and a paused VM rebooted");
        assert_eq!(f.status.state(), VmState::Running);
        assert_eq!(f.status.info()["reboots"], 2);
    }

    #[test]
    fn a_failed_reboot_ends_the_vm_with_an_error() {
        let mut f = fixture();
        f.vm_reset.fail = true;
        let answer = f.ask(Action::Reboot);
        assert!(matches!(
            f.main_loop().run(),
            Err(VmmError::Reboot(m)) if m.contains("kernel")
        ));
        assert!(matches!(
            answer.recv().unwrap(),
            Err(ActionError::Failed(m)) if m.contains("xskvm stops")
        ));
    }

    #[test]
    fn shutdown_presses_the_button_and_times_out() {
        let mut f = fixture();
        let answer = f.ask(Action::Shutdown {
            timeout: Some(Duration::from_millis(50)),
        });
        let started = Instant::now();
        assert_eq!(f.main_loop().run().unwrap(), VmExit::ShutdownTimeout);
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(answer.recv().unwrap(), Ok(()));
        assert_eq!(f.power_button.read().unwrap(), 1, "pressed once");
        assert_eq!(f.status.state(), VmState::ShuttingDown);
        let again = f.ask(Action::Shutdown { timeout: None });
        f.poweroff.write(1).unwrap();
        assert_eq!(f.main_loop().run().unwrap(), VmExit::PowerOff);
        assert!(matches!(
            again.recv().unwrap(),
            Err(ActionError::Conflict(_))
        ));
    }
}
