//! HTTPRoutes and GRPCRoutes attached to Services (GAMMA) to routes, sorted by Gateway API precedence:
//! exact path > longest prefix > method > most headers > most query parameters > oldest
//! route > `namespace/name` > rule order (and match order within a rule). Regular
//! expressions rank below prefixes, as in Istio's translation, except the catch-all prefix
//! `/`, which ranks last (Istio drops it into "no path condition").

use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::Arc;

use crate::config::gateway::common::{BackendObjectReference, HeaderModifier, ParentReference};
use crate::config::gateway::filter::{HttpRouteFilter, PathModifier};
use crate::config::gateway::http_route::{
    HttpPathMatch, HttpRouteMatch, HttpRouteRule, ValueMatch,
};
use crate::config::{Problem, Resource, ResourceName, Spec};
use crate::policy::Fraction;
use crate::policy::headers::HeaderOps;
use crate::policy::redirect::{PathRewrite, Redirect, RedirectPort, Rewrite};
use crate::policy::retry::{
    DEFAULT_BACKOFF_BASE, HOST_SELECTION_ATTEMPTS, RetryCondition, RetryOn, RetryPolicy,
};

use super::compile::{Compiler, Rejected, age_then_name};
use super::matcher::{HeaderMatch, PathMatch, QueryMatch, RouteMatch, StrMatch, full_match_regex};
use super::table::{Action, Backend, Backends, Cors, Mirror, Policy, Route, RouteId, Target};

/// The precedence of one match; smaller sorts first.
type Key = (
    u8,
    Reverse<usize>,
    bool,
    Reverse<usize>,
    Reverse<usize>,
    usize,
    usize,
    usize,
);

fn key(m: &HttpRouteMatch, order: usize, rule: usize, idx: usize) -> Key {
    let (rank, len) = match &m.path {
        HttpPathMatch::Exact(p) => (0, p.len()),
        HttpPathMatch::PathPrefix(p) if p.trim_end_matches('/').is_empty() => (3, 0),
        HttpPathMatch::PathPrefix(p) => (1, p.trim_end_matches('/').len()),
        HttpPathMatch::RegularExpression(p) => (2, p.len()),
    };
    (
        rank,
        Reverse(len),
        m.method.is_none(),
        Reverse(m.headers.len()),
        Reverse(m.query_params.len()),
        order,
        rule,
        idx,
    )
}

/// Routes by service host, each list in precedence order, with who defined the first.
pub(super) fn routes(
    c: &mut Compiler<'_>,
    resources: &[Resource],
) -> HashMap<String, (Vec<Route>, ResourceName)> {
    let mut list: Vec<(&Resource, &[ParentReference], &[HttpRouteRule])> = resources
        .iter()
        .filter_map(|r| match &r.spec {
            Spec::HttpRoute(h) => Some((r, &h.parent_refs[..], &h.rules[..])),
            Spec::GrpcRoute(g) => Some((r, &g.parent_refs[..], &g.rules[..])),
            _ => None,
        })
        .collect();
    list.sort_by(|(a, ..), (b, ..)| age_then_name(a, b));
    let mut by_host: HashMap<String, Vec<(Key, Route, ResourceName)>> = HashMap::new();
    for (order, (res, parent_refs, rules)) in list.into_iter().enumerate() {
        let ns = res.meta.namespace.as_str();
        let parents: Vec<(String, Option<u16>)> = parent_refs
            .iter()
            .filter(|p| p.is_service())
            .map(|p| {
                let pns = p.namespace.as_deref().unwrap_or(ns);
                (
                    format!("{}.{pns}.svc.{}", p.name, c.opts.domain_suffix),
                    p.port,
                )
            })
            .collect();
        if parents.is_empty() {
            c.note(
                res,
                "spec.parentRefs",
                Problem::Note(
                    "attached to no Service: not a mesh route, the waypoint does not use it".into(),
                ),
            );
            continue;
        }
        let mut compiled = Vec::new();
        let mut failed = false;
        for (i, rule) in rules.iter().enumerate() {
            match target(c, res, i, rule) {
                Ok(t) => compiled.push((i, rule, Arc::new(t))),
                Err(Rejected) => failed = true,
            }
        }
        if failed {
            continue;
        }
        for (host, port) in &parents {
            for (i, rule, target) in &compiled {
                for (k, m) in rule.matches.iter().enumerate() {
                    let Ok(mut rm) = route_match(m) else {
                        c.reject(
                            res,
                            &format!("spec.rules[{i}].matches[{k}]"),
                            Problem::Invalid("a regex did not compile".into()),
                        );
                        continue;
                    };
                    rm.port = *port;
                    let r = Route {
                        matches: vec![rm].into(),
                        target: target.clone(),
                    };
                    by_host.entry(host.clone()).or_default().push((
                        key(m, order, *i, k),
                        r,
                        res.name(),
                    ));
                }
            }
        }
    }
    by_host
        .into_iter()
        .map(|(host, mut v)| {
            v.sort_by_key(|e| e.0);
            let owner = v.first().map(|(_, _, o)| o.clone()).unwrap_or_default();
            (host, (v.into_iter().map(|(_, r, _)| r).collect(), owner))
        })
        .collect()
}

fn value_match(v: &ValueMatch) -> Result<StrMatch, regex::Error> {
    Ok(match v {
        ValueMatch::Exact(s) => StrMatch::Exact(s.as_str().into()),
        ValueMatch::RegularExpression(r) => StrMatch::Regex(full_match_regex(r)?),
    })
}

fn route_match(m: &HttpRouteMatch) -> Result<RouteMatch, regex::Error> {
    let path = match &m.path {
        HttpPathMatch::Exact(p) => PathMatch::Str(StrMatch::Exact(p.as_str().into())),
        HttpPathMatch::PathPrefix(p) => PathMatch::segments(p),
        HttpPathMatch::RegularExpression(r) => {
            PathMatch::Str(StrMatch::Regex(full_match_regex(r)?))
        }
    };
    let mut headers = Vec::with_capacity(m.headers.len());
    for (name, v) in &m.headers {
        // Names were checked when the resource was read.
        if let Ok(name) = http::HeaderName::from_bytes(name.as_bytes()) {
            headers.push(HeaderMatch {
                name,
                value: value_match(v)?,
                invert: false,
            });
        }
    }
    let query = m
        .query_params
        .iter()
        .map(|(n, v)| {
            Ok(QueryMatch {
                name: n.as_str().into(),
                value: value_match(v)?,
            })
        })
        .collect::<Result<Vec<_>, regex::Error>>()?;
    Ok(RouteMatch {
        method: m.method.as_deref().map(|s| StrMatch::Exact(s.into())),
        path: Some(path),
        headers: headers.into(),
        query: query.into(),
        ..RouteMatch::default()
    })
}

fn modifier(h: &HeaderModifier) -> Result<HeaderOps, String> {
    HeaderOps::new(
        h.set.iter().map(|x| (x.name.as_str(), x.value.as_str())),
        h.add.iter().map(|x| (x.name.as_str(), x.value.as_str())),
        h.remove.iter().map(String::as_str),
    )
    .map_err(|e| e.to_string())
}

/// A Service backend in the route's namespace, or why it cannot be used.
fn service(
    c: &mut Compiler<'_>,
    ns: &str,
    b: &BackendObjectReference,
) -> Result<Arc<str>, &'static str> {
    if !b.is_service() {
        return Err("only Service backends are supported");
    }
    if b.namespace.as_deref().is_some_and(|n| n != ns) {
        return Err(
            "a backend in another namespace needs a ReferenceGrant, which the waypoint does not read",
        );
    }
    Ok(c.intern(format!("{}.{ns}.svc.{}", b.name, c.opts.domain_suffix)))
}

fn target(
    c: &mut Compiler<'_>,
    res: &Resource,
    i: usize,
    rule: &HttpRouteRule,
) -> Result<Target, Rejected> {
    let at = format!("spec.rules[{i}]");
    let ns = res.meta.namespace.as_str();
    let mut policy = Policy::default();
    let mut redirect = None;
    let mut fail = None;
    let mut mirrors = Vec::new();
    for (k, f) in rule.filters.iter().enumerate() {
        let fat = format!("{at}.filters[{k}]");
        match f {
            HttpRouteFilter::RequestHeaderModifier(h) => {
                policy.request_headers =
                    modifier(h).map_err(|e| c.reject(res, &fat, Problem::Invalid(e)))?;
            }
            HttpRouteFilter::ResponseHeaderModifier(h) => {
                policy.response_headers =
                    modifier(h).map_err(|e| c.reject(res, &fat, Problem::Invalid(e)))?;
            }
            HttpRouteFilter::RequestMirror(m) => match service(c, ns, &m.backend_ref) {
                Ok(host) => mirrors.push(Mirror {
                    host,
                    port: m.backend_ref.port,
                    subset: None,
                    fraction: m.percentage.map_or(Fraction::ALL, Fraction::from_percent),
                }),
                Err(why) => c.note(
                    res,
                    &format!("{fat}.requestMirror.backendRef"),
                    Problem::Note(format!("{why}; not mirrored")),
                ),
            },
            HttpRouteFilter::RequestRedirect(r) => {
                redirect = Some(Redirect {
                    scheme: r.scheme.clone(),
                    host: r.hostname.clone(),
                    port: match (r.port, &r.scheme) {
                        (Some(p), _) => RedirectPort::Set(p),
                        (None, Some(_)) => RedirectPort::SchemeDefault,
                        (None, None) => RedirectPort::Request,
                    },
                    path: r.path.as_ref().map(path_rewrite),
                    code: r.status_code,
                });
            }
            HttpRouteFilter::UrlRewrite(r) => {
                policy.rewrite = Some(Rewrite {
                    authority: r.hostname.clone(),
                    path: r.path.as_ref().map(path_rewrite),
                });
            }
            HttpRouteFilter::Cors(x) => policy.cors = Some(Arc::new(Cors::from_gateway(x))),
            HttpRouteFilter::ExtensionRef { .. } | HttpRouteFilter::ExternalAuth => {
                fail = Some("a filter of this rule is not implemented");
            }
        }
    }
    policy.mirrors = mirrors.into();
    let action = if let Some(reason) = fail {
        Action::Fail {
            status: 500,
            reason,
        }
    } else if let Some(r) = redirect {
        Action::Redirect(r)
    } else {
        let mut list = Vec::with_capacity(rule.backend_refs.len());
        for (k, b) in rule.backend_refs.iter().enumerate() {
            let bat = format!("{at}.backendRefs[{k}]");
            let (host, invalid) = match service(c, ns, &b.backend) {
                Ok(h) => (h, None),
                Err(why) => {
                    c.note(
                        res,
                        &bat,
                        Problem::Note(format!("{why}; its share of requests answers 500")),
                    );
                    (Arc::from(""), Some(why))
                }
            };
            let mut be = Backend {
                host,
                port: b.backend.port,
                subset: None,
                weight: b.weight,
                request_headers: HeaderOps::default(),
                response_headers: HeaderOps::default(),
                invalid,
            };
            for (j, f) in b.filters.iter().enumerate() {
                let fat = format!("{bat}.filters[{j}]");
                match f {
                    HttpRouteFilter::RequestHeaderModifier(h) => {
                        be.request_headers =
                            modifier(h).map_err(|e| c.reject(res, &fat, Problem::Invalid(e)))?;
                    }
                    HttpRouteFilter::ResponseHeaderModifier(h) => {
                        be.response_headers =
                            modifier(h).map_err(|e| c.reject(res, &fat, Problem::Invalid(e)))?;
                    }
                    other => {
                        c.note(
                            res,
                            &fat,
                            Problem::NotImplemented("backend filters other than header modifiers"),
                        );
                        if matches!(
                            other,
                            HttpRouteFilter::ExtensionRef { .. } | HttpRouteFilter::ExternalAuth
                        ) {
                            be.invalid = Some("a filter of this backend is not implemented");
                        }
                    }
                }
            }
            list.push(be);
        }
        match Backends::new(list) {
            Some(b) => Action::Forward(b),
            None if rule.backend_refs.is_empty() => Action::Fail {
                status: 500,
                reason: "the rule has no backendRefs",
            },
            None => Action::Fail {
                status: 500,
                reason: "every backend has weight 0",
            },
        }
    };
    policy.timeout = rule.timeouts.request.filter(|t| !t.is_zero());
    let per_try = rule.timeouts.backend_request.filter(|t| !t.is_zero());
    policy.retry = Some(match &rule.retry {
        None => RetryPolicy {
            per_try_timeout: per_try,
            ..RetryPolicy::istio_default()
        },
        Some(r) => {
            // Istio's conditions for connection-level failures, plus the listed codes.
            let mut on = RetryOn::status_codes(if r.codes.is_empty() { &[503] } else { &r.codes });
            for cond in [
                RetryCondition::ConnectFailure,
                RetryCondition::RefusedStream,
                RetryCondition::Unavailable,
                RetryCondition::Cancelled,
            ] {
                on.insert(cond);
            }
            RetryPolicy {
                attempts: r.attempts.unwrap_or(2),
                per_try_timeout: per_try,
                retry_on: on,
                avoid_previous_hosts: true,
                host_selection_attempts: HOST_SELECTION_ATTEMPTS,
                backoff_base: r.backoff.unwrap_or(DEFAULT_BACKOFF_BASE),
            }
        }
    });
    Ok(Target {
        id: RouteId {
            resource: res.name(),
            rule: i,
            name: rule.name.clone(),
        },
        action,
        policy,
    })
}

fn path_rewrite(p: &PathModifier) -> PathRewrite {
    match p {
        PathModifier::ReplaceFullPath(s) => PathRewrite::Full(s.clone()),
        PathModifier::ReplacePrefixMatch(s) => PathRewrite::SegmentPrefix(s.clone()),
    }
}
