use std::collections::HashMap;

use super::*;
use crate::state::workload::{GatewayDestination, HealthStatus};

fn v4(a: [u8; 4]) -> Vec<u8> {
    a.to_vec()
}

fn pb_workload(uid: &str, ip: [u8; 4]) -> pbw::Workload {
    pbw::Workload {
        uid: uid.into(),
        name: "echo-1".into(),
        namespace: "default".into(),
        addresses: vec![v4(ip)],
        tunnel_protocol: pbw::TunnelProtocol::Hbone as i32,
        node: "node-a".into(),
        service_account: "echo".into(),
        ..Default::default()
    }
}

#[test]
fn workload_with_every_field_we_use() {
    let mut pb = pb_workload("Kubernetes//Pod/default/echo-1", [10, 0, 0, 5]);
    pb.addresses
        .push("fd00::5".parse::<Ipv6Addr>().unwrap().octets().to_vec());
    pb.status = pbw::WorkloadStatus::Unhealthy as i32;
    pb.canonical_name = "echo".into();
    pb.canonical_revision = "v1".into();
    pb.cluster_id = "c1".into();
    pb.authorization_policies = vec!["default/allow".into()];
    pb.services = HashMap::from([(
        "default/echo.default.svc.cluster.local".into(),
        pbw::PortList {
            ports: vec![pbw::Port {
                service_port: 80,
                target_port: 8080,
                ..Default::default()
            }],
        },
    )]);
    pb.waypoint = Some(pbw::GatewayAddress {
        destination: Some(pbw::gateway_address::Destination::Address(
            pbw::NetworkAddress {
                network: String::new(),
                address: v4([10, 0, 0, 9]),
                length: None,
            },
        )),
        hbone_mtls_port: 15008,
    });
    let w = workload(pb, "td").unwrap();
    assert_eq!(w.uid, "Kubernetes//Pod/default/echo-1");
    assert_eq!(w.identity().to_string(), "spiffe://td/ns/default/sa/echo");
    assert_eq!(
        w.workload_ips,
        vec![
            "10.0.0.5".parse::<IpAddr>().unwrap(),
            "fd00::5".parse().unwrap()
        ]
    );
    assert_eq!(w.protocol, Protocol::Hbone);
    assert_eq!(w.status, HealthStatus::Unhealthy);
    assert_eq!(w.node, "node-a");
    assert_eq!(w.cluster_id, "c1");
    assert_eq!(w.labels["app"], "echo");
    assert_eq!(w.labels["version"], "v1");
    assert_eq!(w.authorization_policies, ["default/allow"]);
    let svc: NamespacedHostname = "default/echo.default.svc.cluster.local".parse().unwrap();
    assert_eq!(w.services[&svc], BTreeMap::from([(80, 8080)]));
    assert_eq!(
        w.waypoint,
        Some(GatewayAddress {
            destination: GatewayDestination::Address("10.0.0.9".parse().unwrap()),
            hbone_mtls_port: 15008
        })
    );
    assert_eq!(w.netns, None);
}

#[test]
fn workload_defaults_are_istios() {
    let mut pb = pb_workload("u", [10, 0, 0, 5]);
    pb.service_account.clear();
    pb.tunnel_protocol = pbw::TunnelProtocol::None as i32;
    let w = workload(pb, "cluster.local").unwrap();
    assert_eq!(
        w.identity().to_string(),
        "spiffe://cluster.local/ns/default/sa/default"
    );
    assert_eq!(w.cluster_id, "Kubernetes");
    assert_eq!(w.protocol, Protocol::Tcp);
    assert_eq!(w.status, HealthStatus::Healthy);
}

#[test]
fn workload_errors_name_the_resource_and_every_field() {
    let mut pb = pb_workload("Kubernetes//Pod/ns/x", [10, 0, 0, 5]);
    pb.addresses = vec![vec![1, 2, 3, 4, 5]];
    pb.tunnel_protocol = 7;
    pb.services = HashMap::from([
        (
            "default/echo".into(),
            pbw::PortList {
                ports: vec![pbw::Port {
                    service_port: 70000,
                    target_port: 1,
                    ..Default::default()
                }],
            },
        ),
        ("no-slash".into(), pbw::PortList::default()),
    ]);
    pb.waypoint = Some(pbw::GatewayAddress {
        destination: None,
        hbone_mtls_port: 15008,
    });
    let err = workload(pb, "td").unwrap_err();
    assert_eq!(err.resource, "workload \"Kubernetes//Pod/ns/x\"");
    assert_eq!(
        err.problems,
        [
            "addresses[0]: 5 bytes is not an IP address",
            "tunnel_protocol: unknown value 7",
            "services[\"default/echo\"].ports[0].service_port: 70000 is not a port (1 to 65535)",
            "services[\"no-slash\"]: key is not <namespace>/<hostname>",
            "waypoint.destination: neither address nor hostname is set",
        ]
    );
    assert!(
        err.to_string().starts_with(
            "workload \"Kubernetes//Pod/ns/x\": addresses[0]: 5 bytes is not an IP address; "
        ),
        "{err}"
    );

    let mut pb = pb_workload("", [10, 0, 0, 5]);
    pb.namespace = "a/b".into();
    let err = workload(pb, "td").unwrap_err();
    assert_eq!(err.problems.len(), 2, "{err}");
    assert!(err.problems[0].starts_with("uid: is required"), "{err}");
    assert!(err.problems[1].starts_with("namespace: \"a/b\""), "{err}");
}

fn pb_service() -> pbw::Service {
    pbw::Service {
        name: "echo".into(),
        namespace: "default".into(),
        hostname: "echo.default.svc.cluster.local".into(),
        addresses: vec![pbw::NetworkAddress {
            network: "net1".into(),
            address: v4([10, 96, 0, 10]),
            length: None,
        }],
        ports: vec![
            pbw::Port {
                service_port: 80,
                target_port: 8080,
                ..Default::default()
            },
            pbw::Port {
                service_port: 90,
                target_port: 0,
                app_protocol: pbw::AppProtocol::Grpc as i32,
            },
        ],
        subject_alt_names: vec!["spiffe://td/ns/default/sa/other".into()],
        waypoint: Some(pbw::GatewayAddress {
            destination: Some(pbw::gateway_address::Destination::Hostname(
                pbw::NamespacedHostname {
                    namespace: "default".into(),
                    hostname: "waypoint.default.svc.cluster.local".into(),
                },
            )),
            hbone_mtls_port: 15008,
        }),
        ..Default::default()
    }
}

#[test]
fn service_converts() {
    let s = service(pb_service()).unwrap();
    assert_eq!(
        s.key().to_string(),
        "default/echo.default.svc.cluster.local"
    );
    assert_eq!(s.vips, vec!["10.96.0.10".parse::<IpAddr>().unwrap()]);
    assert_eq!(s.ports, BTreeMap::from([(80, 8080), (90, 0)]));
    // Port 80 declares no protocol; 90 is gRPC.
    assert_eq!(
        s.app_protocols,
        BTreeMap::from([(90, crate::state::service::AppProtocol::Grpc)])
    );
    assert_eq!(s.subject_alt_names, ["spiffe://td/ns/default/sa/other"]);
    assert!(matches!(
        s.waypoint.unwrap().destination,
        GatewayDestination::Hostname(h) if h.hostname == "waypoint.default.svc.cluster.local"
    ));
}

#[test]
fn service_errors() {
    let mut pb = pb_service();
    pb.addresses[0].address = vec![];
    pb.ports[0].service_port = 0;
    pb.name.clear();
    let err = service(pb).unwrap_err();
    assert_eq!(
        err.to_string(),
        "service \"default/echo.default.svc.cluster.local\": name: is required; \
         addresses[0].address: 0 bytes is not an IP address; \
         ports[0].service_port: 0 is not a port (1 to 65535)"
    );
}

fn exact(s: &str) -> pbs::StringMatch {
    pbs::StringMatch {
        match_type: Some(pbs::string_match::MatchType::Exact(s.into())),
    }
}

fn pb_policy() -> pbs::Authorization {
    let m = pbs::Match {
        namespaces: vec![exact("default")],
        not_principals: vec![pbs::StringMatch {
            match_type: Some(pbs::string_match::MatchType::Presence(())),
        }],
        service_accounts: vec![pbs::ServiceAccountMatch {
            namespace: "default".into(),
            service_account: "sleep".into(),
        }],
        source_ips: vec![pbs::Address {
            address: v4([10, 0, 0, 0]),
            length: 8,
        }],
        destination_ports: vec![80],
        ..Default::default()
    };
    pbs::Authorization {
        name: "deny-sleep".into(),
        namespace: "default".into(),
        scope: pbs::Scope::WorkloadSelector as i32,
        action: pbs::Action::Deny as i32,
        rules: vec![pbs::Rule {
            clauses: vec![pbs::Clause { matches: vec![m] }],
        }],
        dry_run: true,
        ..Default::default()
    }
}

#[test]
fn authorization_converts() {
    let p = authorization(pb_policy()).unwrap();
    assert_eq!(p.key(), "default/deny-sleep");
    assert_eq!(p.scope, Scope::WorkloadSelector);
    assert_eq!(p.action, Action::Deny);
    assert!(p.dry_run);
    let m = &p.rules[0][0][0];
    assert_eq!(m.namespaces, [StringMatch::Exact("default".into())]);
    assert_eq!(m.not_principals, [StringMatch::Presence]);
    assert_eq!(m.service_accounts[0].service_account, "sleep");
    assert_eq!(m.source_ips, ["10.0.0.0/8".parse::<Cidr>().unwrap()]);
    assert_eq!(m.destination_ports, [80]);
}

#[test]
fn authorization_errors() {
    let mut pb = pb_policy();
    pb.action = 5;
    let m = &mut pb.rules[0].clauses[0].matches[0];
    m.namespaces.push(pbs::StringMatch { match_type: None });
    m.source_ips[0].length = 33;
    m.not_destination_ports = vec![0];
    let err = authorization(pb).unwrap_err();
    let at = "rules[0].clauses[0].matches[0]";
    assert_eq!(
        err.problems,
        [
            "action: unknown value 5".to_owned(),
            format!(
                "{at}.namespaces[1]: match_type is not set (exact, prefix, suffix or presence)"
            ),
            format!("{at}.source_ips[0].length: 33 is longer than the address 10.0.0.0"),
            format!("{at}.not_destination_ports[0]: 0 is not a port (1 to 65535)"),
        ]
    );
    assert_eq!(err.resource, "policy \"default/deny-sleep\"");
}

#[test]
fn address_without_a_type_is_an_error() {
    let err = address("x", pbw::Address { r#type: None }, "td").unwrap_err();
    assert_eq!(
        err.to_string(),
        "address \"x\": type: neither workload nor service is set"
    );
}
