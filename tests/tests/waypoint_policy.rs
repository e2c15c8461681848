//! Per-route policy through a real waypoint: retries (against the computed success rate),
//! the route timeout, fault injection (against the configured share), mirrors and metrics.
//! Harness: `mesh_tests::waypoint`; gRPC is in `waypoint_grpc.rs`.

use std::net::SocketAddr;
use std::time::Duration;

use mesh_tests::http_app::{HttpApp, Version};
use mesh_tests::waypoint::{
    RATINGS_VIP, apps, mesh, metric, routes_path, start_waypoint, through_waypoint, write_atomic,
};

const ROUTES: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /half}}]
    route: [{destination: {host: reviews, subset: v1}}]
    mirror: {host: reviews, subset: v2}
    mirrorPercentage: {value: 50}
  - match: [{uri: {prefix: /both}}]
    retries: {attempts: 3, retryOn: 5xx}
    route: [{destination: {host: reviews}}]
  - route: [{destination: {host: reviews, subset: v1}}]
    mirror: {host: reviews, subset: v2}
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
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings
spec:
  hosts: [ratings]
  http:
  - match: [{uri: {prefix: /flaky}}]
    retries: {attempts: 3, retryOn: 5xx}
    route: [{destination: {host: ratings}}]
  - match: [{uri: {prefix: /once}}]
    retries: {attempts: 0}
    route: [{destination: {host: ratings}}]
  - match: [{uri: {prefix: /slow}}]
    timeout: 0.2s
    route: [{destination: {host: ratings}}]
  - match: [{uri: {prefix: /fault}}]
    fault:
      abort:
        httpStatus: 418
        percentage: {value: 50}
    route: [{destination: {host: ratings}}]
  - match: [{uri: {prefix: /delay}}]
    fault:
      delay:
        fixedDelay: 0.5s
        percentage: {value: 50}
    route: [{destination: {host: ratings}}]
"#;

/// Sends `n` requests (`method` with `body`) side by side on one HTTP/2 connection through
/// the waypoint; returns the answers.
async fn answers(
    mesh: &mesh_tests::mesh::Mesh,
    method: &'static str,
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
    body: bytes::Bytes,
    n: usize,
) -> Vec<mesh_tests::http_app::Answer> {
    let conn = through_waypoint(mesh, RATINGS_VIP, Version::Http2).await;
    let mut tasks = Vec::new();
    for _ in 0..n {
        let conn = conn.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            conn.send(method, "ratings:9080", path, headers, body).await
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task").expect("request"));
    }
    out
}

/// [`answers`] for GETs, as statuses.
async fn statuses(
    mesh: &mesh_tests::mesh::Mesh,
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
    n: usize,
) -> Vec<u16> {
    answers(mesh, "GET", path, headers, bytes::Bytes::new(), n)
        .await
        .into_iter()
        .map(|a| a.status)
        .collect()
}

fn ratings_app(apps: &[HttpApp]) -> &HttpApp {
    &apps[2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_timeouts_and_faults_follow_the_route() {
    let mesh = mesh();
    let apps = apps(&mesh);
    let routes = routes_path(&mesh);
    write_atomic(&routes, ROUTES);
    let wp = start_waypoint(&mesh, &routes);
    let app = ratings_app(&apps);

    // Retries: the application fails each request with p = 0.5; 3 retries on 5xx give a
    // success rate of 1 - 0.5^4 = 93.75% and 1.875 upstream requests per request (DESIGN.md,
    // retry arithmetic). n = 2,000 POSTs with a 1 KiB body (read whole, so every attempt
    // carries it): successes 1,875 (sd 10.8), upstream requests 3,750 (sd 47.1); bounds at
    // 5 sd.
    let before = app.requests();
    let body = bytes::Bytes::from(vec![b'r'; 1024]);
    let got = answers(
        &mesh,
        "POST",
        "/flaky",
        &[("x-app-fail-percent", "50")],
        body,
        2000,
    )
    .await;
    let ok = got.iter().filter(|a| a.status == 200).count();
    let upstream = app.requests() - before;
    assert!(
        got.iter().all(|a| a.status == 200 || a.status == 503),
        "{:?}",
        got.iter().find(|a| a.status != 200 && a.status != 503)
    );
    assert!(
        got.iter()
            .filter(|a| a.status == 200)
            .all(|a| a.line("body-length") == Some("1024")),
        "a retried request lost its body"
    );
    assert!(
        (1821..=1929).contains(&ok),
        "{ok} of 2000 succeeded, expected 1875 ± 54"
    );
    assert!(
        (3514..=3986).contains(&upstream),
        "{upstream} upstream requests, expected 3750 ± 236\n{}",
        wp.log()
    );

    // No retries: the success rate is the application's, 50% (sd 10; bound 5 sd).
    let before = app.requests();
    let got = statuses(&mesh, "/once", &[("x-app-fail-percent", "50")], 400).await;
    let ok = got.iter().filter(|s| **s == 200).count();
    assert!(
        (150..=250).contains(&ok),
        "{ok} of 400 succeeded, expected 200 ± 50"
    );
    assert_eq!(app.requests() - before, 400, "one upstream request each");

    // The route timeout (0.2 s) ends a request the application answers after 3 s: 504.
    let got = statuses(&mesh, "/slow", &[("x-app-delay-ms", "3000")], 3).await;
    assert_eq!(got, vec![504; 3]);

    // Fault injection: abort 418 on 50% of requests (n = 400: 200 ± 50 at 5 sd); the
    // aborted ones never reach the application.
    let before = app.requests();
    let got = statuses(&mesh, "/fault", &[], 400).await;
    let aborted = got.iter().filter(|s| **s == 418).count();
    assert!(
        (150..=250).contains(&aborted),
        "{aborted} of 400 aborted, expected 200 ± 50"
    );
    assert_eq!(
        got.len() - aborted,
        got.iter().filter(|s| **s == 200).count()
    );
    assert_eq!(app.requests() - before, (400 - aborted) as u64);

    // Fault delay of 0.5 s on 50% of requests (n = 400: 200 ± 50 at 5 sd): the delayed ones
    // carry Envoy's `DI` flag in the request metric, and none of them can have been answered
    // sooner than the delay.
    let flagged = |flag: &str| {
        metric(
            &mesh,
            "istio_requests_total",
            &[
                &format!("response_flags=\"{flag}\""),
                "response_code=\"200\"",
            ],
        )
    };
    let before = flagged("DI");
    let conn = through_waypoint(&mesh, RATINGS_VIP, Version::Http2).await;
    let mut tasks = Vec::new();
    for _ in 0..400 {
        let conn = conn.clone();
        tasks.push(tokio::spawn(async move {
            let start = std::time::Instant::now();
            let a = conn
                .get("ratings:9080", "/delay", &[])
                .await
                .expect("request");
            (a.status, start.elapsed())
        }));
    }
    let mut slow = 0;
    for t in tasks {
        let (status, took) = t.await.expect("task");
        assert_eq!(status, 200);
        if took >= Duration::from_millis(500) {
            slow += 1;
        }
    }
    let delayed = flagged("DI") - before;
    assert!(
        (150.0..=250.0).contains(&delayed),
        "{delayed} of 400 delayed, expected 200 ± 50"
    );
    assert!(
        f64::from(slow) >= delayed,
        "{slow} answers took 0.5 s or more, {delayed} were delayed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_copy_requests_and_metrics_count_them() {
    let mesh = mesh();
    let apps = apps(&mesh);
    let routes = routes_path(&mesh);
    write_atomic(&routes, ROUTES);
    let wp = start_waypoint(&mesh, &routes);
    let (v1, v2) = (&apps[0], &apps[1]);

    // Every request mirrored: the client's answer is v1's; v2 gets a copy of each, body and
    // authority included (Istio 1.28+: no `-shadow` suffix).
    let conn = through_waypoint(&mesh, mesh_tests::waypoint::REVIEWS_VIP, Version::Http1).await;
    let body = bytes::Bytes::from(vec![b'x'; 100 * 1024]);
    for _ in 0..20 {
        let a = conn
            .send("POST", "reviews:9080", "/all", &[], body.clone())
            .await
            .expect("request");
        assert_eq!((a.status, a.server()), (200, Some("reviews-v1")), "{a:?}");
        assert_eq!(a.line("body-length"), Some("102400"));
    }
    let settled = mesh_tests::wait_until(Duration::from_secs(10), || {
        metric(
            &mesh,
            "waypoint_mirror_requests_total",
            &["phase=\"finished\""],
        ) >= 20.0
    });
    assert!(settled.is_ok(), "mirrors did not finish:\n{}", wp.log());
    let copies = v2.seen();
    assert_eq!(copies.len(), 20, "{copies:?}");
    assert!(
        copies
            .iter()
            .all(|(authority, len)| authority == "reviews:9080" && *len == 102_400),
        "{copies:?}"
    );
    assert_eq!(v1.seen().len(), 20);

    // mirrorPercentage 50: n = 400 GETs, copies expected 200 (sd 10), bound 5 sd. Each copy
    // is counted when started and when finished; the count is read once all have finished.
    let started_before = metric(
        &mesh,
        "waypoint_mirror_requests_total",
        &["phase=\"started\""],
    );
    let before = v2.seen().len();
    let conn = through_waypoint(&mesh, mesh_tests::waypoint::REVIEWS_VIP, Version::Http2).await;
    let mut tasks = Vec::new();
    for _ in 0..400 {
        let conn = conn.clone();
        tasks.push(tokio::spawn(async move {
            conn.get("reviews:9080", "/half", &[])
                .await
                .map(|a| a.status)
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task").expect("request"), 200);
    }
    let started = metric(
        &mesh,
        "waypoint_mirror_requests_total",
        &["phase=\"started\""],
    ) - started_before;
    let finished = mesh_tests::wait_until(Duration::from_secs(10), || {
        metric(
            &mesh,
            "waypoint_mirror_requests_total",
            &["phase=\"finished\""],
        ) >= started + started_before
    });
    assert!(finished.is_ok(), "mirrors did not finish");
    let copies = v2.seen().len() - before;
    assert_eq!(copies as f64, started, "every copy started reached v2");
    assert!(
        (150..=250).contains(&copies),
        "{copies} of 400 mirrored, expected 200 ± 50"
    );

    // Istio's request metrics: every client request counted with its response code.
    let ok = metric(
        &mesh,
        "istio_requests_total",
        &[
            "reporter=\"waypoint\"",
            "destination_service=\"reviews.default.svc.cluster.local\"",
            "response_code=\"200\"",
            "source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\"",
        ],
    );
    assert_eq!(ok, 420.0, "20 POSTs and 400 GETs");
    let applied = metric(
        &mesh,
        "waypoint_config_updates_total",
        &["source=\"routes\"", "result=\"applied\""],
    );
    assert_eq!(applied, 1.0);
}

/// Retries prefer a host not tried yet (Envoy's previous-hosts predicate, up to 5 host
/// selections): with one endpoint failing every request and one healthy, a request fails only
/// if its first pick is the failing one (1/2) and each of its 3 retries picks it 5 times in a
/// row ((1/32)^3): 1/65,536. Over 2,000 requests: 0.03 failures expected; more than 2 has a
/// probability below 5e-6.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_go_to_another_endpoint() {
    let mesh = mesh();
    let failing = HttpApp::start_failing(
        &mesh.netns("reviews-v1"),
        "reviews-v1",
        SocketAddr::from((mesh.ip("reviews-v1"), 8080)),
        100,
    )
    .expect("failing replica");
    let healthy = HttpApp::start(
        &mesh.netns("reviews-v2"),
        "reviews-v2",
        SocketAddr::from((mesh.ip("reviews-v2"), 8080)),
    )
    .expect("healthy replica");
    let routes = routes_path(&mesh);
    write_atomic(&routes, ROUTES);
    let wp = start_waypoint(&mesh, &routes);
    let conn = through_waypoint(&mesh, mesh_tests::waypoint::REVIEWS_VIP, Version::Http2).await;
    let mut tasks = Vec::new();
    for _ in 0..2000 {
        let conn = conn.clone();
        tasks.push(tokio::spawn(async move {
            conn.get("reviews:9080", "/both", &[])
                .await
                .map(|a| a.status)
        }));
    }
    let mut failed = 0;
    for t in tasks {
        if t.await.expect("task").expect("request") != 200 {
            failed += 1;
        }
    }
    assert!(
        failed <= 2,
        "{failed} of 2000 failed, expected 0.03\n{}",
        wp.log()
    );
    assert_eq!(
        healthy.requests(),
        2000 - failed,
        "every success came from the healthy replica"
    );
    // About half of the first attempts went to the failing replica, each then retried once.
    let first_on_failing = failing.requests();
    assert!(
        (800..=1200).contains(&first_on_failing),
        "{first_on_failing} attempts on the failing replica, expected 1,000 ± 200 (sd 22)"
    );
}
