//! The L4 data path end to end: unmodified clients in pods, captured by eBPF, carried over
//! HBONE mTLS between two nodes' ztunnels, checked against policy, delivered to servers.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use mesh_tests::mesh::{Mesh, PodSpec, ServiceSpec};
use mesh_tests::traffic::{AppServer, connect, curl, echo_roundtrip, is_reset, payload};
use mesh_tests::{Proc, wait_until};

const APP_PORT: u16 = 8080;
/// Where ztunnel delivers from with `--inbound-source loopback`, which these tests use: it
/// tells a delivery from a direct connection (tests/tests/source_address.rs covers the
/// default, the client's own address).
const DELIVERY_SOURCE: &str = "127.0.0.6";

/// node1: sleep, echo1; node2: echo2; service `echo` (VIP 198.18.100.1:80 -> 8080) on both
/// echo pods; a host outside the mesh. Servers listen on every echo pod and the outside host.
struct Fixture {
    mesh: Mesh,
    echo1: AppServer,
    echo2: AppServer,
    outside: AppServer,
}

fn fixture() -> Fixture {
    let pods = vec![
        PodSpec::new("sleep", "node1", "sleep"),
        PodSpec::new("echo1", "node1", "echo").service("echo", 80, APP_PORT),
        PodSpec::new("echo2", "node2", "echo").service("echo", 80, APP_PORT),
    ];
    let services = vec![ServiceSpec {
        name: "echo".into(),
        namespace: "default".into(),
        vip: "198.18.100.1".parse().unwrap(),
        vip6: Some("fd00:198:100::1".parse().unwrap()),
        ports: vec![(80, APP_PORT)],
    }];
    let mut mesh = Mesh::new(&["node1", "node2"], pods, services).unwrap();
    // These tests tell a delivery by ztunnel from a direct connection by its source.
    mesh.ztunnel_args = vec!["--inbound-source".into(), "loopback".into()];
    let outside_host = mesh.topo.add_outside_host("outside").unwrap();
    let echo1 = AppServer::start(&mesh.netns("echo1"), "echo1", addr(&mesh, "echo1")).unwrap();
    let echo2 = AppServer::start(&mesh.netns("echo2"), "echo2", addr(&mesh, "echo2")).unwrap();
    let outside = AppServer::start(
        &outside_host.netns,
        "outside",
        SocketAddr::new(outside_host.ip.into(), APP_PORT),
    )
    .unwrap();
    mesh.start().unwrap();
    Fixture {
        mesh,
        echo1,
        echo2,
        outside,
    }
}

fn addr(mesh: &Mesh, pod: &str) -> SocketAddr {
    SocketAddr::new(mesh.ip(pod).into(), APP_PORT)
}

fn peers_from(server: &AppServer, ip: &str) -> usize {
    server
        .peers()
        .iter()
        .filter(|p| p.ip().to_string() == ip)
        .count()
}

/// Waits until a new connection from `client` to `dst` reaches `server` from `peer_ip`
/// (the client's own address when not captured, 127.0.0.6 when delivered by ztunnel).
fn wait_for_peer(
    server: &AppServer,
    client: &str,
    dst: SocketAddr,
    peer_ip: &str,
) -> Result<(), mesh_tests::process::TimedOut> {
    wait_until(Duration::from_secs(10), || {
        let before = peers_from(server, peer_ip);
        echo_roundtrip(client, dst, b"probe".to_vec()).is_ok()
            && peers_from(server, peer_ip) > before
    })
}

#[test]
fn pod_to_pod_across_nodes_and_on_the_same_node() {
    let f = fixture();
    let sleep = f.mesh.netns("sleep");
    for (server, pod) in [(&f.echo2, "echo2"), (&f.echo1, "echo1")] {
        // 4 MiB each way, the client half-closes, the server answers after EOF.
        let data = payload(4 << 20, 7);
        let got = echo_roundtrip(&sleep, addr(&f.mesh, pod), data.clone()).unwrap();
        assert_eq!(got.len(), data.len() + 3, "to {pod}");
        assert!(got[..data.len()] == data[..], "payload to {pod} corrupted");
        assert_eq!(&got[data.len()..], b"bye");
        // Delivered by ztunnel inside the pod, not by the client directly.
        assert_eq!(
            peers_from(server, DELIVERY_SOURCE),
            1,
            "{pod} peers {:?}",
            server.peers()
        );
        assert_eq!(peers_from(server, &f.mesh.ip("sleep").to_string()), 0);
    }
    let log = f.mesh.ztunnels[0].1.log();
    assert!(
        log.contains("same-node"),
        "same-node path not taken:\n{log}"
    );
}

#[test]
fn service_vip_is_load_balanced_over_both_nodes() {
    let f = fixture();
    let sleep = f.mesh.netns("sleep");
    let mut answered = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let (code, body) = curl(&sleep, "http://198.18.100.1/").unwrap();
        assert_eq!(code, 0, "curl failed: {body}");
        assert!(body.contains(&format!("peer {DELIVERY_SOURCE}:")), "{body}");
        answered.insert(body.split(';').next().unwrap_or_default().to_owned());
    }
    assert_eq!(
        answered.into_iter().collect::<Vec<_>>(),
        vec!["hello from echo1".to_owned(), "hello from echo2".to_owned()]
    );
}

#[test]
fn destinations_outside_the_mesh_pass_through_as_plain_tcp() {
    let f = fixture();
    let sleep = f.mesh.netns("sleep");
    let outside_addr = SocketAddr::new(f.mesh.ip("outside").into(), APP_PORT);
    let got = echo_roundtrip(&sleep, outside_addr, b"hello outside".to_vec()).unwrap();
    assert_eq!(got, b"hello outsidebye");
    // Plain TCP from the pod's own address.
    assert_eq!(peers_from(&f.outside, &f.mesh.ip("sleep").to_string()), 1);
}

#[test]
fn only_tls_on_15008_crosses_between_enrolled_pods() {
    let f = fixture();
    let sleep = f.mesh.netns("sleep");
    let pcap = f.mesh.dir.path().join("fabric.pcap");
    let mut cmd = Command::new("tcpdump");
    cmd.args(["-i", "eth0", "--immediate-mode", "-U", "-n", "-w"])
        .arg(&pcap)
        .arg("tcp");
    // sleep's node uplink carries both the tunnel to echo2 and the passthrough control.
    let node1 = f.mesh.topo.node("node1").netns.clone();
    let mut tcpdump = Proc::spawn("tcpdump", &node1, cmd, f.mesh.dir.path()).unwrap();
    tcpdump
        .wait_for_log("listening on", Duration::from_secs(10))
        .unwrap();

    let marker = b"PLAINTEXT-MARKER-0123456789".repeat(64);
    let got = echo_roundtrip(&sleep, addr(&f.mesh, "echo2"), marker.clone()).unwrap();
    assert_eq!(&got[..marker.len()], &marker[..]);
    // Control: the same bytes to a host outside the mesh are visible on the wire.
    let outside_addr = SocketAddr::new(f.mesh.ip("outside").into(), APP_PORT);
    echo_roundtrip(&sleep, outside_addr, marker.clone()).unwrap();
    tcpdump.terminate(Duration::from_secs(10)).unwrap();

    let count = |filter: &str| -> usize {
        let out = Command::new("tcpdump")
            .args(["-r"])
            .arg(&pcap)
            .args(["-nn", filter])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    let echo2 = f.mesh.ip("echo2").to_string();
    let sleep_ip = f.mesh.ip("sleep").to_string();
    let between_pods = format!("host {sleep_ip} and host {echo2}");
    assert!(
        count(&format!("{between_pods} and tcp port 15008")) > 0,
        "no HBONE packets captured"
    );
    assert_eq!(
        count(&format!("{between_pods} and not tcp port 15008")),
        0,
        "non-HBONE TCP between pods"
    );
    let bytes = std::fs::read(&pcap).unwrap();
    let hits = bytes
        .windows(marker.len().min(27))
        .filter(|w| *w == &marker[..27])
        .count();
    // The marker crossed in clear only on the passthrough connection (there and back).
    assert!(
        hits > 0,
        "control traffic not seen: is the capture working?"
    );
    assert_eq!(
        count(&format!(
            "host {sleep_ip} and host {echo2} and tcp port {APP_PORT}"
        )),
        0
    );
}

#[test]
fn policy_changes_apply_live_and_bad_config_keeps_the_last_good_one() {
    let mut f = fixture();
    let sleep = f.mesh.netns("sleep");
    let echo2 = addr(&f.mesh, "echo2");
    assert_eq!(
        echo_roundtrip(&sleep, echo2, b"before".to_vec()).unwrap(),
        b"beforebye"
    );

    f.mesh.policies = "  - name: deny-sleep\n    namespace: default\n    scope: Namespace\n    action: Deny\n    rules:\n      - - - principals:\n              - Exact: cluster.local/ns/default/sa/sleep\n".into();
    f.mesh.write_config().unwrap();
    wait_until(
        Duration::from_secs(10),
        || !matches!(echo_roundtrip(&sleep, echo2, b"x".to_vec()), Ok(ref got) if got == b"xbye"),
    )
    .expect("deny policy not applied");
    f.mesh
        .ztunnel("node2")
        .wait_for_log("connection denied", Duration::from_secs(5))
        .unwrap();
    assert!(f.mesh.ztunnel("node2").log().contains("default/deny-sleep"));

    // A broken file is reported and ignored: the deny stays in force.
    let path = f.mesh.config_path();
    std::fs::write(&path, "workloads:\n  - uid: [unclosed\n").unwrap();
    f.mesh
        .ztunnel("node2")
        .wait_for_log("configuration not applied", Duration::from_secs(10))
        .unwrap();
    let got = echo_roundtrip(&sleep, echo2, b"y".to_vec());
    assert!(is_reset(&got), "denied connection not reset: {got:?}");

    f.mesh.policies.clear();
    f.mesh.write_config().unwrap();
    wait_until(
        Duration::from_secs(10),
        || matches!(echo_roundtrip(&sleep, echo2, b"z".to_vec()), Ok(ref got) if got == b"zbye"),
    )
    .expect("policy removal not applied");
}

#[test]
fn enrolment_by_label_captures_and_releases_without_breaking_connections() {
    let mut f = fixture();
    let sleep = f.mesh.netns("sleep");
    let echo2 = addr(&f.mesh, "echo2");
    let sleep_ip = f.mesh.ip("sleep").to_string();

    // Un-enrol the namespace: plain networking, the server sees the client's own address.
    f.mesh.namespaces = vec![("default".into(), Some("none".into()))];
    f.mesh.write_config().unwrap();
    wait_for_peer(&f.echo2, &sleep, echo2, &sleep_ip).expect("pod not released");

    // A plain connection established now must survive enrolment.
    let mut plain = connect(&sleep, echo2).unwrap();
    plain.write_all(b"one").unwrap();
    let mut buf = [0u8; 3];
    plain.read_exact(&mut buf).unwrap();

    f.mesh.namespaces = vec![("default".into(), Some("ambient".into()))];
    f.mesh.write_config().unwrap();
    wait_for_peer(&f.echo2, &sleep, echo2, DELIVERY_SOURCE).expect("pod not captured again");

    plain.write_all(b"two").unwrap();
    plain.read_exact(&mut buf).unwrap();
    assert_eq!(
        &buf, b"two",
        "established plain connection broken by enrolment"
    );

    // A captured connection survives un-enrolment too.
    let mut captured = connect(&sleep, echo2).unwrap();
    captured.write_all(b"abc").unwrap();
    captured.read_exact(&mut buf).unwrap();
    f.mesh.namespaces = vec![("default".into(), None)];
    f.mesh.write_config().unwrap();
    wait_for_peer(&f.echo2, &sleep, echo2, &sleep_ip).expect("pod not released");
    captured.write_all(b"def").unwrap();
    captured.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"def");
}

#[test]
fn ztunnel_restart_releases_then_recaptures_pods() {
    let mut f = fixture();
    let sleep = f.mesh.netns("sleep");
    // echo1 shares node1 with sleep: with node1's ztunnel gone, neither end is captured.
    let echo1 = addr(&f.mesh, "echo1");
    let sleep_ip = f.mesh.ip("sleep").to_string();
    assert_eq!(
        echo_roundtrip(&sleep, echo1, b"a".to_vec()).unwrap(),
        b"abye"
    );
    assert_eq!(peers_from(&f.echo1, DELIVERY_SOURCE), 1);

    // A crash takes the eBPF programs and links with the process: plain networking is back
    // at once, and nothing stays loaded in the kernel.
    let ids = program_ids(&f.mesh.ztunnel("node1").log());
    assert_eq!(ids.len(), 4, "program ids not logged");
    assert!(ids.iter().all(|id| loaded(*id)));
    f.mesh.ztunnel("node1").kill();
    assert!(
        !ids.iter().any(|id| loaded(*id)),
        "programs left loaded after a crash"
    );
    assert_eq!(
        echo_roundtrip(&sleep, echo1, b"b".to_vec()).unwrap(),
        b"bbye"
    );
    assert_eq!(peers_from(&f.echo1, &sleep_ip), 1);

    f.mesh.start_ztunnel("node1").unwrap();
    assert_eq!(
        echo_roundtrip(&sleep, echo1, b"c".to_vec()).unwrap(),
        b"cbye"
    );
    assert_eq!(peers_from(&f.echo1, DELIVERY_SOURCE), 2);
    // And across nodes again.
    let echo2 = addr(&f.mesh, "echo2");
    assert_eq!(
        echo_roundtrip(&sleep, echo2, b"d".to_vec()).unwrap(),
        b"dbye"
    );
    assert_eq!(peers_from(&f.echo2, &sleep_ip), 0);

    // An orderly stop (SIGTERM) exits 0 and unloads everything too.
    let ids = program_ids(&f.mesh.ztunnel("node2").log());
    let status = f
        .mesh
        .ztunnel("node2")
        .terminate(Duration::from_secs(10))
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(
        !ids.iter().any(|id| loaded(*id)),
        "programs left loaded after SIGTERM"
    );
}

/// The kernel ids of the programs a ztunnel logged when it attached them.
fn program_ids(log: &str) -> Vec<u32> {
    log.lines()
        .filter_map(|l| l.split("program_ids=").nth(1))
        .next_back()
        .map(|ids| {
            ids.split(|c: char| !c.is_ascii_digit())
                .filter_map(|id| id.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a BPF program with this id is loaded in the kernel.
fn loaded(id: u32) -> bool {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .any(|p| p.id() == id)
}

#[test]
fn malformed_tunnels_are_rejected_and_others_keep_flowing() {
    let mut f = fixture();
    let sleep = f.mesh.netns("sleep");
    let outside = f.mesh.topo.pod("outside").netns.clone();
    let hbone = SocketAddr::new(f.mesh.ip("echo2").into(), 15008);

    // Bytes that are not TLS.
    let mut junk = connect(&outside, hbone).unwrap();
    junk.write_all(b"GET / HTTP/1.1\r\n\r\nnot tls at all")
        .unwrap();
    let mut rest = Vec::new();
    let _ = junk.read_to_end(&mut rest);
    f.mesh
        .ztunnel("node2")
        .wait_for_log("HBONE connection rejected", Duration::from_secs(10))
        .unwrap();

    // A TLS client without a certificate (curl).
    let out = mesh_tests::netns::exec(
        &outside,
        "curl",
        &[
            "-sS",
            "-k",
            "--max-time",
            "10",
            &format!("https://{hbone}/"),
        ],
    )
    .unwrap();
    assert!(
        !out.status.success(),
        "TLS without a client certificate was accepted"
    );
    f.mesh
        .ztunnel("node2")
        .wait_for_log("no client certificate", Duration::from_secs(10))
        .unwrap();

    // A connection held open without a handshake does not block others.
    let _idle: Option<TcpStream> = connect(&outside, hbone).ok();
    let got = echo_roundtrip(&sleep, addr(&f.mesh, "echo2"), b"still".to_vec()).unwrap();
    assert_eq!(got, b"stillbye");
}

#[test]
fn workloads_in_namespaces_without_ambient_are_reached_in_plain_tcp() {
    let mut legacy = PodSpec::new("legacy", "node2", "legacy");
    legacy.namespace = "legacy".into();
    let pods = vec![PodSpec::new("sleep", "node1", "sleep"), legacy];
    let mut mesh = Mesh::new(&["node1", "node2"], pods, Vec::new()).unwrap();
    mesh.namespaces.push(("legacy".into(), None));
    let server = AppServer::start(&mesh.netns("legacy"), "legacy", addr(&mesh, "legacy")).unwrap();
    mesh.start().unwrap();
    let got = echo_roundtrip(&mesh.netns("sleep"), addr(&mesh, "legacy"), b"hi".to_vec()).unwrap();
    assert_eq!(got, b"hibye");
    assert_eq!(peers_from(&server, &mesh.ip("sleep").to_string()), 1);
    assert!(mesh.ztunnel("node1").log().contains("passthrough"));
}

#[test]
fn ipv6_pods_and_service_vip_are_captured_and_tunnelled() {
    let pods = vec![
        PodSpec::new("sleep", "node1", "sleep"),
        PodSpec::new("echo1", "node1", "echo").service("echo", 80, APP_PORT),
        PodSpec::new("echo2", "node2", "echo").service("echo", 80, APP_PORT),
    ];
    let services = vec![ServiceSpec {
        name: "echo".into(),
        namespace: "default".into(),
        vip: "198.18.100.1".parse().unwrap(),
        vip6: Some("fd00:198:100::1".parse().unwrap()),
        ports: vec![(80, APP_PORT)],
    }];
    let mut mesh = Mesh::new(&["node1", "node2"], pods, services).unwrap();
    mesh.dual_stack = true;
    mesh.ztunnel_args = vec!["--inbound-source".into(), "loopback".into()];

    let outside = mesh.topo.add_outside_host("outside").unwrap();
    let addrs: std::collections::BTreeMap<&str, SocketAddr> = ["echo1", "echo2"]
        .into_iter()
        .map(|p| (p, SocketAddr::new(mesh.topo.pod(p).ip6.into(), APP_PORT)))
        .collect();
    let v6 = |pod: &str| addrs[pod];
    let echo1 = AppServer::start(&mesh.netns("echo1"), "echo1", v6("echo1")).unwrap();
    let echo2 = AppServer::start(&mesh.netns("echo2"), "echo2", v6("echo2")).unwrap();
    mesh.start().unwrap();
    let sleep = mesh.netns("sleep");

    for (server, pod) in [(&echo2, "echo2"), (&echo1, "echo1")] {
        let data = payload(1 << 20, 11);
        let got = echo_roundtrip(&sleep, v6(pod), data.clone()).unwrap();
        assert!(
            got[..data.len()] == data[..],
            "IPv6 payload to {pod} corrupted"
        );
        assert_eq!(&got[data.len()..], b"bye");
        // Delivered by ztunnel from the pod's IPv6 loopback.
        assert_eq!(peers_from(server, "::1"), 1, "{pod}: {:?}", server.peers());
    }
    let mut answered = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let (code, body) = curl(&sleep, "http://[fd00:198:100::1]/").unwrap();
        assert_eq!(code, 0, "curl over the IPv6 VIP failed: {body}");
        answered.insert(body.split(';').next().unwrap_or_default().to_owned());
    }
    assert_eq!(answered.len(), 2, "{answered:?}");
    let log = mesh.ztunnel("node2").log();
    assert!(log.contains("HBONE connection accepted"), "{log}");

    // Plaintext from outside the mesh over IPv6 is steered to the inbound listener
    // (sk_lookup) and delivered by ztunnel too.
    let before = peers_from(&echo2, "::1");
    let got = echo_roundtrip(&outside.netns, v6("echo2"), b"v6 plain".to_vec()).unwrap();
    assert_eq!(got, b"v6 plainbye");
    assert_eq!(peers_from(&echo2, "::1"), before + 1);
    assert_eq!(peers_from(&echo2, &outside.ip6.to_string()), 0);
}

#[test]
fn allow_policies_admit_only_what_they_match_and_pods_can_opt_out() {
    let mut tcp_only = PodSpec::new("tcponly", "node2", "legacy");
    tcp_only.protocol = "TCP".into();
    let mut opted_out = PodSpec::new("optout", "node2", "echo");
    opted_out
        .labels
        .push(("istio.io/dataplane-mode".into(), "none".into()));
    let pods = vec![
        PodSpec::new("sleep", "node1", "sleep"),
        PodSpec::new("other", "node1", "other"),
        PodSpec::new("echo2", "node2", "echo"),
        tcp_only,
        opted_out,
    ];
    let mut mesh = Mesh::new(&["node1", "node2"], pods, Vec::new()).unwrap();
    // Pods of `default`: only the sleep service account, only on 8080.
    mesh.policies = "  - name: echo-allow-sleep\n    namespace: default\n    scope: Namespace\n    action: Allow\n    rules:\n      - - - principals:\n              - Exact: cluster.local/ns/default/sa/sleep\n        - - destinationPorts: [8080]\n".into();
    let echo2 = AppServer::start(&mesh.netns("echo2"), "echo2", addr(&mesh, "echo2")).unwrap();
    let debug_port = SocketAddr::new(mesh.ip("echo2").into(), 9090);
    let _debug = AppServer::start(&mesh.netns("echo2"), "echo2-debug", debug_port).unwrap();
    let tcp_only =
        AppServer::start(&mesh.netns("tcponly"), "tcponly", addr(&mesh, "tcponly")).unwrap();
    let optout = AppServer::start(&mesh.netns("optout"), "optout", addr(&mesh, "optout")).unwrap();
    mesh.start().unwrap();

    let sleep = mesh.netns("sleep");
    let other = mesh.netns("other");
    let works = |ns: &str, dst: SocketAddr| matches!(echo_roundtrip(ns, dst, b"x".to_vec()), Ok(ref got) if got == b"xbye");
    // Refused connections are reset, as the client's ztunnel learns of the denial.
    let reset = |ns: &str, dst: SocketAddr| is_reset(&echo_roundtrip(ns, dst, b"x".to_vec()));
    assert!(
        works(&sleep, addr(&mesh, "echo2")),
        "allowed identity and port refused"
    );
    assert!(
        reset(&other, addr(&mesh, "echo2")),
        "other service account admitted (or not reset)"
    );
    assert!(
        reset(&sleep, debug_port),
        "port outside the ALLOW rule admitted (or not reset)"
    );
    assert_eq!(
        echo2.peers().len(),
        1,
        "denied connections reached the application"
    );
    mesh.ztunnel("node2")
        .wait_for_log(
            "ALLOW policies apply and none matched",
            Duration::from_secs(5),
        )
        .unwrap();

    // protocol TCP and an opted-out pod are reached in plain TCP, from the client's address.
    let sleep_ip = mesh.ip("sleep").to_string();
    assert!(works(&sleep, addr(&mesh, "tcponly")));
    assert_eq!(peers_from(&tcp_only, &sleep_ip), 1);
    assert!(works(&sleep, addr(&mesh, "optout")));
    assert_eq!(peers_from(&optout, &sleep_ip), 1);
}
