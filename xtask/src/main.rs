//! Developer tasks: `cargo xtask <task>`.
//!
//! - `prereqs`: installs what building and testing need (idempotent).
//! - `test`: prereqs, format and lint checks, build, the whole test suite, then every fuzz
//!   target for a bounded time.
//! - `demo`: prereqs, build, then a mesh of nodes and pods on this machine.
//! - `soak`: the long versions of the load and upgrade tests.
//! - `bench`: prereqs, release build, then the L4 benchmark (direct vs mesh vs same-node);
//!   `bench --l7`: the waypoint's criterion benchmarks, then the L7 benchmark (direct vs L4
//!   mesh vs waypoint vs nginx).
//! - `fuzz`: every fuzz target of `ztunnel/fuzz` for a bounded time.
//!
//! xtask depends on nothing of the workspace, so it builds on a machine that cannot build the
//! eBPF programs yet, and can install what they need.

mod chart_tools;
mod fuzz;
mod prereqs;

use std::process::{Command, ExitCode};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Developer tasks for the mesh workspace")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the prerequisites (Debian packages, rust-src, bpf-linker, the Helm chart's test
    /// tools); safe to repeat.
    Prereqs,
    /// Run everything CI runs: prerequisites, `cargo fmt --check`, clippy, the test suite,
    /// then each fuzz target for a bounded time (no sanitizer).
    Test {
        /// Seconds each fuzz target runs after the tests (0: no fuzzing).
        #[arg(long, default_value_t = FUZZ_SECONDS_IN_TEST)]
        fuzz_seconds: u64,
        /// Extra arguments for the test runner (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Build and run the local demo: nodes and pods in network namespaces, traffic captured,
    /// tunnelled with mTLS and answered. Leaves nothing behind.
    Demo {
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// The long versions of the load and upgrade tests (10,000 held connections, 50,000
    /// short ones); CI runs bounded versions of the same tests.
    Soak {
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Build release binaries and run the L4 benchmark: direct vs mesh vs same-node mesh,
    /// with ztunnel CPU and memory. Writes `target/bench/{results.json,results.md,bench.svg}`
    /// and updates `tests/bench/bench.svg`. Arguments go to the benchmark (`-- --help` lists them;
    /// `--quick` is a short smoke run).
    Bench {
        /// The L7 benchmark instead (issue 21): first the waypoint's criterion benchmarks
        /// (route match), then direct vs L4 mesh vs waypoint vs nginx over HTTP. Writes
        /// `target/bench/{l7-results.json,l7-results.md,l7.svg}` and updates
        /// `tests/bench/l7.svg`.
        #[arg(long)]
        l7: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run each fuzz target (ztunnel/fuzz) for a bounded time, from the corpus in the
    /// repository; fails on the first crash, leaving the input in ztunnel/fuzz/artifacts.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Instrumentation: AddressSanitizer (the default here) or none (what CI uses).
        #[arg(long, value_enum, default_value_t = fuzz::Sanitizer::Address)]
        sanitizer: fuzz::Sanitizer,
        /// Targets to run (default: all).
        targets: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Prereqs => prereqs::install(),
        Task::Test { fuzz_seconds, args } => test(fuzz_seconds, &args),
        Task::Demo { args } => demo(&args),
        Task::Soak { args } => soak(&args),
        Task::Bench { l7, args } => bench(l7, &args),
        Task::Fuzz {
            seconds,
            sanitizer,
            targets,
        } => prereqs::install()
            .and_then(|()| prereqs::cargo_fuzz())
            .and_then(|()| {
                fuzz::run(&fuzz::Run {
                    seconds,
                    sanitizer,
                    targets,
                })
            }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Seconds each fuzz target runs in `cargo xtask test`.
const FUZZ_SECONDS_IN_TEST: u64 = 20;

fn test(fuzz_seconds: u64, args: &[String]) -> Result<()> {
    prereqs::install()?;
    if fuzz_seconds > 0 {
        prereqs::cargo_fuzz()?;
    }
    step("cargo fmt --check", || cargo(&["fmt", "--all", "--check"]))?;
    step("cargo clippy --all-targets -- -D warnings", || {
        cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])
    })?;
    step("cargo build --all-targets", || {
        cargo(&["build", "--all-targets"])
    })?;
    let mut run = vec!["nextest", "run", "--no-fail-fast"];
    run.extend(args.iter().map(String::as_str));
    println!("==> cargo {}", run.join(" "));
    let tests = cargo(&run);
    // Fuzzed even when a test failed: both verdicts are worth having from one CI run.
    let fuzzing = if fuzz_seconds > 0 {
        fuzz::run(&fuzz::Run {
            seconds: fuzz_seconds,
            sanitizer: fuzz::Sanitizer::None,
            targets: Vec::new(),
        })
    } else {
        Ok(())
    };
    match (tests, fuzzing) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(e), Ok(())) => Err(e),
        (Ok(()), Err(e)) => Err(e),
        (Err(tests), Err(fuzzing)) => bail!("{tests:#}; and fuzzing: {fuzzing:#}"),
    }
}

fn demo(args: &[String]) -> Result<()> {
    prereqs::install()?;
    step("cargo build --bins", || cargo(&["build", "--bins"]))?;
    let mut run = vec![
        "run",
        "--quiet",
        "--package",
        "mesh-tests",
        "--bin",
        "demo",
        "--",
    ];
    run.extend(args.iter().map(String::as_str));
    cargo(&run)
}

fn soak(args: &[String]) -> Result<()> {
    prereqs::install()?;
    step("cargo build --all-targets", || {
        cargo(&["build", "--all-targets"])
    })?;
    let mut run = vec![
        "nextest",
        "run",
        "--no-fail-fast",
        "--no-capture",
        "-p",
        "mesh-tests",
        "--test",
        "load",
        "--test",
        "upgrade",
    ];
    run.extend(args.iter().map(String::as_str));
    println!("==> ZTUNNEL_SOAK=1 cargo {}", run.join(" "));
    cargo_with_env(&run, &[("ZTUNNEL_SOAK", "1")])
}

fn bench(l7: bool, args: &[String]) -> Result<()> {
    // `--l7` after another benchmark option lands among the arguments.
    let l7 = l7 || args.iter().any(|a| a == "--l7");
    prereqs::install()?;
    step("cargo build --release --bins", || {
        cargo(&["build", "--release", "--bins"])
    })?;
    if l7 && !args.iter().any(|a| a == "--quick") {
        // The route-match target is judged from criterion's saved results (target/criterion).
        step("cargo bench -p waypoint --bench route", || {
            cargo(&["bench", "--package", "waypoint", "--bench", "route"])
        })?;
    }
    let root = workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let out = target.join("bench");
    let out_arg = out.to_string_lossy().into_owned();
    let mut run = vec![
        "run",
        "--release",
        "--quiet",
        "--package",
        "mesh-tests",
        "--bin",
        "bench",
        "--",
        "--out",
        &out_arg,
    ];
    if l7 && !args.iter().any(|a| a == "--l7") {
        run.push("--l7");
    }
    run.extend(args.iter().map(String::as_str));
    cargo(&run)?;
    let chart = if l7 { "l7.svg" } else { "bench.svg" };
    let svg = out.join(chart);
    if svg.exists() {
        let docs = root.join("tests").join("bench");
        std::fs::create_dir_all(&docs)?;
        std::fs::copy(&svg, docs.join(chart))
            .with_context(|| format!("copying {} to tests/bench/", svg.display()))?;
        println!("==> tests/bench/{chart} updated (the README embeds it)");
    }
    Ok(())
}

/// The workspace root: xtask's manifest directory is `<root>/xtask`.
fn workspace_root() -> std::path::PathBuf {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

fn step(what: &str, run: impl FnOnce() -> Result<()>) -> Result<()> {
    println!("==> {what}");
    run().with_context(|| format!("{what} failed"))
}

fn cargo(args: &[&str]) -> Result<()> {
    cargo_with_env(args, &[])
}

/// Runs cargo with `env` added to its environment (and so to the processes it starts).
fn cargo_with_env(args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(&cargo)
        .args(args)
        .envs(env.iter().copied())
        .status()
        .with_context(|| format!("cannot run {cargo}"))?;
    if !status.success() {
        bail!("cargo {} exited with {status}", args.join(" "));
    }
    Ok(())
}
