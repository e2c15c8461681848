//! ztunnels fed by xDS (an in-process istiod stand-in on the fabric) while real connections
//! flow between pods: workloads added, a service's endpoints moved, a DENY policy added then
//! removed, an invalid resource NACKed with the rest applied, and the control plane going
//! away and coming back without traffic noticing. Every change is awaited through the
//! server's ACKs and then through traffic, each with a deadline.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use prost::Message as _;

use mesh_tests::mesh::{Mesh, PodSpec, ServiceSpec};
use mesh_tests::traffic::{AppServer, connect, curl, echo_roundtrip, is_reset};
use mesh_tests::wait_until;
use mesh_tests::xds::{ADDRESS_TYPE_URL, deny_from_service_account};
use ztunnel::proto::istio::workload as pbw;

const APP_PORT: u16 = 8080;
/// Where ztunnel delivers from with `--inbound-source loopback`, which these tests use: it
/// tells a delivery from a direct connection.
const DELIVERY_SOURCE: &str = "127.0.0.6";
const VIP: &str = "198.18.100.1";
/// How long a pushed change may take to show in traffic.
const EFFECT: Duration = Duration::from_secs(20);

/// node1: sleep, echo1 (behind service `echo`); node2: echo2, and echo3, whose namespace
/// exists but which the control plane does not know yet. Servers on every echo pod.
struct Fixture {
    mesh: Mesh,
    echo1: AppServer,
    echo2: AppServer,
    echo3: AppServer,
}

fn fixture() -> Fixture {
    let pods = vec![
        PodSpec::new("sleep", "node1", "sleep"),
        PodSpec::new("echo1", "node1", "echo").service("echo", 80, APP_PORT),
        PodSpec::new("echo2", "node2", "echo"),
    ];
    let services = vec![ServiceSpec {
        name: "echo".into(),
        namespace: "default".into(),
        vip: VIP.parse().unwrap(),
        vip6: None,
        ports: vec![(80, APP_PORT)],
    }];
    let mut mesh = Mesh::new(&["node1", "node2"], pods, services).unwrap();
    mesh.ztunnel_args = vec!["--inbound-source".into(), "loopback".into()];
    mesh.topo.add_pod("node2", "echo3").unwrap();
    let server = |pod: &str| AppServer::start(&mesh.netns(pod), pod, addr(&mesh, pod)).unwrap();
    let (echo1, echo2, echo3) = (server("echo1"), server("echo2"), server("echo3"));
    mesh.start_xds().unwrap();
    Fixture {
        mesh,
        echo1,
        echo2,
        echo3,
    }
}

fn addr(mesh: &Mesh, pod: &str) -> SocketAddr {
    SocketAddr::new(mesh.ip(pod).into(), APP_PORT)
}

/// A short echo exchange from `client` to `dst` went through intact.
fn works(mesh: &Mesh, client: &str, dst: SocketAddr) -> bool {
    echo_roundtrip(&mesh.netns(client), dst, b"probe".to_vec()).is_ok_and(|got| got == b"probebye")
}

fn peers_from(server: &AppServer, ip: &str) -> usize {
    server
        .peers()
        .iter()
        .filter(|p| p.ip().to_string() == ip)
        .count()
}

/// Waits until a new connection from sleep to `dst` works and reaches `server` from `peer_ip`.
fn wait_delivered(f: &Fixture, server: &AppServer, dst: SocketAddr, peer_ip: &str) {
    wait_until(EFFECT, || {
        let before = peers_from(server, peer_ip);
        works(&f.mesh, "sleep", dst) && peers_from(server, peer_ip) > before
    })
    .unwrap_or_else(|e| panic!("sleep -> {dst} not delivered from {peer_ip}: {e}"));
}

/// Which echo pod answered an HTTP request to the service VIP.
fn vip_answered_by(f: &Fixture) -> String {
    let (code, body) = curl(&f.mesh.netns("sleep"), &format!("http://{VIP}/")).unwrap();
    assert_eq!(code, 0, "curl to the VIP failed: {body}");
    body.split(';')
        .next()
        .unwrap_or_default()
        .trim_start_matches("hello from ")
        .to_owned()
}

fn pod<'a>(f: &'a mut Fixture, name: &str) -> &'a mut PodSpec {
    f.mesh.pods.iter_mut().find(|p| p.name == name).unwrap()
}

#[test]
fn workloads_services_and_policies_follow_xds() {
    let mut f = fixture();
    let echo2 = addr(&f.mesh, "echo2");
    let echo3 = addr(&f.mesh, "echo3");
    let sleep_ip = f.mesh.ip("sleep").to_string();

    // Known workloads are reached over HBONE and delivered by ztunnel in the pod.
    wait_delivered(&f, &f.echo2, echo2, DELIVERY_SOURCE);
    // A workload the control plane does not know is outside the mesh: passed through as is.
    wait_delivered(&f, &f.echo3, echo3, &sleep_ip);
    assert_eq!(peers_from(&f.echo3, DELIVERY_SOURCE), 0);

    // Adding it: node2's ztunnel enrols it and it is reached over HBONE.
    f.mesh.pods.push(PodSpec::new("echo3", "node2", "echo"));
    f.mesh.sync_xds().unwrap();
    f.mesh.wait_xds_applied().unwrap();
    wait_delivered(&f, &f.echo3, echo3, DELIVERY_SOURCE);

    // The service's only endpoint is echo1; then it moves to echo2 (on the other node).
    assert_eq!(vip_answered_by(&f), "echo1");
    pod(&mut f, "echo1").services.clear();
    pod(&mut f, "echo2")
        .services
        .push(("echo".into(), 80, APP_PORT));
    f.mesh.sync_xds().unwrap();
    f.mesh.wait_xds_applied().unwrap();
    wait_until(EFFECT, || vip_answered_by(&f) == "echo2").expect("VIP never answered by echo2");
    for _ in 0..5 {
        assert_eq!(
            vip_answered_by(&f),
            "echo2",
            "echo1 is no longer an endpoint"
        );
    }
    assert!(peers_from(&f.echo1, DELIVERY_SOURCE) >= 1);

    // HBONE headers as Istio sends them, seen by the destination's ztunnel (node2).
    let log = f.mesh.ztunnel("node2").log();
    let line = log
        .lines()
        .filter(|l| l.contains("HBONE CONNECT headers"))
        .find(|l| l.contains("host=echo.default.svc.cluster.local"))
        .unwrap_or_else(|| panic!("no CONNECT to the service logged on node2:\n{log}"));
    assert!(line.contains("k8s.pod.name=sleep"), "baggage: {line}");
    assert!(
        line.contains(&format!("for=\\\"{sleep_ip}:")),
        "forwarded: {line}"
    );
    let traceparent = line
        .split("traceparent=Some(\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no traceparent: {line}"));
    assert!(ztunnel::hbone::is_traceparent(traceparent), "{traceparent}");

    // A DENY policy for connections from sleep, then its removal.
    let deny = deny_from_service_account("deny-sleep", "default", "sleep");
    f.mesh.xds().set_policy(&deny);
    f.mesh.wait_xds_applied().unwrap();
    wait_until(EFFECT, || !works(&f.mesh, "sleep", echo2)).expect("DENY never took effect");
    let got = echo_roundtrip(&f.mesh.netns("sleep"), echo3, b"probe".to_vec());
    assert!(
        is_reset(&got),
        "DENY covers the namespace (with a reset): {got:?}"
    );
    f.mesh.xds().remove_policy("default/deny-sleep");
    f.mesh.wait_xds_applied().unwrap();
    wait_until(EFFECT, || works(&f.mesh, "sleep", echo2)).expect("DENY never lifted");
    assert!(works(&f.mesh, "sleep", echo3));
}

#[test]
fn an_invalid_resource_is_nacked_and_the_rest_applied() {
    let f = fixture();
    let echo3 = addr(&f.mesh, "echo3");
    let good = f
        .mesh
        .workload_resource(&PodSpec::new("echo3", "node2", "echo"));
    let mut bad = good.clone();
    bad.uid = "cluster1//v1/Pod/default/bad".into();
    bad.name = "bad".into();
    bad.addresses = vec![vec![1, 2, 3, 4, 5]];
    let address = |w: pbw::Workload| {
        pbw::Address {
            r#type: Some(pbw::address::Type::Workload(w)),
        }
        .encode_to_vec()
    };
    // One response: the bad workload, bytes that are no Address at all, and echo3.
    f.mesh.xds().push(
        ADDRESS_TYPE_URL,
        vec![
            (bad.uid.clone(), address(bad)),
            ("garbage".into(), vec![0xff, 0xff, 0xff]),
            (good.uid.clone(), address(good)),
        ],
        Vec::new(),
    );
    f.mesh.wait_xds_applied().unwrap();
    for node in ["node1", "node2"] {
        let nacks = f.mesh.xds().nacks();
        let nack = nacks
            .iter()
            .find(|r| r.node == node)
            .unwrap_or_else(|| panic!("{node} did not NACK; replies {:?}", f.mesh.xds().replies()));
        let message = nack.error.as_deref().unwrap_or_default();
        assert!(
            message.contains("cluster1//v1/Pod/default/bad")
                && message.contains("5 bytes is not an IP address"),
            "{node}: {message}"
        );
        assert!(message.contains("garbage"), "{node}: {message}");
        assert!(!message.contains("echo3"), "{node}: {message}");
    }
    // The valid workload in the same response was applied: echo3 is in the mesh.
    wait_delivered(&f, &f.echo3, echo3, DELIVERY_SOURCE);
    wait_delivered(&f, &f.echo2, addr(&f.mesh, "echo2"), DELIVERY_SOURCE);
}

#[test]
fn traffic_is_unaffected_while_the_control_plane_is_away() {
    let mut f = fixture();
    let echo2 = addr(&f.mesh, "echo2");
    wait_delivered(&f, &f.echo2, echo2, DELIVERY_SOURCE);
    let mut long_lived = connect(&f.mesh.netns("sleep"), echo2).unwrap();
    let exchange = |conn: &mut std::net::TcpStream, msg: &[u8]| {
        conn.write_all(msg).unwrap();
        let mut got = vec![0u8; msg.len()];
        conn.read_exact(&mut got).unwrap();
        assert_eq!(got, msg);
    };
    exchange(&mut long_lived, b"before");
    let opened = f.mesh.xds().streams_opened();

    f.mesh.xds_mut().stop().unwrap();
    for node in ["node1", "node2"] {
        f.mesh
            .ztunnel(node)
            .wait_for_log("keeping the last good state", EFFECT)
            .unwrap();
    }
    // The outage shows in each node's metrics.
    for node in ["node1", "node2"] {
        let metrics = mesh_tests::operator::scrape(&f.mesh, node);
        assert_eq!(
            mesh_tests::operator::sample(&metrics, "ztunnel_control_plane_connected", &[]),
            0,
            "{node}"
        );
    }
    // Nothing changes for traffic: new connections, the service, the open connection.
    for _ in 0..5 {
        assert!(works(&f.mesh, "sleep", echo2));
    }
    assert_eq!(vip_answered_by(&f), "echo1");
    exchange(&mut long_lived, b"during");

    // The control plane returns: both nodes resubscribe, and a change takes effect again.
    f.mesh.xds_mut().start().unwrap();
    wait_until(EFFECT, || f.mesh.xds().streams_opened() >= opened + 2)
        .expect("ztunnels did not reconnect");
    f.mesh.wait_xds_applied().unwrap();
    for node in ["node1", "node2"] {
        let metrics = mesh_tests::operator::scrape(&f.mesh, node);
        assert_eq!(
            mesh_tests::operator::sample(&metrics, "ztunnel_control_plane_connected", &[]),
            1,
            "{node}"
        );
    }
    exchange(&mut long_lived, b"after");
    assert!(works(&f.mesh, "sleep", echo2));
    f.mesh
        .xds()
        .set_policy(&deny_from_service_account("deny-sleep", "default", "sleep"));
    f.mesh.wait_xds_applied().unwrap();
    wait_until(EFFECT, || !works(&f.mesh, "sleep", echo2))
        .expect("a change after the outage never took effect");
    assert_eq!(f.mesh.xds().nacks(), Vec::new());
    let _ = &f.echo1;
}
