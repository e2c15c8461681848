//! What a waypoint may read (pure): RoleBindings of its ServiceAccount to the chart's
//! waypoint ClusterRole, one in the Gateway's namespace and one in the mesh's root namespace
//! (whose DestinationRules apply mesh-wide), so a waypoint reads those two namespaces and no
//! other. The first is owned by the Gateway and goes with it. The second cannot be: an owner
//! reference never crosses namespaces (the garbage collector would treat it as absent). It
//! carries labels naming its Gateway instead, and the controller deletes it once that
//! Gateway is gone ([`orphans`]).

use std::collections::BTreeMap;

use serde_json::{Value as Json, json};

use super::render::{GATEWAY_NAME_LABEL, labels, meta, str_at};

/// The label naming the namespace of the Gateway a root-namespace RoleBinding is for (the
/// Gateway API's own label names only the Gateway).
pub const GATEWAY_NAMESPACE_LABEL: &str = "ambient-dataplane.io/gateway-namespace";

/// The name of the RoleBinding in the root namespace for Gateway `namespace/name`. A
/// namespace name has no dot (it is a DNS label), so no two Gateways share one.
pub fn root_binding_name(namespace: &str, name: &str) -> String {
    format!("{namespace}.{name}")
}

fn binding(metadata: Json, gateway: &Json, cluster_role: &str) -> Json {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": metadata,
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": cluster_role,
        },
        "subjects": [{
            "kind": "ServiceAccount",
            "name": str_at(gateway, "/metadata/name"),
            "namespace": str_at(gateway, "/metadata/namespace"),
        }],
    })
}

/// The RoleBindings of the waypoint of `gateway`: in its namespace (owned by it) and, when
/// that is not the root namespace, in the root namespace (labelled with it).
pub fn role_bindings(gateway: &Json, cluster_role: &str, root_namespace: &str) -> Vec<Json> {
    let namespace = str_at(gateway, "/metadata/namespace");
    let name = str_at(gateway, "/metadata/name");
    let mut bindings = vec![binding(
        meta(gateway, labels(gateway)),
        gateway,
        cluster_role,
    )];
    if namespace != root_namespace {
        let mut root_labels = labels(gateway);
        root_labels[GATEWAY_NAMESPACE_LABEL] = json!(namespace);
        let metadata = json!({
            "name": root_binding_name(namespace, name),
            "namespace": root_namespace,
            "labels": root_labels,
        });
        bindings.push(binding(metadata, gateway, cluster_role));
    }
    bindings
}

/// The Gateway (namespace, name) a root-namespace RoleBinding of ours is for, from its labels.
pub fn gateway_of(binding: &Json) -> Option<(String, String)> {
    let label = |key: &str| {
        binding
            .pointer(&format!("/metadata/labels/{}", key.replace('/', "~1")))
            .and_then(Json::as_str)
            .map(str::to_owned)
    };
    Some((label(GATEWAY_NAMESPACE_LABEL)?, label(GATEWAY_NAME_LABEL)?))
}

/// The root-namespace RoleBindings (by name, with their Gateway) whose Gateway is gone or
/// no longer of `class`: those to delete. Only ask once every Gateway has been listed.
pub fn orphans(
    bindings: &BTreeMap<String, (String, String)>,
    gateways: &BTreeMap<(String, String), Json>,
    class: &str,
) -> Vec<String> {
    bindings
        .iter()
        .filter(|(_, gateway)| {
            gateways.get(*gateway).is_none_or(|g| {
                g.pointer("/spec/gatewayClassName").and_then(Json::as_str) != Some(class)
            })
        })
        .map(|(name, _)| name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway(namespace: &str) -> Json {
        json!({
            "metadata": {"name": "waypoint", "namespace": namespace, "uid": "u-1"},
            "spec": {"gatewayClassName": "ambient-waypoint"},
        })
    }

    #[test]
    fn a_waypoint_is_bound_in_its_namespace_and_in_the_root_namespace() {
        let bindings = role_bindings(&gateway("bookinfo"), "dataplane-waypoint", "istio-system");
        assert_eq!(bindings.len(), 2);
        let (local, root) = (&bindings[0], &bindings[1]);
        for b in [local, root] {
            assert_eq!(b["roleRef"]["kind"], "ClusterRole");
            assert_eq!(b["roleRef"]["name"], "dataplane-waypoint");
            assert_eq!(
                b["subjects"],
                json!([{"kind": "ServiceAccount", "name": "waypoint", "namespace": "bookinfo"}])
            );
        }
        assert_eq!(local["metadata"]["namespace"], "bookinfo");
        assert_eq!(local["metadata"]["ownerReferences"][0]["uid"], "u-1");
        assert_eq!(root["metadata"]["namespace"], "istio-system");
        assert_eq!(root["metadata"]["name"], "bookinfo.waypoint");
        assert!(
            root["metadata"].get("ownerReferences").is_none(),
            "no owner across namespaces"
        );
        assert_eq!(
            gateway_of(root),
            Some(("bookinfo".to_owned(), "waypoint".to_owned()))
        );
        // A waypoint in the root namespace needs one binding.
        assert_eq!(
            role_bindings(&gateway("istio-system"), "r", "istio-system").len(),
            1
        );
    }

    #[test]
    fn a_root_binding_whose_gateway_is_gone_or_of_another_class_is_an_orphan() {
        let mut bindings = BTreeMap::new();
        for ns in ["a", "b", "c"] {
            bindings.insert(
                root_binding_name(ns, "waypoint"),
                (ns.to_owned(), "waypoint".to_owned()),
            );
        }
        let mut gateways = BTreeMap::new();
        gateways.insert(("a".to_owned(), "waypoint".to_owned()), gateway("a"));
        let mut other = gateway("b");
        other["spec"]["gatewayClassName"] = json!("istio");
        gateways.insert(("b".to_owned(), "waypoint".to_owned()), other);
        assert_eq!(
            orphans(&bindings, &gateways, "ambient-waypoint"),
            ["b.waypoint", "c.waypoint"]
        );
    }
}
