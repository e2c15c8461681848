//! The actions and policies of a VirtualService HTTP rule, as written: redirect, direct
//! response, delegate, rewrite, retries, fault injection, mirrors and CORS
//! (istio/api `virtual_service.proto`, JSON field names).

use std::time::Duration;

use super::super::decode::{Cx, Decode, Fields, Path, at_most_one};
use super::super::diag::Problem;
use super::super::duration::duration;
use super::super::yaml::Node;
use super::common::{Destination, StringMatch, int_percent, percent, regex_pattern};

/// `HTTPRedirect`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpRedirect {
    pub uri: Option<String>,
    pub prefix_rewrite: Option<String>,
    pub authority: Option<String>,
    pub port: Option<u16>,
    pub derive_port: Option<DerivePort>,
    pub scheme: Option<String>,
    /// Default 301.
    pub redirect_code: u16,
}

/// `HTTPRedirect.RedirectPortSelection`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DerivePort {
    FromProtocolDefault,
    FromRequestPort,
}

impl Decode for HttpRedirect {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let uri = f.opt::<String>("uri", cx);
        let prefix_rewrite = f.opt::<String>("prefixRewrite", cx);
        let authority = f.opt::<String>("authority", cx);
        let port = f.opt_with("port", cx, super::common::port_number);
        let derive_port = f.opt_with("derivePort", cx, |n, at, cx| {
            match String::decode(n, at, cx)?.as_str() {
                "FROM_PROTOCOL_DEFAULT" => Some(DerivePort::FromProtocolDefault),
                "FROM_REQUEST_PORT" => Some(DerivePort::FromRequestPort),
                other => {
                    cx.invalid(
                        at,
                        n,
                        format!("{other:?}: expected FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT"),
                    );
                    None
                }
            }
        });
        let scheme = f.opt::<String>("scheme", cx);
        let code = f.opt_with("redirectCode", cx, |n, at, cx| {
            let c = u32::decode(n, at, cx)?;
            if matches!(c, 301 | 302 | 303 | 307 | 308) {
                u16::try_from(c).ok()
            } else {
                cx.invalid(
                    at,
                    n,
                    format!("{c} is not a redirect code (301, 302, 303, 307, 308)"),
                );
                None
            }
        });
        let mut ok = at_most_one(
            &mut f,
            cx,
            &["uri", "prefixRewrite"],
            &[uri.is_some(), prefix_rewrite.is_some()],
        );
        ok &= at_most_one(
            &mut f,
            cx,
            &["port", "derivePort"],
            &[port.is_some(), derive_port.is_some()],
        );
        let ok = f.finish(cx) && ok;
        ok.then_some(HttpRedirect {
            uri,
            prefix_rewrite,
            authority,
            port,
            derive_port,
            scheme,
            redirect_code: code.unwrap_or(301),
        })
    }
}

/// `HTTPDirectResponse`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpDirectResponse {
    pub status: u16,
    pub body: Option<Vec<u8>>,
}

impl Decode for HttpDirectResponse {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let status = f.req_with("status", cx, |n, at, cx| {
            let s = u32::decode(n, at, cx)?;
            match u16::try_from(s) {
                Ok(s) if (200..=599).contains(&s) => Some(s),
                _ => {
                    cx.invalid(at, n, format!("{s} is not an HTTP status in 200..=599"));
                    None
                }
            }
        });
        let body = f.opt_with("body", cx, |n, at, cx| {
            let mut b = Fields::new(n, at, cx)?;
            let string = b.opt::<String>("string", cx);
            let bytes = b.opt_with("bytes", cx, |n, at, cx| {
                let s = String::decode(n, at, cx)?;
                super::super::base64::decode(&s).or_else(|| {
                    cx.invalid(at, n, "not valid base64");
                    None
                })
            });
            let one = at_most_one(
                &mut b,
                cx,
                &["string", "bytes"],
                &[string.is_some(), bytes.is_some()],
            );
            let ok = b.finish(cx) && one;
            ok.then(|| string.map(String::into_bytes).or(bytes).unwrap_or_default())
        });
        let ok = f.finish(cx);
        Some(HttpDirectResponse {
            status: status?,
            body,
        })
        .filter(|_| ok)
    }
}

/// `Delegate`: the VirtualService whose rules stand in for this rule's route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delegate {
    pub name: String,
    /// Absent: the namespace of the VirtualService that delegates.
    pub namespace: Option<String>,
}

impl Decode for Delegate {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let name = f.req::<String>("name", cx);
        let namespace = f.opt::<String>("namespace", cx);
        let ok = f.finish(cx);
        Some(Delegate {
            name: name?,
            namespace,
        })
        .filter(|_| ok)
    }
}

/// `HTTPRewrite`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpRewrite {
    /// Replaces the matched prefix (or the whole path for an exact or regex match).
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub uri_regex_rewrite: Option<RegexRewrite>,
}

/// `RegexRewrite`: `match` is RE2; `rewrite` may use `\1` groups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegexRewrite {
    pub pattern: String,
    pub rewrite: String,
}

impl Decode for HttpRewrite {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let uri = f.opt::<String>("uri", cx);
        let authority = f.opt::<String>("authority", cx);
        let uri_regex_rewrite = f.opt_with("uriRegexRewrite", cx, |n, at, cx| {
            let mut r = Fields::new(n, at, cx)?;
            let pattern = r.req_with("match", cx, regex_pattern);
            let rewrite = r.req::<String>("rewrite", cx);
            let ok = r.finish(cx);
            Some(RegexRewrite {
                pattern: pattern?,
                rewrite: rewrite?,
            })
            .filter(|_| ok)
        });
        let one = at_most_one(
            &mut f,
            cx,
            &["uri", "uriRegexRewrite"],
            &[uri.is_some(), uri_regex_rewrite.is_some()],
        );
        let ok = f.finish(cx) && one;
        ok.then_some(HttpRewrite {
            uri,
            authority,
            uri_regex_rewrite,
        })
    }
}

/// `HTTPRetry`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpRetry {
    /// Retries, not counting the first try; 0 turns retries off.
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    /// Comma-separated Envoy conditions and status codes, parsed when compiled.
    pub retry_on: Option<String>,
    /// Default true: a retry prefers a host not tried before.
    pub retry_ignore_previous_hosts: Option<bool>,
    /// Base interval of the jittered exponential backoff (Envoy's default 25 ms).
    pub backoff: Option<Duration>,
}

impl Decode for HttpRetry {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let attempts = f.opt_with("attempts", cx, |n, at, cx| {
            let a = i32::decode(n, at, cx)?;
            u32::try_from(a).ok().or_else(|| {
                cx.invalid(at, n, "attempts cannot be negative");
                None
            })
        });
        let per_try_timeout = f.opt_with("perTryTimeout", cx, min_1ms);
        let retry_on = f.opt::<String>("retryOn", cx);
        let retry_ignore_previous_hosts = f.opt::<bool>("retryIgnorePreviousHosts", cx);
        let backoff = f.opt_with("backoff", cx, min_1ms);
        f.not_implemented("retryRemoteLocalities", cx, "locality-aware retries");
        let ok = f.finish(cx);
        ok.then_some(HttpRetry {
            attempts: attempts.unwrap_or(0),
            per_try_timeout,
            retry_on,
            retry_ignore_previous_hosts,
            backoff,
        })
    }
}

/// A duration of at least 1 ms (Istio's rule for timeouts and backoff).
pub fn min_1ms(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Duration> {
    let d = duration(node, at, cx)?;
    if d < Duration::from_millis(1) {
        cx.invalid(at, node, "must be at least 1ms");
        return None;
    }
    Some(d)
}

/// `HTTPFaultInjection`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HttpFaultInjection {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

/// `HTTPFaultInjection.Delay`.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultDelay {
    pub fixed_delay: Duration,
    /// Absent: no request is delayed.
    pub percentage: Option<f64>,
}

/// `HTTPFaultInjection.Abort`.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultAbort {
    pub error: AbortError,
    /// Absent: no request is aborted.
    pub percentage: Option<f64>,
}

/// What an aborted request gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AbortError {
    HttpStatus(u16),
    /// A gRPC status name as written (`UNAVAILABLE`) or number.
    GrpcStatus(String),
}

impl Decode for HttpFaultInjection {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let delay = f.opt_with("delay", cx, |n, at, cx| {
            let mut d = Fields::new(n, at, cx)?;
            let fixed = d.opt_with("fixedDelay", cx, min_1ms);
            d.not_implemented(
                "exponentialDelay",
                cx,
                "exponential delays (Istio ignores them too)",
            );
            let pct = d.opt_with("percentage", cx, percent);
            let old = d.opt_with("percent", cx, int_percent);
            let mut ok = true;
            if !d.has("fixedDelay") && !d.has("exponentialDelay") {
                cx.report(&at.field("fixedDelay"), n.pos, Problem::Missing);
                ok = false;
            }
            let ok = d.finish(cx) && ok;
            if !ok {
                return None;
            }
            Some(fixed.map(|fixed_delay| FaultDelay {
                fixed_delay,
                percentage: pct.or(old),
            }))
        });
        let abort = f.opt_with("abort", cx, |n, at, cx| {
            let mut a = Fields::new(n, at, cx)?;
            let http = a.opt_with("httpStatus", cx, |n, at, cx| {
                let s = i32::decode(n, at, cx)?;
                match u16::try_from(s) {
                    Ok(s) if (200..=599).contains(&s) => Some(s),
                    _ => {
                        cx.invalid(at, n, format!("{s} is not an HTTP status in 200..=599"));
                        None
                    }
                }
            });
            let grpc = a.opt::<String>("grpcStatus", cx);
            a.not_implemented(
                "http2Error",
                cx,
                "HTTP/2 error aborts (Istio ignores them too)",
            );
            let pct = a.opt_with("percentage", cx, percent);
            let mut ok = at_most_one(
                &mut a,
                cx,
                &["httpStatus", "grpcStatus"],
                &[http.is_some(), grpc.is_some()],
            );
            let error = match (http, grpc) {
                (Some(s), _) => Some(AbortError::HttpStatus(s)),
                (_, Some(g)) => Some(AbortError::GrpcStatus(g)),
                _ if a.has("http2Error") || a.has("httpStatus") || a.has("grpcStatus") => None,
                _ => {
                    cx.report(&at.field("httpStatus"), n.pos, Problem::Missing);
                    ok = false;
                    None
                }
            };
            let ok = a.finish(cx) && ok;
            if !ok {
                return None;
            }
            Some(error.map(|error| FaultAbort {
                error,
                percentage: pct,
            }))
        });
        let ok = f.finish(cx);
        ok.then(|| HttpFaultInjection {
            delay: delay.flatten(),
            abort: abort.flatten(),
        })
    }
}

/// `HTTPMirrorPolicy`.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpMirrorPolicy {
    pub destination: Destination,
    /// Absent: every request is mirrored.
    pub percentage: Option<f64>,
}

impl Decode for HttpMirrorPolicy {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let destination = f.req::<Destination>("destination", cx);
        let percentage = f.opt_with("percentage", cx, percent);
        let ok = f.finish(cx);
        Some(HttpMirrorPolicy {
            destination: destination?,
            percentage,
        })
        .filter(|_| ok)
    }
}

/// `CorsPolicy`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CorsPolicy {
    /// `allowOrigins`, with the deprecated `allowOrigin` (exact strings) folded in.
    pub allow_origins: Vec<StringMatch>,
    pub allow_methods: Vec<String>,
    pub allow_headers: Vec<String>,
    pub expose_headers: Vec<String>,
    pub max_age: Option<Duration>,
    pub allow_credentials: Option<bool>,
    /// `FORWARD` (default) or `IGNORE`.
    pub unmatched_preflights_forward: bool,
}

impl Decode for CorsPolicy {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let mut allow_origins = f.list::<StringMatch>("allowOrigins", cx);
        let old: Vec<String> = f.list("allowOrigin", cx);
        if !old.is_empty() {
            cx.report(
                &at.field("allowOrigin"),
                f.pos(),
                Problem::Deprecated("use allowOrigins"),
            );
            allow_origins.extend(old.into_iter().map(StringMatch::Exact));
        }
        let allow_methods = f.list::<String>("allowMethods", cx);
        let allow_headers = f.list::<String>("allowHeaders", cx);
        let expose_headers = f.list::<String>("exposeHeaders", cx);
        let max_age = f.opt_with("maxAge", cx, duration);
        let allow_credentials = f.opt::<bool>("allowCredentials", cx);
        let unmatched = f.opt_with("unmatchedPreflights", cx, |n, at, cx| match String::decode(
            n, at, cx,
        )?
        .as_str()
        {
            "UNSPECIFIED" | "FORWARD" => Some(true),
            "IGNORE" => Some(false),
            other => {
                cx.invalid(at, n, format!("{other:?}: expected FORWARD or IGNORE"));
                None
            }
        });
        let ok = f.finish(cx);
        ok.then_some(CorsPolicy {
            allow_origins,
            allow_methods,
            allow_headers,
            expose_headers,
            max_age,
            allow_credentials,
            unmatched_preflights_forward: unmatched.unwrap_or(true),
        })
    }
}
