//! Checks for the host tools net-afxdp's build needs (clang for the XDP
//! program; make, pkg-config, libelf and zlib headers for the vendored
//! libbpf). The check runs in this crate's build script, which has no
//! dependencies and so fails — with a plain "install X" message — before
//! libbpf-sys's build script fails with a compiler error deep in make.

mod check;

pub use check::{missing, report, Missing};
