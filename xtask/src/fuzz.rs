//! `cargo xtask fuzz`: builds the cargo-fuzz targets of `ztunnel/fuzz` (libFuzzer) and runs
//! each for a bounded time, starting from the corpus kept in the repository. `cargo xtask test`
//! runs the same after the test suite, shorter and without a sanitizer (see [`Sanitizer`]).
//!
//! New inputs the fuzzers find go to the target directory (kept between runs), not into the
//! repository; crashes go to `ztunnel/fuzz/artifacts/<target>/`, and the error names them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};

/// The fuzz targets, one per hostile input (`ztunnel/fuzz/fuzz_targets/<name>.rs`).
pub(crate) const TARGETS: &[&str] = &["hbone_request", "local_config", "xds_resource", "cert_san"];

/// More codegen units than cargo-fuzz's default of 1: the build is several times faster
/// and the fuzzers barely slower, which is the right trade for bounded runs.
const CODEGEN_UNITS: &str = "16";

/// How the targets are instrumented. Both have libFuzzer's coverage and catch panics, hangs
/// and runaway memory; they differ in cost (measured in README "Fuzzing").
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Sanitizer {
    /// AddressSanitizer: also memory errors in `unsafe` and C code. cargo-fuzz passes it
    /// `-Z` flags, so `RUSTC_BOOTSTRAP=1` is set for the cargo-fuzz processes only (never for
    /// the workspace's own builds). About twice the build CPU of `none`, and a fifth of its
    /// executions per second.
    Address,
    /// No sanitizer: plain stable Rust. What `cargo xtask test` uses.
    None,
}

impl Sanitizer {
    fn name(self) -> &'static str {
        match self {
            Sanitizer::Address => "address",
            Sanitizer::None => "none",
        }
    }
}

/// A bounded fuzzing run.
#[derive(Debug, Clone)]
pub(crate) struct Run {
    /// Seconds per target.
    pub seconds: u64,
    pub sanitizer: Sanitizer,
    /// Targets to run (empty: all).
    pub targets: Vec<String>,
}

pub(crate) fn run(run: &Run) -> Result<()> {
    let targets: Vec<&str> = if run.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        run.targets.iter().map(String::as_str).collect()
    };
    if let Some(unknown) = targets.iter().find(|t| !TARGETS.contains(t)) {
        bail!(
            "no fuzz target {unknown:?}; the targets are {}",
            TARGETS.join(", ")
        );
    }
    let root = workspace_root()?;
    let crate_dir = root.join("ztunnel");
    let fuzz_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), PathBuf::from)
        .join("fuzz");
    // One build directory per sanitizer: switching would otherwise rebuild everything.
    let target_dir = fuzz_dir.join(run.sanitizer.name());
    let target_dir = target_dir
        .to_str()
        .context("target directory is not UTF-8")?;
    let common = [
        "--sanitizer",
        run.sanitizer.name(),
        "--codegen-units",
        CODEGEN_UNITS,
        "--target-dir",
        target_dir,
    ];

    println!("==> cargo fmt --check (ztunnel/fuzz, its own workspace)");
    let status = Command::new("cargo")
        .current_dir(crate_dir.join("fuzz"))
        .args(["fmt", "--check"])
        .status()
        .context("cannot run cargo fmt")?;
    if !status.success() {
        bail!("ztunnel/fuzz is not formatted: run `cargo fmt` in ztunnel/fuzz");
    }

    println!(
        "==> cargo fuzz build --sanitizer {} (all targets, one cargo run)",
        run.sanitizer.name()
    );
    let started = Instant::now();
    let mut build = vec!["build"];
    build.extend(common);
    cargo_fuzz(&crate_dir, run.sanitizer, &build).context("building the fuzz targets")?;
    println!("fuzz: built in {:.0?}", started.elapsed());

    let max_time = format!("-max_total_time={}", run.seconds);
    for target in &targets {
        let seeds = crate_dir.join("fuzz/corpus").join(target);
        let found = fuzz_dir.join("corpus").join(target);
        std::fs::create_dir_all(&found).with_context(|| format!("creating {}", found.display()))?;
        let artifacts = crate_dir.join("fuzz/artifacts").join(target);
        let before = files_in(&artifacts);
        println!("==> fuzz {target} for {}s", run.seconds);
        let mut args = vec!["run", target];
        args.extend(common);
        args.extend([
            // libFuzzer adds new inputs to the first directory only.
            found.to_str().context("corpus path is not UTF-8")?,
            seeds.to_str().context("corpus path is not UTF-8")?,
            "--",
            &max_time,
            // A single input taking this long is a hang, and reported as a crash.
            "-timeout=20",
            "-rss_limit_mb=2048",
            "-print_final_stats=1",
        ]);
        if let Err(err) = cargo_fuzz(&crate_dir, run.sanitizer, &args) {
            let new: Vec<String> = files_in(&artifacts)
                .difference(&before)
                .map(|p| p.display().to_string())
                .collect();
            let inputs = if new.is_empty() {
                format!("no new input in {}", artifacts.display())
            } else {
                new.join(", ")
            };
            bail!(
                "fuzz target {target} failed ({err}); crashing input: {inputs}; reproduce with \
                 `cargo fuzz run --sanitizer {} {target} <input>` in ztunnel/ (with \
                 RUSTC_BOOTSTRAP=1 for the address sanitizer), then fix it in the module at \
                 fault with a unit test holding that input",
                run.sanitizer.name()
            );
        }
    }
    println!(
        "fuzz: {} target(s), {}s each, sanitizer {}: no crash",
        targets.len(),
        run.seconds,
        run.sanitizer.name()
    );
    Ok(())
}

/// The files directly in `dir` (none when it does not exist).
fn files_in(dir: &Path) -> BTreeSet<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default()
}

fn cargo_fuzz(dir: &Path, sanitizer: Sanitizer, args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(dir).arg("fuzz").args(args);
    if sanitizer == Sanitizer::Address {
        cmd.env("RUSTC_BOOTSTRAP", "1");
    }
    let status = cmd
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
