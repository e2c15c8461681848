//! Deliveries keep the client's address (`--inbound-source client`, the default): the server
//! sees the client pod's IP, in the family it connected with, across nodes and on the same
//! node, and a plaintext client's own IP; its replies never leave the pod; the set-up that
//! makes that work is gone from the pod's namespace once the pod is released or ztunnel
//! stops, also after an upgrade. `--inbound-source loopback` delivers from 127.0.0.6 / ::1.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use mesh_tests::mesh::{Mesh, PodSpec};
use mesh_tests::netns::{exec, netns_path};
use mesh_tests::traffic::{AppServer, connect, echo_roundtrip};
use mesh_tests::{Proc, Topology, require_root, wait_until};
use ztunnel::capture::{Capture, Netns};

const APP_PORT: u16 = 8080;

/// node1: sleep, echo1; node2: echo2; dual-stack; echo servers on both addresses of each
/// echo pod. `args` go to every ztunnel.
struct Fixture {
    mesh: Mesh,
    servers: Vec<(String, AppServer)>,
}

fn fixture(args: &[&str]) -> Fixture {
    let pods = vec![
        PodSpec::new("sleep", "node1", "sleep"),
        PodSpec::new("echo1", "node1", "echo"),
        PodSpec::new("echo2", "node2", "echo"),
    ];
    let mut mesh = Mesh::new(&["node1", "node2"], pods, Vec::new()).unwrap();
    mesh.dual_stack = true;
    mesh.ztunnel_args = args.iter().map(|a| a.to_string()).collect();
    let mut servers = Vec::new();
    for pod in ["echo1", "echo2"] {
        for ip in ips(&mesh, pod) {
            let addr = SocketAddr::new(ip, APP_PORT);
            let server = AppServer::start(&mesh.netns(pod), pod, addr).unwrap();
            servers.push((pod.to_owned(), server));
        }
    }
    Fixture { mesh, servers }
}

impl Fixture {
    fn server(&self, dst: SocketAddr) -> &AppServer {
        &self.servers.iter().find(|(_, s)| s.addr == dst).unwrap().1
    }

    /// One echo from `client` to `dst`; the address the server saw it from.
    fn peer_of_roundtrip(&self, client: &str, dst: SocketAddr) -> SocketAddr {
        let got = echo_roundtrip(&self.mesh.netns(client), dst, b"who".to_vec()).unwrap();
        assert_eq!(got, b"whobye", "to {dst}");
        *self.server(dst).peers().last().unwrap()
    }
}

/// A pod's IPv4 and IPv6 addresses.
fn ips(mesh: &Mesh, pod: &str) -> [IpAddr; 2] {
    let host = mesh.topo.pod(pod);
    [host.ip.into(), host.ip6.into()]
}

/// What ztunnel may change in a pod's namespace: policy rules, its routing table, the mark
/// sysctls.
fn netns_state(netns: &str) -> String {
    let run = |args: &[&str]| {
        let out = Command::new("ip").args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let sysctls = exec(
        netns,
        "sysctl",
        &[
            "net.ipv4.tcp_fwmark_accept",
            "net.ipv4.fwmark_reflect",
            "net.ipv6.fwmark_reflect",
        ],
    )
    .unwrap();
    [
        run(&["-n", netns, "rule", "show"]),
        run(&["-n", netns, "-6", "rule", "show"]),
        run(&["-n", netns, "route", "show", "table", "1337"]),
        run(&["-n", netns, "-6", "route", "show", "table", "1337"]),
        String::from_utf8_lossy(&sysctls.stdout).into_owned(),
    ]
    .join("")
}

fn is_set_up(netns: &str) -> bool {
    let state = netns_state(netns);
    state.contains("fwmark 0x53a lookup 1337") && state.contains("tcp_fwmark_accept = 1")
}

/// A packet capture on `iface` inside `netns`, counted on demand with a tcpdump filter.
struct Sniffer {
    tcpdump: Proc,
    pcap: std::path::PathBuf,
}

impl Sniffer {
    fn start(mesh: &Mesh, name: &str, netns: &str, iface: &str) -> Sniffer {
        let pcap = mesh.dir.path().join(format!("{name}.pcap"));
        let mut cmd = Command::new("tcpdump");
        cmd.args(["-i", iface, "--immediate-mode", "-U", "-n", "-w"])
            .arg(&pcap)
            .arg("tcp");
        let tcpdump = Proc::spawn(name, netns, cmd, mesh.dir.path()).unwrap();
        tcpdump
            .wait_for_log("listening on", Duration::from_secs(10))
            .unwrap();
        Sniffer { tcpdump, pcap }
    }

    /// Stops the capture; the number of packets matching each filter.
    fn count(mut self, filters: &[&str]) -> Vec<usize> {
        self.tcpdump.terminate(Duration::from_secs(10)).unwrap();
        filters
            .iter()
            .map(|filter| {
                let out = Command::new("tcpdump")
                    .arg("-r")
                    .arg(&self.pcap)
                    .args(["-nn", filter])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout).lines().count()
            })
            .collect()
    }
}

impl Drop for Sniffer {
    /// A failing test shows what its captures saw (the files go with the mesh's directory):
    /// which packets left a pod, and with what flags, says where a reply went.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let out = Command::new("tcpdump")
            .arg("-r")
            .arg(&self.pcap)
            .args(["-nn", "-tt", "-c", "200"])
            .output();
        let text = out.map_or_else(
            |e| format!("cannot read: {e}"),
            |o| String::from_utf8_lossy(&o.stdout).into_owned(),
        );
        eprintln!("----- capture {} -----\n{text}", self.pcap.display());
    }
}

#[test]
fn servers_see_the_client_pod_address_across_nodes_and_on_the_same_node() {
    let mut f = fixture(&[]);
    f.mesh.start().unwrap();
    let uplink = Sniffer::start(&f.mesh, "uplink", &f.mesh.topo.node("node1").netns, "eth0");
    let pods = [
        Sniffer::start(&f.mesh, "echo1-eth0", &f.mesh.netns("echo1"), "eth0"),
        Sniffer::start(&f.mesh, "echo2-eth0", &f.mesh.netns("echo2"), "eth0"),
    ];
    // Where ztunnel's same-node deliveries into echo1 and their replies travel; shown if the
    // test fails.
    let _echo1_lo = Sniffer::start(&f.mesh, "echo1-lo", &f.mesh.netns("echo1"), "lo");
    for pod in ["echo2", "echo1"] {
        for (dst_ip, client_ip) in ips(&f.mesh, pod).into_iter().zip(ips(&f.mesh, "sleep")) {
            let peer = f.peer_of_roundtrip("sleep", SocketAddr::new(dst_ip, APP_PORT));
            assert_eq!(peer.ip(), client_ip, "{pod} at {dst_ip}");
        }
    }
    // Through ztunnel: same-node on node1, HBONE into echo2.
    assert!(f.mesh.ztunnel("node1").log().contains("same-node"));
    assert!(
        f.mesh
            .ztunnel("node2")
            .log()
            .contains("HBONE connection accepted")
    );
    // Only TLS on 15008 between the pods' nodes, and nothing of the application's port on
    // the echo pods' own interfaces: every reply went back to ztunnel inside the pod.
    let [sleep4, sleep6] = ips(&f.mesh, "sleep");
    let [echo2_4, echo2_6] = ips(&f.mesh, "echo2");
    let hbone =
        format!("((host {sleep4} and host {echo2_4}) or (host {sleep6} and host {echo2_6}))");
    let counts = uplink.count(&[
        &format!("{hbone} and tcp port 15008"),
        &format!("{hbone} and not tcp port 15008"),
    ]);
    assert!(counts[0] > 0, "no HBONE packets captured");
    assert_eq!(counts[1], 0, "non-HBONE TCP between the pods");
    for (pod, capture) in ["echo1", "echo2"].into_iter().zip(pods) {
        let counts = capture.count(&[&format!("tcp port {APP_PORT}"), "tcp port 15008"]);
        assert_eq!(
            counts[0], 0,
            "{pod}: application traffic on the pod's interface"
        );
        if pod == "echo2" {
            assert!(counts[1] > 0, "{pod}: the capture saw nothing");
        }
    }
}

#[test]
fn plaintext_clients_are_seen_with_their_own_address() {
    let mut f = fixture(&[]);
    let outside = f.mesh.topo.add_outside_host("outside").unwrap();
    f.mesh.start().unwrap();
    for dst_ip in ips(&f.mesh, "echo2") {
        let dst = SocketAddr::new(dst_ip, APP_PORT);
        let own = if dst_ip.is_ipv6() {
            IpAddr::from(outside.ip6)
        } else {
            outside.ip.into()
        };
        // Held open, to find the application's socket: it carries the delivery mark, so it
        // was ztunnel that connected, from the client's address.
        let mut conn = connect(&outside.netns, dst).unwrap();
        conn.write_all(b"plain").unwrap();
        let mut buf = [0u8; 5];
        conn.read_exact(&mut buf).unwrap();
        let peer = *f.server(dst).peers().last().unwrap();
        assert_eq!(peer.ip(), own);
        let sockets = exec(
            &f.mesh.netns("echo2"),
            "ss",
            &["-tnHe", "state", "established"],
        )
        .unwrap();
        let sockets = String::from_utf8_lossy(&sockets.stdout).into_owned();
        let app_side = sockets
            .lines()
            .find(|l| l.contains(&format!(":{APP_PORT} ")) && l.contains(&peer.to_string()))
            .unwrap_or_else(|| panic!("no application socket for {peer}:\n{sockets}"));
        assert!(app_side.contains("fwmark:0x53a"), "{app_side}");
        // Never the client's own port: that 4-tuple is the steered connection's.
        assert_ne!(peer, conn.local_addr().unwrap());
    }
}

#[test]
fn loopback_option_delivers_from_127_0_0_6_and_leaves_routing_alone() {
    let mut f = fixture(&["--inbound-source", "loopback"]);
    let before = netns_state(&f.mesh.netns("echo2"));
    f.mesh.start().unwrap();
    for pod in ["echo2", "echo1"] {
        for dst_ip in ips(&f.mesh, pod) {
            let peer = f.peer_of_roundtrip("sleep", SocketAddr::new(dst_ip, APP_PORT));
            let want = if dst_ip.is_ipv6() { "::1" } else { "127.0.0.6" };
            assert_eq!(peer.ip().to_string(), want, "{pod} at {dst_ip}");
        }
    }
    assert_eq!(netns_state(&f.mesh.netns("echo2")), before);
}

/// Sends and reads back one message on an open echo connection.
fn exchange(conn: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    conn.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    conn.read_exact(&mut back)?;
    assert_eq!(back, msg);
    Ok(())
}

fn wait_state(netns: &str, want: &str, what: &str) {
    wait_until(Duration::from_secs(10), || netns_state(netns) == want).unwrap_or_else(|_| {
        panic!(
            "{what}: pod namespace not as it was\nbefore:\n{want}\nnow:\n{}",
            netns_state(netns)
        )
    });
}

#[test]
fn release_and_shutdown_leave_pod_namespaces_as_they_were() {
    let mut f = fixture(&[]);
    let echo_ns: Vec<String> = ["echo1", "echo2"].map(|p| f.mesh.netns(p)).into();
    let before: Vec<String> = echo_ns.iter().map(|ns| netns_state(ns)).collect();
    f.mesh.start().unwrap();
    for ns in &echo_ns {
        assert!(is_set_up(ns), "{}", netns_state(ns));
    }
    let sleep = f.mesh.netns("sleep");
    let sleep_ip = IpAddr::from(f.mesh.ip("sleep"));
    let dsts = ["echo1", "echo2"].map(|p| SocketAddr::new(f.mesh.ip(p).into(), APP_PORT));
    let mut open: Vec<TcpStream> = dsts.iter().map(|d| connect(&sleep, *d).unwrap()).collect();
    for conn in &mut open {
        exchange(conn, b"before").unwrap();
    }

    // Released: new connections are plain, the delivered ones keep working (their replies
    // still find their way back), and the set-up goes once they have ended.
    f.mesh.namespaces = vec![("default".into(), None)];
    f.mesh.write_config().unwrap();
    wait_until(Duration::from_secs(10), || {
        f.mesh
            .ztunnel("node2")
            .log()
            .contains("pod released from capture")
            && f.mesh
                .ztunnel("node1")
                .log()
                .matches("pod released")
                .count()
                == 2
    })
    .expect("pods not released");
    for conn in &mut open {
        exchange(conn, b"after release").unwrap();
    }
    for ns in &echo_ns {
        assert!(is_set_up(ns), "set-up removed under open connections");
    }
    open.clear();
    for (ns, want) in echo_ns.iter().zip(&before) {
        wait_state(ns, want, "after release");
    }
    // The pods' own networking: a direct connection, from the client's own address.
    for dst in dsts {
        let got = echo_roundtrip(&sleep, dst, b"plain".to_vec()).unwrap();
        assert_eq!(got, b"plainbye");
        assert_eq!(f.server(dst).peers().last().unwrap().ip(), sleep_ip);
    }

    // Enrolled again, then ztunnel stops: the same.
    f.mesh.namespaces = vec![("default".into(), Some("ambient".into()))];
    f.mesh.write_config().unwrap();
    for ns in &echo_ns {
        wait_until(Duration::from_secs(10), || is_set_up(ns)).expect("pod not enrolled again");
    }
    let peer = f.peer_of_roundtrip("sleep", dsts[1]);
    assert_eq!(peer.ip(), sleep_ip);
    for node in ["node1", "node2"] {
        let status = f
            .mesh
            .ztunnel(node)
            .terminate(Duration::from_secs(20))
            .unwrap();
        assert!(status.success(), "{node}: {status}");
    }
    for (ns, want) in echo_ns.iter().zip(&before) {
        assert_eq!(&netns_state(ns), want, "after ztunnel stopped");
    }
}

#[test]
fn an_upgrade_hands_the_set_up_over_and_the_last_ztunnel_removes_it() {
    let mut f = fixture(&[]);
    let echo2 = f.mesh.netns("echo2");
    let before = netns_state(&echo2);
    f.mesh.start().unwrap();
    let sleep = f.mesh.netns("sleep");
    let sleep_ip = IpAddr::from(f.mesh.ip("sleep"));
    let dst = SocketAddr::new(f.mesh.ip("echo2").into(), APP_PORT);
    let mut long_lived = connect(&sleep, dst).unwrap();
    exchange(&mut long_lived, b"before").unwrap();

    let mut old = f.mesh.upgrade_ztunnel("node2", 1).unwrap();
    // The old process still carries the long-lived connection; the new one takes new ones.
    exchange(&mut long_lived, b"during").unwrap();
    assert_eq!(f.peer_of_roundtrip("sleep", dst).ip(), sleep_ip);
    drop(long_lived);
    wait_until(Duration::from_secs(20), || old.exited().is_some())
        .expect("the old ztunnel did not exit once its connection ended");
    // Its exit undid nothing: the successor still delivers from client addresses.
    assert!(is_set_up(&echo2), "{}", netns_state(&echo2));
    assert_eq!(f.peer_of_roundtrip("sleep", dst).ip(), sleep_ip);

    let status = f
        .mesh
        .ztunnel("node2")
        .terminate(Duration::from_secs(20))
        .unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(
        netns_state(&echo2),
        before,
        "after the last ztunnel stopped"
    );
}

/// The kernel side alone, without a ztunnel: a delivery from another pod's address reaches
/// the application, whose reply comes back (no route out is used), the delivery never takes
/// the port the caller says is the client's, and dropping the set-up restores the pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transparent_delivery_avoids_the_client_port_and_its_set_up_is_undone() {
    require_root();
    let mut topo = Topology::new().unwrap();
    topo.add_node("node1").unwrap();
    let pod = topo.add_pod("node1", "server").unwrap();
    let client = topo.add_pod("node1", "client").unwrap();
    let before = netns_state(&pod.netns);
    // Two ephemeral ports: a pick that ignored the client's port would hit it half the time.
    let range = exec(
        &pod.netns,
        "sysctl",
        &["-qw", "net.ipv4.ip_local_port_range=40000 40001"],
    )
    .unwrap();
    assert!(range.status.success());

    let pin = std::path::PathBuf::from(format!("/sys/fs/bpf/{}-routing", topo.prefix()));
    let capture = Capture::load(None, &pin).expect("load capture programs");
    let ns = Arc::new(Netns::open(&netns_path(&pod.netns)).unwrap());
    let app_addr = SocketAddr::new(pod.ip.into(), 9090);
    let _app = AppServer::start(&pod.netns, "app", app_addr).unwrap();
    let routing = capture
        .source_routing()
        .acquire(&ns, &[pod.ip.into()])
        .unwrap();
    assert!(is_set_up(&pod.netns), "{}", netns_state(&pod.netns));

    // The application closes first (it answers HTTP and hangs up), so no TIME_WAIT holds the
    // port on the delivering side for the next round.
    for round in 0..6u16 {
        let (avoid, want) = (40000 + round % 2, 40001 - round % 2);
        let mut conn = tokio::time::timeout(
            Duration::from_secs(5),
            ns.deliver(app_addr, client.ip.into(), Some(avoid)),
        )
        .await
        .expect("no answer from the application")
        .unwrap();
        let from = SocketAddr::new(client.ip.into(), want);
        assert_eq!(conn.local_addr().unwrap(), from, "round {round}");
        tokio::io::AsyncWriteExt::write_all(&mut conn, b"GET / HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut conn, &mut answer)
            .await
            .unwrap();
        assert!(answer.contains(&format!("peer {from}")), "{answer}");
    }

    drop(routing);
    assert_eq!(netns_state(&pod.netns), before);
    capture.unpin();
}
