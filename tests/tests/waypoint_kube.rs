//! The waypoint reading its routes from the Kubernetes API (`--kube`): a real waypoint
//! process in its pod, a stand-in API server in the same pod (`mesh_tests::kube_api`,
//! speaking the real list/watch protocol with objects shaped as a real server's), real
//! ztunnels and applications. The objects are the Istio tutorials' reviews VirtualService
//! and DestinationRule and a GAMMA HTTPRoute, as users `kubectl apply` them.

use std::future::Future;
use std::time::Duration;

use mesh_tests::http_app::{HttpConn, Version};
use mesh_tests::kube_api::{ApiServer, TOKEN, kubeconfig_path, start_waypoint_kube};
use mesh_tests::mesh::{Mesh, http_get};
use mesh_tests::waypoint::{RATINGS_VIP, REVIEWS_VIP, apps, mesh_with, through_waypoint};
use mesh_tests::{Proc, wait_until};

/// Everything to v1 (the tutorial's `catalog-virtualservice-all-v1`, for reviews, as
/// written for Istio: v1alpha3; the API server serves it as v1) and the subsets.
const ALL_TO_V1: &str = r#"
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

/// The tutorial's dark launch: `x-dark-launch: v2` goes to v2, the rest to v1.
const DARK_LAUNCH: &str = r#"
apiVersion: networking.istio.io/v1alpha3
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
          exact: "v2"
    route:
    - destination:
        host: reviews
        subset: v2
  - route:
    - destination:
        host: reviews
        subset: v1
"#;

/// A GAMMA route on the ratings Service, and a broken VirtualService for details (a field
/// the API does not have: the CRD's schema would prune it, a recorded object can carry it).
const RATINGS_AND_BROKEN: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: ratings
  namespace: default
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
    backendRefs:
    - name: ratings
      port: 9080
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: details
spec:
  hosts:
  - details
  http:
  - route:
    - destination:
        host: details
    retries:
      attempts: lots
"#;

/// An HTTPRoute on reviews, which does not use the waypoint in these tests.
const REVIEWS_ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: reviews
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: reviews
  rules:
  - backendRefs:
    - name: reviews
      port: 9080
"#;

/// An HTTPRoute for a Service the first test does not call.
const UNRELATED_ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: details
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: details
  rules:
  - backendRefs:
    - name: details
      port: 9080
"#;

/// What the waypoint watches, by plural.
const PLURALS: [&str; 4] = [
    "virtualservices",
    "destinationrules",
    "httproutes",
    "grpcroutes",
];

/// The test mesh with ratings and details using the waypoint (`istio.io/use-waypoint`), so
/// their routes' status is the waypoint's to write; reviews does not.
fn waypoint_mesh() -> Mesh {
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

const API_ADDR: &str = "127.0.0.1:16443";

async fn start_api(mesh: &Mesh, yaml: &str) -> ApiServer {
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
async fn until<F: Future<Output = bool>>(timeout: Duration, mut cond: impl FnMut() -> F) -> bool {
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
async fn reviews_server(conn: &HttpConn, dark: bool) -> String {
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

fn metrics(mesh: &Mesh) -> String {
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
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

fn watches(api: &ApiServer, plural: &str) -> (usize, usize) {
    let mut lists = 0;
    let mut watches = 0;
    for s in api.seen() {
        if s.method == "GET" && s.uri.contains(&format!("/{plural}?")) {
            if s.uri.contains("watch=true") {
                watches += 1;
            } else {
                lists += 1;
            }
        }
    }
    (lists, watches)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_follow_the_api_server_through_changes_410_and_an_outage() {
    let mesh = waypoint_mesh();
    let _apps = apps(&mesh);
    let mut api = start_api(&mesh, ALL_TO_V1).await;
    let wp: Proc = start_waypoint_kube(&mesh, &kubeconfig_path(&mesh), &[]);

    // The served VirtualService routes: everything to v1, the header makes no difference.
    let conn = through_waypoint(&mesh, REVIEWS_VIP, Version::Http2).await;
    for _ in 0..5 {
        assert_eq!(
            reviews_server(&conn, true).await,
            "reviews-v1",
            "{}",
            wp.log()
        );
    }
    // A list then a watch from its resourceVersion, with bookmarks, with the kubeconfig's token.
    let seen = api.seen();
    let vs: Vec<_> = seen
        .iter()
        .filter(|s| {
            s.uri
                .starts_with("/apis/networking.istio.io/v1/virtualservices?")
        })
        .collect();
    assert!(vs.iter().any(|s| !s.uri.contains("watch=true")), "{vs:?}");
    assert!(
        vs.iter().any(|s| s.uri.contains("watch=true")
            && s.uri.contains("allowWatchBookmarks=true")
            && s.uri.contains("resourceVersion=")),
        "{vs:?}"
    );
    let bearer = format!("Bearer {TOKEN}");
    assert!(
        seen.iter()
            .all(|s| s.authorization.as_deref() == Some(bearer.as_str())),
        "{seen:?}"
    );

    // MODIFIED: the dark launch. The open connection's next requests follow it.
    api.apply_yaml(DARK_LAUNCH).expect("modify");
    assert!(
        until(Duration::from_secs(10), || async {
            reviews_server(&conn, true).await == "reviews-v2"
        })
        .await,
        "the modified VirtualService was not applied:\n{}",
        wp.log()
    );
    assert_eq!(reviews_server(&conn, false).await, "reviews-v1");

    // Bookmarks move the resume point; then etcd compacts: every watch ends with 410 and
    // the waypoint lists again, keeping the routes it had.
    let before: Vec<(usize, usize)> = PLURALS.iter().map(|p| watches(&api, p)).collect();
    api.compact();
    assert!(
        until(Duration::from_secs(15), || async {
            PLURALS
                .iter()
                .zip(&before)
                .all(|(p, (lists_before, watches_before))| {
                    let (lists, watches) = watches(&api, p);
                    lists > *lists_before && watches > *watches_before
                })
        })
        .await,
        "no re-list and new watch after 410:\n{}",
        wp.log()
    );
    assert!(wp.log().contains("410 Gone"), "{}", wp.log());
    for _ in 0..5 {
        assert_eq!(reviews_server(&conn, true).await, "reviews-v2");
        assert_eq!(reviews_server(&conn, false).await, "reviews-v1");
    }

    // A change of another kind moves the resourceVersion on; the DestinationRule watch
    // learns of it only from a bookmark, and resumes from there after the outage below.
    api.apply_yaml(UNRELATED_ROUTE).expect("another kind");
    // (Its status patch moves the resourceVersion on too: wait for it.)
    assert!(
        until(Duration::from_secs(10), || async {
            api.object("HTTPRoute", "default", "details")
                .is_some_and(|o| o.pointer("/status/parents/0").is_some())
        })
        .await,
        "no status on the details HTTPRoute:\n{}",
        wp.log()
    );
    let moved_to = api.revision();
    assert!(
        until(Duration::from_secs(10), || async {
            api.bookmarked("destinationrules")
                .is_some_and(|r| r >= moved_to)
        })
        .await,
        "no bookmark sent"
    );
    let dr_lists = watches(&api, "destinationrules").0;

    // The API server goes away: the last good routes keep serving, the source says so.
    api.stop().await;
    let away = tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(15), || {
            sample(
                &metrics(&mesh),
                "waypoint_config_source_connected{source=\"kube\"}",
            ) == Some(0.0)
        })
    });
    assert!(
        away.is_ok(),
        "source not reported away:\n{}\n{}",
        metrics(&mesh),
        wp.log()
    );
    assert!(wp.log().contains("Kubernetes API away"), "{}", wp.log());
    for _ in 0..5 {
        assert_eq!(reviews_server(&conn, true).await, "reviews-v2");
    }
    let fresh = through_waypoint(&mesh, REVIEWS_VIP, Version::Http1).await;
    assert_eq!(
        reviews_server(&fresh, true).await,
        "reviews-v2",
        "a new connection too"
    );

    // Changed while it was away, then back: the waypoint catches up.
    api.apply_yaml(ALL_TO_V1).expect("modify");
    api.start().expect("listen again");
    assert!(
        until(Duration::from_secs(30), || async {
            reviews_server(&conn, true).await == "reviews-v1"
        })
        .await,
        "the change made while away was not applied:\n{}",
        wp.log()
    );
    // The DestinationRule watch resumed from the bookmark's resourceVersion, without a list.
    assert!(
        until(Duration::from_secs(15), || async {
            api.seen().iter().any(|s| {
                s.uri.contains("/destinationrules?")
                    && s.uri.contains("watch=true")
                    && s.uri
                        .split("resourceVersion=")
                        .nth(1)
                        .and_then(|v| v.split('&').next()?.parse::<u64>().ok())
                        .is_some_and(|v| v >= moved_to)
            })
        })
        .await,
        "no DestinationRule watch resumed from {moved_to}: {:?}",
        api.seen().iter().map(|s| &s.uri).collect::<Vec<_>>()
    );
    assert_eq!(
        watches(&api, "destinationrules").0,
        dr_lists,
        "resumed, not listed again"
    );
    let m = metrics(&mesh);
    assert_eq!(
        sample(&m, "waypoint_config_source_connected{source=\"kube\"}"),
        Some(1.0),
        "{m}"
    );
    assert!(
        sample(
            &m,
            "waypoint_config_updates_total{source=\"kube\",result=\"error\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{m}"
    );

    // DELETED: without its VirtualService, reviews is balanced over both versions again.
    assert!(api.delete("VirtualService", "default", "reviews"));
    assert!(
        until(Duration::from_secs(10), || async {
            reviews_server(&conn, false).await == "reviews-v2"
        })
        .await,
        "the deleted VirtualService still routes:\n{}",
        wp.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_object_names_its_field_and_the_http_route_gets_its_status() {
    let mesh = waypoint_mesh();
    let _apps = apps(&mesh);
    let api = start_api(&mesh, &format!("{ALL_TO_V1}\n---\n{RATINGS_AND_BROKEN}")).await;
    // A cluster without the GRPCRoute CRD: the waypoint still gets ready.
    api.unserve("GRPCRoute");
    let wp = start_waypoint_kube(&mesh, &kubeconfig_path(&mesh), &[]);
    assert!(
        wp.log()
            .contains("GRPCRoute is not served by the API server"),
        "{}",
        wp.log()
    );

    // The broken VirtualService is rejected by name and field; the others serve.
    let log = wp.log();
    assert!(
        log.contains("VirtualService default/details")
            && log.contains("spec.http[0].retries.attempts"),
        "{log}"
    );
    let reviews = through_waypoint(&mesh, REVIEWS_VIP, Version::Http1).await;
    assert_eq!(reviews_server(&reviews, true).await, "reviews-v1");
    let ratings = through_waypoint(&mesh, RATINGS_VIP, Version::Http1).await;
    let a = ratings
        .get("ratings:9080", "/api/v1", &[])
        .await
        .expect("request");
    assert_eq!((a.status, a.server()), (200, Some("ratings")), "{a:?}");
    let a = ratings
        .get("ratings:9080", "/other", &[])
        .await
        .expect("request");
    assert_eq!(a.status, 404, "the HTTPRoute's match applies: {a:?}");
    let m = metrics(&mesh);
    assert_eq!(
        sample(
            &m,
            "waypoint_config_updates_total{source=\"kube\",result=\"rejected\"}"
        ),
        Some(1.0),
        "{m}"
    );
    // VirtualService, DestinationRule, HTTPRoute (and the HTTPRoute again once its status
    // patch comes back as a new version).
    assert!(
        sample(
            &m,
            "waypoint_config_updates_total{source=\"kube\",result=\"applied\"}"
        )
        .is_some_and(|n| n >= 3.0),
        "{m}"
    );
    let (status, dump) = http_get(
        &mesh.netns("wp"),
        "127.0.0.1:15000".parse().unwrap(),
        "/config_dump",
    )
    .expect("config_dump");
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&dump).expect("JSON");
    assert_eq!(dump["routes"]["source"], "kube");
    let errors = dump["routes"]["errors"].as_array().expect("errors").clone();
    assert!(
        errors.len() == 1
            && errors[0]
                .as_str()
                .is_some_and(|e| e.contains("VirtualService default/details")
                    && e.contains("spec.http[0].retries.attempts")),
        "{errors:?}"
    );

    // The HTTPRoute's status: a merge patch on /status with our parent entry, Accepted and
    // ResolvedRefs True, stored by the API server.
    let patched = tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(10), || {
            api.object("HTTPRoute", "default", "ratings")
                .is_some_and(|o| o.pointer("/status/parents/0").is_some())
        })
    });
    assert!(patched.is_ok(), "no status written:\n{}", wp.log());
    let patch = api
        .seen()
        .into_iter()
        .find(|s| s.method == "PATCH")
        .expect("a PATCH");
    assert_eq!(
        patch.uri.split('?').next(),
        Some("/apis/gateway.networking.k8s.io/v1/namespaces/default/httproutes/ratings/status")
    );
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    let route = api
        .object("HTTPRoute", "default", "ratings")
        .expect("route");
    let parent = &route["status"]["parents"][0];
    assert_eq!(parent["controllerName"], "ambient.rs/waypoint");
    assert_eq!(parent["parentRef"]["name"], "ratings");
    assert_eq!(parent["parentRef"]["kind"], "Service");
    let condition = |t: &str| {
        parent["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == t).cloned())
            .unwrap_or_default()
    };
    assert_eq!(condition("Accepted")["status"], "True", "{route}");
    assert_eq!(condition("ResolvedRefs")["status"], "True", "{route}");
    assert_eq!(condition("Accepted")["observedGeneration"], 1, "{route}");

    // A backend that is not in the mesh: ResolvedRefs False, naming the field. Written once.
    api.apply_yaml(REVIEWS_ROUTE).expect("reviews route");
    api.apply_yaml(&RATINGS_AND_BROKEN.replace(
        "- name: ratings\n      port: 9080",
        "- name: nowhere\n      port: 9080",
    ))
    .expect("modify");
    let resolved_false = tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(10), || {
            api.object("HTTPRoute", "default", "ratings")
                .is_some_and(|o| {
                    o.pointer("/status/parents/0/conditions")
                        .and_then(|c| c.as_array())
                        .is_some_and(|cs| {
                            cs.iter().any(|c| {
                                c["type"] == "ResolvedRefs"
                                    && c["status"] == "False"
                                    && c["reason"] == "BackendNotFound"
                                    && c["message"].as_str().is_some_and(|m| {
                                        m.starts_with("spec.rules[0].backendRefs[0]")
                                    })
                            })
                        })
                })
        })
    });
    assert!(
        resolved_false.is_ok(),
        "{}\n{}",
        api.object("HTTPRoute", "default", "ratings")
            .unwrap_or_default(),
        wp.log()
    );
    // A route on a Service that does not use this waypoint is not its to report on (it came
    // before the ratings change on the same watch, so it has been handled by now).
    let reviews_route = api
        .object("HTTPRoute", "default", "reviews")
        .expect("route");
    assert!(reviews_route.get("status").is_none(), "{reviews_route}");
    let patches = api.seen().iter().filter(|s| s.method == "PATCH").count();
    assert_eq!(
        patches, 2,
        "a patch per change of the status, none for our own echo"
    );

    // The broken VirtualService fixed: accepted, and the errors are gone.
    api.apply_yaml(&RATINGS_AND_BROKEN.replace("attempts: lots", "attempts: 3"))
        .expect("fix");
    let fixed = tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(10), || {
            http_get(
                &mesh.netns("wp"),
                "127.0.0.1:15000".parse().unwrap(),
                "/config_dump",
            )
            .ok()
            .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
            .is_some_and(|d| d["routes"]["errors"].as_array().is_some_and(Vec::is_empty))
        })
    });
    assert!(
        fixed.is_ok(),
        "the fixed object was not accepted:\n{}",
        wp.log()
    );
    let m = metrics(&mesh);
    assert_eq!(
        sample(
            &m,
            "waypoint_config_updates_total{source=\"kube\",result=\"rejected\"}"
        ),
        Some(1.0),
        "{m}"
    );
}
