//! ztunnel's side of waypoints, end to end: a service labelled `istio.io/use-waypoint` is
//! carried over HBONE to its waypoint (here a stand-in HBONE server written with the
//! library, in a pod the mesh does not capture), with the client's identity, the VIP as
//! authority and the client in `forwarded`; a waypoint with no endpoint fails closed (reset,
//! nothing reaches the server, logged and counted); a service opting out with `none`, and a
//! pod addressed directly, keep the L4 path.
//!
//! node1: sleep, echo (so the same-node shortcut would be available); node2: the waypoint
//! pod `wp` (service `wp`, identity sa/wp, `istio.io/dataplane-mode: none`). Namespace
//! `default` is labelled `istio.io/use-waypoint: wp`. Services, all on echo's 8080:
//! `echo` (labelled `wp`), `direct` (labelled `none`), `inherits` (no label: the
//! namespace's), `broken` (labelled `gone`, a waypoint service without endpoints).
//!
//! And the destination side: echo's ztunnel believes `forwarded` from echo's waypoint (for
//! policy and delivery), and from no other identity.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_tests::mesh::{Mesh, PodSpec, ServiceSpec};
use mesh_tests::netns::in_netns;
use mesh_tests::operator::{sample, scrape};
use mesh_tests::traffic::{AppServer, echo_roundtrip, first_read, is_reset};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztunnel::identity::Identity;

const APP_PORT: u16 = 8080;
const SLEEP_ID: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const USE_WAYPOINT: &str = "istio.io/use-waypoint";

fn vip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 100, n)
}

/// What the stand-in waypoint saw of one CONNECT.
#[derive(Debug, Clone)]
struct Seen {
    authority: SocketAddr,
    peer: String,
    forwarded: Option<String>,
}

/// A stand-in waypoint: HBONE on the pod's 15008 with the waypoint's certificate, recording
/// each CONNECT and echoing the tunnel's bytes (then `bye` after the client half-closes).
struct StandIn {
    seen: Arc<Mutex<Vec<Seen>>>,
    _rt: tokio::runtime::Runtime,
}

impl StandIn {
    fn start(mesh: &Mesh, pod: &str, identity: &Identity) -> StandIn {
        let ca = mesh.ca();
        let cert = ca
            .sign(identity, Duration::from_secs(3600))
            .expect("waypoint certificate");
        let tls = ztunnel::tls::server_config(&cert, &ca.roots()).expect("server TLS");
        let addr = SocketAddr::new(mesh.ip(pod).into(), 15008);
        let listener = in_netns(&mesh.netns(pod), move || std::net::TcpListener::bind(addr))
            .expect("enter the waypoint pod")
            .expect("bind the waypoint's 15008");
        listener.set_nonblocking(true).expect("non-blocking");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
                let record = record.clone();
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(peer) = ztunnel::tls::peer_identity(stream.get_ref().1) else {
                        return;
                    };
                    let config = ztunnel::hbone::ServerConfig::default();
                    let _ = ztunnel::hbone::serve(stream, peer, &config, move |accepted| {
                        let record = record.clone();
                        async move {
                            let forwarded = accepted
                                .headers
                                .get("forwarded")
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned);
                            if let Ok(mut seen) = record.lock() {
                                seen.push(Seen {
                                    authority: accepted.authority,
                                    peer: accepted.peer_identity.to_string(),
                                    forwarded,
                                });
                            }
                            if let Ok(mut tunnel) = accepted.responder.accept() {
                                echo(&mut tunnel).await;
                            }
                        }
                    })
                    .await;
                });
            }
        });
        StandIn { seen, _rt: rt }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

async fn echo(tunnel: &mut ztunnel::hbone::H2Stream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tunnel.read(&mut buf).await {
            Ok(0) => {
                let _ = tunnel.write_all(b"bye").await;
                let _ = tunnel.shutdown().await;
                return;
            }
            Ok(n) => {
                if tunnel.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

struct Fixture {
    mesh: Mesh,
    echo: AppServer,
    waypoint: StandIn,
}

fn fixture() -> Fixture {
    fixture_with_policies(|_| String::new())
}

/// The fixture with the policies (YAML under `policies:`) `policies` writes for its mesh.
fn fixture_with_policies(policies: impl FnOnce(&Mesh) -> String) -> Fixture {
    let mut echo = PodSpec::new("echo", "node1", "echo");
    for svc in ["echo", "direct", "inherits", "broken"] {
        echo = echo.service(svc, 80, APP_PORT);
    }
    let mut wp = PodSpec::new("wp", "node2", "wp").service("wp", 15008, 15008);
    // A waypoint is not captured itself.
    wp.labels
        .push(("istio.io/dataplane-mode".into(), "none".into()));
    let pods = vec![PodSpec::new("sleep", "node1", "sleep"), echo, wp];
    let service = |name: &str, n: u8, port: u16| ServiceSpec {
        name: name.into(),
        namespace: "default".into(),
        vip: vip(n),
        vip6: None,
        ports: vec![(port, if port == 80 { APP_PORT } else { port })],
    };
    let services = vec![
        service("echo", 1, 80),
        service("direct", 2, 80),
        service("inherits", 3, 80),
        service("broken", 4, 80),
        service("wp", 5, 15008),
        service("gone", 6, 15008),
    ];
    let mut mesh = Mesh::new(&["node1", "node2"], pods, services).unwrap();
    mesh.policies = policies(&mesh);
    mesh.namespace_labels
        .push(("default".into(), USE_WAYPOINT.into(), "wp".into()));
    for (svc, value) in [("echo", "wp"), ("direct", "none"), ("broken", "gone")] {
        mesh.service_labels
            .push((svc.into(), USE_WAYPOINT.into(), value.into()));
    }
    let echo_addr = SocketAddr::new(mesh.ip("echo").into(), APP_PORT);
    let echo = AppServer::start(&mesh.netns("echo"), "echo", echo_addr).unwrap();
    let wp_id = Identity::new("cluster.local", "default", "wp").unwrap();
    let waypoint = StandIn::start(&mesh, "wp", &wp_id);
    mesh.start().unwrap();
    Fixture {
        mesh,
        echo,
        waypoint,
    }
}

#[test]
fn a_service_with_a_waypoint_is_carried_to_it() {
    let f = fixture();
    let sleep = f.mesh.netns("sleep");
    let dst = SocketAddr::new(vip(1).into(), 80);
    let got = echo_roundtrip(&sleep, dst, b"to the waypoint".to_vec()).unwrap();
    assert_eq!(got, b"to the waypointbye");
    let seen = f.waypoint.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].authority, dst);
    assert_eq!(seen[0].peer, SLEEP_ID);
    let forwarded = seen[0].forwarded.clone().unwrap_or_default();
    let client = format!("for=\"{}:", f.mesh.ip("sleep"));
    assert!(
        forwarded.starts_with(&client)
            && forwarded.ends_with(";host=echo.default.svc.cluster.local"),
        "forwarded: {forwarded:?}"
    );
    // Not around the waypoint, and not short-circuited to echo on the same node.
    assert!(f.echo.peers().is_empty(), "{:?}", f.echo.peers());
}

#[test]
fn a_waypoint_without_endpoints_fails_closed() {
    let mut f = fixture();
    let sleep = f.mesh.netns("sleep");
    let dst = SocketAddr::new(vip(4).into(), 80);
    let got = first_read(&sleep, dst);
    assert!(is_reset(&got), "expected a reset, got {got:?}");
    // Nor with bytes sent first.
    let got = echo_roundtrip(&sleep, dst, b"must not arrive".to_vec());
    assert!(is_reset(&got), "expected a reset, got {got:?}");
    assert!(f.echo.peers().is_empty(), "{:?}", f.echo.peers());
    assert!(f.waypoint.seen().is_empty());
    let reason = "waypoint default/gone.default.svc.cluster.local of \
        default/broken.default.svc.cluster.local is unavailable (no healthy endpoint)";
    f.mesh
        .ztunnel("node1")
        .wait_for_log(
            &format!("outbound connection failed: {reason}"),
            Duration::from_secs(5),
        )
        .unwrap();
    let metrics = scrape(&f.mesh, "node1");
    let rejected = sample(
        &metrics,
        "ztunnel_rejected_inputs_total",
        &[("reason", "waypoint_unavailable")],
    );
    assert_eq!(rejected, 2, "{metrics}");
}

#[test]
fn none_opts_a_service_out_of_its_namespace_waypoint() {
    let f = fixture();
    let sleep = f.mesh.netns("sleep");
    // `direct` opted out: L4 to echo.
    let got = echo_roundtrip(&sleep, SocketAddr::new(vip(2).into(), 80), b"l4".to_vec()).unwrap();
    assert_eq!(got, b"l4bye");
    assert_eq!(f.echo.peers().len(), 1);
    assert!(f.waypoint.seen().is_empty());
    // `inherits` has no label of its own: the namespace's waypoint.
    let dst = SocketAddr::new(vip(3).into(), 80);
    let got = echo_roundtrip(&sleep, dst, b"ns".to_vec()).unwrap();
    assert_eq!(got, b"nsbye");
    let seen = f.waypoint.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].authority, dst);
    let forwarded = seen[0].forwarded.clone().unwrap_or_default();
    assert!(
        forwarded.ends_with(";host=inherits.default.svc.cluster.local"),
        "{forwarded:?}"
    );
    assert_eq!(f.echo.peers().len(), 1);
}

#[test]
fn a_pod_addressed_directly_keeps_the_l4_path() {
    let f = fixture();
    let sleep = f.mesh.netns("sleep");
    let dst = SocketAddr::new(f.mesh.ip("echo").into(), APP_PORT);
    let mut conn = mesh_tests::traffic::connect(&sleep, dst).unwrap();
    conn.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    assert!(answer.contains("hello from echo"), "{answer}");
    assert_eq!(f.echo.peers().len(), 1);
    assert!(f.waypoint.seen().is_empty(), "{:?}", f.waypoint.seen());
}

#[test]
fn the_destination_believes_forwarded_only_from_its_waypoint() {
    // Only sleep's address may reach echo's 8080.
    let policies = "  - name: allow-sleep\n    namespace: default\n    scope: Namespace\n    action: Allow\n    rules:\n      - - - sourceIps: [\"SLEEP/32\"]\n";
    let f = fixture_with_policies(|mesh| policies.replace("SLEEP", &mesh.ip("sleep").to_string()));
    let sleep_ip = f.mesh.ip("sleep");
    let echo_id: Identity = "spiffe://cluster.local/ns/default/sa/echo".parse().unwrap();
    let hbone = SocketAddr::new(f.mesh.ip("echo").into(), 15008);
    let dst = SocketAddr::new(f.mesh.ip("echo").into(), APP_PORT);
    let claim = format!("for=\"{sleep_ip}:4444\"");
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Sends the CONNECT as `sa` and returns its status with the open stream: the tunnel stays
    // up until the caller drops it (a stream dropped at once may end before the delivery).
    let status_as = |sa: &str| {
        let id: Identity = format!("spiffe://cluster.local/ns/default/sa/{sa}")
            .parse()
            .unwrap();
        let cert = f.mesh.ca().sign(&id, Duration::from_secs(600)).unwrap();
        rt.block_on(async {
            let tls = mesh_tests::mesh::mtls_connect(&f.mesh, "wp", &cert, echo_id.clone(), hbone)
                .await
                .unwrap();
            let (send, connection) = h2::client::handshake(tls).await.unwrap();
            tokio::spawn(connection);
            let mut send = send.ready().await.unwrap();
            let req = http::Request::builder()
                .method(http::Method::CONNECT)
                .uri(dst.to_string())
                .header("forwarded", &claim)
                .body(())
                .unwrap();
            let (response, stream) = send.send_request(req, false).unwrap();
            let status = response.await.unwrap().status().as_u16();
            (status, stream, send)
        })
    };
    // Another identity from the same address claiming sleep: judged by its own address.
    assert_eq!(status_as("other").0, 401);
    assert!(f.echo.peers().is_empty(), "{:?}", f.echo.peers());
    // The waypoint's identity: the claim is believed, and the delivery comes from sleep.
    let (status, _tunnel, _connection) = status_as("wp");
    assert_eq!(status, 200);
    mesh_tests::wait_until(Duration::from_secs(5), || !f.echo.peers().is_empty())
        .unwrap_or_else(|e| panic!("no delivery: {e}"));
    let peers = f.echo.peers();
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(peers[0].ip(), std::net::IpAddr::from(sleep_ip), "{peers:?}");
    let admitted = mesh_tests::operator::connections(&f.mesh, "node1", |c| {
        c["path"] == "hbone-in" && c["policy"] == "allow"
    });
    assert_eq!(admitted.len(), 1, "{admitted:?}");
    assert_eq!(
        admitted[0]["src"],
        format!("{sleep_ip}:4444"),
        "{}",
        admitted[0]
    );
    assert_eq!(
        admitted[0]["src_workload"], "default/sleep",
        "{}",
        admitted[0]
    );
}
