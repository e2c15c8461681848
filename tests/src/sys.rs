//! The harness's few libc calls, with no safe wrapper in std: the effective uid, signals,
//! the clock-tick rate, the open-files limit and the timer slack. Together with `netns`
//! (setns, private mount namespaces) this is the only harness code allowed `unsafe`; tests
//! and the other modules call these functions.

// Each call below is a plain syscall on values this module owns.
#![allow(unsafe_code)]

use std::io;

/// Sets the calling thread's timer slack to 1 ns (`PR_SET_TIMERSLACK`): its sleeps wake
/// within a nanosecond of the due time rather than Linux's default 50 µs (the benchmark's
/// constant-rate client).
pub fn precise_timer_slack() {
    // SAFETY: prctl(PR_SET_TIMERSLACK) takes an integer and only affects the calling thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
}

/// This process's effective user id.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Sends SIGTERM to process `pid`.
pub fn terminate(pid: u32) -> io::Result<()> {
    signal(pid, libc::SIGTERM)
}

/// Sends SIGINT to process `pid`: what makes `perf stat` print its counts and exit.
pub fn interrupt(pid: u32) -> io::Result<()> {
    signal(pid, libc::SIGINT)
}

fn signal(pid: u32, signal: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| io::Error::other(format!("pid {pid} is out of range for kill(2)")))?;
    // SAFETY: kill(2) takes plain integers; a stale pid is an error, not undefined behaviour.
    if unsafe { libc::kill(pid, signal) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Clock ticks per second (`_SC_CLK_TCK`), the unit of the CPU times in `/proc/<pid>/stat`;
/// `None` when the system does not say.
pub fn clock_ticks_per_second() -> Option<u64> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|&t| t > 0)
}

/// The open-files limit (`RLIMIT_NOFILE`) as (soft, hard).
pub fn open_files_limit() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid rlimit struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((limit.rlim_cur, limit.rlim_max))
}

/// Sets the open-files limit (`RLIMIT_NOFILE`); children inherit it.
pub fn set_open_files_limit(soft: u64, hard: u64) -> io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the valid, initialised rlimit struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Raises the soft open-files limit to the hard one; returns the limit now in force.
pub fn raise_open_files_limit() -> io::Result<u64> {
    let (_, hard) = open_files_limit()?;
    set_open_files_limit(hard, hard)?;
    Ok(hard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_kernel_reports() {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let euid: u32 = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            .and_then(|id| id.parse().ok())
            .unwrap();
        assert_eq!(effective_uid(), euid);
        assert!(clock_ticks_per_second().is_some_and(|t| t >= 1));
        let (soft, hard) = open_files_limit().unwrap();
        assert!(soft <= hard, "soft {soft} above hard {hard}");
        // Setting the limit it already has succeeds and changes nothing.
        set_open_files_limit(soft, hard).unwrap();
        assert_eq!(open_files_limit().unwrap(), (soft, hard));
    }
}
