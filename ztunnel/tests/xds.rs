//! The xDS client against an in-process delta ADS server over real gRPC: subscription with
//! istiod's node id and auth headers, ACK, NACK with the rest applied, removals, and a server
//! that goes away and comes back.

mod support;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use tokio::sync::watch;

use support::DEADLINE;
use support::xds::{Stream_, XdsServer};
use ztunnel::grpc::GrpcTarget;
use ztunnel::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use ztunnel::proto::istio::security as pbs;
use ztunnel::proto::istio::workload as pbw;
use ztunnel::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use ztunnel::source::xds::{self, Backoff, NodeInfo, XdsClient, XdsConfig};
use ztunnel::state::{Destination, State};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn octets(s: &str) -> Vec<u8> {
    match ip(s) {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn workload(uid: &str, addr: &str, hbone: bool) -> pbw::Workload {
    let protocol = if hbone {
        pbw::TunnelProtocol::Hbone
    } else {
        pbw::TunnelProtocol::None
    };
    pbw::Workload {
        uid: uid.into(),
        name: uid.into(),
        namespace: "default".into(),
        service_account: uid.into(),
        addresses: vec![octets(addr)],
        tunnel_protocol: protocol as i32,
        node: "node-a".into(),
        ..Default::default()
    }
}

fn as_address(w: pbw::Workload) -> pbw::Address {
    pbw::Address {
        r#type: Some(pbw::address::Type::Workload(w)),
    }
}

fn resource(type_url: &str, name: &str, version: &str, body: Vec<u8>) -> Resource {
    Resource {
        name: name.into(),
        version: version.into(),
        resource: Some(prost_types::Any {
            type_url: type_url.into(),
            value: body,
        }),
        ..Default::default()
    }
}

fn address(name: &str, version: &str, a: pbw::Address) -> Resource {
    resource(ADDRESS_TYPE_URL, name, version, a.encode_to_vec())
}

fn addresses(nonce: &str, resources: Vec<Resource>, removed: &[&str]) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: ADDRESS_TYPE_URL.into(),
        nonce: nonce.into(),
        resources,
        removed_resources: removed.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn echo_service() -> pbw::Address {
    pbw::Address {
        r#type: Some(pbw::address::Type::Service(pbw::Service {
            name: "echo".into(),
            namespace: "default".into(),
            hostname: "echo.default.svc.cluster.local".into(),
            addresses: vec![pbw::NetworkAddress {
                network: String::new(),
                address: octets("10.96.0.10"),
                length: None,
            }],
            ports: vec![pbw::Port {
                service_port: 80,
                target_port: 8080,
                ..Default::default()
            }],
            ..Default::default()
        })),
    }
}

struct Harness {
    server: XdsServer,
    client: XdsClient,
    states: watch::Receiver<Arc<State>>,
    _token: tempfile::NamedTempFile,
}

async fn start() -> Harness {
    let server = XdsServer::start("127.0.0.1:0".parse().unwrap()).await;
    let token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token.path(), "test-token\n").unwrap();
    let config = XdsConfig {
        target: GrpcTarget {
            address: server.url(),
            root_cert: None,
            token_file: Some(token.path().to_owned()),
            cluster_id: "cluster-1".into(),
        },
        node: NodeInfo {
            node_name: "node-a".into(),
            pod_name: "ztunnel-x1".into(),
            pod_namespace: "istio-system".into(),
            instance_ip: "10.1.0.7".into(),
            cluster_id: "cluster-1".into(),
        },
        trust_domain: "cluster.local".into(),
        backoff: Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(100),
        },
        netns_dir: None,
    };
    let mut empty = State::builder();
    empty.capture_by_protocol(true);
    let (tx, states) = watch::channel(Arc::new(empty.build()));
    let client = xds::spawn(config, tx);
    Harness {
        server,
        client,
        states,
        _token: token,
    }
}

/// Reads the two initial subscriptions and returns them by type URL.
async fn subscriptions(stream: &mut Stream_) -> HashMap<String, DeltaDiscoveryRequest> {
    let mut out = HashMap::new();
    for _ in 0..2 {
        let req = stream.request().await;
        out.insert(req.type_url.clone(), req);
    }
    assert!(out.contains_key(ADDRESS_TYPE_URL), "{:?}", out.keys());
    assert!(out.contains_key(AUTHORIZATION_TYPE_URL), "{:?}", out.keys());
    out
}

async fn wait_state(
    states: &mut watch::Receiver<Arc<State>>,
    what: &str,
    cond: impl FnMut(&Arc<State>) -> bool,
) -> Arc<State> {
    match tokio::time::timeout(DEADLINE, states.wait_for(cond)).await {
        Ok(Ok(s)) => s.clone(),
        Ok(Err(_)) => panic!("{what}: state channel closed"),
        Err(_) => panic!("{what}: not within {DEADLINE:?}"),
    }
}

#[tokio::test]
async fn subscribes_as_a_ztunnel_with_the_token_and_cluster() {
    let mut h = start().await;
    let mut stream = h.server.stream().await;
    assert_eq!(
        stream.metadata.get("authorization").unwrap(),
        "Bearer test-token"
    );
    assert_eq!(stream.metadata.get("clusterid").unwrap(), "cluster-1");
    let subs = subscriptions(&mut stream).await;
    for req in subs.values() {
        assert!(req.resource_names_subscribe.is_empty(), "wildcard");
        assert!(req.initial_resource_versions.is_empty());
        assert!(req.response_nonce.is_empty());
        let node = req.node.as_ref().expect("node on the initial request");
        assert_eq!(
            node.id,
            "ztunnel~10.1.0.7~ztunnel-x1.istio-system~istio-system.svc.cluster.local"
        );
        let meta = &node.metadata.as_ref().unwrap().fields;
        let text = |k: &str| match meta.get(k).and_then(|v| v.kind.as_ref()) {
            Some(prost_types::value::Kind::StringValue(s)) => s.clone(),
            other => panic!("{k}: {other:?}"),
        };
        assert_eq!(text("NODE_NAME"), "node-a");
        assert_eq!(text("CLUSTER_ID"), "cluster-1");
        assert_eq!(text("NAMESPACE"), "istio-system");
        assert_eq!(text("NAME"), "ztunnel-x1");
        assert_eq!(text("INSTANCE_IPS"), "10.1.0.7");
    }
    // Counted once the server's response headers are in: shortly after the requests.
    let stats = h.client.stats();
    support::eventually("one stream counted", || stats.streams() == 1).await;
}

#[tokio::test]
async fn applies_acks_nacks_and_removes() {
    let mut h = start().await;
    let mut stream = h.server.stream().await;
    subscriptions(&mut stream).await;

    // Workloads (one ambient, one not) and a service with the ambient one behind it.
    let mut echo = workload("echo-1", "10.0.0.5", true);
    echo.services.insert(
        "default/echo.default.svc.cluster.local".into(),
        pbw::PortList::default(),
    );
    echo.authorization_policies = vec!["default/deny-sleep".into()];
    stream.send(addresses(
        "a1",
        vec![
            address("echo-1", "1", as_address(echo)),
            address(
                "legacy",
                "1",
                as_address(workload("legacy", "10.0.0.6", false)),
            ),
            address(
                "default/echo.default.svc.cluster.local",
                "1",
                echo_service(),
            ),
        ],
        &[],
    ));
    let ack = stream.request().await;
    assert_eq!(ack.type_url, ADDRESS_TYPE_URL);
    assert_eq!(ack.response_nonce, "a1");
    assert_eq!(ack.error_detail, None);
    // Published before the ACK: the state is there already.
    let state = h.states.borrow().clone();
    let echo = state.workload_by_uid("echo-1").expect("echo-1 applied");
    assert_eq!(
        echo.identity().to_string(),
        "spiffe://cluster.local/ns/default/sa/echo-1"
    );
    assert!(state.is_captured(&echo), "HBONE workload captured");
    let legacy = state.workload_by_uid("legacy").unwrap();
    assert!(!state.is_captured(&legacy), "TCP workload not captured");
    match state.resolve(SocketAddr::new(ip("10.96.0.10"), 80)) {
        Destination::Service { endpoints, .. } => {
            assert_eq!(endpoints.len(), 1);
            assert_eq!(endpoints[0].1, SocketAddr::new(ip("10.0.0.5"), 8080));
        }
        other => panic!("VIP resolved to {other:?}"),
    }

    // A policy selecting echo-1.
    let policy = pbs::Authorization {
        name: "deny-sleep".into(),
        namespace: "default".into(),
        scope: pbs::Scope::WorkloadSelector as i32,
        action: pbs::Action::Deny as i32,
        ..Default::default()
    };
    stream.send(DeltaDiscoveryResponse {
        type_url: AUTHORIZATION_TYPE_URL.into(),
        nonce: "p1".into(),
        resources: vec![resource(
            AUTHORIZATION_TYPE_URL,
            "default/deny-sleep",
            "1",
            policy.encode_to_vec(),
        )],
        ..Default::default()
    });
    let ack = stream.request().await;
    assert_eq!(
        (ack.type_url.as_str(), ack.response_nonce.as_str()),
        (AUTHORIZATION_TYPE_URL, "p1")
    );
    assert_eq!(ack.error_detail, None);
    let state = h.states.borrow().clone();
    let echo = state.workload_by_uid("echo-1").unwrap();
    let applied: Vec<String> = state.policies_for(&echo).iter().map(|p| p.key()).collect();
    assert_eq!(applied, ["default/deny-sleep"]);

    // One bad resource among good ones: NACK naming it, the rest applied.
    let mut bad = workload("bad", "10.0.0.8", true);
    bad.addresses = vec![vec![1, 2, 3, 4, 5]];
    stream.send(addresses(
        "a2",
        vec![
            address("bad", "1", as_address(bad)),
            address(
                "echo-2",
                "1",
                as_address(workload("echo-2", "10.0.0.7", true)),
            ),
        ],
        &[],
    ));
    let nack = stream.request().await;
    assert_eq!(nack.response_nonce, "a2");
    let detail = nack.error_detail.expect("NACK carries error_detail");
    assert!(
        detail
            .message
            .contains("workload \"bad\": addresses[0]: 5 bytes is not an IP address"),
        "{}",
        detail.message
    );
    let state = h.states.borrow().clone();
    assert!(
        state.workload_by_uid("echo-2").is_some(),
        "good one applied"
    );
    assert!(state.workload_by_uid("bad").is_none());
    assert_eq!(h.client.stats().nacks(), 1);

    // Removals.
    stream.send(addresses(
        "a3",
        vec![],
        &["legacy", "default/echo.default.svc.cluster.local"],
    ));
    let ack = stream.request().await;
    assert_eq!(ack.response_nonce, "a3");
    assert_eq!(ack.error_detail, None);
    let state = h.states.borrow().clone();
    assert!(state.workload_by_uid("legacy").is_none());
    assert!(state.workload_by_ip(ip("10.0.0.6")).is_none());
    assert_eq!(
        state.resolve(SocketAddr::new(ip("10.96.0.10"), 80)),
        Destination::Unknown
    );
    assert!(state.workload_by_uid("echo-1").is_some());
    assert_eq!(h.client.stats().acks(), 3);
}

#[tokio::test]
async fn keeps_the_state_while_the_server_is_away_and_resubscribes_with_versions() {
    let mut h = start().await;
    let addr = h.server.addr;
    let mut stream = h.server.stream().await;
    subscriptions(&mut stream).await;
    stream.send(addresses(
        "a1",
        vec![
            address(
                "echo-1",
                "v1",
                as_address(workload("echo-1", "10.0.0.5", true)),
            ),
            address(
                "echo-2",
                "v9",
                as_address(workload("echo-2", "10.0.0.6", true)),
            ),
        ],
        &[],
    ));
    assert_eq!(stream.request().await.response_nonce, "a1");
    let before = h.states.borrow().clone();
    assert_eq!(before.workloads().count(), 2);

    // The server goes away: the stream ends, the client keeps failing to reconnect.
    let Harness {
        server,
        client,
        mut states,
        _token,
    } = h;
    server.stop(vec![stream]).await;
    let streams_before = client.stats().streams();
    assert_eq!(streams_before, 1);
    let kept = states.borrow_and_update().clone();
    assert!(
        Arc::ptr_eq(&kept, &before),
        "state replaced while disconnected"
    );

    // It comes back on the same address; the client resubscribes with what it holds.
    let mut server = XdsServer::start(addr).await;
    let mut stream = server.stream().await;
    let subs = subscriptions(&mut stream).await;
    assert_eq!(
        subs[ADDRESS_TYPE_URL].initial_resource_versions,
        HashMap::from([
            ("echo-1".to_owned(), "v1".to_owned()),
            ("echo-2".to_owned(), "v9".to_owned())
        ])
    );
    assert!(
        subs[AUTHORIZATION_TYPE_URL]
            .initial_resource_versions
            .is_empty()
    );
    assert!(
        !states.has_changed().unwrap(),
        "state replaced on reconnect"
    );

    // The server sends only the difference.
    stream.send(addresses(
        "b1",
        vec![address(
            "echo-3",
            "v1",
            as_address(workload("echo-3", "10.0.0.7", true)),
        )],
        &["echo-2"],
    ));
    assert_eq!(stream.request().await.response_nonce, "b1");
    let state = wait_state(&mut states, "after resync", |s| {
        s.workload_by_uid("echo-3").is_some()
    })
    .await;
    let mut uids: Vec<&str> = state.workloads().map(|w| w.uid.as_str()).collect();
    uids.sort_unstable();
    assert_eq!(uids, ["echo-1", "echo-3"]);
    assert_eq!(client.stats().streams(), 2);
}
