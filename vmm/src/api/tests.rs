//! Routing and bad requests, without a VM: a status with one NIC whose
//! device has a backend that moves nothing.

use devices::virtio::net::{DetachedBackend, Net, NetBackend, NetConfig};

use super::http::{read_request, Request, Response};
use super::*;
use crate::nic_watch::ModeInfo;

fn status() -> VmStatus {
    let backends: Vec<Box<dyn NetBackend>> = (0..2)
        .map(|_| Box::new(DetachedBackend::new().expect("eventfd")) as Box<dyn NetBackend>)
        .collect();
    let net = Net::new(
        NetConfig {
            id: "net0".into(),
            mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            mtu: 1500,
            spoof_check: true,
            on_thread_start: None,
        },
        backends,
    )
    .unwrap();
    let nic = NicStatus {
        id: "net0".into(),
        ifname: "veth\"0".into(),
        queue_ids: vec![0, 1],
        mode: Arc::new(NicMode::new(ModeInfo {
            zero_copy: vec![false, false],
            multi_buffer: false,
            xdp_mode: Some("skb"),
        })),
        mac: "52:54:00:12:34:56".into(),
        mtu: 1500,
        guest_umem: false,
        tx_gather: false,
        link: Arc::new(GuestLink::new(net.link())),
        counters: net.counters().to_vec(),
        xsk_stats: Arc::default(),
        rx_filter: None,
    };
    nic.counters[1]
        .rx_packets
        .fetch_add(7, std::sync::atomic::Ordering::Relaxed);
    VmStatus::new(
        "test\"vm".into(),
        512 << 20,
        "/k".into(),
        vec![nic],
        vec![Arc::default(), Arc::default()],
    )
}

fn request(method: &str, path: &str, body: &str) -> Request {
    Request {
        method: method.into(),
        path: path.into(),
        body: body.as_bytes().to_vec(),
    }
}

/// Answers a request; actions are recorded and answered by `answer`.
fn call(
    status: &VmStatus,
    method: &str,
    path: &str,
    body: &str,
    answer: Result<(), ActionError>,
) -> (Response, Vec<Action>) {
    let mut seen = Vec::new();
    let response = handle(&request(method, path, body), status, &mut |action| {
        seen.push(action);
        answer.clone()
    });
    (response, seen)
}

fn body_json(response: &Response) -> Value {
    serde_json::from_slice(&response.body).unwrap()
}

fn assert_error(response: &Response, status: u16, contains: &str) {
    assert_eq!(response.status, status, "{response:?}");
    assert_eq!(response.content_type, "application/json");
    let error = body_json(response)["error"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_default();
    assert!(error.contains(contains), "{error:?} lacks {contains:?}");
}

#[test]
fn unknown_paths_are_404() {
    let status = status();
    for path in [
        "/",
        "/api/v1",
        "/api/v1/vm.infoo",
        "/api/v2/vm.info",
        "/api/v1/VM.INFO",
        "/metrics/",
        "//metrics",
    ] {
        let (response, actions) = call(&status, "GET", path, "", Ok(()));
        assert_error(&response, 404, "no API call");
        assert!(actions.is_empty());
    }
}

#[test]
fn wrong_methods_are_405_with_allow() {
    let status = status();
    for (method, path, allowed) in [
        ("PUT", "/api/v1/vm.info", "GET"),
        ("POST", "/api/v1/vm.counters", "GET"),
        ("DELETE", "/metrics", "GET"),
        ("GET", "/api/v1/vm.pause", "PUT"),
        ("GET", "/api/v1/vm.resume", "PUT"),
        ("POST", "/api/v1/vm.shutdown", "PUT"),
        ("GET", "/api/v1/vm.reboot", "PUT"),
        ("GET", "/api/v1/vm.net-link", "PUT"),
        ("get", "/api/v1/vm.info", "GET"),
    ] {
        let (response, actions) = call(&status, method, path, "", Ok(()));
        assert_error(&response, 405, allowed);
        assert!(response.headers.contains(&("Allow", allowed.to_string())));
        assert!(actions.is_empty());
    }
}

#[test]
fn malformed_bodies_are_400_and_never_reach_the_vm() {
    let status = status();
    for (path, body) in [
        ("/api/v1/vm.pause", "{"),
        ("/api/v1/vm.pause", "{\"now\": true}"),
        ("/api/v1/vm.resume", "[]"),
        ("/api/v1/vm.shutdown", "[30]"),
        ("/api/v1/vm.net-link", "[\"net0\", false]"),
        ("/api/v1/vm.reboot", "null"),
        ("/api/v1/vm.shutdown", "{\"timeout_s\": -1}"),
        ("/api/v1/vm.shutdown", "{\"timeout_s\": \"10\"}"),
        ("/api/v1/vm.shutdown", "{\"timeout_s\": 0}"),
        ("/api/v1/vm.shutdown", "{\"timeout_s\": 86401}"),
        ("/api/v1/vm.shutdown", "{\"timeout\": 10}"),
        ("/api/v1/vm.net-link", ""),
        ("/api/v1/vm.net-link", "{\"id\": \"net0\"}"),
        ("/api/v1/vm.net-link", "{\"id\": \"net0\", \"up\": \"no\"}"),
        ("/api/v1/vm.net-link", "{\"id\": 0, \"up\": false}"),
        (
            "/api/v1/vm.net-link",
            "{\"id\": \"net0\", \"up\": false, \"x\": 1}",
        ),
        ("/api/v1/vm.net-link", "\u{feff}{}"),
        (
            "/api/v1/vm.net-link",
            "{\"id\": \"net0\", \"up\": false} trailing",
        ),
    ] {
        let (response, actions) = call(&status, "PUT", path, body, Ok(()));
        assert_eq!(response.status, 400, "{path} {body:?}: {response:?}");
        assert!(body_json(&response)["error"].is_string());
        assert!(actions.is_empty(), "{path} {body:?}");
    }
    assert!(status.nics[0].link.state().2, "the link was not touched");
}

#[test]
fn actions_reach_the_main_thread_with_their_arguments() {
    let status = status();
    for (path, body, want) in [
        ("/api/v1/vm.pause", "", Action::Pause),
        ("/api/v1/vm.pause", " {} ", Action::Pause),
        ("/api/v1/vm.resume", "", Action::Resume),
        ("/api/v1/vm.reboot", "{}", Action::Reboot),
        (
            "/api/v1/vm.shutdown",
            "",
            Action::Shutdown { timeout: None },
        ),
        (
            "/api/v1/vm.shutdown",
            "{\"timeout_s\": 30}",
            Action::Shutdown {
                timeout: Some(Duration::from_secs(30)),
            },
        ),
    ] {
        let (response, actions) = call(&status, "PUT", path, body, Ok(()));
        assert_eq!(response.status, 204, "{path}: {response:?}");
        assert_eq!(actions, [want]);
    }
}

#[test]
fn state_conflicts_are_409_and_failures_500() {
    let status = status();
    let (response, _) = call(
        &status,
        "PUT",
        "/api/v1/vm.resume",
        "",
        Err(ActionError::Conflict(
            "cannot resume: the VM is running".into(),
        )),
    );
    assert_error(&response, 409, "cannot resume");
    let (response, _) = call(
        &status,
        "PUT",
        "/api/v1/vm.pause",
        "",
        Err(ActionError::Failed("vCPUs did not stop".into())),
    );
    assert_error(&response, 500, "did not stop");
    status.set_state(VmState::ShuttingDown);
    let (response, _) = call(
        &status,
        "PUT",
        "/api/v1/vm.net-link",
        "{\"id\": \"net0\", \"up\": false}",
        Ok(()),
    );
    assert_error(&response, 409, "shutting down");
}

#[test]
fn net_link_sets_the_guest_link_and_unknown_nics_are_404() {
    let status = status();
    let (response, _) = call(
        &status,
        "PUT",
        "/api/v1/vm.net-link",
        "{\"id\": \"net7\", \"up\": false}",
        Ok(()),
    );
    assert_error(&response, 404, "net7");
    let (response, actions) = call(
        &status,
        "PUT",
        "/api/v1/vm.net-link",
        "{\"id\": \"net0\", \"up\": false}",
        Ok(()),
    );
    assert_eq!(response.status, 204);
    assert!(actions.is_empty(), "no main thread needed");
    assert_eq!(status.nics[0].link.state(), (false, true, false));
    let info = body_json(&call(&status, "GET", "/api/v1/vm.info", "", Ok(())).0);
    assert_eq!(info["nics"][0]["link"]["up"], false);
    // The host link coming back does not override the API's "down".
    status.nics[0].link.set_host_up(false);
    status.nics[0].link.set_host_up(true);
    assert_eq!(status.nics[0].link.state(), (false, true, false));
    call(
        &status,
        "PUT",
        "/api/v1/vm.net-link",
        "{\"id\": \"net0\", \"up\": true}",
        Ok(()),
    );
    assert_eq!(status.nics[0].link.state(), (true, true, true));
}

#[test]
fn info_says_what_backs_guest_memory() {
    let status = status().with_hugepages(Some(2 << 20));
    let (response, _) = call(&status, "GET", "/api/v1/vm.info", "", Ok(()));
    assert_eq!(body_json(&response)["memory_hugepage_bytes"], 2u64 << 20);
}

#[test]
fn info_describes_the_vm_and_its_nics() {
    let status = status();
    let (response, _) = call(&status, "GET", "/api/v1/vm.info", "", Ok(()));
    assert_eq!(response.status, 200);
    let info = body_json(&response);
    assert_eq!(info["state"], "running");
    assert_eq!(info["memory_bytes"], 512u64 << 20);
    assert_eq!(info["memory_hugepage_bytes"], Value::Null);
    assert_eq!(info["vcpus"], 2);
    assert_eq!(info["kernel"], "/k");
    let nic = &info["nics"][0];
    assert_eq!(nic["id"], "net0");
    assert_eq!(nic["ifname"], "veth\"0");
    assert_eq!(nic["queues"], 2);
    assert_eq!(nic["mode"], "copy");
    assert_eq!(nic["xdp_mode"], "skb");
    assert_eq!(nic["mac"], "52:54:00:12:34:56");
    assert_eq!(nic["mtu"], 1500);
    assert_eq!(nic["umem"], "own");
    assert_eq!(nic["tx_gather"], false);
    assert_eq!(nic["link"]["up"], true);
}

#[test]
fn info_shows_the_mode_the_nic_is_in_now() {
    let status = status();
    let nic_info = |status: &VmStatus| {
        let (response, _) = call(status, "GET", "/api/v1/vm.info", "", Ok(()));
        body_json(&response)["nics"][0].clone()
    };
    // Reopened by the watcher in another mode: one queue zero-copy.
    status.nics[0].mode.set(Some(ModeInfo {
        zero_copy: vec![true, false],
        multi_buffer: true,
        xdp_mode: Some("native"),
    }));
    let nic = nic_info(&status);
    assert_eq!(nic["mode"], "mixed", "{nic}");
    assert_eq!(nic["multi_buffer"], true);
    assert_eq!(nic["xdp_mode"], "native");
    status.nics[0].mode.set(Some(ModeInfo {
        zero_copy: vec![true, true],
        multi_buffer: false,
        xdp_mode: None,
    }));
    let nic = nic_info(&status);
    assert_eq!(nic["mode"], "zero-copy", "{nic}");
    assert!(nic["xdp_mode"].is_null(), "inhibit=on: {nic}");
    // The interface is gone: no sockets, no mode.
    status.nics[0].mode.set(None);
    let nic = nic_info(&status);
    for key in ["mode", "multi_buffer", "xdp_mode"] {
        assert!(nic[key].is_null(), "{key}: {nic}");
    }
    assert_eq!(nic["ifname"], "veth\"0", "the rest stays");
}

#[test]
fn counters_list_every_device_counter_per_queue() {
    let status = status();
    let (response, _) = call(&status, "GET", "/api/v1/vm.counters", "", Ok(()));
    assert_eq!(response.status, 200);
    let counters = body_json(&response);
    let queues = counters["nics"][0]["queues"].as_array().unwrap();
    assert_eq!(queues.len(), 2);
    let device = queues[1]["device"].as_object().unwrap();
    let names = devices::virtio::net::CountersSnapshot::default().values();
    assert_eq!(device.len(), names.len());
    assert_eq!(device["rx_packets"], 7);
    assert!(queues[1]["af_xdp_kernel"].is_null(), "no socket here");
    assert!(
        queues[1]["xdp_filtered_frames"].is_null(),
        "no program here"
    );
    let vcpus = counters["vcpus"].as_array().unwrap();
    assert_eq!(vcpus.len(), 2);
    assert_eq!(vcpus[1]["exits"]["mmio_write"], 0);
}

#[test]
fn metrics_are_prometheus_text_with_labels() {
    let status = status();
    let (response, _) = call(&status, "GET", "/metrics", "", Ok(()));
    assert_eq!(response.status, 200);
    assert_eq!(response.content_type, metrics::CONTENT_TYPE);
    let text = String::from_utf8(response.body).unwrap();
    assert!(
        text.contains("xskvm_net_rx_packets_total{vm=\"test\\\"vm\",nic=\"net0\",queue=\"1\"} 7\n"),
        "{text}"
    );
    assert!(text.contains("# TYPE xskvm_net_rx_packets_total counter\n"));
    assert!(text.contains("xskvm_vm_state{vm=\"test\\\"vm\",state=\"running\"} 1\n"));
    // Every sample's family was announced just before its samples.
    let mut current = String::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            current = rest.split(' ').next().unwrap().to_string();
        } else if !line.starts_with('#') {
            let name = line.split('{').next().unwrap();
            assert_eq!(name, current, "{line}");
        }
    }
}

#[test]
fn raw_bad_requests_get_json_errors() {
    // What the API thread does with bytes that are not a request.
    for (raw, want) in [
        (&b"NOT HTTP\r\n\r\n"[..], 400),
        (
            b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 999999\r\n\r\n",
            413,
        ),
    ] {
        let error = read_request(&mut &raw[..]).unwrap_err();
        let response = Response::error(error.status().unwrap(), &error);
        assert_eq!(response.status, want);
        assert!(body_json(&response)["error"].is_string());
    }
}
