use prost::Message as _;

use super::*;
use crate::proto::envoy::service::discovery::v3::Resource;
use crate::state::Protocol;

fn workload(uid: &str, ip: [u8; 4]) -> pbw::Workload {
    pbw::Workload {
        uid: uid.into(),
        name: uid.into(),
        namespace: "default".into(),
        addresses: vec![ip.to_vec()],
        tunnel_protocol: pbw::TunnelProtocol::Hbone as i32,
        ..Default::default()
    }
}

fn addr_resource(name: &str, version: &str, w: pbw::Workload) -> Resource {
    let a = pbw::Address {
        r#type: Some(pbw::address::Type::Workload(w)),
    };
    Resource {
        name: name.into(),
        version: version.into(),
        resource: Some(prost_types::Any {
            type_url: ADDRESS_TYPE_URL.into(),
            value: a.encode_to_vec(),
        }),
        ..Default::default()
    }
}

fn response(nonce: &str, resources: Vec<Resource>, removed: &[&str]) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: ADDRESS_TYPE_URL.into(),
        nonce: nonce.into(),
        resources,
        removed_resources: removed.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[test]
fn applies_and_acks_with_the_nonce() {
    let mut store = Store::new("td");
    let applied = store.apply(response(
        "n1",
        vec![
            addr_resource("a", "1", workload("a", [10, 0, 0, 1])),
            addr_resource("b", "1", workload("b", [10, 0, 0, 2])),
        ],
        &[],
    ));
    assert!(applied.changed);
    assert!(applied.rejected.is_empty());
    assert_eq!(applied.reply.response_nonce, "n1");
    assert_eq!(applied.reply.type_url, ADDRESS_TYPE_URL);
    assert_eq!(applied.reply.error_detail, None);
    let (state, dropped) = store.state();
    assert!(dropped.is_empty());
    let a = state.workload_by_ip("10.0.0.1".parse().unwrap()).unwrap();
    assert_eq!(a.uid, "a");
    assert_eq!(a.protocol, Protocol::Hbone);
    assert!(state.captures_by_protocol());
    assert!(state.is_captured(&a));
    assert!(!store.synced(), "no policy response yet");
    store.apply(DeltaDiscoveryResponse {
        type_url: AUTHORIZATION_TYPE_URL.into(),
        nonce: "p1".into(),
        ..Default::default()
    });
    assert!(store.synced());
}

#[test]
fn nack_names_the_bad_resource_and_applies_the_rest() {
    let mut store = Store::new("td");
    store.apply(response(
        "n1",
        vec![addr_resource("bad", "1", workload("bad", [10, 0, 0, 9]))],
        &[],
    ));
    let mut broken = workload("bad", [10, 0, 0, 9]);
    broken.addresses = vec![vec![1, 2, 3, 4, 5]];
    let garbage = Resource {
        name: "garbage".into(),
        version: "1".into(),
        resource: Some(prost_types::Any {
            type_url: ADDRESS_TYPE_URL.into(),
            value: vec![0xff, 0xff, 0xff],
        }),
        ..Default::default()
    };
    let applied = store.apply(response(
        "n2",
        vec![
            addr_resource("bad", "2", broken),
            addr_resource("good", "1", workload("good", [10, 0, 0, 1])),
            garbage,
        ],
        &[],
    ));
    assert!(applied.changed);
    assert_eq!(applied.rejected.len(), 2);
    assert_eq!(applied.reply.response_nonce, "n2");
    let detail = applied.reply.error_detail.unwrap();
    assert_eq!(detail.code, 3);
    assert!(
        detail
            .message
            .contains("workload \"bad\": addresses[0]: 5 bytes is not an IP address"),
        "{}",
        detail.message
    );
    assert!(
        detail
            .message
            .contains("resource \"garbage\": resource: cannot decode"),
        "{}",
        detail.message
    );
    let (state, _) = store.state();
    assert!(state.workload_by_uid("good").is_some());
    // The rejected update left the previous version in force, and its version is the one
    // reported on reconnection.
    assert_eq!(
        state.workload_by_uid("bad").unwrap().workload_ips,
        vec!["10.0.0.9".parse::<std::net::IpAddr>().unwrap()]
    );
    let versions = store.versions(ADDRESS_TYPE_URL);
    assert_eq!(versions["bad"], "1");
    assert_eq!(versions["good"], "1");
    assert!(!versions.contains_key("garbage"));
}

#[test]
fn removals_apply_and_unknown_names_are_ignored() {
    let mut store = Store::new("td");
    store.apply(response(
        "n1",
        vec![
            addr_resource("a", "1", workload("a", [10, 0, 0, 1])),
            addr_resource("b", "1", workload("b", [10, 0, 0, 2])),
        ],
        &[],
    ));
    let applied = store.apply(response("n2", vec![], &["a", "never-seen"]));
    assert!(applied.changed);
    assert!(applied.reply.error_detail.is_none());
    let (state, _) = store.state();
    assert!(state.workload_by_uid("a").is_none());
    assert!(state.workload_by_uid("b").is_some());
    let applied = store.apply(response("n3", vec![], &["never-seen"]));
    assert!(!applied.changed);
}

#[test]
fn the_same_resource_again_changes_nothing() {
    let mut store = Store::new("td");
    let r = || addr_resource("a", "1", workload("a", [10, 0, 0, 1]));
    assert!(store.apply(response("n1", vec![r()], &[])).changed);
    assert!(!store.apply(response("n2", vec![r()], &[])).changed);
    // A heartbeat (no body) neither.
    let heartbeat = Resource {
        name: "a".into(),
        version: "1".into(),
        ..Default::default()
    };
    assert!(!store.apply(response("n3", vec![heartbeat], &[])).changed);
}

#[test]
fn initial_request_carries_the_accepted_versions() {
    let mut store = Store::new("td");
    let first = store.initial_request(ADDRESS_TYPE_URL, None);
    assert!(first.initial_resource_versions.is_empty());
    assert!(first.resource_names_subscribe.is_empty(), "wildcard");
    assert!(first.response_nonce.is_empty());
    store.apply(response(
        "n1",
        vec![addr_resource("a", "v7", workload("a", [10, 0, 0, 1]))],
        &[],
    ));
    let again = store.initial_request(ADDRESS_TYPE_URL, None);
    assert_eq!(again.type_url, ADDRESS_TYPE_URL);
    assert_eq!(
        again.initial_resource_versions,
        HashMap::from([("a".to_owned(), "v7".to_owned())])
    );
    assert!(
        store
            .initial_request(AUTHORIZATION_TYPE_URL, None)
            .initial_resource_versions
            .is_empty()
    );
}

#[test]
fn unknown_types_and_mismatched_resources_are_nacked() {
    let mut store = Store::new("td");
    let applied = store.apply(DeltaDiscoveryResponse {
        type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
        nonce: "x".into(),
        ..Default::default()
    });
    assert!(!applied.changed);
    assert!(applied.reply.error_detail.is_some());
    let mut r = addr_resource("a", "1", workload("a", [10, 0, 0, 1]));
    if let Some(any) = r.resource.as_mut() {
        any.type_url = AUTHORIZATION_TYPE_URL.into();
    }
    let applied = store.apply(response("n", vec![r], &[]));
    assert!(!applied.changed);
    assert!(
        applied.rejected[0]
            .to_string()
            .contains("resource.type_url"),
        "{:?}",
        applied.rejected
    );
}

#[test]
fn colliding_addresses_are_left_out_not_fatal() {
    let mut store = Store::new("td");
    let applied = store.apply(response(
        "n1",
        vec![
            addr_resource("a", "1", workload("a", [10, 0, 0, 1])),
            addr_resource("b", "1", workload("b", [10, 0, 0, 1])),
        ],
        &[],
    ));
    assert!(applied.rejected.is_empty());
    let (state, dropped) = store.state();
    assert!(state.workload_by_uid("a").is_some());
    assert!(state.workload_by_uid("b").is_none());
    assert_eq!(dropped.len(), 1);
    assert!(dropped[0].contains("workload \"b\""), "{dropped:?}");
}

#[test]
fn policies_apply() {
    let mut store = Store::new("td");
    let p = pbs::Authorization {
        name: "allow".into(),
        namespace: "default".into(),
        ..Default::default()
    };
    let applied = store.apply(DeltaDiscoveryResponse {
        type_url: AUTHORIZATION_TYPE_URL.into(),
        nonce: "p1".into(),
        resources: vec![Resource {
            name: "default/allow".into(),
            version: "1".into(),
            resource: Some(prost_types::Any {
                type_url: AUTHORIZATION_TYPE_URL.into(),
                value: p.encode_to_vec(),
            }),
            ..Default::default()
        }],
        ..Default::default()
    });
    assert!(applied.changed);
    let (state, _) = store.state();
    assert_eq!(
        state.policies().map(|p| p.key()).collect::<Vec<_>>(),
        ["default/allow"]
    );
}

#[test]
fn netns_dir_names_this_nodes_pods_only() {
    let mut store = Store::new("td").with_netns_dir("node-a", "/run/pods");
    let mut here = workload("here", [10, 0, 0, 1]);
    here.node = "node-a".into();
    let mut there = workload("there", [10, 0, 0, 2]);
    there.node = "node-b".into();
    store.apply(response(
        "n1",
        vec![
            addr_resource("here", "1", here),
            addr_resource("there", "1", there),
        ],
        &[],
    ));
    let (state, _) = store.state();
    assert_eq!(
        state.workload_by_uid("here").unwrap().netns,
        Some("/run/pods/default.here".into())
    );
    assert_eq!(state.workload_by_uid("there").unwrap().netns, None);
}

fn policy_response(nonce: &str) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: AUTHORIZATION_TYPE_URL.into(),
        nonce: nonce.into(),
        ..Default::default()
    }
}

#[test]
fn the_state_is_incomplete_until_every_type_has_answered() {
    let mut store = Store::new("td");
    let (state, _) = store.state();
    assert_eq!(
        state.incomplete(),
        Some(
            "waiting for the first xDS sync (no response yet for istio.workload.Address, \
             istio.security.Authorization)"
        )
    );

    // Workloads without policies yet: publishing that as complete would drop every DENY.
    let applied = store.apply(response(
        "n1",
        vec![addr_resource("a", "1", workload("a", [10, 0, 0, 1]))],
        &[],
    ));
    assert!(applied.changed);
    let (state, _) = store.state();
    assert_eq!(state.workloads().count(), 1);
    assert_eq!(
        state.incomplete(),
        Some("waiting for the first xDS sync (no response yet for istio.security.Authorization)")
    );

    // No policy at all is an answer too: the empty response completes the sync, and that
    // must be published although it changed no resource.
    let applied = store.apply(policy_response("p1"));
    assert!(applied.changed, "the completing response makes a new state");
    assert!(store.synced());
    let (state, _) = store.state();
    assert_eq!(state.incomplete(), None);
    assert_eq!(state.workloads().count(), 1);

    // Later empty answers change nothing; a reconnection keeps the state complete.
    assert!(!store.apply(policy_response("p2")).changed);
    let _ = store.initial_request(ADDRESS_TYPE_URL, None);
    assert_eq!(store.state().0.incomplete(), None);
}

#[test]
fn unknown_types_are_no_answer_a_nacked_response_is() {
    let mut store = Store::new("td");
    let applied = store.apply(DeltaDiscoveryResponse {
        type_url: "type.googleapis.com/other".into(),
        nonce: "x".into(),
        ..Default::default()
    });
    assert!(!applied.changed);
    assert!(store.state().0.incomplete().is_some());
    // A response of a subscribed type counts as its answer even when a resource in it is
    // rejected (NACKed): the others are what istiod has, and the previous version of the bad
    // one (none here) stays.
    let bad = Resource {
        name: "bad".into(),
        version: "1".into(),
        resource: Some(prost_types::Any {
            type_url: ADDRESS_TYPE_URL.into(),
            value: vec![0xff, 0xff],
        }),
        ..Default::default()
    };
    assert!(
        !store
            .apply(response("n1", vec![bad], &[]))
            .rejected
            .is_empty()
    );
    store.apply(policy_response("p1"));
    assert_eq!(store.state().0.incomplete(), None);
}
