//! A waypoint that may read only some namespaces (`--kube-namespace`, as the Gateway
//! controller starts its waypoints: their own namespace and the root namespace, where their
//! RoleBindings are): it lists and watches each kind in those namespaces only (the stand-in
//! API server's request log shows it), serves the routes found there (a VirtualService in its
//! namespace using the subsets of a mesh-wide DestinationRule in the root namespace) and not
//! those of another namespace (a fault there, which a waypoint reading every namespace does
//! apply: the control).

use std::time::Duration;

use mesh_tests::http_app::Version;
use mesh_tests::kube_api::harness::{reviews_server, start_api, waypoint_mesh};
use mesh_tests::kube_api::{kubeconfig_path, start_waypoint_kube};
use mesh_tests::mesh::Mesh;
use mesh_tests::waypoint::{RATINGS_VIP, REVIEWS_VIP, apps, through_waypoint};

const OBJECTS: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: default
spec:
  hosts:
  - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v1
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  namespace: istio-system
spec:
  host: reviews.default.svc.cluster.local
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings-teapot
  namespace: elsewhere
spec:
  hosts:
  - ratings.default.svc.cluster.local
  http:
  - fault:
      abort:
        httpStatus: 418
        percentage:
          value: 100
    route:
    - destination:
        host: ratings.default.svc.cluster.local
"#;

/// The kinds the waypoint reads, by plural.
const PLURALS: [&str; 4] = [
    "virtualservices",
    "destinationrules",
    "httproutes",
    "grpcroutes",
];

async fn ratings_status(mesh: &Mesh) -> u16 {
    let conn = through_waypoint(mesh, RATINGS_VIP, Version::Http1).await;
    conn.get("ratings:9080", "/", &[])
        .await
        .expect("request")
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waypoint_reads_only_the_namespaces_it_is_given() {
    let mesh = waypoint_mesh();
    let _apps = apps(&mesh);
    let api = start_api(&mesh, OBJECTS).await;
    let mut wp = start_waypoint_kube(
        &mesh,
        &kubeconfig_path(&mesh),
        &["--kube-namespace=default", "--kube-namespace=istio-system"],
    );

    // Its namespace's VirtualService with the root namespace's subsets.
    let reviews = through_waypoint(&mesh, REVIEWS_VIP, Version::Http1).await;
    for _ in 0..5 {
        assert_eq!(
            reviews_server(&reviews, true).await,
            "reviews-v1",
            "{}",
            wp.log()
        );
    }
    // The fault of another namespace is not read.
    assert_eq!(ratings_status(&mesh).await, 200, "{}", wp.log());

    // Every read was in one of its namespaces; each kind listed and watched in both.
    let reads: Vec<String> = api
        .seen()
        .into_iter()
        .filter(|s| s.method == "GET")
        .map(|s| s.uri)
        .collect();
    for uri in &reads {
        assert!(
            uri.contains("/namespaces/default/") || uri.contains("/namespaces/istio-system/"),
            "read outside its namespaces: {uri}"
        );
    }
    for plural in PLURALS {
        for ns in ["default", "istio-system"] {
            let path = format!("/namespaces/{ns}/{plural}?");
            let of = |watch: bool| {
                reads
                    .iter()
                    .any(|u| u.contains(&path) && u.contains("watch=true") == watch)
            };
            assert!(
                of(false) && of(true),
                "no list and watch of {path}: {reads:?}"
            );
        }
    }

    // The control: a waypoint reading every namespace applies that fault.
    wp.terminate(Duration::from_secs(5)).expect("stopped");
    let wp = start_waypoint_kube(&mesh, &kubeconfig_path(&mesh), &[]);
    assert_eq!(ratings_status(&mesh).await, 418, "{}", wp.log());
}
