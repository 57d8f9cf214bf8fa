// Shared by this crate's build script (which runs before libbpf-sys's own
// build, so a missing package is named before make fails deep inside it)
// and its library (which net-afxdp's build script calls again).

use std::path::Path;
use std::process::{Command, Stdio};

/// One missing build requirement and the Debian package that provides it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub what: &'static str,
    pub package: &'static str,
}

fn runs(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn header(name: &str) -> bool {
    ["/usr/include", "/usr/local/include"]
        .iter()
        .any(|dir| Path::new(dir).join(name).exists())
        || Command::new("pkg-config")
            .args(["--exists", name.trim_end_matches(".h")])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
}

/// Everything the XDP program and the vendored libbpf need that is absent.
/// `CLANG` overrides the compiler looked for, as it does for net-afxdp.
pub fn missing() -> Vec<Missing> {
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".to_string());
    let mut missing = Vec::new();
    if !runs(&clang, "--version") {
        missing.push(Missing {
            what: "clang (compiles bpf/xsk_redirect.bpf.c)",
            package: "clang",
        });
    }
    if !header("libelf.h") || !header("gelf.h") {
        missing.push(Missing {
            what: "libelf headers (libbpf reads BPF ELF objects)",
            package: "libelf-dev",
        });
    }
    if !header("zlib.h") {
        missing.push(Missing {
            what: "zlib headers (libbpf)",
            package: "zlib1g-dev",
        });
    }
    if !runs("pkg-config", "--version") {
        missing.push(Missing {
            what: "pkg-config (libbpf-sys finds libelf and zlib with it)",
            package: "pkg-config",
        });
    }
    if !runs("make", "--version") {
        missing.push(Missing {
            what: "make (builds the vendored libbpf)",
            package: "make",
        });
    }
    missing
}

/// The message a failed check prints: what is missing and one command
/// that installs all of it.
pub fn report(missing: &[Missing]) -> String {
    let mut text = String::from("net-afxdp cannot be built: missing build requirements:\n");
    for m in missing {
        text.push_str(&format!(
            "  - {} (Debian/Ubuntu package {})\n",
            m.what, m.package
        ));
    }
    let packages: Vec<&str> = missing.iter().map(|m| m.package).collect();
    text.push_str(&format!(
        "Install them with: apt-get install {}\n(Fedora: clang elfutils-libelf-devel zlib-devel pkgconf make)",
        packages.join(" ")
    ));
    text
}
