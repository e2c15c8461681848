//! The waypoint end to end: a real waypoint process in its own pod, real ztunnels on two
//! nodes, HTTP applications in pods. Clients reach the waypoint the way a client's ztunnel
//! does: an HBONE tunnel with the client's certificate to the waypoint's 15008, asking for
//! the service `VIP:port`; HTTP/1.1 or h2c inside. The waypoint then tunnels to the chosen
//! endpoint's 15008, where the destination ztunnel delivers to the application.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mesh_tests::http_app::{HttpApp, HttpConn, Version};
use mesh_tests::mesh::{Mesh, PodSpec, ServiceSpec, http_get, tunnel};
use mesh_tests::process::{Proc, binary, wait_until};
use ztunnel::identity::Identity;

const REVIEWS_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
const RATINGS_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 2);
const DETAILS_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 3);

fn labelled(mut pod: PodSpec, labels: &[(&str, &str)]) -> PodSpec {
    pod.labels = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    pod
}

fn service(name: &str, vip: Ipv4Addr) -> ServiceSpec {
    ServiceSpec {
        name: name.to_owned(),
        namespace: "default".to_owned(),
        vip,
        vip6: None,
        ports: vec![(9080, 8080)],
    }
}

/// Two nodes: the client `sleep` and the waypoint `wp` (not captured: it terminates HBONE
/// itself) on n1; reviews v1 and v2, ratings and details on n2.
fn mesh() -> Mesh {
    let pods = vec![
        PodSpec::new("sleep", "n1", "sleep"),
        labelled(
            PodSpec::new("wp", "n1", "waypoint"),
            &[("istio.io/dataplane-mode", "none")],
        ),
        labelled(
            PodSpec::new("reviews-v1", "n2", "reviews").service("reviews", 9080, 8080),
            &[("app", "reviews"), ("version", "v1")],
        ),
        labelled(
            PodSpec::new("reviews-v2", "n2", "reviews").service("reviews", 9080, 8080),
            &[("app", "reviews"), ("version", "v2")],
        ),
        PodSpec::new("ratings", "n2", "ratings").service("ratings", 9080, 8080),
        PodSpec::new("details", "n2", "details").service("details", 9080, 8080),
    ];
    let services = vec![
        service("reviews", REVIEWS_VIP),
        service("ratings", RATINGS_VIP),
        service("details", DETAILS_VIP),
    ];
    let mut mesh = Mesh::new(&["n1", "n2"], pods, services).expect("topology");
    mesh.start().expect("ztunnels");
    mesh
}

/// The applications, one per server pod, each on its pod's 8080.
fn apps(mesh: &Mesh) -> Vec<HttpApp> {
    ["reviews-v1", "reviews-v2", "ratings", "details"]
        .iter()
        .map(|p| {
            let addr = SocketAddr::from((mesh.ip(p), 8080));
            HttpApp::start(&mesh.netns(p), p, addr).expect("app")
        })
        .collect()
}

/// Writes `text` to `path` at once (rename), so the waypoint never reads half a file.
fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write routes");
    std::fs::rename(&tmp, path).expect("rename routes");
}

fn waypoint_identity() -> Identity {
    Identity::new("cluster.local", "default", "waypoint").expect("identity")
}

/// Starts the waypoint in its pod with `routes` and waits until it is ready.
fn start_waypoint(mesh: &Mesh, routes: &Path) -> Proc {
    let mut cmd = Command::new(binary("waypoint"));
    cmd.arg("--mesh-config")
        .arg(mesh.config_path())
        .arg("--routes")
        .arg(routes)
        .arg("--ca-dir")
        .arg(mesh.dir.path().join("ca"))
        .arg("--service-account")
        .arg("waypoint")
        .arg("--poll-ms")
        .arg("100")
        .env("RUST_LOG", "info,waypoint=debug");
    let netns = mesh.netns("wp");
    let mut wp = Proc::spawn("waypoint", &netns, cmd, mesh.dir.path()).expect("waypoint");
    let ready = wait_until(Duration::from_secs(20), || {
        wp.exited().is_some()
            || http_get(&netns, "127.0.0.1:15021".parse().unwrap(), "/healthz/ready")
                .is_ok_and(|(status, _)| status == 200)
    });
    assert!(
        ready.is_ok() && wp.exited().is_none(),
        "waypoint not ready; log:\n{}",
        wp.log()
    );
    wp
}

/// An HTTP connection from `sleep`, through the waypoint, for the service at `vip`.
async fn through_waypoint(mesh: &Mesh, vip: Ipv4Addr, version: Version) -> HttpConn {
    let sleep = Identity::new("cluster.local", "default", "sleep").expect("identity");
    let cert = mesh
        .ca()
        .sign(&sleep, Duration::from_secs(3600))
        .expect("cert");
    let wp = SocketAddr::from((mesh.ip("wp"), 15008));
    let stream = tunnel(
        mesh,
        "sleep",
        &cert,
        waypoint_identity(),
        wp,
        SocketAddr::from((vip, 9080)),
    )
    .await
    .expect("tunnel to the waypoint");
    HttpConn::handshake(stream, version)
        .await
        .expect("HTTP in the tunnel")
}

fn routes_path(mesh: &Mesh) -> PathBuf {
    mesh.dir.path().join("routes.yaml")
}

/// The Bookinfo tutorial's shapes: a dark launch by header, a 90/10 canary between subsets,
/// header edits, a route list without a catch-all (404 for the rest); ratings routed by a
/// GAMMA HTTPRoute (a Service as parent); details with no route config at all.
const TUTORIAL: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
  - reviews
  http:
  - match:
    - headers:
        x-dark-launch:
          exact: v2
    route:
    - destination:
        host: reviews
        subset: v2
    headers:
      request:
        set:
          x-routed-by: dark-launch
      response:
        add:
          x-served-via: waypoint
  - match:
    - uri:
        prefix: /canary
    route:
    - destination:
        host: reviews
        subset: v1
      weight: 90
    - destination:
        host: reviews
        subset: v2
      weight: 10
  - match:
    - uri:
        prefix: /reviews
    route:
    - destination:
        host: reviews
        subset: v1
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
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
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: ratings
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: ratings
    port: 9080
  rules:
  - matches:
    - path:
        type: PathPrefix
        value: /api
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        add:
        - name: x-gamma
          value: "yes"
    backendRefs:
    - name: ratings
      port: 9080
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_the_tutorials_virtual_services_and_http_routes() {
    let mesh = mesh();
    let _apps = apps(&mesh);
    let routes = routes_path(&mesh);
    write_atomic(&routes, TUTORIAL);
    let wp = start_waypoint(&mesh, &routes);
    let wp_ip = mesh.ip("wp").to_string();

    for version in [Version::Http1, Version::Http2] {
        let reviews = through_waypoint(&mesh, REVIEWS_VIP, version).await;
        // Dark launch: the header sends every request to v2, with the route's header edits.
        for _ in 0..10 {
            let a = reviews
                .get("reviews:9080", "/reviews/1", &[("x-dark-launch", "v2")])
                .await
                .expect("request");
            assert_eq!(a.status, 200, "{version:?}: {a:?}\n{}", wp.log());
            assert_eq!(a.server(), Some("reviews-v2"), "{version:?}: {a:?}");
            assert_eq!(
                a.request_headers().get("x-routed-by"),
                Some(&vec!["dark-launch".to_owned()])
            );
            assert_eq!(
                a.headers.get("x-served-via").map(|v| v.as_bytes()),
                Some(&b"waypoint"[..])
            );
            // The application's peer is the waypoint (delivered from the tunnel's peer).
            let peer = a.line("peer").expect("peer line");
            assert!(peer.starts_with(&format!("{wp_ip}:")), "peer {peer}");
            let expect = match version {
                Version::Http1 => "HTTP/1.1",
                Version::Http2 => "HTTP/2.0",
            };
            assert_eq!(
                a.line("version"),
                Some(expect),
                "upstream speaks the client's version"
            );
        }
        // Without the header, /reviews goes to v1 only.
        for _ in 0..10 {
            let a = reviews
                .get("reviews:9080", "/reviews/1", &[])
                .await
                .expect("request");
            assert_eq!((a.status, a.server()), (200, Some("reviews-v1")), "{a:?}");
            assert!(!a.request_headers().contains_key("x-routed-by"));
        }
        // No rule matches: 404 from the waypoint, nothing reaches an application.
        let a = reviews
            .get("reviews:9080", "/other", &[])
            .await
            .expect("request");
        assert_eq!(a.status, 404, "{a:?}");
        assert_eq!(a.server(), None);
    }

    // The 90/10 canary: 400 requests, v2 expected 40 times (binomial, sd 6); 4.5 sd either
    // side (|v2 - 40| <= 27) fails a correct split about once in 150,000 runs.
    let reviews = through_waypoint(&mesh, REVIEWS_VIP, Version::Http2).await;
    let mut v2 = 0;
    for _ in 0..400 {
        let a = reviews
            .get("reviews:9080", "/canary", &[])
            .await
            .expect("request");
        assert_eq!(a.status, 200, "{a:?}");
        if a.server() == Some("reviews-v2") {
            v2 += 1;
        }
    }
    assert!(
        (13..=67).contains(&v2),
        "v2 got {v2} of 400, expected 40 ± 27"
    );

    // GAMMA: the HTTPRoute attached to the ratings Service. `/api` matches whole segments.
    let ratings = through_waypoint(&mesh, RATINGS_VIP, Version::Http1).await;
    let a = ratings
        .get("ratings:9080", "/api/v1?x=1", &[])
        .await
        .expect("request");
    assert_eq!((a.status, a.server()), (200, Some("ratings")), "{a:?}");
    assert_eq!(a.line("path"), Some("/api/v1?x=1"));
    assert_eq!(
        a.request_headers().get("x-gamma"),
        Some(&vec!["yes".to_owned()])
    );
    let a = ratings
        .get("ratings:9080", "/apiv1", &[])
        .await
        .expect("request");
    assert_eq!(a.status, 404, "a path prefix matches whole segments: {a:?}");

    // details has no route config: proxied to its endpoints as it is.
    let details = through_waypoint(&mesh, DETAILS_VIP, Version::Http1).await;
    let a = details
        .get("details:9080", "/anything", &[])
        .await
        .expect("request");
    assert_eq!((a.status, a.server()), (200, Some("details")), "{a:?}");
    assert_eq!(a.line("path"), Some("/anything"));
}

const ALL_TO_V1: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_changes_apply_to_open_connections_and_bad_ones_keep_the_last_good() {
    let mesh = mesh();
    let _apps = apps(&mesh);
    let routes = routes_path(&mesh);
    write_atomic(&routes, ALL_TO_V1);
    let wp = start_waypoint(&mesh, &routes);
    let conn = through_waypoint(&mesh, REVIEWS_VIP, Version::Http1).await;
    let a = conn.get("reviews:9080", "/", &[]).await.expect("request");
    assert_eq!(a.server(), Some("reviews-v1"), "{a:?}");

    // The same route, now to v2: the open connection's next requests follow it.
    write_atomic(&routes, &ALL_TO_V1.replace("subset: v1}", "subset: v2}"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let a = conn
            .get("reviews:9080", "/", &[])
            .await
            .expect("request on the open connection");
        assert_eq!(a.status, 200, "{a:?}");
        if a.server() == Some("reviews-v2") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new route was not applied:\n{}",
            wp.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A broken change (a field of the wrong type) is refused whole: the error names the
    // file and field, and requests keep the last good routes.
    write_atomic(
        &routes,
        &ALL_TO_V1.replace("subset: v1}", "subset: v1}\n      weight: lots"),
    );
    wp.wait_for_log("route config not applied", Duration::from_secs(10))
        .expect("refusal logged");
    let log = wp.log();
    assert!(
        log.contains("routes.yaml") && log.contains("weight"),
        "{log}"
    );
    for _ in 0..5 {
        let a = conn.get("reviews:9080", "/", &[]).await.expect("request");
        assert_eq!(a.server(), Some("reviews-v2"), "{a:?}");
    }
}
