//! Rebuild the programs when bpf-linker changes, since it links them.
use std::env;

fn main() {
    if let Ok(path) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    println!("cargo:rerun-if-env-changed=PATH");
    let _ = env::var("PATH");
}
