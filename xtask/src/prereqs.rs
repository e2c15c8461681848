//! Installs what the workspace needs on a Debian machine, one progress line per step.
//! Each step first checks whether it is already satisfied, so running this twice is cheap.

use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, Result, bail};

/// Debian packages: LLVM 22 for bpf-linker, and the real tools the tests and the benchmark
/// drive.
const PACKAGES: &[(&str, &str)] = &[
    ("llvm-22-dev", "LLVM 22 libraries, for bpf-linker"),
    ("libpolly-22-dev", "LLVM 22 Polly, linked by llvm-sys"),
    ("libzstd-dev", "zstd, linked by llvm-sys"),
    ("zlib1g-dev", "zlib, linked by llvm-sys"),
    ("iproute2", "ip: network namespaces, veths, routes"),
    ("curl", "HTTP client in the tests and demo"),
    ("nghttp2-client", "h2load, HTTP/2 load"),
    ("tcpdump", "packet captures in the tests"),
    (
        "openssl",
        "RSA keys for the JWT tests (ring cannot generate them)",
    ),
    ("procps", "sysctl"),
    (
        "nftables",
        "nft: packet loss between test nodes (the kernel has no netem)",
    ),
    ("iperf3", "bulk throughput, in the benchmark"),
    (
        "sockperf",
        "1 KiB round-trip latency percentiles, in the benchmark",
    ),
    ("wrk", "HTTP/1.1 load, in the benchmark"),
    (
        "linux-perf",
        "perf stat: system calls and context switches of each ztunnel, in the benchmark",
    ),
    (
        "nginx",
        "HTTP server in the benchmark's server pods, and the L7 benchmark's reverse proxy",
    ),
    (
        "libnginx-mod-http-echo",
        "nginx echo module: the benchmark's upload endpoint reads the whole body, then answers",
    ),
    (
        "python3-venv",
        "the virtual environment of the chart tests' Helm",
    ),
    ("nodejs", "the chart tests' CRD validators (npm packages)"),
];

const BPF_LINKER_VERSION: &str = "0.13";
/// cargo-fuzz 0.13 builds on Rust 1.95 (0.13.2 checked).
const CARGO_FUZZ_VERSION: &str = "0.13";

pub(crate) fn install() -> Result<()> {
    check_system()?;
    debian_packages()?;
    rust_src()?;
    bpf_linker()?;
    nextest()?;
    crate::chart_tools::install(progress)
}

fn progress(step: &str, status: &str) {
    println!("prereqs: {step:<28} {status}");
}

fn check_system() -> Result<()> {
    let euid = effective_uid()?;
    if euid != 0 {
        bail!(
            "must run as root (uid 0, this is uid {euid}): the tests and the demo create network \
             namespaces and load eBPF programs"
        );
    }
    progress("root", "ok");
    if !Path::new("/sys/fs/bpf").exists()
        && !Path::new("/proc/sys/kernel/bpf_stats_enabled").exists()
    {
        bail!("this kernel has no BPF support (/proc/sys/kernel/bpf_stats_enabled is missing)");
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        progress(
            "kernel BTF",
            "missing (CO-RE relocations unavailable); continuing",
        );
    } else {
        progress("kernel BPF + BTF", "ok");
    }
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    match mounts
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some("cgroup2"))
    {
        Some(line) => progress(
            "cgroup v2",
            &format!("ok ({})", line.split_whitespace().nth(1).unwrap_or("?")),
        ),
        None => {
            bail!("no cgroup v2 mount in /proc/mounts: eBPF capture attaches to the cgroup v2 root")
        }
    }
    Ok(())
}

/// This process's effective user id, the second field of `Uid:` in `/proc/self/status`
/// (real, effective, saved, filesystem), read there so xtask needs no `unsafe` libc call.
fn effective_uid() -> Result<u32> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|id| id.parse().ok())
        .context("no effective uid in the Uid: line of /proc/self/status")
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(p, _)| !installed(p))
        .map(|(p, _)| *p)
        .collect();
    if missing.is_empty() {
        progress("Debian packages", "ok");
        return Ok(());
    }
    progress(
        "Debian packages",
        &format!("installing {}", missing.join(" ")),
    );
    let mut install = Command::new("apt-get");
    install
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing);
    let first = install
        .output()
        .context("running apt-get (is this Debian?)")?;
    if first.status.success() {
        return Ok(());
    }
    // The package lists of a fresh machine may be stale or empty.
    run("apt-get", &["update", "-q"])?;
    let status = install.status()?;
    if !status.success() {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}

fn rust_src() -> Result<()> {
    let sysroot = output("rustc", &["--print", "sysroot"])?;
    let src = Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core");
    if src.exists() {
        progress("rust-src", "ok");
        return Ok(());
    }
    progress("rust-src", "installing (rustup component add rust-src)");
    run("rustup", &["component", "add", "rust-src"])
}

fn bpf_linker() -> Result<()> {
    if let Ok(version) = output("bpf-linker", &["--version"])
        && version.contains(&format!(" {BPF_LINKER_VERSION}."))
    {
        progress("bpf-linker", &format!("ok ({})", version.trim()));
        return Ok(());
    }
    progress(
        "bpf-linker",
        &format!("installing {BPF_LINKER_VERSION} against LLVM 22 (a few minutes)"),
    );
    let status = Command::new("cargo")
        .env("LLVM_PREFIX", "/usr/lib/llvm-22")
        .args([
            "install",
            "bpf-linker",
            "--version",
            &format!("^{BPF_LINKER_VERSION}"),
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .status()?;
    if !status.success() {
        bail!("cargo install bpf-linker failed (needs llvm-22-dev)");
    }
    Ok(())
}

fn nextest() -> Result<()> {
    if output("cargo", &["nextest", "--version"]).is_ok() {
        progress("cargo-nextest", "ok");
        return Ok(());
    }
    progress("cargo-nextest", "installing");
    run("cargo", &["install", "cargo-nextest", "--locked"])
}

/// cargo-fuzz, for `cargo xtask fuzz` only (not needed by the test suite).
pub(crate) fn cargo_fuzz() -> Result<()> {
    if let Ok(version) = output("cargo", &["fuzz", "--version"])
        && version.contains(&format!(" {CARGO_FUZZ_VERSION}."))
    {
        progress("cargo-fuzz", &format!("ok ({})", version.trim()));
        return Ok(());
    }
    progress("cargo-fuzz", &format!("installing {CARGO_FUZZ_VERSION}"));
    run(
        "cargo",
        &[
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            &format!("^{CARGO_FUZZ_VERSION}"),
        ],
    )
}

fn output(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!("{program} {} failed", args.join(" "));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    let status = Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("cannot run {program}"))?;
    if !status.success() {
        bail!("{program} {} failed with {status}", args.join(" "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_uid_is_the_one_id_reports() {
        let out = Command::new("id").arg("-u").output().unwrap();
        let id: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        assert_eq!(effective_uid().unwrap(), id);
    }
}
