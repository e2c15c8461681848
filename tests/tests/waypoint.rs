//! The waypoint end to end: a real waypoint process in its own pod, real ztunnels on two
//! nodes, HTTP applications in pods (harness: `mesh_tests::waypoint`). The waypoint tunnels
//! to the chosen endpoint's 15008, where the destination ztunnel delivers to the application.

use std::time::Duration;

use mesh_tests::http_app::Version;
use mesh_tests::waypoint::{
    DETAILS_VIP, RATINGS_VIP, REVIEWS_VIP, apps, mesh, mesh_with, routes_path, start_waypoint,
    through_waypoint, write_atomic,
};

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

    // The 90/10 canary over 10,000 requests: v2 expected 1,000 times (binomial, sd 30); the
    // 99.99% two-sided bound is ± 3.89 sd = ± 117.
    let reviews = through_waypoint(&mesh, REVIEWS_VIP, Version::Http2).await;
    let mut v2 = 0;
    for _batch in 0..20 {
        let mut tasks = Vec::new();
        for _ in 0..500 {
            let reviews = reviews.clone();
            tasks.push(tokio::spawn(async move {
                reviews.get("reviews:9080", "/canary", &[]).await
            }));
        }
        for t in tasks {
            let a = t.await.expect("task").expect("request");
            assert_eq!(a.status, 200, "{a:?}");
            if a.server() == Some("reviews-v2") {
                v2 += 1;
            }
        }
    }
    assert!(
        (883..=1117).contains(&v2),
        "v2 got {v2} of 10,000, expected 1,000 ± 117"
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
    // The admin endpoint says so too: the change was rejected, why, and what is served.
    let (status, dump) = mesh_tests::mesh::http_get(
        &mesh.netns("wp"),
        "127.0.0.1:15000".parse().expect("addr"),
        "/config_dump",
    )
    .expect("config_dump");
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&dump).expect("JSON");
    assert_eq!(dump["routes"]["last_change"], "rejected", "{dump}");
    let errors = dump["routes"]["errors"].to_string();
    assert!(
        errors.contains("weight") && errors.contains("routes.yaml"),
        "{dump}"
    );
    assert_eq!(
        dump["routes"]["hosts"],
        serde_json::json!(["reviews.default.svc.cluster.local"]),
        "{dump}"
    );
    assert_eq!(
        dump["identity"],
        "spiffe://cluster.local/ns/default/sa/waypoint"
    );
    assert_eq!(dump["mesh"]["complete"], true);
    for _ in 0..5 {
        let a = conn.get("reviews:9080", "/", &[]).await.expect("request");
        assert_eq!(a.server(), Some("reviews-v2"), "{a:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_pass_through_the_route() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let mesh = mesh();
    let _apps = apps(&mesh);
    let routes = routes_path(&mesh);
    write_atomic(&routes, TUTORIAL);
    let wp = start_waypoint(&mesh, &routes);
    let stream = mesh_tests::waypoint::tunnel_to_waypoint(&mesh, REVIEWS_VIP).await;
    // The dark-launch route sends the handshake to v2; the messages follow on the switched
    // connection.
    let request = http::Request::builder()
        .uri("ws://reviews:9080/chat")
        .header("x-dark-launch", "v2")
        .header("host", "reviews:9080")
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header(
            "sec-websocket-key",
            tokio_tungstenite::tungstenite::handshake::client::generate_key(),
        )
        .body(())
        .expect("request");
    let (mut ws, response) = tokio_tungstenite::client_async(request, stream)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "WebSocket handshake through the waypoint: {e}\n{}",
                wp.log()
            )
        });
    assert_eq!(response.status(), 101);
    for i in 0..3 {
        ws.send(Message::text(format!("hello {i}")))
            .await
            .expect("send");
        let echoed = ws.next().await.expect("an answer").expect("a message");
        assert_eq!(echoed, Message::text(format!("reviews-v2: hello {i}")));
    }
    ws.close(None).await.expect("close");
}

/// `curl -i` from `pod` of `url` with extra request headers.
fn curl_i(mesh: &mesh_tests::mesh::Mesh, pod: &str, url: &str, headers: &[&str]) -> (i32, String) {
    let mut args = Vec::new();
    for h in headers {
        args.extend(["-H", h]);
    }
    args.push(url);
    mesh_tests::waypoint::curl_i(mesh, pod, &args)
}

/// The whole path: an application in an enrolled pod connects to the reviews VIP; its
/// ztunnel captures the connection and, reviews being labelled `istio.io/use-waypoint`,
/// tunnels it to the waypoint, which routes it to a reviews pod. With the waypoint gone the
/// connection fails and nothing reaches reviews (fail closed, never around the waypoint).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_traffic_to_a_labelled_service_is_routed_by_the_waypoint() {
    let mesh = mesh_with(|m| {
        m.service_labels.push((
            "reviews".to_owned(),
            "istio.io/use-waypoint".to_owned(),
            "waypoint".to_owned(),
        ));
    });
    let apps = apps(&mesh);
    let routes = routes_path(&mesh);
    write_atomic(&routes, TUTORIAL);
    let mut wp = start_waypoint(&mesh, &routes);
    let url = format!("http://{REVIEWS_VIP}:9080/reviews/1");

    let (code, out) = curl_i(&mesh, "sleep", &url, &["x-dark-launch: v2"]);
    assert_eq!(code, 0, "{out}\n{}", wp.log());
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("server reviews-v2"), "{out}");
    assert!(
        out.to_ascii_lowercase().contains("x-served-via: waypoint"),
        "{out}"
    );
    let (code, out) = curl_i(&mesh, "sleep", &url, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("server reviews-v1"), "{out}");
    // A path no rule matches: the waypoint's 404 proves the request went through it.
    let (_, out) = curl_i(
        &mesh,
        "sleep",
        &format!("http://{REVIEWS_VIP}:9080/other"),
        &[],
    );
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");

    let served: u64 = apps[..2].iter().map(|a| a.requests()).sum();
    wp.kill();
    // While the waypoint is gone, nothing goes to the reviews pods at all: no plaintext to
    // the application port, no tunnel to their HBONE port (capture on their node).
    let node = mesh.topo.node("n2").netns.clone();
    let mut capture =
        mesh_tests::wire::PacketCapture::start(&node, "any", mesh.dir.path(), "n2-no-waypoint")
            .expect("capture");
    for _ in 0..3 {
        let (code, out) = curl_i(&mesh, "sleep", &url, &[]);
        assert_ne!(code, 0, "answered without its waypoint: {out}");
    }
    capture.stop().expect("stop capture");
    let pods = [mesh.ip("reviews-v1"), mesh.ip("reviews-v2")];
    for pod in pods {
        let seen = capture
            .packets(&format!(
                "dst host {pod} and (tcp port 8080 or tcp port 15008)"
            ))
            .expect("read capture");
        assert!(
            seen.is_empty(),
            "traffic reached {pod} around the waypoint: {seen:?}"
        );
    }
    assert_eq!(
        apps[..2].iter().map(|a| a.requests()).sum::<u64>(),
        served,
        "a request reached reviews around the waypoint"
    );

    // The waypoint comes back: traffic resumes, no config change needed.
    drop(wp);
    let wp = start_waypoint(&mesh, &routes);
    // The same capture now sees the waypoint's tunnel to v2 (the check above can fail).
    let mut capture =
        mesh_tests::wire::PacketCapture::start(&node, "any", mesh.dir.path(), "n2-waypoint")
            .expect("capture");
    let (code, out) = curl_i(&mesh, "sleep", &url, &["x-dark-launch: v2"]);
    assert_eq!(code, 0, "{out}\n{}", wp.log());
    assert!(out.contains("server reviews-v2"), "{out}");
    capture.stop().expect("stop capture");
    let tunnel = capture
        .packets(&format!("dst host {} and tcp port 15008", pods[1]))
        .expect("read capture");
    assert!(
        !tunnel.is_empty(),
        "no HBONE to reviews-v2 seen on its node"
    );
}

/// The waypoint reads workloads and services from istiod's workload API (the in-process xDS
/// server) instead of a file: it is ready only once the first answer arrived, and routes by
/// the subsets of the workloads it learned there.
#[test]
fn workloads_and_services_from_xds() {
    // The mesh (and its xDS server, which has a runtime of its own) lives outside the
    // client's runtime.
    let mesh = mesh_tests::waypoint::mesh_xds();
    let _apps = apps(&mesh);
    let routes = routes_path(&mesh);
    write_atomic(&routes, TUTORIAL);
    let wp = mesh_tests::waypoint::start_waypoint_xds(&mesh, &routes);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let reviews = through_waypoint(&mesh, REVIEWS_VIP, Version::Http1).await;
        for (header, want) in [
            (Some(("x-dark-launch", "v2")), "reviews-v2"),
            (None, "reviews-v1"),
        ] {
            let headers: Vec<(&str, &str)> = header.into_iter().collect();
            let a = reviews
                .get("reviews:9080", "/reviews/1", &headers)
                .await
                .expect("request");
            assert_eq!(
                (a.status, a.server()),
                (200, Some(want)),
                "{a:?}\n{}",
                wp.log()
            );
        }
    });
}

/// The waypoint takes its certificate from Istio's CA (the in-process stand-in on istiod's
/// 15012, bearer token, as ztunnel does) when the mesh uses one: both ztunnels accept it, as
/// the client's tunnel's server and as the client of the destination's.
#[test]
fn certificates_from_istios_ca() {
    let mesh = mesh_with(|m| {
        m.service_labels.push((
            "reviews".to_owned(),
            "istio.io/use-waypoint".to_owned(),
            "waypoint".to_owned(),
        ));
        m.use_istio_ca(Duration::from_secs(3600)).expect("Istio CA");
        // The waypoint pod reaches the CA on the fabric, as ztunnels do.
        m.topo.route_fabric_to_pods().expect("fabric routes");
    });
    let _apps = apps(&mesh);
    let routes = routes_path(&mesh);
    write_atomic(&routes, TUTORIAL);
    let mut mesh = mesh;
    let wp = start_waypoint(&mesh, &routes);
    // Istio's agents name the identity they ask for in the request's metadata.
    let waypoint_id = "spiffe://cluster.local/ns/default/sa/waypoint";
    let asked = mesh
        .istio_ca()
        .requests()
        .iter()
        .filter(|seen| {
            seen.request.metadata.as_ref().is_some_and(|m| {
                m.fields.get("ImpersonatedIdentity").is_some_and(|v| {
                    matches!(&v.kind, Some(prost_types::value::Kind::StringValue(id)) if id == waypoint_id)
                })
            })
        })
        .count();
    assert!(asked >= 1, "the CA issued nothing for {waypoint_id}");
    let url = format!("http://{REVIEWS_VIP}:9080/reviews/1");
    let (code, out) = curl_i(&mesh, "sleep", &url, &["x-dark-launch: v2"]);
    assert_eq!(code, 0, "{out}\n{}", wp.log());
    assert!(out.contains("server reviews-v2"), "{out}");
    assert!(
        out.to_ascii_lowercase().contains("x-served-via: waypoint"),
        "{out}"
    );
}
