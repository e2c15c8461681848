//! h2load (Debian's nghttp2-client) as the L7 benchmark's HTTP/2 client and its upload
//! client, and the parsing of what it writes: the summary it
//! prints, and the per-request log (`--log-file`) the latency percentiles are taken from
//! (h2load itself prints only min/mean/max). Parsers are pure and tested on recorded output.

use std::io;
use std::path::Path;
use std::time::Duration;

use crate::load::run_in;

/// What to run.
pub(crate) struct Run<'a> {
    pub url: &'a str,
    /// HTTP/1.1 (`--h1`) instead of h2c with prior knowledge.
    pub h1: bool,
    /// Clients (connections).
    pub clients: u32,
    /// Concurrent streams per client (HTTP/2); 1 for HTTP/1.1.
    pub streams: u32,
    pub time: Duration,
    /// Header lines (`name: value`).
    pub headers: &'a [&'a str],
    /// A file whose content each request posts (`-d`).
    pub body: Option<&'a Path>,
    /// Where h2load writes one line per request (for percentiles).
    pub log: Option<&'a Path>,
}

/// One h2load run.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Outcome {
    pub requests_per_s: f64,
    /// Requests completed in the measured period.
    pub requests: f64,
    /// Failed, errored and timed-out requests and 4xx/5xx answers.
    pub errors: f64,
    /// Latency percentiles in microseconds (from the per-request log), when one was kept.
    pub latency: Option<Percentiles>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
}

pub(crate) fn run(netns: &str, r: &Run<'_>) -> io::Result<Outcome> {
    let mut args: Vec<String> = vec![
        "-t".into(),
        "1".into(),
        "-c".into(),
        r.clients.to_string(),
        "-m".into(),
        r.streams.max(1).to_string(),
        "-D".into(),
        r.time.as_secs().max(1).to_string(),
        "--warm-up-time".into(),
        "1".into(),
    ];
    if r.h1 {
        args.push("--h1".into());
    }
    for h in r.headers {
        args.push("-H".into());
        args.push((*h).to_owned());
    }
    if let Some(body) = r.body {
        args.push("-d".into());
        args.push(body.display().to_string());
    }
    if let Some(log) = r.log {
        let _ = std::fs::remove_file(log);
        args.push("--log-file".into());
        args.push(log.display().to_string());
    }
    args.push(r.url.to_owned());
    let out = run_in(netns, "h2load", &args)?;
    let mut outcome =
        parse_summary(&out).ok_or_else(|| io::Error::other(format!("h2load output: {out}")))?;
    if let Some(log) = r.log {
        let text = std::fs::read_to_string(log)
            .map_err(|e| io::Error::other(format!("h2load log {}: {e}", log.display())))?;
        outcome.latency = percentiles(&text);
    }
    Ok(outcome)
}

/// The summary h2load prints at the end.
fn parse_summary(out: &str) -> Option<Outcome> {
    let finished = out.lines().find(|l| l.starts_with("finished in "))?;
    let requests_per_s = finished
        .split(", ")
        .find_map(|part| part.strip_suffix(" req/s"))?
        .trim()
        .parse()
        .ok()?;
    let counts = out.lines().find(|l| l.starts_with("requests: "))?;
    let count = |what: &str| -> Option<f64> {
        counts
            .trim_start_matches("requests: ")
            .split(", ")
            .find_map(|part| part.strip_suffix(what))?
            .trim()
            .parse()
            .ok()
    };
    let done = count(" done")?;
    let succeeded = count(" succeeded")?;
    let status = |class: &str| -> f64 {
        out.lines()
            .find_map(|l| l.strip_prefix("status codes: "))
            .and_then(|l| l.split(", ").find_map(|p| p.strip_suffix(class)))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let failures = count(" failed").unwrap_or(0.0)
        + count(" errored").unwrap_or(0.0)
        + count(" timeout").unwrap_or(0.0);
    let errors = (done - succeeded)
        .max(failures)
        .max(status(" 4xx") + status(" 5xx"));
    Some(Outcome {
        requests_per_s,
        requests: done,
        errors,
        latency: None,
    })
}

/// Percentiles (nearest rank) of the per-request log: `start_us<TAB>status<TAB>duration_us`
/// per line; failed requests (status -1) are left out.
fn percentiles(log: &str) -> Option<Percentiles> {
    let us: Vec<f64> = log
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let _start = f.next()?;
            let status: i32 = f.next()?.trim().parse().ok()?;
            let duration: f64 = f.next()?.trim().parse().ok()?;
            (status > 0).then_some(duration)
        })
        .collect();
    percentiles_of(us)
}

/// Percentiles (nearest rank) of latencies.
pub(crate) fn percentiles_of(mut us: Vec<f64>) -> Option<Percentiles> {
    if us.is_empty() {
        return None;
    }
    us.sort_by(f64::total_cmp);
    let rank = |p: f64| -> f64 {
        // Rounded down first: 99.9 / 100 * 1000 is a hair above 999 in floating point.
        let i = (p * us.len() as f64 / 100.0 - 1e-9).ceil() as usize;
        us[i.clamp(1, us.len()) - 1]
    };
    Some(Percentiles {
        p50: rank(50.0),
        p90: rank(90.0),
        p99: rank(99.0),
        p999: rank(99.9),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUMMARY: &str = "starting benchmark...
Application protocol: h2c

finished in 2.00s, 27155.00 req/s, 29.78MB/s
requests: 54310 total, 54438 started, 54300 done, 54290 succeeded, 10 failed, 2 errored, 1 timeout
status codes: 54290 2xx, 0 3xx, 4 4xx, 6 5xx
traffic: 2.41MB (2528000) total, 369.14KB (378000) headers (space savings 0.00%), 1.95MB (2048000) data
                     min         max         mean         sd        +/- sd
time for request:       69us     50.44ms      4.61ms      5.15ms    87.99%
";

    #[test]
    fn summary() {
        let o = parse_summary(SUMMARY).unwrap();
        assert_eq!(o.requests_per_s, 27155.0);
        assert_eq!(o.requests, 54300.0);
        // 10 failed + 2 errored + 1 timeout outweighs 10 not succeeded and 10 4xx/5xx.
        assert_eq!(o.errors, 13.0);
        assert!(parse_summary("h2load: no figures").is_none());
    }

    #[test]
    fn percentiles_of_the_log() {
        let mut log = String::new();
        for d in 1..=1000 {
            log.push_str(&format!("1796657631840131\t200\t{d}\n"));
        }
        log.push_str("1796657631840131\t-1\t999999\n");
        let p = percentiles(&log).unwrap();
        assert_eq!(
            p,
            Percentiles {
                p50: 500.0,
                p90: 900.0,
                p99: 990.0,
                p999: 999.0
            }
        );
        assert!(percentiles("").is_none());
        assert!(percentiles("garbage\n").is_none());
    }
}
