//! Child processes (ztunnel, servers, clients) run inside namespaces, killed on drop.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::netns::enter_before_exec;

/// A process that is killed (and reaped) when dropped; its output goes to a log file that
/// is printed when the test fails.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` inside namespace `netns`, with stdout and stderr in `log_dir/<name>.log`.
    pub fn spawn(name: &str, netns: &str, mut cmd: Command, log_dir: &Path) -> io::Result<Proc> {
        let log = log_dir.join(format!("{name}.log"));
        let out = File::create(&log)?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        enter_before_exec(&mut cmd, netns)?;
        let child = cmd.spawn()?;
        Ok(Proc {
            name: name.to_owned(),
            child: Some(child),
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Resident memory now (`VmRSS`), in KiB.
    pub fn rss_kib(&self) -> u64 {
        status_kib(self.pid(), "VmRSS:")
    }

    /// The most resident memory the process has had so far (`VmHWM`), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        status_kib(self.pid(), "VmHWM:")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`, or fails with the log after `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> io::Result<()> {
        wait_until(timeout, || self.log().contains(needle)).map_err(|_| {
            io::Error::other(format!(
                "{}: {needle:?} not logged within {timeout:?}; log:\n{}",
                self.name,
                self.log()
            ))
        })
    }

    /// Whether the process has exited (reaping it).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> io::Result<std::process::ExitStatus> {
        let Some(child) = self.child.as_mut() else {
            return Err(io::Error::other("already reaped"));
        };
        // Our own child, not reaped yet: the pid cannot have been reused.
        crate::sys::terminate(child.id())?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "{} did not exit on SIGTERM",
                    self.name
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("----- {} log -----\n{}", self.name, self.log());
        }
    }
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS:`, `VmHWM:`), 0 if absent.
pub fn status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A condition did not hold within its deadline.
#[derive(Debug)]
pub struct TimedOut(pub Duration);

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "condition not met within {:?}", self.0)
    }
}

impl std::error::Error for TimedOut {}

/// Polls `cond` until it holds or `timeout` passes. Polling is the wait, not a sleep standing
/// in for one: it returns as soon as the condition is observed.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<(), TimedOut> {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(TimedOut(timeout));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The directory with the workspace's build output (`target/debug`), found from the test
/// executable's own path (`target/debug/deps/<test>` or `target/debug/<bin>`).
pub fn target_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("ZTUNNEL_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().unwrap_or(Path::new("."));
    // Test executables live in `target/debug/deps`, binaries in `target/debug`.
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().unwrap_or(dir).to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// Path of a workspace binary, built by `cargo xtask test` before the tests run.
pub fn binary(name: &str) -> PathBuf {
    let path = target_dir().join(name);
    assert!(
        path.exists(),
        "{} not built: run the tests through `cargo xtask test` (it builds the binaries first)",
        path.display()
    );
    path
}
