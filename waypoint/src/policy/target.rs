//! Which waypoint a security policy (AuthorizationPolicy, RequestAuthentication) applies to,
//! from its `targetRefs` (istio/api `PolicyTargetReference`, read as Istio reads it for
//! waypoints): the waypoint's own Gateway, the `istio-waypoint` GatewayClass (or, read from
//! the API, the class of the waypoint's own Gateway) from the root namespace, or a Service of
//! the policy's namespace. Shared so both kinds select alike.

use crate::config::security::authorization_policy::TargetRef;
use crate::route::CompileOptions;

const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
/// The GatewayClass of Istio's waypoints, which root-namespace policies may target.
const WAYPOINT_CLASS: &str = "istio-waypoint";

/// A policy that selects workloads, or names no target, is not applied at a waypoint (as
/// in Istio): the field to report and why, or `None` when its `targetRefs` are to be read.
/// `without_refs` says what becomes of a policy with neither.
pub(crate) fn not_here(
    selector: bool,
    refs: &[TargetRef],
    without_refs: &str,
) -> Option<(&'static str, String)> {
    if selector {
        return Some((
            "spec.selector",
            "a workload selector does not apply at a waypoint (Istio ignores it there): not applied; use targetRefs".into(),
        ));
    }
    refs.is_empty().then(|| {
        (
            "spec",
            format!("no targetRefs: {without_refs}: not applied here"),
        )
    })
}

/// What one target reference makes of a policy here.
pub(crate) enum Applies<'p> {
    All,
    Service(&'p str),
    /// Another waypoint's, or a class of gateways this waypoint is not: the reason.
    Elsewhere(String),
    NotImplemented(&'static str),
}

/// Each target reference of a policy in namespace `ns` read; `Err` names the first that Istio
/// would refuse, by index.
pub(crate) fn targets<'p>(
    refs: &'p [TargetRef],
    ns: &str,
    opts: &CompileOptions,
) -> Result<Vec<Applies<'p>>, (usize, String)> {
    let mut out = Vec::with_capacity(refs.len());
    for (i, t) in refs.iter().enumerate() {
        let applies = match (t.group.as_str(), t.kind.as_str()) {
            (GATEWAY_GROUP, "Gateway") => {
                if ns == opts.namespace && t.name == opts.gateway_name {
                    Applies::All
                } else {
                    Applies::Elsewhere(format!(
                        "names Gateway {ns}/{}, not this waypoint ({}/{})",
                        t.name, opts.namespace, opts.gateway_name
                    ))
                }
            }
            (GATEWAY_GROUP, "GatewayClass") => {
                if ns != opts.root_namespace {
                    return Err((
                        i,
                        format!(
                            "a GatewayClass may only be targeted from the root namespace {}",
                            opts.root_namespace
                        ),
                    ));
                }
                if t.name == WAYPOINT_CLASS || opts.gateway_class.as_ref() == Some(&t.name) {
                    Applies::All
                } else {
                    let own = opts
                        .gateway_class
                        .as_ref()
                        .map(|c| format!(" or this waypoint's {c}"))
                        .unwrap_or_default();
                    Applies::Elsewhere(format!(
                        "names GatewayClass {}, not {WAYPOINT_CLASS}{own}",
                        t.name
                    ))
                }
            }
            ("", "Service") => Applies::Service(&t.name),
            ("networking.istio.io", "ServiceEntry") => Applies::NotImplemented(
                "ServiceEntry targets: the waypoint serves no ServiceEntry, so the policy applies to nothing here",
            ),
            (group, kind) => {
                return Err((
                    i,
                    format!(
                        "{kind} in group {group:?} is not a target Istio supports (Gateway or GatewayClass of {GATEWAY_GROUP}, Service of the core group \"\", ServiceEntry of networking.istio.io)"
                    ),
                ));
            }
        };
        out.push(applies);
    }
    Ok(out)
}
