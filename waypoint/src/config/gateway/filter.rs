//! `HTTPRouteFilter` (also used by GRPCRoute for the types it allows), as written.

use super::super::decode::{Cx, Decode, Fields, Path};
use super::super::yaml::Node;
use super::common::{BackendObjectReference, HeaderModifier};

/// One filter of a rule or a backend.
#[derive(Clone, Debug, PartialEq)]
pub enum HttpRouteFilter {
    RequestHeaderModifier(HeaderModifier),
    ResponseHeaderModifier(HeaderModifier),
    RequestMirror(RequestMirror),
    RequestRedirect(RequestRedirect),
    UrlRewrite(UrlRewrite),
    Cors(Cors),
    /// Not implemented: a rule that uses one answers 500, as the spec requires for a filter
    /// that cannot be applied.
    ExtensionRef {
        group: String,
        kind: String,
        name: String,
    },
    /// Not implemented; as for `ExtensionRef`, the rule fails closed with 500.
    ExternalAuth,
}

impl HttpRouteFilter {
    pub fn type_name(&self) -> &'static str {
        match self {
            HttpRouteFilter::RequestHeaderModifier(_) => "RequestHeaderModifier",
            HttpRouteFilter::ResponseHeaderModifier(_) => "ResponseHeaderModifier",
            HttpRouteFilter::RequestMirror(_) => "RequestMirror",
            HttpRouteFilter::RequestRedirect(_) => "RequestRedirect",
            HttpRouteFilter::UrlRewrite(_) => "URLRewrite",
            HttpRouteFilter::Cors(_) => "CORS",
            HttpRouteFilter::ExtensionRef { .. } => "ExtensionRef",
            HttpRouteFilter::ExternalAuth => "ExternalAuth",
        }
    }
}

/// `HTTPRequestMirrorFilter`.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestMirror {
    pub backend_ref: BackendObjectReference,
    /// 0 to 100 (`percent`, or `fraction` numerator/denominator); absent: every request.
    pub percentage: Option<f64>,
}

/// `HTTPPathModifier`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathModifier {
    ReplaceFullPath(String),
    ReplacePrefixMatch(String),
}

/// `HTTPRequestRedirectFilter`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRedirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    /// Default 302.
    pub status_code: u16,
}

/// `HTTPURLRewriteFilter`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UrlRewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

/// `HTTPCORSFilter`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cors {
    /// `*`, an exact origin, or one with a `*` wildcard host label.
    pub allow_origins: Vec<String>,
    pub allow_credentials: bool,
    pub allow_methods: Vec<String>,
    pub allow_headers: Vec<String>,
    pub expose_headers: Vec<String>,
    /// Seconds; default 5.
    pub max_age: u32,
}

const TYPES: [(&str, &str); 8] = [
    ("RequestHeaderModifier", "requestHeaderModifier"),
    ("ResponseHeaderModifier", "responseHeaderModifier"),
    ("RequestMirror", "requestMirror"),
    ("RequestRedirect", "requestRedirect"),
    ("URLRewrite", "urlRewrite"),
    ("CORS", "cors"),
    ("ExtensionRef", "extensionRef"),
    ("ExternalAuth", "externalAuth"),
];

impl Decode for HttpRouteFilter {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let ty = f.req::<String>("type", cx)?;
        let Some((_, field)) = TYPES.iter().find(|(t, _)| *t == ty) else {
            let names: Vec<&str> = TYPES.iter().map(|(t, _)| *t).collect();
            f.invalid(
                "type",
                cx,
                format!("{ty:?}: expected one of {}", names.join(", ")),
            );
            f.finish(cx);
            return None;
        };
        // Only the field named by `type` may be set.
        for (_, other) in TYPES {
            if other != *field && f.node(other).is_some() {
                f.invalid(
                    other,
                    cx,
                    format!("set on a filter of type {ty}; only {field} may be"),
                );
            }
        }
        let filter = match ty.as_str() {
            "RequestHeaderModifier" => f
                .req::<HeaderModifier>(field, cx)
                .map(HttpRouteFilter::RequestHeaderModifier),
            "ResponseHeaderModifier" => f
                .req::<HeaderModifier>(field, cx)
                .map(HttpRouteFilter::ResponseHeaderModifier),
            "RequestMirror" => f
                .req_with(field, cx, mirror)
                .map(HttpRouteFilter::RequestMirror),
            "RequestRedirect" => f
                .req_with(field, cx, redirect)
                .map(HttpRouteFilter::RequestRedirect),
            "URLRewrite" => f
                .req_with(field, cx, rewrite)
                .map(HttpRouteFilter::UrlRewrite),
            "CORS" => f.req_with(field, cx, cors).map(HttpRouteFilter::Cors),
            "ExtensionRef" => {
                let r = f.req_with(field, cx, |n, at, cx| {
                    let mut e = Fields::new(n, at, cx)?;
                    let group = e.req::<String>("group", cx);
                    let kind = e.req::<String>("kind", cx);
                    let name = e.req::<String>("name", cx);
                    let ok = e.finish(cx);
                    Some(HttpRouteFilter::ExtensionRef {
                        group: group?,
                        kind: kind?,
                        name: name?,
                    })
                    .filter(|_| ok)
                });
                f.not_implemented(field, cx, "extension filters; the rule answers 500");
                r
            }
            _ => {
                // The content is not read: nothing of it is used, and the rule fails closed.
                f.not_implemented(field, cx, "external authorization; the rule answers 500");
                let set = f.node(field).is_some();
                if !set {
                    f.invalid(field, cx, "required when type is ExternalAuth");
                }
                set.then_some(HttpRouteFilter::ExternalAuth)
            }
        };
        let ok = f.finish(cx);
        filter.filter(|_| ok)
    }
}

fn mirror(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<RequestMirror> {
    let mut f = Fields::new(node, at, cx)?;
    let backend_ref = f.req::<BackendObjectReference>("backendRef", cx);
    let percent = f.opt_with("percent", cx, |n, at, cx| {
        let p = u32::decode(n, at, cx)?;
        (p <= 100).then_some(f64::from(p)).or_else(|| {
            cx.invalid(at, n, format!("{p} is not in 0..=100"));
            None
        })
    });
    let fraction = f.opt_with("fraction", cx, |n, at, cx| {
        let mut fr = Fields::new(n, at, cx)?;
        let num = fr.req::<u32>("numerator", cx);
        let den = fr.opt::<u32>("denominator", cx).unwrap_or(100);
        let ok = fr.finish(cx);
        let num = num?;
        if den == 0 || num > den {
            cx.invalid(
                at,
                n,
                "numerator must be at most denominator, and denominator above 0",
            );
            return None;
        }
        ok.then(|| f64::from(num) * 100.0 / f64::from(den))
    });
    let one = super::super::decode::at_most_one(
        &mut f,
        cx,
        &["percent", "fraction"],
        &[percent.is_some(), fraction.is_some()],
    );
    let ok = f.finish(cx) && one;
    Some(RequestMirror {
        backend_ref: backend_ref?,
        percentage: percent.or(fraction),
    })
    .filter(|_| ok)
}

fn path_modifier(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<PathModifier> {
    let mut f = Fields::new(node, at, cx)?;
    let ty = f.req::<String>("type", cx);
    let full = f.opt::<String>("replaceFullPath", cx);
    let prefix = f.opt::<String>("replacePrefixMatch", cx);
    let m = match ty.as_deref() {
        Some("ReplaceFullPath") if prefix.is_none() => {
            full.map(PathModifier::ReplaceFullPath).or_else(|| {
                f.invalid(
                    "replaceFullPath",
                    cx,
                    "required when type is ReplaceFullPath",
                );
                None
            })
        }
        Some("ReplacePrefixMatch") if full.is_none() => {
            prefix.map(PathModifier::ReplacePrefixMatch).or_else(|| {
                f.invalid(
                    "replacePrefixMatch",
                    cx,
                    "required when type is ReplacePrefixMatch",
                );
                None
            })
        }
        Some(t @ ("ReplaceFullPath" | "ReplacePrefixMatch")) => {
            f.invalid("type", cx, format!("only the field of type {t} may be set"));
            None
        }
        Some(other) => {
            f.invalid(
                "type",
                cx,
                format!("{other:?}: expected ReplaceFullPath or ReplacePrefixMatch"),
            );
            None
        }
        None => None,
    };
    let ok = f.finish(cx);
    m.filter(|_| ok)
}

fn redirect(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<RequestRedirect> {
    let mut f = Fields::new(node, at, cx)?;
    let scheme = f.opt_with("scheme", cx, |n, at, cx| {
        let s = String::decode(n, at, cx)?;
        matches!(s.as_str(), "http" | "https")
            .then_some(s)
            .or_else(|| {
                cx.invalid(at, n, "expected http or https");
                None
            })
    });
    let hostname = f.opt::<String>("hostname", cx);
    let path = f.opt_with("path", cx, path_modifier);
    let port = f.opt_with("port", cx, super::super::istio::common::port_number);
    let status_code = f.opt_with("statusCode", cx, |n, at, cx| {
        let c = u16::decode(n, at, cx)?;
        matches!(c, 301 | 302 | 303 | 307 | 308)
            .then_some(c)
            .or_else(|| {
                cx.invalid(at, n, format!("{c} is not one of 301, 302, 303, 307, 308"));
                None
            })
    });
    let ok = f.finish(cx);
    ok.then(|| RequestRedirect {
        scheme,
        hostname,
        path,
        port,
        status_code: status_code.unwrap_or(302),
    })
}

fn rewrite(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<UrlRewrite> {
    let mut f = Fields::new(node, at, cx)?;
    let hostname = f.opt::<String>("hostname", cx);
    let path = f.opt_with("path", cx, path_modifier);
    let ok = f.finish(cx);
    ok.then_some(UrlRewrite { hostname, path })
}

fn cors(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Cors> {
    let mut f = Fields::new(node, at, cx)?;
    let allow_origins = f.list::<String>("allowOrigins", cx);
    let allow_credentials = f.opt::<bool>("allowCredentials", cx).unwrap_or(false);
    let allow_methods = f.list::<String>("allowMethods", cx);
    let allow_headers = f.list::<String>("allowHeaders", cx);
    let expose_headers = f.list::<String>("exposeHeaders", cx);
    let max_age = f.opt::<u32>("maxAge", cx).unwrap_or(5);
    let ok = f.finish(cx);
    ok.then_some(Cors {
        allow_origins,
        allow_credentials,
        allow_methods,
        allow_headers,
        expose_headers,
        max_age,
    })
}
