use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use super::workload::HealthStatus;
use super::*;
use crate::identity::Identity;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn svc_key() -> NamespacedHostname {
    "default/echo.default.svc.cluster.local".parse().unwrap()
}

fn workload(uid: &str, ns: &str, addr: &str, node: &str) -> Workload {
    let mut w = Workload::new(uid, uid, Identity::new("cluster.local", ns, uid).unwrap());
    w.workload_ips = vec![ip(addr)];
    w.node = node.to_owned();
    w
}

fn echo_service() -> Service {
    Service {
        name: "echo".into(),
        namespace: "default".into(),
        hostname: "echo.default.svc.cluster.local".into(),
        vips: vec![ip("10.96.0.10")],
        ports: BTreeMap::from([(80, 8080), (9000, 0)]),
        subject_alt_names: vec![],
        app_protocols: Default::default(),
        waypoint: None,
    }
}

/// sleep on node-a, echo-1 on node-a, echo-2 on node-b (target port 9090 for 80), echo-3
/// unhealthy, plus the `echo` service.
fn mesh() -> State {
    let mut b = State::builder();
    b.namespace(Namespace {
        name: "default".into(),
        labels: BTreeMap::from([(DATAPLANE_MODE_LABEL.into(), "ambient".into())]),
    })
    .unwrap();
    b.namespace(Namespace {
        name: "legacy".into(),
        labels: BTreeMap::new(),
    })
    .unwrap();
    b.workload(workload("sleep", "default", "10.0.0.1", "node-a"))
        .unwrap();
    let mut e1 = workload("echo-1", "default", "10.0.0.2", "node-a");
    e1.services
        .insert(svc_key(), BTreeMap::from([(9000, 9001)]));
    b.workload(e1).unwrap();
    let mut e2 = workload("echo-2", "default", "10.0.1.2", "node-b");
    e2.services.insert(svc_key(), BTreeMap::from([(80, 9090)]));
    b.workload(e2).unwrap();
    let mut e3 = workload("echo-3", "default", "10.0.1.3", "node-b");
    e3.services.insert(svc_key(), BTreeMap::new());
    e3.status = HealthStatus::Unhealthy;
    b.workload(e3).unwrap();
    b.workload(workload("old", "legacy", "10.0.1.9", "node-b"))
        .unwrap();
    b.service(echo_service()).unwrap();
    b.build()
}

fn endpoint_addrs(d: &Destination) -> Vec<(String, SocketAddr)> {
    match d {
        Destination::Service { endpoints, .. } => {
            endpoints.iter().map(|(w, a)| (w.uid.clone(), *a)).collect()
        }
        other => panic!("not a service: {other:?}"),
    }
}

#[test]
fn lookups() {
    let s = mesh();
    assert_eq!(s.workload_by_ip(ip("10.0.0.2")).unwrap().uid, "echo-1");
    assert!(s.workload_by_ip(ip("10.0.0.99")).is_none());
    assert_eq!(
        s.workload_by_uid("echo-2").unwrap().workload_ips,
        [ip("10.0.1.2")]
    );
    assert!(s.workload_by_uid("nope").is_none());
    assert_eq!(s.service_by_vip(ip("10.96.0.10")).unwrap().name, "echo");
    assert!(s.service_by_vip(ip("10.0.0.2")).is_none());
    assert_eq!(s.service(&svc_key()).unwrap().vips, [ip("10.96.0.10")]);
}

#[test]
fn resolve_destinations() {
    let s = mesh();
    match s.resolve(sa("10.0.0.2:8080")) {
        Destination::Workload(w, addr) => {
            assert_eq!(w.uid, "echo-1");
            assert_eq!(addr, sa("10.0.0.2:8080"));
        }
        other => panic!("{other:?}"),
    }
    // Port 80: echo-1 uses the service's target port, echo-2 its own; echo-3 is unhealthy.
    assert_eq!(
        endpoint_addrs(&s.resolve(sa("10.96.0.10:80"))),
        [
            ("echo-1".to_owned(), sa("10.0.0.2:8080")),
            ("echo-2".to_owned(), sa("10.0.1.2:9090"))
        ]
    );
    // Port 9000 has target 0 in the service: only echo-1 names a port for it.
    assert_eq!(
        endpoint_addrs(&s.resolve(sa("10.96.0.10:9000"))),
        [("echo-1".to_owned(), sa("10.0.0.2:9001"))]
    );
    // An undeclared port has no endpoints.
    assert_eq!(endpoint_addrs(&s.resolve(sa("10.96.0.10:81"))), []);
    assert_eq!(s.resolve(sa("1.1.1.1:443")), Destination::Unknown);
}

#[test]
fn local_workloads_by_node() {
    let s = mesh();
    let uids = |node: &str| -> Vec<String> {
        s.local_workloads(node)
            .iter()
            .map(|w| w.uid.clone())
            .collect()
    };
    assert_eq!(uids("node-a"), ["echo-1", "sleep"]);
    assert_eq!(uids("node-b"), ["echo-2", "echo-3", "old"]);
    assert!(uids("node-c").is_empty());
}

#[test]
fn capture_follows_namespace_and_workload_labels() {
    let s = mesh();
    let mut sleep = (*s.workload_by_uid("sleep").unwrap()).clone();
    assert!(s.is_captured(&sleep));
    sleep
        .labels
        .insert(DATAPLANE_MODE_LABEL.into(), "none".into());
    assert!(!s.is_captured(&sleep));
    sleep
        .labels
        .insert(DATAPLANE_MODE_LABEL.into(), "ambient".into());
    assert!(s.is_captured(&sleep));
    // Namespace without the label, and a namespace that is not declared at all.
    assert!(!s.is_captured(&s.workload_by_uid("old").unwrap()));
    let stray = workload("stray", "nowhere", "10.9.9.9", "node-a");
    assert!(!s.is_captured(&stray));
}

#[test]
fn capture_by_protocol_ignores_namespace_labels() {
    let mut b = State::builder();
    b.capture_by_protocol(true);
    // A labelled namespace changes nothing in this mode.
    b.namespace(Namespace {
        name: "default".into(),
        labels: BTreeMap::from([(DATAPLANE_MODE_LABEL.into(), "ambient".into())]),
    })
    .unwrap();
    let s = b.build();
    assert!(s.captures_by_protocol());
    let mut w = workload("w", "anywhere", "10.0.0.1", "n");
    assert!(!s.is_captured(&w), "TCP workload captured");
    w.protocol = Protocol::Hbone;
    assert!(s.is_captured(&w));
    w.labels.insert(DATAPLANE_MODE_LABEL.into(), "none".into());
    assert!(!s.is_captured(&w), "opt-out label ignored");
    let mut tcp_in_ambient_ns = workload("x", "default", "10.0.0.2", "n");
    tcp_in_ambient_ns.protocol = Protocol::Tcp;
    assert!(!s.is_captured(&tcp_in_ambient_ns));
}

#[test]
fn duplicates_are_rejected() {
    let mut b = State::builder();
    b.workload(workload("a", "default", "10.0.0.1", "n"))
        .unwrap();
    assert_eq!(
        b.workload(workload("a", "default", "10.0.0.2", "n")),
        Err(StateError::DuplicateUid("a".into()))
    );
    assert_eq!(
        b.workload(workload("b", "default", "10.0.0.1", "n")),
        Err(StateError::DuplicateAddress {
            ip: ip("10.0.0.1"),
            other: "workload a".into()
        })
    );
    b.service(echo_service()).unwrap();
    assert_eq!(
        b.service(echo_service()),
        Err(StateError::DuplicateService(
            "default/echo.default.svc.cluster.local".into()
        ))
    );
    let mut other = echo_service();
    other.hostname = "other".into();
    other.vips = vec![ip("10.0.0.1")];
    assert!(matches!(
        b.service(other),
        Err(StateError::DuplicateAddress { .. })
    ));
    let mut c = workload("c", "default", "10.96.0.10", "n");
    c.uid = "c".into();
    assert_eq!(
        b.workload(c),
        Err(StateError::DuplicateAddress {
            ip: ip("10.96.0.10"),
            other: "service default/echo.default.svc.cluster.local".into()
        })
    );
    b.namespace(Namespace {
        name: "x".into(),
        ..Namespace::default()
    })
    .unwrap();
    assert!(
        b.namespace(Namespace {
            name: "x".into(),
            ..Namespace::default()
        })
        .is_err()
    );
}

#[test]
fn pick_endpoint_is_deterministic_and_covers_all() {
    let eps = ["a", "b", "c"];
    assert_eq!(pick_endpoint(&eps, 0), Some(&"a"));
    assert_eq!(pick_endpoint(&eps, 4), Some(&"b"));
    assert_eq!(pick_endpoint(&eps, u64::MAX), Some(&"a"));
    let picked: std::collections::BTreeSet<_> =
        (0..3).filter_map(|s| pick_endpoint(&eps, s)).collect();
    assert_eq!(picked.len(), 3);
    assert_eq!(pick_endpoint::<&str>(&[], 7), None);
}

#[test]
fn a_state_is_complete_unless_marked_and_keeps_the_mark_through_discovery() {
    assert_eq!(State::builder().build().incomplete(), None);
    let mut b = State::builder();
    b.workload(workload("a", "default", "10.0.0.1", "n1"))
        .unwrap();
    b.incomplete("waiting");
    let state = b.build();
    assert_eq!(state.incomplete(), Some("waiting"));
    let placed = state.with_netns(&BTreeMap::from([("a".to_owned(), "/ns/a".into())]));
    assert_eq!(placed.incomplete(), Some("waiting"));
    assert_eq!(
        placed.workload_by_uid("a").unwrap().netns,
        Some("/ns/a".into())
    );
}
