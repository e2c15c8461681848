//! What the tests of the waypoint's `--kube` share: the mesh with ratings and details using
//! the waypoint, the stand-in API server in the waypoint's pod, the tutorial's reviews
//! objects, and small probes (which reviews version answers, a metric's value).

use std::future::Future;
use std::time::Duration;

use crate::http_app::HttpConn;
use crate::kube_api::{ApiServer, kubeconfig_path};
use crate::mesh::{Mesh, http_get};
use crate::waypoint::mesh_with;

/// Everything to v1 (the tutorial's `catalog-virtualservice-all-v1`, for reviews, as
/// written for Istio: v1alpha3; the API server serves it as v1) and the subsets.
pub const ALL_TO_V1: &str = r#"
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
  - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v1
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
"#;

/// The test mesh with ratings and details using the waypoint (`istio.io/use-waypoint`), so
/// their routes' status is the waypoint's to write; reviews does not.
pub fn waypoint_mesh() -> Mesh {
    mesh_with(|m| {
        for svc in ["ratings", "details"] {
            m.service_labels.push((
                svc.to_owned(),
                "istio.io/use-waypoint".to_owned(),
                "waypoint".to_owned(),
            ));
        }
    })
}

/// Where the stand-in listens, in the waypoint's pod.
pub const API_ADDR: &str = "127.0.0.1:16443";

/// The stand-in API server in the waypoint's pod, serving `yaml`, and its kubeconfig.
pub async fn start_api(mesh: &Mesh, yaml: &str) -> ApiServer {
    let mut api = ApiServer::new(
        &mesh.netns("wp"),
        API_ADDR.parse().unwrap(),
        Duration::from_millis(500),
    )
    .expect("API server");
    api.apply_yaml(yaml).expect("objects");
    api.start().expect("listen");
    api.write_kubeconfig(&kubeconfig_path(mesh))
        .expect("kubeconfig");
    api
}

/// Polls an async condition until it holds or `timeout` passes.
pub async fn until<F: Future<Output = bool>>(
    timeout: Duration,
    mut cond: impl FnMut() -> F,
) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Which reviews version answers `/` on `conn`, with or without the dark-launch header.
pub async fn reviews_server(conn: &HttpConn, dark: bool) -> String {
    let headers: &[(&str, &str)] = if dark {
        &[("x-dark-launch", "v2")]
    } else {
        &[]
    };
    let a = conn
        .get("reviews:9080", "/", headers)
        .await
        .expect("request on the open connection");
    assert_eq!(a.status, 200, "{a:?}");
    a.server().unwrap_or_default().to_owned()
}

/// The waypoint's `/metrics` text.
pub fn metrics(mesh: &Mesh) -> String {
    let (status, body) = http_get(
        &mesh.netns("wp"),
        "127.0.0.1:15020".parse().unwrap(),
        "/metrics",
    )
    .expect("metrics");
    assert_eq!(status, 200);
    body
}

/// The value of the sample whose line starts with `series` (name and labels).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}
