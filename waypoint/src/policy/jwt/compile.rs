//! Which RequestAuthentications apply to this waypoint, read with the same target selection
//! as AuthorizationPolicy (`policy::target`), and their rules made ready for requests.
//! Everything left out is reported by resource and field path; a reference Istio would
//! refuse rejects the policy, and the rejected policy fails closed (`Authn::reject`).

use std::sync::Arc;

use crate::config::security::request_authentication::{JwtRule, RequestAuthentication};
use crate::config::{Diagnostic, Problem, Resource, ResourceName, Spec};
use crate::route::CompileOptions;

use super::super::target::{Applies, not_here, targets};
use super::extract::{Location, defaults};
use super::jwks::Jwks;
use super::{Authn, DEFAULT_FETCH_TIMEOUT, Keys, Rule};

/// The rules of `resources` that apply here; what was left out or refused is in
/// `diagnostics` and `rejected`.
pub fn compile(
    resources: &[Resource],
    opts: &CompileOptions,
    diagnostics: &mut Vec<Diagnostic>,
    rejected: &mut Vec<ResourceName>,
) -> Authn {
    let mut authn = Authn::default();
    for res in resources {
        let Spec::RequestAuthentication(p) = &res.spec else {
            continue;
        };
        let mut note = |path: &str, problem: Problem| {
            diagnostics.push(Diagnostic::about(res, path, problem));
        };
        let ns = res.meta.namespace.as_str();
        if let Some((path, why)) = not_here(
            p.selector.is_some(),
            &p.target_refs,
            "a namespace- or mesh-wide RequestAuthentication is for sidecars, not a waypoint",
        ) {
            note(path, Problem::Note(why));
            continue;
        }
        for (i, r) in p.jwt_rules.iter().enumerate() {
            if r.jwks.is_none() && r.jwks_uri.is_none() {
                note(
                    &format!("spec.jwtRules[{i}]"),
                    Problem::NotImplemented(
                        "keys from the issuer's OpenID discovery document (neither jwks nor jwksUri set): tokens of this issuer are refused",
                    ),
                );
            }
        }
        let key: Arc<str> = format!("{ns}/{}", res.meta.name).into();
        let rules = match rules(p, &key) {
            Ok(r) => r,
            Err((i, why)) => {
                note(&format!("spec.jwtRules[{i}].jwks"), Problem::Invalid(why));
                rejected.push(res.name());
                authn.reject(ns, &res.meta.name, opts);
                continue;
            }
        };
        match targets(&p.target_refs, ns, opts) {
            Ok(found) => {
                for (i, target) in found.into_iter().enumerate() {
                    let at = format!("spec.targetRefs[{i}]");
                    match target {
                        Applies::All => authn.all.extend(rules.iter().cloned()),
                        Applies::Service(name) => authn
                            .by_service
                            .entry(ns.to_owned())
                            .or_default()
                            .entry(name.to_owned())
                            .or_default()
                            .extend(rules.iter().cloned()),
                        Applies::Elsewhere(why) => note(&at, Problem::Note(why)),
                        Applies::NotImplemented(what) => note(&at, Problem::NotImplemented(what)),
                    }
                }
            }
            Err((i, why)) => {
                note(&format!("spec.targetRefs[{i}]"), Problem::Invalid(why));
                rejected.push(res.name());
                authn.reject(ns, &res.meta.name, opts);
            }
        }
    }
    authn
}

/// The rules of one policy; `Err` names a rule whose inline JWKS cannot be used (the
/// decoder checked it, so only a resource built otherwise gets here).
fn rules(p: &RequestAuthentication, policy: &Arc<str>) -> Result<Vec<Arc<Rule>>, (usize, String)> {
    p.jwt_rules
        .iter()
        .enumerate()
        .map(|(i, r)| rule(r, policy).map(Arc::new).map_err(|why| (i, why)))
        .collect()
}

fn rule(r: &JwtRule, policy: &Arc<str>) -> Result<Rule, String> {
    let keys = match (&r.jwks, &r.jwks_uri) {
        (Some(inline), _) => Keys::Inline(Arc::new(Jwks::parse(inline)?)),
        (None, Some(uri)) => Keys::Remote {
            uri: uri.clone(),
            timeout: r.timeout.unwrap_or(DEFAULT_FETCH_TIMEOUT),
        },
        // Istio resolves the issuer's OpenID discovery document then; the waypoint does not
        // (yet): no keys, so every token of this issuer is refused.
        (None, None) => Keys::Inline(Arc::new(Jwks::empty())),
    };
    let mut locations: Vec<Location> = r
        .from_headers
        .iter()
        .map(|h| Location::Header {
            name: h.name.clone(),
            prefix: h.prefix.clone(),
        })
        .chain(r.from_params.iter().cloned().map(Location::Param))
        .chain(r.from_cookies.iter().cloned().map(Location::Cookie))
        .collect();
    if locations.is_empty() {
        locations = defaults().into();
    }
    Ok(Rule {
        policy: policy.clone(),
        issuer: r.issuer.clone(),
        audiences: r.audiences.clone(),
        keys,
        locations,
        forward_original_token: r.forward_original_token,
        output_payload_to_header: r.output_payload_to_header.clone(),
        output_claim_to_headers: r
            .output_claim_to_headers
            .iter()
            .map(|c| {
                (
                    c.header.clone(),
                    c.claim.split('.').map(str::to_owned).collect(),
                )
            })
            .collect(),
    })
}
