//! VirtualService rules to routes: Istio's semantics (first matching rule wins; delegates;
//! Istio's default retry policy when a rule sets none).

use std::sync::Arc;

use crate::config::istio::VirtualService;
use crate::config::istio::common::{Destination, Headers, StringMatch};
use crate::config::istio::http_policy::{AbortError, DerivePort, HttpRetry};
use crate::config::istio::virtual_service::{HttpMatchRequest, HttpRoute};
use crate::config::{Problem, Resource, Spec};
use crate::policy::Fraction;
use crate::policy::fault::{AbortCode, Fault, grpc_status};
use crate::policy::headers::HeaderOps;
use crate::policy::redirect::{PathRewrite, Redirect, RedirectPort, Rewrite};
use crate::policy::retry::{DEFAULT_BACKOFF_BASE, HOST_SELECTION_ATTEMPTS, RetryOn, RetryPolicy};

use super::compile::{Compiler, Rejected};
use super::hosts::resolve;
use super::matcher::{HeaderMatch, PathMatch, QueryMatch, RouteMatch, StrMatch, full_match_regex};
use super::table::{Action, Backend, Backends, Cors, Mirror, Policy, Route, RouteId, Target};

/// Whether a VirtualService applies to the mesh (no `gateways`, or `mesh` among them).
pub(super) fn applies_to_mesh(vs: &VirtualService) -> bool {
    vs.gateways.is_empty() || vs.gateways.iter().any(|g| g == "mesh")
}

/// The routes of one VirtualService, or why it is rejected.
pub(super) fn routes(
    c: &mut Compiler<'_>,
    res: &Resource,
    vs: &VirtualService,
) -> Result<Vec<Route>, Rejected> {
    let ns = res.meta.namespace.as_str();
    let mut out = Vec::new();
    for (i, rule) in vs.http.iter().enumerate() {
        let at = format!("spec.http[{i}]");
        let Some(d) = &rule.delegate else {
            let matches = compile_matches(c, res, &at, &rule.matches)?;
            let target = target(c, res, ns, &at, i, rule)?;
            out.push(Route {
                matches,
                target: Arc::new(target),
            });
            continue;
        };
        let dns = d.namespace.as_deref().unwrap_or(ns);
        let Some((child_res, child)) = c.virtual_service(dns, &d.name) else {
            c.note(
                res,
                &format!("{at}.delegate"),
                Problem::Note(format!(
                    "VirtualService {dns}/{} not found; the rule is skipped",
                    d.name
                )),
            );
            continue;
        };
        if !child.hosts.is_empty() {
            c.note(res, &format!("{at}.delegate"), Problem::Note(format!(
                "VirtualService {dns}/{} has hosts, so it is not a delegate; the rule is skipped", d.name)));
            continue;
        }
        for (j, crule) in child.http.iter().enumerate() {
            let cat = format!("spec.http[{j}]");
            if crule.delegate.is_some() {
                c.note(
                    child_res,
                    &format!("{cat}.delegate"),
                    Problem::Note("a delegate cannot delegate again; the rule is skipped".into()),
                );
                continue;
            }
            let merged = merge(&rule.matches, &crule.matches);
            let matches = compile_matches(c, res, &format!("{at}.match"), &merged)?;
            // A delegate's short hosts resolve in the delegate's own namespace.
            let target = target(c, child_res, &child_res.meta.namespace, &cat, j, crule)
                .map_err(|r| c.reject_also(res, r))?;
            out.push(Route {
                matches,
                target: Arc::new(target),
            });
        }
    }
    Ok(out)
}

/// The root rule's blocks combined with the delegate's: each pair must both hold; where both
/// set the same single condition the delegate's (more specific) one is used.
fn merge(root: &[HttpMatchRequest], child: &[HttpMatchRequest]) -> Vec<HttpMatchRequest> {
    if root.is_empty() {
        return child.to_vec();
    }
    if child.is_empty() {
        return root.to_vec();
    }
    let mut out = Vec::with_capacity(root.len() * child.len());
    for r in root {
        for ch in child {
            let mut m = ch.clone();
            m.uri = m.uri.or_else(|| r.uri.clone());
            m.ignore_uri_case = if ch.uri.is_some() {
                ch.ignore_uri_case
            } else {
                r.ignore_uri_case
            };
            m.scheme = m.scheme.or_else(|| r.scheme.clone());
            m.method = m.method.or_else(|| r.method.clone());
            m.authority = m.authority.or_else(|| r.authority.clone());
            m.port = m.port.or(r.port);
            m.source_namespace = m.source_namespace.or_else(|| r.source_namespace.clone());
            for (k, v) in &r.headers {
                m.headers.entry(k.clone()).or_insert_with(|| v.clone());
            }
            for (k, v) in &r.without_headers {
                m.without_headers
                    .entry(k.clone())
                    .or_insert_with(|| v.clone());
            }
            for (k, v) in &r.query_params {
                m.query_params.entry(k.clone()).or_insert_with(|| v.clone());
            }
            for (k, v) in &r.source_labels {
                m.source_labels
                    .entry(k.clone())
                    .or_insert_with(|| v.clone());
            }
            if m.gateways.is_empty() {
                m.gateways = r.gateways.clone();
            }
            out.push(m);
        }
    }
    out
}

fn str_match(m: &StringMatch, ignore_case: bool) -> Result<StrMatch, regex::Error> {
    Ok(match m {
        StringMatch::Exact(s) if ignore_case => StrMatch::ExactNoCase(s.as_str().into()),
        StringMatch::Prefix(s) if ignore_case => StrMatch::PrefixNoCase(s.as_str().into()),
        StringMatch::Exact(s) => StrMatch::Exact(s.as_str().into()),
        StringMatch::Prefix(s) => StrMatch::Prefix(s.as_str().into()),
        StringMatch::Regex(r) => StrMatch::Regex(full_match_regex(r)?),
        StringMatch::Present => StrMatch::Present,
    })
}

fn compile_matches(
    c: &mut Compiler<'_>,
    res: &Resource,
    at: &str,
    ms: &[HttpMatchRequest],
) -> Result<Box<[RouteMatch]>, Rejected> {
    let mut out = Vec::with_capacity(ms.len());
    for (k, m) in ms.iter().enumerate() {
        let bad = |c: &mut Compiler<'_>, e: &dyn std::fmt::Display| {
            c.reject(res, &format!("{at}[{k}]"), Problem::Invalid(e.to_string()))
        };
        let sm =
            |v: &Option<StringMatch>, ic: bool| v.as_ref().map(|v| str_match(v, ic)).transpose();
        let headers = m
            .headers
            .iter()
            .map(|(n, v)| (n, v, false))
            .chain(m.without_headers.iter().map(|(n, v)| (n, v, true)))
            .map(|(name, v, invert)| {
                let name =
                    http::HeaderName::from_bytes(name.as_bytes()).map_err(|e| e.to_string())?;
                let value = str_match(v, false).map_err(|e| e.to_string())?;
                Ok(HeaderMatch {
                    name,
                    value,
                    invert,
                })
            })
            .collect::<Result<Vec<_>, String>>();
        let query = m
            .query_params
            .iter()
            .map(|(name, v)| {
                Ok(QueryMatch {
                    name: name.as_str().into(),
                    value: str_match(v, false)?,
                })
            })
            .collect::<Result<Vec<_>, regex::Error>>();
        let (Ok(path), Ok(method), Ok(scheme), Ok(authority)) = (
            sm(&m.uri, m.ignore_uri_case),
            sm(&m.method, false),
            sm(&m.scheme, false),
            sm(&m.authority, false),
        ) else {
            return Err(bad(c, &"a regex did not compile"));
        };
        let headers = headers.map_err(|e| bad(c, &e))?;
        let query = query.map_err(|e| bad(c, &e))?;
        out.push(RouteMatch {
            port: m.port,
            method,
            path: path.map(PathMatch::Str),
            headers: headers.into(),
            query: query.into(),
            scheme,
            authority,
            source_namespace: m.source_namespace.as_deref().map(Into::into),
            source_labels: m
                .source_labels
                .iter()
                .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
                .collect(),
            never: !m.gateways.is_empty() && !m.gateways.iter().any(|g| g == "mesh"),
        });
    }
    Ok(out.into())
}

fn header_ops(h: Option<&Headers>) -> Result<(HeaderOps, HeaderOps), String> {
    let ops = |o: Option<&crate::config::istio::common::HeaderOperations>| match o {
        None => Ok(HeaderOps::default()),
        Some(o) => HeaderOps::new(
            o.set.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            o.add.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            o.remove.iter().map(String::as_str),
        )
        .map_err(|e| e.to_string()),
    };
    Ok((
        ops(h.and_then(|h| h.request.as_ref()))?,
        ops(h.and_then(|h| h.response.as_ref()))?,
    ))
}

fn target(
    c: &mut Compiler<'_>,
    res: &Resource,
    ns: &str,
    at: &str,
    i: usize,
    rule: &HttpRoute,
) -> Result<Target, Rejected> {
    let id = RouteId {
        resource: res.name(),
        rule: i,
        name: rule.name.clone(),
    };
    let action = if let Some(r) = &rule.redirect {
        Action::Redirect(Redirect {
            scheme: r.scheme.clone(),
            host: r.authority.clone(),
            port: match (r.port, r.derive_port) {
                (Some(p), _) => RedirectPort::Set(p),
                (None, Some(DerivePort::FromProtocolDefault)) => RedirectPort::SchemeDefault,
                (None, Some(DerivePort::FromRequestPort)) => RedirectPort::Request,
                (None, None) => RedirectPort::Keep,
            },
            path: r
                .uri
                .clone()
                .map(PathRewrite::Full)
                .or_else(|| r.prefix_rewrite.clone().map(PathRewrite::Prefix)),
            code: r.redirect_code,
        })
    } else if let Some(d) = &rule.direct_response {
        Action::Direct {
            status: d.status,
            body: d.body.clone().unwrap_or_default().into(),
        }
    } else {
        let single = rule.route.len() == 1;
        let mut list = Vec::with_capacity(rule.route.len());
        for (j, d) in rule.route.iter().enumerate() {
            let dat = format!("{at}.route[{j}]");
            let (request_headers, response_headers) = header_ops(d.headers.as_ref())
                .map_err(|e| c.reject(res, &format!("{dat}.headers"), Problem::Invalid(e)))?;
            let (host, port, subset) =
                destination(c, res, ns, &format!("{dat}.destination"), &d.destination);
            list.push(Backend {
                host,
                port,
                subset,
                // A lone destination gets all the traffic whatever its weight says.
                weight: if single { 100 } else { d.weight.unwrap_or(0) },
                request_headers,
                response_headers,
                invalid: None,
            });
        }
        Action::Forward(Backends::new(list).ok_or_else(|| {
            c.reject(
                res,
                &format!("{at}.route"),
                Problem::Invalid("the destination weights add up to 0".into()),
            )
        })?)
    };
    let (request_headers, response_headers) = header_ops(rule.headers.as_ref())
        .map_err(|e| c.reject(res, &format!("{at}.headers"), Problem::Invalid(e)))?;
    let retry = retry(rule.retries.as_ref())
        .map_err(|e| c.reject(res, &format!("{at}.retries.retryOn"), Problem::Invalid(e)))?;
    let fault = match &rule.fault {
        None => None,
        Some(f) => {
            let abort = match &f.abort {
                None => None,
                Some(a) => {
                    let code = match &a.error {
                        AbortError::HttpStatus(s) => AbortCode::Http(*s),
                        AbortError::GrpcStatus(g) => AbortCode::Grpc(grpc_status(g).ok_or_else(|| {
                            c.reject(res, &format!("{at}.fault.abort.grpcStatus"), Problem::Invalid(format!(
                                "{g:?} is not a gRPC status name (e.g. UNAVAILABLE) or code 0..=16")))
                        })?),
                    };
                    Some((code, Fraction::from_percent(a.percentage.unwrap_or(0.0))))
                }
            };
            let delay = f.delay.as_ref().map(|d| {
                (
                    d.fixed_delay,
                    Fraction::from_percent(d.percentage.unwrap_or(0.0)),
                )
            });
            Some(Fault { delay, abort })
        }
    };
    let mut mirrors = Vec::with_capacity(rule.mirrors.len());
    for (k, m) in rule.mirrors.iter().enumerate() {
        let (host, port, subset) = destination(
            c,
            res,
            ns,
            &format!("{at}.mirrors[{k}].destination"),
            &m.destination,
        );
        mirrors.push(Mirror {
            host,
            port,
            subset,
            fraction: m.percentage.map_or(Fraction::ALL, Fraction::from_percent),
        });
    }
    let rewrite = rule
        .rewrite
        .as_ref()
        .map(|r| -> Result<Rewrite, Rejected> {
            let path = match (&r.uri, &r.uri_regex_rewrite) {
                (Some(u), _) => Some(PathRewrite::Prefix(u.clone())),
                (None, Some(rr)) => Some(PathRewrite::Regex {
                    re: regex::Regex::new(&rr.pattern).map_err(|e| {
                        c.reject(
                            res,
                            &format!("{at}.rewrite.uriRegexRewrite.match"),
                            Problem::Invalid(e.to_string()),
                        )
                    })?,
                    with: rr.rewrite.clone(),
                }),
                (None, None) => None,
            };
            Ok(Rewrite {
                authority: r.authority.clone(),
                path,
            })
        })
        .transpose()?;
    let cors = match &rule.cors_policy {
        None => None,
        Some(p) => Some(Arc::new(Cors::from_istio(p).map_err(|e| {
            c.reject(
                res,
                &format!("{at}.corsPolicy.allowOrigins"),
                Problem::Invalid(e),
            )
        })?)),
    };
    Ok(Target {
        id,
        action,
        policy: Policy {
            timeout: rule.timeout.filter(|t| !t.is_zero()),
            retry,
            fault,
            mirrors: mirrors.into(),
            request_headers,
            response_headers,
            rewrite,
            cors,
        },
    })
}

type Dest = (
    Arc<str>,
    Option<u16>,
    Option<Arc<super::table::SubsetSelector>>,
);

fn destination(c: &mut Compiler<'_>, res: &Resource, ns: &str, at: &str, d: &Destination) -> Dest {
    let host: Arc<str> = c.intern(resolve(&d.host, ns, c.opts.domain_suffix.as_str()));
    let subset =
        d.subset.as_ref().map(|s| {
            let sel = c.subsets.selector(&host, &c.opts.namespace, s);
            if sel.labels.is_none() {
                c.note(res, &format!("{at}.subset"), Problem::Note(format!(
                "no DestinationRule defines subset {s:?} of {host}; requests to it answer 503")));
            }
            sel
        });
    (host, d.port.map(|p| p.number), subset)
}

/// Istio's translation of `retries`: none set is Istio's default policy; `attempts: 0`
/// turns retries off; an empty `retryOn` keeps the default conditions.
pub(super) fn retry(r: Option<&HttpRetry>) -> Result<Option<RetryPolicy>, String> {
    let Some(r) = r else {
        return Ok(Some(RetryPolicy::istio_default()));
    };
    if r.attempts == 0 {
        return Ok(None);
    }
    let retry_on = match r.retry_on.as_deref().map(str::trim) {
        Some(s) if !s.is_empty() => RetryOn::parse(s).map_err(|e| e.to_string())?,
        _ => RetryOn::istio_default(),
    };
    Ok(Some(RetryPolicy {
        attempts: r.attempts,
        per_try_timeout: r.per_try_timeout,
        retry_on,
        avoid_previous_hosts: r.retry_ignore_previous_hosts.unwrap_or(true),
        host_selection_attempts: HOST_SELECTION_ATTEMPTS,
        backoff_base: r.backoff.unwrap_or(DEFAULT_BACKOFF_BASE),
    }))
}

/// The VirtualServices that apply to the mesh, in Istio's order of precedence for
/// conflicts: oldest first, then by namespace and name.
pub(super) fn mesh_virtual_services(resources: &[Resource]) -> Vec<(&Resource, &VirtualService)> {
    let mut v: Vec<_> = resources
        .iter()
        .filter_map(|r| match &r.spec {
            Spec::VirtualService(vs) if !vs.hosts.is_empty() && applies_to_mesh(vs) => {
                Some((r, vs))
            }
            _ => None,
        })
        .collect();
    v.sort_by(|(a, _), (b, _)| super::compile::age_then_name(a, b));
    v
}
