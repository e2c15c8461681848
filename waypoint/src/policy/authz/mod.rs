//! L7 `AuthorizationPolicy` at the waypoint: which policies apply to a request, and the
//! verdict, as Istio gives it for waypoints.
//!
//! Which apply (`compile`, once per config): a policy applies here only through `targetRefs`
//! (Istio ignores a workload `selector` at a waypoint, and leaves policies without either to
//! ztunnel): to the waypoint's own Gateway (every request through it), to the GatewayClass
//! `istio-waypoint` from the root namespace (every waypoint), or to a Service of the
//! policy's namespace (the requests for it). What is not applied is reported.
//!
//! Paths are judged normalized (`path`: dot segments resolved, as Envoy does under Istio's
//! default), so `/public/../admin` is `/admin` to a policy.
//!
//! The verdict (`Authz::decide`, per request, no I/O): CUSTOM first — external
//! authorization is not implemented, so a request a CUSTOM policy selects is denied (fail
//! closed) —, then DENY, then ALLOW: if any ALLOW policy applies, one must match. AUDIT
//! policies change nothing (audit logging is not implemented; reported).
//!
//! A policy that cannot be read must not leave a gap: when one is rejected (and the
//! resources in force are kept without it: the Kubernetes API, or the first load of the
//! files), every request it could have applied to is denied — those for its namespace's
//! services, or every request when it is in the waypoint's or the root namespace.

mod compile;
mod eval;
pub mod path;

use std::collections::HashMap;
use std::sync::Arc;

pub use compile::compile;
pub use eval::{Attributes, HttpAttributes};

use crate::config::ResourceName;
use crate::config::security::authorization_policy::{Action, Rule};

/// One policy that applies here, ready to match.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// `namespace/name`, as logs and metrics name it.
    pub key: Arc<str>,
    pub action: Action,
    pub rules: Vec<Rule>,
    /// A stand-in for a policy that was rejected: it denies every request it covers.
    pub rejected: bool,
}

/// The policies of one config, by what they apply to.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Authz {
    /// Every request through the waypoint.
    all: Vec<Arc<Policy>>,
    /// The requests for any service of a namespace (rejected policies only).
    by_namespace: HashMap<String, Vec<Arc<Policy>>>,
    /// The requests for one service, by namespace, then name.
    by_service: HashMap<String, HashMap<String, Vec<Arc<Policy>>>>,
}

/// The verdict on a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny {
        /// `namespace/name` of the policy that denied; `None` when ALLOW policies apply and
        /// none matched.
        policy: Option<Arc<str>>,
        reason: DenyReason,
    },
}

/// Why a request was denied (the `reason` label of the denial counter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenyReason {
    DenyMatched,
    NoAllowMatched,
    /// A CUSTOM policy selected it (external authorization is not implemented).
    CustomNotImplemented,
    /// A policy that could have applied was rejected.
    PolicyRejected,
}

impl Verdict {
    pub fn is_allow(&self) -> bool {
        *self == Verdict::Allow
    }
}

impl DenyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::DenyMatched => "deny_matched",
            DenyReason::NoAllowMatched => "no_allow_matched",
            DenyReason::CustomNotImplemented => "custom_not_implemented",
            DenyReason::PolicyRejected => "policy_rejected",
        }
    }
}

/// What a request was addressed to, as far as policy selection goes.
#[derive(Clone, Copy, Debug)]
pub enum Target<'a> {
    /// A service, by namespace and name.
    Service { namespace: &'a str, name: &'a str },
    /// A workload addressed directly, by its namespace.
    Workload { namespace: &'a str },
}

impl Authz {
    /// Whether no policy applies anywhere (the common case: nothing to evaluate).
    pub fn is_empty(&self) -> bool {
        self.all.is_empty() && self.by_namespace.is_empty() && self.by_service.is_empty()
    }

    pub(crate) fn add_all(&mut self, p: Arc<Policy>) {
        self.all.push(p);
    }

    pub(crate) fn add_service(&mut self, namespace: &str, name: &str, p: Arc<Policy>) {
        self.by_service
            .entry(namespace.to_owned())
            .or_default()
            .entry(name.to_owned())
            .or_default()
            .push(p);
    }

    /// Fails closed for every AuthorizationPolicy among `rejected` (resources refused and
    /// left out of the config in force).
    pub fn reject_all<'r>(
        &mut self,
        rejected: impl IntoIterator<Item = &'r ResourceName>,
        opts: &crate::route::CompileOptions,
    ) {
        for r in rejected {
            if r.kind == "AuthorizationPolicy" {
                self.reject(&r.namespace, &r.name, opts);
            }
        }
    }

    /// Fails closed for a policy that was rejected: denies what it could have applied to.
    pub fn reject(&mut self, namespace: &str, name: &str, opts: &crate::route::CompileOptions) {
        let p = Arc::new(Policy {
            key: format!("{namespace}/{name}").into(),
            action: Action::Deny,
            rules: vec![Rule::default()],
            rejected: true,
        });
        if namespace == opts.namespace || namespace == opts.root_namespace {
            self.all.push(p);
        } else {
            self.by_namespace
                .entry(namespace.to_owned())
                .or_default()
                .push(p);
        }
    }

    /// The keys of the policies in force (for `/config_dump`).
    pub fn keys(&self) -> Vec<String> {
        let mut k: Vec<String> = self
            .all
            .iter()
            .chain(self.by_namespace.values().flatten())
            .chain(self.by_service.values().flat_map(|m| m.values().flatten()))
            .map(|p| p.key.to_string())
            .collect();
        k.sort();
        k.dedup();
        k
    }

    /// The policies that apply to a request for `target`.
    fn applying<'s>(&'s self, target: Target<'_>) -> impl Iterator<Item = &'s Policy> + Clone {
        let ns = match target {
            Target::Service { namespace, .. } | Target::Workload { namespace } => namespace,
        };
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
            .chain(self.by_namespace.get(ns).into_iter().flatten())
            .chain(service.into_iter().flatten())
            .map(|p| &**p)
    }

    /// The verdict on a request for `target` with attributes `a`.
    pub fn decide(&self, target: Target<'_>, a: &Attributes<'_>) -> Verdict {
        if self.is_empty() {
            return Verdict::Allow;
        }
        let policies = self.applying(target);
        let matches = |p: &Policy| {
            let m = eval::Matcher {
                a,
                unseen: p.action != Action::Allow,
            };
            p.rules.iter().any(|r| m.rule(r))
        };
        for (action, reason) in [
            (Action::Custom, DenyReason::CustomNotImplemented),
            (Action::Deny, DenyReason::DenyMatched),
        ] {
            if let Some(p) = policies.clone().find(|p| p.action == action && matches(p)) {
                return Verdict::Deny {
                    policy: Some(p.key.clone()),
                    reason: if p.rejected {
                        DenyReason::PolicyRejected
                    } else {
                        reason
                    },
                };
            }
        }
        let mut allows = policies.filter(|p| p.action == Action::Allow).peekable();
        if allows.peek().is_none() || allows.any(matches) {
            Verdict::Allow
        } else {
            Verdict::Deny {
                policy: None,
                reason: DenyReason::NoAllowMatched,
            }
        }
    }
}

#[cfg(test)]
mod tests;
