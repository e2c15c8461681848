//! AuthorizationPolicy at a real waypoint, with curl in enrolled pods (their ztunnels carry
//! the requests to the waypoint with the pods' identities): Istio's ambient Bookinfo policy
//! (GET from sleep's service account only) with a DENY of a path for every service through
//! the waypoint, a header condition, gRPC's PERMISSION_DENIED; a namespace-wide policy
//! changed while running, a CUSTOM policy denied (external authorization is not
//! implemented) and reported, and a broken change refused with its field path while the last
//! good policies keep serving; and the same from the Kubernetes API (`--kube`, the stand-in
//! API server). Harness: `mesh_tests::waypoint`.

use std::time::Duration;

use mesh_tests::http_app::Version;
use mesh_tests::kube_api::harness::{start_api, until, waypoint_mesh};
use mesh_tests::kube_api::{kubeconfig_path, start_waypoint_kube};
use mesh_tests::process::wait_until;
use mesh_tests::waypoint::{
    RATINGS_VIP, REVIEWS_VIP, apps, curl_i, curl_status as status, labelled_mesh, mesh_with,
    metric, routes_path, start_waypoint, through_waypoint, write_atomic,
};

/// The Bookinfo ambient tutorial's policy, on reviews here (the mesh has no productpage),
/// as its YAML is written; a DENY of /admin on the waypoint's Gateway (every service
/// through it); a DENY of ratings when a header says so.
const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: reviews-viewer
  namespace: default
spec:
  targetRefs:
  - kind: Service
    group: ""
    name: reviews
  action: ALLOW
  rules:
  - from:
    - source:
        principals:
        - cluster.local/ns/default/sa/sleep
    to:
    - operation:
        methods: ["GET"]
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: deny-admin
  namespace: default
spec:
  targetRefs:
  - kind: Gateway
    group: gateway.networking.k8s.io
    name: waypoint
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/admin", "/admin/*"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: ratings-blocked-header
  namespace: default
spec:
  targetRefs:
  - kind: Service
    group: ""
    name: ratings
  action: DENY
  rules:
  - when:
    - key: request.headers[x-block]
      values: ["yes", "true"]
"#;

#[test]
fn bookinfo_policy_allows_get_from_sleep_denies_the_rest_and_a_path() {
    let mesh = labelled_mesh();
    let apps = apps(&mesh);
    let routes = routes_path(&mesh);
    write_atomic(&routes, POLICIES);
    let wp = start_waypoint(&mesh, &routes);
    let reviews = format!("http://{REVIEWS_VIP}:9080");
    let ratings = format!("http://{RATINGS_VIP}:9080");
    let served_before: u64 = apps.iter().map(|a| a.requests()).sum();

    // Allowed: GET from sleep.
    let (s, out) = status(&mesh, "sleep", &[&format!("{reviews}/reviews/1")]);
    assert_eq!(s, 200, "{out}\n{}", wp.log());
    assert!(out.contains("server reviews-v"), "{out}");

    // Not GET, or not sleep: no ALLOW rule matches. Envoy's answer, word for word.
    let (s, out) = status(
        &mesh,
        "sleep",
        &["-X", "POST", "-d", "x", &format!("{reviews}/reviews/1")],
    );
    assert_eq!(s, 403, "{out}");
    assert!(out.ends_with("\r\n\r\nRBAC: access denied"), "{out:?}");
    let (s, out) = status(&mesh, "details", &[&format!("{reviews}/reviews/1")]);
    assert_eq!(s, 403, "details is not allowed: {out}\n{}", wp.log());

    // The Gateway-wide DENY comes before the ALLOW, and covers ratings too.
    let (s, _) = status(&mesh, "sleep", &[&format!("{reviews}/admin/users")]);
    assert_eq!(s, 403);
    let (s, _) = status(&mesh, "sleep", &[&format!("{ratings}/admin")]);
    assert_eq!(s, 403);
    let (s, _) = status(&mesh, "sleep", &[&format!("{ratings}/administrator")]);
    assert_eq!(s, 200, "/admin and /admin/* do not cover /administrator");
    // Dot segments, plain or percent-encoded, do not slip past: the policy sees /admin.
    for path in ["/public/../admin", "/public/%2e%2e/admin/x"] {
        let (s, out) = status(
            &mesh,
            "sleep",
            &["--path-as-is", &format!("{ratings}{path}")],
        );
        assert_eq!(s, 403, "{path}: {out}");
    }

    // A header condition: a header decides the request, never who the client is.
    let (s, _) = status(&mesh, "sleep", &["-H", "x-block: yes", &ratings]);
    assert_eq!(s, 403);
    let (s, _) = status(&mesh, "details", &["-H", "x-block: no", &ratings]);
    assert_eq!(s, 200, "ratings has no ALLOW policy: details may call it");
    let (s, _) = status(
        &mesh,
        "details",
        &[
            "-H",
            "x-forwarded-client-cert: By=spiffe://cluster.local/ns/default/sa/sleep",
            "-H",
            "x-forwarded-for: 10.0.0.1",
            &format!("{reviews}/reviews/1"),
        ],
    );
    assert_eq!(s, 403, "headers claiming to be sleep change nothing");

    // gRPC is answered as Envoy answers it: HTTP 200, grpc-status 7 PERMISSION_DENIED.
    let (s, out) = status(
        &mesh,
        "sleep",
        &[
            "--http2-prior-knowledge",
            "-X",
            "POST",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "--data-binary",
            "",
            &format!("{reviews}/reviews.Reviews/Delete"),
        ],
    );
    assert_eq!(s, 200, "{out}");
    let lower = out.to_ascii_lowercase();
    assert!(lower.contains("grpc-status: 7\r\n"), "{out}");
    assert!(lower.contains("grpc-message: rbac: access denied"), "{out}");

    // Denied requests reached no application; the allowed ones did.
    let served: u64 = apps.iter().map(|a| a.requests()).sum();
    assert_eq!(served - served_before, 3, "three requests were allowed");

    // Counted by policy (`-`: no ALLOW matched) and in Istio's request metric as RBAC.
    let denied = |labels: &[&str]| metric(&mesh, "waypoint_authz_denied_total", labels);
    assert_eq!(
        denied(&["policy=\"-\"", "reason=\"no_allow_matched\""]),
        4.0
    );
    assert_eq!(
        denied(&["policy=\"default/deny-admin\"", "reason=\"deny_matched\""]),
        4.0
    );
    assert_eq!(denied(&["policy=\"default/ratings-blocked-header\""]), 1.0);
    assert_eq!(
        metric(
            &mesh,
            "istio_requests_total",
            &["response_code=\"403\"", "response_flags=\"RBAC\""]
        ),
        8.0
    );
    assert_eq!(
        metric(
            &mesh,
            "istio_requests_total",
            &["response_code=\"200\"", "response_flags=\"RBAC\""]
        ),
        1.0,
        "the gRPC denial"
    );
    // Logged with the policy's name.
    let log = wp.log();
    assert!(
        log.lines()
            .any(|l| l.contains("denied by AuthorizationPolicy")
                && l.contains("\"default/deny-admin\"")
                && l.contains("/admin/users")),
        "{log}"
    );
    // `/config_dump` lists the policies in force.
    let (code, dump) = mesh_tests::mesh::http_get(
        &mesh.netns("wp"),
        "127.0.0.1:15000".parse().expect("addr"),
        "/config_dump",
    )
    .expect("config_dump");
    assert_eq!(code, 200);
    let dump: serde_json::Value = serde_json::from_str(&dump).expect("JSON");
    assert_eq!(
        dump["routes"]["authorization_policies"],
        serde_json::json!([
            "default/deny-admin",
            "default/ratings-blocked-header",
            "default/reviews-viewer"
        ]),
        "{dump}"
    );
}

const NAMESPACE_WIDE: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: same-namespace
spec:
  targetRefs:
  - {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}
  action: ALLOW
  rules:
  - from:
    - source:
        namespaces: ["prod"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: ext-authz
spec:
  targetRefs:
  - {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}
  action: CUSTOM
  provider:
    name: oauth2-proxy
  rules:
  - to:
    - operation:
        paths: ["/ext/*"]
"#;

#[test]
fn namespace_wide_custom_and_a_bad_change_keep_the_last_good_policies() {
    let mesh = labelled_mesh();
    let _apps = apps(&mesh);
    let routes = routes_path(&mesh);
    write_atomic(&routes, NAMESPACE_WIDE);
    let wp = start_waypoint(&mesh, &routes);
    let url = format!("http://{REVIEWS_VIP}:9080");

    // Only namespace prod is allowed: sleep (default) is not. CUSTOM is reported.
    let (s, _) = status(&mesh, "sleep", &[&url]);
    assert_eq!(s, 403);
    let log = wp.log();
    assert!(
        log.contains("default/ext-authz, spec.action")
            && log.contains("CUSTOM (external authorization)"),
        "{log}"
    );

    // Now namespace default: applied to the next requests.
    write_atomic(
        &routes,
        &NAMESPACE_WIDE.replace("namespaces: [\"prod\"]", "namespaces: [\"default\"]"),
    );
    wait_until(Duration::from_secs(10), || {
        status(&mesh, "sleep", &[&url]).0 == 200
    })
    .unwrap_or_else(|_| panic!("the new policy was not applied:\n{}", wp.log()));
    let (s, _) = status(&mesh, "details", &[&url]);
    assert_eq!(s, 200, "details is in default too");

    // The CUSTOM policy's paths are denied (fail closed), counted with their reason.
    let (s, out) = status(&mesh, "sleep", &[&format!("{url}/ext/login")]);
    assert_eq!(s, 403, "{out}");
    assert_eq!(
        metric(
            &mesh,
            "waypoint_authz_denied_total",
            &[
                "policy=\"default/ext-authz\"",
                "reason=\"custom_not_implemented\""
            ]
        ),
        1.0
    );

    // A change that drops the CUSTOM policy but has an address that is not one: refused
    // whole, with the field path; the last good policies keep serving.
    let rejected_before = metric(
        &mesh,
        "waypoint_config_updates_total",
        &["result=\"rejected\""],
    );
    let bad = NAMESPACE_WIDE
        .replace("namespaces: [\"prod\"]", "ipBlocks: [\"10.0.0.300\"]")
        .split("---")
        .next()
        .unwrap_or_default()
        .to_owned();
    write_atomic(&routes, &bad);
    wp.wait_for_log("route config not applied", Duration::from_secs(10))
        .expect("refusal logged");
    let log = wp.log();
    assert!(
        log.contains("routes.yaml:13:")
            && log.contains("spec.rules[0].from[0].source.ipBlocks[0]")
            && log.contains("10.0.0.300"),
        "{log}"
    );
    assert_eq!(
        metric(
            &mesh,
            "waypoint_config_updates_total",
            &["result=\"rejected\""]
        ),
        rejected_before + 1.0
    );
    let (s, _) = status(&mesh, "sleep", &[&format!("{url}/ext/login")]);
    assert_eq!(s, 403, "the CUSTOM policy still applies");
    let (s, _) = status(&mesh, "sleep", &[&url]);
    assert_eq!(s, 200, "the namespace policy still applies");
}

/// From the Kubernetes API (`--kube`): the tutorial's policy served by the stand-in API
/// server, a DENY added and deleted while a connection stays open, and a policy the decoder
/// refuses, which closes the waypoint's namespace (it could have applied to anything here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_follow_the_kubernetes_api_and_a_refused_one_fails_closed() {
    let mesh = waypoint_mesh();
    let _apps = apps(&mesh);
    let viewer = POLICIES.split("---").next().unwrap_or_default();
    let api = start_api(&mesh, viewer).await;
    let wp = start_waypoint_kube(&mesh, &kubeconfig_path(&mesh), &[]);
    let conn = through_waypoint(&mesh, REVIEWS_VIP, Version::Http2).await;
    let status = |method: &'static str, path: &'static str| {
        let conn = &conn;
        async move {
            conn.send(method, "reviews:9080", path, &[], bytes::Bytes::new())
                .await
                .expect("request")
                .status
        }
    };
    assert_eq!(status("GET", "/").await, 200, "{}", wp.log());
    assert_eq!(status("DELETE", "/").await, 403);

    let deny = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-private, namespace: default}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/private*"]}}]}]
"#;
    api.apply_yaml(deny).expect("apply");
    assert!(
        until(Duration::from_secs(10), || async {
            status("GET", "/private/x").await == 403
        })
        .await,
        "the DENY policy was not applied:\n{}",
        wp.log()
    );
    assert_eq!(status("GET", "/public").await, 200);
    assert!(api.delete("AuthorizationPolicy", "default", "deny-private"));
    assert!(
        until(Duration::from_secs(10), || async {
            status("GET", "/private/x").await == 200
        })
        .await,
        "the deleted policy still applies:\n{}",
        wp.log()
    );

    // Refused (an address that is not one): left out, and in its place every request
    // through the waypoint is denied, in the name of the refused policy.
    api.apply_yaml(&deny.replace(
        "to: [{operation: {paths: [\"/private*\"]}}]",
        "from: [{source: {ipBlocks: [\"10.0.0.300\"]}}]",
    ))
    .expect("apply");
    assert!(
        until(Duration::from_secs(10), || async {
            status("GET", "/public").await == 403
        })
        .await,
        "the refused policy did not fail closed:\n{}",
        wp.log()
    );
    let log = wp.log();
    assert!(
        log.contains("spec.rules[0].from[0].source.ipBlocks[0]") && log.contains("10.0.0.300"),
        "{log}"
    );
    assert_eq!(
        metric(
            &mesh,
            "waypoint_authz_denied_total",
            &[
                "policy=\"default/deny-private\"",
                "reason=\"policy_rejected\""
            ]
        ),
        1.0
    );
}

/// A port declared TCP is relayed as bytes: the policies' HTTP fields are unseen there, so
/// an ALLOW rule that needs one never matches and a DENY rule that has one always does (as
/// Istio treats HTTP fields on TCP). A refused tunnel reaches no application.
#[test]
fn relayed_tcp_sees_no_http_fields_and_fails_closed() {
    let mesh = mesh_with(|m| {
        m.service_labels.push((
            "reviews".to_owned(),
            "istio.io/use-waypoint".to_owned(),
            "waypoint".to_owned(),
        ));
        m.service_protocols
            .push(("reviews".to_owned(), 9080, "tcp".to_owned()));
    });
    let apps = apps(&mesh);
    let routes = routes_path(&mesh);
    let allow = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-tcp}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
  rules:
  - from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}]
    to: [{operation: {ports: ["9080"]}}]
  - from: [{source: {principals: [cluster.local/ns/default/sa/details]}}]
    to: [{operation: {methods: [GET]}}]
"#;
    write_atomic(&routes, allow);
    let wp = start_waypoint(&mesh, &routes);
    let url = format!("http://{REVIEWS_VIP}:9080/");
    let served = || apps.iter().map(|a| a.requests()).sum::<u64>();

    let (code, out) = curl_i(&mesh, "sleep", &[&url]);
    assert_eq!(code, 0, "{out}\n{}", wp.log());
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    // details' rule needs a method, which a relay does not show: refused.
    let before = served();
    let (code, out) = curl_i(&mesh, "details", &[&url]);
    assert_ne!(code, 0, "details got through a relay: {out}");
    assert_eq!(served(), before, "a refused tunnel reached an application");

    // A DENY of a path: on a relay the path is unseen, so it denies every tunnel.
    let deny = r#"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
"#;
    write_atomic(&routes, &format!("{allow}{deny}"));
    wait_until(Duration::from_secs(10), || {
        curl_i(&mesh, "sleep", &[&url]).0 != 0
    })
    .unwrap_or_else(|_| panic!("the DENY policy was not applied:\n{}", wp.log()));
    assert!(
        metric(
            &mesh,
            "waypoint_authz_denied_total",
            &["policy=\"default/deny-admin\"", "reason=\"deny_matched\""]
        ) >= 1.0
    );
    assert_eq!(
        metric(
            &mesh,
            "waypoint_authz_denied_total",
            &["policy=\"-\"", "reason=\"no_allow_matched\""]
        ),
        1.0,
        "details' relay"
    );
}
