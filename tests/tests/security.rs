//! Security properties of the node agent: it works with a small set of capabilities, a pod
//! cannot use another pod's ztunnel listeners to get around the mesh, and an identity claimed
//! in request headers counts for nothing (only the certificate does).

use std::net::SocketAddr;
use std::time::Duration;

use mesh_tests::mesh::{Mesh, PodSpec, tunnel};
use mesh_tests::traffic::{AppServer, echo_roundtrip, first_read, is_reset};

/// The capabilities ztunnel needs: entering pod network namespaces and mounting the BPF
/// filesystem (sys_admin), loading and attaching programs (bpf, perfmon, net_admin), and
/// marking its sockets (net_admin).
const CAPABILITIES: [&str; 4] = ["sys_admin", "net_admin", "bpf", "perfmon"];

#[test]
fn ztunnel_runs_with_only_the_capabilities_it_needs() {
    let pods = vec![
        PodSpec::new("sleep", "node1", "sleep"),
        PodSpec::new("echo", "node2", "echo"),
    ];
    let mut mesh = Mesh::new(&["node1", "node2"], pods, Vec::new()).unwrap();
    mesh.capabilities = Some(CAPABILITIES.iter().map(|c| c.to_string()).collect());
    let dst = SocketAddr::new(mesh.ip("echo").into(), 8080);
    let server = AppServer::start(&mesh.netns("echo"), "echo", dst).unwrap();
    mesh.start().unwrap();
    // The bounding set really is reduced.
    let pid = mesh.ztunnel("node1").pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let bounding = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    // sys_admin 21, net_admin 12, bpf 39, perfmon 38.
    assert_eq!(
        bounding,
        (1 << 21) | (1 << 12) | (1 << 39) | (1 << 38),
        "{bounding:x}"
    );
    let got = echo_roundtrip(&mesh.netns("sleep"), dst, b"least".to_vec()).unwrap();
    assert_eq!(got, b"leastbye");
    // Delivered from the client's own address: the pod namespace's set-up for that needs no
    // capability beyond these either.
    assert_eq!(
        server.peers()[0].ip(),
        std::net::IpAddr::from(mesh.ip("sleep"))
    );
}

#[test]
fn a_pod_cannot_use_another_pods_ztunnel_listeners() {
    let pods = vec![
        PodSpec::new("sleep", "node1", "sleep"),
        PodSpec::new("other", "node1", "other"),
    ];
    let mut mesh = Mesh::new(&["node1"], pods, Vec::new()).unwrap();
    let outside = mesh.topo.add_outside_host("outside").unwrap();
    mesh.start().unwrap();
    let other = mesh.netns("other");
    let sleep_ip = mesh.ip("sleep");
    // The outbound listener is on the pod's loopback only: from outside the pod it is not
    // there, and the inbound steering hands the port to the inbound listener, which refuses
    // ztunnel's own ports (reset without a byte; see `own_ports.rs`).
    let outbound = first_read(&outside.netns, SocketAddr::new(sleep_ip.into(), 15001));
    assert!(
        is_reset(&outbound),
        "a host reached sleep's outbound listener: {outbound:?}"
    );
    // A captured pod's attempt goes through its own ztunnel, which finds nothing there
    // either: the connection is reset without a byte.
    let got = echo_roundtrip(
        &other,
        SocketAddr::new(sleep_ip.into(), 15001),
        b"hello".to_vec(),
    );
    assert!(
        is_reset(&got),
        "sleep's outbound listener answered: {got:?}"
    );
    // The HBONE listener answers only mutual TLS (curl without a client certificate fails).
    let out = mesh_tests::netns::exec(
        &other,
        "curl",
        &[
            "-sk",
            "--max-time",
            "5",
            &format!("https://{sleep_ip}:15008/"),
        ],
    )
    .unwrap();
    assert!(
        !out.status.success(),
        "HBONE without a client certificate was accepted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_claimed_in_headers_is_ignored() {
    let pods = vec![
        PodSpec::new("sleep", "node1", "sleep"),
        PodSpec::new("echo", "node2", "echo"),
    ];
    let mut mesh = Mesh::new(&["node1", "node2"], pods, Vec::new()).unwrap();
    mesh.topo.add_outside_host("attacker").unwrap();
    // Only the sleep service account may reach echo.
    mesh.policies = "  - name: only-sleep\n    namespace: default\n    scope: Namespace\n    action: Allow\n    rules:\n      - - - principals:\n              - Exact: cluster.local/ns/default/sa/sleep\n".into();
    let dst = SocketAddr::new(mesh.ip("echo").into(), 8080);
    let server = AppServer::start(&mesh.netns("echo"), "echo", dst).unwrap();
    mesh.start().unwrap();

    // A valid certificate for another service account, with headers that claim sleep.
    let other = mesh
        .ca()
        .sign(
            &"spiffe://cluster.local/ns/default/sa/other"
                .parse()
                .unwrap(),
            Duration::from_secs(600),
        )
        .unwrap();
    let status = mesh_tests::mesh::connect_status_with_headers(
        &mesh,
        "attacker",
        &other,
        "spiffe://cluster.local/ns/default/sa/echo".parse().unwrap(),
        SocketAddr::new(mesh.ip("echo").into(), 15008),
        dst,
        &[
            (
                "baggage",
                "k8s.namespace.name=default,k8s.pod.name=sleep,service.name=sleep",
            ),
            (
                "x-forwarded-client-cert",
                "URI=spiffe://cluster.local/ns/default/sa/sleep",
            ),
            ("forwarded", &format!("for=\"{}:1234\"", mesh.ip("sleep"))),
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        status,
        http::StatusCode::UNAUTHORIZED,
        "a claimed identity was accepted"
    );
    assert!(server.peers().is_empty());
    // The real sleep certificate is admitted.
    let sleep = mesh
        .ca()
        .sign(
            &"spiffe://cluster.local/ns/default/sa/sleep"
                .parse()
                .unwrap(),
            Duration::from_secs(600),
        )
        .unwrap();
    tunnel(
        &mesh,
        "attacker",
        &sleep,
        "spiffe://cluster.local/ns/default/sa/echo".parse().unwrap(),
        SocketAddr::new(mesh.ip("echo").into(), 15008),
        dst,
    )
    .await
    .expect("the real identity was refused");
}

/// `sourceIps` rules judge a tunnel by the TCP peer of its HBONE connection. The `forwarded`
/// header is the sender's claim: with a valid mesh certificate, a client at Y claiming to be
/// X is still Y, so an ALLOW for X does not admit it and a DENY for Y still refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_address_claimed_in_forwarded_is_not_believed_by_policy() {
    let pods = vec![
        PodSpec::new("sleep", "node1", "sleep"),
        PodSpec::new("echo", "node2", "echo"),
    ];
    let mut mesh = Mesh::new(&["node1", "node2"], pods, Vec::new()).unwrap();
    let attacker = mesh.topo.add_outside_host("attacker").unwrap();
    let (x, y) = (mesh.ip("sleep"), attacker.ip);
    // Some third address, named only in a header.
    let z = mesh.topo.node("node1").ip;
    let allowed = SocketAddr::new(mesh.ip("echo").into(), 8080);
    let denied = SocketAddr::new(mesh.ip("echo").into(), 9090);
    // 8080: only X may connect. 9090: anyone but Y.
    mesh.policies = format!(
        "  - name: allow-x\n    namespace: default\n    scope: Namespace\n    action: Allow\n    rules:\n      - - - sourceIps: [\"{x}/32\"]\n            destinationPorts: [8080]\n      - - - destinationPorts: [9090]\n  - name: deny-y\n    namespace: default\n    scope: Namespace\n    action: Deny\n    rules:\n      - - - sourceIps: [\"{y}/32\"]\n            destinationPorts: [9090]\n"
    );
    let server_allowed = AppServer::start(&mesh.netns("echo"), "echo", allowed).unwrap();
    let server_denied = AppServer::start(&mesh.netns("echo"), "echo", denied).unwrap();
    mesh.start().unwrap();

    // Controls: X itself, through the mesh, is admitted on both ports.
    for dst in [allowed, denied] {
        let got = echo_roundtrip(&mesh.netns("sleep"), dst, b"x".to_vec()).unwrap();
        assert_eq!(got, b"xbye", "sleep to {dst}");
    }
    assert_eq!(server_allowed.peers().len(), 1);
    assert_eq!(server_denied.peers().len(), 1);

    // A mesh client at Y with a valid certificate of its own.
    let other = mesh
        .ca()
        .sign(
            &"spiffe://cluster.local/ns/default/sa/other"
                .parse()
                .unwrap(),
            Duration::from_secs(600),
        )
        .unwrap();
    let echo_id: ztunnel::identity::Identity =
        "spiffe://cluster.local/ns/default/sa/echo".parse().unwrap();
    let hbone = SocketAddr::new(mesh.ip("echo").into(), 15008);
    let claim = |ip: std::net::Ipv4Addr| format!("for=\"{ip}:1\"");
    let mut statuses = Vec::new();
    // To 8080 claiming X (the ALLOW's address); to 9090 claiming Z (not the DENY's).
    for (dst, claimed) in [(allowed, claim(x)), (denied, claim(z))] {
        let status = mesh_tests::mesh::connect_status_with_headers(
            &mesh,
            "attacker",
            &other,
            echo_id.clone(),
            hbone,
            dst,
            &[("forwarded", &claimed)],
        )
        .await
        .unwrap();
        statuses.push(status.as_u16());
    }
    assert_eq!(
        statuses,
        [401, 401],
        "a claimed source address was believed"
    );
    assert_eq!(server_allowed.peers().len(), 1, "the attacker reached 8080");
    assert_eq!(server_denied.peers().len(), 1, "the attacker reached 9090");

    // The records name the proven peer and keep the claim, labelled as such.
    let denials = mesh_tests::operator::connections(&mesh, "node2", |c| {
        c["state"] == "denied" && c["path"] == "hbone-in"
    });
    assert_eq!(denials.len(), 2, "{denials:?}");
    for d in &denials {
        let src = d["src"].as_str().unwrap_or_default();
        assert!(src.starts_with(&format!("{y}:")), "{d}");
        let claimed = d["src_claimed"].as_str().unwrap_or_default();
        assert!(
            claimed == format!("{x}:1") || claimed == format!("{z}:1"),
            "{d}"
        );
    }
}

/// Pods that share a service account never share a tunnel: the destination judges each by
/// its own address. With an ALLOW for pod A's address only, pod B (same identity, same node)
/// is refused even right after A's tunnel to the destination was opened and left pooled.
#[test]
fn pods_of_one_identity_are_judged_by_their_own_address() {
    let pods = vec![
        PodSpec::new("a", "node1", "sleep"),
        PodSpec::new("b", "node1", "sleep"),
        PodSpec::new("echo", "node2", "echo"),
    ];
    let mut mesh = Mesh::new(&["node1", "node2"], pods, Vec::new()).unwrap();
    let a = mesh.ip("a");
    let dst = SocketAddr::new(mesh.ip("echo").into(), 8080);
    mesh.policies = format!(
        "  - name: allow-a\n    namespace: default\n    scope: Namespace\n    action: Allow\n    rules:\n      - - - sourceIps: [\"{a}/32\"]\n"
    );
    let server = AppServer::start(&mesh.netns("echo"), "echo", dst).unwrap();
    mesh.start().unwrap();

    let got = echo_roundtrip(&mesh.netns("a"), dst, b"a".to_vec()).unwrap();
    assert_eq!(got, b"abye");
    let got = echo_roundtrip(&mesh.netns("b"), dst, b"b".to_vec());
    assert!(
        is_reset(&got),
        "pod b was admitted on pod a's address: {got:?}"
    );
    let got = echo_roundtrip(&mesh.netns("a"), dst, b"a".to_vec()).unwrap();
    assert_eq!(got, b"abye");
    let peers: Vec<String> = server.peers().iter().map(|p| p.ip().to_string()).collect();
    assert_eq!(peers, [a.to_string(), a.to_string()]);
}
