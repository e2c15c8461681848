//! HTTPRoute (GAMMA) from YAML to routing decisions: precedence, segment prefixes, filters.

use std::time::Duration;

use http::{HeaderMap, HeaderValue};

use super::*;
use crate::config::{LoadOptions, load_str};
use crate::policy::redirect::{PathRewrite, RedirectInput, RedirectPort};

fn build(yaml: &str) -> Compiled {
    let loaded = load_str("routes.yaml", yaml, &LoadOptions::default());
    assert!(!loaded.has_errors(), "{:#?}", loaded.diagnostics);
    compile(&loaded.resources, &CompileOptions::default())
}

const HOST: &str = "echo.default.svc.cluster.local";

/// An HTTPRoute attached to Service `echo` whose rules each send to backend `b<index>`.
fn routes(name: &str, extra_meta: &str, rules: &[&str]) -> String {
    let mut s = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}{extra_meta}}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: echo, port: 80}}]\n  rules:\n"
    );
    for (i, r) in rules.iter().enumerate() {
        s.push_str(&format!(
            "  - matches: [{r}]\n    backendRefs: [{{name: {name}-b{i}, port: 8080}}]\n"
        ));
    }
    s.push_str("---\n");
    s
}

/// Where a request goes: the backend name, or the decision.
fn dest(
    c: &Compiled,
    method: &str,
    path_query: &str,
    headers: &[(&'static str, &'static str)],
) -> String {
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.append(*k, HeaderValue::from_static(v));
    }
    let mut req = Request::get(path_query, &h, 80);
    req.method = method;
    match c.table.decide(HOST, &req) {
        Decision::Matched { target, .. } => match &target.action {
            Action::Forward(b) => b
                .pick(0)
                .host
                .split('.')
                .next()
                .unwrap_or_default()
                .to_string(),
            Action::Fail { status, .. } => format!("fail {status}"),
            other => format!("{other:?}"),
        },
        other => format!("{other:?}"),
    }
}

#[test]
fn exact_beats_prefix_and_longer_prefixes_win_whatever_the_order() {
    let c = build(&routes(
        "r",
        "",
        &[
            "{path: {type: PathPrefix, value: /}}",
            "{path: {type: PathPrefix, value: /v2}}",
            "{path: {type: PathPrefix, value: /v2/api}}",
            "{path: {type: Exact, value: /v2/api/health}}",
        ],
    ));
    assert_eq!(dest(&c, "GET", "/v2/api/health", &[]), "r-b3");
    assert_eq!(dest(&c, "GET", "/v2/api/health/x", &[]), "r-b2");
    assert_eq!(dest(&c, "GET", "/v2/api", &[]), "r-b2");
    assert_eq!(dest(&c, "GET", "/v2/", &[]), "r-b1");
    assert_eq!(dest(&c, "GET", "/v2", &[]), "r-b1");
    assert_eq!(
        dest(&c, "GET", "/v2example", &[]),
        "r-b0",
        "prefixes match whole segments"
    );
    assert_eq!(dest(&c, "GET", "/v2/apix", &[]), "r-b1");
}

#[test]
fn then_method_then_most_headers_then_most_query_params() {
    let c = build(&routes(
        "r",
        "",
        &[
            "{path: {value: /api}}",
            "{path: {value: /api}, headers: [{name: x-a, value: '1'}]}",
            "{path: {value: /api}, headers: [{name: x-a, value: '1'}, {name: X-B, value: '2'}]}",
            "{path: {value: /api}, queryParams: [{name: q, value: '1'}]}",
            "{path: {value: /api}, method: POST}",
            "{path: {value: /api}, headers: [{name: x-a, value: '1'}], queryParams: [{name: q, value: '1'}, {name: p, value: '2'}]}",
        ],
    ));
    assert_eq!(
        dest(&c, "POST", "/api?q=1", &[("x-a", "1"), ("x-b", "2")]),
        "r-b4",
        "method first"
    );
    assert_eq!(
        dest(&c, "GET", "/api?q=1&p=2", &[("x-a", "1"), ("x-b", "2")]),
        "r-b2",
        "two headers beat one"
    );
    assert_eq!(
        dest(&c, "GET", "/api?q=1&p=2", &[("x-a", "1")]),
        "r-b5",
        "then query params"
    );
    assert_eq!(dest(&c, "GET", "/api?q=1", &[("x-a", "1")]), "r-b1");
    assert_eq!(dest(&c, "GET", "/api?q=1", &[]), "r-b3");
    assert_eq!(dest(&c, "GET", "/api", &[]), "r-b0");
    assert_eq!(
        dest(&c, "GET", "/other", &[]),
        "NotFound",
        "no match is 404"
    );
}

#[test]
fn ties_go_to_the_oldest_route_then_namespace_name_then_rule_order() {
    let newer = routes(
        "aaa",
        ", creationTimestamp: '2025-02-01T00:00:00Z'",
        &["{path: {value: /x}}"],
    );
    let older = routes(
        "zzz",
        ", creationTimestamp: '2024-01-01T00:00:00Z'",
        &["{path: {value: /x}}"],
    );
    let c = build(&format!("{newer}{older}"));
    assert_eq!(dest(&c, "GET", "/x", &[]), "zzz-b0", "oldest first");

    let c = build(&format!(
        "{}{}",
        routes("beta", "", &["{path: {value: /x}}"]),
        routes("alpha", "", &["{path: {value: /x}}"])
    ));
    assert_eq!(
        dest(&c, "GET", "/x", &[]),
        "alpha-b0",
        "then namespace/name"
    );

    let c = build(&routes(
        "r",
        "",
        &["{path: {value: /x}}", "{path: {value: /x}}"],
    ));
    assert_eq!(dest(&c, "GET", "/x", &[]), "r-b0", "then rule order");
}

#[test]
fn a_rule_without_matches_matches_everything_and_regex_is_full() {
    let c = build(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: echo}]\n  rules:\n  - matches: [{path: {type: RegularExpression, value: '/item/[0-9]+'}}]\n    backendRefs: [{name: items, port: 80}]\n  - backendRefs: [{name: rest, port: 80}]\n",
    );
    assert_eq!(dest(&c, "GET", "/item/12", &[]), "items");
    assert_eq!(dest(&c, "GET", "/item/12/x", &[]), "rest");
    assert_eq!(dest(&c, "GET", "/", &[]), "rest");
}

#[test]
fn a_parent_port_limits_the_route_to_that_port() {
    let c = build(&routes("r", "", &["{path: {value: /}}"]));
    let h = HeaderMap::new();
    assert!(matches!(
        c.table.decide(HOST, &Request::get("/", &h, 80)),
        Decision::Matched { .. }
    ));
    assert!(matches!(
        c.table.decide(HOST, &Request::get("/", &h, 8080)),
        Decision::NotFound
    ));
}

#[test]
fn routes_not_attached_to_a_service_are_not_used() {
    let c = build(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: ingress}\nspec:\n  parentRefs: [{name: my-gateway}]\n  rules: [{backendRefs: [{name: web, port: 80}]}]\n",
    );
    assert!(c.table.hosts().is_empty());
    assert_eq!(c.diagnostics.len(), 1);
    assert_eq!(c.diagnostics[0].path, "spec.parentRefs");
}

#[test]
fn weights_filters_and_unusable_backends() {
    let c = build(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{group: "", kind: Service, name: echo}]
  rules:
  - matches: [{path: {value: /split}}]
    backendRefs:
    - {name: v1, port: 80, weight: 90}
    - {name: v2, port: 80, weight: 10, filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-Version, value: v2}]}}]}
  - matches: [{path: {value: /default-weights}}]
    backendRefs: [{name: a, port: 80}, {name: b, port: 80}]
  - matches: [{path: {value: /ext}}]
    filters: [{type: ExtensionRef, extensionRef: {group: example.com, kind: Thing, name: t}}]
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {value: /nothing}}]
  - matches: [{path: {value: /elsewhere}}]
    backendRefs: [{name: a, namespace: other, port: 80}]
  - matches: [{path: {value: /zero}}]
    backendRefs: [{name: a, port: 80, weight: 0}]
"#,
    );
    let h = HeaderMap::new();
    let t = |path: &'static str| match c.table.decide(HOST, &Request::get(path, &h, 80)) {
        Decision::Matched { target, .. } => target.clone(),
        other => panic!("{path}: {other:?}"),
    };
    let split = t("/split");
    let Action::Forward(b) = &split.action else {
        panic!()
    };
    assert_eq!(b.total_weight(), 100);
    assert_eq!(&*b.pick(u64::MAX).host, "v2.default.svc.cluster.local");
    assert_eq!(b.all()[1].request_headers.set[0].0.as_str(), "x-version");
    let Action::Forward(b) = &t("/default-weights").action else {
        panic!()
    };
    assert_eq!(b.total_weight(), 2, "weight defaults to 1");
    assert!(
        matches!(t("/ext").action, Action::Fail { status: 500, .. }),
        "unimplemented filters fail closed"
    );
    assert!(
        matches!(t("/nothing").action, Action::Fail { status: 500, .. }),
        "no backends: 500"
    );
    assert!(
        matches!(t("/zero").action, Action::Fail { status: 500, .. }),
        "all weights 0: 500"
    );
    let Action::Forward(b) = &t("/elsewhere").action else {
        panic!()
    };
    assert!(
        b.all()[0].invalid.is_some(),
        "cross-namespace without ReferenceGrant"
    );
    let paths: Vec<&str> = c.diagnostics.iter().map(|d| d.path.as_str()).collect();
    assert_eq!(paths, ["spec.rules[4].backendRefs[0]"]);
}

#[test]
fn redirects_rewrites_timeouts_and_retries() {
    let c = build(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{group: "", kind: Service, name: echo}]
  rules:
  - matches: [{path: {value: /old}}]
    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}, statusCode: 301}}]
  - matches: [{path: {value: /secure}}]
    filters: [{type: RequestRedirect, requestRedirect: {scheme: https}}]
  - matches: [{path: {value: /prefix/one}}]
    filters: [{type: URLRewrite, urlRewrite: {hostname: elsewhere.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}]
    backendRefs: [{name: a, port: 80}]
    timeouts: {request: 10s, backendRequest: 2s}
    retry: {attempts: 3, codes: [500, 502], backoff: 100ms}
"#,
    );
    let h = HeaderMap::new();
    let decide = |path: &'static str| match c.table.decide(HOST, &Request::get(path, &h, 80)) {
        Decision::Matched {
            target,
            matched_prefix,
        } => (target.clone(), matched_prefix),
        other => panic!("{path}: {other:?}"),
    };
    let input = |path, matched_prefix| RedirectInput {
        scheme: "http",
        authority: "echo",
        port: 80,
        path,
        query: "",
        matched_prefix,
    };
    let (t, p) = decide("/old/page");
    let Action::Redirect(r) = &t.action else {
        panic!()
    };
    assert_eq!((r.code, r.port), (301, RedirectPort::Request));
    assert_eq!(r.location(&input("/old/page", p)), "http://echo/new/page");
    let (t, p) = decide("/secure/x");
    let Action::Redirect(r) = &t.action else {
        panic!()
    };
    assert_eq!(r.code, 302, "the default code");
    assert_eq!(r.location(&input("/secure/x", p)), "https://echo/secure/x");
    let (t, p) = decide("/prefix/one/two");
    let rw = t.policy.rewrite.as_ref().expect("rewrite");
    assert_eq!(rw.authority.as_deref(), Some("elsewhere.example"));
    assert_eq!(rw.path, Some(PathRewrite::SegmentPrefix("/".into())));
    assert_eq!(
        rw.path
            .as_ref()
            .map(|x| x.apply("/prefix/one/two", p).into_owned())
            .as_deref(),
        Some("/two")
    );
    assert_eq!(t.policy.timeout, Some(Duration::from_secs(10)));
    let retry = t.policy.retry.as_ref().expect("retry");
    assert_eq!(retry.attempts, 3);
    assert_eq!(retry.per_try_timeout, Some(Duration::from_secs(2)));
    assert_eq!(retry.retry_on.codes(), [500, 502]);
    assert_eq!(retry.backoff_base, Duration::from_millis(100));
}

#[test]
fn http_routes_take_precedence_over_a_virtual_service_for_the_same_service() {
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: echo}\nspec:\n  hosts: [echo]\n  http: [{route: [{destination: {host: vs-backend}}]}]\n---\n";
    let c = build(&format!("{vs}{}", routes("r", "", &["{path: {value: /}}"])));
    assert_eq!(dest(&c, "GET", "/", &[]), "r-b0");
    let note = c
        .diagnostics
        .iter()
        .find(|d| d.path == "spec.hosts[0]")
        .expect("the VirtualService is told");
    assert!(
        note.to_string().contains("HTTPRoutes take precedence"),
        "{note}"
    );
}

#[test]
fn grpc_routes_match_service_and_method_paths() {
    let c = build(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g}
spec:
  parentRefs: [{group: "", kind: Service, name: echo}]
  rules:
  - matches: [{method: {service: echo.Echo, method: Stream}}]
    backendRefs: [{name: stream, port: 9000}]
  - matches: [{method: {service: echo.Echo}}]
    backendRefs: [{name: unary, port: 9000}]
  - matches: [{method: {type: RegularExpression, method: 'Get.*'}, headers: [{name: x-env, value: canary}]}]
    backendRefs: [{name: getters, port: 9000}]
  - backendRefs: [{name: rest, port: 9000}]
"#,
    );
    assert_eq!(dest(&c, "POST", "/echo.Echo/Stream", &[]), "stream");
    assert_eq!(dest(&c, "POST", "/echo.Echo/Unary", &[]), "unary");
    assert_eq!(
        dest(&c, "POST", "/echo.EchoX/Unary", &[]),
        "rest",
        "the service is a whole segment"
    );
    assert_eq!(
        dest(&c, "POST", "/other.Svc/GetThing", &[("x-env", "canary")]),
        "getters"
    );
    assert_eq!(dest(&c, "POST", "/other.Svc/GetThing", &[]), "rest");
}

#[test]
fn grpc_route_problems_are_reported() {
    let loaded = load_str(
        "g.yaml",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: g}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: echo}]\n  rules:\n  - matches: [{method: {type: Exact}}]\n    filters: [{type: URLRewrite, urlRewrite: {hostname: x}}]\n",
        &LoadOptions::default(),
    );
    let paths: Vec<&str> = loaded.errors().map(|d| d.path.as_str()).collect();
    assert_eq!(
        paths,
        ["spec.rules[0].matches[0].method", "spec.rules[0].filters"]
    );
}
