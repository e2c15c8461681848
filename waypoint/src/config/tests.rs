//! Loading whole files in the shapes the Istio tutorials use.

use super::istio::common::StringMatch;
use super::istio::http_policy::{AbortError, HttpRetry};
use super::istio::virtual_service::HttpRouteDestination;
use super::*;

fn load(text: &str) -> Loaded {
    load_str("routes.yaml", text, &LoadOptions::default())
}

const CATALOG: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: catalog
spec:
  ports:
  - name: http
    port: 80
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: catalog
  namespace: istioinaction
spec:
  hosts:
  - catalog
  http:
  - match:
    - headers:
        x-dark-launch:
          exact: "v2"
    route:
    - destination:
        host: catalog
        subset: version-v2
  - route:
    - destination:
        host: catalog
        subset: version-v1
    retries:
      attempts: 3
      retryOn: 5xx
      perTryTimeout: 2s
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: catalog
  namespace: istioinaction
spec:
  host: catalog
  subsets:
  - name: version-v1
    labels:
      version: v1
  - name: version-v2
    labels:
      version: v2
"#;

#[test]
fn tutorial_file_loads_and_skips_other_kinds() {
    let l = load(CATALOG);
    assert!(l.diagnostics.is_empty(), "{:#?}", l.diagnostics);
    assert_eq!(l.skipped, 1, "the Service is not ours");
    assert_eq!(l.resources.len(), 2);
    let Spec::VirtualService(vs) = &l.resources[0].spec else {
        panic!("first is the VirtualService")
    };
    assert_eq!(l.resources[0].meta.namespace, "istioinaction");
    assert_eq!(l.resources[0].source.document, 2);
    assert_eq!(vs.hosts, ["catalog"]);
    assert_eq!(
        vs.http[0].matches[0].headers.get("x-dark-launch"),
        Some(&StringMatch::Exact("v2".into()))
    );
    assert_eq!(
        vs.http[0].route[0].destination.subset.as_deref(),
        Some("version-v2")
    );
    assert_eq!(
        vs.http[1].retries,
        Some(HttpRetry {
            attempts: 3,
            per_try_timeout: Some(std::time::Duration::from_secs(2)),
            retry_on: Some("5xx".into()),
            retry_ignore_previous_hosts: None,
            backoff: None,
        })
    );
    let Spec::DestinationRule(dr) = &l.resources[1].spec else {
        panic!("second is the DestinationRule")
    };
    assert_eq!(dr.subsets[1].name, "version-v2");
    assert_eq!(
        dr.subsets[1].labels.get("version").map(String::as_str),
        Some("v2")
    );
}

#[test]
fn one_bad_resource_is_rejected_by_name_and_the_others_load() {
    let text = r#"
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      wieght: 90
    retries:
      attempts: 3
      retryOn: 5xx
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: ratings, namespace: bookinfo}
spec:
  hosts: [ratings]
  http:
  - route:
    - destination: {host: ratings}
"#;
    let l = load(text);
    assert_eq!(l.resources.len(), 1);
    assert_eq!(l.resources[0].meta.name, "ratings");
    assert_eq!(l.rejected.len(), 1);
    assert_eq!(l.rejected[0].to_string(), "VirtualService bookinfo/reviews");
    let errors: Vec<_> = l.errors().collect();
    assert_eq!(errors.len(), 1, "{errors:#?}");
    let e = errors[0];
    assert_eq!(e.document, 1);
    assert_eq!(e.path, "spec.http[0].route[0].wieght");
    assert_eq!(e.problem, Problem::UnknownField);
    assert_eq!(e.pos.map(|p| p.line), Some(10));
    assert_eq!(
        e.to_string(),
        "routes.yaml:10:7: error: document 1, VirtualService bookinfo/reviews, \
         spec.http[0].route[0].wieght: unknown field"
    );
}

#[test]
fn every_problem_of_a_resource_is_reported() {
    let text = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match:
    - uri: {prefix: /a, exact: /b}
      headers:
        X-Upper: {exact: v}
    route:
    - destination: {host: reviews}
      weight: -1
    timeout: soon
    fault:
      abort:
        httpStatus: 700
        percentage: {value: 150}
"#;
    let l = load(text);
    assert!(l.resources.is_empty());
    let paths: Vec<&str> = l.errors().map(|d| d.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "spec.http[0].match[0].uri.exact",
            "spec.http[0].match[0].headers",
            "spec.http[0].route[0].weight",
            "spec.http[0].timeout",
            "spec.http[0].fault.abort.httpStatus",
            "spec.http[0].fault.abort.percentage.value",
        ],
        "{:#?}",
        l.diagnostics
    );
    assert!(l.diagnostics.iter().all(|d| {
        d.resource
            .as_ref()
            .is_some_and(|r| r.namespace == "default")
    }));
}

#[test]
fn accepted_but_not_implemented_fields_are_warnings_by_path() {
    let text = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  tcp:
  - route:
    - destination: {host: reviews}
  http:
  - match:
    - statPrefix: reviews
    route:
    - destination: {host: reviews}
    retries:
      attempts: 2
      retryRemoteLocalities: true
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    tls: {mode: ISTIO_MUTUAL}
"#;
    let l = load(text);
    assert!(!l.has_errors(), "{:#?}", l.diagnostics);
    assert_eq!(l.resources.len(), 2, "warnings do not reject");
    let warned: Vec<&str> = l.diagnostics.iter().map(|d| d.path.as_str()).collect();
    assert_eq!(
        warned,
        [
            "spec.tcp",
            "spec.http[0].match[0].statPrefix",
            "spec.http[0].retries.retryRemoteLocalities",
            "spec.trafficPolicy.loadBalancer",
            "spec.trafficPolicy.tls",
        ]
    );
    assert!(
        l.diagnostics
            .iter()
            .all(|d| d.severity() == Severity::Warning)
    );
    assert!(
        l.diagnostics[0]
            .to_string()
            .contains("accepted, not implemented")
    );
}

#[test]
fn kind_list_and_weights_and_mirror() {
    let text = r#"
apiVersion: v1
kind: List
items:
- apiVersion: networking.istio.io/v1alpha3
  kind: VirtualService
  metadata: {name: storefront, namespace: mushop}
  spec:
    hosts: [mushop-storefront.mushop.svc.cluster.local]
    http:
    - route:
      - destination: {host: mushop-storefront.mushop.svc.cluster.local, subset: original, port: {number: 80}}
        weight: 90
      - destination: {host: mushop-storefront.mushop.svc.cluster.local, subset: beta, port: {number: 80}}
        weight: 10
      mirror: {host: httpbin, subset: v2}
      mirrorPercentage: {value: 100.0}
- apiVersion: networking.istio.io/v1alpha3
  kind: VirtualService
  metadata: {name: broken, namespace: mushop}
  spec:
    hosts: [x]
    http:
    - route:
      - destination: {host: x, port: {number: 0}}
"#;
    let l = load(text);
    assert_eq!(l.resources.len(), 1);
    let Spec::VirtualService(vs) = &l.resources[0].spec else {
        panic!()
    };
    let weights: Vec<_> = vs.http[0]
        .route
        .iter()
        .map(|d: &HttpRouteDestination| d.weight)
        .collect();
    assert_eq!(weights, [Some(90), Some(10)]);
    assert_eq!(
        vs.http[0].route[0].destination.port.map(|p| p.number),
        Some(80)
    );
    assert_eq!(vs.http[0].mirrors.len(), 1);
    assert_eq!(vs.http[0].mirrors[0].destination.host, "httpbin");
    assert_eq!(vs.http[0].mirrors[0].percentage, Some(100.0));
    let e: Vec<_> = l.errors().collect();
    assert_eq!(e.len(), 1);
    assert_eq!(
        e[0].path,
        "items[1].spec.http[0].route[0].destination.port.number"
    );
    assert_eq!(
        e[0].resource.as_ref().map(|r| r.name.as_str()),
        Some("broken")
    );
}

#[test]
fn faults_and_grpc_aborts() {
    let text = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings}
spec:
  hosts: [ratings]
  http:
  - fault:
      delay:
        percentage: {value: 50}
        fixedDelay: 7s
      abort:
        grpcStatus: UNAVAILABLE
        percentage: {value: 10}
    route:
    - destination: {host: ratings, subset: v1}
"#;
    let l = load(text);
    assert!(l.diagnostics.is_empty(), "{:#?}", l.diagnostics);
    let Spec::VirtualService(vs) = &l.resources[0].spec else {
        panic!()
    };
    let fault = vs.http[0].fault.as_ref().expect("fault");
    let delay = fault.delay.as_ref().expect("delay");
    assert_eq!(delay.fixed_delay, std::time::Duration::from_secs(7));
    assert_eq!(delay.percentage, Some(50.0));
    let abort = fault.abort.as_ref().expect("abort");
    assert_eq!(abort.error, AbortError::GrpcStatus("UNAVAILABLE".into()));
}

#[test]
fn unknown_versions_and_kinds() {
    let text = r#"
apiVersion: networking.istio.io/v2
kind: VirtualService
metadata: {name: a}
spec: {hosts: [a]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: b}
spec: {}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
spec: {hosts: [c]}
---
just a string
"#;
    let l = load(text);
    assert!(l.resources.is_empty());
    let d: Vec<_> = l
        .diagnostics
        .iter()
        .map(|d| (d.document, d.severity(), d.path.as_str()))
        .collect();
    assert_eq!(
        d,
        [
            (1, Severity::Error, "apiVersion"),
            (2, Severity::Warning, "apiVersion"),
            (3, Severity::Error, "metadata"),
            (4, Severity::Error, ""),
        ],
        "{:#?}",
        l.diagnostics
    );
}

#[test]
fn syntax_errors_name_the_file_and_line() {
    let l = load("apiVersion: v1\nkind: [\n");
    let e = l.errors().next().expect("an error");
    assert_eq!(e.document, 0);
    assert!(e.pos.is_some());
    assert!(e.to_string().starts_with("routes.yaml:"), "{e}");
}

#[test]
fn a_later_definition_replaces_an_earlier_one_with_a_note() {
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\nspec: {hosts: [a], http: [{route: [{destination: {host: a}}]}]}\n";
    let l = load(&format!("{vs}---\n{vs}"));
    assert_eq!(l.resources.len(), 1);
    assert_eq!(l.resources[0].source.document, 2);
    assert_eq!(l.diagnostics.len(), 1);
}
