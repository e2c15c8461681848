//! `VirtualService` (`networking.istio.io` v1, v1beta1, v1alpha3), HTTP part, as written.
//! Field names follow istio/api `networking/v1alpha3/virtual_service.proto` in their JSON form.

use std::collections::BTreeMap;
use std::time::Duration;

use super::super::decode::{Cx, Decode, Fields, Path, at_most_one, list_of};
use super::super::duration::duration;
use super::super::yaml::Node;
use super::common::{Destination, Headers, Labels, StringMatch, host_name, int_percent, percent};
use super::http_policy::{
    CorsPolicy, Delegate, HttpDirectResponse, HttpFaultInjection, HttpMirrorPolicy, HttpRedirect,
    HttpRetry, HttpRewrite,
};

/// `VirtualService.spec`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VirtualService {
    /// Empty for a delegate (a VirtualService that another one's `delegate` names).
    pub hosts: Vec<String>,
    /// Empty means `mesh`; a list without `mesh` does not apply to the waypoint.
    pub gateways: Vec<String>,
    pub http: Vec<HttpRoute>,
    pub export_to: Vec<String>,
}

impl Decode for VirtualService {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let hosts = f.opt_with("hosts", cx, |n, at, cx| list_of(n, at, cx, host_name));
        let gateways = f.list::<String>("gateways", cx);
        let http = f.list::<HttpRoute>("http", cx);
        let export_to = f.list::<String>("exportTo", cx);
        f.not_implemented("tcp", cx, "TCP routes (the waypoint routes HTTP only)");
        f.not_implemented("tls", cx, "TLS routes (the waypoint routes HTTP only)");
        let ok = f.finish(cx);
        ok.then(|| VirtualService {
            hosts: hosts.unwrap_or_default(),
            gateways,
            http,
            export_to,
        })
    }
}

/// `HTTPRoute`: one rule of `spec.http`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HttpRoute {
    pub name: Option<String>,
    /// Any block may match (OR); empty matches everything.
    pub matches: Vec<HttpMatchRequest>,
    pub route: Vec<HttpRouteDestination>,
    pub redirect: Option<HttpRedirect>,
    pub direct_response: Option<HttpDirectResponse>,
    pub delegate: Option<Delegate>,
    pub rewrite: Option<HttpRewrite>,
    pub timeout: Option<Duration>,
    pub retries: Option<HttpRetry>,
    pub fault: Option<HttpFaultInjection>,
    /// `mirror` with `mirrorPercentage` (or the deprecated `mirrorPercent`) folded into the
    /// same shape as `mirrors`.
    pub mirrors: Vec<HttpMirrorPolicy>,
    pub cors_policy: Option<CorsPolicy>,
    pub headers: Option<Headers>,
}

impl Decode for HttpRoute {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let name = f.opt::<String>("name", cx);
        let matches = f.list::<HttpMatchRequest>("match", cx);
        let route = f.list::<HttpRouteDestination>("route", cx);
        let redirect = f.opt::<HttpRedirect>("redirect", cx);
        let direct_response = f.opt::<HttpDirectResponse>("directResponse", cx);
        let delegate = f.opt::<Delegate>("delegate", cx);
        let rewrite = f.opt::<HttpRewrite>("rewrite", cx);
        let timeout = f.opt_with("timeout", cx, duration);
        let retries = f.opt::<HttpRetry>("retries", cx);
        let fault = f.opt::<HttpFaultInjection>("fault", cx);
        let mirror = f.opt::<Destination>("mirror", cx);
        let mirror_percentage = f.opt_with("mirrorPercentage", cx, percent);
        let mirror_percent_old = f
            .opt_with("mirrorPercent", cx, int_percent)
            .or_else(|| f.opt_with("mirror_percent", cx, int_percent));
        let mut mirrors = f.list::<HttpMirrorPolicy>("mirrors", cx);
        let cors_policy = f.opt::<CorsPolicy>("corsPolicy", cx);
        let headers = f.opt::<Headers>("headers", cx);
        let mut ok = true;
        if mirror.is_some() && !mirrors.is_empty() {
            f.invalid("mirrors", cx, "mirror and mirrors cannot both be set");
            ok = false;
        }
        if mirror.is_none() && (mirror_percentage.is_some() || mirror_percent_old.is_some()) {
            f.invalid("mirrorPercentage", cx, "set without mirror");
            ok = false;
        }
        if let Some(m) = mirror {
            mirrors.push(HttpMirrorPolicy {
                destination: m,
                percentage: mirror_percentage.or(mirror_percent_old),
            });
        }
        let actions = [
            !route.is_empty(),
            redirect.is_some(),
            direct_response.is_some(),
            delegate.is_some(),
        ];
        ok &= at_most_one(
            &mut f,
            cx,
            &["route", "redirect", "directResponse", "delegate"],
            &actions,
        );
        let written = ["route", "redirect", "directResponse", "delegate"]
            .iter()
            .any(|k| f.has(k));
        if !written {
            f.invalid(
                "route",
                cx,
                "a rule needs one of route, redirect, directResponse or delegate",
            );
            ok = false;
        }
        if redirect.is_some() && rewrite.is_some() {
            f.invalid("rewrite", cx, "rewrite cannot be combined with redirect");
            ok = false;
        }
        let ok = f.finish(cx) && ok;
        ok.then_some(HttpRoute {
            name,
            matches,
            route,
            redirect,
            direct_response,
            delegate,
            rewrite,
            timeout,
            retries,
            fault,
            mirrors,
            cors_policy,
            headers,
        })
    }
}

/// `HTTPMatchRequest`: every set condition must hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HttpMatchRequest {
    pub name: Option<String>,
    pub uri: Option<StringMatch>,
    pub scheme: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    /// Lowercase names; `Present` means the header must exist.
    pub headers: BTreeMap<String, StringMatch>,
    /// The request must not match any of these (`Present`: the header must be absent).
    pub without_headers: BTreeMap<String, StringMatch>,
    pub query_params: BTreeMap<String, StringMatch>,
    pub port: Option<u16>,
    pub source_labels: Labels,
    pub source_namespace: Option<String>,
    /// Empty means as the VirtualService says; a list without `mesh` never matches here.
    pub gateways: Vec<String>,
    pub ignore_uri_case: bool,
}

impl Decode for HttpMatchRequest {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let name = f.opt::<String>("name", cx);
        let uri = f.opt::<StringMatch>("uri", cx);
        let scheme = f.opt::<StringMatch>("scheme", cx);
        let method = f.opt::<StringMatch>("method", cx);
        let authority = f.opt::<StringMatch>("authority", cx);
        let headers = f.map::<StringMatch>("headers", cx);
        let without_headers = f.map::<StringMatch>("withoutHeaders", cx);
        let query_params = f.map::<StringMatch>("queryParams", cx);
        let port = f.opt_with("port", cx, super::common::port_number);
        let source_labels = f.map::<String>("sourceLabels", cx);
        let source_namespace = f.opt::<String>("sourceNamespace", cx);
        let gateways = f.list::<String>("gateways", cx);
        let ignore_uri_case = f.opt::<bool>("ignoreUriCase", cx).unwrap_or(false);
        f.not_implemented("statPrefix", cx, "per-match statistics prefixes");
        let mut ok = true;
        for (field, m) in [
            ("uri", &uri),
            ("scheme", &scheme),
            ("method", &method),
            ("authority", &authority),
        ] {
            if m.as_ref() == Some(&StringMatch::Present) {
                f.invalid(field, cx, "needs one of exact, prefix or regex");
                ok = false;
            }
        }
        for (field, map) in [("headers", &headers), ("withoutHeaders", &without_headers)] {
            for name in map.keys() {
                if name.bytes().any(|b| b.is_ascii_uppercase()) {
                    f.invalid(field, cx, format!("header name {name:?} must be lowercase"));
                    ok = false;
                } else if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    f.invalid(field, cx, format!("{name:?} is not a valid header name"));
                    ok = false;
                }
            }
        }
        let ok = f.finish(cx) && ok;
        ok.then_some(HttpMatchRequest {
            name,
            uri,
            scheme,
            method,
            authority,
            headers,
            without_headers,
            query_params,
            port,
            source_labels,
            source_namespace,
            gateways,
            ignore_uri_case,
        })
    }
}

/// `HTTPRouteDestination`.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpRouteDestination {
    pub destination: Destination,
    /// Absent: 0, except for a lone destination, which gets all the traffic.
    pub weight: Option<u32>,
    pub headers: Option<Headers>,
}

impl Decode for HttpRouteDestination {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let destination = f.req::<Destination>("destination", cx);
        let weight = f.opt_with("weight", cx, |n, at, cx| {
            let w = i32::decode(n, at, cx)?;
            u32::try_from(w).ok().or_else(|| {
                cx.invalid(at, n, format!("weight {w} is negative"));
                None
            })
        });
        let headers = f.opt::<Headers>("headers", cx);
        let ok = f.finish(cx);
        Some(HttpRouteDestination {
            destination: destination?,
            weight,
            headers,
        })
        .filter(|_| ok)
    }
}
