//! Micro-benchmarks of the per-request routing decisions (issue 21): route match over 1,000
//! routes and over 100 regex routes, header matching, weighted pick, retry decision. Pure
//! functions over a compiled table, no I/O.
//!
//! `cargo bench -p waypoint --bench route`

use std::fmt::Write;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderName, HeaderValue};

use waypoint::config::{LoadOptions, load_str};
use waypoint::policy::retry::{Outcome, RetryOn};
use waypoint::route::matcher::{HeaderMatch, StrMatch, full_match_regex};
use waypoint::route::table::Backend;
use waypoint::route::{Backends, CompileOptions, Compiled, Decision, Request, compile};

const HOST: &str = "api.bench.svc.cluster.local";

fn table(yaml: &str) -> Compiled {
    let loaded = load_str("bench.yaml", yaml, &LoadOptions::default());
    assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
    let c = compile(&loaded.resources, &CompileOptions::default());
    assert!(c.rejected.is_empty(), "{:?}", c.diagnostics);
    c
}

/// A VirtualService with `n` rules, each a path prefix and a header, as a large API would be.
fn virtual_service(n: usize, regex: bool) -> String {
    let mut s = String::from(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: api, namespace: bench}\nspec:\n  hosts: [api]\n  http:\n",
    );
    for i in 0..n {
        let uri = if regex {
            format!("{{regex: '/api/v[0-9]+/svc-{i}/[a-z]+'}}")
        } else {
            format!("{{prefix: /api/v1/svc-{i}/}}")
        };
        let _ = write!(
            s,
            "  - match: [{{uri: {uri}, headers: {{x-tenant: {{exact: t{}}}}}}}]\n    route: [{{destination: {{host: svc-{i}}}}}]\n",
            i % 10
        );
    }
    s
}

/// An HTTPRoute with `n` rules (path prefix and a header), sorted by precedence when compiled.
fn http_route(n: usize) -> String {
    let mut s = String::from(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: api, namespace: bench}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: api}]\n  rules:\n",
    );
    for i in 0..n {
        let _ = write!(
            s,
            "  - matches: [{{path: {{value: /api/v1/svc-{i}}}, headers: [{{name: x-tenant, value: t{}}}]}}]\n    backendRefs: [{{name: svc-{i}, port: 80}}]\n",
            i % 10
        );
    }
    s
}

fn matched(d: Decision<'_>) -> bool {
    matches!(d, Decision::Matched { .. })
}

fn route_match(c: &mut Criterion) {
    let mut headers = HeaderMap::new();
    headers.insert("x-tenant", HeaderValue::from_static("t9"));
    headers.insert("user-agent", HeaderValue::from_static("bench/1.0"));
    headers.insert("accept", HeaderValue::from_static("*/*"));

    let vs = table(&virtual_service(1_000, false));
    let last = Request::get("/api/v1/svc-999/items?page=2", &headers, 80);
    let middle = Request::get("/api/v1/svc-499/items", &headers, 80);
    assert!(matched(vs.table.decide(HOST, &last)));
    c.bench_function("VirtualService 1,000 prefix routes: match the last", |b| {
        b.iter(|| black_box(vs.table.decide(black_box(HOST), black_box(&last))));
    });
    let service = vs.table.service(HOST).expect("routes");
    c.bench_function(
        "VirtualService 1,000 prefix routes: match the last, plain scan (no index)",
        |b| b.iter(|| black_box(service.scan(black_box(&last)))),
    );
    // Rule 499's tenant is t9 (499 % 10), so this is a hit halfway down the list.
    assert!(matched(vs.table.decide(HOST, &middle)));
    c.bench_function("VirtualService 1,000 prefix routes: match the 500th", |b| {
        b.iter(|| black_box(vs.table.decide(black_box(HOST), black_box(&middle))));
    });
    let miss = Request::get("/nothing/here", &headers, 80);
    assert!(matches!(vs.table.decide(HOST, &miss), Decision::NotFound));
    c.bench_function("VirtualService 1,000 prefix routes: no match (404)", |b| {
        b.iter(|| black_box(vs.table.decide(black_box(HOST), black_box(&miss))));
    });

    let hr = table(&http_route(1_000));
    let last = Request::get("/api/v1/svc-999/items", &headers, 80);
    assert!(matched(hr.table.decide(HOST, &last)));
    c.bench_function("HTTPRoute 1,000 rules: match one", |b| {
        b.iter(|| black_box(hr.table.decide(black_box(HOST), black_box(&last))));
    });

    let rx = table(&virtual_service(100, true));
    let last = Request::get("/api/v2/svc-99/items", &headers, 80);
    assert!(matched(rx.table.decide(HOST, &last)));
    c.bench_function("VirtualService 100 regex routes: match the last", |b| {
        b.iter(|| black_box(rx.table.decide(black_box(HOST), black_box(&last))));
    });
}

fn header_matching(c: &mut Criterion) {
    let mut headers = HeaderMap::new();
    for (k, v) in [
        ("host", "reviews:9080"),
        ("user-agent", "curl/8.5.0"),
        ("accept", "*/*"),
        ("x-request-id", "1b4e28ba-2fa1-11d2-883f-0016d3cca427"),
        ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
        ("x-dark-launch", "v2"),
    ] {
        headers.insert(k, HeaderValue::from_static(v));
    }
    let name = HeaderName::from_static("x-dark-launch");
    let exact = HeaderMatch {
        name: name.clone(),
        value: StrMatch::Exact("v2".into()),
        invert: false,
    };
    let regex = HeaderMatch {
        name: name.clone(),
        value: StrMatch::Regex(full_match_regex("v[0-9]+").expect("valid")),
        invert: false,
    };
    let absent = HeaderMatch {
        name: HeaderName::from_static("x-missing"),
        value: StrMatch::Present,
        invert: false,
    };
    assert!(exact.matches(&headers) && regex.matches(&headers) && !absent.matches(&headers));
    c.bench_function("header exact match (6 headers)", |b| {
        b.iter(|| black_box(exact.matches(black_box(&headers))));
    });
    c.bench_function("header regex match (6 headers)", |b| {
        b.iter(|| black_box(regex.matches(black_box(&headers))));
    });
    c.bench_function("header present, absent (6 headers)", |b| {
        b.iter(|| black_box(absent.matches(black_box(&headers))));
    });
}

fn backend(name: &str, weight: u32) -> Backend {
    Backend {
        host: name.into(),
        port: None,
        subset: None,
        weight,
        request_headers: Default::default(),
        response_headers: Default::default(),
        invalid: None,
    }
}

fn weighted_pick(c: &mut Criterion) {
    let two = Backends::new(vec![backend("v1", 90), backend("v2", 10)]).expect("weights");
    let ten = Backends::new((0..10).map(|i| backend("v", i + 1)).collect()).expect("weights");
    // A cheap xorshift stands in for the server's per-thread random source.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    c.bench_function("weighted pick of 2 (90/10)", |b| {
        b.iter(|| black_box(two.pick(next())));
    });
    c.bench_function("weighted pick of 10", |b| {
        b.iter(|| black_box(ten.pick(next())));
    });
}

fn retry_decision(c: &mut Criterion) {
    let on = RetryOn::parse("5xx,connect-failure,refused-stream,unavailable,cancelled,503")
        .expect("valid");
    let outcome = Outcome::Response {
        status: 503,
        grpc_status: None,
    };
    assert!(on.should_retry(outcome));
    c.bench_function("retry decision (503 under 5xx,...)", |b| {
        b.iter(|| black_box(on.should_retry(black_box(outcome))));
    });
}

criterion_group!(
    benches,
    route_match,
    header_matching,
    weighted_pick,
    retry_decision
);
criterion_main!(benches);
