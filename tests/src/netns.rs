//! Running code and commands inside the test's network namespaces.

// Entering a namespace is setns(2), and a child's pre-exec hook is unsafe by contract.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Output};

/// Where `ip netns add` puts namespaces.
pub const NETNS_DIR: &str = "/var/run/netns";

pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

/// Runs `f` on a fresh thread that has entered namespace `name`. Sockets created in `f`
/// stay in that namespace, whichever thread uses them afterwards.
pub fn in_netns<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    let file = File::open(netns_path(name))?;
    std::thread::spawn(move || -> io::Result<T> {
        // SAFETY: `file` is an open namespace fd; setns only affects this new thread,
        // which ends when `f` returns.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(f())
    })
    .join()
    .map_err(|_| io::Error::other("thread inside the namespace panicked"))?
}

/// Makes `cmd` enter namespace `name` between fork and exec, and die with the test.
/// Unlike `ip netns exec`, this keeps the host's mounts (cgroup v2 among them).
pub fn enter_before_exec(cmd: &mut Command, name: &str) -> io::Result<()> {
    use std::os::unix::process::CommandExt;
    let file = File::open(netns_path(name))?;
    // SAFETY: the closure runs in the child between fork and exec and only makes
    // async-signal-safe syscalls (prctl, setns) on an fd inherited from the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Runs a command and fails with its output when it does not succeed.
pub fn run(program: &str, args: &[&str]) -> io::Result<Output> {
    let out = Command::new(program).args(args).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out)
}

/// `ip -n <ns> <args...>`
pub fn ip(ns: &str, args: &[&str]) -> io::Result<()> {
    let mut full = vec!["-n", ns];
    full.extend_from_slice(args);
    run("ip", &full).map(|_| ())
}

/// Runs a command inside a namespace (`ip netns exec`), returning its output.
pub fn exec(ns: &str, program: &str, args: &[&str]) -> io::Result<Output> {
    let mut full = vec!["netns", "exec", ns, program];
    full.extend_from_slice(args);
    Command::new("ip").args(&full).output()
}
