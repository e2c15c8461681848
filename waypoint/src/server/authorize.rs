//! Applies the AuthorizationPolicy verdict (`policy::authz`) to a request or a relayed
//! tunnel: what a policy sees of it, and on a denial Envoy's answer (403 `RBAC: access
//! denied`, or gRPC status 7 PERMISSION_DENIED), a log line naming the policy and a count.

use http::Response;

use crate::policy::authz::path::normalize as normalize_path;
use crate::policy::authz::{Attributes, HttpAttributes, Target, Verdict};
use crate::policy::jwt::Claims;
use crate::snapshot::{Destination, Snapshot};
use crate::upstream::Body;

use super::Ctx;
use super::reply;
use super::tunnel::Downstream;

/// Envoy's body (and gRPC message) for a request its RBAC filter denied.
pub(super) const DENIED: &str = "RBAC: access denied";
/// Envoy's response flag for an RBAC denial.
pub(super) const FLAG: &str = "RBAC";

pub(super) fn target(destination: &Destination) -> Target<'_> {
    match destination {
        Destination::Service(s) => Target::Service {
            namespace: &s.namespace,
            name: &s.name,
        },
        Destination::Workload(w) => Target::Workload {
            namespace: w.namespace(),
        },
    }
}

/// The verdict on a request (`http`) or on a tunnel relayed as bytes (`None`); a denial
/// is logged and counted here.
pub(super) fn check(
    ctx: &Ctx,
    snap: &Snapshot,
    down: &Downstream,
    http: Option<HttpAttributes<'_>>,
    auth: Option<&Claims>,
) -> Verdict {
    let authz = &snap.table.authz;
    if authz.is_empty() {
        return Verdict::Allow;
    }
    // Policies judge the normalized path (`policy::authz::path`).
    let normalized = http.map(|h| normalize_path(h.path));
    let http = http.map(|h| HttpAttributes {
        path: normalized.as_deref().unwrap_or(h.path),
        ..h
    });
    let a = Attributes {
        peer: &down.peer,
        principal: down.principal(),
        source_ip: down.source_ip,
        destination_ip: down.authority.ip(),
        destination_port: down.authority.port(),
        http,
        auth,
    };
    let verdict = authz.decide(target(&down.destination), &a);
    if let Verdict::Deny { policy, reason } = &verdict {
        let policy = policy.as_deref().unwrap_or("-");
        tracing::info!(
            policy,
            reason = reason.as_str(),
            peer = %down.peer,
            source = %down.source_ip,
            authority = %down.authority,
            method = http.map(|h| h.method),
            path = http.map(|h| h.path),
            "denied by AuthorizationPolicy"
        );
        ctx.metrics.authz_denied(policy, reason.as_str());
    }
    verdict
}

/// The answer to a denied request.
pub(super) fn denied(grpc: bool) -> Response<Body> {
    if grpc {
        let mut r = reply::grpc(7, DENIED);
        r.extensions_mut().insert(reply::Local);
        r
    } else {
        reply::text(403, DENIED)
    }
}
