//! The compiled route table: per service host, an ordered list of routes, each with its
//! conditions and a shared target (action and policy). Immutable once built; a new config
//! builds a new table, which the server swaps in whole.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::config::ResourceName;
use crate::policy::fault::Fault;
use crate::policy::headers::HeaderOps;
use crate::policy::redirect::{Redirect, Rewrite};
use crate::policy::retry::RetryPolicy;
use crate::policy::{Fraction, scale};

use super::index::PathIndex;
use super::matcher::RouteMatch;
use super::request::Request;

/// Endpoints of a subset: those whose labels include all of these. `labels: None` names a
/// subset no DestinationRule defines; it has no endpoints (requests to it answer 503).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubsetSelector {
    pub name: String,
    pub labels: Option<crate::config::istio::common::Labels>,
}

impl SubsetSelector {
    /// Whether an endpoint with `labels` belongs to the subset.
    pub fn selects(&self, labels: &crate::config::istio::common::Labels) -> bool {
        self.labels
            .as_ref()
            .is_some_and(|want| want.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }
}

/// Where a share of a route's traffic goes.
#[derive(Clone, Debug, PartialEq)]
pub struct Backend {
    /// Fully qualified service host (`reviews.bookinfo.svc.cluster.local`). Empty for a
    /// backend that cannot be used (`invalid` says why).
    pub host: Arc<str>,
    /// Absent: the port the request came in on.
    pub port: Option<u16>,
    pub subset: Option<Arc<SubsetSelector>>,
    pub weight: u32,
    /// Edits for requests sent to, and responses from, this backend (after the route's).
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    /// A Gateway API backend that cannot be resolved: its share of requests answers 500.
    pub invalid: Option<&'static str>,
}

/// The weighted backends of a route: each gets `weight / sum`.
#[derive(Clone, Debug, PartialEq)]
pub struct Backends {
    list: Box<[Backend]>,
    /// Running sums of the weights, for a binary search.
    cumulative: Box<[u64]>,
}

impl Backends {
    /// `None` when no backend has a weight above 0.
    pub fn new(list: Vec<Backend>) -> Option<Backends> {
        let mut sum = 0u64;
        let cumulative: Vec<u64> = list
            .iter()
            .map(|b| {
                sum += u64::from(b.weight);
                sum
            })
            .collect();
        (sum > 0).then(|| Backends {
            list: list.into(),
            cumulative: cumulative.into(),
        })
    }

    pub fn all(&self) -> &[Backend] {
        &self.list
    }

    pub fn total_weight(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }

    /// The backend for a uniform random `u64`: backend `i` is chosen for a share
    /// `weight_i / sum` of the random range.
    #[inline]
    pub fn pick(&self, random: u64) -> &Backend {
        if self.list.len() == 1 {
            return &self.list[0];
        }
        let point = scale(random, self.total_weight());
        let i = self.cumulative.partition_point(|c| *c <= point);
        &self.list[i.min(self.list.len() - 1)]
    }
}

/// A copy of the request sent, fire and forget, to another service.
#[derive(Clone, Debug, PartialEq)]
pub struct Mirror {
    pub host: Arc<str>,
    pub port: Option<u16>,
    pub subset: Option<Arc<SubsetSelector>>,
    pub fraction: Fraction,
}

pub use crate::policy::cors::Cors;

/// What a matched route does.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Forward(Backends),
    Redirect(Redirect),
    Direct {
        status: u16,
        body: Arc<[u8]>,
    },
    /// The route cannot be served (no usable backend, a filter not implemented): answer
    /// `status` (500 in Gateway API's rules), never forward.
    Fail {
        status: u16,
        reason: &'static str,
    },
}

/// Per-route policy, as data.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Policy {
    /// Bounds all attempts and backoff. `None`: no timeout.
    pub timeout: Option<Duration>,
    /// `None`: no retries at all.
    pub retry: Option<RetryPolicy>,
    pub fault: Option<Fault>,
    pub mirrors: Box<[Mirror]>,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    pub rewrite: Option<Rewrite>,
    pub cors: Option<Arc<Cors>>,
}

/// Which rule of which resource a route came from (for logs, metrics and conflicts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteId {
    pub resource: ResourceName,
    pub rule: usize,
    pub name: Option<String>,
}

/// What a route leads to, shared by all its match blocks.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub id: RouteId,
    pub action: Action,
    pub policy: Policy,
}

/// One route: any of its blocks may match (none: every request matches).
#[derive(Clone, Debug)]
pub struct Route {
    pub matches: Box<[RouteMatch]>,
    pub target: Arc<Target>,
}

impl Route {
    #[inline]
    fn matches(&self, req: &Request<'_>) -> Option<Option<usize>> {
        if self.matches.is_empty() {
            return Some(None);
        }
        self.matches.iter().find_map(|m| m.matches(req))
    }
}

/// Which API a service's routes came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteSource {
    VirtualService,
    HttpRoute,
}

/// The routes of one service, in the order they are tried.
#[derive(Clone, Debug)]
pub struct ServiceRoutes {
    pub routes: Box<[Route]>,
    pub source: RouteSource,
    /// For long route lists: which routes a path can match at all.
    index: Option<PathIndex>,
}

/// The result of routing one request.
#[derive(Clone, Copy, Debug)]
pub enum Decision<'t> {
    Matched {
        target: &'t Target,
        /// Length of the path prefix the route matched, if it matched a prefix (prefix
        /// rewrites replace it; after an exact or regex match they replace the whole path).
        matched_prefix: Option<usize>,
    },
    /// The service has routes but none matched: 404.
    NotFound,
    /// No route config for this service at all: proxy to its endpoints as they are.
    NoRoutes,
}

/// All compiled routes, by service host.
#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    pub(crate) exact: HashMap<Box<str>, ServiceRoutes>,
    /// `*.suffix` hosts (stored as `.suffix`), longest first.
    pub(crate) wildcard: Vec<(Box<str>, ServiceRoutes)>,
    /// The AuthorizationPolicies that apply here (compiled with the routes: one config).
    pub authz: crate::policy::authz::Authz,
    /// The RequestAuthentication rules that apply here.
    pub authn: crate::policy::jwt::Authn,
}

impl RouteTable {
    /// The routes for a fully qualified service host: the exact host, else the longest
    /// wildcard that covers it.
    pub fn service(&self, host: &str) -> Option<&ServiceRoutes> {
        self.exact.get(host).or_else(|| {
            self.wildcard
                .iter()
                .find(|(suffix, _)| suffix.is_empty() || host.ends_with(&**suffix))
                .map(|(_, r)| r)
        })
    }

    /// Routes `req`, addressed to the service `host`: the first route that matches.
    #[inline]
    pub fn decide<'t>(&'t self, host: &str, req: &Request<'_>) -> Decision<'t> {
        let Some(service) = self.service(host) else {
            return Decision::NoRoutes;
        };
        service.decide(req)
    }

    /// Every host with routes (exact and wildcard, wildcards as `*.suffix`).
    pub fn hosts(&self) -> Vec<String> {
        let mut h: Vec<String> = self.exact.keys().map(|k| k.to_string()).collect();
        h.extend(self.wildcard.iter().map(|(s, _)| format!("*{s}")));
        h.sort();
        h
    }
}

impl ServiceRoutes {
    pub fn new(routes: Vec<Route>, source: RouteSource) -> ServiceRoutes {
        let index = (routes.len() >= super::index::MIN_ROUTES).then(|| PathIndex::build(&routes));
        ServiceRoutes {
            routes: routes.into(),
            source,
            index,
        }
    }

    #[inline]
    pub fn decide(&self, req: &Request<'_>) -> Decision<'_> {
        if let Some(ix) = &self.index {
            let found = ix.first(req.path, |i| {
                let r = &self.routes[i];
                r.matches(req).map(|matched_prefix| Decision::Matched {
                    target: &r.target,
                    matched_prefix,
                })
            });
            match found {
                Ok(Some(d)) => return d,
                Ok(None) => return Decision::NotFound,
                Err(()) => {}
            }
        }
        self.scan(req)
    }

    /// Tries every route in order.
    pub fn scan(&self, req: &Request<'_>) -> Decision<'_> {
        for r in &self.routes {
            if let Some(matched_prefix) = r.matches(req) {
                return Decision::Matched {
                    target: &r.target,
                    matched_prefix,
                };
            }
        }
        Decision::NotFound
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(host: &str, weight: u32) -> Backend {
        Backend {
            host: host.into(),
            port: None,
            subset: None,
            weight,
            request_headers: HeaderOps::default(),
            response_headers: HeaderOps::default(),
            invalid: None,
        }
    }

    #[test]
    fn weighted_pick_gives_weight_over_sum() {
        let b = Backends::new(vec![backend("v1", 90), backend("v2", 10)]).expect("weights");
        assert_eq!(b.total_weight(), 100);
        // Walk the random range in 10,000 even steps: exactly 9,000 land on v1.
        let steps = 10_000u64;
        let step = u64::MAX / steps;
        let v1 = (0..steps)
            .filter(|i| &*b.pick(i * step + step / 2).host == "v1")
            .count();
        assert_eq!(v1, 9_000);
        assert_eq!(&*b.pick(0).host, "v1");
        assert_eq!(&*b.pick(u64::MAX).host, "v2");
    }

    #[test]
    fn weights_need_not_sum_to_100_and_zero_gets_nothing() {
        let b = Backends::new(vec![backend("a", 1), backend("b", 0), backend("c", 3)])
            .expect("weights");
        let steps = 4_000u64;
        let step = u64::MAX / steps;
        let mut counts = HashMap::new();
        for i in 0..steps {
            *counts
                .entry(b.pick(i * step + step / 2).host.to_string())
                .or_insert(0) += 1;
        }
        assert_eq!(counts.get("a"), Some(&1_000));
        assert_eq!(counts.get("b"), None);
        assert_eq!(counts.get("c"), Some(&3_000));
        assert!(Backends::new(vec![backend("a", 0)]).is_none());
        assert!(Backends::new(vec![]).is_none());
    }

    #[test]
    fn subsets_select_by_labels() {
        let mut want = crate::config::istio::common::Labels::new();
        want.insert("version".into(), "v2".into());
        let s = SubsetSelector {
            name: "v2".into(),
            labels: Some(want.clone()),
        };
        let mut pod = want.clone();
        pod.insert("app".into(), "reviews".into());
        assert!(s.selects(&pod));
        pod.insert("version".into(), "v1".into());
        assert!(!s.selects(&pod));
        let undefined = SubsetSelector {
            name: "v3".into(),
            labels: None,
        };
        assert!(!undefined.selects(&want));
    }
}
