//! Debian bookworm's own kernel (Linux 6.1) as the host and the guest:
//! it has AF_XDP but neither TX metadata (6.8) nor multi-buffer sockets
//! (6.6) nor XDP_MAX_TX_SKB_BUDGET (6.17). xskvm must say so and work:
//! checksums filled in the IO thread, frames capped to one UMEM frame.
//! Always in the nested test host (booted with that kernel), also where
//! this machine could run guests directly on its own, newer kernel.

mod common;

use std::path::{Path, PathBuf};

use common::{cache_dir, repo_root, run_scenario_with_env, ScenarioOutput};

const XSKVM: &str = env!("CARGO_BIN_EXE_xskvm");

/// Where the 6.1 kernel, its guest image and test host are built: a cache
/// of their own beside the default one.
fn old_cache() -> PathBuf {
    cache_dir().join("bookworm-6.1")
}

fn env() -> [(&'static str, String); 3] {
    [
        ("XSKVM_CACHE", old_cache().display().to_string()),
        ("XSKVM_KERNEL_PKG", "bookworm".to_string()),
        ("XSKVM_SCENARIO_MODE", "nested".to_string()),
    ]
}

fn run(script: &str) -> ScenarioOutput {
    let env = env();
    let status = std::process::Command::new("bash")
        .arg(repo_root().join("resources/guest-image.sh"))
        .envs(env.iter().map(|(k, v)| (k, v.as_str())))
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run resources/guest-image.sh");
    assert!(status.success(), "building the 6.1 guest image failed");
    let guest = old_cache().join("guest");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    run_scenario_with_env(script, &[Path::new(XSKVM), &guest], &env)
}

/// MTU 1500: ping and iperf3 both ways, the transmit checksums filled by
/// xskvm. MTU 9000 on the host: no multi-buffer, so the guest gets MTU
/// 3822 and 3822-byte packets go both ways unfragmented.
#[test]
fn linux_6_1_works_without_tx_metadata_and_caps_the_mtu_without_multi_buffer() {
    let guest = old_cache().join("guest");
    let script = format!(
        r#"
set -u
echo "HOST-KERNEL=$(uname -r | cut -d. -f1,2)"
ip netns add peer
ip link add xs0 type veth peer name xs1
ip link set xs1 netns peer
ip -n peer addr add 10.77.0.1/24 dev xs1
ip -n peer link set xs1 up
ip link set xs0 up
ip netns exec peer iperf3 -s -D
boot() {{
    {XSKVM} --kernel {g}/bzImage --initrd {g}/initramfs.cpio.gz --memory 512M --log-level debug \
        --net af-xdp,ifname=xs0 \
        --cmdline "console=ttyS0 reboot=k panic=-1 pci=off quiet -- \"ip addr add 10.77.0.2/24 dev eth0; ip link set eth0 up; sleep 1; echo GUEST-KERNEL=\$(uname -r | cut -d. -f1,2); echo GUEST-MTU=\$(cat /sys/class/net/eth0/mtu); $1; echo GUEST-SERVER-UP; sleep 600\"" \
        </dev/null >/tmp/console 2>/tmp/console.log &
    XSKVM_PID=$!
    for i in $(seq 2400); do grep -q GUEST-SERVER-UP /tmp/console && break; kill -0 $XSKVM_PID || break; sleep 0.1; done
}}
finish() {{
    kill -TERM $XSKVM_PID
    wait $XSKVM_PID
    echo "XSKVM-RC=$?"
    for i in $(seq 20); do ip -d link show xs0 | grep -q xdp || break; sleep 0.1; done
    if ip -d link show xs0 | grep -q xdp; then echo XDP=left; else echo XDP=gone; fi
    cat /tmp/console /tmp/console.log
}}
boot "/usr/bin/ping -c 2 -W 5 10.77.0.1 >/dev/null && echo GUEST-PING=ok; iperf3 -c 10.77.0.1 -t 4 -f m; iperf3 -c 10.77.0.1 -t 4 -f m -R"
ip netns exec peer ping -c 2 -W 5 10.77.0.2 >/dev/null && echo PEER-PING=ok
finish
ip link set xs0 mtu 9000
ip -n peer link set xs1 mtu 9000
boot "/usr/bin/ping -c 2 -W 5 -s 3794 -M do 10.77.0.1 >/dev/null && echo GUEST-PING-3822=ok"
ip netns exec peer /usr/bin/ping -c 2 -W 5 -s 3794 -M do 10.77.0.2 >/dev/null && echo PEER-PING-3822=ok
finish
"#,
        g = guest.display()
    );
    let out = run(&script);
    let d = out.describe();
    assert_eq!(out.status, Some(0), "{d}");
    assert_eq!(out.value_of("HOST-KERNEL"), Some("6.1"), "{d}");
    assert_eq!(out.value_of("GUEST-KERNEL"), Some("6.1"), "{d}");
    let count = |s: &str| out.stdout.matches(s).count();
    assert_eq!(count("XSKVM-RC=0"), 2, "{d}");
    assert_eq!(count("XDP=gone"), 2, "{d}");
    assert_eq!(count("GUEST-PING=ok"), 1, "{d}");
    assert_eq!(count("PEER-PING=ok"), 1, "{d}");
    assert!(
        out.stdout
            .contains("transmit checksums by xskvm (no AF_XDP TX metadata before Linux 6.8)"),
        "{d}"
    );
    // Bulk traffic flows; the throughput floor is tests/net.rs's.
    common::assert_iperf_both_ways(&out, 5.0, "Linux 6.1: ");
    // MTU 9000 on the host: capped, said so, and what fits goes whole.
    assert!(out.stdout.contains("no multi-buffer AF_XDP here"), "{d}");
    assert!(out.stdout.contains("the guest gets MTU 3822"), "{d}");
    assert_eq!(out.value_of("GUEST-MTU"), Some("3822"), "{d}");
    assert_eq!(count("GUEST-PING-3822=ok"), 1, "{d}");
    assert_eq!(count("PEER-PING-3822=ok"), 1, "{d}");
}
