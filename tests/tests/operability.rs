//! Operating a node: Istio's metrics with exact values and labels on both reporters, the
//! admin endpoint (config dump, live connections, runtime log levels) and the debug CLI,
//! readiness reasons, and failed connections that explain themselves.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use mesh_tests::mesh::{Mesh, PodSpec, ServiceSpec, http_get, write_pem};
use mesh_tests::operator::{admin_json, admin_request, cli, connections, sample, scrape};
use mesh_tests::traffic::{AppServer, connect, echo_roundtrip, first_read, is_reset, payload};
use mesh_tests::wait_until;
use ztunnel::identity::{Identity, LocalCa};

const APP_PORT: u16 = 8080;
const VIP: &str = "198.18.100.1";
const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const ECHO: &str = "spiffe://cluster.local/ns/default/sa/echo";
const ECHO_HOST: &str = "echo.default.svc.cluster.local";

/// node1: sleep; node2: echo2 behind service `echo` (VIP:80 -> 8080); an outside host.
struct Fixture {
    mesh: Mesh,
    _echo2: AppServer,
}

fn fixture() -> Fixture {
    let pods = vec![
        PodSpec::new("sleep", "node1", "sleep"),
        PodSpec::new("echo2", "node2", "echo").service("echo", 80, APP_PORT),
    ];
    let services = vec![ServiceSpec {
        name: "echo".into(),
        namespace: "default".into(),
        vip: VIP.parse().unwrap(),
        vip6: None,
        ports: vec![(80, APP_PORT)],
    }];
    let mut mesh = Mesh::new(&["node1", "node2"], pods, services).unwrap();
    mesh.topo.add_outside_host("outside").unwrap();
    let echo2 = AppServer::start(&mesh.netns("echo2"), "echo2", app(&mesh, "echo2")).unwrap();
    mesh.start().unwrap();
    Fixture {
        mesh,
        _echo2: echo2,
    }
}

fn app(mesh: &Mesh, pod: &str) -> SocketAddr {
    SocketAddr::new(mesh.ip(pod).into(), APP_PORT)
}

fn vip() -> SocketAddr {
    SocketAddr::new(VIP.parse().unwrap(), 80)
}

fn wait(what: &str, cond: impl FnMut() -> bool) {
    wait_until(Duration::from_secs(15), cond).unwrap_or_else(|e| panic!("{what}: {e}"));
}

#[test]
fn tcp_metrics_count_connections_and_bytes_exactly_on_both_reporters() {
    let f = fixture();
    let sleep = f.mesh.netns("sleep");
    const N: u64 = 4;
    const M: usize = 100_000;
    for i in 0..N {
        let data = payload(M, i);
        let got = echo_roundtrip(&sleep, vip(), data.clone()).unwrap();
        assert_eq!(got.len(), M + 3, "connection {i}");
    }
    let common = [
        ("source_workload", "sleep"),
        ("source_workload_namespace", "default"),
        ("source_principal", SLEEP),
        ("source_app", "sleep"),
        ("source_version", "unknown"),
        ("source_cluster", "Kubernetes"),
        ("destination_service", ECHO_HOST),
        ("destination_service_name", "echo"),
        ("destination_service_namespace", "default"),
        ("destination_workload", "echo2"),
        ("destination_workload_namespace", "default"),
        ("destination_principal", ECHO),
        ("destination_app", "echo2"),
        ("destination_version", "unknown"),
        ("destination_cluster", "Kubernetes"),
        ("request_protocol", "tcp"),
        ("response_flags", "-"),
        ("connection_security_policy", "mutual_tls"),
    ];
    for (node, reporter) in [("node1", "source"), ("node2", "destination")] {
        let mut want = vec![("reporter", reporter)];
        want.extend_from_slice(&common);
        // A connection is closed once both directions are done; the client may see its
        // last byte a moment before that.
        wait(&format!("{node}: {N} connections closed"), || {
            sample(
                &scrape(&f.mesh, node),
                "istio_tcp_connections_closed_total",
                &want,
            ) == N
        });
        let m = scrape(&f.mesh, node);
        assert_eq!(
            sample(&m, "istio_tcp_connections_opened_total", &want),
            N,
            "{node}:\n{m}"
        );
        // received = client to server (the request), sent = server to client (the echo + "bye").
        assert_eq!(
            sample(&m, "istio_tcp_received_bytes_total", &want),
            N * M as u64,
            "{node}:\n{m}"
        );
        assert_eq!(
            sample(&m, "istio_tcp_sent_bytes_total", &want),
            N * (M as u64 + 3),
            "{node}:\n{m}"
        );
        // Nothing else was counted.
        assert_eq!(
            sample(&m, "istio_tcp_connections_opened_total", &[]),
            N,
            "{node}:\n{m}"
        );
        assert_eq!(
            sample(&m, "istio_build", &[("component", "ztunnel")]),
            1,
            "{node}:\n{m}"
        );
        assert_eq!(sample(&m, "ztunnel_connections_open", &[]), 0);
        assert_eq!(sample(&m, "ztunnel_pods_enrolled", &[]), 1);
        assert_eq!(sample(&m, "ztunnel_pods_not_captured", &[]), 0);
        assert!(m.contains("ztunnel_certificate_expiry_timestamp_seconds{identity=\"spiffe://"));
        assert!(m.contains("ztunnel_config_updates_total{source=\"file\",result=\"applied\"}"));
    }
    // Both paths (/metrics too) serve the same families.
    let node = f.mesh.topo.node("node1").netns.clone();
    let (status, body) = http_get(&node, "127.0.0.1:15020".parse().unwrap(), "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(
        body.contains("# TYPE istio_tcp_connections_opened counter"),
        "{body}"
    );
}

#[test]
fn config_dump_connections_and_cli_during_a_live_transfer() {
    let f = fixture();
    let sleep = f.mesh.netns("sleep");
    let mut conn = connect(&sleep, app(&f.mesh, "echo2")).unwrap();
    let chunk = payload(5000, 3);
    conn.write_all(&chunk).unwrap();
    let mut back = vec![0u8; chunk.len()];
    conn.read_exact(&mut back).unwrap();
    assert_eq!(back, chunk);

    // Both ends of the live connection, with identities, path, policy and byte counts.
    let sleep_ip = f.mesh.ip("sleep").to_string();
    let live = |node: &str, path: &str| {
        let found = admin_json(&f.mesh, node, "/connections")["live"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .find(|c| c["path"] == path);
        found.unwrap_or_else(|| panic!("no live {path} connection on {node}"))
    };
    let out = live("node1", "hbone-out");
    assert_eq!(out["state"], "open");
    assert_eq!(out["reporter"], "source");
    assert!(
        out["src"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{sleep_ip}:")),
        "{out}"
    );
    assert_eq!(out["dst"], app(&f.mesh, "echo2").to_string());
    assert_eq!(out["upstream"], format!("{}:15008", f.mesh.ip("echo2")));
    assert_eq!(out["src_identity"], SLEEP);
    assert_eq!(out["dst_identity"], ECHO);
    assert_eq!(out["src_workload"], "default/sleep");
    assert_eq!(out["dst_workload"], "default/echo2");
    assert_eq!(out["policy"], "at destination");
    assert_eq!(out["bytes_received"], 5000);
    assert_eq!(out["bytes_sent"], 5000);
    let inb = live("node2", "hbone-in");
    assert_eq!(inb["reporter"], "destination");
    assert_eq!(inb["src_identity"], SLEEP);
    assert_eq!(inb["src_workload"], "default/sleep");
    assert_eq!(inb["dst_service"], ECHO_HOST);
    assert_eq!(inb["policy"], "allow");
    assert_eq!(inb["bytes_received"], 5000);
    assert_eq!(inb["bytes_sent"], 5000);

    let (ok, table) = cli(&f.mesh, "node1", &["connections"]);
    assert!(ok, "{table}");
    assert!(table.starts_with("ID"), "{table}");
    let row = table
        .lines()
        .find(|l| l.contains("hbone-out"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        row.contains("open") && row.contains("cluster.local/ns/default/sa/echo"),
        "{row}"
    );

    // The configuration this node acts on.
    let dump = admin_json(&f.mesh, "node2", "/config_dump");
    assert_eq!(dump["node"], "node2");
    let names: Vec<&str> = dump["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w["name"].as_str())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(
        names.contains(&"sleep") && names.contains(&"echo2"),
        "{names:?}"
    );
    assert_eq!(dump["services"][0]["hostname"], ECHO_HOST);
    assert_eq!(dump["services"][0]["endpoints"][0]["workload"], "echo2");
    let cert = &dump["certificates"][0];
    assert_eq!(cert["identity"], ECHO);
    assert!(!cert["serial"].as_str().unwrap().is_empty());
    assert!(cert["not_after"].as_str().unwrap().ends_with('Z'));
    assert!(cert["expires_in_secs"].as_i64().unwrap() > 3600);
    let pod = &dump["pods"][0];
    assert_eq!(pod["name"], "echo2");
    assert_eq!(pod["capture"]["outbound"], true);
    assert!(
        dump["capture"]["programs"]
            .as_array()
            .unwrap()
            .contains(&"zt_connect4".into())
    );
    assert_eq!(dump["capture"]["enrolled_namespaces"], 1);
    assert_eq!(dump["config_source"]["kind"], "file");
    assert!(dump["config_source"]["version"].as_u64().unwrap() >= 1);
    assert_eq!(dump["build"]["component"], "ztunnel");

    let (ok, table) = cli(&f.mesh, "node2", &["workloads"]);
    assert!(ok, "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.contains("echo2") && l.contains("HBONE") && l.contains("node2")),
        "{table}"
    );
    let (ok, yaml) = cli(&f.mesh, "node2", &["certificates", "-o", "yaml"]);
    assert!(ok && yaml.contains(&format!("identity: {ECHO}")), "{yaml}");
    let (ok, json) = cli(&f.mesh, "node2", &["services", "-o", "json"]);
    assert!(ok && json.contains(ECHO_HOST), "{json}");

    // Once closed, it moves to the history with its final byte counts.
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"bye");
    wait("connection in node1's history", || {
        !connections(&f.mesh, "node1", |c| {
            c["path"] == "hbone-out" && c["state"] == "closed" && c["bytes_sent"] == 5003
        })
        .is_empty()
    });
    f.mesh.ztunnels[0]
        .1
        .wait_for_log("connection complete", Duration::from_secs(5))
        .unwrap();
}

#[test]
fn log_levels_change_at_runtime_and_quitquitquit_stops_the_agent() {
    let mut f = fixture();
    let sleep = f.mesh.netns("sleep");
    let (status, body) = admin_request(&f.mesh, "node1", "GET", "/logging").unwrap();
    assert_eq!(
        (status, body.trim()),
        (200, "current log filter: info,ztunnel=debug")
    );

    echo_roundtrip(&sleep, app(&f.mesh, "echo2"), b"a".to_vec()).unwrap();
    f.mesh
        .ztunnel("node1")
        .wait_for_log("connection complete", Duration::from_secs(5))
        .unwrap();
    assert!(!f.mesh.ztunnel("node1").log().contains("connection opened"));

    // One target's level, added to the filter in force.
    let (status, body) = admin_request(&f.mesh, "node1", "POST", "/logging?access=debug").unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.trim(), "log filter: info,ztunnel=debug,access=debug");
    echo_roundtrip(&sleep, app(&f.mesh, "echo2"), b"b".to_vec()).unwrap();
    f.mesh
        .ztunnel("node1")
        .wait_for_log("connection opened", Duration::from_secs(5))
        .unwrap();

    // The whole filter, through the CLI; a bad one is refused and changes nothing.
    let completed = |f: &mut Fixture| {
        f.mesh
            .ztunnel("node1")
            .log()
            .matches("access: connection complete")
            .count()
    };
    wait("two connections logged", || completed(&mut f) == 2);
    let (ok, out) = cli(&f.mesh, "node1", &["log", "warn"]);
    assert!(ok, "{out}");
    let (ok, out) = cli(&f.mesh, "node1", &["log", "ztunnel=loud"]);
    assert!(!ok && out.contains("400"), "{out}");
    let (_, out) = cli(&f.mesh, "node1", &["log"]);
    assert_eq!(out.trim(), "current log filter: warn");
    // At warn, a completed connection (info) is no longer logged.
    echo_roundtrip(&sleep, app(&f.mesh, "echo2"), b"c".to_vec()).unwrap();
    wait("third connection in the history", || {
        connections(&f.mesh, "node1", |c| c["state"] == "closed").len() == 3
    });
    assert_eq!(completed(&mut f), 2);

    // GET does not stop it; POST does, in order.
    let (status, _) = admin_request(&f.mesh, "node1", "GET", "/quitquitquit").unwrap();
    assert_eq!(status, 405);
    let (status, _) = admin_request(&f.mesh, "node1", "POST", "/quitquitquit").unwrap();
    assert_eq!(status, 200);
    let z = f.mesh.ztunnel("node1");
    wait("ztunnel exits after /quitquitquit", || z.exited().is_some());
}

#[test]
fn readiness_names_a_pod_that_cannot_be_captured_and_admin_is_not_reachable_from_pods() {
    let mut f = fixture();
    let node1 = f.mesh.topo.node("node1").netns.clone();
    let ready = "127.0.0.1:15021".parse().unwrap();

    // A pod whose network namespace has gone: enrolment fails, readiness says which.
    f.mesh.topo.add_pod("node1", "ghost").unwrap();
    let ghost_ns = f.mesh.netns("ghost");
    mesh_tests::netns::run("ip", &["netns", "del", &ghost_ns]).unwrap();
    f.mesh.pods.push(PodSpec::new("ghost", "node1", "ghost"));
    f.mesh.write_config().unwrap();
    wait("readiness turns 503", || {
        matches!(http_get(&node1, ready, "/healthz/ready"), Ok((503, _)))
    });
    let (_, body) = http_get(&node1, ready, "/healthz/ready").unwrap();
    assert_eq!(
        body.trim(),
        "not ready: pods not yet captured: default/ghost"
    );
    assert_eq!(
        sample(&scrape(&f.mesh, "node1"), "ztunnel_pods_not_captured", &[]),
        1
    );
    let dump = admin_json(&f.mesh, "node1", "/config_dump");
    assert_eq!(dump["pods_not_captured"][0], "default/ghost");
    f.mesh
        .ztunnel("node1")
        .wait_for_log("cannot enroll pod", Duration::from_secs(5))
        .unwrap();

    f.mesh.pods.retain(|p| p.name != "ghost");
    f.mesh.write_config().unwrap();
    wait("ready again", || {
        matches!(http_get(&node1, ready, "/healthz/ready"), Ok((200, _)))
    });

    // From a pod, the node's readiness port answers (control) and the admin port does not,
    // neither at the node's address nor on the pod's own loopback.
    let sleep = f.mesh.netns("sleep");
    let gateway = "198.19.1.1";
    let (status, _) = http_get(
        &sleep,
        format!("{gateway}:15021").parse().unwrap(),
        "/healthz/ready",
    )
    .unwrap();
    assert_eq!(status, 200);
    for addr in [format!("{gateway}:15000"), "127.0.0.1:15000".to_owned()] {
        let got = http_get(&sleep, addr.parse().unwrap(), "/config_dump");
        assert!(
            got.is_err(),
            "admin reachable from a pod at {addr}: {got:?}"
        );
    }
}

#[test]
fn a_pod_whose_namespace_appears_late_is_enrolled_without_a_config_change() {
    let mut f = fixture();
    let node1 = f.mesh.topo.node("node1").netns.clone();
    let ready = "127.0.0.1:15021".parse().unwrap();
    // A pod declared before its network namespace exists.
    f.mesh.topo.add_pod("node1", "late").unwrap();
    let late_ns = f.mesh.netns("late");
    mesh_tests::netns::run("ip", &["netns", "del", &late_ns]).unwrap();
    f.mesh.pods.push(PodSpec::new("late", "node1", "late"));
    f.mesh.write_config().unwrap();
    wait("readiness turns 503", || {
        matches!(http_get(&node1, ready, "/healthz/ready"), Ok((503, _)))
    });
    let version = admin_json(&f.mesh, "node1", "/config_dump")["config_source"]["version"].clone();
    // Tried again with no state change, each failure logged with the pod, the reason and
    // the wait before the next attempt.
    let attempts = |mesh: &mut Mesh| -> Vec<String> {
        let log = mesh.ztunnel("node1").log();
        log.lines()
            .filter(|l| l.contains("cannot enroll pod") && l.contains("workload=late"))
            .map(str::to_owned)
            .collect()
    };
    wait("a second attempt", || attempts(&mut f.mesh).len() >= 2);
    let logged = attempts(&mut f.mesh);
    assert!(
        logged[0].contains("WARN")
            && logged[0].contains(&late_ns)
            && logged[0].contains("retry_in=1s")
            && logged[1].contains("retry_in=2s"),
        "{logged:#?}"
    );

    // The namespace appears: a retry enrols the pod, with no configuration change.
    mesh_tests::netns::run("ip", &["netns", "add", &late_ns]).unwrap();
    mesh_tests::netns::ip(&late_ns, &["link", "set", "lo", "up"]).unwrap();
    let appeared = std::time::Instant::now();
    wait("ready without a configuration change", || {
        matches!(http_get(&node1, ready, "/healthz/ready"), Ok((200, _)))
    });
    let enrolled_in = appeared.elapsed();
    let dump = admin_json(&f.mesh, "node1", "/config_dump");
    assert_eq!(dump["config_source"]["version"], version);
    let late = dump["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "late")
        .unwrap_or_else(|| panic!("late not enrolled: {dump}"));
    assert_eq!(late["capture"]["outbound"], true);
    assert_eq!(
        sample(&scrape(&f.mesh, "node1"), "ztunnel_pods_not_captured", &[]),
        0
    );
    println!(
        "namespace appeared after {} failed attempts; enrolled {enrolled_in:.1?} later",
        attempts(&mut f.mesh).len()
    );
}

#[test]
fn denied_wrong_identity_and_unknown_destination_explain_themselves() {
    let mut f = fixture();
    let sleep = f.mesh.netns("sleep");
    let echo2 = app(&f.mesh, "echo2");

    // 1. Denied by policy.
    f.mesh.policies = "  - name: deny-sleep\n    namespace: default\n    scope: Namespace\n    action: Deny\n    rules:\n      - - - principals:\n              - Exact: cluster.local/ns/default/sa/sleep\n".into();
    f.mesh.write_config().unwrap();
    wait(
        "deny policy applied",
        || !matches!(echo_roundtrip(&sleep, echo2, b"x".to_vec()), Ok(ref got) if got == b"xbye"),
    );
    // The client is reset: never a clean end, which a server that accepted would give.
    let got = echo_roundtrip(&sleep, echo2, b"x".to_vec());
    assert!(is_reset(&got), "denied connection not reset: {got:?}");
    let got = first_read(&sleep, echo2);
    assert!(is_reset(&got), "denied silent client not reset: {got:?}");
    let denied = connections(&f.mesh, "node2", |c| c["state"] == "denied");
    let d = denied.last().expect("no denied connection on node2");
    assert_eq!(d["path"], "hbone-in");
    assert_eq!(d["src_identity"], SLEEP);
    assert_eq!(
        d["policy"],
        "deny (default/deny-sleep: a DENY policy matched)"
    );
    assert!(
        d["reason"]
            .as_str()
            .unwrap()
            .contains("denied by policy default/deny-sleep"),
        "{d}"
    );
    let out = connections(&f.mesh, "node1", |c| c["state"] == "denied");
    let o = out.last().expect("no denied connection on node1");
    assert_eq!(o["path"], "hbone-out");
    assert!(
        o["reason"]
            .as_str()
            .unwrap()
            .contains("denied by the destination's policy"),
        "{o}"
    );
    let deny = |reporter| {
        [
            ("reporter", reporter),
            ("source_workload", "sleep"),
            ("destination_workload", "echo2"),
            ("response_flags", "DENY"),
        ]
    };
    assert!(
        sample(
            &scrape(&f.mesh, "node2"),
            "istio_tcp_connections_closed_total",
            &deny("destination")
        ) >= 1
    );
    assert!(
        sample(
            &scrape(&f.mesh, "node1"),
            "istio_tcp_connections_closed_total",
            &deny("source")
        ) >= 1
    );
    let log = f.mesh.ztunnel("node2").log();
    let line = log
        .lines()
        .find(|l| l.contains("access: connection complete") && l.contains("state=denied"))
        .unwrap_or_else(|| panic!("no access log line for the denial:\n{log}"));
    assert!(
        line.contains("default/deny-sleep") && line.contains(SLEEP),
        "{line}"
    );
    let (_, table) = cli(&f.mesh, "node2", &["connections"]);
    assert!(
        table
            .lines()
            .any(|l| l.contains("denied") && l.contains("default/deny-sleep")),
        "{table}"
    );
    f.mesh.policies.clear();
    f.mesh.write_config().unwrap();
    wait(
        "deny policy removed",
        || matches!(echo_roundtrip(&sleep, echo2, b"y".to_vec()), Ok(ref got) if got == b"ybye"),
    );

    // 2. A peer proving an identity from another trust domain.
    let dir = f.mesh.dir.path().to_owned();
    let evil_ca = LocalCa::load_or_create(&dir.join("evil-ca"), "evil.local").unwrap();
    let id: Identity = "spiffe://evil.local/ns/default/sa/sleep".parse().unwrap();
    let evil = write_pem(
        &dir,
        "evil",
        &evil_ca.sign(&id, Duration::from_secs(600)).unwrap(),
    )
    .unwrap();
    let url = format!("https://{}:15008/", f.mesh.ip("echo2"));
    let out = mesh_tests::netns::exec(
        &f.mesh.topo.pod("outside").netns,
        "curl",
        &[
            "-sS",
            "-k",
            "--http2",
            "--max-time",
            "10",
            "--cert",
            evil.0.to_str().unwrap(),
            "--key",
            evil.1.to_str().unwrap(),
            &url,
        ],
    )
    .unwrap();
    assert!(
        !out.status.success(),
        "a certificate from another CA was accepted"
    );
    wait("rejected handshake in node2's history", || {
        !connections(&f.mesh, "node2", |c| c["state"] == "rejected").is_empty()
    });
    let rejected = connections(&f.mesh, "node2", |c| c["state"] == "rejected");
    let r = &rejected[0];
    assert_eq!(r["path"], "hbone-in");
    assert!(
        r["src"]
            .as_str()
            .unwrap()
            .starts_with(&f.mesh.ip("outside").to_string()),
        "{r}"
    );
    let reason = r["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("tls_handshake: TLS handshake:"),
        "{reason}"
    );
    assert_eq!(
        sample(
            &scrape(&f.mesh, "node2"),
            "ztunnel_rejected_inputs_total",
            &[("reason", "tls_handshake")]
        ),
        1
    );
    let (_, table) = cli(&f.mesh, "node2", &["connections"]);
    assert!(
        table
            .lines()
            .any(|l| l.contains("rejected") && l.contains("tls_handshake")),
        "{table}"
    );

    // 3. A destination outside the mesh with nothing listening: passthrough, connect refused.
    let nowhere = SocketAddr::new(f.mesh.ip("outside").into(), 9);
    let got = echo_roundtrip(&sleep, nowhere, b"hello".to_vec());
    assert!(is_reset(&got), "refused passthrough not reset: {got:?}");
    let got = first_read(&sleep, nowhere);
    assert!(
        is_reset(&got),
        "refused passthrough, silent client, not reset: {got:?}"
    );
    wait("failed passthrough in node1's history", || {
        !connections(&f.mesh, "node1", |c| {
            c["state"] == "failed" && c["dst"] == nowhere.to_string()
        })
        .is_empty()
    });
    let failed = connections(&f.mesh, "node1", |c| c["dst"] == nowhere.to_string());
    let p = &failed[0];
    assert_eq!(p["path"], "passthrough");
    assert_eq!(p["dst_workload"], serde_json::Value::Null);
    assert!(
        p["reason"]
            .as_str()
            .unwrap()
            .contains(&format!("connect {nowhere}")),
        "{p}"
    );
    let m = scrape(&f.mesh, "node1");
    assert_eq!(
        sample(
            &m,
            "istio_tcp_connections_closed_total",
            &[
                ("reporter", "source"),
                ("destination_workload", "unknown"),
                ("destination_service", "unknown"),
                ("response_flags", "CONNECT"),
                ("connection_security_policy", "unknown"),
            ]
        ),
        2,
        "{m}"
    );
    let (_, table) = cli(&f.mesh, "node1", &["connections"]);
    assert!(
        table.lines().any(|l| l.contains("failed")
            && l.contains("passthrough")
            && l.contains(&nowhere.to_string())),
        "{table}"
    );
}

#[test]
fn same_node_connections_are_reported_as_source_and_destination() {
    let pods = vec![
        PodSpec::new("sleep", "node1", "sleep"),
        PodSpec::new("echo1", "node1", "echo"),
    ];
    let mut mesh = Mesh::new(&["node1"], pods, Vec::new()).unwrap();
    mesh.ztunnel_args = vec!["--log-json".into()];
    let _echo1 = AppServer::start(&mesh.netns("echo1"), "echo1", app(&mesh, "echo1")).unwrap();
    mesh.start().unwrap();
    for i in 0..2 {
        let got = echo_roundtrip(&mesh.netns("sleep"), app(&mesh, "echo1"), payload(1000, i));
        assert_eq!(got.unwrap().len(), 1003);
    }
    for reporter in ["source", "destination"] {
        let want = [
            ("reporter", reporter),
            ("source_workload", "sleep"),
            ("source_principal", SLEEP),
            ("destination_workload", "echo1"),
            ("destination_principal", ECHO),
            ("connection_security_policy", "mutual_tls"),
        ];
        wait("same-node connections closed", || {
            sample(
                &scrape(&mesh, "node1"),
                "istio_tcp_connections_closed_total",
                &want,
            ) == 2
        });
        let m = scrape(&mesh, "node1");
        assert_eq!(sample(&m, "istio_tcp_connections_opened_total", &want), 2);
        assert_eq!(sample(&m, "istio_tcp_received_bytes_total", &want), 2000);
        assert_eq!(sample(&m, "istio_tcp_sent_bytes_total", &want), 2006);
    }
    let same = connections(&mesh, "node1", |c| c["path"] == "same-node");
    assert_eq!(same.len(), 2);
    assert_eq!(same[0]["reporter"], "source+destination");
    assert_eq!(same[0]["policy"], "allow");

    // With --log-json, the access log is one JSON object per connection.
    let log = mesh.ztunnel("node1").log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "access")
        .collect();
    assert_eq!(lines.len(), 2, "{log}");
    let fields = &lines[0]["fields"];
    assert_eq!(fields["message"], "connection complete");
    assert_eq!(fields["path"], "same-node");
    assert_eq!(fields["src.identity"], SLEEP);
    assert_eq!(fields["dst.identity"], ECHO);
    assert_eq!(fields["bytes_sent"], 1000);
    assert_eq!(fields["bytes_recv"], 1003);
    assert_eq!(fields["state"], "closed");
}
