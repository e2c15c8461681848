//! Kernel events of each ztunnel during one measurement: system calls entered, counted by
//! `perf stat` attached to all of the process's threads (`raw_syscalls:sys_enter`), and
//! context switches from each thread's `/proc/<pid>/task/<tid>/status`, told apart as
//! voluntary (a thread that blocked, in `epoll_wait` above all, and was woken: the wake-ups a
//! design costs) and involuntary (a thread preempted, which grows with other load on the
//! machine). perf's `context-switches` event adds the two; it is printed as a check.
//! System calls and voluntary switches barely move when other work shares the cores, unlike
//! times, so they compare builds on a busy machine. Counting adds a little to each system
//! call of the ztunnels (a tracepoint hit), the same on every run.
//!
//! Threads a ztunnel starts or ends while counting are not counted: its tokio workers live as
//! long as it does, and blocking-pool threads do no data-path work.

use std::io::{self, Read as _};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mesh_tests::wait_until;

const EVENTS: [&str; 2] = ["raw_syscalls:sys_enter", "context-switches"];

/// What one ztunnel did during a measurement.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(crate) struct Events {
    pub syscalls: f64,
    /// perf's count: voluntary and involuntary together.
    pub context_switches: f64,
    pub voluntary: f64,
    pub involuntary: f64,
}

/// `perf stat` running against each ztunnel, until [`Counting::stop`], and each ztunnel's
/// threads' switch counters when it started.
pub(crate) struct Counting {
    perfs: Vec<(String, Child)>,
    pids: Vec<u32>,
    before: Vec<std::collections::BTreeMap<u32, Switches>>,
}

/// Context switches of a process's threads, added.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(crate) struct Switches {
    pub voluntary: u64,
    pub involuntary: u64,
}

/// Each thread's switches, summed, by thread id: a thread that ended is left out rather
/// than making the difference negative.
fn switches_of(pid: u32) -> std::collections::BTreeMap<u32, Switches> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        if let Some(s) = std::fs::read_to_string(task.path().join("status"))
            .ok()
            .and_then(|s| parse_switches(&s))
        {
            out.insert(tid, s);
        }
    }
    out
}

/// `voluntary_ctxt_switches` and `nonvoluntary_ctxt_switches` of a `status` file.
fn parse_switches(status: &str) -> Option<Switches> {
    let field = |key: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))?
            .trim()
            .parse()
            .ok()
    };
    Some(Switches {
        voluntary: field("voluntary_ctxt_switches:")?,
        involuntary: field("nonvoluntary_ctxt_switches:")?,
    })
}

/// Starts counting on each `(node, pid)`; returns once every `perf` has its counters open
/// on every thread, so the workload started next is counted from its first byte.
pub(crate) fn start(ztunnels: &[(String, u32)]) -> io::Result<Counting> {
    let mut counting = Counting {
        perfs: Vec::new(),
        pids: Vec::new(),
        before: Vec::new(),
    };
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
    counting.pids = ztunnels.iter().map(|(_, pid)| *pid).collect();
    counting.before = counting.pids.iter().map(|pid| switches_of(*pid)).collect();
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
        let after: Vec<_> = self.pids.iter().map(|pid| switches_of(*pid)).collect();
        let mut out = Vec::new();
        for (i, (node, mut child)) in std::mem::take(&mut self.perfs).into_iter().enumerate() {
            mesh_tests::sys::interrupt(child.id())?;
            let mut text = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                stderr.read_to_string(&mut text)?;
            }
            child.wait()?;
            let mut events = parse(&text).ok_or_else(|| {
                io::Error::other(format!("perf stat on ztunnel {node} printed: {text:?}"))
            })?;
            for (tid, a) in &after[i] {
                if let Some(b) = self.before[i].get(tid) {
                    events.voluntary += a.voluntary.saturating_sub(b.voluntary) as f64;
                    events.involuntary += a.involuntary.saturating_sub(b.involuntary) as f64;
                }
            }
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
        ..Events::default()
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
                context_switches: 244.0,
                ..Events::default()
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
    fn status_switches() {
        let status =
            "Name:\tztunnel\nvoluntary_ctxt_switches:\t120\nnonvoluntary_ctxt_switches:\t7\n";
        assert_eq!(
            parse_switches(status),
            Some(Switches {
                voluntary: 120,
                involuntary: 7
            })
        );
        assert_eq!(parse_switches("Name:\tx\n"), None);
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
        assert!(counts[0].1.voluntary >= 5.0, "{counts:?}");
    }
}
