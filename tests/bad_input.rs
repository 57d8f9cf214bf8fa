//! Bad input to `xskvm` gets one clear error line and a non-zero exit, never
//! a panic. None of these boots a guest, so they run directly on any host.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::TempDir;

fn xskvm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xskvm"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run xskvm")
}

/// Asserts a failed run whose stderr mentions `needle`, and no panic.
fn assert_error(output: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "expected failure, stderr: {stderr}"
    );
    assert!(
        stderr.contains(needle),
        "stderr should mention {needle:?}: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert_eq!(
        output.status.code().map(|c| c < 100),
        Some(true),
        "killed by a signal?"
    );
}

/// The smallest file linux-loader accepts as a bzImage: a setup header and
/// one sector of "kernel".
fn fake_bzimage(dir: &Path) -> PathBuf {
    let mut image = vec![0u8; 0x600];
    image[0x1f1] = 1; // setup_sects
    image[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    image[0x202..0x206].copy_from_slice(b"HdrS");
    image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // version
    image[0x211] = 1; // loadflags: LOADED_HIGH
    image[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    let path = dir.join("bzImage");
    std::fs::write(&path, image).unwrap();
    path
}

#[test]
fn missing_kernel() {
    assert_error(
        &xskvm(&["--kernel", "/nonexistent/vmlinux"]),
        "cannot open kernel image /nonexistent/vmlinux",
    );
}

#[test]
fn unknown_seccomp_mode() {
    assert_error(
        &xskvm(&["--kernel", "k", "--seccomp", "bogus"]),
        "invalid value 'bogus' for '--seccomp <MODE>'",
    );
}

#[test]
fn unreadable_kernel_is_a_directory() {
    assert_error(
        &xskvm(&["--kernel", "/"]),
        "cannot open kernel image /: Is a directory",
    );
}

#[test]
fn file_that_is_not_a_kernel() {
    let dir = TempDir::new("not-a-kernel");
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, "hello, I am text").unwrap();
    assert_error(
        &xskvm(&["--kernel", path.to_str().unwrap()]),
        "is not a kernel: neither an x86-64 ELF vmlinux nor a bzImage",
    );
}

#[test]
fn initrd_too_large_for_ram() {
    let dir = TempDir::new("big-initrd");
    let kernel = fake_bzimage(dir.path());
    let initrd = dir.path().join("initrd");
    std::fs::File::create(&initrd)
        .unwrap()
        .set_len(40 << 20)
        .unwrap();
    assert_error(
        &xskvm(&[
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--memory",
            "32M",
        ]),
        "does not fit in guest RAM",
    );
}

#[test]
fn missing_initrd() {
    let dir = TempDir::new("no-initrd");
    let kernel = fake_bzimage(dir.path());
    assert_error(
        &xskvm(&[
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            "/nonexistent/initrd",
        ]),
        "cannot read initrd /nonexistent/initrd",
    );
}

#[test]
fn memory_zero_and_garbage() {
    assert_error(
        &xskvm(&["--kernel", "k", "--memory", "0"]),
        "--memory must be at least 16 MiB",
    );
    assert_error(
        &xskvm(&["--kernel", "k", "--memory", "lots"]),
        "is not a size like 512M",
    );
}

#[test]
fn memory_beyond_the_host() {
    assert_error(
        &xskvm(&["--kernel", "k", "--memory", "65536G"]),
        "MiB of RAM",
    );
}

#[test]
fn vcpus_zero_and_beyond_the_limit() {
    assert_error(
        &xskvm(&["--kernel", "k", "--vcpus", "0"]),
        "--vcpus must be at least 1",
    );
    assert_error(
        &xskvm(&["--kernel", "k", "--vcpus", "100000"]),
        "--vcpus 100000 is more than this host's KVM supports",
    );
}

#[test]
fn unknown_flag() {
    assert_error(
        &xskvm(&["--kernel", "k", "--frobnicate"]),
        "unexpected argument '--frobnicate'",
    );
}

#[test]
fn no_kvm_device() {
    let dir = TempDir::new("no-kvm");
    let kernel = fake_bzimage(dir.path());
    assert_error(
        &xskvm(&[
            "--kernel",
            kernel.to_str().unwrap(),
            "--kvm-device",
            "/nonexistent/kvm",
        ]),
        "/nonexistent/kvm does not exist: KVM is not available here",
    );
}

#[test]
fn no_permission_on_kvm_device() {
    // Root opens anything, so drop to 'nobody' for this one; a file nobody
    // may not open stands in for /dev/kvm.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: checking the real /dev/kvm as this user instead");
    }
    let dir = TempDir::new("kvm-perm");
    let kernel = fake_bzimage(dir.path());
    let node = dir.path().join("kvm");
    std::fs::write(&node, b"").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&node, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o644)).unwrap();
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_xskvm"))
        .args(["--kernel", kernel.to_str().unwrap(), "--kvm-device"])
        .arg(&node)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run setpriv (util-linux)");
    assert_error(&output, "no permission to open");
}

#[test]
fn bad_input_is_reported_before_any_nic_is_opened() {
    // The interface does not exist either, but the kernel is checked first:
    // nothing is attached to a NIC for a VM that cannot start.
    assert_error(
        &xskvm(&[
            "--kernel",
            "/nonexistent/vmlinux",
            "--net",
            "af-xdp,ifname=xsknosuch0",
        ]),
        "cannot open kernel image /nonexistent/vmlinux",
    );
}

/// An API socket path that cannot be had, or more NICs than the machine
/// has interrupt lines for: reported before any NIC is opened (here the
/// interfaces do not exist, which would be the first error otherwise).
#[test]
fn api_socket_and_nic_count_are_checked_before_any_nic_is_opened() {
    let dir = TempDir::new("early-checks");
    let kernel = fake_bzimage(dir.path());
    let kernel = kernel.to_str().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"keep me").unwrap();
    let nic = ["--net", "af-xdp,ifname=xsknosuch0"];
    let mut args = vec!["--kernel", kernel, "--api-socket", file.to_str().unwrap()];
    args.extend(nic);
    assert_error(&xskvm(&args), "exists and is not a socket");
    let missing = dir.path().join("no/such/dir/api.sock");
    let mut args = vec![
        "--kernel",
        kernel,
        "--api-socket",
        missing.to_str().unwrap(),
    ];
    args.extend(nic);
    assert_error(&xskvm(&args), "cannot bind");
    let names: Vec<String> = (0..40)
        .map(|i| format!("af-xdp,ifname=xsknosuch{i}"))
        .collect();
    let mut args = vec!["--kernel", kernel];
    for name in &names {
        args.extend(["--net", name.as_str()]);
    }
    assert_error(&xskvm(&args), "interrupt");
}

#[test]
fn bad_net_specs() {
    let dir = TempDir::new("bad-net");
    let kernel = fake_bzimage(dir.path());
    let kernel = kernel.to_str().unwrap();
    assert_error(
        &xskvm(&["--kernel", kernel, "--net", "tap,ifname=tap0"]),
        "only the af-xdp backend exists",
    );
    assert_error(
        &xskvm(&["--kernel", kernel, "--net", "af-xdp,ifname=xsknosuch0"]),
        "af-xdp: no network interface \"xsknosuch0\"",
    );
    assert_error(
        &xskvm(&["--kernel", kernel, "--net", "af-xdp,ifname=lo,mode=fast"]),
        "mode",
    );
    assert_error(
        &xskvm(&[
            "--kernel",
            kernel,
            "--net",
            "af-xdp,ifname=lo,mac=01:00:5e:00:00:01",
        ]),
        "multicast",
    );
    assert_error(
        &xskvm(&["--kernel", kernel, "--net", "af-xdp,ifname=lo,tx-gather=on"]),
        "tx-gather=on needs umem=guest",
    );
    assert_error(
        &xskvm(&[
            "--kernel",
            kernel,
            "--net",
            "af-xdp,ifname=lo,umem=guest,tx-gather=yes-please",
        ]),
        "tx-gather=\"yes-please\"",
    );
    // Both would attach xskvm's program to one interface: refused before
    // either is opened (the interface does not even exist).
    assert_error(
        &xskvm(&[
            "--kernel",
            kernel,
            "--net",
            "af-xdp,ifname=xsknosuch0",
            "--net",
            "af-xdp,ifname=xsknosuch0,start-queue=1",
        ]),
        "--net 1: ifname=xsknosuch0 is already --net 0's: one NIC per interface",
    );
}

#[test]
fn bad_map_path_options() {
    let dir = TempDir::new("bad-map-path");
    let kernel = fake_bzimage(dir.path());
    let kernel = kernel.to_str().unwrap();
    for (spec, needle) in [
        (
            "af-xdp,ifname=xs0,map-path=/sys/fs/bpf/m",
            "map-path needs inhibit=on",
        ),
        (
            "af-xdp,ifname=xs0,inhibit=on,map-start-index=2",
            "map-start-index needs map-path",
        ),
        (
            "af-xdp,ifname=xs0,inhibit=on,sock-fds=3,map-path=/sys/fs/bpf/m",
            "mutually exclusive",
        ),
        (
            "af-xdp,ifname=xs0,inhibit=on,map-path=/m,map-start-index=x",
            "map-start-index=\"x\"",
        ),
    ] {
        assert_error(&xskvm(&["--kernel", kernel, "--net", spec]), needle);
    }
}

fn helper(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xskvm-net-helper"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run xskvm-net-helper")
}

#[test]
fn helper_bad_input_is_refused_before_anything_is_opened() {
    let run = |user: &str, net: &str| helper(&["--user", user, "--net", net, "--", "xskvm"]);
    assert_error(&run("0", "af-xdp,ifname=xs0"), "give an unprivileged user");
    assert_error(&run("alice", "af-xdp,ifname=xs0"), "numeric ids");
    assert_error(
        &run("4241", "af-xdp,ifname=xs0,inhibit=on,sock-fds=3"),
        "inhibit is the helper's to set",
    );
    assert_error(
        &run("4241", "af-xdp,ifname=xs0,mode=fast"),
        "mode=\"fast\" is not valid",
    );
    assert_error(&run("4241", "tap,ifname=xs0"), "only the af-xdp backend");
    // No xskvm command after --.
    assert_error(
        &helper(&["--user", "4241", "--net", "af-xdp,ifname=xs0"]),
        "XSKVM",
    );
}

#[test]
fn api_socket_path_taken_by_a_file_or_a_listener() {
    let dir = TempDir::new("api-socket");
    let kernel = fake_bzimage(dir.path());
    let kernel = kernel.to_str().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"keep me").unwrap();
    assert_error(
        &xskvm(&["--kernel", kernel, "--api-socket", file.to_str().unwrap()]),
        "exists and is not a socket",
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me", "left alone");
    let socket = dir.path().join("live.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    assert_error(
        &xskvm(&["--kernel", kernel, "--api-socket", socket.to_str().unwrap()]),
        "another process is listening there",
    );
    assert!(socket.exists(), "a live socket is not removed");
    let missing = dir.path().join("no/such/dir/api.sock");
    assert_error(
        &xskvm(&[
            "--kernel",
            kernel,
            "--api-socket",
            missing.to_str().unwrap(),
        ]),
        "cannot bind",
    );
}
