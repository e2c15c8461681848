//! Sending a decided request to an endpoint of its backend: which endpoint (at random,
//! avoiding hosts already tried when the policy says so), the attempts with their per-try
//! timeout, the route timeout over all of them, retries with backoff, and how it ended as
//! a response with Envoy's response flag. The retry decisions are `policy::retry`'s.

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, Uri, Version};
use tokio::time::Instant;

use crate::policy::retry::{Outcome, RetryPolicy};
use crate::route::table::{Backend, Policy};
use crate::snapshot::{Destination, EndpointAddr, Endpoints, Snapshot};
use crate::upstream::{Body, Endpoint, Protocol};

use super::Ctx;
use super::forward::Record;
use super::reply;
use super::tunnel::Downstream;

/// For a route whose compiled policy has no retries (`retry: None`): one attempt. Built once,
/// not per request.
static NO_RETRY: std::sync::LazyLock<RetryPolicy> = std::sync::LazyLock::new(|| RetryPolicy {
    attempts: 0,
    ..RetryPolicy::istio_default()
});

/// Headers of one hop only (RFC 9110 §7.6.1), never forwarded; HTTP/2 forbids them.
pub(super) const HOP_BY_HOP: [HeaderName; 5] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The parts of a request kept to send it (again).
pub(super) struct Outgoing {
    pub(super) method: Method,
    pub(super) version: Version,
    /// `:authority` / `Host` as it will be sent; always visible ASCII (see `authority`).
    pub(super) authority: HeaderValue,
    pub(super) path_and_query: PathAndQuery,
    pub(super) headers: HeaderMap,
    /// The body, until an attempt takes it (`None` and `replayable`: it was empty or is
    /// in `buffered`).
    pub(super) body: Option<Body>,
    /// A small body read whole before the first attempt, so that a retry can send it again.
    pub(super) buffered: Option<bytes::Bytes>,
    pub(super) replayable: bool,
    /// The HTTP version spoken to the endpoint.
    pub(super) protocol: Protocol,
}

impl Outgoing {
    pub(super) fn authority(&self) -> &str {
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
pub(super) async fn forward(
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
