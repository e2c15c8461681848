//! Builds the eBPF capture programs (ebpf/programs) for the BPF target and leaves the object
//! in OUT_DIR, where `capture` embeds it.
//!
//! Stable Rust cannot build `core` for the BPF target without `-Z build-std`, so the inner
//! cargo run alone gets `RUSTC_BOOTSTRAP=1`; the outer build stays on plain stable.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let metadata_root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("ztunnel crate has no parent directory"))?
        .join("ebpf/programs");
    let root_dir = metadata_root
        .to_str()
        .context("eBPF crate path is not UTF-8")?
        .to_owned();
    // SAFETY: build scripts are single-threaded; this only affects the child cargo we spawn.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "stable".to_owned());
    let package = aya_build::Package {
        name: "ztunnel-ebpf",
        root_dir: &root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(&toolchain)).context(
        "building the eBPF programs (needs rust-src and bpf-linker: run `cargo xtask prereqs`)",
    )
}
