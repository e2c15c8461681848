//! The capture programs on the real kernel: outbound redirect with the original destination
//! recovered, the mark exclusion, and release on un-enrolment.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use mesh_tests::{Topology, netns, require_root, traffic};
use ztunnel::capture::{Capture, Netns};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_connect_is_redirected_with_original_destination() {
    require_root();
    let mut topo = Topology::new().unwrap();
    topo.add_node("node1").unwrap();
    let pod = topo.add_pod("node1", "client").unwrap();
    let other = topo.add_pod("node1", "server").unwrap();

    let pin = std::path::PathBuf::from(format!("/sys/fs/bpf/{}-capture", topo.prefix()));
    let capture = Capture::load(None, &pin).expect("load capture programs");
    let ns = Netns::open(&netns::netns_path(&pod.netns)).unwrap();
    let listener = ns.listen("127.0.0.1:15001".parse().unwrap()).await.unwrap();

    // A real server in the other pod: before enrolment, the client reaches it directly.
    let server_addr = SocketAddr::new(other.ip.into(), 8080);
    let server = traffic::AppServer::start(&other.netns, "server", server_addr).unwrap();
    let got = traffic::echo_roundtrip(&pod.netns, server_addr, b"plain".to_vec()).unwrap();
    assert_eq!(got, b"plainbye");

    capture.enroll_outbound(ns.cookie(), 15001).unwrap();
    let client_ns = pod.netns.clone();
    let client = std::thread::spawn(move || {
        let mut s = traffic::connect(&client_ns, server_addr).unwrap();
        s.write_all(b"captured?").unwrap();
        let mut reply = [0u8; 2];
        s.read_exact(&mut reply).unwrap();
        reply
    });
    let (mut accepted, peer) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .expect("redirected connection accepted")
        .unwrap();
    assert!(peer.ip().is_loopback(), "peer {peer}");
    let orig = capture.take_original_destination(ns.cookie(), peer);
    assert_eq!(orig, Some(server_addr));
    // Each entry is read once.
    assert_eq!(capture.take_original_destination(ns.cookie(), peer), None);
    let mut buf = [0u8; 9];
    tokio::io::AsyncReadExt::read_exact(&mut accepted, &mut buf)
        .await
        .unwrap();
    assert_eq!(&buf, b"captured?");
    tokio::io::AsyncWriteExt::write_all(&mut accepted, b"ok")
        .await
        .unwrap();
    assert_eq!(&client.join().unwrap(), b"ok");
    assert_eq!(
        server.peers().len(),
        1,
        "the server saw only the plain connection"
    );

    // ztunnel's own sockets (marked) are never redirected.
    let direct = ns.connect(server_addr, None).await.unwrap();
    assert_eq!(direct.peer_addr().unwrap(), server_addr);
    drop(direct);

    // Loopback stays inside the pod.
    let local = netns::in_netns(&pod.netns, || TcpListener::bind("127.0.0.1:7070"))
        .unwrap()
        .unwrap();
    let to_local = traffic::connect(&pod.netns, "127.0.0.1:7070".parse().unwrap()).unwrap();
    assert_eq!(to_local.peer_addr().unwrap(), local.local_addr().unwrap());

    // Released: plain networking again.
    capture.unenroll(ns.cookie());
    let got = traffic::echo_roundtrip(&pod.netns, server_addr, b"again".to_vec()).unwrap();
    assert_eq!(got, b"againbye");
    capture.unpin();
    assert!(!pin.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_plaintext_is_steered_to_the_inbound_listener() {
    require_root();
    let mut topo = Topology::new().unwrap();
    topo.add_node("node1").unwrap();
    let pod = topo.add_pod("node1", "server").unwrap();
    let client = topo.add_pod("node1", "client").unwrap();

    let pin = std::path::PathBuf::from(format!("/sys/fs/bpf/{}-capture", topo.prefix()));
    let capture = Capture::load(None, &pin).expect("load capture programs");
    let ns = Netns::open(&netns::netns_path(&pod.netns)).unwrap();
    let inbound = ns.listen("0.0.0.0:15006".parse().unwrap()).await.unwrap();
    let app_addr = SocketAddr::new(pod.ip.into(), 9090);
    let app = traffic::AppServer::start(&pod.netns, "app", app_addr).unwrap();
    capture
        .enroll_inbound(&ns, &[pod.ip.into()], &inbound, None)
        .unwrap();

    let client_ns = client.netns.clone();
    let sender = std::thread::spawn(move || {
        let mut s = traffic::connect(&client_ns, app_addr).unwrap();
        s.write_all(b"inbound").unwrap();
    });
    let (mut accepted, _) = tokio::time::timeout(Duration::from_secs(10), inbound.accept())
        .await
        .expect("steered connection accepted")
        .unwrap();
    // The accepted socket's local address is where the client was going.
    assert_eq!(accepted.local_addr().unwrap(), app_addr);
    let mut buf = [0u8; 7];
    tokio::io::AsyncReadExt::read_exact(&mut accepted, &mut buf)
        .await
        .unwrap();
    assert_eq!(&buf, b"inbound");
    sender.join().unwrap();

    // Deliveries on the pod's loopback (ztunnel's own path to the app) are not steered.
    let delivered = ns
        .connect(app_addr, Some("127.0.0.6:0".parse().unwrap()))
        .await
        .unwrap();
    drop(delivered);
    mesh_tests::wait_until(Duration::from_secs(5), || {
        app.peers()
            .iter()
            .any(|p| p.ip().to_string() == "127.0.0.6")
    })
    .expect("app saw the delivery from 127.0.0.6");

    capture.unenroll(ns.cookie());
    let got = traffic::echo_roundtrip(&client.netns, app_addr, b"plain".to_vec()).unwrap();
    assert_eq!(got, b"plainbye");
    capture.unpin();
}

/// `ip netns exec NODE ztunnel ...`, how a person tries a node by hand, gives ztunnel a mount
/// namespace with a fresh `/sys` and no cgroup v2 mount: it mounts the hierarchy itself, says
/// so, and captures as usual.
#[test]
fn ztunnel_under_ip_netns_exec_mounts_its_own_cgroup2_and_captures() {
    use mesh_tests::mesh::{Mesh, PodSpec};
    let pods = vec![
        PodSpec::new("sleep", "node1", "sleep"),
        PodSpec::new("echo", "node1", "echo"),
    ];
    let mut mesh = Mesh::new(&["node1"], pods, Vec::new()).unwrap();
    mesh.ip_netns_exec = true;
    // Deliveries from 127.0.0.6 tell a captured connection from a direct one.
    mesh.ztunnel_args = vec!["--inbound-source".into(), "loopback".into()];
    let dst = SocketAddr::new(mesh.ip("echo").into(), 8080);
    let server = traffic::AppServer::start(&mesh.netns("echo"), "echo", dst).unwrap();
    // Ready means every pod is captured.
    mesh.start().unwrap();

    // The process's own view: one cgroup2 mount, ztunnel's, under its state directory.
    let pid = mesh.ztunnel("node1").pid();
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mounts")).unwrap();
    let cgroup2: Vec<&str> = mounts
        .lines()
        .filter(|l| l.split_whitespace().nth(2) == Some("cgroup2"))
        .collect();
    let private = mesh.dir.path().join("node1-state").join("cgroup2");
    assert_eq!(cgroup2.len(), 1, "{mounts}");
    assert_eq!(
        cgroup2[0].split_whitespace().nth(1),
        Some(private.to_str().unwrap()),
        "{mounts}"
    );
    assert!(
        mesh.ztunnel("node1")
            .log()
            .contains("mounted the cgroup2 hierarchy here")
    );

    // Captured: the application's connection arrives from ztunnel's delivery address.
    let got = traffic::echo_roundtrip(&mesh.netns("sleep"), dst, b"by hand".to_vec()).unwrap();
    assert_eq!(got, b"by handbye");
    let peers: Vec<String> = server.peers().iter().map(|p| p.ip().to_string()).collect();
    assert_eq!(peers, ["127.0.0.6"]);
}
