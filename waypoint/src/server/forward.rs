//! One request: route it (`route::RouteTable::decide`), act on the route (direct answer,
//! redirect, fault, CORS, mirrors) once AuthorizationPolicy allows it (`authorize`), apply its rewrites and header edits, and hand it to
//! `attempt` for the chosen backend; then record its metrics. Decisions are the pure
//! functions of `route` and `policy`; this module only applies them.

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Body as _;
use hyper::body::Incoming;

use crate::metrics::{Names, RequestLabels};
use crate::policy::authz::HttpAttributes;
use crate::policy::authz::path::normalize as normalize_path;
use crate::policy::cors::CorsDecision;
use crate::policy::fault::AbortCode;
use crate::policy::redirect::RedirectInput;
use crate::policy::retry::RetryPolicy;
use crate::route::table::{Action, Decision, Policy};
use crate::route::{Request as RouteRequest, Source};
use crate::snapshot::{Destination, Snapshot};
use crate::upstream::{Body, Protocol};
use ztunnel::state::Workload;

use super::Ctx;
use super::attempt::{self, Outgoing};
use super::authenticate;
use super::authorize;
use super::reply;
use super::tunnel::Downstream;
use super::upgrade;

/// The policy of a service without route config: Istio's default retries, nothing else.
static DEFAULT_POLICY: std::sync::LazyLock<Policy> = std::sync::LazyLock::new(|| Policy {
    retry: Some(RetryPolicy::istio_default()),
    ..Policy::default()
});

/// Request bodies up to this size are read whole before they are sent, so that a retry can
/// send them again (Envoy buffers request bodies for retries likewise, up to a limit).
const REPLAY_LIMIT: u64 = 64 * 1024;

pub(super) async fn handle(
    ctx: Arc<Ctx>,
    down: Arc<Downstream>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let start = std::time::Instant::now();
    let mut rec = Record {
        endpoint: None,
        flags: "-",
        grpc: is_grpc(req.headers()),
    };
    let snap = ctx.snapshot();
    let mut response = route(&ctx, &snap, &down, req, &mut rec).await;
    if rec.grpc {
        response = reply::for_grpc(response);
    }
    let labels = labels(&snap, &down, &rec, response.status().as_u16());
    ctx.metrics.requests.get_or_create(&labels).inc();
    ctx.metrics
        .duration
        .get_or_create(&labels)
        .observe(start.elapsed().as_secs_f64() * 1000.0);
    Ok(response)
}

/// What one request's metrics record, filled in as it is handled.
pub(super) struct Record {
    /// The endpoint that answered (last attempt).
    pub(super) endpoint: Option<Arc<Workload>>,
    /// Envoy's response flag for how it ended.
    pub(super) flags: &'static str,
    pub(super) grpc: bool,
}

fn labels(snap: &Snapshot, down: &Downstream, rec: &Record, status: u16) -> RequestLabels {
    RequestLabels {
        source: down.names.clone(),
        destination: rec
            .endpoint
            .as_ref()
            .map_or_else(Names::unknown, |w| snap.workload_names(w)),
        service: match &down.destination {
            Destination::Service(s) => snap.service_names(s),
            Destination::Workload(_) => Names::unknown(),
        },
        request_protocol: if rec.grpc { "grpc" } else { "http" },
        response_code: status,
        response_flags: rec.flags,
    }
}

/// The authority a request names: its URI's (HTTP/2, or an absolute URI), else its `Host`,
/// else the tunnel's. Always visible ASCII.
fn request_authority(uri: &Uri, headers: &HeaderMap, tunnel: SocketAddr) -> HeaderValue {
    if let Some(v) = uri
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        return v;
    }
    match headers.get(header::HOST) {
        Some(host) if host.to_str().is_ok() => host.clone(),
        _ => HeaderValue::try_from(tunnel.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("")),
    }
}

/// The request's URI with its path normalized (`policy::authz::path`), as Envoy normalizes
/// it under Istio's default `pathNormalization: BASE` before routing: routes, policies and
/// the application all see the same path, so `/public/../admin` cannot take the `/public`
/// route to a backend that resolves it to `/admin`. `None` if the normalized path does not
/// make a URI again (it always should: it only holds characters of the original).
fn normalized(uri: Uri) -> Option<Uri> {
    let path = match normalize_path(uri.path()) {
        Cow::Borrowed(_) => return Some(uri),
        Cow::Owned(path) => path,
    };
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    let mut parts = uri.into_parts();
    parts.path_and_query = Some(PathAndQuery::try_from(path_and_query).ok()?);
    Uri::from_parts(parts).ok()
}

async fn route(
    ctx: &Ctx,
    snap: &Snapshot,
    down: &Downstream,
    mut req: Request<Incoming>,
    rec: &mut Record,
) -> Response<Body> {
    let protocol = if req.version() == Version::HTTP_2 {
        Protocol::Http2
    } else {
        Protocol::Http1
    };
    let upgrade = match req.headers().get(header::UPGRADE) {
        Some(upgrade) if protocol == Protocol::Http1 => Some(upgrade::UpgradeRequest {
            upgrade: upgrade.clone(),
            client: hyper::upgrade::on(&mut req),
        }),
        _ => None,
    };
    let (mut parts, body) = req.into_parts();
    let Some(uri) = normalized(std::mem::take(&mut parts.uri)) else {
        return reply::text(400, "invalid path");
    };
    let authority = request_authority(&uri, &parts.headers, down.authority);
    let path = uri.path();
    let query = uri.query().unwrap_or("");
    let port = down.authority.port();
    let claims = match authenticate::check(ctx, snap, down, &mut parts.headers, path, query) {
        Ok(c) => c,
        // Envoy sets no response flag for a jwt_authn refusal: `-` stays.
        Err(failure) => {
            let pq = uri.path_and_query().map_or(path, |p| p.as_str());
            return authenticate::refused(failure, &authority, pq, rec.grpc);
        }
    };
    let http = HttpAttributes {
        method: parts.method.as_str(),
        host: authority.to_str().unwrap_or_default(),
        path,
        headers: &parts.headers,
    };
    if !authorize::check(ctx, snap, down, Some(http), claims.as_ref()).is_allow() {
        rec.flags = authorize::FLAG;
        return authorize::denied(rec.grpc);
    }
    let decision = match &down.destination {
        Destination::Service(service) => {
            let view = RouteRequest {
                method: parts.method.as_str(),
                scheme: "http",
                authority: authority.to_str().unwrap_or_default(),
                path,
                query,
                headers: &parts.headers,
                port,
                source: Source {
                    namespace: down.source_namespace(),
                    labels: down.source_labels(),
                },
            };
            snap.table.decide(&service.hostname, &view)
        }
        Destination::Workload(_) => Decision::NoRoutes,
    };
    for h in &attempt::HOP_BY_HOP {
        parts.headers.remove(h);
    }
    if let Some(u) = &upgrade {
        parts.headers.insert(header::UPGRADE, u.upgrade.clone());
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let path_and_query = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    // A body of known, small length is read first, so that retries can replay it; a larger
    // or unknown one streams through and is sent once.
    let small = body
        .size_hint()
        .exact()
        .is_some_and(|n| n > 0 && n <= REPLAY_LIMIT);
    let (body, buffered) = if small {
        match body.collect().await {
            Ok(collected) => (None, Some(collected.to_bytes())),
            Err(error) => {
                tracing::debug!(%error, "request body broken before it was read");
                return reply::text(400, "request body incomplete");
            }
        }
    } else if body.is_end_stream() {
        (None, None)
    } else {
        (Some(body.boxed_unsync()), None)
    };
    let mut out = attempt::Outgoing {
        method: parts.method,
        version: parts.version,
        authority,
        path_and_query,
        replayable: body.is_none(),
        body,
        buffered,
        headers: parts.headers,
        protocol,
    };
    let (target, matched_prefix) = match decision {
        Decision::NotFound => {
            rec.flags = "NR";
            return reply::text(404, "no route matched");
        }
        Decision::NoRoutes => {
            let response = attempt::forward(ctx, snap, down, out, None, &DEFAULT_POLICY, rec).await;
            return upgrade::switch(response, upgrade);
        }
        Decision::Matched {
            target,
            matched_prefix,
        } => (target, matched_prefix),
    };
    let policy = &target.policy;
    let mut cors = None;
    match policy
        .cors
        .as_ref()
        .map(|c| c.decide(&out.method, &out.headers))
    {
        Some(CorsDecision::Preflight(headers)) => {
            let mut r = reply::text(200, "");
            r.headers_mut().extend(headers);
            return r;
        }
        Some(CorsDecision::Allowed(headers)) => cors = Some(headers),
        Some(CorsDecision::None) | None => {}
    }
    let backends = match &target.action {
        Action::Forward(backends) => backends,
        Action::Direct { status, body } => {
            let mut r = Response::new(reply::full(bytes::Bytes::copy_from_slice(body)));
            *r.status_mut() = http::StatusCode::from_u16(*status).unwrap_or(http::StatusCode::OK);
            policy.response_headers.apply(r.headers_mut());
            return r;
        }
        Action::Redirect(redirect) => {
            let location = redirect.location(&RedirectInput {
                scheme: "http",
                authority: out.authority(),
                port,
                path,
                query,
                matched_prefix,
            });
            let mut r = reply::text(redirect.code, "");
            if let Ok(l) = HeaderValue::from_str(&location) {
                r.headers_mut().insert(header::LOCATION, l);
            }
            policy.response_headers.apply(r.headers_mut());
            return r;
        }
        Action::Fail { status, reason } => return reply::text(*status, reason),
    };
    if let Some(fault) = &policy.fault {
        let decided = fault.decide(rand::random(), rand::random());
        if let Some(delay) = decided.delay {
            rec.flags = "DI";
            tokio::time::sleep(delay).await;
        }
        match decided.abort {
            Some(AbortCode::Http(status)) => {
                rec.flags = "FI";
                return reply::text(status, "fault filter abort");
            }
            Some(AbortCode::Grpc(code)) => {
                rec.flags = "FI";
                return reply::grpc(code, "fault filter abort");
            }
            None => {}
        }
    }
    if let Some(rewrite) = &policy.rewrite {
        if let Some(p) = &rewrite.path {
            let rewritten = p.apply(path, matched_prefix);
            let rewritten = if query.is_empty() {
                rewritten.into_owned()
            } else {
                format!("{rewritten}?{query}")
            };
            match PathAndQuery::try_from(rewritten) {
                Ok(pq) => out.path_and_query = pq,
                Err(_) => return reply::text(502, "upstream request failed"),
            }
        }
        if let Some(a) = &rewrite.authority {
            match HeaderValue::from_str(a) {
                Ok(a) => out.authority = a,
                Err(_) => return reply::text(502, "upstream request failed"),
            }
        }
    }
    policy.request_headers.apply(&mut out.headers);
    mirror(ctx, snap, &mut out, policy, port, protocol);
    let backend = backends.pick(rand::random());
    if let Some(why) = backend.invalid {
        return reply::text(500, why);
    }
    backend.request_headers.apply(&mut out.headers);
    let response = attempt::forward(ctx, snap, down, out, Some(backend), policy, rec).await;
    let mut response = upgrade::switch(response, upgrade);
    policy.response_headers.apply(response.headers_mut());
    backend.response_headers.apply(response.headers_mut());
    if let Some(cors) = cors {
        response.headers_mut().extend(cors);
    }
    response
}

/// Sends the copies the route's mirrors ask for (each applies to its share of requests).
fn mirror(
    ctx: &Ctx,
    snap: &Snapshot,
    out: &mut Outgoing,
    policy: &Policy,
    port: u16,
    protocol: Protocol,
) {
    if policy.mirrors.is_empty() {
        return;
    }
    let chosen: Vec<_> = policy
        .mirrors
        .iter()
        .filter(|m| m.fraction.applies(rand::random()))
        .collect();
    if chosen.is_empty() {
        return;
    }
    let bodies = match (out.body.take(), &out.buffered) {
        (Some(body), _) => {
            let (main, copies) = super::mirror::Tee::split(body, chosen.len());
            out.body = Some(main);
            copies
        }
        (None, Some(bytes)) => chosen.iter().map(|_| reply::full(bytes.clone())).collect(),
        (None, None) => chosen.iter().map(|_| reply::empty()).collect(),
    };
    let copy = super::mirror::Copy {
        method: &out.method,
        version: out.version,
        authority: out.authority(),
        path_and_query: out.path_and_query.as_str(),
        headers: &out.headers,
    };
    for (m, body) in chosen.into_iter().zip(bodies) {
        super::mirror::send(
            &ctx.upstream,
            snap,
            m,
            port,
            &copy,
            body,
            protocol,
            ctx.mirror_shadow_suffix,
            &ctx.metrics,
        );
    }
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}
