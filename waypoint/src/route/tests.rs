//! From YAML in the tutorials' shapes to routing decisions.

use std::collections::BTreeMap;
use std::time::Duration;

use http::{HeaderMap, HeaderValue};

use super::*;
use crate::config::{LoadOptions, Severity, load_str};
use crate::policy::redirect::{PathRewrite, RedirectPort};
use crate::policy::retry::RetryCondition;

fn build(yaml: &str) -> Compiled {
    let loaded = load_str("test.yaml", yaml, &LoadOptions::default());
    assert!(!loaded.has_errors(), "{:#?}", loaded.diagnostics);
    compile(&loaded.resources, &CompileOptions::default())
}

fn hdrs(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(*k, HeaderValue::from_static(v));
    }
    h
}

/// The target chosen for a GET, or `Err` with the decision when none was.
fn route<'t>(c: &'t Compiled, host: &str, req: &Request<'_>) -> Result<&'t Target, String> {
    match c.table.decide(host, req) {
        Decision::Matched { target, .. } => Ok(target),
        other => Err(format!("{other:?}")),
    }
}

fn backends(t: &Target) -> &Backends {
    match &t.action {
        Action::Forward(b) => b,
        other => panic!("not forwarded: {other:?}"),
    }
}

const CATALOG: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: catalog, namespace: istioinaction}
spec:
  hosts: [catalog]
  http:
  - match:
    - headers:
        x-dark-launch:
          exact: "v2"
    route:
    - destination: {host: catalog, subset: version-v2}
  - route:
    - destination: {host: catalog, subset: version-v1}
    retries:
      attempts: 3
      retryOn: 5xx
      perTryTimeout: 2s
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: catalog, namespace: istioinaction}
spec:
  host: catalog
  subsets:
  - name: version-v1
    labels: {version: v1}
  - name: version-v2
    labels: {version: v2}
"#;

const CATALOG_HOST: &str = "catalog.istioinaction.svc.cluster.local";

#[test]
fn dark_launch_by_header_and_retries_on_the_default_route() {
    let c = build(CATALOG);
    assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
    assert_eq!(c.table.hosts(), [CATALOG_HOST]);

    let h = hdrs(&[("x-dark-launch", "v2")]);
    let t = route(&c, CATALOG_HOST, &Request::get("/api/catalog", &h, 80)).expect("routed");
    let b = backends(t).pick(0);
    assert_eq!(
        &*b.host, CATALOG_HOST,
        "the short destination host is resolved"
    );
    let subset = b.subset.as_ref().expect("a subset");
    assert_eq!(subset.name, "version-v2");
    assert_eq!(
        subset
            .labels
            .as_ref()
            .and_then(|l| l.get("version"))
            .map(String::as_str),
        Some("v2")
    );
    // No `retries` on that rule: Istio's default policy.
    assert_eq!(
        t.policy.retry,
        Some(crate::policy::retry::RetryPolicy::istio_default())
    );

    let none = HeaderMap::new();
    let other = hdrs(&[("x-dark-launch", "v3")]);
    for h in [&none, &other] {
        let t = route(&c, CATALOG_HOST, &Request::get("/api/catalog", h, 80)).expect("routed");
        let b = backends(t).pick(u64::MAX);
        assert_eq!(
            b.subset.as_ref().map(|s| s.name.as_str()),
            Some("version-v1")
        );
        let r = t.policy.retry.as_ref().expect("retries");
        assert_eq!(r.attempts, 3);
        assert_eq!(r.per_try_timeout, Some(Duration::from_secs(2)));
        assert!(r.retry_on.contains(RetryCondition::FiveXx));
        assert!(
            !r.retry_on.contains(RetryCondition::ConnectFailure),
            "retryOn replaces the default"
        );
    }
}

#[test]
fn unknown_services_have_no_routes_and_unmatched_requests_are_404() {
    let c = build(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: productpage, namespace: bookinfo}
spec:
  hosts: [productpage]
  http:
  - match:
    - uri: {prefix: /productpage/v1/}
    route:
    - destination: {host: productpage-v1}
"#,
    );
    let h = HeaderMap::new();
    let host = "productpage.bookinfo.svc.cluster.local";
    assert!(matches!(
        c.table.decide(host, &Request::get("/other", &h, 9080)),
        Decision::NotFound
    ));
    assert!(matches!(
        c.table.decide(
            "ratings.bookinfo.svc.cluster.local",
            &Request::get("/", &h, 9080)
        ),
        Decision::NoRoutes
    ));
    let t = route(&c, host, &Request::get("/productpage/v1/x", &h, 9080)).expect("routed");
    assert_eq!(
        &*backends(t).pick(0).host,
        "productpage-v1.bookinfo.svc.cluster.local"
    );
}

#[test]
fn hosts_with_a_dot_are_not_expanded() {
    let c = build(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: hello}
spec:
  hosts: [helloworld.test]
  http:
  - route:
    - destination: {host: helloworld.test}
"#,
    );
    assert_eq!(c.table.hosts(), ["helloworld.test"]);
    assert!(matches!(
        c.table.decide(
            "helloworld.test.svc.cluster.local",
            &Request::get("/", &HeaderMap::new(), 80)
        ),
        Decision::NoRoutes
    ));
}

#[test]
fn weighted_split_90_10() {
    let c = build(
        r#"
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: storefront, namespace: mushop}
spec:
  hosts: [mushop-storefront.mushop.svc.cluster.local]
  http:
  - route:
    - destination: {host: mushop-storefront.mushop.svc.cluster.local, port: {number: 80}, subset: original}
      weight: 90
    - destination: {host: mushop-storefront.mushop.svc.cluster.local, port: {number: 80}, subset: beta}
      weight: 10
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: storefront, namespace: mushop}
spec:
  host: mushop-storefront.mushop.svc.cluster.local
  subsets:
  - {name: original, labels: {version: '2.3'}}
  - {name: beta, labels: {version: '2.1.3-beta.1'}}
"#,
    );
    let h = HeaderMap::new();
    let t = route(
        &c,
        "mushop-storefront.mushop.svc.cluster.local",
        &Request::get("/", &h, 80),
    )
    .expect("routed");
    let b = backends(t);
    assert_eq!(b.total_weight(), 100);
    let steps = 10_000u64;
    let step = u64::MAX / steps;
    let beta = (0..steps)
        .filter(|i| {
            b.pick(i * step + step / 2)
                .subset
                .as_ref()
                .is_some_and(|s| s.name == "beta")
        })
        .count();
    assert_eq!(
        beta, 1_000,
        "exactly 10% of an even sweep of the random range"
    );
    assert_eq!(b.all()[1].port, Some(80));
}

#[test]
fn mirror_fault_rewrite_redirect_and_direct_response() {
    let c = build(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: shop}
spec:
  hosts: [web]
  http:
  - match: [{uri: {prefix: /assets}}]
    rewrite: {uri: /}
    route: [{destination: {host: assets}}]
  - match: [{uri: {exact: /old}}]
    redirect: {uri: /new, redirectCode: 308}
  - match: [{uri: {exact: /health}}]
    directResponse: {status: 200, body: {string: ok}}
  - match: [{uri: {prefix: /slow}}]
    fault:
      delay: {fixedDelay: 5s, percentage: {value: 50}}
      abort: {httpStatus: 503, percentage: {value: 10}}
    timeout: 1s
    route: [{destination: {host: web}}]
  - route: [{destination: {host: httpbin, subset: v1}}]
    mirror: {host: httpbin, subset: v2}
    mirrorPercentage: {value: 25.5}
    headers:
      request:
        set: {x-env: prod}
        remove: [x-debug]
"#,
    );
    let host = "web.shop.svc.cluster.local";
    let h = HeaderMap::new();
    match c
        .table
        .decide(host, &Request::get("/assets/app.js", &h, 80))
    {
        Decision::Matched {
            target,
            matched_prefix,
        } => {
            assert_eq!(matched_prefix, Some(7));
            let rw = target
                .policy
                .rewrite
                .as_ref()
                .and_then(|r| r.path.as_ref())
                .expect("rewrite");
            assert_eq!(rw.apply("/assets/app.js", matched_prefix), "//app.js");
        }
        other => panic!("{other:?}"),
    }
    let t = route(&c, host, &Request::get("/old", &h, 80)).expect("routed");
    let Action::Redirect(r) = &t.action else {
        panic!("{:?}", t.action)
    };
    assert_eq!((r.code, r.port), (308, RedirectPort::Keep));
    assert_eq!(r.path, Some(PathRewrite::Full("/new".into())));
    let t = route(&c, host, &Request::get("/health", &h, 80)).expect("routed");
    assert_eq!(
        t.action,
        Action::Direct {
            status: 200,
            body: b"ok".to_vec().into()
        }
    );
    let t = route(&c, host, &Request::get("/slow/x", &h, 80)).expect("routed");
    let f = t.policy.fault.expect("fault");
    assert_eq!(
        f.delay.map(|(d, p)| (d, p.ppm())),
        Some((Duration::from_secs(5), 500_000))
    );
    assert_eq!(f.abort.map(|(_, p)| p.ppm()), Some(100_000));
    assert_eq!(t.policy.timeout, Some(Duration::from_secs(1)));
    let t = route(&c, host, &Request::get("/anything", &h, 80)).expect("routed");
    assert_eq!(t.policy.mirrors.len(), 1);
    let m = &t.policy.mirrors[0];
    assert_eq!(&*m.host, "httpbin.shop.svc.cluster.local");
    assert_eq!(m.fraction.ppm(), 255_000);
    assert_eq!(
        m.subset.as_ref().map(|s| s.labels.is_none()),
        Some(true),
        "no DestinationRule"
    );
    let mut req_headers = hdrs(&[("x-debug", "1"), ("x-env", "dev")]);
    t.policy.request_headers.apply(&mut req_headers);
    assert!(req_headers.get("x-debug").is_none());
    assert_eq!(
        req_headers.get("x-env").map(|v| v.as_bytes()),
        Some(&b"prod"[..])
    );
    // Undefined subsets are reported, once per destination.
    let notes: Vec<&str> = c.diagnostics.iter().map(|d| d.path.as_str()).collect();
    assert_eq!(
        notes,
        [
            "spec.http[4].route[0].destination.subset",
            "spec.http[4].mirrors[0].destination.subset"
        ]
    );
    assert!(
        c.diagnostics
            .iter()
            .all(|d| d.severity() == Severity::Warning)
    );
}

#[test]
fn source_labels_namespace_and_without_headers() {
    let c = build(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - match:
    - sourceLabels: {app: productpage, version: v2}
      sourceNamespace: bookinfo
      withoutHeaders: {x-skip: {}}
    route: [{destination: {host: reviews, subset: v3}}]
  - route: [{destination: {host: reviews, subset: v1}}]
"#,
    );
    let host = "reviews.bookinfo.svc.cluster.local";
    let mut labels = BTreeMap::new();
    labels.insert("app".to_string(), "productpage".to_string());
    labels.insert("version".to_string(), "v2".to_string());
    let h = HeaderMap::new();
    let subset = |req: &Request<'_>| {
        let t = route(&c, host, req).expect("routed");
        backends(t).pick(0).subset.as_ref().map(|s| s.name.clone())
    };
    let mut req = Request::get("/", &h, 9080);
    req.source = Source {
        namespace: "bookinfo",
        labels: &labels,
    };
    assert_eq!(subset(&req).as_deref(), Some("v3"));
    req.source.namespace = "other";
    assert_eq!(subset(&req).as_deref(), Some("v1"));
    req.source.namespace = "bookinfo";
    let skip = hdrs(&[("x-skip", "1")]);
    req.headers = &skip;
    assert_eq!(subset(&req).as_deref(), Some("v1"));
    assert_eq!(
        subset(&Request::get("/", &h, 9080)).as_deref(),
        Some("v1"),
        "unknown source"
    );
}

#[test]
fn two_virtual_services_for_one_host_use_the_first_and_say_so() {
    let vs = |name: &str, subset: &str| {
        format!(
            "apiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata: {{name: {name}}}\nspec:\n  hosts: [helloworld.default.svc.cluster.local]\n  http:\n  - route:\n    - destination: {{host: helloworld.default.svc.cluster.local, subset: {subset}}}\n---\n"
        )
    };
    // Written in the reverse order: the choice depends on names, not on file order.
    let c = build(&format!(
        "{}{}",
        vs("helloworld-v2", "v2"),
        vs("helloworld-v1", "v1")
    ));
    let h = HeaderMap::new();
    let t = route(
        &c,
        "helloworld.default.svc.cluster.local",
        &Request::get("/", &h, 80),
    )
    .expect("routed");
    assert_eq!(t.id.resource.name, "helloworld-v1");
    let conflict = c
        .diagnostics
        .iter()
        .find(|d| d.path == "spec.hosts[0]")
        .expect("reported");
    assert_eq!(
        conflict.resource.as_ref().map(|r| r.name.as_str()),
        Some("helloworld-v2")
    );
    assert!(conflict.to_string().contains("IST0109"), "{conflict}");
}

#[test]
fn delegates_combine_the_root_match_with_theirs() {
    let c = build(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: root, namespace: nsa}
spec:
  hosts: [productpage]
  http:
  - match: [{uri: {prefix: /productpage}}]
    delegate: {name: productpage, namespace: nsb}
  - route: [{destination: {host: productpage}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: productpage, namespace: nsb}
spec:
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: productpage-v2}}]
  - route: [{destination: {host: productpage-v1}}]
"#,
    );
    let host = "productpage.nsa.svc.cluster.local";
    let jason = hdrs(&[("end-user", "jason")]);
    let h = HeaderMap::new();
    let dest = |req: &Request<'_>| {
        backends(route(&c, host, req).expect("routed"))
            .pick(0)
            .host
            .to_string()
    };
    assert_eq!(
        dest(&Request::get("/productpage", &jason, 80)),
        "productpage-v2.nsb.svc.cluster.local"
    );
    assert_eq!(
        dest(&Request::get("/productpage", &h, 80)),
        "productpage-v1.nsb.svc.cluster.local"
    );
    assert_eq!(
        dest(&Request::get("/other", &jason, 80)),
        "productpage.nsa.svc.cluster.local",
        "root match still applies"
    );
    assert_eq!(
        c.table.hosts(),
        [host],
        "the delegate has no hosts of its own"
    );
}

#[test]
fn virtual_services_bound_to_other_gateways_do_not_apply() {
    let c = build(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: edge}
spec:
  hosts: ['*']
  gateways: [gateway]
  http: [{route: [{destination: {host: web}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web}
spec:
  hosts: [web]
  http:
  - match: [{uri: {prefix: /internal}, gateways: [gateway]}]
    route: [{destination: {host: internal}}]
  - route: [{destination: {host: web}}]
"#,
    );
    assert_eq!(c.table.hosts(), ["web.default.svc.cluster.local"]);
    let h = HeaderMap::new();
    let t = route(
        &c,
        "web.default.svc.cluster.local",
        &Request::get("/internal", &h, 80),
    )
    .expect("routed");
    assert_eq!(
        &*backends(t).pick(0).host,
        "web.default.svc.cluster.local",
        "the gateway-only block never matches"
    );
}

#[test]
fn compile_errors_reject_the_resource_by_name() {
    let loaded = load_str(
        "bad.yaml",
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bad}
spec:
  hosts: [bad]
  http:
  - route: [{destination: {host: bad}}]
    retries: {attempts: 2, retryOn: "5xx,connect-failur"}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: zero}
spec:
  hosts: [zero]
  http:
  - route:
    - {destination: {host: a}, weight: 0}
    - {destination: {host: b}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: good}
spec:
  hosts: [good]
  http: [{route: [{destination: {host: good}}]}]
"#,
        &LoadOptions::default(),
    );
    let c = compile(&loaded.resources, &CompileOptions::default());
    let rejected: Vec<String> = c.rejected.iter().map(|r| r.to_string()).collect();
    assert_eq!(
        rejected,
        ["VirtualService default/bad", "VirtualService default/zero"]
    );
    assert_eq!(c.table.hosts(), ["good.default.svc.cluster.local"]);
    let e = &c.diagnostics[0];
    assert_eq!(e.path, "spec.http[0].retries.retryOn");
    assert!(e.to_string().contains("connect-failur"), "{e}");
    assert_eq!(c.diagnostics[1].path, "spec.http[0].route");
}

#[test]
fn attempts_zero_disables_retries_and_an_empty_retry_on_keeps_the_default() {
    let c = build(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings}
spec:
  hosts: [ratings]
  http:
  - match: [{uri: {prefix: /off}}]
    retries: {attempts: 0}
    route: [{destination: {host: ratings}}]
  - retries: {attempts: 4, retryIgnorePreviousHosts: false, backoff: 100ms}
    route: [{destination: {host: ratings}}]
"#,
    );
    let h = HeaderMap::new();
    let host = "ratings.default.svc.cluster.local";
    assert_eq!(
        route(&c, host, &Request::get("/off", &h, 80))
            .expect("routed")
            .policy
            .retry,
        None
    );
    let r = route(&c, host, &Request::get("/on", &h, 80))
        .expect("routed")
        .policy
        .retry
        .clone()
        .expect("retries");
    assert_eq!(r.attempts, 4);
    assert_eq!(r.retry_on, crate::policy::retry::RetryOn::istio_default());
    assert!(!r.avoid_previous_hosts);
    assert_eq!(r.backoff_base, Duration::from_millis(100));
    assert_eq!(r.backoff_max(), Duration::from_secs(1));
}
