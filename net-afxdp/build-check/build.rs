// Runs before libbpf-sys's build (this crate has no dependencies), so a
// missing package is reported plainly instead of as a make failure.
include!("src/check.rs");

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/check.rs");
    println!("cargo:rerun-if-env-changed=CLANG");
    let missing = missing();
    if !missing.is_empty() {
        eprintln!("{}", report(&missing));
        std::process::exit(1);
    }
}
