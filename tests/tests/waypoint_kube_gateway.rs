//! The waypoint's own Gateway read from the API (`--kube`): a root-namespace
//! AuthorizationPolicy targeting the GatewayClass of that Gateway applies to the waypoint
//! from its first table on (the routes wait for the Gateway's list), and stops applying when
//! the Gateway moves to another class. The Gateway is watched in the waypoint's namespace,
//! by name.

use std::time::Duration;

use mesh_tests::http_app::Version;
use mesh_tests::kube_api::harness::{start_api, until, waypoint_mesh};
use mesh_tests::kube_api::{kubeconfig_path, start_waypoint_kube};
use mesh_tests::mesh::Mesh;
use mesh_tests::waypoint::{RATINGS_VIP, apps, through_waypoint};

const OBJECTS: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: default
spec:
  gatewayClassName: ambient-waypoint
  listeners:
  - {name: mesh, port: 15008, protocol: HBONE}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: no-private
  namespace: istio-system
spec:
  targetRefs:
  - group: gateway.networking.k8s.io
    kind: GatewayClass
    name: ambient-waypoint
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/private*"]
"#;

/// The status of `GET path` to ratings through the waypoint.
async fn ratings(mesh: &Mesh, path: &str) -> u16 {
    let conn = through_waypoint(mesh, RATINGS_VIP, Version::Http1).await;
    conn.get("ratings:9080", path, &[])
        .await
        .expect("request")
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_for_the_class_of_the_waypoints_gateway_applies_while_it_is_that_class() {
    let mesh = waypoint_mesh();
    let _apps = apps(&mesh);
    let api = start_api(&mesh, OBJECTS).await;
    let wp = start_waypoint_kube(&mesh, &kubeconfig_path(&mesh), &[]);

    // From the first table on.
    assert_eq!(ratings(&mesh, "/private/x").await, 403, "{}", wp.log());
    assert_eq!(ratings(&mesh, "/public").await, 200, "{}", wp.log());
    assert!(
        api.seen().iter().any(|s| s
            .uri
            .starts_with("/apis/gateway.networking.k8s.io/v1/namespaces/default/gateways?")
            && s.uri.contains("fieldSelector=metadata.name%3Dwaypoint")),
        "no watch of the waypoint's Gateway by name"
    );

    // The Gateway moves to another class: the policy no longer names this waypoint.
    api.apply_yaml(&OBJECTS.replace(
        "gatewayClassName: ambient-waypoint",
        "gatewayClassName: another",
    ))
    .expect("Gateway of another class");
    let open = until(Duration::from_secs(10), || async {
        ratings(&mesh, "/private/x").await == 200
    })
    .await;
    assert!(open, "still denied:\n{}", wp.log());
    assert!(
        wp.log().contains(
            "names GatewayClass ambient-waypoint, not istio-waypoint or this waypoint's another"
        ),
        "{}",
        wp.log()
    );
}
