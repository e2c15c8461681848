//! Issue 14: the Istio CA goes away. Two ztunnels take short-lived workload certificates
//! from an in-process Istio CA (`CreateCertificate` over gRPC on the fabric, istiod's port
//! 15012), which is then stopped:
//!
//! - while the certificates are valid, tunnels keep working, new connections too;
//! - the outage shows: failed renewals in `ztunnel_certificate_requests_total` and the log;
//! - once a certificate has expired, new connections fail closed at once (reset before any
//!   byte; never passed through in plaintext), on the client's node and on the server's, and
//!   each ztunnel says why (log, `/connections`, `ztunnel_rejected_inputs_total`);
//! - when the CA returns, certificates are renewed and new connections work again.
//!
//! And a CA that is unreachable when the pods are enrolled: the pods are captured all the
//! same, their connections fail closed with the reason, and work as soon as the CA answers,
//! with no configuration change in between.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mesh_tests::mesh::http_get;
use mesh_tests::mesh::{Mesh, PodSpec};
use mesh_tests::netns::in_netns;
use mesh_tests::operator::admin_json;
use mesh_tests::operator::{connections, sample, scrape};
use mesh_tests::traffic::{AppServer, connect, echo_roundtrip, first_read, is_reset};
use mesh_tests::wait_until;

/// Lifetime the ztunnels ask for: renewed from 15 s, expired at 30 s.
const TTL: Duration = Duration::from_secs(30);
const APP_PORT: u16 = 8080;
const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const ECHO: &str = "spiffe://cluster.local/ns/default/sa/echo";

/// Unix time at which `node`'s certificate for `identity` expires, from its metrics.
fn expiry(mesh: &Mesh, node: &str, identity: &str) -> u64 {
    sample(
        &scrape(mesh, node),
        "ztunnel_certificate_expiry_timestamp_seconds",
        &[("identity", identity)],
    )
}

fn ca_requests(mesh: &Mesh, node: &str, result: &str) -> u64 {
    sample(
        &scrape(mesh, node),
        "ztunnel_certificate_requests_total",
        &[("result", result)],
    )
}

fn rejected_for_certificate(mesh: &Mesh, node: &str) -> u64 {
    sample(
        &scrape(mesh, node),
        "ztunnel_rejected_inputs_total",
        &[("reason", "certificate")],
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn wait(what: &str, timeout: Duration, cond: impl FnMut() -> bool) {
    wait_until(timeout, cond).unwrap_or_else(|e| panic!("{what}: {e}"));
}

#[test]
fn ca_outage_serves_until_expiry_then_fails_closed_and_recovers() {
    let pods = vec![
        PodSpec::new("sleep", "node1", "sleep"),
        PodSpec::new("echo", "node2", "echo"),
    ];
    let mut mesh = Mesh::new(&["node1", "node2"], pods, Vec::new()).unwrap();
    mesh.topo.add_outside_host("probe").unwrap();
    mesh.use_istio_ca(TTL).unwrap();
    let app = SocketAddr::new(mesh.ip("echo").into(), APP_PORT);
    let server = AppServer::start(&mesh.netns("echo"), "echo", app).unwrap();
    mesh.start().unwrap();
    let sleep = mesh.netns("sleep");
    let t0 = Instant::now();
    assert_eq!(
        echo_roundtrip(&sleep, app, b"before".to_vec()).unwrap(),
        b"beforebye"
    );

    // Each ztunnel asked for its own workload's certificate, with its token, on behalf of
    // the workload, for the lifetime it was configured with.
    let requests = mesh.istio_ca().requests();
    for identity in [SLEEP, ECHO] {
        let seen = requests
            .iter()
            .find(|r| {
                r.request.metadata.as_ref().is_some_and(|m| {
                    m.fields
                        .get("ImpersonatedIdentity")
                        .and_then(|v| v.kind.clone())
                        == Some(prost_types::value::Kind::StringValue(identity.into()))
                })
            })
            .unwrap_or_else(|| panic!("no CA request for {identity}"));
        assert_eq!(seen.request.validity_duration, TTL.as_secs() as i64);
        assert_eq!(
            seen.metadata.get("authorization").unwrap(),
            "Bearer istio-token-for-tests"
        );
        assert!(seen.serial.is_some());
    }
    let not_after = [("node1", SLEEP), ("node2", ECHO)].map(|(n, id)| expiry(&mesh, n, id));
    let lifetime = not_after[0].saturating_sub(unix_now());
    assert!(
        lifetime > 0 && lifetime <= TTL.as_secs(),
        "certificate lifetime {lifetime}s"
    );

    // A connection opened now stays open through the outage.
    let mut long_lived = connect(&sleep, app).unwrap();
    long_lived.write_all(b"one").unwrap();
    let mut buf = [0u8; 3];
    long_lived.read_exact(&mut buf).unwrap();

    // The CA goes away.
    mesh.istio_ca().stop().unwrap();
    let t_stop = t0.elapsed();
    assert_eq!(
        echo_roundtrip(&sleep, app, b"during".to_vec()).unwrap(),
        b"duringbye"
    );

    // Renewal at half-life fails on both nodes, and says so.
    for node in ["node1", "node2"] {
        wait(&format!("{node}: failed renewal"), TTL, || {
            ca_requests(&mesh, node, "failed") >= 1
        });
        let log = mesh.ztunnel(node).log();
        let line = log
            .lines()
            .find(|l| l.contains("certificate renewal failed"))
            .unwrap_or_else(|| panic!("{node}: no renewal failure logged:\n{log}"));
        assert!(
            line.contains(mesh_tests::ca::CA_ADDR) && line.contains("expired=false"),
            "{line}"
        );
    }
    let t_renewal_failed = t0.elapsed();
    // Still valid: new connections work.
    assert!(
        unix_now() < not_after[0].min(not_after[1]),
        "the machine is too slow: certificates expired before the check"
    );
    assert_eq!(
        echo_roundtrip(&sleep, app, b"valid".to_vec()).unwrap(),
        b"validbye"
    );
    let app_connections = server.peers().len();

    // Both certificates expire; each ztunnel says so.
    for (node, identity) in [("node1", SLEEP), ("node2", ECHO)] {
        wait(&format!("{node}: expiry logged"), TTL + TTL, || {
            mesh.ztunnel(node).log().lines().any(|l| {
                l.contains("certificate expired and could not be renewed") && l.contains(identity)
            })
        });
    }
    let t_expired = t0.elapsed();
    assert!(unix_now() >= not_after[0].max(not_after[1]));

    // A new connection from sleep fails closed, at once: reset before any byte, and the
    // application never saw it (no plaintext fallback).
    let started = Instant::now();
    let got = echo_roundtrip(&sleep, app, b"after".to_vec());
    let refused_in = started.elapsed();
    assert!(is_reset(&got), "connection after expiry not reset: {got:?}");
    assert!(refused_in < Duration::from_secs(5), "took {refused_in:?}");
    // Also for a client that waits for the server to speak first (it would read a clean
    // end of stream if the refusal were not a reset).
    let got = first_read(&sleep, app);
    assert!(
        is_reset(&got),
        "silent client after expiry not reset: {got:?}"
    );
    assert_eq!(
        server.peers().len(),
        app_connections,
        "the application saw it"
    );
    // node1 says why: the connection, its log, its metric.
    let failed = connections(&mesh, "node1", |c| {
        c["state"] == "failed" && c["path"] == "hbone-out"
    });
    let last = failed.last().expect("no failed connection on node1");
    let client_reason = last["reason"].as_str().unwrap().to_owned();
    assert!(
        client_reason.contains(&format!("the certificate for {SLEEP} expired at"))
            && client_reason.contains("could not be renewed"),
        "{client_reason}"
    );
    assert!(rejected_for_certificate(&mesh, "node1") >= 1);
    let log = mesh.ztunnel("node1").log();
    assert!(
        log.lines()
            .any(|l| l.contains("state=failed") && l.contains("expired at")),
        "no access log line for the refusal:\n{log}"
    );

    // node2 refuses tunnels too: a peer reaching echo's HBONE port is closed without a
    // handshake, and node2 says why.
    let hbone = SocketAddr::new(mesh.ip("echo").into(), 15008);
    let probe_ns = mesh.netns("probe");
    let answer = in_netns(&probe_ns, move || -> std::io::Result<usize> {
        let mut s = TcpStream::connect_timeout(&hbone, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        // A TLS record header (handshake): whatever it is, nothing comes back.
        let _ = s.write_all(&[0x16, 0x03, 0x01, 0x00, 0x00]);
        let mut buf = [0u8; 64];
        Ok(s.read(&mut buf).unwrap_or(0))
    })
    .unwrap()
    .unwrap();
    assert_eq!(
        answer, 0,
        "echo's ztunnel answered without a valid certificate"
    );
    let rejected = connections(&mesh, "node2", |c| c["state"] == "rejected");
    let last = rejected.last().expect("no rejected connection on node2");
    let server_reason = last["reason"].as_str().unwrap().to_owned();
    assert!(
        server_reason.starts_with("certificate: ")
            && server_reason.contains(&format!("the certificate for {ECHO} expired at")),
        "{server_reason}"
    );
    assert!(rejected_for_certificate(&mesh, "node2") >= 1);

    // The connection opened before the outage was authenticated then: it keeps flowing.
    long_lived.write_all(b"two").unwrap();
    long_lived.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"two");
    drop(long_lived);

    // The CA comes back: new connections work again, and both nodes hold fresh certificates.
    mesh.istio_ca().listen().unwrap();
    let back = Instant::now();
    wait(
        "new connections after the CA returned",
        TTL,
        || matches!(echo_roundtrip(&sleep, app, b"again".to_vec()), Ok(ref got) if got == b"againbye"),
    );
    let recovered_in = back.elapsed();
    for (node, identity) in [("node1", SLEEP), ("node2", ECHO)] {
        wait(&format!("{node}: certificate renewed"), TTL, || {
            expiry(&mesh, node, identity) > unix_now()
        });
        assert!(
            mesh.ztunnel(node)
                .log()
                .contains("certificate renewed after failed attempts"),
            "{node}"
        );
        assert!(ca_requests(&mesh, node, "issued") >= 2);
    }
    let renewed_in = back.elapsed();
    println!(
        "CA outage timeline (certificates of {TTL:?}, {lifetime}s left at the start): CA stopped at {t_stop:.1?}, \
         renewal failures seen at {t_renewal_failed:.1?}, both certificates expired and \
         logged at {t_expired:.1?}; a new connection was refused in {refused_in:.0?} \
         (node1: {client_reason:?}; node2: {server_reason:?}); after the CA returned, a new connection worked in {recovered_in:.1?}, \
         both nodes renewed in {renewed_in:.1?}"
    );
}

/// `/healthz/ready` on `node`: (status, body).
fn readiness(mesh: &Mesh, node: &str) -> (u16, String) {
    let netns = mesh.topo.node(node).netns.clone();
    http_get(&netns, "127.0.0.1:15021".parse().unwrap(), "/healthz/ready").unwrap()
}

#[test]
fn pods_enrolled_while_the_ca_is_unreachable_are_captured_and_fail_closed_until_it_answers() {
    let pods = vec![
        PodSpec::new("sleep", "node1", "sleep"),
        PodSpec::new("echo", "node2", "echo"),
    ];
    let mut mesh = Mesh::new(&["node1", "node2"], pods, Vec::new()).unwrap();
    // Deliveries from 127.0.0.6 tell echo's ztunnel delivered a connection.
    mesh.ztunnel_args = vec!["--inbound-source".into(), "loopback".into()];
    mesh.topo.add_outside_host("probe").unwrap();
    mesh.use_istio_ca(Duration::from_secs(3600)).unwrap();
    // The CA is down before any ztunnel starts: no pod ever had a certificate.
    mesh.istio_ca().stop().unwrap();
    let app = SocketAddr::new(mesh.ip("echo").into(), APP_PORT);
    let server = AppServer::start(&mesh.netns("echo"), "echo", app).unwrap();
    // `start` waits for /healthz/ready: every pod is captured, without the CA.
    mesh.start().unwrap();
    let mut versions = Vec::new();
    for (node, pod, identity) in [
        ("node1", "default/sleep", SLEEP),
        ("node2", "default/echo", ECHO),
    ] {
        let (status, body) = readiness(&mesh, node);
        assert_eq!(status, 200, "{node}: {body}");
        assert_eq!(
            body.trim(),
            format!(
                "ready; captured without a certificate (connections refused until the CA issues one): {pod}"
            ),
            "{node}"
        );
        let dump = admin_json(&mesh, node, "/config_dump");
        assert_eq!(dump["pods"][0]["capture"]["outbound"], true, "{node}");
        assert_eq!(dump["pods_not_captured"], serde_json::json!([]), "{node}");
        assert_eq!(dump["pods_without_certificate"], serde_json::json!([pod]));
        versions.push(dump["config_source"]["version"].clone());
        let metrics = scrape(&mesh, node);
        assert_eq!(sample(&metrics, "ztunnel_pods_without_certificate", &[]), 1);
        assert_eq!(sample(&metrics, "ztunnel_pods_enrolled", &[]), 1);
        // The background request failed, and said so.
        wait(&format!("{node}: failed request logged"), TTL, || {
            mesh.ztunnel(node).log().lines().any(|l| {
                l.contains("pod captured without a certificate")
                    && l.contains(identity)
                    && l.contains(mesh_tests::ca::CA_ADDR)
            })
        });
        assert!(ca_requests(&mesh, node, "failed") >= 1, "{node}");
    }

    // sleep's connection to echo is captured and fails closed: reset before any byte, never
    // delivered (in plaintext or otherwise), with the reason on node1.
    let sleep = mesh.netns("sleep");
    let got = first_read(&sleep, app);
    assert!(is_reset(&got), "sleep -> echo, silent client: {got:?}");
    let got = echo_roundtrip(&sleep, app, b"early".to_vec());
    assert!(is_reset(&got), "sleep -> echo, talking client: {got:?}");
    assert_eq!(server.peers(), Vec::new(), "the application saw it");
    let failed = connections(&mesh, "node1", |c| {
        c["state"] == "failed" && c["path"] == "hbone-out"
    });
    let last = failed.last().expect("no failed connection on node1");
    let reason = last["reason"].as_str().unwrap().to_owned();
    assert!(
        reason.starts_with(&format!(
            "no valid certificate: issuing a certificate for {SLEEP}"
        )) && reason.contains(mesh_tests::ca::CA_ADDR),
        "{reason}"
    );
    assert!(rejected_for_certificate(&mesh, "node1") >= 1);
    let log = mesh.ztunnel("node1").log();
    assert!(
        log.lines()
            .any(|l| l.contains("access: connection complete")
                && l.contains("state=failed")
                && l.contains("no valid certificate")),
        "no access log line for the refusal:\n{log}"
    );
    // echo is captured on the inbound side too: a plaintext client outside the mesh is
    // delivered by echo's ztunnel (from 127.0.0.6), under echo's policies.
    let probe = mesh.netns("probe");
    assert_eq!(
        echo_roundtrip(&probe, app, b"plain".to_vec()).unwrap(),
        b"plainbye"
    );
    assert_eq!(server.peers().len(), 1);
    assert_eq!(server.peers()[0].ip().to_string(), "127.0.0.6");

    // The CA comes up: with no configuration change, sleep's connections work (both
    // ztunnels get their certificates), and readiness no longer names anyone.
    mesh.istio_ca().listen().unwrap();
    let back = Instant::now();
    let mut refused_after = 0;
    wait("a new connection after the CA came up", TTL, || {
        let ok = matches!(echo_roundtrip(&sleep, app, b"again".to_vec()), Ok(ref got) if got == b"againbye");
        refused_after += usize::from(!ok);
        ok
    });
    let recovered_in = back.elapsed();
    assert!(
        recovered_in < Duration::from_secs(5),
        "recovered in {recovered_in:?}"
    );
    assert_eq!(server.peers().last().unwrap().ip().to_string(), "127.0.0.6");
    for (i, (node, identity)) in [("node1", SLEEP), ("node2", ECHO)].into_iter().enumerate() {
        let dump = admin_json(&mesh, node, "/config_dump");
        assert_eq!(
            dump["config_source"]["version"], versions[i],
            "{node}: the configuration changed"
        );
        assert_eq!(dump["pods_without_certificate"], serde_json::json!([]));
        assert!(expiry(&mesh, node, identity) > unix_now(), "{node}");
        assert_eq!(
            readiness(&mesh, node),
            (200, "ready\n".to_owned()),
            "{node}"
        );
    }
    println!(
        "CA unreachable at enrolment: both pods captured, sleep's connection reset \
         ({reason:?}); after the CA came up a new connection worked in {recovered_in:.2?} \
         ({refused_after} refused meanwhile)"
    );
}
