//! Which AuthorizationPolicies apply to this waypoint, from their `targetRefs` (istio/api
//! `PolicyTargetReference`, read as Istio reads it for waypoints, by `policy::target`, which
//! RequestAuthentication shares). Everything left out is
//! reported by resource and field path; a reference Istio would refuse rejects the policy,
//! and the rejected policy fails closed (`Authz::reject`).

use std::sync::Arc;

use crate::config::security::authorization_policy::Action;
use crate::config::{Diagnostic, Problem, Resource, ResourceName, Spec};
use crate::route::CompileOptions;

use super::super::target::{Applies, not_here, targets};
use super::{Authz, Policy};

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
            diagnostics.push(Diagnostic::about(res, path, problem));
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
        if let Some((path, why)) = not_here(
            p.selector.is_some(),
            &p.target_refs,
            "a namespace- or mesh-wide policy is enforced by ztunnel, not the waypoint",
        ) {
            note(path, Problem::Note(why));
            continue;
        }
        let policy = Arc::new(Policy {
            key: format!("{ns}/{}", res.meta.name).into(),
            action: p.action,
            rules: p.rules.clone(),
            rejected: false,
        });
        match targets(&p.target_refs, ns, opts) {
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
