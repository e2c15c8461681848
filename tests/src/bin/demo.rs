//! The local demo (`cargo xtask demo`): two nodes, a `sleep` client and an `echo` service
//! with a pod on each node, one ztunnel per node. It shows a connection captured by eBPF,
//! carried over HBONE with mutual TLS, checked and answered; then removes everything.
//! With `--xds` (`cargo xtask demo -- --xds`), the ztunnels are fed by an in-process xDS
//! server (Istio's workload API over delta ADS, as istiod serves it) instead of the file.
//!
//! Then (file mode) the tutorials' journey through a waypoint: a service labelled
//! `istio.io/use-waypoint`, a dark launch by header, a 90/10 split between subsets, and
//! retries hiding a backend that fails half of its requests.

use std::net::SocketAddr;
use std::process::{Command, ExitCode};
use std::time::Duration;

use mesh_tests::Proc;
use mesh_tests::mesh::{Mesh, PodSpec, ServiceSpec};
use mesh_tests::traffic::{AppServer, curl};

fn main() -> ExitCode {
    let xds = std::env::args().skip(1).any(|a| a == "--xds");
    let result = run().and_then(|()| if xds { Ok(()) } else { waypoint_journey() });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("demo failed: {err}");
            ExitCode::FAILURE
        }
    }
}

fn say(line: &str) {
    println!("\n== {line}");
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let xds = std::env::args().skip(1).any(|a| a == "--xds");
    let pods = vec![
        PodSpec::new("sleep", "node1", "sleep"),
        PodSpec::new("echo-a", "node1", "echo").service("echo", 80, 8080),
        PodSpec::new("echo-b", "node2", "echo").service("echo", 80, 8080),
    ];
    let vip = "198.18.100.1".parse()?;
    let services = vec![ServiceSpec {
        name: "echo".into(),
        namespace: "default".into(),
        vip,
        vip6: None,
        ports: vec![(80, 8080)],
    }];
    say("building two nodes and three pods (network namespaces on this machine)");
    let mut mesh = Mesh::new(&["node1", "node2"], pods, services)?;
    for pod in mesh.topo.pods() {
        println!("   {:<8} on {:<6} ip {}", pod.name, pod.node, pod.ip);
    }
    let _a = AppServer::start(
        &mesh.netns("echo-a"),
        "echo-a",
        SocketAddr::new(mesh.ip("echo-a").into(), 8080),
    )?;
    let _b = AppServer::start(
        &mesh.netns("echo-b"),
        "echo-b",
        SocketAddr::new(mesh.ip("echo-b").into(), 8080),
    )?;

    if xds {
        say("control plane: an in-process xDS server on the fabric (istio.workload.Address)");
        for pod in &mesh.pods {
            let w = mesh.workload_resource(pod);
            println!(
                "   Workload {} node={} sa={} tunnel=HBONE services={:?}",
                w.uid,
                w.node,
                w.service_account,
                w.services.keys().collect::<Vec<_>>()
            );
        }
        println!("   Service default/echo.default.svc.cluster.local vip {vip} ports 80->8080");
        say("starting one ztunnel per node (--xds-address http://198.18.0.254:15010)");
        mesh.start_xds()?;
        println!("   both subscribed, applied the push (ACK) and ready");
    } else {
        say("local config (namespace `default` labelled istio.io/dataplane-mode=ambient)");
        println!("{}", mesh.config_yaml());
        say("starting one ztunnel per node");
        mesh.start()?;
    }
    println!("   both ready (/healthz/ready answered 200)");

    let node1 = mesh.topo.node("node1").netns.clone();
    let pcap = mesh.dir.path().join("uplink.pcap");
    let mut tcpdump_cmd = Command::new("tcpdump");
    tcpdump_cmd
        .args(["-i", "eth0", "--immediate-mode", "-U", "-n", "-w"])
        .arg(&pcap)
        .arg("tcp");
    let mut tcpdump = Proc::spawn("tcpdump", &node1, tcpdump_cmd, mesh.dir.path())?;
    tcpdump.wait_for_log("listening on", Duration::from_secs(10))?;

    let sleep = mesh.netns("sleep");
    for (what, url) in [
        (
            "pod IP on the other node",
            format!("http://{}:8080/", mesh.ip("echo-b")),
        ),
        ("service VIP", format!("http://{vip}/")),
        ("service VIP", format!("http://{vip}/")),
    ] {
        say(&format!("sleep$ curl {url}   ({what})"));
        let (code, body) = curl(&sleep, &url)?;
        if code != 0 {
            return Err(format!("curl exited with {code}").into());
        }
        print!("   {body}");
    }
    tcpdump.terminate(Duration::from_secs(10))?;

    say("what ztunnel on node1 did (captured by eBPF, tunnelled with HBONE)");
    let log1 = mesh.ztunnel("node1").log();
    for line in log1
        .lines()
        .filter(|l| l.contains("redirected") || l.contains("HBONE") || l.contains("same-node"))
        .take(6)
    {
        println!("   {line}");
    }
    say("what ztunnel on node2 saw (peer identity proven by mutual TLS)");
    let log2 = mesh.ztunnel("node2").log();
    for line in log2
        .lines()
        .filter(|l| l.contains("HBONE connection accepted"))
        .take(3)
    {
        println!("   {line}");
    }
    say("on the wire between the nodes: only TLS to port 15008");
    let out = Command::new("tcpdump")
        .arg("-r")
        .arg(&pcap)
        .args(["-nn", "-c", "6", "tcp port 15008"])
        .output()?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("   {line}");
    }
    say("done: removing pods, nodes and ztunnels");
    Ok(())
}

/// The routes of the journey: reviews with a dark launch and a 90/10 canary; ratings made to
/// fail half of its requests (the route sets the test application's failure header), with
/// and without retries.
const JOURNEY: &str = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts: [reviews]
  http:
  - match:
    - headers:
        x-dark-launch: {exact: v2}
    route:
    - destination: {host: reviews, subset: v2}
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 90
    - destination: {host: reviews, subset: v2}
      weight: 10
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings
spec:
  hosts: [ratings]
  http:
  - match: [{uri: {prefix: /with-retries}}]
    headers:
      request:
        set: {x-app-fail-percent: "50"}
    retries: {attempts: 3, retryOn: 5xx}
    route: [{destination: {host: ratings}}]
  - headers:
      request:
        set: {x-app-fail-percent: "50"}
    retries: {attempts: 0}
    route: [{destination: {host: ratings}}]
"#;

/// `curl` from `sleep` fetching `url` `n` times on one connection: the status codes, and the
/// `server` line of each body.
fn curl_many(
    mesh: &Mesh,
    url: &str,
    header: Option<&str>,
    n: usize,
) -> Result<Vec<(u16, String)>, Box<dyn std::error::Error>> {
    let mut args = vec!["-s".to_owned(), "--max-time".into(), "30".into()];
    if let Some(h) = header {
        args.extend(["-H".into(), h.to_owned()]);
    }
    for _ in 0..n {
        args.extend([
            "-w".into(),
            "\\nstatus %{http_code}\\n".into(),
            url.to_owned(),
        ]);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = mesh_tests::netns::exec(&mesh.netns("sleep"), "curl", &refs)?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut answers = Vec::new();
    let mut server = String::new();
    for line in text.lines() {
        if let Some(s) = line.strip_prefix("server ") {
            server = s.to_owned();
        } else if let Some(code) = line.strip_prefix("status ") {
            answers.push((code.parse().unwrap_or(0), std::mem::take(&mut server)));
        }
    }
    Ok(answers)
}

fn waypoint_journey() -> Result<(), Box<dyn std::error::Error>> {
    use mesh_tests::waypoint::{RATINGS_VIP, REVIEWS_VIP, apps, mesh_with, routes_path};
    say("the tutorials' journey through a waypoint");
    let mesh = mesh_with(|m| {
        for svc in ["reviews", "ratings"] {
            m.service_labels.push((
                svc.to_owned(),
                "istio.io/use-waypoint".to_owned(),
                "waypoint".to_owned(),
            ));
        }
    });
    println!("   node n1: sleep, the waypoint `wp`; node n2: reviews v1 and v2, ratings");
    println!("   services reviews and ratings are labelled istio.io/use-waypoint: waypoint");
    let _apps = apps(&mesh);
    let routes = routes_path(&mesh);
    mesh_tests::waypoint::write_atomic(&routes, JOURNEY);
    say("routes, as the tutorials write them");
    println!("{JOURNEY}");
    let wp = mesh_tests::waypoint::start_waypoint(&mesh, &routes);
    println!("   waypoint ready (HBONE on {}:15008)", mesh.ip("wp"));

    let reviews = format!("http://{REVIEWS_VIP}:9080/reviews/1");
    say(&format!(
        "dark launch: sleep$ curl -H 'x-dark-launch: v2' {reviews}   (x10)"
    ));
    let got = curl_many(&mesh, &reviews, Some("x-dark-launch: v2"), 10)?;
    let v2 = got
        .iter()
        .filter(|(c, s)| *c == 200 && s == "reviews-v2")
        .count();
    println!("   {v2} of {} answered by reviews-v2", got.len());

    say(&format!("90/10 split: sleep$ curl {reviews}   (x500)"));
    let got = curl_many(&mesh, &reviews, None, 500)?;
    let v1 = got.iter().filter(|(_, s)| s == "reviews-v1").count();
    let v2 = got.iter().filter(|(_, s)| s == "reviews-v2").count();
    println!("   reviews-v1: {v1}, reviews-v2: {v2} (expected 450 / 50)");

    for (path, what) in [
        ("/without-retries", "no retries"),
        ("/with-retries", "retries: {attempts: 3, retryOn: 5xx}"),
    ] {
        let url = format!("http://{RATINGS_VIP}:9080{path}");
        say(&format!(
            "ratings fails half of its requests, {what}: sleep$ curl {url}   (x400)"
        ));
        let got = curl_many(&mesh, &url, None, 400)?;
        let ok = got.iter().filter(|(c, _)| *c == 200).count();
        println!(
            "   {ok} of {} succeeded ({:.1}%; expected {})",
            got.len(),
            100.0 * ok as f64 / got.len().max(1) as f64,
            if path == "/with-retries" {
                "93.75%: 1 - 0.5^4"
            } else {
                "50%"
            }
        );
    }
    say("the waypoint's request metrics (istio_requests_total, reporter=waypoint)");
    let (_, metrics) =
        mesh_tests::mesh::http_get(&mesh.netns("wp"), "127.0.0.1:15020".parse()?, "/metrics")?;
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .take(6)
    {
        let short: String = line
            .split(',')
            .filter(|kv| {
                [
                    "destination_service=",
                    "destination_workload=",
                    "response_code=",
                ]
                .iter()
                .any(|k| kv.starts_with(k))
                    || kv.contains("} ")
            })
            .collect::<Vec<_>>()
            .join(",");
        println!("   istio_requests_total{{{short}");
    }
    drop(wp);
    say("done: removing the waypoint, pods, nodes and ztunnels");
    Ok(())
}
