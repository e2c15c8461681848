//! The L4 benchmark (`cargo xtask bench`, issue 13): how much the mesh costs against no mesh,
//! measured side by side in one run on this machine.
//!
//! Topology: node1 holds `client` (enrolled), `local-server` (enrolled, same node) and
//! `client-plain` (namespace `plain`, not enrolled); node2 holds `server` (enrolled) and
//! `server-plain` (not enrolled). The paths compared:
//! - direct: `client-plain` -> `server-plain`, plain kernel networking, no ztunnel involved;
//! - mesh: `client` -> `server`, captured by eBPF, HBONE mTLS through both nodes' ztunnels;
//! - same-node: `client` -> `local-server`, through node1's ztunnel only.
//!
//! Every workload runs on every path, interleaved, `--runs` times; figures are reported as
//! median and worst run. ztunnel CPU comes from `/proc/<pid>/stat`, memory from
//! `/proc/<pid>/status`. Nothing here asserts a speed: the targets are printed, met or not.
//!
//! `--l7` runs the L7 benchmark instead (issue 21, module `l7`): direct, L4 mesh, waypoint and
//! nginx, HTTP workloads, the CPU and memory of every proxy process.

mod counts;
mod h2load;
mod l7;
mod l7_config;
mod l7_measure;
mod l7_report;
mod load;
mod measure;
mod procfs;
mod rate;
mod report;
mod servers;
mod svg;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use serde_json::json;

use mesh_tests::mesh::{Mesh, PodSpec};
use mesh_tests::netns::run;
use mesh_tests::process::target_dir;
use mesh_tests::wait_until;

use report::Figures;
use servers::{HTTP_PATH, HTTP_PORT, HoldServer, PodServers};

/// L4 benchmark: direct vs mesh vs same-node mesh, with ztunnel CPU and memory; with
/// `--l7`, the L7 benchmark: direct vs L4 mesh vs waypoint vs nginx.
#[derive(Debug, Parser)]
struct Args {
    /// The L7 benchmark (issue 21) instead of the L4 one: writes l7-results.json,
    /// l7-results.md and l7.svg.
    #[arg(long)]
    l7: bool,
    /// A smoke run: one repetition of 2 s per measurement, 1,000 held connections.
    #[arg(long)]
    quick: bool,
    /// How many times each measurement is repeated (median and worst are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Connections wrk keeps open (keep-alive) or cycles through (`Connection: close`).
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// Largest number of idle connections held through the mesh for the memory figures
    /// (RSS is also taken at 1,000).
    #[arg(long, default_value_t = 10_000)]
    held: usize,
    /// Where results.json, bench.svg and results.md go (default: `<target>/bench`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only these paths (default: all; for profiling one; the ratios need `direct`). L4:
    /// `direct`, `mesh`, `same-node`; L7: `direct`, `mesh`, `waypoint`, `nginx`.
    #[arg(long, value_delimiter = ',')]
    paths: Vec<String>,
    /// Only these workloads (default: all). L4: `tput` (iperf3), `rtt` (sockperf
    /// ping-pong), `rate` (round trips at `--rt-rate`), `conn` (wrk, Connection: close),
    /// `ka` (wrk keep-alive). L7: `ka`, `rate` (1,000 and 10,000
    /// req/s), `h2c`, `conn`, `upload`.
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// Round trips per second of the fixed-rate workload (`rate`, L4): HTTP/1.1 1 KiB
    /// requests on one keep-alive connection, each timed from when it was due.
    #[arg(long, default_value_t = 2000.0)]
    rt_rate: f64,
    /// Extra ztunnel arguments, e.g. `--ztunnel-arg=--worker-threads=1` (repeatable).
    #[arg(long, allow_hyphen_values = true)]
    ztunnel_arg: Vec<String>,
    /// Extra waypoint arguments (L7), e.g. `--waypoint-arg=--worker-threads=1` (repeatable).
    #[arg(long, allow_hyphen_values = true)]
    waypoint_arg: Vec<String>,
}

impl Args {
    /// `--quick` applied.
    fn effective(mut self) -> Args {
        if self.quick {
            self.runs = 1;
            self.seconds = 2;
            self.held = self.held.min(1000);
        }
        self
    }
}

/// What both benchmarks set up first.
struct Prepared {
    out_dir: PathBuf,
    nofile: u64,
    machine: procfs::Machine,
}

/// One compared path: who connects to whom.
struct Path {
    name: &'static str,
    client_netns: String,
    server: Ipv4Addr,
}

fn main() -> ExitCode {
    let args = Args::parse().effective();
    let result = prepare(&args).and_then(|prep| {
        if args.l7 {
            l7::bench(&args, &prep)
        } else {
            bench(&args, &prep)
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bench failed: {err}");
            ExitCode::FAILURE
        }
    }
}

fn say(line: &str) {
    println!("== {line}");
}

fn prepare(args: &Args) -> Result<Prepared, Box<dyn std::error::Error>> {
    mesh_tests::require_root();
    let out_dir = args.out.clone().unwrap_or_else(|| {
        target_dir()
            .parent()
            .map_or_else(|| PathBuf::from("target"), PathBuf::from)
            .join("bench")
    });
    std::fs::create_dir_all(&out_dir)?;
    // Held connections: each is a client socket here, an accepted one in each ztunnel, an
    // upstream one in node2's ztunnel, and nginx's. Children inherit the limit.
    let nofile = procfs::raise_nofile(262_144)?;
    if (nofile as usize) < args.held + 1000 {
        return Err(format!(
            "the open-file limit is {nofile} (and cannot be raised here): too low to hold {} connections; pass --held {}",
            args.held,
            (nofile as usize).saturating_sub(1000)
        )
        .into());
    }
    let machine = procfs::machine();
    say(&format!(
        "machine: {} ({} cores), Linux {}, {} MiB; load average {:.2} at start",
        machine.cpu_model, machine.cores, machine.kernel, machine.memory_mib, machine.load_average
    ));
    if machine.load_average > 0.5 {
        println!(
            "   note: the machine is busy; figures will be noisy (ratios are taken within this run)"
        );
    }
    Ok(Prepared {
        out_dir,
        nofile,
        machine,
    })
}

fn bench(args: &Args, prep: &Prepared) -> Result<(), Box<dyn std::error::Error>> {
    let (out_dir, nofile, machine) = (&prep.out_dir, prep.nofile, &prep.machine);

    let plain = |mut p: PodSpec| {
        p.namespace = "plain".to_owned();
        p
    };
    let pods = vec![
        PodSpec::new("client", "node1", "client"),
        PodSpec::new("local-server", "node1", "server"),
        plain(PodSpec::new("client-plain", "node1", "client")),
        PodSpec::new("server", "node2", "server"),
        plain(PodSpec::new("server-plain", "node2", "server")),
    ];
    say("topology: two nodes, five pods (namespace `plain` is not enrolled)");
    let mut mesh = Mesh::new(&["node1", "node2"], pods, Vec::new())?;
    mesh.namespaces.push(("plain".to_owned(), None));
    // One log line per connection would be measured along with the proxy.
    mesh.log_filter = "info".to_owned();
    mesh.ztunnel_args.clone_from(&args.ztunnel_arg);
    // The path check below tells ztunnel's deliveries by their source, 127.0.0.6.
    if !args
        .ztunnel_arg
        .iter()
        .any(|a| a.starts_with("--inbound-source"))
    {
        mesh.ztunnel_args
            .extend(["--inbound-source".to_owned(), "loopback".to_owned()]);
    }
    for pod in mesh.topo.pods() {
        println!("   {:<13} on {} ip {}", pod.name, pod.node, pod.ip);
        tune_pod(&pod.netns)?;
    }

    say("servers: iperf3, sockperf, nginx (1 KiB), hold (idle connections) in each server pod");
    let mut servers = Vec::new();
    let mut holds = Vec::new();
    for name in ["server", "local-server", "server-plain"] {
        let netns = mesh.netns(name);
        let ip = mesh.ip(name);
        servers.push(PodServers::start(name, &netns, ip, mesh.dir.path())?);
        holds.push(HoldServer::start(
            &netns,
            SocketAddr::new(ip.into(), servers::HOLD_PORT),
        )?);
    }

    say("starting one ztunnel per node (release build)");
    mesh.start()?;
    let ztunnels: Vec<(String, u32)> = mesh
        .ztunnels
        .iter()
        .map(|(node, p)| (node.clone(), p.pid()))
        .collect();
    let mut figures = Figures::default();
    // Idle: ready, enrolled, no traffic yet.
    std::thread::sleep(Duration::from_secs(1));
    for (node, pid) in &ztunnels {
        let m = procfs::memory(*pid)?;
        println!(
            "   ztunnel {node}: pid {pid}, idle RSS {:.1} MiB ({:.1} private, {:.1} file pages)",
            m.rss_mib, m.anon_mib, m.file_mib
        );
        let memory = figures.memory.entry(node.clone()).or_default();
        memory.insert("idle_rss_mib".into(), m.rss_mib);
        memory.insert("idle_anon_mib".into(), m.anon_mib);
        memory.insert("idle_file_mib".into(), m.file_mib);
    }

    let paths = [
        Path {
            name: "direct",
            client_netns: mesh.netns("client-plain"),
            server: mesh.ip("server-plain"),
        },
        Path {
            name: "mesh",
            client_netns: mesh.netns("client"),
            server: mesh.ip("server"),
        },
        Path {
            name: "same-node",
            client_netns: mesh.netns("client"),
            server: mesh.ip("local-server"),
        },
    ];
    say("checking each path: who does the server see as the peer?");
    let hold_of = |path: &Path| match path.name {
        "direct" => &holds[2],
        "mesh" => &holds[0],
        _ => &holds[1],
    };
    for path in &paths {
        let peer = peer_seen(path.name, &path.client_netns, path.server, hold_of(path))?;
        let meshed = peer == IpAddr::from([127, 0, 0, 6]);
        println!(
            "   {:<9} server sees {peer}{}",
            path.name,
            if meshed {
                " (delivered by ztunnel)"
            } else {
                ""
            }
        );
        if meshed != (path.name != "direct") {
            return Err(format!(
                "path {} is not what it claims: the server saw {peer}",
                path.name
            )
            .into());
        }
        // Warm-up, and a check that HTTP works on the path before measuring it.
        let warm = load::wrk(
            &path.client_netns,
            &url(path),
            4,
            false,
            Duration::from_secs(1),
        )?;
        if warm.errors > 0.0 || warm.requests < 1.0 {
            return Err(format!("path {}: warm-up had {} errors", path.name, warm.errors).into());
        }
    }
    for hold in &holds {
        hold.release();
    }

    let time = Duration::from_secs(args.seconds);
    for run in 1..=args.runs {
        say(&format!("run {run} of {}", args.runs));
        for path in paths
            .iter()
            .filter(|p| args.paths.is_empty() || args.paths.iter().any(|n| n == p.name))
        {
            measure::measure(path, &ztunnels, time, args, &mut figures)?;
        }
    }
    for (node, pid) in &ztunnels {
        let m = procfs::memory(*pid)?;
        figures
            .memory
            .entry(node.clone())
            .or_default()
            .insert("peak_rss_mib".into(), m.peak_mib);
    }

    if args.held > 0 {
        let server_netns = mesh.netns("server");
        held_connections(&paths[1], &server_netns, &ztunnels, args.held, &mut figures)?;
    }

    let verdicts = report::verdicts(&figures);
    let table = report::table(&figures, false);
    say("results (median (worst run) of each figure)");
    print!("{table}");
    let events = report::events_table(&figures, false);
    if !events.is_empty() {
        say("system calls and context switches of each ztunnel (perf stat)");
        print!("{events}");
    }
    say("targets (issues 23 and 13; ratios are mesh median / direct median from this run)");
    print!("{}", report::verdict_lines(&verdicts));
    for w in &figures.warnings {
        println!("   warning: {w}");
    }
    let settings = json!({
        "runs": args.runs,
        "seconds_per_measurement": args.seconds,
        "wrk_connections": args.connections,
        "wrk_threads": 2,
        "fixed_rate_round_trips_per_s": args.rt_rate,
        "event_counts": "perf stat -e raw_syscalls:sys_enter,context-switches -p <ztunnel pid>",
        "held_connections": args.held,
        "rlimit_nofile": nofile,
        "ztunnel_log": mesh.log_filter,
        "tools": tool_versions(),
    });
    let json = report::json(&figures, machine, settings, &verdicts);
    std::fs::write(
        out_dir.join("results.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    std::fs::write(out_dir.join("bench.svg"), svg::chart(&figures, machine))?;
    let mut markdown = report::table(&figures, true);
    markdown.push('\n');
    markdown.push_str(&report::events_table(&figures, true));
    std::fs::write(out_dir.join("results.md"), markdown)?;
    say(&format!(
        "wrote {0}/results.json, {0}/results.md (the README table), {0}/bench.svg",
        out_dir.display()
    ));
    Ok(())
}

/// Room for many short connections: every port for clients, and TIME_WAIT reuse.
fn tune_pod(netns: &str) -> std::io::Result<()> {
    for kv in [
        "net.ipv4.ip_local_port_range=1024 65535",
        "net.ipv4.tcp_tw_reuse=1",
    ] {
        run("ip", &["netns", "exec", netns, "sysctl", "-qw", kv])?;
    }
    Ok(())
}

fn url(path: &Path) -> String {
    format!("http://{}:{HTTP_PORT}{HTTP_PATH}", path.server)
}

/// Opens one connection from `client_netns` to `server`'s hold port and returns the peer
/// address the server saw.
fn peer_seen(
    name: &str,
    client_netns: &str,
    server: Ipv4Addr,
    hold: &HoldServer,
) -> Result<IpAddr, Box<dyn std::error::Error>> {
    let before = hold.accepted();
    let dst = SocketAddr::new(server.into(), servers::HOLD_PORT);
    let _conn: TcpStream = mesh_tests::traffic::connect(client_netns, dst)?;
    wait_until(Duration::from_secs(10), || hold.accepted() > before)
        .map_err(|e| format!("path {name}: no connection reached the server: {e}"))?;
    hold.last_peer()
        .map(|p| p.ip())
        .ok_or_else(|| format!("path {name}: peer address unknown").into())
}

/// RSS of each ztunnel with 1,000 and `max` idle connections held through the mesh.
fn held_connections(
    path: &Path,
    server_netns: &str,
    ztunnels: &[(String, u32)],
    max: usize,
    f: &mut Figures,
) -> Result<(), Box<dyn std::error::Error>> {
    say(&format!(
        "holding idle connections through the mesh to nginx (up to {max})"
    ));
    let rss = |f: &mut Figures, key: &str| -> Result<(), Box<dyn std::error::Error>> {
        for (node, pid) in ztunnels {
            let m = procfs::memory(*pid)?;
            f.memory
                .entry(node.clone())
                .or_default()
                .insert(key.to_owned(), m.rss_mib);
        }
        Ok(())
    };
    // Let the allocator settle after the load runs before taking the baseline.
    std::thread::sleep(Duration::from_secs(2));
    rss(f, "before_held_rss_mib")?;
    let dst = SocketAddr::new(path.server.into(), HTTP_PORT);
    let mut clients = Vec::new();
    let first = max.min(1000);
    servers::hold_connections(&path.client_netns, dst, server_netns, first, &mut clients)?;
    rss(f, "held_1k_rss_mib")?;
    let top_key = if max > first {
        servers::hold_connections(
            &path.client_netns,
            dst,
            server_netns,
            max - first,
            &mut clients,
        )?;
        rss(f, "held_10k_rss_mib")?;
        "held_10k_rss_mib"
    } else {
        "held_1k_rss_mib"
    };
    for (node, m) in &mut f.memory {
        let (Some(&base), Some(&top)) = (m.get("before_held_rss_mib"), m.get(top_key)) else {
            continue;
        };
        let per_1k = (top - base) / (max as f64 / 1000.0);
        m.insert("per_1k_held_mib".into(), per_1k);
        println!(
            "   ztunnel {node}: {base:.1} MiB before, {top:.1} MiB with {max} held: {per_1k:.2} MiB per 1,000"
        );
    }
    drop(clients);
    Ok(())
}

fn tool_versions() -> serde_json::Value {
    let version = |program: &str, arg: &str| -> String {
        std::process::Command::new(program)
            .arg(arg)
            .output()
            .map(|o| {
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
                text.lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or_default()
                    .trim()
                    .to_owned()
            })
            .unwrap_or_default()
    };
    json!({
        "iperf3": version("iperf3", "--version"),
        "sockperf": version("sockperf", "--version"),
        "wrk": version("wrk", "-v"),
        "h2load": version("h2load", "--version"),
        "nginx": version("nginx", "-v"),
    })
}
