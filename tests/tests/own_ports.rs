//! ztunnel's own ports are never delivered to. A connection a policy allows to a pod's 15006
//! (or, through a tunnel, its 15008) would be handed to ztunnel's own listener, which would
//! accept and deliver it again: a loop. Every path refuses them, promptly, with a reason
//! naming the port and a count in `ztunnel_rejected_inputs_total{reason="own_port"}`, and
//! ztunnel is idle again afterwards.

use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use mesh_tests::mesh::{Mesh, PodSpec, connect_status_with_headers};
use mesh_tests::netns::in_netns;
use mesh_tests::operator::{sample, scrape};
use mesh_tests::traffic::{AppServer, echo_roundtrip};

/// Istio's reserved ports, which ztunnel serves: admin, outbound, inbound, HBONE, metrics,
/// readiness.
const OWN_PORTS: [u16; 6] = [15000, 15001, 15006, 15008, 15020, 15021];
/// How soon a refusal must arrive. A delivery loop never answers; a refusal takes
/// milliseconds.
const PROMPT: Duration = Duration::from_secs(2);

/// What a client that connects and waits for the server to speak first sees, and how long
/// it took to see it.
fn probe(netns: &str, dst: SocketAddr) -> (String, Duration) {
    let start = Instant::now();
    let got = in_netns(netns, move || -> io::Result<usize> {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.read(&mut [0u8; 64])
    })
    .and_then(|r| r);
    let seen = match got {
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => "reset".to_owned(),
        Err(e) => format!("{:?}", e.kind()),
        Ok(0) => "end of stream".to_owned(),
        Ok(n) => format!("{n} bytes"),
    };
    (seen, start.elapsed())
}

fn own_port_rejections(mesh: &Mesh, node: &str) -> u64 {
    sample(
        &scrape(mesh, node),
        "ztunnel_rejected_inputs_total",
        &[("reason", "own_port")],
    )
}

/// CPU time (user + system) `pid` has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): state is field 3, utime 14,
    // stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnels_own_ports_are_refused_on_every_path() {
    let mut plain = PodSpec::new("plain", "node1", "plain");
    plain.namespace = "plain".into();
    let pods = vec![
        PodSpec::new("sleep", "node1", "sleep"),
        PodSpec::new("local", "node1", "local"),
        plain,
        PodSpec::new("echo", "node2", "echo"),
    ];
    let mut mesh = Mesh::new(&["node1", "node2"], pods, Vec::new()).unwrap();
    // A pod outside the mesh, for plaintext.
    mesh.namespaces.push(("plain".into(), None));
    mesh.topo.add_outside_host("attacker").unwrap();
    let app = |mesh: &Mesh, pod: &str| SocketAddr::new(mesh.ip(pod).into(), 8080);
    let _echo = AppServer::start(&mesh.netns("echo"), "echo", app(&mesh, "echo")).unwrap();
    let _local = AppServer::start(&mesh.netns("local"), "local", app(&mesh, "local")).unwrap();
    mesh.start().unwrap();
    // No policy: everything else is allowed, on every path tried below.
    for (from, to) in [("plain", "echo"), ("sleep", "echo"), ("sleep", "local")] {
        let got = echo_roundtrip(&mesh.netns(from), app(&mesh, to), b"ok".to_vec()).unwrap();
        assert_eq!(got, b"okbye", "{from} to {to}:8080");
    }

    let mut seen = Vec::new();
    let mut record = |path: &str, port: u16, outcome: String, took: Duration| {
        let prompt = took < PROMPT;
        seen.push(format!("{path} {port}: {outcome} in {took:?}"));
        (outcome, prompt)
    };
    let mut refused = true;
    // Plaintext from a pod outside the mesh (15008 is the HBONE listener: TLS only).
    let echo = mesh.ip("echo");
    for port in OWN_PORTS.into_iter().filter(|p| *p != 15008) {
        let (outcome, took) = probe(&mesh.netns("plain"), SocketAddr::new(echo.into(), port));
        let (outcome, prompt) = record("plaintext to echo", port, outcome, took);
        refused &= outcome == "reset" && prompt;
    }
    // Through HBONE, with a valid certificate, asking echo's ztunnel for each port.
    let cert = mesh
        .ca()
        .sign(
            &"spiffe://cluster.local/ns/default/sa/other"
                .parse()
                .unwrap(),
            Duration::from_secs(600),
        )
        .unwrap();
    for port in OWN_PORTS {
        let start = Instant::now();
        let status = connect_status_with_headers(
            &mesh,
            "attacker",
            &cert,
            "spiffe://cluster.local/ns/default/sa/echo".parse().unwrap(),
            SocketAddr::new(echo.into(), 15008),
            SocketAddr::new(echo.into(), port),
            &[],
        );
        let status = tokio::time::timeout(PROMPT * 2, status).await;
        let outcome = match status {
            Ok(Ok(s)) => s.as_u16().to_string(),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer".to_owned(),
        };
        let (outcome, prompt) = record("HBONE CONNECT to echo", port, outcome, start.elapsed());
        refused &= outcome == "400" && prompt;
    }
    // From a mesh pod, across nodes and on the same node.
    for target in ["echo", "local"] {
        let ip = mesh.ip(target);
        for port in OWN_PORTS {
            let (outcome, took) = probe(&mesh.netns("sleep"), SocketAddr::new(ip.into(), port));
            let (outcome, prompt) = record(&format!("sleep to {target}"), port, outcome, took);
            refused &= outcome == "reset" && prompt;
        }
    }
    let table = seen.join("\n");
    eprintln!("{table}");
    // Idle afterwards: over a window of 2 s, each ztunnel uses under 5 % of one core (a
    // delivery loop spins a whole one).
    let window = Duration::from_secs(2);
    let hz = mesh_tests::sys::clock_ticks_per_second().expect("the clock-tick rate") as f64;
    let pids: Vec<(String, u32)> = ["node1", "node2"]
        .iter()
        .map(|n| (n.to_string(), mesh.ztunnel(n).pid()))
        .collect();
    let before: Vec<u64> = pids.iter().map(|(_, p)| cpu_ticks(*p)).collect();
    // The measurement window itself, not a wait for anything.
    std::thread::sleep(window);
    let used: Vec<(String, f64)> = pids
        .iter()
        .zip(before)
        .map(|((node, pid), before)| (node.clone(), (cpu_ticks(*pid) - before) as f64 / hz))
        .collect();
    eprintln!("CPU used in {window:?} after the refusals: {used:?}");
    assert!(refused, "not every own port was refused promptly:\n{table}");

    // Counted where refused: node2 took the plaintext and HBONE ones (5 + 6), node1 those of
    // its own pod (6 across nodes, 6 on the same node).
    assert_eq!(
        (
            own_port_rejections(&mesh, "node1"),
            own_port_rejections(&mesh, "node2")
        ),
        (12, 11)
    );
    for node in ["node1", "node2"] {
        let log = mesh.ztunnel(node).log();
        for port in OWN_PORTS {
            assert!(
                log.contains(&format!("own port {port}")),
                "{node}'s log does not name port {port}"
            );
        }
    }

    for (node, used) in &used {
        assert!(
            *used < 0.05 * window.as_secs_f64(),
            "{node}'s ztunnel used {used:.2} s of CPU in {window:?} after the refusals"
        );
    }
    // And the allowed paths still work.
    let got = echo_roundtrip(&mesh.netns("sleep"), app(&mesh, "echo"), b"ok".to_vec()).unwrap();
    assert_eq!(got, b"okbye");
}
