//! The local demo (`cargo xtask demo`): two nodes, a `sleep` client and an `echo` service
//! with a pod on each node, one ztunnel per node. It shows a connection captured by eBPF,
//! carried over HBONE with mutual TLS, checked and answered; then removes everything.
//! With `--xds` (`cargo xtask demo -- --xds`), the ztunnels are fed by an in-process xDS
//! server (Istio's workload API over delta ADS, as istiod serves it) instead of the file.

use std::net::SocketAddr;
use std::process::{Command, ExitCode};
use std::time::Duration;

use mesh_tests::Proc;
use mesh_tests::mesh::{Mesh, PodSpec, ServiceSpec};
use mesh_tests::traffic::{AppServer, curl};

fn main() -> ExitCode {
    match run() {
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
