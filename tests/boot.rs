//! Boot tests: a stock Debian kernel and the initramfs from
//! resources/guest-image.sh boot through xskvm to their marker, run a
//! command, and end xskvm the way the guest asked. They run directly on a
//! host with hardware virtualization and in the nested test host otherwise.

mod common;

use std::path::Path;

use common::{guest_image, run_scenario, ScenarioOutput};

const XSKVM: &str = env!("CARGO_BIN_EXE_xskvm");
const GUEST_READY: &str = "XSKVM-GUEST-READY";

/// A scenario that boots one guest running `command` and reports xskvm's
/// exit status as XSKVM-RC.
fn boot_guest(kernel: &Path, vcpus: u32, command: &str) -> ScenarioOutput {
    let image = guest_image();
    let script = format!(
        r#"
ms() {{ awk '{{print int($1 * 1000)}}' /proc/uptime; }}
start=$(ms)
{XSKVM} --kernel {kernel} --initrd {initrd} --vcpus {vcpus} --memory 512M \
    --cmdline "console=ttyS0 reboot=k panic=-1 pci=off quiet -- {command}" </dev/null
echo "XSKVM-RC=$?"
echo "XSKVM-MS=$(( $(ms) - start ))"
"#,
        kernel = kernel.display(),
        initrd = image.initramfs.display(),
    );
    run_scenario(&script, &[Path::new(XSKVM), kernel, &image.initramfs])
}

fn assert_clean_run(out: &ScenarioOutput) {
    assert_eq!(out.status, Some(0), "scenario failed\n{}", out.describe());
    assert!(
        out.stdout.contains(GUEST_READY),
        "no guest marker\n{}",
        out.describe()
    );
    assert_eq!(
        out.value_of("XSKVM-GUEST-EXIT"),
        Some("0"),
        "{}",
        out.describe()
    );
    assert_eq!(out.value_of("XSKVM-RC"), Some("0"), "{}", out.describe());
}

/// The line the guest printed right after its ready marker.
fn first_output_line(out: &ScenarioOutput) -> Option<&str> {
    let mut lines = out.stdout.lines().map(|l| l.trim_end_matches('\r'));
    lines.find(|l| *l == GUEST_READY)?;
    lines.next()
}

#[test]
fn bzimage_with_one_vcpu_boots_and_powers_off() {
    let out = boot_guest(&guest_image().bzimage, 1, "nproc");
    assert_clean_run(&out);
    assert_eq!(first_output_line(&out), Some("1"), "{}", out.describe());
}

#[test]
fn elf_vmlinux_with_two_vcpus_sees_both() {
    let out = boot_guest(&guest_image().vmlinux, 2, "nproc");
    assert_clean_run(&out);
    assert_eq!(first_output_line(&out), Some("2"), "{}", out.describe());
}

#[test]
fn guest_reboot_ends_xskvm_with_status_0() {
    let out = boot_guest(&guest_image().bzimage, 1, "reboot -f");
    assert_eq!(out.status, Some(0), "{}", out.describe());
    assert!(out.stdout.contains(GUEST_READY), "{}", out.describe());
    assert_eq!(
        out.value_of("XSKVM-GUEST-EXIT"),
        None,
        "rebooted before exiting"
    );
    assert_eq!(out.value_of("XSKVM-RC"), Some("0"), "{}", out.describe());
}

#[test]
fn serial_input_reaches_the_guest() {
    let image = guest_image();
    // The guest asks for a line once its console is up; the host answers
    // only then, so nothing is typed before the guest's UART is ready.
    let script = format!(
        r#"
dir=$(mktemp -d)
mkfifo $dir/in
{XSKVM} --kernel {kernel} --initrd {initrd} \
    --cmdline "console=ttyS0 reboot=k panic=-1 pci=off quiet -- echo WANT-INPUT; read line; echo got:\$line" \
    <$dir/in >$dir/out 2>&1 &
pid=$!
exec 3>$dir/in
for i in $(seq 600); do grep -q WANT-INPUT $dir/out && break; sleep 0.1; done
echo "hello-from-the-host" >&3
wait $pid
echo "XSKVM-RC=$?"
cat $dir/out
"#,
        kernel = image.bzimage.display(),
        initrd = image.initramfs.display(),
    );
    let out = run_scenario(
        &script,
        &[Path::new(XSKVM), &image.bzimage, &image.initramfs],
    );
    assert_eq!(out.value_of("XSKVM-RC"), Some("0"), "{}", out.describe());
    assert!(
        out.stdout.contains("got:hello-from-the-host"),
        "{}",
        out.describe()
    );
}

#[test]
fn sigterm_stops_xskvm_cleanly() {
    let image = guest_image();
    let script = format!(
        r#"
out=$(mktemp)
{XSKVM} --kernel {kernel} --initrd {initrd} --vcpus 2 \
    --cmdline "console=ttyS0 reboot=k panic=-1 pci=off quiet -- sleep 600" </dev/null >$out 2>&1 &
pid=$!
for i in $(seq 600); do grep -q {GUEST_READY} $out && break; sleep 0.1; done
kill -TERM $pid
wait $pid
echo "XSKVM-RC=$?"
cat $out
"#,
        kernel = image.bzimage.display(),
        initrd = image.initramfs.display(),
    );
    let out = run_scenario(
        &script,
        &[Path::new(XSKVM), &image.bzimage, &image.initramfs],
    );
    assert!(out.stdout.contains(GUEST_READY), "{}", out.describe());
    assert_eq!(out.value_of("XSKVM-RC"), Some("0"), "{}", out.describe());
    assert_eq!(
        out.value_of("XSKVM-GUEST-EXIT"),
        None,
        "guest was still sleeping"
    );
}
