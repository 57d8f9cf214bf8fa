// Compiles bpf/xsk_redirect.bpf.c with clang and generates its libbpf-rs
// skeleton into OUT_DIR (included by src/program.rs).

use std::env;
use std::path::PathBuf;

use libbpf_cargo::SkeletonBuilder;

const SOURCE: &str = "../bpf/xsk_redirect.bpf.c";

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    println!("cargo:rerun-if-env-changed=CLANG");

    // The dependency already checked this before libbpf-sys built; check
    // again so a tool removed since then is still named plainly.
    let missing = net_afxdp_build_check::missing();
    if !missing.is_empty() {
        eprintln!("{}", net_afxdp_build_check::report(&missing));
        std::process::exit(1);
    }

    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    // clang -target bpf does not search the multiarch include directory,
    // where <asm/types.h> (pulled in by <linux/bpf.h>) lives on Debian.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = match arch.as_str() {
        "x86_64" => "x86_64-linux-gnu",
        "aarch64" => "aarch64-linux-gnu",
        "riscv64" => "riscv64-linux-gnu",
        other => other,
    };
    let mut builder = SkeletonBuilder::new();
    builder
        .source(SOURCE)
        .clang_args([format!("-I/usr/include/{multiarch}"), "-Wall".to_string()]);
    if let Some(clang) = env::var_os("CLANG") {
        builder.clang(clang);
    }
    if let Err(e) = builder.build_and_generate(out.join("xsk_redirect.skel.rs")) {
        eprintln!(
            "net-afxdp: building the XDP program {SOURCE} failed: {e:#}\n\
             It needs clang (apt-get install clang) and the kernel UAPI headers \
             (apt-get install linux-libc-dev)."
        );
        std::process::exit(1);
    }
}
