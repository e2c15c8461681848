//! `exportTo`: which VirtualServices and DestinationRules the waypoint uses, read against
//! its own namespace as Istio reads it for any proxy.

use http::HeaderMap;

use super::*;
use crate::config::{Diagnostic, LoadOptions, Severity, load_str};

fn build_in(yaml: &str, waypoint_ns: &str) -> Compiled {
    let loaded = load_str("test.yaml", yaml, &LoadOptions::default());
    assert!(!loaded.has_errors(), "{:#?}", loaded.diagnostics);
    let opts = CompileOptions {
        namespace: waypoint_ns.into(),
        ..CompileOptions::default()
    };
    compile(&loaded.resources, &opts)
}

fn target<'t>(c: &'t Compiled, host: &str) -> Option<&'t Target> {
    let h = HeaderMap::new();
    match c.table.decide(host, &Request::get("/", &h, 9080)) {
        Decision::Matched { target, .. } => Some(target),
        _ => None,
    }
}

fn no_errors(d: &[Diagnostic]) {
    assert!(d.iter().all(|d| d.severity() != Severity::Error), "{d:#?}");
}

const REVIEWS_VS: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  exportTo: EXPORT
  http:
  - route:
    - destination: {host: reviews, subset: v2}
"#;

#[test]
fn a_virtual_service_applies_only_where_it_is_exported_to_the_waypoints_namespace() {
    let host = "reviews.shop.svc.cluster.local";
    let used = |export: &str, waypoint_ns: &str| {
        let c = build_in(&REVIEWS_VS.replace("EXPORT", export), waypoint_ns);
        no_errors(&c.diagnostics);
        let used = target(&c, host).is_some();
        let noted = c
            .diagnostics
            .iter()
            .any(|d| d.path == "spec.exportTo" && d.to_string().contains(waypoint_ns));
        // Left out exactly when a note says why.
        assert_eq!(
            used, !noted,
            "{export} in {waypoint_ns}: {:#?}",
            c.diagnostics
        );
        used
    };
    assert!(used("[\"*\"]", "shop"));
    assert!(used("[\"*\"]", "istio-system"));
    assert!(used("[\".\"]", "shop"));
    assert!(!used("[\".\"]", "istio-system"));
    assert!(used("[shop, gateways]", "gateways"));
    assert!(!used("[shop, gateways]", "other"));
    assert!(!used("[\"~\"]", "shop"));
    // No exportTo at all: visible everywhere.
    let c = build_in(&REVIEWS_VS.replace("  exportTo: EXPORT\n", ""), "other");
    assert!(target(&c, host).is_some());
}

#[test]
fn destination_rule_export_to_limits_where_its_subsets_are_seen() {
    let yaml = |export: &str| {
        format!(
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  http:
  - route:
    - destination: {{host: reviews.shop.svc.cluster.local, subset: v1}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: shop}}
spec:
  host: reviews
  exportTo: {export}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
"#
        )
    };
    let subset_defined = |export: &str| {
        let c = build_in(&yaml(export), "default");
        assert!(
            c.diagnostics
                .iter()
                .all(|d| d.severity() != Severity::Error),
            "{:#?}",
            c.diagnostics
        );
        let t = target(&c, "reviews.shop.svc.cluster.local").expect("a route");
        let Action::Forward(b) = &t.action else {
            panic!("not forwarded: {:?}", t.action)
        };
        let subset = b.all()[0].subset.clone().expect("a subset");
        subset.labels.is_some()
    };
    // Visible to the waypoint's namespace: everywhere, or by name.
    assert!(subset_defined("[\"*\"]"));
    assert!(subset_defined("[default]"));
    // Only its own namespace, or none: a waypoint in `default` does not see the subset.
    assert!(!subset_defined("[\".\"]"));
    assert!(!subset_defined("[\"~\"]"));
}

#[test]
fn with_workloads_from_istiod_subsets_beyond_app_and_version_are_reported() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: blue, labels: {app: reviews, track: blue}}
"#;
    let loaded = load_str("test.yaml", yaml, &LoadOptions::default());
    let opts = |canonical_labels_only| CompileOptions {
        canonical_labels_only,
        ..CompileOptions::default()
    };
    let c = compile(&loaded.resources, &opts(true));
    let paths: Vec<&str> = c.diagnostics.iter().map(|d| d.path.as_str()).collect();
    assert_eq!(
        paths,
        ["spec.subsets[1].labels.track"],
        "{:#?}",
        c.diagnostics
    );
    assert_eq!(c.diagnostics[0].severity(), Severity::Warning);
    // With the local config, workloads have any labels.
    assert!(
        compile(&loaded.resources, &opts(false))
            .diagnostics
            .is_empty()
    );
}
