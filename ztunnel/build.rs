//! Builds the eBPF capture programs (ebpf/programs) for the BPF target and leaves the object
//! in OUT_DIR, where `capture` embeds it; and generates the protobuf/gRPC code of the
//! control-plane APIs (`proto/`) with protox (a protobuf compiler in Rust, so no `protoc` is
//! needed) and tonic-prost-build.
//!
//! Stable Rust cannot build `core` for the BPF target without `-Z build-std`, so the inner
//! cargo run alone gets `RUSTC_BOOTSTRAP=1`; the outer build stays on plain stable.
//!
//! Without the `ebpf` feature (on by default) the object is left empty and capture refuses
//! to start: for builds that never capture, such as the fuzz targets (`ztunnel/fuzz`), where
//! the nested BPF build would only cost time.

// `std::env::set_var` is unsafe (edition 2024); aya-build's cargo inherits the environment.
#![allow(unsafe_code)]

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    protos()?;
    ebpf()
}

/// The `.proto` files compiled, relative to `proto/`.
const PROTOS: &[&str] = &[
    "istio/workload.proto",
    "istio/authorization.proto",
    "istio/ca.proto",
    "envoy/discovery.proto",
];

fn protos() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(PROTOS, ["proto"]).context("compiling proto/")?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)
        .context("generating Rust code from proto/")
}

#[cfg(not(feature = "ebpf"))]
fn ebpf() -> anyhow::Result<()> {
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR")?);
    std::fs::write(out.join("ztunnel-capture"), b"").context("writing the empty eBPF object")
}

#[cfg(feature = "ebpf")]
fn ebpf() -> anyhow::Result<()> {
    let metadata_root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow::anyhow!("ztunnel crate has no parent directory"))?
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
