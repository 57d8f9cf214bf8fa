//! `--api-socket`: HTTP/1.1 with JSON bodies over a Unix socket, served by
//! a thread of its own (`xskvm-api`). Reads (`vm.info`, `vm.counters`,
//! `/metrics`) are answered there from shared state; calls that change the
//! VM (pause, resume, shutdown, reboot) go to the main thread, which owns
//! the vCPU threads, and their answer comes back. See docs/api.md.

pub mod http;
pub mod metrics;
mod server;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::Duration;

use devices::virtio::net::QueuePairCounters;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::afxdp::XdpRxFilter;
use crate::nic_watch::{GuestLink, NicMode, XskStats};
use crate::vcpu::VcpuExitCounters;
use http::{Request, Response};
pub use server::{ApiError, ApiListener, ApiServer};

/// Where a VM is in its life, as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    Running,
    Paused,
    /// The power button was pressed; waiting for the guest to power off.
    ShuttingDown,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::ShuttingDown => "shutting-down",
        }
    }
}

/// One NIC as the API shows it.
pub struct NicStatus {
    pub id: String,
    pub ifname: String,
    pub queue_ids: Vec<u32>,
    /// Zero-copy or copy, multi-buffer, how our program is attached: as
    /// the NIC is set up now (followed by the NIC watcher).
    pub mode: Arc<NicMode>,
    pub mac: String,
    pub mtu: u16,
    /// `umem=guest`: the sockets' UMEM is guest memory.
    pub guest_umem: bool,
    /// `tx-gather=on`: frames are sent from guest memory, not copied.
    pub tx_gather: bool,
    pub link: Arc<GuestLink>,
    pub counters: Vec<Arc<QueuePairCounters>>,
    pub xsk_stats: Arc<XskStats>,
    /// Our XDP program's receive filter (None with inhibit=on).
    pub rx_filter: Option<Arc<XdpRxFilter>>,
}

impl NicStatus {
    /// Frames the receive filter passed to the host stack instead of the
    /// guest, on queue pair `pair`'s device queue.
    pub fn filtered_frames(&self, pair: usize) -> Option<u64> {
        let queue = *self.queue_ids.get(pair)?;
        self.rx_filter.as_ref()?.filtered_frames(queue)
    }
}

/// What the API thread reads without asking the main thread: fixed facts,
/// the state (written by the main thread), live counters.
pub struct VmStatus {
    pub name: String,
    pub memory: u64,
    /// Bytes of each hugepage backing guest RAM; `None`: ordinary pages.
    hugepage_bytes: Option<u64>,
    pub kernel: PathBuf,
    state: Mutex<VmState>,
    /// Reboots through the API so far.
    reboots: AtomicU64,
    pub nics: Vec<NicStatus>,
    pub vcpu_exits: Vec<Arc<VcpuExitCounters>>,
}

impl VmStatus {
    pub fn new(
        name: String,
        memory: u64,
        kernel: PathBuf,
        nics: Vec<NicStatus>,
        vcpu_exits: Vec<Arc<VcpuExitCounters>>,
    ) -> Self {
        Self {
            name,
            memory,
            hugepage_bytes: None,
            kernel,
            state: Mutex::new(VmState::Running),
            reboots: AtomicU64::new(0),
            nics,
            vcpu_exits,
        }
    }

    /// Guest RAM is on hugepages of this many bytes.
    pub fn with_hugepages(mut self, hugepage_bytes: Option<u64>) -> Self {
        self.hugepage_bytes = hugepage_bytes;
        self
    }

    pub fn state(&self) -> VmState {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn set_state(&self, state: VmState) {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = state;
    }

    pub fn count_reboot(&self) {
        self.reboots.fetch_add(1, Ordering::Relaxed);
    }

    fn nic(&self, id: &str) -> Option<&NicStatus> {
        self.nics.iter().find(|n| n.id == id)
    }

    /// `GET /api/v1/vm.info`.
    pub fn info(&self) -> Value {
        let nics: Vec<Value> = self
            .nics
            .iter()
            .map(|nic| {
                let (up, host_up, admin_up) = nic.link.state();
                // All null while the interface is gone (no sockets).
                let current = nic.mode.get();
                let mode = current.as_ref().map(|m| {
                    if m.zero_copy.iter().all(|&z| z) {
                        "zero-copy"
                    } else if m.zero_copy.iter().any(|&z| z) {
                        "mixed"
                    } else {
                        "copy"
                    }
                });
                json!({
                    "id": nic.id,
                    "ifname": nic.ifname,
                    "queues": nic.queue_ids.len(),
                    "queue_ids": nic.queue_ids,
                    "mode": mode,
                    "multi_buffer": current.as_ref().map(|m| m.multi_buffer),
                    "xdp_mode": current.as_ref().and_then(|m| m.xdp_mode),
                    "umem": if nic.guest_umem { "guest" } else { "own" },
                    "tx_gather": nic.tx_gather,
                    "mac": nic.mac,
                    "mtu": nic.mtu,
                    "link": {"up": up, "host_up": host_up, "admin_up": admin_up},
                })
            })
            .collect();
        json!({
            "name": self.name,
            "state": self.state().as_str(),
            "reboots": self.reboots.load(Ordering::Relaxed),
            "memory_bytes": self.memory,
            "memory_hugepage_bytes": self.hugepage_bytes,
            "vcpus": self.vcpu_exits.len(),
            "kernel": self.kernel.display().to_string(),
            "nics": nics,
        })
    }

    /// `GET /api/v1/vm.counters`.
    pub fn counters(&self) -> Value {
        let vcpus: Vec<Value> = self
            .vcpu_exits
            .iter()
            .enumerate()
            .map(|(index, exits)| {
                let exits: Map<String, Value> = exits
                    .values()
                    .into_iter()
                    .map(|(name, value)| (name.to_string(), value.into()))
                    .collect();
                json!({"vcpu": index, "exits": exits})
            })
            .collect();
        let nics: Vec<Value> = self
            .nics
            .iter()
            .map(|nic| {
                let kernel = nic.xsk_stats.kernel();
                let queues: Vec<Value> = nic
                    .counters
                    .iter()
                    .enumerate()
                    .map(|(pair, counters)| {
                        let device: Map<String, Value> = counters
                            .snapshot()
                            .values()
                            .into_iter()
                            .map(|c| (c.name.to_string(), c.value.into()))
                            .collect();
                        let af_xdp = kernel.get(pair).copied().flatten().map(|k| {
                            xdp_statistics(&k)
                                .into_iter()
                                .map(|(name, value)| (name.to_string(), Value::from(value)))
                                .collect::<Map<String, Value>>()
                        });
                        json!({
                            "queue": pair,
                            "device": device,
                            "af_xdp_kernel": af_xdp,
                            "xdp_filtered_frames": nic.filtered_frames(pair),
                        })
                    })
                    .collect();
                json!({"id": nic.id, "queues": queues})
            })
            .collect();
        json!({"vcpus": vcpus, "nics": nics})
    }
}

/// The kernel's AF_XDP socket statistics (`XDP_STATISTICS`) by name.
pub fn xdp_statistics(k: &net_afxdp::XdpStatistics) -> [(&'static str, u64); 6] {
    [
        ("rx_dropped", k.rx_dropped),
        ("rx_invalid_descs", k.rx_invalid_descs),
        ("tx_invalid_descs", k.tx_invalid_descs),
        ("rx_ring_full", k.rx_ring_full),
        ("rx_fill_ring_empty_descs", k.rx_fill_ring_empty_descs),
        ("tx_ring_empty_descs", k.tx_ring_empty_descs),
    ]
}

/// A call the main thread carries out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pause,
    Resume,
    /// Press the power button; stop the VM ourselves after `timeout`.
    Shutdown {
        timeout: Option<Duration>,
    },
    Reboot,
}

/// Why the main thread refused or failed an action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionError {
    /// The VM's state does not allow it (409).
    Conflict(String),
    /// It was tried and failed (500).
    Failed(String),
}

/// An action and where its answer goes.
pub struct ActionRequest {
    pub action: Action,
    pub reply: mpsc::Sender<Result<(), ActionError>>,
}

/// Routes one request: answers reads from `status`, hands actions to
/// `act` (which waits for the main thread).
pub fn handle(
    request: &Request,
    status: &VmStatus,
    act: &mut dyn FnMut(Action) -> Result<(), ActionError>,
) -> Response {
    let route = match route(&request.method, &request.path) {
        Ok(route) => route,
        Err(response) => return response,
    };
    match route {
        Route::Info => Response::json(200, &status.info()),
        Route::Counters => Response::json(200, &status.counters()),
        Route::Metrics => metrics::response(status),
        Route::Action(kind) => {
            let action = match parse_action(kind, &request.body) {
                Ok(action) => action,
                Err(message) => return Response::error(400, message),
            };
            match act(action) {
                Ok(()) => Response::no_content(),
                Err(ActionError::Conflict(message)) => Response::error(409, message),
                Err(ActionError::Failed(message)) => Response::error(500, message),
            }
        }
        Route::NetLink => {
            let body: NetLinkBody = match parse_body(&request.body) {
                Ok(Some(body)) => body,
                Ok(None) => {
                    return Response::error(400, "a body {\"id\": ..., \"up\": ...} is required")
                }
                Err(message) => return Response::error(400, message),
            };
            if status.state() == VmState::ShuttingDown {
                return Response::error(409, "the VM is shutting down");
            }
            match status.nic(&body.id) {
                Some(nic) => {
                    if nic.link.set_admin_up(body.up) {
                        log::info!(
                            "{}: link set {} through the API",
                            nic.id,
                            if body.up { "up" } else { "down" }
                        );
                    }
                    Response::no_content()
                }
                None => Response::error(404, format!("no NIC {:?}", body.id)),
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ActionKind {
    Pause,
    Resume,
    Shutdown,
    Reboot,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Info,
    Counters,
    Metrics,
    Action(ActionKind),
    NetLink,
}

/// Path and method to a route, or the 404/405 answer.
fn route(method: &str, path: &str) -> Result<Route, Response> {
    let (route, allowed) = match path {
        "/api/v1/vm.info" => (Route::Info, "GET"),
        "/api/v1/vm.counters" => (Route::Counters, "GET"),
        "/metrics" => (Route::Metrics, "GET"),
        "/api/v1/vm.pause" => (Route::Action(ActionKind::Pause), "PUT"),
        "/api/v1/vm.resume" => (Route::Action(ActionKind::Resume), "PUT"),
        "/api/v1/vm.shutdown" => (Route::Action(ActionKind::Shutdown), "PUT"),
        "/api/v1/vm.reboot" => (Route::Action(ActionKind::Reboot), "PUT"),
        "/api/v1/vm.net-link" => (Route::NetLink, "PUT"),
        _ => return Err(Response::error(404, format!("no API call at {path}"))),
    };
    if method != allowed {
        return Err(
            Response::error(405, format!("{path} takes {allowed}, not {method}"))
                .with_header("Allow", allowed.to_string()),
        );
    }
    Ok(route)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetLinkBody {
    id: String,
    up: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShutdownBody {
    /// Seconds to wait for the guest to power off before stopping it.
    timeout_s: Option<u64>,
}

/// Most seconds a shutdown timeout may be: a day.
const MAX_SHUTDOWN_TIMEOUT_S: u64 = 24 * 3600;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EmptyBody {}

/// Parses a JSON body, which must be an object (serde would also take
/// an array for a struct); an empty body is `None` (calls without
/// arguments accept none, or `{}`).
fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<Option<T>, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("bad JSON body: {e}"))?;
    if !value.is_object() {
        return Err("bad JSON body: not an object".into());
    }
    serde_json::from_value(value)
        .map(Some)
        .map_err(|e| format!("bad JSON body: {e}"))
}

fn parse_action(kind: ActionKind, body: &[u8]) -> Result<Action, String> {
    let without_arguments = |action| parse_body::<EmptyBody>(body).map(|_| action);
    match kind {
        ActionKind::Pause => without_arguments(Action::Pause),
        ActionKind::Resume => without_arguments(Action::Resume),
        ActionKind::Reboot => without_arguments(Action::Reboot),
        ActionKind::Shutdown => {
            let timeout_s = parse_body::<ShutdownBody>(body)?.and_then(|b| b.timeout_s);
            if timeout_s.is_some_and(|t| t == 0 || t > MAX_SHUTDOWN_TIMEOUT_S) {
                return Err(format!(
                    "timeout_s must be 1 to {MAX_SHUTDOWN_TIMEOUT_S} seconds"
                ));
            }
            Ok(Action::Shutdown {
                timeout: timeout_s.map(Duration::from_secs),
            })
        }
    }
}

#[cfg(test)]
mod tests;
