//! `GET /metrics`: the counters of `vm.counters` in the Prometheus text
//! exposition format (version 0.0.4), labelled `vm`, `nic`, `queue` (and
//! `vcpu`, `reason` for vCPU exits). Every family is written whole, with
//! its HELP and TYPE lines first, as the format requires.

use std::fmt::Write;

use devices::virtio::net::CountersSnapshot;

use super::http::Response;
use super::{xdp_statistics, VmState, VmStatus};

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub fn response(status: &VmStatus) -> Response {
    Response {
        status: 200,
        content_type: CONTENT_TYPE,
        headers: Vec::new(),
        body: render(status).into_bytes(),
    }
}

/// One family being written.
struct Family<'a> {
    out: &'a mut String,
    name: String,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: String, kind: &str, help: &str) -> Self {
        // Writing to a String cannot fail.
        let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Self { out, name }
    }

    fn sample(&mut self, labels: &[(&str, &str)], value: u64) {
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
            .collect();
        let _ = writeln!(self.out, "{}{{{}}} {value}", self.name, labels.join(","));
    }
}

/// HELP text: backslash and newline escaped.
fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Label values: backslash, double quote and newline escaped.
fn escape_label(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn render(status: &VmStatus) -> String {
    let mut out = String::new();
    let vm = status.name.as_str();

    let state = status.state();
    let mut family = Family::new(
        &mut out,
        "xskvm_vm_state".into(),
        "gauge",
        "1 for the state the VM is in, 0 for the others.",
    );
    for s in [VmState::Running, VmState::Paused, VmState::ShuttingDown] {
        family.sample(&[("vm", vm), ("state", s.as_str())], u64::from(s == state));
    }
    Family::new(
        &mut out,
        "xskvm_vm_memory_bytes".into(),
        "gauge",
        "Guest RAM.",
    )
    .sample(&[("vm", vm)], status.memory);
    Family::new(&mut out, "xskvm_vm_vcpus".into(), "gauge", "vCPUs.")
        .sample(&[("vm", vm)], status.vcpu_exits.len() as u64);

    let exits: Vec<_> = status.vcpu_exits.iter().map(|e| e.values()).collect();
    if !exits.is_empty() {
        let mut family = Family::new(
            &mut out,
            "xskvm_vcpu_exits_total".into(),
            "counter",
            "KVM_RUN exits by reason (interrupted: a signal or retry; other: ended the VM).",
        );
        for (index, values) in exits.iter().enumerate() {
            let vcpu = index.to_string();
            for (reason, value) in values {
                family.sample(&[("vm", vm), ("vcpu", &vcpu), ("reason", reason)], *value);
            }
        }
    }

    if status.nics.is_empty() {
        return out;
    }
    let mut family = Family::new(
        &mut out,
        "xskvm_net_link_up".into(),
        "gauge",
        "1 when the guest sees the NIC's link up.",
    );
    for nic in &status.nics {
        family.sample(
            &[("vm", vm), ("nic", &nic.id)],
            u64::from(nic.link.state().0),
        );
    }

    // Per queue pair: the device's counters, then the kernel's AF_XDP
    // statistics, each read once so that a family's samples agree.
    struct Queue<'a> {
        nic: &'a str,
        queue: String,
        device: CountersSnapshot,
        kernel: Option<net_afxdp::XdpStatistics>,
        filtered: Option<u64>,
    }
    let mut queues = Vec::new();
    for nic in &status.nics {
        let kernel = nic.xsk_stats.kernel();
        for (pair, counters) in nic.counters.iter().enumerate() {
            queues.push(Queue {
                nic: &nic.id,
                queue: pair.to_string(),
                device: counters.snapshot(),
                kernel: kernel.get(pair).copied().flatten(),
                filtered: nic.filtered_frames(pair),
            });
        }
    }
    let device: Vec<_> = queues.iter().map(|q| q.device.values()).collect();
    for (index, counter) in CountersSnapshot::default().values().iter().enumerate() {
        let help = if counter.help.is_empty() {
            format!("virtio-net queue pair counter {}.", counter.name)
        } else {
            counter.help.to_string()
        };
        let mut family = Family::new(
            &mut out,
            format!("xskvm_net_{}_total", counter.name),
            "counter",
            &help,
        );
        for (queue, values) in queues.iter().zip(&device) {
            let value = values.get(index).map_or(0, |v| v.value);
            family.sample(
                &[("vm", vm), ("nic", queue.nic), ("queue", &queue.queue)],
                value,
            );
        }
    }
    for (index, (name, _)) in xdp_statistics(&Default::default()).iter().enumerate() {
        let mut family = Family::new(
            &mut out,
            format!("xskvm_afxdp_{name}_total"),
            "counter",
            &format!(
                "The kernel's {name} statistic of the queue's AF_XDP socket (XDP_STATISTICS)."
            ),
        );
        for queue in &queues {
            if let Some(kernel) = &queue.kernel {
                family.sample(
                    &[("vm", vm), ("nic", queue.nic), ("queue", &queue.queue)],
                    xdp_statistics(kernel)[index].1,
                );
            }
        }
    }
    let mut family = Family::new(
        &mut out,
        "xskvm_xdp_filtered_frames_total".into(),
        "counter",
        "Frames the receive filter passed to the host stack instead of the guest.",
    );
    for queue in &queues {
        if let Some(filtered) = queue.filtered {
            family.sample(
                &[("vm", vm), ("nic", queue.nic), ("queue", &queue.queue)],
                filtered,
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_help_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(escape_help("x\\y\nz \"q\""), "x\\\\y\\nz \"q\"");
    }
}
