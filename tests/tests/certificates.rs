//! Workload certificates are rotated before they expire, while traffic flows: connections
//! opened long after the first certificate expired still complete a fresh mTLS handshake.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use mesh_tests::mesh::{Mesh, PodSpec, tunnel};
use mesh_tests::traffic::{AppServer, connect, echo_roundtrip};
use mesh_tests::wait_until;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_and_traffic_keeps_flowing() {
    let pods = vec![
        PodSpec::new("sleep", "node1", "sleep"),
        PodSpec::new("echo", "node2", "echo"),
    ];
    let mut mesh = Mesh::new(&["node1", "node2"], pods, Vec::new()).unwrap();
    mesh.topo.add_outside_host("probe").unwrap();
    // 4 s certificates: renewed every 2 s.
    mesh.ztunnel_args = vec!["--cert-ttl-secs".into(), "4".into()];
    let app = SocketAddr::new(mesh.ip("echo").into(), 8080);
    let _server = AppServer::start(&mesh.netns("echo"), "echo", app).unwrap();
    mesh.start().unwrap();

    let sleep = mesh.netns("sleep");
    let mut long_lived = connect(&sleep, app).unwrap();
    long_lived.write_all(b"one").unwrap();
    let mut buf = [0u8; 3];
    long_lived.read_exact(&mut buf).unwrap();

    // Two renewals on each side: the first certificates have expired by then.
    for node in ["node1", "node2"] {
        let z = mesh.ztunnel(node);
        wait_until(Duration::from_secs(20), || {
            z.log().matches("certificate renewed").count() >= 2
        })
        .unwrap_or_else(|_| panic!("{node}: certificates not renewed:\n{}", z.log()));
    }

    // A fresh handshake with echo's ztunnel succeeds: it presents a valid (renewed) certificate.
    let client = mesh
        .ca()
        .sign(
            &"spiffe://cluster.local/ns/default/sa/sleep"
                .parse()
                .unwrap(),
            Duration::from_secs(600),
        )
        .unwrap();
    let hbone = SocketAddr::new(mesh.ip("echo").into(), 15008);
    let mut t = tunnel(
        &mesh,
        "probe",
        &client,
        "spiffe://cluster.local/ns/default/sa/echo".parse().unwrap(),
        hbone,
        app,
    )
    .await
    .expect("handshake with a renewed certificate");
    t.write_all(b"fresh").await.unwrap();
    t.shutdown().await.unwrap();
    let mut back = Vec::new();
    t.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"freshbye");

    // Captured traffic: new connections work, the old one is still alive.
    let got = echo_roundtrip(&sleep, app, b"new".to_vec()).unwrap();
    assert_eq!(got, b"newbye");
    long_lived.write_all(b"two").unwrap();
    long_lived.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"two");
}
