//! Kernel events of each ztunnel during one measurement: system calls entered and context
//! switches, counted by `perf stat` attached to all of the process's threads
//! (`raw_syscalls:sys_enter` and the `context-switches` software event). Counts, unlike
//! times, barely move when other work shares the cores, so they compare builds on a busy
//! machine. Counting adds a little to each system call of the ztunnels (a tracepoint hit),
//! the same on every run.
//!
//! Threads a ztunnel starts after counting began are not counted: its tokio workers exist
//! from the start, and blocking-pool threads do no data-path work.

use std::io::{self, Read as _};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mesh_tests::wait_until;

const EVENTS: [&str; 2] = ["raw_syscalls:sys_enter", "context-switches"];

/// What one ztunnel did during a measurement.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(crate) struct Events {
    pub syscalls: f64,
    pub context_switches: f64,
}

/// `perf stat` running against each ztunnel, until [`Counting::stop`].
pub(crate) struct Counting {
    perfs: Vec<(String, Child)>,
}

/// Starts counting on each `(node, pid)`; returns once every `perf` has its counters open
/// on every thread, so the workload started next is counted from its first byte.
pub(crate) fn start(ztunnels: &[(String, u32)]) -> io::Result<Counting> {
    let mut counting = Counting { perfs: Vec::new() };
    for (node, pid) in ztunnels {
        let child = Command::new("perf")
            .args(["stat", "-x", ",", "-e", &EVENTS.join(","), "-p"])
            .arg(pid.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| io::Error::other(format!("cannot run perf (package linux-perf): {e}")))?;
        let perf = child.id();
        counting.perfs.push((node.clone(), child));
        let threads = std::fs::read_dir(format!("/proc/{pid}/task"))?.count();
        let want = threads * EVENTS.len();
        wait_until(Duration::from_secs(10), || perf_fds(perf) >= want).map_err(|e| {
            io::Error::other(format!(
                "perf stat on ztunnel {node} (pid {pid}) did not open its {want} counters: {e}"
            ))
        })?;
    }
    Ok(counting)
}

/// Open perf-event file descriptors of process `pid`.
fn perf_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy().contains("perf_event"))
                })
                .count()
        })
        .unwrap_or(0)
}

impl Counting {
    /// Stops every `perf` and returns each ztunnel's counts, in the order started.
    pub(crate) fn stop(mut self) -> io::Result<Vec<(String, Events)>> {
        let mut out = Vec::new();
        for (node, mut child) in std::mem::take(&mut self.perfs) {
            mesh_tests::sys::interrupt(child.id())?;
            let mut text = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                stderr.read_to_string(&mut text)?;
            }
            child.wait()?;
            let events = parse(&text).ok_or_else(|| {
                io::Error::other(format!("perf stat on ztunnel {node} printed: {text:?}"))
            })?;
            out.push((node, events));
        }
        Ok(out)
    }
}

impl Drop for Counting {
    fn drop(&mut self) {
        for (_, child) in &mut self.perfs {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `perf stat -x ,` lines: `count,unit,event,running time,percentage,...`. An event that
/// never ran (`<not counted>`) is a zero; one perf cannot count (`<not supported>`) makes the
/// whole result unknown.
fn parse(text: &str) -> Option<Events> {
    let count = |event: &str| -> Option<f64> {
        let line = text.lines().find(|l| l.split(',').nth(2) == Some(event))?;
        let value = line.split(',').next()?;
        if value == "<not counted>" {
            return Some(0.0);
        }
        value.parse().ok()
    };
    Some(Events {
        syscalls: count(EVENTS[0])?,
        context_switches: count(EVENTS[1])?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perf_csv_lines() {
        let text = "17490,,raw_syscalls:sys_enter,147975498,100.00,,\n\
                    244,,context-switches,147975498,100.00,,\n";
        assert_eq!(
            parse(text),
            Some(Events {
                syscalls: 17490.0,
                context_switches: 244.0
            })
        );
        let idle = "<not counted>,,raw_syscalls:sys_enter,0,100.00,,\n\
                    <not counted>,,context-switches,0,100.00,,\n";
        assert_eq!(parse(idle), Some(Events::default()));
        let unsupported = "<not supported>,,raw_syscalls:sys_enter,0,100.00,,\n\
                           3,,context-switches,10,100.00,,\n";
        assert_eq!(parse(unsupported), None);
        assert_eq!(parse("perf: no permission"), None);
    }

    #[test]
    fn counts_a_busy_process() {
        if Command::new("perf").arg("--version").output().is_err() {
            eprintln!("perf is not installed: skipped");
            return;
        }
        // A child that makes system calls (a sleep each loop) and so also switches.
        let mut busy = Command::new("sh")
            .args(["-c", "while :; do sleep 0.01; done"])
            .spawn()
            .unwrap();
        let switches = || -> u64 {
            let status =
                std::fs::read_to_string(format!("/proc/{}/status", busy.id())).unwrap_or_default();
            status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        let counting = start(&[("busy".to_owned(), busy.id())]).unwrap();
        let before = switches();
        // The shell waits for a few of its sleeps while counted.
        wait_until(Duration::from_secs(10), || switches() >= before + 5).unwrap();
        let counts = counting.stop().unwrap();
        let _ = busy.kill();
        let _ = busy.wait();
        assert_eq!(counts[0].0, "busy");
        assert!(counts[0].1.syscalls > 0.0, "{counts:?}");
        assert!(counts[0].1.context_switches > 0.0, "{counts:?}");
    }
}
