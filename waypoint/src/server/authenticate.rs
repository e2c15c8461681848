//! Applies RequestAuthentication (`policy::jwt`) to a request, before AuthorizationPolicy:
//! the token checked, the headers its rule names edited (the token removed unless
//! `forwardOriginalToken`, claims and payload copied), and on a refusal Envoy's answer
//! (401 with the reason as body and `www-authenticate: Bearer realm="<uri>",
//! error="invalid_token"`; 403 for an audience not allowed; gRPC status 16 or 7 with the
//! reason), a log line and a count.

use std::time::{SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue, Response, header};

use crate::policy::jwt::Claims;
use crate::policy::jwt::verify::Failure;
use crate::snapshot::Snapshot;
use crate::upstream::Body;

use super::Ctx;
use super::authorize::target;
use super::reply;
use super::tunnel::Downstream;

/// Envoy bounds the path (with its query) it writes in the realm to this many bytes.
const MAX_REALM_PATH: usize = 256;

/// The verified claims (`None`: no token), or why the request is refused (answered with
/// `refused`).
pub(super) fn check(
    ctx: &Ctx,
    snap: &Snapshot,
    down: &Downstream,
    headers: &mut HeaderMap,
    path: &str,
    query: &str,
) -> Result<Option<Claims>, Failure> {
    let authn = &snap.table.authn;
    if authn.is_empty() {
        return Ok(None);
    }
    let target = target(&down.destination);
    // Only a verified token sets these: a client's own copy is dropped first.
    for h in authn.output_headers(target) {
        headers.remove(h);
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    match authn.authenticate(target, headers, query, &*ctx.jwks, now) {
        Ok(None) => Ok(None),
        Ok(Some(v)) => {
            for h in &v.remove {
                headers.remove(h);
            }
            for (h, value) in v.set {
                headers.insert(h, value);
            }
            Ok(Some(v.claims))
        }
        Err(refusal) => {
            let failure = refusal.failure;
            tracing::info!(
                policy = refusal.policy.as_deref().unwrap_or("-"),
                reason = failure.reason(),
                peer = %down.peer,
                source = %down.source_ip,
                authority = %down.authority,
                path,
                "refused by RequestAuthentication: {}",
                failure.message()
            );
            ctx.metrics.jwt_refused(failure.reason());
            Err(failure)
        }
    }
}

/// Envoy's answer to a refused token; the realm is the request's URI as Envoy writes it
/// (`http://<host><path and query>`, the path cut at 256 bytes). To gRPC, the mapped status
/// with the reason as its message (16 UNAUTHENTICATED; 7 PERMISSION_DENIED for an audience).
pub(super) fn refused(
    failure: Failure,
    authority: &HeaderValue,
    path_and_query: &str,
    grpc: bool,
) -> Response<Body> {
    let mut r = if grpc {
        let mut r = reply::grpc(reply::grpc_status_of(failure.status()), failure.message());
        r.extensions_mut().insert(reply::Local);
        r
    } else {
        reply::text(failure.status(), failure.message())
    };
    let mut end = path_and_query.len().min(MAX_REALM_PATH);
    while !path_and_query.is_char_boundary(end) {
        end -= 1;
    }
    let uri = format!(
        "http://{}{}",
        authority.to_str().unwrap_or_default(),
        &path_and_query[..end]
    );
    let value = format!("Bearer realm=\"{uri}\", error=\"invalid_token\"");
    if let Ok(v) = HeaderValue::from_str(&value) {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    r
}
