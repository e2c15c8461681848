//! The L7 benchmark (`cargo xtask bench --l7`, issue 21): what a waypoint costs per request,
//! against no mesh, the L4 mesh and nginx, side by side in one run.
//!
//! Topology, the L4 benchmark's two nodes grown by the L7 hops: node1 holds `client`
//! (enrolled), `client-plain` (namespace `plain`), the waypoint's pod `wp` (not captured: it
//! terminates HBONE) and `nginx-proxy` (plain); node2 holds `server` and `server-v2` (enrolled,
//! versions v1 and v2 of services `bench` and `bench-h2`), `server-plain` and
//! `server-plain-v2` (plain). The paths:
//! - direct: `client-plain` -> `server-plain`;
//! - mesh: `client` -> `server` by pod IP: both ztunnels, no waypoint;
//! - waypoint: `client` -> the `bench` VIP (labelled `istio.io/use-waypoint`): node1's
//!   ztunnel -> the waypoint -> node2's ztunnel -> v1 or v2, by a VirtualService;
//! - nginx: `client-plain` -> `nginx-proxy` -> `server-plain` or `server-plain-v2`, by the
//!   same rules (`l7_config`).
//!
//! Workloads (`l7_measure`) run on every path, interleaved, `--runs` times.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use mesh_tests::mesh::{Mesh, PodSpec, ServiceSpec, http_get};
use mesh_tests::process::{Proc, target_dir};
use mesh_tests::wait_until;

use crate::l7_measure::{self, Path, ProxyProc};
use crate::report::Figures;
use crate::servers::{self, H2C_PORT, HTTP_PORT, HoldServer, PodServers};
use crate::{Args, Prepared, l7_config, l7_report, procfs, say, svg};

const BENCH_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 20);
const BENCH_H2_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 21);
const WAYPOINT_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 9);

type Error = Box<dyn std::error::Error>;

fn labelled(mut pod: PodSpec, labels: &[(&str, &str)]) -> PodSpec {
    pod.labels = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    pod
}

fn plain(mut pod: PodSpec) -> PodSpec {
    pod.namespace = "plain".to_owned();
    pod
}

fn service(name: &str, vip: Ipv4Addr, port: u16) -> ServiceSpec {
    ServiceSpec {
        name: name.to_owned(),
        namespace: "default".to_owned(),
        vip,
        vip6: None,
        ports: vec![(port, port)],
    }
}

/// A version of the benchmark's server, endpoint of both services.
fn version(name: &str, v: &str) -> PodSpec {
    labelled(
        PodSpec::new(name, "node2", "server")
            .service("bench", HTTP_PORT, HTTP_PORT)
            .service("bench-h2", H2C_PORT, H2C_PORT),
        &[("app", "bench"), ("version", v)],
    )
}

fn topology(args: &Args) -> Result<Mesh, Error> {
    let pods = vec![
        PodSpec::new("client", "node1", "client"),
        plain(PodSpec::new("client-plain", "node1", "client")),
        labelled(
            PodSpec::new("wp", "node1", "waypoint").service("waypoint", 15008, 15008),
            &[("istio.io/dataplane-mode", "none")],
        ),
        plain(PodSpec::new("nginx-proxy", "node1", "nginx")),
        version("server", "v1"),
        version("server-v2", "v2"),
        plain(PodSpec::new("server-plain", "node2", "server")),
        plain(PodSpec::new("server-plain-v2", "node2", "server")),
    ];
    let services = vec![
        service("bench", BENCH_VIP, HTTP_PORT),
        service("bench-h2", BENCH_H2_VIP, H2C_PORT),
        service("waypoint", WAYPOINT_VIP, 15008),
    ];
    let mut mesh = Mesh::new(&["node1", "node2"], pods, services)?;
    mesh.namespaces.push(("plain".to_owned(), None));
    for svc in ["bench", "bench-h2"] {
        mesh.service_labels.push((
            svc.to_owned(),
            "istio.io/use-waypoint".to_owned(),
            "waypoint".to_owned(),
        ));
    }
    // One log line per connection would be measured along with the proxy.
    mesh.log_filter = "info".to_owned();
    mesh.ztunnel_args.clone_from(&args.ztunnel_arg);
    if !args
        .ztunnel_arg
        .iter()
        .any(|a| a.starts_with("--inbound-source"))
    {
        mesh.ztunnel_args
            .extend(["--inbound-source".to_owned(), "loopback".to_owned()]);
    }
    Ok(mesh)
}

/// Starts the waypoint (release build, next to this binary) in pod `wp`; waits until ready.
fn start_waypoint(mesh: &Mesh, args: &Args) -> Result<Proc, Error> {
    let binary = target_dir().join("waypoint");
    if !binary.exists() {
        return Err(format!(
            "{} not built: run `cargo xtask bench --l7` (it builds the release binaries)",
            binary.display()
        )
        .into());
    }
    let routes = mesh.dir.path().join("routes.yaml");
    std::fs::write(&routes, l7_config::waypoint_routes(&["bench", "bench-h2"]))?;
    let mut cmd = Command::new(binary);
    cmd.arg("--mesh-config")
        .arg(mesh.config_path())
        .arg("--routes")
        .arg(&routes)
        .arg("--ca-dir")
        .arg(mesh.dir.path().join("ca"))
        .arg("--service-account")
        .arg("waypoint")
        .args(&args.waypoint_arg)
        .env("RUST_LOG", "info");
    let netns = mesh.netns("wp");
    let mut wp = Proc::spawn("waypoint", &netns, cmd, mesh.dir.path())?;
    let ready = wait_until(Duration::from_secs(30), || {
        wp.exited().is_some()
            || http_get(
                &netns,
                SocketAddr::from(([127, 0, 0, 1], 15021)),
                "/healthz/ready",
            )
            .is_ok_and(|(status, _)| status == 200)
    });
    if ready.is_err() || wp.exited().is_some() {
        return Err(format!("the waypoint did not become ready; log:\n{}", wp.log()).into());
    }
    Ok(wp)
}

/// Starts nginx as the reverse proxy in pod `nginx-proxy`; waits until it listens.
fn start_nginx_proxy(mesh: &Mesh, held: usize) -> Result<Proc, Error> {
    let dir = mesh.dir.path().join("nginx-proxy");
    std::fs::create_dir_all(&dir)?;
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        l7_config::nginx_proxy(
            &dir,
            mesh.ip("nginx-proxy"),
            mesh.ip("server-plain"),
            mesh.ip("server-plain-v2"),
            held + 2048,
        ),
    )?;
    let netns = mesh.netns("nginx-proxy");
    let mut cmd = Command::new("nginx");
    cmd.arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(&conf)
        .arg("-e")
        .arg(dir.join("nginx-error.log"));
    let proc = Proc::spawn("nginx-proxy", &netns, cmd, &dir)?;
    for port in [HTTP_PORT, H2C_PORT] {
        wait_until(Duration::from_secs(10), || {
            servers::listening(&netns, port).unwrap_or(false)
        })
        .map_err(|_| {
            format!(
                "the nginx proxy is not listening on {port}; log:\n{}",
                proc.log()
            )
        })?;
    }
    Ok(proc)
}

pub(crate) fn bench(args: &Args, prep: &Prepared) -> Result<(), Error> {
    let mut mesh = topology(args)?;
    say("topology: two nodes, eight pods (namespace `plain` is not enrolled)");
    for pod in mesh.topo.pods() {
        println!("   {:<15} on {} ip {}", pod.name, pod.node, pod.ip);
        crate::tune_pod(&pod.netns)?;
    }
    say("servers: nginx (1 KiB on 8080 and h2c 8081, /upload) and a hold server per server pod");
    let mut pod_servers: Vec<PodServers> = Vec::new();
    for name in ["server", "server-v2", "server-plain", "server-plain-v2"] {
        pod_servers.push(PodServers::start(
            name,
            &mesh.netns(name),
            mesh.ip(name),
            mesh.dir.path(),
        )?);
    }
    let hold_mesh = HoldServer::start(
        &mesh.netns("server"),
        SocketAddr::new(mesh.ip("server").into(), servers::HOLD_PORT),
    )?;
    let hold_direct = HoldServer::start(
        &mesh.netns("server-plain"),
        SocketAddr::new(mesh.ip("server-plain").into(), servers::HOLD_PORT),
    )?;

    say("starting one ztunnel per node, the waypoint and the nginx proxy (release builds)");
    mesh.start()?;
    let waypoint = start_waypoint(&mesh, args)?;
    let nginx = start_nginx_proxy(&mesh, args.held)?;
    let ztunnel = |node: &str| -> u32 {
        mesh.ztunnels
            .iter()
            .find(|(n, _)| n == node)
            .map_or(0, |(_, p)| p.pid())
    };
    let zt = [
        ProxyProc::new("ztunnel node1", ztunnel("node1"), false),
        ProxyProc::new("ztunnel node2", ztunnel("node2"), false),
    ];
    let wp = ProxyProc::new("waypoint", waypoint.pid(), false);
    let ngx = ProxyProc::new("nginx", nginx.pid(), true);

    let mut figures = Figures::default();
    // Idle: ready, enrolled, no traffic yet.
    std::thread::sleep(Duration::from_secs(1));
    for p in [&wp, &zt[0], &zt[1], &ngx] {
        let m = p.memory()?;
        println!(
            "   {:<13} pid {}, idle RSS {:.1} MiB ({:.1} private, {:.1} file pages)",
            p.name, p.pid, m.rss_mib, m.anon_mib, m.file_mib
        );
        let memory = figures.memory.entry(p.name.clone()).or_default();
        memory.insert("idle_rss_mib".into(), m.rss_mib);
        memory.insert("idle_anon_mib".into(), m.anon_mib);
    }

    let paths = [
        Path {
            name: "direct",
            client_netns: mesh.netns("client-plain"),
            host: mesh.ip("server-plain"),
            h2_host: mesh.ip("server-plain"),
            procs: Vec::new(),
        },
        Path {
            name: "mesh",
            client_netns: mesh.netns("client"),
            host: mesh.ip("server"),
            h2_host: mesh.ip("server"),
            procs: zt.to_vec(),
        },
        Path {
            name: "waypoint",
            client_netns: mesh.netns("client"),
            host: BENCH_VIP,
            h2_host: BENCH_H2_VIP,
            procs: vec![wp.clone(), zt[0].clone(), zt[1].clone()],
        },
        Path {
            name: "nginx",
            client_netns: mesh.netns("client-plain"),
            host: mesh.ip("nginx-proxy"),
            h2_host: mesh.ip("nginx-proxy"),
            procs: vec![ngx.clone()],
        },
    ];

    say("checking each path");
    let direct_peer = crate::peer_seen(
        "direct",
        &paths[0].client_netns,
        paths[0].host,
        &hold_direct,
    )?;
    let mesh_peer = crate::peer_seen("mesh", &paths[1].client_netns, paths[1].host, &hold_mesh)?;
    let ztunnel_delivery = IpAddr::from([127, 0, 0, 6]);
    if direct_peer == ztunnel_delivery || mesh_peer != ztunnel_delivery {
        return Err(format!(
            "paths are not what they claim: direct server saw {direct_peer}, mesh server saw {mesh_peer}"
        )
        .into());
    }
    println!("   direct    server sees {direct_peer}; mesh: {mesh_peer} (delivered by ztunnel)");
    hold_mesh.release();
    hold_direct.release();
    let body = mesh.dir.path().join("upload.bin");
    std::fs::write(&body, vec![b'u'; 1 << 20])?;
    for path in &paths {
        l7_measure::check(path, &body)?;
        println!("   {:<9} {}", path.name, l7_measure::describe(path.name));
    }

    let selected: Vec<&Path> = paths
        .iter()
        .filter(|p| args.paths.is_empty() || args.paths.iter().any(|n| n == p.name))
        .collect();
    let time = Duration::from_secs(args.seconds);
    for run in 1..=args.runs {
        say(&format!("run {run} of {}", args.runs));
        for path in &selected {
            l7_measure::measure(path, time, args, &body, &mut figures)?;
        }
    }
    for p in [&wp, &zt[0], &zt[1], &ngx] {
        let m = p.memory()?;
        figures
            .memory
            .entry(p.name.clone())
            .or_default()
            .insert("peak_rss_mib".into(), m.peak_mib);
    }
    if args.held > 0 {
        // The L4 benchmark measures the mesh alone; here the connections go through an L7 hop.
        for path in selected
            .iter()
            .filter(|p| matches!(p.name, "waypoint" | "nginx"))
        {
            l7_measure::held_connections(path, args.held, &mut figures)?;
        }
    }
    drop(nginx);
    drop(waypoint);

    report(args, prep, &figures)
}

fn report(args: &Args, prep: &Prepared, figures: &Figures) -> Result<(), Error> {
    let criterion = target_dir()
        .parent()
        .map(|t| t.join("criterion"))
        .and_then(|dir| l7_report::criterion_median_ns(&dir, l7_report::CRITERION_ROUTE_BENCH));
    let verdicts = l7_report::verdicts(figures, criterion);
    say("results (median (worst run) of each figure)");
    print!("{}", l7_report::table(figures, false));
    say("targets (issue 21; ratios and differences of medians from this run)");
    print!("{}", crate::report::verdict_lines(&verdicts));
    if criterion.is_none() {
        println!(
            "   note: route match: run `cargo bench -p waypoint --bench route` first to judge it"
        );
    }
    for w in &figures.warnings {
        println!("   warning: {w}");
    }
    let settings = json!({
        "runs": args.runs,
        "seconds_per_measurement": args.seconds,
        "wrk_connections": args.connections,
        "wrk_threads": 2,
        "fixed_rate_client": "the benchmark's own wrk2-style client (rate.rs): requests due evenly at the rate, round-robin over keep-alive connections (10 for 1,000/s, 50 for 10,000/s), latency from each request's due time (no coordinated omission)",
        "h2c": "h2load, 4 clients x 32 streams",
        "upload": "h2load --h1 -d (1 MiB body), 4 clients",
        "held_connections": args.held,
        "rlimit_nofile": prep.nofile,
        "waypoint_args": args.waypoint_arg,
        "ztunnel_args": args.ztunnel_arg,
        "grpc_unary": "not measured yet",
        "criterion_route_match_ns": criterion,
        "tools": crate::tool_versions(),
    });
    let json = l7_report::json(figures, &prep.machine, settings, &verdicts);
    let out = &prep.out_dir;
    std::fs::write(
        out.join("l7-results.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    std::fs::write(out.join("l7.svg"), chart(figures, &prep.machine))?;
    std::fs::write(out.join("l7-results.md"), l7_report::table(figures, true))?;
    say(&format!(
        "wrote {0}/l7-results.json, {0}/l7-results.md (the README tables), {0}/l7.svg",
        out.display()
    ));
    Ok(())
}

fn chart(f: &Figures, machine: &procfs::Machine) -> String {
    let panels = [
        svg::Panel {
            title: "Thousands of requests/s (higher is better)",
            groups: &[
                ("keep-alive", "ka_rps", 1e-3),
                ("h2c", "h2c_rps", 1e-3),
                ("new conns", "conn_rate", 1e-3),
            ],
        },
        svg::Panel {
            title: "Latency at 1,000 req/s, µs (lower is better)",
            groups: &[
                ("p50", "r1k_p50", 1.0),
                ("p99", "r1k_p99", 1.0),
                ("p99.9", "r1k_p999", 1.0),
            ],
        },
        svg::Panel {
            title: "Proxies' CPU per request, µs (lower is better)",
            groups: &[
                ("keep-alive", "cpu_us.ka.total", 1.0),
                ("h2c", "cpu_us.h2c.total", 1.0),
                ("new conn", "cpu_us.conn.total", 1.0),
            ],
        },
    ];
    svg::chart_of(
        f,
        machine,
        "L7 hop cost: direct, L4 mesh, waypoint, nginx (medians)",
        &l7_report::PATHS,
        &panels,
    )
}
