//! The L7 benchmark's workloads on one path, with the CPU and memory of the proxy processes
//! on that path around each: keep-alive at saturation (wrk), at fixed rates (`rate`),
//! h2c multiplexed (h2load), a new connection per request (wrk, `Connection: close`), 1 MiB
//! uploads (h2load), and idle client connections held open for the memory figures.

use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path as FsPath;
use std::time::{Duration, Instant};

use mesh_tests::netns::in_netns;

use crate::Args;
use crate::h2load;
use crate::l7_config::MATCH_HEADER;
use crate::l7_report::cpu_key;
use crate::load::{self, run_in};
use crate::procfs::{self, Memory};
use crate::rate::{self, read_response};
use crate::report::Figures;
use crate::servers::{H2C_PORT, HTTP_PATH, HTTP_PORT, UPLOAD_PATH};

type Error = Box<dyn std::error::Error>;

/// A proxy process whose CPU and memory are measured.
#[derive(Clone, Debug)]
pub(crate) struct ProxyProc {
    pub name: String,
    pub pid: u32,
    /// Count its children too (nginx's workers).
    tree: bool,
}

impl ProxyProc {
    pub(crate) fn new(name: &str, pid: u32, tree: bool) -> ProxyProc {
        ProxyProc {
            name: name.to_owned(),
            pid,
            tree,
        }
    }

    pub(crate) fn cpu_seconds(&self) -> io::Result<f64> {
        if self.tree {
            procfs::tree_cpu_seconds(self.pid)
        } else {
            procfs::cpu_seconds(self.pid)
        }
    }

    pub(crate) fn memory(&self) -> io::Result<Memory> {
        if self.tree {
            procfs::tree_memory(self.pid)
        } else {
            procfs::memory(self.pid)
        }
    }
}

/// One compared path: who the client is, whom it addresses, and which proxies carry it.
pub(crate) struct Path {
    pub name: &'static str,
    pub client_netns: String,
    /// Where HTTP/1.1 requests go (port 8080).
    pub host: Ipv4Addr,
    /// Where h2c requests go (port 8081).
    pub h2_host: Ipv4Addr,
    pub procs: Vec<ProxyProc>,
}

impl Path {
    fn url(&self, path: &str) -> String {
        format!("http://{}:{HTTP_PORT}{path}", self.host)
    }

    fn h2_url(&self) -> String {
        format!("http://{}:{H2C_PORT}{HTTP_PATH}", self.h2_host)
    }

    fn cpu_now(&self) -> io::Result<Vec<f64>> {
        self.procs.iter().map(ProxyProc::cpu_seconds).collect()
    }

    /// Records each proxy's CPU since `before` per request, in µs, and their total.
    fn record_cpu(
        &self,
        f: &mut Figures,
        workload: &str,
        before: &[f64],
        requests: f64,
    ) -> io::Result<f64> {
        let after = self.cpu_now()?;
        let mut total = 0.0;
        for (i, p) in self.procs.iter().enumerate() {
            let used = after[i] - before[i];
            total += used;
            if requests > 0.0 {
                f.record(
                    self.name,
                    &cpu_key(workload, &p.name),
                    used * 1e6 / requests,
                );
            }
        }
        if requests > 0.0 && !self.procs.is_empty() {
            f.record(
                self.name,
                &cpu_key(workload, "total"),
                total * 1e6 / requests,
            );
        }
        Ok(total)
    }
}

/// What carries each path, for the terminal.
pub(crate) fn describe(path: &str) -> &'static str {
    match path {
        "direct" => "client-plain -> server-plain: the kernel only",
        "mesh" => "client -> server pod IP: both ztunnels (HBONE), no waypoint",
        "waypoint" => "client -> bench VIP: ztunnel -> waypoint -> ztunnel -> v1 90% / v2 10%",
        _ => "client-plain -> nginx (one worker) -> server-plain v1 90% / v2 10%",
    }
}

fn header() -> String {
    format!("{}: {}", MATCH_HEADER.0, MATCH_HEADER.1)
}

/// The keep-alive GET of the held connections and the constant-rate client.
fn request(path: &Path) -> String {
    format!(
        "GET {HTTP_PATH} HTTP/1.1\r\nhost: {}\r\n{}\r\n\r\n",
        path.host,
        header()
    )
}

/// curl's status code for one request on `path` (`-H` lines in `extra`).
fn curl_status(path: &Path, extra: &[&str]) -> Result<String, Error> {
    let mut args: Vec<String> = ["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-m", "10"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    Ok(run_in(&path.client_netns, "curl", &args)?.trim().to_owned())
}

/// Each request kind answers 200 on `path`; on the proxied paths, a request without the
/// match header is answered 404 by the proxy's routes (proof that they decided it).
pub(crate) fn check(path: &Path, body: &FsPath) -> Result<(), Error> {
    let h = header();
    let upload = format!("@{}", body.display());
    let url = path.url(HTTP_PATH);
    let h2 = path.h2_url();
    let up = path.url(UPLOAD_PATH);
    let cases: [(&str, Vec<&str>, &str); 4] = [
        ("GET", vec!["-H", &h, &url], "200"),
        (
            "h2c GET",
            vec!["--http2-prior-knowledge", "-H", &h, &h2],
            "200",
        ),
        (
            "upload",
            vec!["-H", &h, "--data-binary", &upload, &up],
            "200",
        ),
        (
            "GET without the match header",
            vec![&url],
            if path.procs.is_empty() || path.name == "mesh" {
                "200"
            } else {
                "404"
            },
        ),
    ];
    for (what, args, want) in cases {
        let got = curl_status(path, &args)?;
        if got != want {
            return Err(
                format!("path {}: {what} answered {got}, expected {want}", path.name).into(),
            );
        }
    }
    Ok(())
}

/// Fixed rates: (figure prefix, req/s, keep-alive connections).
const RATES: [(&str, f64, usize); 2] = [("r1k", 1000.0, 10), ("r10k", 10_000.0, 50)];

/// Every selected workload once on `path`.
pub(crate) fn measure(
    path: &Path,
    time: Duration,
    args: &Args,
    body: &FsPath,
    f: &mut Figures,
) -> Result<(), Error> {
    let runs = |w: &str| args.workloads.is_empty() || args.workloads.iter().any(|x| x == w);
    let h = header();
    let netns = &path.client_netns;
    let name = path.name;
    let warn = |f: &mut Figures, what: &str, errors: f64| {
        if errors > 0.0 {
            f.warnings
                .push(format!("{name}: {what} had {errors} errors"));
        }
    };

    if runs("ka") {
        let before = path.cpu_now()?;
        let ka = load::wrk_with(
            netns,
            &path.url(HTTP_PATH),
            args.connections,
            false,
            time,
            &[h.as_str()],
        )?;
        let cpu = path.record_cpu(f, "ka", &before, ka.requests)?;
        f.record(name, "ka_rps", ka.requests_per_s);
        f.record(name, "ka_p50", ka.p50_ms);
        f.record(name, "ka_p90", ka.p90_ms);
        f.record(name, "ka_p99", ka.p99_ms);
        warn(f, "wrk keep-alive", ka.errors);
        println!(
            "   {name:<9} keep-alive: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, proxies {:.1} us/req",
            ka.requests_per_s,
            ka.p50_ms,
            ka.p99_ms,
            cpu * 1e6 / ka.requests.max(1.0)
        );
    }

    if runs("rate") {
        for (key, rate, connections) in RATES {
            let before = path.cpu_now()?;
            let start = Instant::now();
            let out = rate::run(
                netns,
                SocketAddr::from((path.host, HTTP_PORT)),
                &request(path),
                rate,
                connections,
                time,
            )?;
            let wall = start.elapsed().as_secs_f64();
            let mut rss = 0.0;
            for p in &path.procs {
                let m = p.memory()?;
                rss += m.rss_mib;
                f.memory
                    .entry(p.name.clone())
                    .or_default()
                    .insert(format!("{key}_rss_mib"), m.rss_mib);
            }
            // The set-up requests are a few dozen among thousands.
            let cpu = path.record_cpu(f, key, &before, out.requests)?;
            let per_1k = out.requests_per_s / 1000.0;
            f.record(name, &format!("{key}_rps"), out.requests_per_s);
            if let Some(p) = out.latency {
                f.record(name, &format!("{key}_p50"), p.p50);
                f.record(name, &format!("{key}_p90"), p.p90);
                f.record(name, &format!("{key}_p99"), p.p99);
                f.record(name, &format!("{key}_p999"), p.p999);
            }
            if !path.procs.is_empty() && per_1k > 0.0 {
                f.record(name, &format!("{key}_vcpu"), cpu / wall / per_1k);
                f.record(name, &format!("{key}_mib"), rss / per_1k);
            }
            warn(f, &format!("{rate} req/s"), out.errors);
            if out.requests_per_s < rate * 0.95 {
                f.warnings.push(format!(
                    "{name}: {rate} req/s asked, {:.0} achieved",
                    out.requests_per_s
                ));
            }
            let p = out
                .latency
                .map_or((0.0, 0.0, 0.0), |p| (p.p50, p.p99, p.p999));
            println!(
                "   {name:<9} at {rate:.0} req/s: {:.0} achieved, p50 {:.0} us, p99 {:.0} us, p99.9 {:.0} us; proxies {:.3} vCPU, {rss:.1} MiB",
                out.requests_per_s,
                p.0,
                p.1,
                p.2,
                cpu / wall
            );
        }
    }

    if runs("h2c") {
        let url = path.h2_url();
        let before = path.cpu_now()?;
        let out = h2load::run(
            netns,
            &h2load::Run {
                url: &url,
                h1: false,
                clients: 4,
                streams: 32,
                time,
                headers: &[h.as_str()],
                body: None,
                log: None,
            },
        )?;
        let cpu = path.record_cpu(f, "h2c", &before, out.requests)?;
        f.record(name, "h2c_rps", out.requests_per_s);
        warn(f, "h2load h2c", out.errors);
        println!(
            "   {name:<9} h2c: {:.0} req/s, proxies {:.1} us/req",
            out.requests_per_s,
            cpu * 1e6 / out.requests.max(1.0)
        );
    }

    if runs("conn") {
        let before = path.cpu_now()?;
        let close = load::wrk_with(
            netns,
            &path.url(HTTP_PATH),
            args.connections / 2,
            true,
            time,
            &[h.as_str()],
        )?;
        let cpu = path.record_cpu(f, "conn", &before, close.requests)?;
        f.record(name, "conn_rate", close.requests_per_s);
        warn(f, "wrk Connection: close", close.errors);
        println!(
            "   {name:<9} new connections: {:.0}/s, proxies {:.1} us/conn",
            close.requests_per_s,
            cpu * 1e6 / close.requests.max(1.0)
        );
    }

    if runs("upload") {
        let url = path.url(UPLOAD_PATH);
        let log = std::env::temp_dir().join("l7-bench-upload.log");
        let before = path.cpu_now()?;
        let out = h2load::run(
            netns,
            &h2load::Run {
                url: &url,
                h1: true,
                clients: 4,
                streams: 1,
                time,
                headers: &[h.as_str()],
                body: Some(body),
                log: Some(&log),
            },
        )?;
        let _ = std::fs::remove_file(&log);
        let cpu = path.record_cpu(f, "upload", &before, out.requests)?;
        f.record(name, "upload_rps", out.requests_per_s);
        if let Some(p) = out.latency {
            f.record(name, "upload_p50", p.p50 / 1000.0);
            f.record(name, "upload_p99", p.p99 / 1000.0);
        }
        warn(f, "h2load upload", out.errors);
        println!(
            "   {name:<9} 1 MiB uploads: {:.0}/s, proxies {:.0} us/upload",
            out.requests_per_s,
            cpu * 1e6 / out.requests.max(1.0)
        );
    }
    Ok(())
}

/// RSS of the path's proxies with 1,000 and `max` client connections open on it, each
/// having made one keep-alive request (so each went all the way through the proxies).
pub(crate) fn held_connections(path: &Path, max: usize, f: &mut Figures) -> Result<(), Error> {
    crate::say(&format!(
        "{}: holding open client connections (up to {max})",
        path.name
    ));
    let rss = |f: &mut Figures, key: &str| -> Result<(), Error> {
        for p in &path.procs {
            let m = p.memory()?;
            f.memory
                .entry(p.name.clone())
                .or_default()
                .insert(key.to_owned(), m.rss_mib);
        }
        Ok(())
    };
    rss(f, "before_held_rss_mib")?;
    let dst = SocketAddr::from((path.host, HTTP_PORT));
    let request = request(path);
    let mut clients = Vec::new();
    let first = max.min(1000);
    open(&path.client_netns, dst, &request, first, &mut clients)?;
    rss(f, "held_1k_rss_mib")?;
    let top = if max > first {
        open(&path.client_netns, dst, &request, max - first, &mut clients)?;
        rss(f, "held_10k_rss_mib")?;
        "held_10k_rss_mib"
    } else {
        "held_1k_rss_mib"
    };
    for p in &path.procs {
        let Some(m) = f.memory.get_mut(&p.name) else {
            continue;
        };
        let (Some(&base), Some(&at)) = (m.get("before_held_rss_mib"), m.get(top)) else {
            continue;
        };
        let per_1k = (at - base) / (max as f64 / 1000.0);
        m.insert("per_1k_held_mib".into(), per_1k);
        println!(
            "   {:<13} {base:.1} MiB before, {at:.1} MiB with {max} open: {per_1k:.2} MiB per 1,000",
            p.name
        );
    }
    drop(clients);
    Ok(())
}

/// Opens `n` connections from `netns` to `dst`, a batch at a time, each making `request` and
/// reading its answer, and keeps them open in `clients`.
fn open(
    netns: &str,
    dst: SocketAddr,
    request: &str,
    n: usize,
    clients: &mut Vec<TcpStream>,
) -> Result<(), Error> {
    const BATCH: usize = 100;
    let mut left = n;
    while left > 0 {
        let batch = left.min(BATCH);
        let mut opened = in_netns(netns, move || -> io::Result<Vec<TcpStream>> {
            (0..batch)
                .map(|_| TcpStream::connect_timeout(&dst, Duration::from_secs(10)))
                .collect()
        })??;
        for conn in &mut opened {
            conn.write_all(request.as_bytes())?;
        }
        for conn in &mut opened {
            conn.set_read_timeout(Some(Duration::from_secs(20)))?;
            let status = read_response(conn)?;
            if status != 200 {
                return Err(
                    format!("held connection {}: answered {status}", clients.len() + 1).into(),
                );
            }
        }
        clients.extend(opened);
        left -= batch;
    }
    Ok(())
}
