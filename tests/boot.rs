//! Boot tests: a stock Debian kernel and the initramfs from
//! resources/guest-image.sh boot through xskvm to their marker, run a
//! command, and end xskvm the way the guest asked. They run directly on a
//! host with hardware virtualization and in the nested test host otherwise.

mod common;

use std::path::Path;

use common::{guest_image, run_scenario, run_scenario_with_env, ScenarioOutput};

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
    --cmdline "console=ttyS0 reboot=k panic=-1 pci=off quiet -- echo WANT-INPUT; read line; echo got:\$line; sleep 8" \
    <$dir/in >$dir/out 2>&1 &
pid=$!
exec 3>$dir/in
for i in $(seq 600); do grep -q WANT-INPUT $dir/out && break; sleep 0.1; done
echo "hello-from-the-host" >&3
# The end of input while the guest runs: it must neither stop xskvm nor
# make its loop spin: the main thread's CPU time (user + system ticks)
# over two seconds while the guest sleeps.
exec 3>&-
sleep 1
ticks() {{ awk '{{print $14 + $15}}' /proc/$pid/task/$pid/stat; }}
t1=$(ticks); sleep 2; t2=$(ticks)
echo "MAIN-TICKS-AFTER-EOF=$((t2 - t1))"
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
    // A loop spinning on the closed pipe would burn ~200 ticks.
    let ticks: u64 = out
        .value_of("MAIN-TICKS-AFTER-EOF")
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no tick count\n{}", out.describe()));
    assert!(ticks < 50, "{ticks} ticks after EOF\n{}", out.describe());
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

#[test]
fn guest_ram_above_the_mmio_hole() {
    // 3.5 GiB: 3 GiB below the 32-bit MMIO hole, the rest above 4 GiB. The
    // test host gets enough RAM for it (guest memory is touched lazily).
    let image = guest_image();
    let script = format!(
        r#"
{XSKVM} --kernel {kernel} --initrd {initrd} --memory 3584M \
    --cmdline "console=ttyS0 reboot=k panic=-1 pci=off quiet -- free -m" </dev/null
echo "XSKVM-RC=$?"
"#,
        kernel = image.bzimage.display(),
        initrd = image.initramfs.display(),
    );
    let out = run_scenario_with_env(
        &script,
        &[Path::new(XSKVM), &image.bzimage, &image.initramfs],
        &[("XSKVM_TESTHOST_MEM", "6G")],
    );
    assert_eq!(out.value_of("XSKVM-RC"), Some("0"), "{}", out.describe());
    let mib: u64 = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("Mem:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|total| total.parse().ok())
        .unwrap_or_else(|| panic!("no free -m output\n{}", out.describe()));
    // The kernel keeps some for itself; well over 3 GiB means both regions are in use.
    assert!(
        mib > 3200 && mib <= 3584,
        "guest sees {mib} MiB\n{}",
        out.describe()
    );
}

#[test]
fn guest_triple_fault_ends_xskvm_with_a_reason() {
    // A "kernel" whose first instruction is ud2: with the boot IDT empty,
    // the exception escalates to a triple fault.
    let dir = common::TempDir::new("triple-fault");
    let kernel = dir.path().join("ud2.elf");
    std::fs::write(&kernel, ud2_elf()).unwrap();
    let script = format!(
        "{XSKVM} --kernel {} --memory 64M </dev/null 2>&1\necho \"XSKVM-RC=$?\"\n",
        kernel.display()
    );
    let out = run_scenario(&script, &[Path::new(XSKVM), &kernel]);
    assert_eq!(out.value_of("XSKVM-RC"), Some("1"), "{}", out.describe());
    assert!(
        out.stdout
            .contains("xskvm: guest stopped: vCPU 0: guest triple fault"),
        "{}",
        out.describe()
    );
}

/// A minimal x86-64 ELF executable: one PT_LOAD at 2 MiB holding `ud2`.
fn ud2_elf() -> Vec<u8> {
    const ENTRY: u64 = 0x20_0000;
    const CODE_OFFSET: u64 = 64 + 56;
    let code = [0x0f, 0x0b];
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&ENTRY.to_le_bytes());
    elf.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for v in [64u16, 56, 1, 64, 0, 0] {
        elf.extend_from_slice(&v.to_le_bytes()); // ehsize, phentsize, phnum, shentsize, shnum, shstrndx
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for v in [
        CODE_OFFSET,
        ENTRY,
        ENTRY,
        code.len() as u64,
        code.len() as u64,
        0x1000,
    ] {
        elf.extend_from_slice(&v.to_le_bytes()); // offset, vaddr, paddr, filesz, memsz, align
    }
    elf.extend_from_slice(&code);
    elf
}
