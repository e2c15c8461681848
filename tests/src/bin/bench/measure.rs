//! One round of the L4 workloads on one path: bulk throughput (iperf3), 1 KiB ping-pong
//! round trips (sockperf), HTTP round trips at a fixed rate (the constant-rate client), new
//! connections and keep-alive requests (wrk). Around each, on a meshed path, the ztunnels'
//! CPU time (`/proc/<pid>/stat`), divided by what the workload moved. Their kernel events
//! (system calls and context switches, from `perf stat`, module `counts`) are taken in a
//! second run of the workload: counting system calls traces each one, which costs the
//! ztunnels CPU (0.086 against 0.081 s per 1,000 round trips in two runs here) and the
//! direct path never has it, so the figures compared with the direct path are taken
//! without it.

use std::net::SocketAddr;
use std::time::Duration;

use crate::report::Figures;
use crate::servers::{HTTP_PATH, HTTP_PORT, IPERF_PORT, SOCKPERF_PORT};
use crate::{Args, Path, counts, load, procfs, rate, url};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

pub(crate) fn cpu_now(ztunnels: &[(String, u32)]) -> Result<Vec<f64>> {
    Ok(ztunnels
        .iter()
        .map(|(_, pid)| procfs::cpu_seconds(*pid))
        .collect::<std::result::Result<_, _>>()?)
}

/// What is measured around one workload on one path.
struct Around<'a> {
    path: &'a Path,
    ztunnels: &'a [(String, u32)],
    meshed: bool,
    cpu: Vec<f64>,
    counting: Option<counts::Counting>,
}

impl<'a> Around<'a> {
    /// Starts the CPU clock and, on a meshed path when `count`, the event counts. A `perf`
    /// that cannot run leaves the event figures out and says so once in the warnings.
    fn start(
        path: &'a Path,
        ztunnels: &'a [(String, u32)],
        f: &mut Figures,
        count: bool,
    ) -> Result<Self> {
        let meshed = path.name != "direct";
        let counting = if meshed && count {
            match counts::start(ztunnels) {
                Ok(c) => Some(c),
                Err(e) => {
                    let w = format!("no system call or context switch counts: {e}");
                    if !f.warnings.contains(&w) {
                        f.warnings.push(w);
                    }
                    None
                }
            }
        } else {
            None
        };
        Ok(Around {
            path,
            ztunnels,
            meshed,
            cpu: cpu_now(ztunnels)?,
            counting,
        })
    }

    /// Records the ztunnels' CPU as `(key, divisor)` and their system calls and context
    /// switches as `((syscalls key, switches key), divisor)`: per ztunnel (`by_node`) and
    /// both together (the path's figure).
    fn finish(
        self,
        f: &mut Figures,
        cpu: Option<(&str, f64)>,
        events: Option<((&str, &str), f64)>,
    ) -> Result<()> {
        let after = cpu_now(self.ztunnels)?;
        let counted = match self.counting {
            Some(c) => c.stop()?,
            None => Vec::new(),
        };
        if !self.meshed {
            return Ok(());
        }
        let name = self.path.name;
        let mut record = |key: &str, per: f64, values: Vec<(String, f64)>| {
            if per <= 0.0 {
                return;
            }
            let mut total = 0.0;
            for (node, v) in values {
                total += v;
                f.by_node
                    .entry((name.to_owned(), key.to_owned(), node))
                    .or_default()
                    .push(v / per);
            }
            f.record(name, key, total / per);
        };
        if let Some((key, per)) = cpu {
            let used = self
                .ztunnels
                .iter()
                .zip(after.iter().zip(&self.cpu))
                .map(|((node, _), (a, b))| (node.clone(), a - b))
                .collect();
            record(key, per, used);
        }
        if let Some(((sys_key, cs_key), per)) = events
            && !counted.is_empty()
        {
            record(
                sys_key,
                per,
                counted
                    .iter()
                    .map(|(n, e)| (n.clone(), e.syscalls))
                    .collect(),
            );
            record(
                cs_key,
                per,
                counted
                    .iter()
                    .map(|(n, e)| (n.clone(), e.voluntary))
                    .collect(),
            );
            record(
                &cs_key.replacen("cs_", "inv_", 1),
                per,
                counted
                    .iter()
                    .map(|(n, e)| (n.clone(), e.involuntary))
                    .collect(),
            );
            record(
                &cs_key.replacen("cs_", "perfcs_", 1),
                per,
                counted
                    .iter()
                    .map(|(n, e)| (n.clone(), e.context_switches))
                    .collect(),
            );
        }
        Ok(())
    }
}

/// On a meshed path, the workload `run` once more with the ztunnels' kernel events counted,
/// recorded as `(syscalls key, switches key)` per what `run` returns it moved.
fn counted(
    path: &Path,
    ztunnels: &[(String, u32)],
    f: &mut Figures,
    keys: (&str, &str),
    run: impl FnOnce() -> Result<f64>,
) -> Result<()> {
    if path.name == "direct" {
        return Ok(());
    }
    let around = Around::start(path, ztunnels, f, true)?;
    let moved = run()?;
    around.finish(f, None, Some((keys, moved)))
}

/// Every workload once on `path`.
pub(crate) fn measure(
    path: &Path,
    ztunnels: &[(String, u32)],
    time: Duration,
    args: &Args,
    f: &mut Figures,
) -> Result<()> {
    let connections = args.connections;
    let runs =
        |workload: &str| args.workloads.is_empty() || args.workloads.iter().any(|w| w == workload);
    let netns = &path.client_netns;

    let bulk = [
        (1, "tput_1", "cpu_per_gb_1", ("sys_per_mb_1", "cs_per_mb_1")),
        (8, "tput_8", "cpu_per_gb_8", ("sys_per_mb_8", "cs_per_mb_8")),
    ];
    for (streams, tput, cpu_key, events) in bulk.into_iter().filter(|_| runs("tput")) {
        let iperf3 = || {
            load::iperf3(
                netns,
                SocketAddr::new(path.server.into(), IPERF_PORT),
                streams,
                time,
            )
        };
        let around = Around::start(path, ztunnels, f, false)?;
        let t = iperf3()?;
        around.finish(f, Some((cpu_key, t.bytes_moved / 1e9)), None)?;
        counted(
            path,
            ztunnels,
            f,
            events,
            || Ok(iperf3()?.bytes_moved / 1e6),
        )?;
        f.record(path.name, tput, t.gbit_per_s);
        if let Some(endpoints) = t.endpoints_cpu_per_gb {
            f.record(path.name, &format!("endpoints_{cpu_key}"), endpoints);
        }
        println!(
            "   {:<9} iperf3 {streams} stream(s): {:.2} Gbit/s",
            path.name, t.gbit_per_s
        );
    }

    if runs("rtt") {
        let sockperf = || {
            load::sockperf(
                netns,
                SocketAddr::new(path.server.into(), SOCKPERF_PORT),
                time,
            )
        };
        let around = Around::start(path, ztunnels, f, false)?;
        let rt = sockperf()?;
        around.finish(f, Some(("cpu_per_1k_rt", rt.round_trips / 1000.0)), None)?;
        counted(path, ztunnels, f, ("sys_per_rt", "cs_per_rt"), || {
            Ok(sockperf()?.round_trips)
        })?;
        f.record(path.name, "rtt_p50", rt.p50_us);
        f.record(path.name, "rtt_p99", rt.p99_us);
        f.record(path.name, "rtt_p999", rt.p999_us);
        println!(
            "   {:<9} 1 KiB round trips: p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us",
            path.name, rt.p50_us, rt.p99_us, rt.p999_us
        );
    }

    if runs("rate") {
        let dst = SocketAddr::new(path.server.into(), HTTP_PORT);
        let request = format!("GET {HTTP_PATH} HTTP/1.1\r\nhost: {}\r\n\r\n", path.server);
        let fixed_rate = || rate::run(netns, dst, &request, args.rt_rate, 1, time);
        let out = fixed_rate()?;
        // One warm-up request precedes the timed ones on the connection.
        counted(
            path,
            ztunnels,
            f,
            ("sys_per_rt_rate", "cs_per_rt_rate"),
            || Ok(fixed_rate()?.requests + 1.0),
        )?;
        if out.errors > 0.0 {
            f.warnings.push(format!(
                "{}: {} of the fixed-rate round trips failed",
                path.name, out.errors
            ));
        }
        if let Some(l) = &out.latency {
            f.record(path.name, "rate_p50", l.p50);
            f.record(path.name, "rate_p99", l.p99);
            f.record(path.name, "rate_p999", l.p999);
            println!(
                "   {:<9} HTTP round trips at {:.0}/s: p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us",
                path.name, out.requests_per_s, l.p50, l.p99, l.p999
            );
        }
    }

    if runs("conn") {
        let around = Around::start(path, ztunnels, f, false)?;
        let close = load::wrk(netns, &url(path), connections / 2, true, time)?;
        around.finish(f, Some(("cpu_per_1k_conn", close.requests / 1000.0)), None)?;
        f.record(path.name, "conn_rate", close.requests_per_s);
        if close.errors > 0.0 {
            f.warnings.push(format!(
                "{}: wrk Connection: close had {} errors",
                path.name, close.errors
            ));
        }
        println!(
            "   {:<9} new connections: {:.0}/s",
            path.name, close.requests_per_s
        );
    }

    if runs("ka") {
        let around = Around::start(path, ztunnels, f, false)?;
        let ka = load::wrk(netns, &url(path), connections, false, time)?;
        around.finish(f, Some(("cpu_per_1k_req", ka.requests / 1000.0)), None)?;
        f.record(path.name, "ka_rps", ka.requests_per_s);
        f.record(path.name, "ka_p50", ka.p50_ms);
        f.record(path.name, "ka_p99", ka.p99_ms);
        if ka.errors > 0.0 {
            f.warnings.push(format!(
                "{}: wrk keep-alive had {} errors",
                path.name, ka.errors
            ));
        }
        println!(
            "   {:<9} keep-alive: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms",
            path.name, ka.requests_per_s, ka.p50_ms, ka.p99_ms
        );
    }
    Ok(())
}
