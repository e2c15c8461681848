//! The waypoint's `--kube` source and what it reports: an object with an error rejected by
//! name and field while the others serve (log, metric, `/config_dump`), then fixed; a kind
//! the API server does not serve; the Gateway API status of the HTTPRoute on a Service that
//! uses the waypoint (merge patch on `/status`, written once per change), and none on a
//! Service that does not.

use std::time::Duration;

use mesh_tests::http_app::Version;
use mesh_tests::kube_api::harness::{
    ALL_TO_V1, metrics, reviews_server, sample, start_api, waypoint_mesh,
};
use mesh_tests::kube_api::{kubeconfig_path, start_waypoint_kube};
use mesh_tests::mesh::http_get;
use mesh_tests::wait_until;
use mesh_tests::waypoint::{RATINGS_VIP, REVIEWS_VIP, apps, through_waypoint};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_object_names_its_field_and_the_http_route_gets_its_status() {
    let mesh = waypoint_mesh();
    let _apps = apps(&mesh);
    let api = start_api(&mesh, &format!("{ALL_TO_V1}\n---\n{RATINGS_AND_BROKEN}")).await;
    // A cluster without the GRPCRoute CRD: the waypoint still gets ready.
    api.unserve("GRPCRoute");
    // And one whose status patches fail at first (etcd timing out).
    api.refuse_status_patches(true);
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
    // ...and its refusal taken back.
    let taken_back = tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(10), || {
            api.object("VirtualService", "default", "details")
                .is_some_and(|o| !o.to_string().contains("WaypointAccepted"))
        })
    });
    assert!(taken_back.is_ok(), "{}", wp.log());
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
    // A refused status patch is logged and tried again (on the next event, or after 5 s).
    let refused = tokio::task::block_in_place(|| {
        wp.wait_for_log(
            "status not written (tried again later)",
            Duration::from_secs(10),
        )
    });
    assert!(refused.is_ok(), "{refused:?}");
    api.refuse_status_patches(false);
    let patched = tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(20), || {
            api.object("HTTPRoute", "default", "ratings")
                .is_some_and(|o| o.pointer("/status/parents/0").is_some())
        })
    });
    assert!(patched.is_ok(), "no status written:\n{}", wp.log());
    let patch = api
        .seen()
        .into_iter()
        .find(|s| s.method == "PATCH" && s.uri.contains("/httproutes/"))
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
    assert_eq!(
        parent["controllerName"],
        "ambient-dataplane.io/waypoint-controller"
    );
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
    // The broken VirtualService (details uses this waypoint) says why it is refused.
    let details = api
        .object("VirtualService", "default", "details")
        .expect("details");
    let refused = details["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "WaypointAccepted"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(refused["status"], "False", "{details}");
    assert_eq!(refused["reason"], "Invalid", "{details}");
    assert!(
        refused["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("spec.http[0].retries.attempts")),
        "{details}"
    );
    assert_eq!(
        api.status_patches(),
        3,
        "a patch per change of a status (two of the route's, the VirtualService's), none for \
         our own echo"
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

/// Policies for this waypoint, for another, and one it refuses (a field RequestAuthentication
/// does not have).
const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: own-gateway, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/private*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ratings-only, namespace: default}
spec:
  targetRefs: [{group: "", kind: Service, name: ratings}]
  action: ALLOW
  rules: [{from: [{source: {namespaces: [default]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: another-waypoint, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: other}]
  action: DENY
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]
  jwtRules:
  - issuer: https://issuer.example
    jwksUri: http://198.18.0.250/jwks.json
    forwardToken: true
"#;

/// The `WaypointAccepted` condition of a policy: (status, reason, message), once it has one.
fn waypoint_accepted(
    api: &mesh_tests::kube_api::ApiServer,
    kind: &str,
    name: &str,
) -> Option<(String, String, String)> {
    let object = api.object(kind, "default", name)?;
    let c = object
        .pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c["type"] == "WaypointAccepted")?
        .clone();
    let s = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
    Some((s("status"), s("reason"), s("message")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_bound_to_the_waypoint_or_refused_by_it_get_waypoint_accepted() {
    let mesh = waypoint_mesh();
    let _apps = apps(&mesh);
    let api = start_api(&mesh, POLICIES).await;
    let wp = start_waypoint_kube(&mesh, &kubeconfig_path(&mesh), &[]);
    let condition = |kind: &'static str, name: &'static str| {
        let api = &api;
        move || waypoint_accepted(api, kind, name)
    };
    let bound = (
        "True".to_owned(),
        "Accepted".to_owned(),
        "bound to default/waypoint".to_owned(),
    );
    for name in ["own-gateway", "ratings-only"] {
        let got = tokio::task::block_in_place(|| {
            wait_until(Duration::from_secs(10), || {
                condition("AuthorizationPolicy", name)().is_some()
            })
        });
        assert!(got.is_ok(), "{name}: no condition\n{}", wp.log());
        assert_eq!(
            condition("AuthorizationPolicy", name)(),
            Some(bound.clone())
        );
    }
    let refused = tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(10), || {
            condition("RequestAuthentication", "jwt")().is_some()
        })
    });
    assert!(refused.is_ok(), "{}", wp.log());
    let (status, reason, message) = condition("RequestAuthentication", "jwt")().unwrap();
    assert_eq!((status.as_str(), reason.as_str()), ("False", "Invalid"));
    assert!(
        message.contains("spec.jwtRules[0].forwardToken"),
        "{message}"
    );
    // Another waypoint's policy is not ours to speak for.
    assert_eq!(condition("AuthorizationPolicy", "another-waypoint")(), None);

    // Fixed: accepted, and bound here.
    api.apply_yaml(&POLICIES.replace("forwardToken", "forwardOriginalToken"))
        .expect("fixed");
    let fixed = tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(10), || {
            condition("RequestAuthentication", "jwt")() == Some(bound.clone())
        })
    });
    assert!(
        fixed.is_ok(),
        "{:?}\n{}",
        condition("RequestAuthentication", "jwt")(),
        wp.log()
    );
}
