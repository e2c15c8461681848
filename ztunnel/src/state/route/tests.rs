//! `route` on meshes written as local config, so the `istio.io/use-waypoint` labels go
//! through the same resolution as a real file; and the identities a destination trusts to
//! forward the original client.

use std::net::SocketAddr;

use super::*;
use crate::state::authz::policy_source;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

const ECHO: &str = "default/echo.default.svc.cluster.local";
const ECHO_VIP: &str = "10.96.0.10:80";
const WP_IDENTITY: &str = "spiffe://cluster.local/ns/default/sa/wp";

/// sleep and echo-1 on node-a, echo-2 on node-b (both behind `echo`, VIP 10.96.0.10), the
/// waypoint pod wp-1 (service `wp`, VIP 10.96.0.99, not captured) on node-b, a pod outside
/// the mesh in `legacy`, and the service `plain` (VIP 10.96.0.11) on echo-2. `ns_labels`
/// are the extra labels of `default`, `echo_extra` and `plain_extra` extra YAML of those
/// services, `workloads` more workloads.
fn mesh(ns_labels: &str, echo_extra: &str, plain_extra: &str, workloads: &str) -> State {
    let yaml = format!(
        r#"
namespaces:
  - name: default
    labels: {{istio.io/dataplane-mode: ambient{ns_labels}}}
  - name: legacy
workloads:
  - {{name: sleep, namespace: default, serviceAccount: sleep, workloadIps: ["10.0.0.1"], protocol: HBONE, node: node-a}}
  - {{name: echo-1, namespace: default, serviceAccount: echo, workloadIps: ["10.0.0.2"], protocol: HBONE, node: node-a,
      services: {{"{ECHO}": {{80: 8080}}}}}}
  - {{name: echo-2, namespace: default, serviceAccount: echo, workloadIps: ["10.0.1.2"], protocol: HBONE, node: node-b,
      services: {{"{ECHO}": {{80: 8080}}, "default/plain.default.svc.cluster.local": {{80: 8080}}}}}}
  - {{name: wp-1, namespace: default, serviceAccount: wp, workloadIps: ["10.0.2.1"], protocol: HBONE, node: node-b,
      labels: {{istio.io/dataplane-mode: none}},
      services: {{"default/wp.default.svc.cluster.local": {{15008: 15008}}}}}}
  - {{name: old, namespace: legacy, workloadIps: ["10.0.3.1"], node: node-b}}
{workloads}
services:
  - {{name: echo, namespace: default, hostname: echo.default.svc.cluster.local, vips: ["/10.96.0.10"],
      ports: {{80: 8080}}{echo_extra}}}
  - {{name: plain, namespace: default, hostname: plain.default.svc.cluster.local, vips: ["/10.96.0.11"],
      ports: {{80: 8080}}{plain_extra}}}
  - {{name: wp, namespace: default, hostname: wp.default.svc.cluster.local, vips: ["/10.96.0.99"],
      ports: {{15008: 15008}}}}
  - {{name: lonely, namespace: default, hostname: lonely.default.svc.cluster.local, vips: ["/10.96.0.98"],
      ports: {{15008: 15008}}}}
"#
    );
    crate::source::local::parse("mesh.yaml", &yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

fn labelled(value: &str) -> String {
    format!(", labels: {{istio.io/use-waypoint: {value}}}")
}

fn workload(state: &State, ip: &str) -> Arc<Workload> {
    state.workload_by_ip(ip.parse().unwrap()).unwrap()
}

/// The route from `src` (by address) to `dst`, with nothing on this node.
fn from(state: &State, src: &str, dst: &str, seed: u64) -> Routed {
    route(state, &workload(state, src), sa(dst), seed, |_| false)
}

fn expect_waypoint(r: &Routed, peer: &str, authority: &str) -> WaypointRoute {
    match &r.route {
        Route::Waypoint(wp) => {
            assert_eq!(wp.peer, sa(peer));
            assert_eq!(wp.authority, sa(authority));
            assert_eq!(wp.identity.to_string(), WP_IDENTITY);
            wp.clone()
        }
        other => panic!("not through the waypoint: {other:?}"),
    }
}

fn expect_hbone_to_echo(r: &Routed) {
    match &r.route {
        Route::Hbone { workload, peer, .. } => {
            assert!(workload.name.starts_with("echo-"), "{workload}");
            assert_eq!(peer.port(), 15008);
        }
        other => panic!("not the L4 HBONE path: {other:?}"),
    }
}

fn expect_unavailable(r: &Routed, target: &str, waypoint: &str, why: &str) {
    match &r.route {
        Route::Refused(refusal @ Refusal::WaypointUnavailable { .. }) => {
            assert_eq!(refusal.kind(), "waypoint_unavailable");
            let text = refusal.to_string();
            for part in [target, waypoint, why] {
                assert!(text.contains(part), "{text:?} lacks {part:?}");
            }
        }
        other => panic!("not refused for the waypoint: {other:?}"),
    }
}

#[test]
fn a_service_with_a_waypoint_goes_through_it_even_on_the_same_node() {
    let s = mesh("", &labelled("wp"), "", "");
    let r = from(&s, "10.0.0.1", ECHO_VIP, 7);
    assert_eq!(r.service.as_ref().unwrap().key().to_string(), ECHO);
    let wp = expect_waypoint(&r, "10.0.2.1:15008", ECHO_VIP);
    assert_eq!(wp.waypoint.name, "wp-1");
    // Every address on this node: still the waypoint, never the same-node shortcut.
    let sleep = workload(&s, "10.0.0.1");
    for seed in 0..4 {
        let r = route(&s, &sleep, sa(ECHO_VIP), seed, |_| true);
        expect_waypoint(&r, "10.0.2.1:15008", ECHO_VIP);
    }
    // The workload-API field itself, as istiod sends it, works the same.
    let field =
        ", waypoint: {destination: default/wp.default.svc.cluster.local, hboneMtlsPort: 15008}";
    let s = mesh("", field, "", "");
    expect_waypoint(
        &from(&s, "10.0.0.1", ECHO_VIP, 0),
        "10.0.2.1:15008",
        ECHO_VIP,
    );
}

#[test]
fn a_namespace_label_applies_to_its_services_and_none_opts_one_out() {
    let ns = ", istio.io/use-waypoint: wp";
    let s = mesh(ns, "", &labelled("none"), "");
    expect_waypoint(
        &from(&s, "10.0.0.1", ECHO_VIP, 0),
        "10.0.2.1:15008",
        ECHO_VIP,
    );
    // `plain` opted out: L4 to its endpoint echo-2.
    let r = from(&s, "10.0.0.1", "10.96.0.11:80", 0);
    expect_hbone_to_echo(&r);
    // A waypoint in another namespace, named next to the label.
    let ns = ", istio.io/use-waypoint: wp, istio.io/use-waypoint-namespace: infra";
    let s = mesh(ns, "", "", "");
    expect_unavailable(
        &from(&s, "10.0.0.1", ECHO_VIP, 0),
        ECHO,
        "infra/wp.infra.svc.cluster.local",
        "no such service",
    );
}

#[test]
fn a_pod_addressed_directly_keeps_l4_unless_it_has_its_own_waypoint() {
    let pod_wp = r#"  - {name: echo-3, namespace: default, serviceAccount: echo, workloadIps: ["10.0.1.3"], protocol: HBONE, node: node-b,
      labels: {istio.io/use-waypoint: wp}}"#;
    let s = mesh("", &labelled("wp"), "", pod_wp);
    // echo-2's service has a waypoint; echo-2 itself has none.
    let r = from(&s, "10.0.0.1", "10.0.1.2:8080", 0);
    assert_eq!(r.service, None);
    assert_eq!(
        r.route,
        Route::Hbone {
            workload: workload(&s, "10.0.1.2"),
            addr: sa("10.0.1.2:8080"),
            peer: sa("10.0.1.2:15008"),
        }
    );
    // echo-3's own label: its address goes to the waypoint, with the pod address as authority.
    let r = from(&s, "10.0.0.1", "10.0.1.3:8080", 0);
    assert_eq!(r.service, None);
    expect_waypoint(&r, "10.0.2.1:15008", "10.0.1.3:8080");
}

#[test]
fn an_unavailable_waypoint_refuses_the_connection() {
    // A waypoint service without endpoints.
    let s = mesh("", &labelled("lonely"), "", "");
    expect_unavailable(
        &from(&s, "10.0.0.1", ECHO_VIP, 0),
        ECHO,
        "default/lonely.default.svc.cluster.local",
        "no healthy endpoint",
    );
    // A waypoint nobody defined.
    let s = mesh("", &labelled("ghost"), "", "");
    expect_unavailable(
        &from(&s, "10.0.0.1", ECHO_VIP, 0),
        ECHO,
        "default/ghost.default.svc.cluster.local",
        "no such service",
    );
    // Only an unhealthy waypoint pod.
    let sick = r#"  - {name: wp-sick, namespace: default, serviceAccount: wp, workloadIps: ["10.0.2.9"], protocol: HBONE, node: node-b,
      status: Unhealthy, services: {"default/lonely.default.svc.cluster.local": {15008: 15008}}}"#;
    let s = mesh("", &labelled("lonely"), "", sick);
    expect_unavailable(
        &from(&s, "10.0.0.1", ECHO_VIP, 0),
        ECHO,
        "lonely",
        "no healthy endpoint",
    );
    // An address that is nothing.
    let by_ip = ", waypoint: {destination: /10.0.9.9, hboneMtlsPort: 15008}";
    let s = mesh("", by_ip, "", "");
    expect_unavailable(
        &from(&s, "10.0.0.1", ECHO_VIP, 0),
        ECHO,
        "10.0.9.9",
        "neither a workload nor a service VIP",
    );
    // A pod whose own waypoint is gone: refused too, not delivered around it.
    let pod_wp = r#"  - {name: echo-3, namespace: default, serviceAccount: echo, workloadIps: ["10.0.1.3"], protocol: HBONE, node: node-b,
      labels: {istio.io/use-waypoint: lonely}}"#;
    let s = mesh("", "", "", pod_wp);
    expect_unavailable(
        &from(&s, "10.0.0.1", "10.0.1.3:8080", 0),
        "default/echo-3",
        "lonely",
        "no healthy endpoint",
    );
}

#[test]
fn a_waypoint_given_by_address() {
    // The waypoint pod's own address.
    let s = mesh(
        "",
        ", waypoint: {destination: /10.0.2.1, hboneMtlsPort: 15008}",
        "",
        "",
    );
    expect_waypoint(
        &from(&s, "10.0.0.1", ECHO_VIP, 0),
        "10.0.2.1:15008",
        ECHO_VIP,
    );
    // The waypoint service's VIP, on another HBONE port.
    let s = mesh(
        "",
        ", waypoint: {destination: net1/10.96.0.99, hboneMtlsPort: 15088}",
        "",
        "",
    );
    expect_waypoint(
        &from(&s, "10.0.0.1", ECHO_VIP, 0),
        "10.0.2.1:15088",
        ECHO_VIP,
    );
}

#[test]
fn the_waypoint_itself_goes_direct() {
    let pod_wp = r#"  - {name: echo-3, namespace: default, serviceAccount: echo, workloadIps: ["10.0.1.3"], protocol: HBONE, node: node-b,
      labels: {istio.io/use-waypoint: wp}, services: {"default/echo.default.svc.cluster.local": {80: 8080}}}"#;
    let s = mesh("", &labelled("wp"), "", pod_wp);
    for seed in 0..6 {
        expect_hbone_to_echo(&from(&s, "10.0.2.1", ECHO_VIP, seed));
    }
    expect_hbone_to_echo(&from(&s, "10.0.2.1", "10.0.1.3:8080", 0));
    // Named by address: the same.
    for dst in ["/10.0.2.1", "/10.96.0.99"] {
        let extra = format!(", waypoint: {{destination: {dst}, hboneMtlsPort: 15008}}");
        let s = mesh("", &extra, "", "");
        expect_hbone_to_echo(&from(&s, "10.0.2.1", ECHO_VIP, 0));
        // Anyone else still goes through it.
        expect_waypoint(
            &from(&s, "10.0.0.1", ECHO_VIP, 0),
            "10.0.2.1:15008",
            ECHO_VIP,
        );
    }
}

#[test]
fn the_seed_picks_among_waypoint_pods() {
    let second = r#"  - {name: wp-2, namespace: default, serviceAccount: wp, workloadIps: ["10.0.2.2"], protocol: HBONE, node: node-a,
      labels: {istio.io/dataplane-mode: none},
      services: {"default/wp.default.svc.cluster.local": {15008: 15008}}}"#;
    let s = mesh("", &labelled("wp"), "", second);
    let mut peers: Vec<String> = (0..4)
        .map(|seed| match from(&s, "10.0.0.1", ECHO_VIP, seed).route {
            Route::Waypoint(wp) => wp.peer.to_string(),
            other => panic!("{other:?}"),
        })
        .collect();
    peers.sort();
    peers.dedup();
    assert_eq!(peers, ["10.0.2.1:15008", "10.0.2.2:15008"]);
}

#[test]
fn paths_without_a_waypoint_are_unchanged() {
    let s = mesh("", "", "", "");
    let sleep = workload(&s, "10.0.0.1");
    // Unknown address: passthrough.
    assert_eq!(
        from(&s, "10.0.0.1", "192.0.2.1:443", 0).route,
        Route::Passthrough {
            addr: sa("192.0.2.1:443"),
            workload: None
        }
    );
    // A workload not captured: passthrough, named.
    assert_eq!(
        from(&s, "10.0.0.1", "10.0.3.1:80", 0).route,
        Route::Passthrough {
            addr: sa("10.0.3.1:80"),
            workload: Some(workload(&s, "10.0.3.1"))
        }
    );
    // On this node: same node; elsewhere: HBONE.
    let local = |ip: std::net::IpAddr| ip.to_string() == "10.0.0.2";
    assert_eq!(
        route(&s, &sleep, sa("10.0.0.2:8080"), 0, local).route,
        Route::SameNode {
            workload: workload(&s, "10.0.0.2"),
            addr: sa("10.0.0.2:8080")
        }
    );
    assert!(matches!(
        route(&s, &sleep, sa("10.0.1.2:8080"), 0, local).route,
        Route::Hbone { .. }
    ));
    // A service without endpoints for the port.
    let r = from(&s, "10.0.0.1", "10.96.0.98:15008", 0);
    assert_eq!(
        r.route,
        Route::Refused(Refusal::NoHealthyEndpoint {
            service: "lonely.default.svc.cluster.local".into(),
            port: 15008
        })
    );
    if let Route::Refused(refusal) = &r.route {
        assert_eq!(
            refusal.to_string(),
            "service lonely.default.svc.cluster.local has no healthy endpoint for port 15008"
        );
    }
}

#[test]
fn a_destination_trusts_forwarded_only_from_its_own_waypoints() {
    let pod_wp = r#"  - {name: echo-3, namespace: default, serviceAccount: echo3, workloadIps: ["10.0.1.3"], protocol: HBONE, node: node-b,
      labels: {istio.io/use-waypoint: wp}}"#;
    let s = mesh("", &labelled("wp"), "", pod_wp);
    let ids = |ip: &str| -> Vec<String> {
        s.waypoint_identities(&workload(&s, ip))
            .iter()
            .map(ToString::to_string)
            .collect()
    };
    // echo-2: through its service `echo`; echo-3: its own label; sleep: none.
    assert_eq!(ids("10.0.1.2"), [WP_IDENTITY]);
    assert_eq!(ids("10.0.1.3"), [WP_IDENTITY]);
    assert!(ids("10.0.0.1").is_empty());

    let peer = sa("10.0.2.1:40000");
    let client = sa("10.0.0.1:5555");
    let claimed = Some(client);
    let echo2 = s.waypoint_identities(&workload(&s, "10.0.1.2"));
    let waypoint_id = workload(&s, "10.0.2.1").identity();
    let sleep_id = workload(&s, "10.0.0.1").identity();
    // The waypoint passes the original client on.
    assert_eq!(policy_source(peer, claimed, &waypoint_id, &echo2), client);
    // Anyone else is judged by its own address, whatever it claims.
    assert_eq!(policy_source(peer, claimed, &sleep_id, &echo2), peer);
    // A destination without a waypoint trusts no one, the waypoint included.
    let sleep_trusts = s.waypoint_identities(&workload(&s, "10.0.0.1"));
    assert_eq!(
        policy_source(peer, claimed, &waypoint_id, &sleep_trusts),
        peer
    );
    // The service's waypoint opted out (`none`): no longer trusted by its endpoints.
    let s = mesh("", &labelled("none"), "", "");
    assert!(s.waypoint_identities(&workload(&s, "10.0.1.2")).is_empty());
}
