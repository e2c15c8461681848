//! Running code and commands inside the test's network namespaces, and giving a child
//! process a mount namespace and root of its own (what a container runtime does for a pod).

// Entering a namespace is setns(2), a mount namespace is unshare(2) and mount(2), and a
// child's pre-exec hook is unsafe by contract.
#![allow(unsafe_code)]

use std::ffi::CString;
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

/// One step of building a child's private file tree, done between fork and exec (paths as
/// seen before the final [`MountStep::Chroot`]).
#[derive(Debug, Clone)]
pub enum MountStep {
    /// An empty tmpfs mounted here.
    Tmpfs(CString),
    /// mkdir.
    Dir(CString),
    /// An empty regular file (a mount point for a file).
    File(CString),
    /// A symbolic link `path` -> `target`.
    Link { target: CString, path: CString },
    /// A bind mount of `source` (recursive: with the mounts under it) on `target`.
    Bind { source: CString, target: CString },
    /// Makes the bind mount at this path read-only.
    ReadOnly(CString),
    /// chroot and chdir to `/`.
    Chroot(CString),
}

/// Makes `cmd` run in a mount namespace of its own, set up by `steps` between fork and exec.
/// The namespace first becomes a slave of the machine's (mounts made on the machine reach
/// it, none of its own leave it), so nothing the steps mount is seen outside the child, and
/// it all goes away with the child.
pub fn private_mounts_before_exec(cmd: &mut Command, steps: Vec<MountStep>) {
    use std::os::unix::process::CommandExt;
    fn check(rc: libc::c_int) -> io::Result<()> {
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
    // SAFETY: the closure runs in the child between fork and exec and only makes
    // async-signal-safe syscalls (unshare, mount, mkdir, open, close, symlink, chroot,
    // chdir) on NUL-terminated strings built before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let none = std::ptr::null::<libc::c_char>();
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            ))?;
            for step in &steps {
                match step {
                    MountStep::Tmpfs(at) => check(libc::mount(
                        c"tmpfs".as_ptr(),
                        at.as_ptr(),
                        c"tmpfs".as_ptr(),
                        0,
                        std::ptr::null(),
                    ))?,
                    MountStep::Dir(path) => check(libc::mkdir(path.as_ptr(), 0o755))?,
                    MountStep::File(path) => {
                        let fd = libc::open(path.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o644);
                        if fd < 0 {
                            return Err(io::Error::last_os_error());
                        }
                        libc::close(fd);
                    }
                    MountStep::Link { target, path } => {
                        check(libc::symlink(target.as_ptr(), path.as_ptr()))?;
                    }
                    MountStep::Bind { source, target } => check(libc::mount(
                        source.as_ptr(),
                        target.as_ptr(),
                        none,
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    ))?,
                    MountStep::ReadOnly(at) => check(libc::mount(
                        none,
                        at.as_ptr(),
                        none,
                        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                        std::ptr::null(),
                    ))?,
                    MountStep::Chroot(root) => {
                        check(libc::chroot(root.as_ptr()))?;
                        check(libc::chdir(c"/".as_ptr()))?;
                    }
                }
            }
            Ok(())
        });
    }
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
