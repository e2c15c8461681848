//! The load generators (Debian's iperf3, sockperf and wrk), run inside the client pod, and
//! the parsing of what they print. Parsers are pure and tested on recorded output.

use std::io;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use mesh_tests::netns::enter_before_exec;

/// Runs `program` inside namespace `netns` and returns its standard output; fails with its
/// standard error when it exits non-zero.
pub(crate) fn run_in(netns: &str, program: &str, args: &[String]) -> io::Result<String> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    enter_before_exec(&mut cmd, netns)?;
    let out = cmd
        .output()
        .map_err(|e| io::Error::other(format!("cannot run {program}: {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{program} {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Bulk throughput of one iperf3 run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Throughput {
    pub gbit_per_s: f64,
    /// Bytes the receiver got in the timed seconds.
    pub bytes: f64,
    /// Bytes sent over the whole run, the omitted first second (`-O 1`, slow start) included:
    /// what the proxies carried while their CPU and system calls were counted around the
    /// run. Dividing those by `bytes` instead would overstate them by (t + 1) / t.
    pub bytes_moved: f64,
    /// CPU seconds iperf3's client and server used per GB (iperf3's own accounting), the
    /// kernel's work of sending, forwarding and receiving included: what moving the bytes
    /// costs without any proxy.
    pub endpoints_cpu_per_gb: Option<f64>,
}

pub(crate) fn iperf3(
    netns: &str,
    server: SocketAddr,
    streams: u32,
    time: Duration,
) -> io::Result<Throughput> {
    let args: Vec<String> = [
        "-c",
        &server.ip().to_string(),
        "-p",
        &server.port().to_string(),
        "-P",
        &streams.to_string(),
        "-t",
        &time.as_secs().max(1).to_string(),
        // Skip slow start in the figures.
        "-O",
        "1",
        "-J",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let json = run_in(netns, "iperf3", &args)?;
    parse_iperf3(&json).map_err(|e| io::Error::other(format!("iperf3 output: {e}")))
}

fn parse_iperf3(json: &str) -> Result<Throughput, String> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        return Err(err.to_owned());
    }
    let sum = &v["end"]["sum_received"];
    let bps = sum["bits_per_second"]
        .as_f64()
        .ok_or("no end.sum_received.bits_per_second")?;
    let bytes = sum["bytes"].as_f64().ok_or("no end.sum_received.bytes")?;
    let intervals = v["intervals"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let bytes_moved = if intervals.is_empty() {
        bytes
    } else {
        intervals
            .iter()
            .filter_map(|i| i["sum"]["bytes"].as_f64())
            .sum()
    };
    let cpu = &v["end"]["cpu_utilization_percent"];
    let endpoints_cpu_per_gb = match (
        cpu["host_total"].as_f64(),
        cpu["remote_total"].as_f64(),
        sum["seconds"].as_f64(),
    ) {
        (Some(host), Some(remote), Some(seconds)) if bytes > 0.0 => {
            Some((host + remote) / 100.0 * seconds / (bytes / 1e9))
        }
        _ => None,
    };
    Ok(Throughput {
        gbit_per_s: bps / 1e9,
        bytes,
        bytes_moved,
        endpoints_cpu_per_gb,
    })
}

/// Round-trip time percentiles, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RoundTrips {
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// Observations in the percentiles (after sockperf's warm-up)...
    pub count: f64,
    /// ...and all round trips of the run (`[Total Run] ReceivedMessages`, warm-up
    /// included), what the ztunnels' counts are divided by.
    pub round_trips: f64,
}

/// 1 KiB request/response ping-pong over one TCP connection (`sockperf ping-pong`).
pub(crate) fn sockperf(netns: &str, server: SocketAddr, time: Duration) -> io::Result<RoundTrips> {
    let args: Vec<String> = [
        "ping-pong",
        "--tcp",
        "-i",
        &server.ip().to_string(),
        "-p",
        &server.port().to_string(),
        "-m",
        "1024",
        "-t",
        &time.as_secs().max(1).to_string(),
        "--full-rtt",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = run_in(netns, "sockperf", &args)?;
    parse_sockperf(&out).ok_or_else(|| io::Error::other(format!("sockperf output: {out}")))
}

fn parse_sockperf(out: &str) -> Option<RoundTrips> {
    let percentile = |p: &str| -> Option<f64> {
        let line = out
            .lines()
            .find(|l| l.contains(&format!("percentile {p} =")))?;
        line.rsplit('=').next()?.trim().parse().ok()
    };
    let count = out
        .lines()
        .find_map(|l| {
            let rest = l.split("Total ").nth(1)?;
            rest.split_whitespace()
                .next()?
                .trim_end_matches(|c: char| !c.is_ascii_digit())
                .parse()
                .ok()
        })
        .unwrap_or(0.0);
    let round_trips = out
        .lines()
        .filter(|l| l.contains("[Total Run]"))
        .find_map(|l| {
            l.split("ReceivedMessages=")
                .nth(1)?
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(count);
    Some(RoundTrips {
        p50_us: percentile("50.000")?,
        p99_us: percentile("99.000")?,
        p999_us: percentile("99.900")?,
        count,
        round_trips,
    })
}

/// An HTTP/1.1 load run (wrk).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Http {
    pub requests_per_s: f64,
    pub requests: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    /// Socket errors and non-2xx answers: a run with errors is reported, not hidden.
    pub errors: f64,
}

/// wrk against `url`; `close` sends `Connection: close`, so every request is a new TCP
/// connection (and, through the mesh, a new HBONE stream).
pub(crate) fn wrk(
    netns: &str,
    url: &str,
    connections: u32,
    close: bool,
    time: Duration,
) -> io::Result<Http> {
    wrk_with(netns, url, connections, close, time, &[])
}

/// [`wrk`] with more header lines (`name: value`).
pub(crate) fn wrk_with(
    netns: &str,
    url: &str,
    connections: u32,
    close: bool,
    time: Duration,
    headers: &[&str],
) -> io::Result<Http> {
    let mut args: Vec<String> = [
        "-t",
        "2",
        "-c",
        &connections.to_string(),
        "-d",
        &format!("{}s", time.as_secs().max(1)),
        "--latency",
        "--timeout",
        "5s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if close {
        args.push("-H".into());
        args.push("Connection: close".into());
    }
    for h in headers {
        args.push("-H".into());
        args.push((*h).to_owned());
    }
    args.push(url.to_owned());
    let out = run_in(netns, "wrk", &args)?;
    parse_wrk(&out).ok_or_else(|| io::Error::other(format!("wrk output: {out}")))
}

fn parse_wrk(out: &str) -> Option<Http> {
    let requests_per_s = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))?
        .trim()
        .parse()
        .ok()?;
    let requests = out
        .lines()
        .find(|l| l.contains(" requests in "))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let percentile = |p: &str| -> Option<f64> {
        let line = out
            .lines()
            .skip_while(|l| !l.contains("Latency Distribution"))
            .find(|l| l.trim().starts_with(p))?;
        duration_ms(line.split_whitespace().nth(1)?)
    };
    let mut errors = 0.0;
    for line in out.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("Socket errors:") {
            for part in rest.split(',') {
                errors += part
                    .split_whitespace()
                    .last()
                    .and_then(|n| n.parse::<f64>().ok())
                    .unwrap_or(0.0);
            }
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors += rest.trim().parse::<f64>().unwrap_or(0.0);
        }
    }
    Some(Http {
        requests_per_s,
        requests,
        p50_ms: percentile("50%")?,
        p90_ms: percentile("90%")?,
        p99_ms: percentile("99%")?,
        errors,
    })
}

/// wrk's durations: `812.00us`, `1.23ms`, `2.00s`, `1.50m`.
fn duration_ms(s: &str) -> Option<f64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iperf3_json() {
        let json = r#"{"start":{},"intervals":[{"sum":{"bytes":1000000000,"omitted":true}},
            {"sum":{"bytes":5000000000,"omitted":false}}],"end":{"sum_sent":{"bytes":2,"bits_per_second":3},
            "sum_received":{"bytes":5000000000,"seconds":5.0,"bits_per_second":8000000000.0},
            "cpu_utilization_percent":{"host_total":60.0,"remote_total":40.0}}}"#;
        let t = parse_iperf3(json).unwrap();
        assert_eq!(t.gbit_per_s, 8.0);
        assert_eq!(t.bytes, 5e9);
        // The omitted first second was carried too.
        assert_eq!(t.bytes_moved, 6e9);
        // 1.0 CPU for 5 s moving 5 GB.
        assert_eq!(t.endpoints_cpu_per_gb, Some(1.0));
        let err = r#"{"start":{},"end":{},"error":"unable to connect to server"}"#;
        assert_eq!(
            parse_iperf3(err).unwrap_err(),
            "unable to connect to server"
        );
    }

    #[test]
    fn sockperf_percentiles() {
        let out = "sockperf: [Total Run] RunTime=5.000 sec; Warm up time=400 msec; SentMessages=90001; ReceivedMessages=90000\n\
            sockperf: Summary: Round trip is 19.045 usec\n\
            sockperf: \u{1b}[2;35mTotal 81267 observations\u{1b}[0m; each percentile contains 812.67 observations\n\
            sockperf: ---> <MAX> observation = 4093.346\n\
            sockperf: ---> percentile 99.999 = 4045.657\n\
            sockperf: ---> percentile 99.900 =   64.961\n\
            sockperf: ---> percentile 99.000 =   41.497\n\
            sockperf: ---> percentile 50.000 =   17.152\n";
        let r = parse_sockperf(out).unwrap();
        assert_eq!(
            r,
            RoundTrips {
                p50_us: 17.152,
                p99_us: 41.497,
                p999_us: 64.961,
                count: 81267.0,
                round_trips: 90000.0
            }
        );
        assert!(parse_sockperf("no figures").is_none());
    }

    #[test]
    fn wrk_summary() {
        let out = "Running 5s test @ http://198.19.2.10:8080/1k
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   812.00us  100.00us   5.00ms   90.00%
    Req/Sec    19.00k     1.00k   21.00k    70.00%
  Latency Distribution
     50%  790.00us
     75%    1.00ms
     90%    1.20ms
     99%    2.50ms
  190000 requests in 5.00s, 230.00MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
  Non-2xx or 3xx responses: 2
Requests/sec:  38000.50
Transfer/sec:     46.00MB
";
        let h = parse_wrk(out).unwrap();
        assert_eq!(h.requests_per_s, 38000.5);
        assert_eq!(h.requests, 190000.0);
        assert_eq!(h.p50_ms, 0.79);
        assert_eq!(h.p90_ms, 1.2);
        assert_eq!(h.p99_ms, 2.5);
        assert_eq!(h.errors, 6.0);
    }

    #[test]
    fn wrk_durations() {
        assert_eq!(duration_ms("812.00us"), Some(0.812));
        assert_eq!(duration_ms("1.50ms"), Some(1.5));
        assert_eq!(duration_ms("2.00s"), Some(2000.0));
        assert_eq!(duration_ms("1.00m"), Some(60000.0));
        assert_eq!(duration_ms("3h"), None);
    }
}
