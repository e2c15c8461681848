//! Faults and hostile peers around the L4 path: resets and half-closes pass through the
//! tunnel as they happened, a connection the mesh refuses is reset (not ended), a dead peer
//! ztunnel is noticed at once, a client that never completes its handshake is cut off, and
//! an HTTP/2 rapid-reset flood is bounded, while other tunnels keep flowing.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use mesh_tests::mesh::{Mesh, PodSpec, mtls_connect};
use mesh_tests::netns::in_netns;
use mesh_tests::operator::connections;
use mesh_tests::traffic::{AppServer, connect, echo_roundtrip, first_read, is_reset};

fn mesh(extra_args: &[&str]) -> (Mesh, AppServer) {
    let pods = vec![
        PodSpec::new("sleep", "node1", "sleep"),
        PodSpec::new("local", "node1", "echo"),
        PodSpec::new("echo", "node2", "echo"),
    ];
    let mut mesh = Mesh::new(&["node1", "node2"], pods, Vec::new()).unwrap();
    mesh.topo.add_outside_host("attacker").unwrap();
    mesh.ztunnel_args = extra_args.iter().map(|a| a.to_string()).collect();
    let echo = AppServer::start(&mesh.netns("echo"), "echo", addr(&mesh, "echo", 8080)).unwrap();
    mesh.start().unwrap();
    (mesh, echo)
}

fn addr(mesh: &Mesh, pod: &str, port: u16) -> SocketAddr {
    SocketAddr::new(mesh.ip(pod).into(), port)
}

/// A server in `netns` that, for each connection, runs `f` on it in its own thread.
fn serve(netns: &str, at: SocketAddr, f: impl Fn(TcpStream) + Send + Sync + 'static) {
    let listener = in_netns(netns, move || TcpListener::bind(at))
        .unwrap()
        .unwrap();
    let f = std::sync::Arc::new(f);
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let f = f.clone();
            std::thread::spawn(move || f(conn));
        }
    });
}

fn is_prompt_end(r: &std::io::Result<usize>) -> bool {
    !matches!(r, Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut))
}

#[test]
fn a_server_reset_reaches_the_client_as_a_reset() {
    let (mesh, _echo) = mesh(&[]);
    // Reads what arrives, then closes with a zero linger: an RST.
    fn resetter(mut conn: TcpStream) {
        let mut buf = [0u8; 5];
        let _ = conn.read_exact(&mut buf);
        let _ = socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO));
    }
    for pod in ["echo", "local"] {
        serve(&mesh.netns(pod), addr(&mesh, pod, 9000), resetter);
        let mut conn = connect(&mesh.netns("sleep"), addr(&mesh, pod, 9000)).unwrap();
        conn.write_all(b"hello").unwrap();
        let mut buf = [0u8; 16];
        let got = conn.read(&mut buf);
        assert!(
            matches!(&got, Err(e) if e.kind() == ErrorKind::ConnectionReset),
            "via {pod}: expected a reset, got {got:?}"
        );
    }
}

#[test]
fn a_connection_denied_by_policy_is_reset_not_ended() {
    let pods = vec![
        PodSpec::new("sleep", "node1", "sleep"),
        PodSpec::new("local", "node1", "echo"),
        PodSpec::new("echo", "node2", "echo"),
        // Not in the mesh: its connections arrive in plaintext, on the destination's 15006.
        PodSpec {
            protocol: "TCP".to_owned(),
            ..PodSpec::new("outsider", "node1", "outsider")
        },
    ];
    let mut mesh = Mesh::new(&["node1", "node2"], pods, Vec::new()).unwrap();
    // Neither sleep nor the outsider may reach port 9100 of the pods of `default`; anyone
    // else may.
    let outsider = mesh.ip("outsider");
    mesh.policies = format!(
        "  - name: deny-sleep-9100\n    namespace: default\n    scope: Namespace\n    action: Deny\n    rules:\n      - - - principals:\n              - Exact: cluster.local/ns/default/sa/sleep\n        - - destinationPorts: [9100]\n  - name: deny-outsider-9100\n    namespace: default\n    scope: Namespace\n    action: Deny\n    rules:\n      - - - sourceIps: [\"{outsider}/32\"]\n        - - destinationPorts: [9100]\n"
    );
    let servers = ["echo", "local"]
        .map(|pod| AppServer::start(&mesh.netns(pod), pod, addr(&mesh, pod, 9100)).unwrap());
    mesh.start().unwrap();
    let sleep = mesh.netns("sleep");
    // Through a tunnel (the destination's ztunnel answers 401) and on the same node (the
    // policy applied by node1 itself): the client reads ECONNRESET, which a server that
    // accepted and closed would not produce.
    for ((pod, path), server) in [("echo", "hbone-out"), ("local", "same-node")]
        .into_iter()
        .zip(&servers)
    {
        // A client waiting for the server to speak first, and one that speaks first.
        let got = first_read(&sleep, addr(&mesh, pod, 9100));
        assert!(
            is_reset(&got),
            "denied via {pod}, silent client: got {got:?}"
        );
        let got = echo_roundtrip(&sleep, addr(&mesh, pod, 9100), b"hello".to_vec());
        assert!(
            is_reset(&got),
            "denied via {pod}, talking client: got {got:?}"
        );
        assert_eq!(server.peers(), Vec::new(), "{pod}: the application saw it");
        let denied = connections(&mesh, "node1", |c| {
            c["state"] == "denied" && c["path"] == path
        });
        assert_eq!(denied.len(), 2, "{pod}: {denied:?}");
    }
    // Plaintext from outside the mesh, denied by the destination pod's ztunnel (node2's for
    // echo, node1's for local): reset as well.
    let outside = mesh.netns("outsider");
    for ((pod, node), server) in [("echo", "node2"), ("local", "node1")]
        .into_iter()
        .zip(&servers)
    {
        let got = first_read(&outside, addr(&mesh, pod, 9100));
        assert!(is_reset(&got), "plaintext denied at {pod}: got {got:?}");
        assert_eq!(server.peers(), Vec::new(), "{pod}: the application saw it");
        let denied = connections(&mesh, node, |c| {
            c["state"] == "denied" && c["path"] == "plaintext-in"
        });
        assert_eq!(denied.len(), 1, "{pod}: {denied:?}");
    }
    // The servers are there: a client the policy does not name reaches one.
    assert_eq!(
        echo_roundtrip(
            &mesh.netns("local"),
            addr(&mesh, "echo", 9100),
            b"hi".to_vec()
        )
        .unwrap(),
        b"hibye"
    );
}

#[test]
fn a_server_half_close_reaches_the_client_and_the_client_can_still_send() {
    let (mesh, _echo) = mesh(&[]);
    // Says hello, half-closes, then reports what it received after that.
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let tx = std::sync::Mutex::new(tx);
    serve(
        &mesh.netns("echo"),
        addr(&mesh, "echo", 9001),
        move |mut conn| {
            let _ = conn.write_all(b"hello");
            let _ = conn.shutdown(Shutdown::Write);
            let mut rest = Vec::new();
            let _ = conn.read_to_end(&mut rest);
            let _ = tx.lock().map(|tx| tx.send(rest));
        },
    );
    let mut conn = connect(&mesh.netns("sleep"), addr(&mesh, "echo", 9001)).unwrap();
    let mut greeting = Vec::new();
    conn.read_to_end(&mut greeting).unwrap();
    assert_eq!(
        greeting, b"hello",
        "server half-close not seen as EOF after the data"
    );
    conn.write_all(b"after your FIN").unwrap();
    conn.shutdown(Shutdown::Write).unwrap();
    let got = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("server did not hear the client's end");
    assert_eq!(got, b"after your FIN");
}

#[test]
fn a_killed_peer_ztunnel_ends_tunnels_promptly() {
    let (mut mesh, _echo) = mesh(&[]);
    let mut conn = connect(&mesh.netns("sleep"), addr(&mesh, "echo", 8080)).unwrap();
    conn.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    conn.read_exact(&mut buf).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();

    mesh.ztunnel("node2").kill();
    // The tunnel's TCP connection is closed by the kernel with the process: the client
    // hears of it at once, instead of hanging until a timeout.
    let got = conn.read(&mut buf);
    assert!(is_prompt_end(&got), "client left hanging: {got:?}");
    if let Ok(n) = got {
        assert_eq!(n, 0, "unexpected data");
    }
}

#[test]
fn a_client_that_never_finishes_its_handshake_is_cut_off() {
    let (mut mesh, _echo) = mesh(&["--handshake-timeout-secs", "1"]);
    let attacker = mesh.topo.pod("attacker").netns.clone();
    let hbone = addr(&mesh, "echo", 15008);
    // One sends nothing; one sends the first bytes of a TLS record and stalls.
    let mut silent = connect(&attacker, hbone).unwrap();
    let mut partial = connect(&attacker, hbone).unwrap();
    partial.write_all(&[0x16, 0x03, 0x01, 0x02]).unwrap();
    for conn in [&mut silent, &mut partial] {
        conn.set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let mut buf = [0u8; 64];
        let got = conn.read(&mut buf);
        assert!(is_prompt_end(&got), "stalled handshake kept open: {got:?}");
    }
    // Logged just after the close the client saw.
    mesh.ztunnel("node2")
        .wait_for_log("TLS handshake timed out", Duration::from_secs(10))
        .unwrap();
    // Meanwhile tunnels work.
    let got = echo_roundtrip(
        &mesh.netns("sleep"),
        addr(&mesh, "echo", 8080),
        b"ok".to_vec(),
    );
    assert_eq!(got.unwrap(), b"okbye");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_rapid_reset_flood_is_cut_off_and_others_keep_flowing() {
    let (mesh, echo) = mesh(&[]);
    let client = mesh
        .ca()
        .sign(
            &"spiffe://cluster.local/ns/default/sa/sleep"
                .parse()
                .unwrap(),
            Duration::from_secs(600),
        )
        .unwrap();
    let server_id: ztunnel::identity::Identity =
        "spiffe://cluster.local/ns/default/sa/echo".parse().unwrap();
    let hbone = addr(&mesh, "echo", 15008);
    let tls = mtls_connect(&mesh, "attacker", &client, server_id, hbone)
        .await
        .unwrap();
    let (send, connection) = h2::client::handshake(tls).await.unwrap();
    let driver = tokio::spawn(connection);

    // Open CONNECT streams and cancel each at once (RST_STREAM), as fast as possible.
    let mut send = send;
    let mut cut_off = false;
    for _ in 0..20_000 {
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(format!("{}", addr(&mesh, "echo", 8080)))
            .body(())
            .unwrap();
        let Ok(ready) = send.ready().await else {
            cut_off = true;
            break;
        };
        send = ready;
        match send.send_request(req, false) {
            Ok((response, stream)) => {
                drop(response);
                drop(stream);
            }
            Err(_) => {
                cut_off = true;
                break;
            }
        }
    }
    assert!(cut_off, "20,000 reset streams were all accepted");
    let _ = tokio::time::timeout(Duration::from_secs(10), driver).await;

    // The flood left ztunnel serving: a tunnel still works.
    let sleep = mesh.netns("sleep");
    let target = addr(&mesh, "echo", 8080);
    let got = tokio::task::spawn_blocking(move || echo_roundtrip(&sleep, target, b"ok".to_vec()))
        .await
        .unwrap();
    assert_eq!(got.unwrap(), b"okbye");
    assert!(!echo.peers().is_empty());
}

/// Replaces node2's forwarding filter with `rule` (nft rule words), or removes it.
fn node2_filter(mesh: &Mesh, rule: Option<&[&str]>) {
    let ns = mesh.topo.node("node2").netns.clone();
    let nft = |args: &[&str]| {
        let out = mesh_tests::netns::exec(&ns, "nft", args).unwrap();
        assert!(
            out.status.success(),
            "nft {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let _ = mesh_tests::netns::exec(&ns, "nft", &["delete", "table", "inet", "faults"]);
    if let Some(rule) = rule {
        nft(&["add", "table", "inet", "faults"]);
        nft(&[
            "add", "chain", "inet", "faults", "links", "{", "type", "filter", "hook", "forward",
            "priority", "0", ";", "}",
        ]);
        let mut add = vec!["add", "rule", "inet", "faults", "links"];
        add.extend_from_slice(rule);
        nft(&add);
    }
}

#[test]
fn a_lossy_then_dead_link_fails_tunnels_cleanly_and_they_recover() {
    let (mesh, _echo) = mesh(&["--connect-timeout-secs", "4"]);
    let sleep = mesh.netns("sleep");
    let dst = addr(&mesh, "echo", 8080);
    let data = mesh_tests::traffic::payload(256 * 1024, 5);
    // A pooled tunnel connection exists before the link degrades.
    assert_eq!(
        echo_roundtrip(&sleep, dst, b"warm".to_vec()).unwrap(),
        b"warmbye"
    );

    // A fifth of the packets between the nodes lost: TCP under the tunnel retransmits.
    node2_filter(
        &mesh,
        Some(&["numgen", "random", "mod", "10", "<", "2", "drop"]),
    );
    let got = echo_roundtrip(&sleep, dst, data.clone()).unwrap();
    assert!(got.len() == data.len() + 3 && got[..data.len()] == data[..]);

    // Nothing gets through: a new connection ends promptly instead of hanging.
    node2_filter(&mesh, Some(&["drop"]));
    let mut conn = connect(&sleep, dst).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let _ = conn.write_all(b"lost");
    let mut buf = [0u8; 8];
    let got = conn.read(&mut buf);
    assert!(
        is_prompt_end(&got),
        "tunnel over a dead link left hanging: {got:?}"
    );
    assert!(!matches!(got, Ok(n) if n > 0), "data through a dead link?");

    // The link comes back: so do tunnels.
    node2_filter(&mesh, None);
    mesh_tests::wait_until(
        Duration::from_secs(30),
        || matches!(echo_roundtrip(&sleep, dst, b"back".to_vec()), Ok(ref g) if g == b"backbye"),
    )
    .expect("tunnels did not recover after the link came back");
}

#[test]
fn concurrent_connects_to_a_black_holed_node_all_fail_within_the_connect_timeout() {
    const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
    const CLIENTS: usize = 100;
    let (mesh, _echo) = mesh(&["--connect-timeout-secs", "2"]);
    let sleep = mesh.netns("sleep");
    let dst = addr(&mesh, "echo", 8080);
    // No tunnel to node2 exists yet, and nothing gets through to it: every tunnel needs a
    // dial, and each dial waits for an answer that never comes.
    node2_filter(&mesh, Some(&["drop"]));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let sleep = sleep.clone();
            std::thread::spawn(move || {
                let started = std::time::Instant::now();
                let got = connect(&sleep, dst).and_then(|mut conn| {
                    // Far beyond the bound, so that a slow failure is measured, not cut.
                    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
                    let _ = conn.write_all(b"lost");
                    let mut buf = [0u8; 8];
                    conn.read(&mut buf)
                });
                (started.elapsed(), got)
            })
        })
        .collect();
    let ended: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let mut took: Vec<_> = ended.iter().map(|(elapsed, _)| *elapsed).collect();
    took.sort();
    let bound = CONNECT_TIMEOUT + Duration::from_secs(1);
    let late = took.iter().filter(|t| **t > bound).count();
    eprintln!(
        "{CLIENTS} connects to a black-holed node ended after {:?} (fastest), {:?} (median), \
         {:?} (slowest); {late} after more than {bound:?}",
        took[0],
        took[CLIENTS / 2],
        took[CLIENTS - 1]
    );
    assert_eq!(
        late,
        0,
        "{late} of {CLIENTS} connects took longer than {bound:?}; the slowest {:?}",
        took[CLIENTS - 1]
    );
    for (elapsed, got) in &ended {
        assert!(
            is_prompt_end(got) && !matches!(got, Ok(n) if *n > 0),
            "a connection to a black-holed node: {got:?} after {elapsed:?}"
        );
    }
    // Each ended as a tunnel that could not be opened, its reason the connect timeout.
    let failed = connections(&mesh, "node1", |c| {
        c["state"] == "failed"
            && c["path"] == "hbone-out"
            && c["reason"]
                .as_str()
                .is_some_and(|r| r.contains("did not answer within 2s"))
    });
    assert_eq!(failed.len(), CLIENTS, "{failed:?}");
    // The failed dial left nothing behind: once the node is reachable, tunnels open.
    node2_filter(&mesh, None);
    mesh_tests::wait_until(
        Duration::from_secs(30),
        || matches!(echo_roundtrip(&sleep, dst, b"back".to_vec()), Ok(ref g) if g == b"backbye"),
    )
    .expect("no tunnel once the node was reachable again");
}
