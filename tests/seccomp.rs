//! Seccomp in a real run: with the default `--seccomp on`, every xskvm
//! thread (main, vCPUs, virtio-net IO threads, NIC watcher, API)
//! runs under a filter while a guest moves traffic, and the guest still
//! ends cleanly. Direct on hosts with hardware virtualization, in the
//! nested test host otherwise.

mod common;

use std::path::Path;

use common::{guest_image, run_scenario};

const XSKVM: &str = env!("CARGO_BIN_EXE_xskvm");

#[test]
fn every_thread_is_filtered_while_a_networked_guest_runs() {
    let image = guest_image();
    // Two vCPUs and two queue pairs: two vCPU and two net IO threads. The
    // guest pings the peer, then waits for a line on its console (read by
    // the main thread's loop: no thread of its own), so the threads are
    // listed while all of them live; the line comes, then the end of input.
    let script = format!(
        r#"
set -u
ip netns add peer
ip link add xs0 numtxqueues 2 numrxqueues 2 type veth peer name xs1 numtxqueues 2 numrxqueues 2
ip link set xs1 netns peer
ip -n peer addr add 10.77.0.1/24 dev xs1
ip -n peer link set xs1 up
ip link set xs0 up
mkfifo /tmp/in
{XSKVM} --kernel {kernel} --initrd {initrd} --memory 512M --vcpus 2 \
    --net af-xdp,ifname=xs0,queues=2 --api-socket /tmp/api.sock \
    --cmdline "console=ttyS0 reboot=k panic=-1 pci=off quiet -- \"ip addr add 10.77.0.2/24 dev eth0; ip link set eth0 up; ping -c 3 -W 5 10.77.0.1 && echo GUEST-PING=ok; read line; echo got:\$line\"" \
    </tmp/in >/tmp/console 2>/tmp/console.log &
pid=$!
exec 3>/tmp/in
for i in $(seq 1200); do grep -q GUEST-PING=ok /tmp/console && break; kill -0 $pid 2>/dev/null || break; sleep 0.1; done
for task in /proc/$pid/task/*; do
    echo "THREAD $(cat $task/comm) seccomp=$(awk '/^Seccomp:/ {{print $2}}' $task/status)"
done
echo bye >&3
exec 3>&-
wait $pid
echo "XSKVM-RC=$?"
cat /tmp/console /tmp/console.log
"#,
        kernel = image.bzimage.display(),
        initrd = image.initramfs.display(),
    );
    let out = run_scenario(
        &script,
        &[Path::new(XSKVM), &image.bzimage, &image.initramfs],
    );
    assert_eq!(out.status, Some(0), "scenario failed\n{}", out.describe());
    assert_eq!(out.value_of("GUEST-PING"), Some("ok"), "{}", out.describe());
    let threads: Vec<(&str, &str)> = out
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("THREAD "))
        .filter_map(|l| l.rsplit_once(" seccomp="))
        .collect();
    for name in [
        "xskvm",
        "xskvm-vcpu0",
        "xskvm-vcpu1",
        "xskvm-net0-q0",
        "xskvm-net0-q1",
        "xskvm-nicwatch",
        "xskvm-api",
    ] {
        assert!(
            threads.iter().any(|(n, _)| *n == name),
            "no thread {name}\n{}",
            out.describe()
        );
    }
    assert!(
        !threads.iter().any(|(n, _)| *n == "xskvm-stdin"),
        "console input has no thread any more\n{}",
        out.describe()
    );
    // 2 = SECCOMP_MODE_FILTER. Only xskvm's own threads are checked: KVM
    // may add a worker of its own to the process (kvm-nx-lpage-recovery).
    for (name, mode) in threads.iter().filter(|(n, _)| n.starts_with("xskvm")) {
        assert_eq!(*mode, "2", "thread {name} unfiltered\n{}", out.describe());
    }
    assert!(
        out.stdout.contains("got:bye"),
        "console input\n{}",
        out.describe()
    );
    assert_eq!(out.value_of("XSKVM-RC"), Some("0"), "{}", out.describe());
}
