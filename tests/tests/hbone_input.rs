//! Hostile and mistaken peers on a pod's HBONE port, driven with real clients (curl, and an
//! HBONE client with real mTLS): each is refused with a clear log line, and tunnels from
//! well-behaved peers keep working.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use mesh_tests::mesh::{Mesh, PodSpec, tunnel, write_pem};
use mesh_tests::netns::exec;
use mesh_tests::traffic::{AppServer, echo_roundtrip};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztunnel::hbone::HboneError;
use ztunnel::identity::{Identity, LocalCa};

fn mesh() -> (Mesh, AppServer) {
    let pods = vec![
        PodSpec::new("sleep", "node1", "sleep"),
        PodSpec::new("echo1", "node1", "echo"),
        PodSpec::new("echo2", "node2", "echo"),
    ];
    let mut mesh = Mesh::new(&["node1", "node2"], pods, Vec::new()).unwrap();
    mesh.topo.add_outside_host("attacker").unwrap();
    let server = AppServer::start(&mesh.netns("echo2"), "echo2", app(&mesh, "echo2")).unwrap();
    mesh.start().unwrap();
    (mesh, server)
}

fn app(mesh: &Mesh, pod: &str) -> SocketAddr {
    SocketAddr::new(mesh.ip(pod).into(), 8080)
}

fn hbone(mesh: &Mesh, pod: &str) -> SocketAddr {
    SocketAddr::new(mesh.ip(pod).into(), 15008)
}

fn id(s: &str) -> Identity {
    s.parse().unwrap()
}

fn curl_with_cert(mesh: &Mesh, cert: &(PathBuf, PathBuf), url: &str) -> (bool, String) {
    let out = exec(
        &mesh.topo.pod("attacker").netns,
        "curl",
        &[
            "-sS",
            "-k",
            "--http2",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--cert",
            cert.0.to_str().unwrap(),
            "--key",
            cert.1.to_str().unwrap(),
            url,
        ],
    )
    .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn certificates_from_another_trust_domain_expired_or_plain_http2_are_refused() {
    let (mut mesh, _server) = mesh();
    let dir = mesh.dir.path().to_owned();
    let url = format!("https://{}/", hbone(&mesh, "echo2"));

    // A valid mesh certificate, but a plain HTTP/2 GET instead of CONNECT: 405.
    let good = mesh
        .ca()
        .sign(
            &id("spiffe://cluster.local/ns/default/sa/sleep"),
            Duration::from_secs(600),
        )
        .unwrap();
    let good = write_pem(&dir, "good", &good).unwrap();
    assert_eq!(curl_with_cert(&mesh, &good, &url), (true, "405".to_owned()));

    // Another trust domain's CA.
    let evil_ca = LocalCa::load_or_create(&dir.join("evil-ca"), "evil.local").unwrap();
    let evil = evil_ca
        .sign(
            &id("spiffe://evil.local/ns/default/sa/sleep"),
            Duration::from_secs(600),
        )
        .unwrap();
    let evil = write_pem(&dir, "evil", &evil).unwrap();
    let (ok, _) = curl_with_cert(&mesh, &evil, &url);
    assert!(!ok, "a certificate from another CA was accepted");

    // The mesh's CA, but expired.
    let now = SystemTime::now();
    let expired = mesh
        .ca()
        .sign_with_validity(
            &id("spiffe://cluster.local/ns/default/sa/sleep"),
            now - Duration::from_secs(7200),
            now - Duration::from_secs(3600),
        )
        .unwrap();
    let expired = write_pem(&dir, "expired", &expired).unwrap();
    let (ok, _) = curl_with_cert(&mesh, &expired, &url);
    assert!(!ok, "an expired certificate was accepted");

    let z = mesh.ztunnel("node2");
    z.wait_for_log("HBONE connection rejected", Duration::from_secs(5))
        .unwrap();
    let log = z.log();
    assert!(
        log.contains("certificate expired") || log.contains("expired"),
        "{log}"
    );

    // Well-behaved traffic is unaffected.
    let got = echo_roundtrip(&mesh.netns("sleep"), app(&mesh, "echo2"), b"ok".to_vec()).unwrap();
    assert_eq!(got, b"okbye");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_for_an_address_that_is_not_this_pod_is_answered_400() {
    let (mut mesh, server) = mesh();
    let cert = mesh
        .ca()
        .sign(
            &id("spiffe://cluster.local/ns/default/sa/sleep"),
            Duration::from_secs(600),
        )
        .unwrap();
    let echo = id("spiffe://cluster.local/ns/default/sa/echo");

    // Control: the right authority gets a working tunnel.
    let mut ok = tunnel(
        &mesh,
        "attacker",
        &cert,
        echo.clone(),
        hbone(&mesh, "echo2"),
        app(&mesh, "echo2"),
    )
    .await
    .expect("valid tunnel");
    ok.write_all(b"hello").await.unwrap();
    ok.shutdown().await.unwrap();
    let mut back = Vec::new();
    ok.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"hellobye");
    assert_eq!(server.peers().len(), 1);

    // echo2's HBONE port asked to reach echo1 (another node's pod): 400.
    let err = tunnel(
        &mesh,
        "attacker",
        &cert,
        echo.clone(),
        hbone(&mesh, "echo2"),
        app(&mesh, "echo1"),
    )
    .await
    .expect_err("tunnel to another pod's address accepted");
    assert!(
        matches!(err, HboneError::Status(s) if s == http::StatusCode::BAD_REQUEST),
        "{err}"
    );
    mesh.ztunnel("node2")
        .wait_for_log("HBONE authority is not this pod", Duration::from_secs(5))
        .unwrap();

    // A server that does not prove the expected identity is refused by the client side.
    let err = tunnel(
        &mesh,
        "attacker",
        &cert,
        id("spiffe://cluster.local/ns/default/sa/other"),
        hbone(&mesh, "echo2"),
        app(&mesh, "echo2"),
    )
    .await
    .expect_err("server with the wrong identity accepted");
    assert!(err.to_string().contains("expected"), "{err}");
    assert_eq!(server.peers().len(), 1);
}
