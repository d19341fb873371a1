//! Root-only tests run where the tests are built by root (CI runs as root); elsewhere they
//! are marked ignored, with the reason, so `cargo test` never counts them as passed.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(dlsession_root)");
    // A different user building in the same target directory usually has another HOME.
    println!("cargo::rerun-if-env-changed=HOME");
    println!("cargo::rerun-if-env-changed=USER");
    if rustix::process::geteuid().is_root() {
        println!("cargo::rustc-cfg=dlsession_root");
    }
}
