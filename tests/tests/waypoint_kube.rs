//! The waypoint reading its routes from the Kubernetes API (`--kube`): a real waypoint
//! process in its pod, a stand-in API server in the same pod (`mesh_tests::kube_api`,
//! speaking the real list/watch protocol with objects shaped as a real server's), real
//! ztunnels and applications. Here: routing by the served objects as they change (MODIFIED,
//! DELETED), the re-list after 410, bookmarks, and an outage of the API server. The objects
//! are the Istio tutorials' reviews VirtualService and DestinationRule, as users apply them.

use std::time::Duration;

use mesh_tests::http_app::Version;
use mesh_tests::kube_api::harness::{
    ALL_TO_V1, metrics, reviews_server, sample, start_api, until, waypoint_mesh,
};
use mesh_tests::kube_api::{ApiServer, TOKEN, kubeconfig_path, start_waypoint_kube};
use mesh_tests::waypoint::{REVIEWS_VIP, apps, through_waypoint};
use mesh_tests::{Proc, wait_until};

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
const PLURALS: [&str; 6] = [
    "virtualservices",
    "destinationrules",
    "httproutes",
    "grpcroutes",
    "authorizationpolicies",
    "requestauthentications",
];

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
