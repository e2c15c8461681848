//! `RequestAuthentication` at the waypoint: which JWT rules apply to a request, and what a
//! token in it proves, before AuthorizationPolicy looks at the request.
//!
//! Which apply (`compile`, once per config) is decided as for AuthorizationPolicy
//! (`policy::target`): through `targetRefs` only; the rules of every policy that applies
//! combine. Per request (`Authn::authenticate`, no I/O): no token in any place a rule reads
//! is allowed through with no request principal; a token found is verified (`verify`)
//! against the rule of its issuer that reads that place; an invalid one is refused with
//! Envoy's answer; a valid one gives the request principal `<iss>/<sub>` and the claims
//! AuthorizationPolicy reads (`Claims`).
//!
//! Keys come from the rule's inline `jwks`, or from its `jwksUri`, fetched by the waypoint
//! (`fetch`). A token of an issuer whose keys have not been fetched is refused (fail closed).
//!
//! A RequestAuthentication that cannot be read must not leave a gap. Leaving it out would
//! turn the tokens it verifies into tokens nobody checks: a DENY policy on their request
//! principal would no longer match, and the token (with whatever claims it asserts) would be
//! forwarded. So while one is rejected, every request it could have applied to (its
//! namespace's services, or every request when it is in the waypoint's or the root
//! namespace) that carries a token — in the default places or any place a rule in force
//! reads — is refused (401, reason `policy_rejected`). Requests without a token pass with
//! no request principal, so ALLOW policies requiring `requestPrincipals` still deny them.

mod compile;
mod extract;
pub mod fetch;
pub mod jwks;
pub mod verify;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName};
use serde_json::{Map, Value as Json};

pub use compile::compile;
pub use extract::Location;
use jwks::Jwks;
use verify::{Failure, Parsed};

use crate::config::ResourceName;
use crate::policy::authz::Target;

/// Istio's default JWKS fetch timeout (`JWTRule.timeout`).
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// One `jwtRules` entry, ready to use.
#[derive(Clone, Debug)]
pub struct Rule {
    /// `namespace/name` of its RequestAuthentication.
    pub policy: Arc<str>,
    pub issuer: String,
    pub audiences: Vec<String>,
    pub keys: Keys,
    /// Where tokens of this rule are looked for (the defaults when none was written).
    pub locations: Vec<Location>,
    pub forward_original_token: bool,
    pub output_payload_to_header: Option<HeaderName>,
    pub output_claim_to_headers: Vec<(HeaderName, Vec<String>)>,
}

/// Where a rule's keys come from.
#[derive(Clone, Debug)]
pub enum Keys {
    Inline(Arc<Jwks>),
    Remote { uri: String, timeout: Duration },
}

/// The keys fetched from `jwksUri`s, by URI; `None` when a URI has none (yet).
pub trait RemoteKeys {
    fn get(&self, uri: &str) -> Option<Arc<Jwks>>;
}

/// The rules of one config, by what they apply to.
#[derive(Clone, Debug, Default)]
pub struct Authn {
    all: Vec<Arc<Rule>>,
    by_service: HashMap<String, HashMap<String, Vec<Arc<Rule>>>>,
    /// Rejected policies that cover every request / a namespace's requests.
    rejected_all: Vec<Arc<str>>,
    rejected_by_namespace: HashMap<String, Vec<Arc<str>>>,
}

/// What a valid token says, as AuthorizationPolicy reads it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Claims {
    /// `<iss>/<sub>`.
    pub principal: String,
    /// `aud`.
    pub audiences: Vec<String>,
    /// `azp`.
    pub presenter: Option<String>,
    pub payload: Map<String, Json>,
}

impl Claims {
    /// The claim at `path` (`[a][b]`: claim `b` inside claim `a`).
    pub fn get(&self, path: &[String]) -> Option<&Json> {
        let (first, rest) = path.split_first()?;
        let mut v = self.payload.get(first)?;
        for k in rest {
            v = v.get(k)?;
        }
        Some(v)
    }
}

/// A refused token: why, and the policy whose rule (or rejection) refused it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub failure: Failure,
    pub policy: Option<Arc<str>>,
}

/// A verified token and the request edits its rule asks for.
#[derive(Debug)]
pub struct Verified {
    pub claims: Claims,
    /// Headers to remove (the token's, unless `forwardOriginalToken`).
    pub remove: Vec<HeaderName>,
    /// Headers to set (`outputPayloadToHeader`, `outputClaimToHeaders`).
    pub set: Vec<(HeaderName, http::HeaderValue)>,
}

impl Authn {
    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
            && self.by_service.is_empty()
            && self.rejected_all.is_empty()
            && self.rejected_by_namespace.is_empty()
    }

    /// The keys (`namespace/name`) of the policies in force, rejected ones included (for
    /// `/config_dump`).
    pub fn keys(&self) -> Vec<String> {
        let mut k: Vec<String> = self
            .all
            .iter()
            .chain(self.by_service.values().flat_map(|m| m.values().flatten()))
            .map(|r| r.policy.to_string())
            .chain(
                self.rejected_all
                    .iter()
                    .chain(self.rejected_by_namespace.values().flatten())
                    .map(ToString::to_string),
            )
            .collect();
        k.sort();
        k.dedup();
        k
    }

    /// Every `jwksUri` in force, with the longest timeout a rule gives it.
    pub fn remote_uris(&self) -> HashMap<String, Duration> {
        let mut out: HashMap<String, Duration> = HashMap::new();
        let rules = self
            .all
            .iter()
            .chain(self.by_service.values().flat_map(|m| m.values().flatten()));
        for r in rules {
            if let Keys::Remote { uri, timeout } = &r.keys {
                let t = out.entry(uri.clone()).or_insert(*timeout);
                *t = (*t).max(*timeout);
            }
        }
        out
    }

    /// Fails closed for every RequestAuthentication among `rejected` (see the module doc).
    pub fn reject_all<'r>(
        &mut self,
        rejected: impl IntoIterator<Item = &'r ResourceName>,
        opts: &crate::route::CompileOptions,
    ) {
        for r in rejected {
            if r.kind == "RequestAuthentication" {
                self.reject(&r.namespace, &r.name, opts);
            }
        }
    }

    pub fn reject(&mut self, namespace: &str, name: &str, opts: &crate::route::CompileOptions) {
        let key: Arc<str> = format!("{namespace}/{name}").into();
        if namespace == opts.namespace || namespace == opts.root_namespace {
            self.rejected_all.push(key);
        } else {
            self.rejected_by_namespace
                .entry(namespace.to_owned())
                .or_default()
                .push(key);
        }
    }

    /// The rules for `target`, borrowed from the config (nothing collected per request).
    fn applying<'s>(&'s self, target: Target<'_>) -> impl Iterator<Item = &'s Rule> + Clone {
        let service = match target {
            Target::Service { namespace, name } => self
                .by_service
                .get(namespace)
                .and_then(|m| m.get(name))
                .map(Vec::as_slice),
            Target::Workload { .. } => None,
        };
        self.all
            .iter()
            .chain(service.into_iter().flatten())
            .map(|r| &**r)
    }

    fn rejected(&self, target: Target<'_>) -> Option<&Arc<str>> {
        let ns = match target {
            Target::Service { namespace, .. } | Target::Workload { namespace } => namespace,
        };
        self.rejected_all
            .iter()
            .chain(self.rejected_by_namespace.get(ns).into_iter().flatten())
            .next()
    }

    /// Checks the tokens of a request for `target` at `now` (seconds since the epoch):
    /// `Ok(None)` when it carries none, `Ok(Some)` when its token is valid.
    pub fn authenticate(
        &self,
        target: Target<'_>,
        headers: &HeaderMap,
        query: &str,
        remote: &dyn RemoteKeys,
        now: u64,
    ) -> Result<Option<Verified>, Refusal> {
        let rules = self.applying(target);
        if let Some(policy) = self.rejected(target) {
            let defaults = extract::defaults();
            let places = rules
                .clone()
                .flat_map(|r| r.locations.iter())
                .chain(defaults.iter());
            if places.into_iter().any(|l| l.find(headers, query).is_some()) {
                return Err(Refusal {
                    failure: Failure::PolicyRejected,
                    policy: Some(policy.clone()),
                });
            }
        }
        // Every place any rule reads, once; each token found must be valid (fail closed),
        // and the first gives the request its principal.
        let mut seen: Vec<&Location> = Vec::new();
        let mut verified: Option<Verified> = None;
        for loc in rules.clone().flat_map(|r| r.locations.iter()) {
            if seen.contains(&loc) {
                continue;
            }
            seen.push(loc);
            let Some(token) = loc.find(headers, query) else {
                continue;
            };
            let v = check(rules.clone(), loc, &token, remote, now)?;
            // A second token is checked too, and its header removed like the first's.
            if let Some(first) = &mut verified {
                first.remove.extend(v.remove);
            } else {
                verified = Some(v);
            }
        }
        Ok(verified)
    }

    /// Headers the rules for `target` write: removed from every request, so that only a
    /// verified token ever sets them (a header never stands in for a claim).
    pub fn output_headers<'s>(
        &'s self,
        target: Target<'_>,
    ) -> impl Iterator<Item = &'s HeaderName> {
        self.applying(target).flat_map(|r| {
            r.output_payload_to_header
                .iter()
                .chain(r.output_claim_to_headers.iter().map(|(h, _)| h))
        })
    }
}

/// One token found at `loc`, against the rule of its issuer that reads `loc`.
fn check<'r>(
    mut rules: impl Iterator<Item = &'r Rule>,
    loc: &Location,
    token: &str,
    remote: &dyn RemoteKeys,
    now: u64,
) -> Result<Verified, Refusal> {
    let refuse = |failure, policy: Option<&Arc<str>>| Refusal {
        failure,
        policy: policy.cloned(),
    };
    let parsed = Parsed::parse(token).map_err(|f| refuse(f, None))?;
    let Some(rule) = rules.find(|r| r.issuer == parsed.issuer() && r.locations.contains(loc))
    else {
        return Err(refuse(Failure::UnknownIssuer, None));
    };
    let policy = Some(&rule.policy);
    parsed.check_time(now).map_err(|f| refuse(f, policy))?;
    parsed
        .check_audience(&rule.audiences)
        .map_err(|f| refuse(f, policy))?;
    let keys = match &rule.keys {
        Keys::Inline(k) => k.clone(),
        Keys::Remote { uri, .. } => remote
            .get(uri)
            .ok_or_else(|| refuse(Failure::JwksUnavailable, policy))?,
    };
    parsed
        .check_signature(&keys)
        .map_err(|f| refuse(f, policy))?;
    let claims = claims(&parsed);
    let mut v = Verified {
        remove: Vec::new(),
        set: Vec::new(),
        claims,
    };
    if !rule.forward_original_token
        && let Location::Header { name, .. } = loc
    {
        v.remove.push(name.clone());
    }
    if let Some(h) = &rule.output_payload_to_header
        && let Ok(value) = http::HeaderValue::from_str(parsed.encoded_payload)
    {
        v.set.push((h.clone(), value));
    }
    for (h, path) in &rule.output_claim_to_headers {
        if let Some(value) = v.claims.get(path).and_then(claim_header_value) {
            v.set.push((h.clone(), value));
        }
    }
    Ok(v)
}

fn claims(parsed: &Parsed<'_>) -> Claims {
    let s = |k: &str| parsed.payload.get(k).and_then(Json::as_str);
    Claims {
        principal: format!("{}/{}", parsed.issuer(), s("sub").unwrap_or_default()),
        audiences: parsed.audiences(),
        presenter: s("azp").map(str::to_owned),
        payload: parsed.payload.clone(),
    }
}

/// A claim as a header value: strings, numbers and booleans (what Envoy copies).
fn claim_header_value(v: &Json) -> Option<http::HeaderValue> {
    let text = match v {
        Json::String(s) => s.clone(),
        Json::Number(n) => n.to_string(),
        Json::Bool(b) => b.to_string(),
        _ => return None,
    };
    http::HeaderValue::from_str(&text).ok()
}

#[cfg(test)]
mod tests;
