//! Which AuthorizationPolicies apply to this waypoint, from their `targetRefs` (istio/api
//! `PolicyTargetReference`, read as Istio reads it for waypoints). Everything left out is
//! reported by resource and field path; a reference Istio would refuse rejects the policy,
//! and the rejected policy fails closed (`Authz::reject`).

use std::sync::Arc;

use crate::config::security::authorization_policy::{Action, AuthorizationPolicy};
use crate::config::{Diagnostic, Problem, Resource, ResourceName, Spec};
use crate::route::CompileOptions;

use super::{Authz, Policy};

const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
/// The GatewayClass of Istio's waypoints, which root-namespace policies may target.
const WAYPOINT_CLASS: &str = "istio-waypoint";

/// The policies of `resources` that apply here; what was left out or refused is in
/// `diagnostics` and `rejected`.
pub fn compile(
    resources: &[Resource],
    opts: &CompileOptions,
    diagnostics: &mut Vec<Diagnostic>,
    rejected: &mut Vec<ResourceName>,
) -> Authz {
    let mut authz = Authz::default();
    for res in resources {
        let Spec::AuthorizationPolicy(p) = &res.spec else {
            continue;
        };
        let mut note = |path: &str, problem: Problem| {
            diagnostics.push(Diagnostic {
                file: res.source.file.clone(),
                document: res.source.document,
                resource: Some(res.name()),
                path: path.into(),
                pos: None,
                problem,
            });
        };
        let ns = res.meta.namespace.as_str();
        match p.action {
            Action::Audit => {
                note(
                    "spec.action",
                    Problem::NotImplemented(
                        "AUDIT (audit logging): the policy changes no decision and nothing is logged per request",
                    ),
                );
                continue;
            }
            Action::Custom => note(
                "spec.action",
                Problem::NotImplemented(
                    "CUSTOM (external authorization): the requests it selects are denied",
                ),
            ),
            Action::Allow | Action::Deny => {}
        }
        if p.selector.is_some() {
            note(
                "spec.selector",
                Problem::Note(
                    "a workload selector does not apply at a waypoint (Istio ignores it there): not applied; use targetRefs".into(),
                ),
            );
            continue;
        }
        if p.target_refs.is_empty() {
            note(
                "spec",
                Problem::Note(
                    "no targetRefs: a namespace- or mesh-wide policy is enforced by ztunnel, not the waypoint: not applied here".into(),
                ),
            );
            continue;
        }
        let policy = Arc::new(Policy {
            key: format!("{ns}/{}", res.meta.name).into(),
            action: p.action,
            rules: p.rules.clone(),
            rejected: false,
        });
        match targets(p, ns, opts) {
            Ok(found) => {
                for (i, target) in found.into_iter().enumerate() {
                    let at = format!("spec.targetRefs[{i}]");
                    match target {
                        Applies::All => authz.add_all(policy.clone()),
                        Applies::Service(name) => authz.add_service(ns, name, policy.clone()),
                        Applies::Elsewhere(why) => note(&at, Problem::Note(why)),
                        Applies::NotImplemented(what) => note(&at, Problem::NotImplemented(what)),
                    }
                }
            }
            Err((i, why)) => {
                note(&format!("spec.targetRefs[{i}]"), Problem::Invalid(why));
                rejected.push(res.name());
                authz.reject(ns, &res.meta.name, opts);
            }
        }
    }
    authz
}

/// What one target reference makes of a policy here.
enum Applies<'p> {
    All,
    Service(&'p str),
    /// Another waypoint's, or a class of gateways this waypoint is not: the reason.
    Elsewhere(String),
    NotImplemented(&'static str),
}

/// Each target reference of `p` (in namespace `ns`) read; `Err` names the first that Istio
/// would refuse, by index.
fn targets<'p>(
    p: &'p AuthorizationPolicy,
    ns: &str,
    opts: &CompileOptions,
) -> Result<Vec<Applies<'p>>, (usize, String)> {
    let mut out = Vec::with_capacity(p.target_refs.len());
    for (i, t) in p.target_refs.iter().enumerate() {
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
                if t.name == WAYPOINT_CLASS {
                    Applies::All
                } else {
                    Applies::Elsewhere(format!(
                        "names GatewayClass {}, not {WAYPOINT_CLASS}",
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
