//! `GRPCRoute` (`gateway.networking.k8s.io` v1), as written. gRPC calls are HTTP/2 POSTs to
//! `/<service>/<method>`, so each match is also given as the equivalent HTTPRoute path match,
//! which is how the route table serves it.

use super::super::decode::{Cx, Decode, Fields, Path, list_of};
use super::super::yaml::Node;
use super::common::{ParentReference, backend_object, header_name};
use super::filter::HttpRouteFilter;
use super::http_route::{HttpBackendRef, HttpPathMatch, HttpRouteMatch, HttpRouteRule, ValueMatch};

/// `GRPCRoute.spec`, with each rule in its HTTPRoute form.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GrpcRoute {
    pub parent_refs: Vec<ParentReference>,
    pub hostnames: Vec<String>,
    pub rules: Vec<HttpRouteRule>,
}

impl Decode for GrpcRoute {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let parent_refs = f.list::<ParentReference>("parentRefs", cx);
        let hostnames = f.list::<String>("hostnames", cx);
        let rules = if f.has("rules") {
            f.opt_with("rules", cx, |n, at, cx| list_of(n, at, cx, rule))
                .unwrap_or_default()
        } else {
            vec![HttpRouteRule::default()]
        };
        f.not_implemented("useDefaultGateways", cx, "default gateways (ingress only)");
        let ok = f.finish(cx);
        ok.then_some(GrpcRoute {
            parent_refs,
            hostnames,
            rules,
        })
    }
}

const FILTERS: [&str; 4] = [
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "RequestMirror",
    "ExtensionRef",
];

fn filters(f: &mut Fields<'_, '_>, cx: &mut Cx) -> Vec<HttpRouteFilter> {
    let list = f.list::<HttpRouteFilter>("filters", cx);
    if list.iter().any(|x| !FILTERS.contains(&x.type_name())) {
        f.invalid(
            "filters",
            cx,
            format!("a GRPCRoute filter is one of {}", FILTERS.join(", ")),
        );
        return Vec::new();
    }
    list
}

fn rule(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<HttpRouteRule> {
    let mut f = Fields::new(node, at, cx)?;
    let name = f.opt::<String>("name", cx);
    let matches = if f.has("matches") {
        f.opt_with("matches", cx, |n, at, cx| list_of(n, at, cx, grpc_match))
            .unwrap_or_default()
    } else {
        vec![HttpRouteMatch::default()]
    };
    let filters = filters(&mut f, cx);
    let backend_refs = f
        .opt_with("backendRefs", cx, |n, at, cx| {
            list_of(n, at, cx, backend_ref)
        })
        .unwrap_or_default();
    f.not_implemented("sessionPersistence", cx, "session persistence");
    let ok = f.finish(cx);
    ok.then(|| HttpRouteRule {
        name,
        matches,
        filters,
        backend_refs,
        ..HttpRouteRule::default()
    })
}

fn backend_ref(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<HttpBackendRef> {
    let mut f = Fields::new(node, at, cx)?;
    let backend = backend_object(&mut f, cx);
    let weight = f.opt::<u32>("weight", cx).unwrap_or(1);
    let filters = filters(&mut f, cx);
    let ok = f.finish(cx);
    Some(HttpBackendRef {
        backend: backend?,
        weight,
        filters,
    })
    .filter(|_| ok)
}

/// `GRPCRouteMatch` as an HTTPRoute match on the path `/<service>/<method>`.
fn grpc_match(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<HttpRouteMatch> {
    let mut f = Fields::new(node, at, cx)?;
    let path = f.opt_with("method", cx, method_match);
    let headers = f
        .opt_with("headers", cx, |n, at, cx| list_of(n, at, cx, header))
        .unwrap_or_default();
    let ok = f.finish(cx);
    ok.then(|| HttpRouteMatch {
        path: path.unwrap_or(HttpPathMatch::PathPrefix("/".into())),
        headers,
        query_params: Vec::new(),
        method: None,
    })
}

fn header(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<(String, ValueMatch)> {
    let mut f = Fields::new(node, at, cx)?;
    let name = f.req_with("name", cx, header_name);
    let ty = f
        .opt::<String>("type", cx)
        .unwrap_or_else(|| "Exact".into());
    let value = f.req::<String>("value", cx);
    let ok = f.finish(cx);
    let m = match ty.as_str() {
        "Exact" => ValueMatch::Exact(value?),
        "RegularExpression" => ValueMatch::RegularExpression(value?),
        other => {
            cx.invalid(
                &at.field("type"),
                node,
                format!("{other:?}: expected Exact or RegularExpression"),
            );
            return None;
        }
    };
    Some((name?, m)).filter(|_| ok)
}

fn method_match(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<HttpPathMatch> {
    let mut f = Fields::new(node, at, cx)?;
    let ty = f
        .opt::<String>("type", cx)
        .unwrap_or_else(|| "Exact".into());
    let service = f.opt::<String>("service", cx).filter(|s| !s.is_empty());
    let method = f.opt::<String>("method", cx).filter(|s| !s.is_empty());
    let ok = f.finish(cx);
    if service.is_none() && method.is_none() {
        cx.invalid(at, node, "one of service and method must be set");
        return None;
    }
    let m = match ty.as_str() {
        "Exact" => {
            let plain = |s: &Option<String>| s.as_deref().is_none_or(|s| !s.contains('/'));
            if !plain(&service) || !plain(&method) {
                cx.invalid(at, node, "service and method cannot contain '/'");
                return None;
            }
            match (&service, &method) {
                (Some(s), Some(m)) => HttpPathMatch::Exact(format!("/{s}/{m}")),
                (Some(s), None) => HttpPathMatch::PathPrefix(format!("/{s}")),
                (None, Some(m)) => {
                    HttpPathMatch::RegularExpression(format!("/[^/]+/{}", regex::escape(m)))
                }
                (None, None) => return None,
            }
        }
        "RegularExpression" => {
            let s = service.as_deref().unwrap_or("[^/]+");
            let m = method.as_deref().unwrap_or("[^/]+");
            let pattern = format!("/(?:{s})/(?:{m})");
            if let Err(e) = regex::Regex::new(&pattern) {
                cx.invalid(at, node, format!("not a valid RE2 regex: {e}"));
                return None;
            }
            HttpPathMatch::RegularExpression(pattern)
        }
        other => {
            cx.invalid(
                &at.field("type"),
                node,
                format!("{other:?}: expected Exact or RegularExpression"),
            );
            return None;
        }
    };
    ok.then_some(m)
}
