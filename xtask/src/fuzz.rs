//! `cargo xtask fuzz`: builds the cargo-fuzz targets of `ztunnel/fuzz` (AddressSanitizer,
//! libFuzzer) and runs each for a bounded time, starting from the corpus kept in the
//! repository.
//!
//! cargo-fuzz passes `-Z` flags to rustc, which stable Rust refuses unless
//! `RUSTC_BOOTSTRAP=1`: it is set for the cargo-fuzz processes only, never for the
//! workspace's own builds. New inputs the fuzzers find go to the target directory (kept
//! between runs), not into the repository; crashes go to `ztunnel/fuzz/artifacts/<target>/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};

/// The fuzz targets, one per hostile input (`ztunnel/fuzz/fuzz_targets/<name>.rs`).
pub const TARGETS: &[&str] = &["hbone_request", "local_config", "xds_resource", "cert_san"];

/// More codegen units than cargo-fuzz's default of 1: the build is several times faster
/// and the fuzzers barely slower, which is the right trade for bounded runs.
const CODEGEN_UNITS: &str = "16";

pub fn run(seconds: u64, targets: &[String]) -> Result<()> {
    let targets: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        targets.iter().map(String::as_str).collect()
    };
    if let Some(unknown) = targets.iter().find(|t| !TARGETS.contains(t)) {
        bail!(
            "no fuzz target {unknown:?}; the targets are {}",
            TARGETS.join(", ")
        );
    }
    let root = workspace_root()?;
    let crate_dir = root.join("ztunnel");
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), PathBuf::from)
        .join("fuzz");
    let target_dir = target_dir
        .to_str()
        .context("target directory is not UTF-8")?;

    println!("==> cargo fmt --check (ztunnel/fuzz, its own workspace)");
    let status = Command::new("cargo")
        .current_dir(crate_dir.join("fuzz"))
        .args(["fmt", "--check"])
        .status()
        .context("cannot run cargo fmt")?;
    if !status.success() {
        bail!("ztunnel/fuzz is not formatted: run `cargo fmt` in ztunnel/fuzz");
    }

    println!("==> cargo fuzz build (AddressSanitizer; RUSTC_BOOTSTRAP=1 for cargo-fuzz only)");
    let started = Instant::now();
    cargo_fuzz(
        &crate_dir,
        &[
            "build",
            "--codegen-units",
            CODEGEN_UNITS,
            "--target-dir",
            target_dir,
        ],
    )
    .context("building the fuzz targets")?;
    println!("fuzz: built in {:.0?}", started.elapsed());

    for target in targets {
        let seeds = crate_dir.join("fuzz/corpus").join(target);
        let found = Path::new(target_dir).join("corpus").join(target);
        std::fs::create_dir_all(&found).with_context(|| format!("creating {}", found.display()))?;
        println!("==> fuzz {target} for {seconds}s");
        let max_time = format!("-max_total_time={seconds}");
        cargo_fuzz(
            &crate_dir,
            &[
                "run",
                target,
                "--codegen-units",
                CODEGEN_UNITS,
                "--target-dir",
                target_dir,
                // libFuzzer adds new inputs to the first directory only.
                found.to_str().context("corpus path is not UTF-8")?,
                seeds.to_str().context("corpus path is not UTF-8")?,
                "--",
                &max_time,
                // A single input taking this long is a hang, and reported as a crash.
                "-timeout=20",
                "-rss_limit_mb=2048",
                "-print_final_stats=1",
            ],
        )
        .with_context(|| {
            format!(
                "fuzz target {target} found a crash: the input is in \
                 ztunnel/fuzz/artifacts/{target}/; reproduce with \
                 `RUSTC_BOOTSTRAP=1 cargo fuzz run {target} <file>` in ztunnel/"
            )
        })?;
    }
    Ok(())
}

fn cargo_fuzz(dir: &Path, args: &[&str]) -> Result<()> {
    let status = Command::new("cargo")
        .current_dir(dir)
        .env("RUSTC_BOOTSTRAP", "1")
        .arg("fuzz")
        .args(args)
        .status()
        .context("cannot run cargo fuzz (run `cargo xtask prereqs`)")?;
    if !status.success() {
        bail!("cargo fuzz {} exited with {status}", args.join(" "));
    }
    Ok(())
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}
