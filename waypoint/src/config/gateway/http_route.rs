//! `HTTPRoute` (`gateway.networking.k8s.io` v1, v1beta1), as written, with the checks the
//! CRD's CEL rules make (so a file refused by the API server is refused here too).

use std::time::Duration;

use super::super::decode::{Cx, Decode, Fields, Path};
use super::super::duration::gateway_duration;
use super::super::yaml::Node;
use super::common::{BackendObjectReference, ParentReference, backend_object, header_name};
use super::filter::{HttpRouteFilter, PathModifier};

/// `HTTPRoute.spec`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HttpRoute {
    pub parent_refs: Vec<ParentReference>,
    pub hostnames: Vec<String>,
    pub rules: Vec<HttpRouteRule>,
}

impl Decode for HttpRoute {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let parent_refs = f.list::<ParentReference>("parentRefs", cx);
        let hostnames = f.list::<String>("hostnames", cx);
        // Absent rules default to one rule matching every path (with no backends: 500s).
        let rules = if f.node("rules").is_some() {
            f.list::<HttpRouteRule>("rules", cx)
        } else {
            vec![HttpRouteRule::default()]
        };
        f.not_implemented("useDefaultGateways", cx, "default gateways (ingress only)");
        let ok = f.finish(cx);
        ok.then_some(HttpRoute {
            parent_refs,
            hostnames,
            rules,
        })
    }
}

/// `HTTPRouteRule`.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpRouteRule {
    pub name: Option<String>,
    /// Any may match; absent is one `PathPrefix /` match.
    pub matches: Vec<HttpRouteMatch>,
    pub filters: Vec<HttpRouteFilter>,
    pub backend_refs: Vec<HttpBackendRef>,
    pub timeouts: HttpRouteTimeouts,
    pub retry: Option<HttpRouteRetry>,
}

impl Default for HttpRouteRule {
    fn default() -> Self {
        HttpRouteRule {
            name: None,
            matches: vec![HttpRouteMatch::default()],
            filters: Vec::new(),
            backend_refs: Vec::new(),
            timeouts: HttpRouteTimeouts::default(),
            retry: None,
        }
    }
}

impl Decode for HttpRouteRule {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let name = f.opt::<String>("name", cx);
        let mut matches = f.list::<HttpRouteMatch>("matches", cx);
        if f.node("matches").is_none() {
            matches.push(HttpRouteMatch::default());
        }
        let filters = f.list::<HttpRouteFilter>("filters", cx);
        let backend_refs = f.list::<HttpBackendRef>("backendRefs", cx);
        let timeouts = f
            .opt::<HttpRouteTimeouts>("timeouts", cx)
            .unwrap_or_default();
        let retry = f.opt::<HttpRouteRetry>("retry", cx);
        f.not_implemented("sessionPersistence", cx, "session persistence");
        let mut ok = check_filters(&mut f, cx, &filters, &matches);
        if let (Some(req), Some(backend)) = (timeouts.request, timeouts.backend_request)
            && req > Duration::ZERO
            && backend > req
        {
            f.invalid(
                "timeouts",
                cx,
                "backendRequest must not be longer than request",
            );
            ok = false;
        }
        let ok = f.finish(cx) && ok;
        ok.then_some(HttpRouteRule {
            name,
            matches,
            filters,
            backend_refs,
            timeouts,
            retry,
        })
    }
}

/// The CEL rules on a rule's filters: redirect and rewrite exclude each other, each of the
/// single-use types at most once, and `ReplacePrefixMatch` needs path-prefix matches only.
fn check_filters(
    f: &mut Fields<'_, '_>,
    cx: &mut Cx,
    filters: &[HttpRouteFilter],
    matches: &[HttpRouteMatch],
) -> bool {
    let mut ok = true;
    let count = |name: &str| filters.iter().filter(|x| x.type_name() == name).count();
    if count("RequestRedirect") > 0 && count("URLRewrite") > 0 {
        f.invalid(
            "filters",
            cx,
            "RequestRedirect and URLRewrite cannot be used together",
        );
        ok = false;
    }
    for name in [
        "RequestHeaderModifier",
        "ResponseHeaderModifier",
        "RequestRedirect",
        "URLRewrite",
        "CORS",
    ] {
        if count(name) > 1 {
            f.invalid("filters", cx, format!("{name} may appear once per rule"));
            ok = false;
        }
    }
    let replaces_prefix = filters.iter().any(|x| match x {
        HttpRouteFilter::RequestRedirect(r) => {
            matches!(r.path, Some(PathModifier::ReplacePrefixMatch(_)))
        }
        HttpRouteFilter::UrlRewrite(r) => {
            matches!(r.path, Some(PathModifier::ReplacePrefixMatch(_)))
        }
        _ => false,
    });
    if replaces_prefix
        && (matches.len() != 1 || !matches!(matches[0].path, HttpPathMatch::PathPrefix(_)))
    {
        f.invalid(
            "filters",
            cx,
            "ReplacePrefixMatch needs exactly one match, of type PathPrefix",
        );
        ok = false;
    }
    ok
}

/// `HTTPPathMatch`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpPathMatch {
    Exact(String),
    /// Matches whole path segments.
    PathPrefix(String),
    RegularExpression(String),
}

/// A header or query parameter condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ValueMatch {
    Exact(String),
    RegularExpression(String),
}

/// `HTTPRouteMatch`: every condition holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpRouteMatch {
    pub path: HttpPathMatch,
    /// (lowercase name, condition).
    pub headers: Vec<(String, ValueMatch)>,
    /// (name, exact case), condition.
    pub query_params: Vec<(String, ValueMatch)>,
    pub method: Option<String>,
}

impl Default for HttpRouteMatch {
    fn default() -> Self {
        HttpRouteMatch {
            path: HttpPathMatch::PathPrefix("/".into()),
            headers: Vec::new(),
            query_params: Vec::new(),
            method: None,
        }
    }
}

const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

impl Decode for HttpRouteMatch {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let path = f.opt_with("path", cx, path_match);
        let headers = f.opt_with("headers", cx, |n, at, cx| name_values(n, at, cx, true));
        let query_params = f.opt_with("queryParams", cx, |n, at, cx| name_values(n, at, cx, false));
        let method = f.opt_with("method", cx, |n, at, cx| {
            let m = String::decode(n, at, cx)?;
            METHODS.contains(&m.as_str()).then_some(m).or_else(|| {
                cx.invalid(at, n, format!("expected one of {}", METHODS.join(", ")));
                None
            })
        });
        let ok = f.finish(cx);
        ok.then(|| HttpRouteMatch {
            path: path.unwrap_or(HttpPathMatch::PathPrefix("/".into())),
            headers: headers.unwrap_or_default(),
            query_params: query_params.unwrap_or_default(),
            method,
        })
    }
}

fn path_match(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<HttpPathMatch> {
    let mut f = Fields::new(node, at, cx)?;
    let ty = f
        .opt::<String>("type", cx)
        .unwrap_or_else(|| "PathPrefix".into());
    let value = f.opt::<String>("value", cx).unwrap_or_else(|| "/".into());
    let mut ok = f.finish(cx);
    let m = match ty.as_str() {
        "Exact" | "PathPrefix" => {
            // The CEL rules: absolute, no `//`, no `/./` or `/../`, no `%2f`, no `#`.
            let bad = !value.starts_with('/')
                || value.contains("//")
                || value.contains("/./")
                || value.contains("/../")
                || value.ends_with("/.")
                || value.ends_with("/..")
                || value.to_ascii_lowercase().contains("%2f")
                || value.contains('#');
            if bad {
                cx.invalid(&at.field("value"), node, format!("{value:?} must be an absolute path without '//', '.', '..', '%2f' or '#' segments"));
                ok = false;
            }
            if ty == "Exact" {
                HttpPathMatch::Exact(value)
            } else {
                HttpPathMatch::PathPrefix(value)
            }
        }
        "RegularExpression" => {
            if let Err(e) = compile_check(&value) {
                cx.invalid(&at.field("value"), node, e);
                ok = false;
            }
            HttpPathMatch::RegularExpression(value)
        }
        other => {
            cx.invalid(
                &at.field("type"),
                node,
                format!("{other:?}: expected Exact, PathPrefix or RegularExpression"),
            );
            return None;
        }
    };
    ok.then_some(m)
}

fn compile_check(pattern: &str) -> Result<(), String> {
    regex::RegexBuilder::new(pattern)
        .size_limit(super::super::istio::common::REGEX_SIZE_LIMIT)
        .build()
        .map(|_| ())
        .map_err(|e| format!("not a valid RE2 regex: {e}"))
}

/// A list of `{name, type, value}` conditions; names unique (case-insensitively for headers).
fn name_values(
    node: &Node,
    at: &Path<'_>,
    cx: &mut Cx,
    headers: bool,
) -> Option<Vec<(String, ValueMatch)>> {
    super::super::decode::list_of(node, at, cx, if headers { header_item } else { query_item })
        .and_then(|items| {
            for (i, (name, _)) in items.iter().enumerate() {
                if items[..i].iter().any(|(n, _)| n == name) {
                    cx.invalid(at, node, format!("{name:?} appears twice"));
                    return None;
                }
            }
            Some(items)
        })
}

fn header_item(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<(String, ValueMatch)> {
    name_value(node, at, cx, header_name)
}

fn query_item(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<(String, ValueMatch)> {
    name_value(node, at, cx, String::decode)
}

fn name_value(
    node: &Node,
    at: &Path<'_>,
    cx: &mut Cx,
    name: fn(&Node, &Path<'_>, &mut Cx) -> Option<String>,
) -> Option<(String, ValueMatch)> {
    let mut f = Fields::new(node, at, cx)?;
    let n = f.req_with("name", cx, name);
    let ty = f
        .opt::<String>("type", cx)
        .unwrap_or_else(|| "Exact".into());
    let value = f.req::<String>("value", cx);
    let mut ok = f.finish(cx);
    let value = value?;
    let m = match ty.as_str() {
        "Exact" => ValueMatch::Exact(value),
        "RegularExpression" => {
            if let Err(e) = compile_check(&value) {
                cx.invalid(&at.field("value"), node, e);
                ok = false;
            }
            ValueMatch::RegularExpression(value)
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
    Some((n?, m)).filter(|_| ok)
}

/// `HTTPBackendRef`.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpBackendRef {
    pub backend: BackendObjectReference,
    /// Default 1; 0 sends nothing to this backend.
    pub weight: u32,
    pub filters: Vec<HttpRouteFilter>,
}

impl Decode for HttpBackendRef {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let backend = backend_object(&mut f, cx);
        let weight = f.opt_with("weight", cx, |n, at, cx| {
            let w = u32::decode(n, at, cx)?;
            (w <= 1_000_000).then_some(w).or_else(|| {
                cx.invalid(at, n, "weight must be in 0..=1000000");
                None
            })
        });
        let filters = f.list::<HttpRouteFilter>("filters", cx);
        let ok = f.finish(cx);
        Some(HttpBackendRef {
            backend: backend?,
            weight: weight.unwrap_or(1),
            filters,
        })
        .filter(|_| ok)
    }
}

/// `HTTPRouteTimeouts`; a zero duration means no timeout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HttpRouteTimeouts {
    pub request: Option<Duration>,
    pub backend_request: Option<Duration>,
}

impl Decode for HttpRouteTimeouts {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let request = f.opt_with("request", cx, gateway_duration);
        let backend_request = f.opt_with("backendRequest", cx, gateway_duration);
        let ok = f.finish(cx);
        ok.then_some(HttpRouteTimeouts {
            request,
            backend_request,
        })
    }
}

/// `HTTPRouteRetry`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpRouteRetry {
    /// HTTP status codes (400 to 599) that are retried.
    pub codes: Vec<u16>,
    /// Retries after the first try.
    pub attempts: Option<u32>,
    pub backoff: Option<Duration>,
}

impl Decode for HttpRouteRetry {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let codes = f
            .opt_with("codes", cx, |n, at, cx| {
                super::super::decode::list_of(n, at, cx, |n, at, cx| {
                    let c = u16::decode(n, at, cx)?;
                    (400..=599).contains(&c).then_some(c).or_else(|| {
                        cx.invalid(at, n, format!("{c} is not in 400..=599"));
                        None
                    })
                })
            })
            .unwrap_or_default();
        let attempts = f.opt::<u32>("attempts", cx);
        let backoff = f.opt_with("backoff", cx, gateway_duration);
        let ok = f.finish(cx);
        ok.then_some(HttpRouteRetry {
            codes,
            attempts,
            backoff,
        })
    }
}
