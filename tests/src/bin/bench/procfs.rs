//! What the benchmark reads from `/proc`: a process's CPU time and memory, and the machine's
//! description. Linux only, as the whole harness is.

use std::io;

/// CPU seconds a process has used so far, user plus system, all threads
/// (`/proc/<pid>/stat` fields 14 and 15, `utime` and `stime`, in clock ticks).
pub(crate) fn cpu_seconds(pid: u32) -> io::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let ticks = parse_stat_ticks(&stat)
        .ok_or_else(|| io::Error::other(format!("unexpected /proc/{pid}/stat: {stat:?}")))?;
    Ok(ticks as f64 / clock_ticks_per_second())
}

/// `utime + stime` from a `/proc/<pid>/stat` line. The command name (field 2) is in
/// parentheses and may contain spaces, so fields are counted after the last `)`.
fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: field 3 (state) is the first; utime is field 14, stime field 15.
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks_per_second() -> f64 {
    mesh_tests::sys::clock_ticks_per_second().map_or(100.0, |t| t as f64)
}

/// Resident memory now (`VmRSS`) and at its peak (`VmHWM`), in MiB.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Memory {
    pub rss_mib: f64,
    pub peak_mib: f64,
    /// Of the RSS: private memory (heap, stacks, maps)...
    pub anon_mib: f64,
    /// ...and pages of files, the executable's code above all (shared, and reclaimable).
    pub file_mib: f64,
}

pub(crate) fn memory(pid: u32) -> io::Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_status(&status)
        .ok_or_else(|| io::Error::other(format!("no VmRSS/VmHWM in /proc/{pid}/status")))
}

fn parse_status(status: &str) -> Option<Memory> {
    let kib = |key: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        line[key.len()..]
            .split_whitespace()
            .next()?
            .parse::<f64>()
            .ok()
    };
    Some(Memory {
        rss_mib: kib("VmRSS:")? / 1024.0,
        peak_mib: kib("VmHWM:")? / 1024.0,
        anon_mib: kib("RssAnon:").unwrap_or(0.0) / 1024.0,
        file_mib: kib("RssFile:").unwrap_or(0.0) / 1024.0,
    })
}

/// `pid` and its children (nginx's master and its workers), each thread's list of children
/// read from `/proc/<pid>/task/<tid>/children`.
pub(crate) fn with_children(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
        .unwrap_or_default();
    for task in tasks {
        let children = std::fs::read_to_string(task.join("children")).unwrap_or_default();
        pids.extend(
            children
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok()),
        );
    }
    pids
}

/// CPU seconds of `pid` and its children together.
pub(crate) fn tree_cpu_seconds(pid: u32) -> io::Result<f64> {
    with_children(pid).into_iter().map(cpu_seconds).sum()
}

/// Memory of `pid` and its children together (their peaks added: an upper bound).
pub(crate) fn tree_memory(pid: u32) -> io::Result<Memory> {
    let mut total = Memory {
        rss_mib: 0.0,
        peak_mib: 0.0,
        anon_mib: 0.0,
        file_mib: 0.0,
    };
    for p in with_children(pid) {
        let m = memory(p)?;
        total.rss_mib += m.rss_mib;
        total.peak_mib += m.peak_mib;
        total.anon_mib += m.anon_mib;
        total.file_mib += m.file_mib;
    }
    Ok(total)
}

/// The machine the figures were taken on.
#[derive(Debug, Clone)]
pub(crate) struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub kernel: String,
    pub memory_mib: u64,
    /// 1-minute load average when the run started: shows whether others shared the machine.
    pub load_average: f64,
}

pub(crate) fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let memory_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemTotal:"))?.to_owned();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib / 1024);
    let load_average = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    Machine {
        cpu_model,
        cores,
        kernel,
        memory_mib,
        load_average,
    }
}

/// Raises this process's open-file limit to `want`, or to the hard limit when raising that
/// is not permitted (no `CAP_SYS_RESOURCE`, as in some containers); returns the limit now in
/// force. Children inherit it: the ztunnels, servers and clients started afterwards.
pub(crate) fn raise_nofile(want: u64) -> io::Result<u64> {
    use mesh_tests::sys::{open_files_limit, set_open_files_limit};
    let (_, max) = open_files_limit()?;
    set_open_files_limit(want, want.max(max))
        .map(|()| want)
        .or_else(|_| {
            let soft = want.min(max);
            set_open_files_limit(soft, max).map(|()| soft)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_ticks_count_fields_after_the_name() {
        let stat = "4242 (ztunnel (x) y) S 1 4242 4242 0 -1 4194560 2000 0 0 0 150 25 0 0 20 0 \
                    5 0 12345 100000000 2000 18446744073709551615";
        assert_eq!(parse_stat_ticks(stat), Some(175));
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn status_memory_in_mib() {
        let status = "Name:\tztunnel\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        let m = parse_status(status).unwrap();
        assert_eq!(m.rss_mib, 10.0);
        assert_eq!(m.peak_mib, 20.0);
        assert!(parse_status("Name: x\n").is_none());
    }

    #[test]
    fn own_process_is_readable() {
        let pid = std::process::id();
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
        assert!(memory(pid).unwrap().rss_mib > 0.0);
    }

    #[test]
    fn children_are_found() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pids = with_children(std::process::id());
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(pids[0], std::process::id());
        assert!(pids.contains(&child.id()), "{pids:?}");
    }
}
