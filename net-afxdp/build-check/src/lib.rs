//! Checks for the host tools net-afxdp's build needs (clang for the XDP
//! program; make, pkg-config, libelf and zlib headers for the vendored
//! libbpf). The check runs in this crate's build script, which has no
//! dependencies and so fails — with a plain "install X" message — before
//! libbpf-sys's build script fails with a compiler error deep in make.

mod check;

pub use check::{missing, report, Missing};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_names_packages_and_one_install_command() {
        let text = report(&[
            Missing {
                what: "clang (compiles bpf/xsk_redirect.bpf.c)",
                package: "clang",
            },
            Missing {
                what: "libelf headers",
                package: "libelf-dev",
            },
        ]);
        assert!(text.contains("apt-get install clang libelf-dev"), "{text}");
        assert!(
            text.contains("- libelf headers (Debian/Ubuntu package libelf-dev)"),
            "{text}"
        );
    }

    #[test]
    fn this_host_has_everything() {
        // The crate built, so its own build script found everything.
        assert_eq!(missing(), Vec::new());
    }
}
