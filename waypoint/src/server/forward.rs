//! One request: route it (`route::RouteTable::decide`), act on the route (direct answer,
//! redirect, fault, forward), and forward it to an endpoint of the chosen backend with the
//! route's rewrites, header edits, timeout and retries. Decisions are the pure functions of
//! `route` and `policy`; this module only applies them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Body as _;
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::metrics::{Names, RequestLabels};
use crate::policy::cors::CorsDecision;
use crate::policy::fault::AbortCode;
use crate::policy::redirect::RedirectInput;
use crate::policy::retry::{Outcome, RetryPolicy};
use crate::route::table::{Action, Backend, Decision, Policy};
use crate::route::{Request as RouteRequest, Source};
use crate::snapshot::{Destination, EndpointAddr, Endpoints, Snapshot};
use crate::upstream::{Body, Endpoint, Protocol};
use ztunnel::state::Workload;

use super::Ctx;
use super::reply;
use super::tunnel::Downstream;

/// The policy of a service without route config: Istio's default retries, nothing else.
static DEFAULT_POLICY: std::sync::LazyLock<Policy> = std::sync::LazyLock::new(|| Policy {
    retry: Some(RetryPolicy::istio_default()),
    ..Policy::default()
});

/// For a route whose compiled policy has no retries (`retry: None`): one attempt. Built once,
/// not per request.
static NO_RETRY: std::sync::LazyLock<RetryPolicy> = std::sync::LazyLock::new(|| RetryPolicy {
    attempts: 0,
    ..RetryPolicy::istio_default()
});

/// Request bodies up to this size are read whole before they are sent, so that a retry can
/// send them again (Envoy buffers request bodies for retries likewise, up to a limit).
const REPLAY_LIMIT: u64 = 64 * 1024;

/// Headers of one hop only (RFC 9110 §7.6.1), never forwarded; HTTP/2 forbids them.
const HOP_BY_HOP: [HeaderName; 5] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

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
struct Record {
    /// The endpoint that answered (last attempt).
    endpoint: Option<Arc<Workload>>,
    /// Envoy's response flag for how it ended.
    flags: &'static str,
    grpc: bool,
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

/// The parts of a request kept to send it (again).
struct Outgoing {
    method: Method,
    version: Version,
    /// `:authority` / `Host` as it will be sent; always visible ASCII (see `authority`).
    authority: HeaderValue,
    path_and_query: PathAndQuery,
    headers: HeaderMap,
    /// The body, until an attempt takes it (`None` and `replayable`: it was empty or is
    /// in `buffered`).
    body: Option<Body>,
    /// A small body read whole before the first attempt, so that a retry can send it again.
    buffered: Option<bytes::Bytes>,
    replayable: bool,
    /// The HTTP version spoken to the endpoint.
    protocol: Protocol,
}

impl Outgoing {
    fn authority(&self) -> &str {
        self.authority.to_str().unwrap_or_default()
    }

    /// The URI every attempt is sent with, made once: the path for HTTP/1.1 (the authority
    /// goes in `Host`, set here too), the absolute form for HTTP/2.
    fn target(&mut self) -> Option<Uri> {
        match self.protocol {
            Protocol::Http1 => {
                self.headers.insert(header::HOST, self.authority.clone());
                let mut parts = http::uri::Parts::default();
                parts.path_and_query = Some(self.path_and_query.clone());
                Uri::from_parts(parts).ok()
            }
            Protocol::Http2 => Uri::builder()
                .scheme(http::uri::Scheme::HTTP)
                .authority(self.authority.as_bytes())
                .path_and_query(self.path_and_query.clone())
                .build()
                .ok(),
        }
    }

    /// The request for one attempt, or `None` if the body was already sent once. The headers
    /// are copied only if `again`: another attempt may need them.
    fn attempt(&mut self, uri: &Uri, again: bool) -> Option<Request<Body>> {
        let body = match (self.body.take(), &self.buffered) {
            (Some(body), _) => body,
            (None, Some(bytes)) => reply::full(bytes.clone()),
            (None, None) if self.replayable => reply::empty(),
            (None, None) => return None,
        };
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = if again {
            self.headers.clone()
        } else {
            std::mem::take(&mut self.headers)
        };
        Some(req)
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

/// An HTTP/1.1 request to switch protocols (WebSocket): what it asks for, and the future
/// of the client's side of the connection once the switch is answered.
struct UpgradeRequest {
    upgrade: HeaderValue,
    client: hyper::upgrade::OnUpgrade,
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
        Some(upgrade) if protocol == Protocol::Http1 => Some(UpgradeRequest {
            upgrade: upgrade.clone(),
            client: hyper::upgrade::on(&mut req),
        }),
        _ => None,
    };
    let (mut parts, body) = req.into_parts();
    let uri = std::mem::take(&mut parts.uri);
    let authority = request_authority(&uri, &parts.headers, down.authority);
    let path = uri.path();
    let query = uri.query().unwrap_or("");
    let port = down.authority.port();
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
    for h in &HOP_BY_HOP {
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
    let mut out = Outgoing {
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
            let response = forward(ctx, snap, down, out, None, &DEFAULT_POLICY, rec).await;
            return switch(response, upgrade);
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
    let response = forward(ctx, snap, down, out, Some(backend), policy, rec).await;
    let mut response = switch(response, upgrade);
    policy.response_headers.apply(response.headers_mut());
    backend.response_headers.apply(response.headers_mut());
    if let Some(cors) = cors {
        response.headers_mut().extend(cors);
    }
    response
}

/// When the endpoint agreed to switch protocols (101), joins the two upgraded connections
/// (client and endpoint) and copies bytes both ways until either side closes. The 101 keeps
/// its `Upgrade` and `Connection` headers.
fn switch(mut response: Response<Body>, upgrade: Option<UpgradeRequest>) -> Response<Body> {
    let Some(upgrade) = upgrade else {
        return response;
    };
    if response.status() != http::StatusCode::SWITCHING_PROTOCOLS {
        return response;
    }
    let endpoint = hyper::upgrade::on(&mut response);
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    tokio::spawn(async move {
        let (client, endpoint) = match tokio::join!(upgrade.client, endpoint) {
            (Ok(client), Ok(endpoint)) => (client, endpoint),
            (client, endpoint) => {
                let side = |r: &Result<_, hyper::Error>| match r {
                    Ok(_) => "switched".to_owned(),
                    Err(e) => e.to_string(),
                };
                tracing::debug!(
                    client = side(&client),
                    endpoint = side(&endpoint),
                    "protocol switch abandoned"
                );
                return;
            }
        };
        let mut client = hyper_util::rt::TokioIo::new(client);
        let mut endpoint = hyper_util::rt::TokioIo::new(endpoint);
        if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut endpoint).await {
            tracing::debug!(%error, "upgraded connection ended");
        }
    });
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

/// The endpoints a request may go to: the backend's service (and subset) on its port, the
/// addressed service's own endpoints, or the workload addressed directly.
fn endpoints<'s>(
    snap: &'s Snapshot,
    down: &Downstream,
    backend: Option<&'s Backend>,
) -> Option<Endpoints<'s>> {
    let port = down.authority.port();
    let found = match (backend, &down.destination) {
        (Some(b), _) => {
            let service = snap.service(&b.host)?;
            snap.endpoints(service, b.port.unwrap_or(port), b.subset.as_deref())
        }
        (None, Destination::Service(service)) => snap.endpoints(service, port, None),
        (None, Destination::Workload(w)) => Endpoints::only((w.clone(), down.authority)),
    };
    Some(found)
}

/// Picks an endpoint at random, preferring one not tried yet when `avoid` is set.
fn pick<'e>(
    eps: &'e Endpoints<'_>,
    tried: &[SocketAddr],
    avoid: bool,
    tries: u32,
) -> Option<&'e EndpointAddr> {
    let n = eps.len();
    let mut ep = eps.get(rand::random_range(0..n))?;
    if avoid && !tried.is_empty() {
        for _ in 1..tries.max(1) {
            if !tried.contains(&ep.1) {
                break;
            }
            ep = eps.get(rand::random_range(0..n))?;
        }
    }
    Some(ep)
}

/// Sends the request to an endpoint, with the route's timeout and retries.
async fn forward(
    ctx: &Ctx,
    snap: &Snapshot,
    down: &Downstream,
    mut out: Outgoing,
    backend: Option<&Backend>,
    policy: &Policy,
    rec: &mut Record,
) -> Response<Body> {
    let eps = match endpoints(snap, down, backend) {
        Some(eps) if !eps.is_empty() => eps,
        Some(_) | None => {
            rec.flags = "UH";
            return reply::text(503, "no healthy upstream");
        }
    };
    let deadline = policy.timeout.map(|t| Instant::now() + t);
    let retry = policy.retry.as_ref().unwrap_or(&NO_RETRY);
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut retries_done = 0u32;
    let mut returned: Option<Request<Body>> = None;
    let Some(uri) = out.target() else {
        return reply::text(502, "upstream request failed");
    };
    loop {
        // Another attempt may send the request again only if it can be replayed.
        let again = retries_done < retry.attempts && out.replayable;
        let Some(req) = returned.take().or_else(|| out.attempt(&uri, again)) else {
            return reply::text(502, "upstream request failed");
        };
        let Some((workload, addr)) = pick(
            &eps,
            &tried,
            retry.avoid_previous_hosts,
            retry.host_selection_attempts,
        ) else {
            rec.flags = "UH";
            return reply::text(503, "no healthy upstream");
        };
        let ep = &Endpoint::new(workload.clone(), *addr);
        rec.endpoint = Some(workload.clone());
        let bound = [retry.per_try_timeout.map(|t| Instant::now() + t), deadline]
            .into_iter()
            .flatten()
            .min();
        let sent = ctx.upstream.send(ep, out.protocol, req);
        let result = match bound {
            Some(at) => tokio::time::timeout_at(at, sent).await.ok(),
            None => Some(sent.await),
        };
        let (outcome, response) = match result {
            None => (Outcome::PerTryTimeout, None),
            Some(Ok(response)) => (
                Outcome::Response {
                    status: response.status().as_u16(),
                    grpc_status: grpc_status(response.headers()),
                },
                Some(response),
            ),
            Some(Err((error, unsent))) => {
                tracing::debug!(endpoint = %ep.addr, %error, "upstream attempt failed");
                returned = unsent;
                let outcome = if error.is_connect_failure() {
                    Outcome::ConnectFailure
                } else {
                    Outcome::Reset
                };
                (outcome, None)
            }
        };
        let timed_out = deadline.is_some_and(|d| Instant::now() >= d);
        let can_send_again = returned.is_some() || out.replayable;
        if retries_done < retry.attempts
            && !timed_out
            && can_send_again
            && retry.retry_on.should_retry(outcome)
        {
            // Only a request tried again needs the hosts it was sent to.
            tried.push(*addr);
            retries_done += 1;
            let backoff = retry.backoff(retries_done, rand::random());
            let wake = Instant::now() + backoff;
            if deadline.is_some_and(|d| wake >= d) {
                rec.flags = "UT";
                return reply::text(504, "upstream request timeout");
            }
            tokio::time::sleep_until(wake).await;
            continue;
        }
        return match (outcome, response) {
            (_, Some(mut response)) => {
                if response.status() != http::StatusCode::SWITCHING_PROTOCOLS {
                    for h in &HOP_BY_HOP {
                        response.headers_mut().remove(h);
                    }
                }
                response
            }
            (Outcome::PerTryTimeout, None) => {
                rec.flags = "UT";
                reply::text(504, "upstream request timeout")
            }
            (Outcome::ConnectFailure, None) => {
                rec.flags = "UF";
                reply::text(
                    503,
                    "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
                )
            }
            (_, None) => {
                rec.flags = "UC";
                reply::text(
                    503,
                    "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
                )
            }
        };
    }
}

/// `grpc-status` of a trailers-only response.
fn grpc_status(headers: &HeaderMap) -> Option<u8> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}
