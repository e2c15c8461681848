//! The xDS client's memory, without I/O: the resources accepted so far (with their versions),
//! how a `DeltaDiscoveryResponse` changes them, what to answer (ACK or NACK), and the `State`
//! they make. The stream driver in `client` only moves messages between this and the wire.
//!
//! Rules kept here (Envoy's delta xDS protocol, as istiod speaks it):
//! - a resource that cannot be decoded or converted is rejected by name and its previous
//!   version, if any, stays in force; the others in the same response are applied; the answer
//!   is a NACK whose `error_detail` lists every rejected resource;
//! - `removed_resources` drop resources by name (unknown names are ignored);
//! - the versions remembered are those of accepted resources: they are what the client sends
//!   as `initial_resource_versions` when it reconnects.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use prost::Message as _;

use super::convert::{self, AddressResource, ConvertError};
use crate::proto::envoy::config::core::v3::Node;
use crate::proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use crate::proto::google::rpc::Status;
use crate::proto::istio::security as pbs;
use crate::proto::istio::workload as pbw;
use crate::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use crate::state::{Authorization, State};

/// The resource types this client subscribes to, in the order it subscribes.
pub const TYPE_URLS: [&str; 2] = [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL];

/// `google.rpc.Code` INVALID_ARGUMENT, the code of a NACK's `error_detail`.
const INVALID_ARGUMENT: i32 = 3;

#[derive(Debug, Clone)]
struct Entry<T> {
    version: String,
    value: T,
}

/// What applying one response did.
#[derive(Debug)]
pub struct Applied {
    /// True when the accepted resources changed: a new `State` should be published.
    pub changed: bool,
    /// The resources rejected, each with its problems; empty means ACK.
    pub rejected: Vec<ConvertError>,
    /// The ACK or NACK to send.
    pub reply: DeltaDiscoveryRequest,
}

/// Accepted resources by type and name.
#[derive(Debug, Default)]
pub struct Store {
    trust_domain: String,
    addresses: BTreeMap<String, Entry<AddressResource>>,
    policies: BTreeMap<String, Entry<Authorization>>,
    /// Types that have had at least one response (the first full push).
    synced: Vec<String>,
    /// Where this node's pods' network namespaces are, when not discovered (see
    /// [`Store::with_netns_dir`]).
    netns_dir: Option<(String, PathBuf)>,
}

impl Store {
    /// `trust_domain` fills in a workload's elided trust domain.
    pub fn new(trust_domain: impl Into<String>) -> Self {
        Store {
            trust_domain: trust_domain.into(),
            ..Store::default()
        }
    }

    /// Gives the workloads of `node` a network namespace at `<dir>/<namespace>.<name>`.
    ///
    /// The workload API carries no namespace path: in Kubernetes the agent finds each pod's
    /// namespace through `/proc` (not built yet). This is the stand-in for machines where
    /// something else creates the namespaces (the local test harness, `ip netns`): it links
    /// or mounts them under these names. Only the path is computed here; whether it exists
    /// is found out when the pod is enrolled.
    pub fn with_netns_dir(mut self, node: impl Into<String>, dir: impl Into<PathBuf>) -> Self {
        self.netns_dir = Some((node.into(), dir.into()));
        self
    }

    /// The first request for `type_url` on a new stream: a wildcard subscription, with the
    /// versions already held so the server can send only what changed.
    pub fn initial_request(&self, type_url: &str, node: Option<Node>) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            node,
            type_url: type_url.to_owned(),
            initial_resource_versions: self.versions(type_url),
            ..DeltaDiscoveryRequest::default()
        }
    }

    /// The versions of the accepted resources of `type_url`, by name.
    pub fn versions(&self, type_url: &str) -> HashMap<String, String> {
        fn collect<T>(m: &BTreeMap<String, Entry<T>>) -> HashMap<String, String> {
            m.iter()
                .map(|(name, e)| (name.clone(), e.version.clone()))
                .collect()
        }
        match type_url {
            ADDRESS_TYPE_URL => collect(&self.addresses),
            AUTHORIZATION_TYPE_URL => collect(&self.policies),
            _ => HashMap::new(),
        }
    }

    /// True once every subscribed type has had a response.
    pub fn synced(&self) -> bool {
        TYPE_URLS.iter().all(|t| self.synced.iter().any(|s| s == t))
    }

    /// The subscribed types that have not had a response yet.
    fn unanswered(&self) -> Vec<&'static str> {
        TYPE_URLS
            .into_iter()
            .filter(|t| !self.synced.iter().any(|s| s == t))
            .collect()
    }

    /// Applies `resp` and says what to answer.
    pub fn apply(&mut self, resp: DeltaDiscoveryResponse) -> Applied {
        let was_synced = self.synced();
        let type_url = resp.type_url.clone();
        let nonce = resp.nonce.clone();
        let (changed, rejected) = match type_url.as_str() {
            ADDRESS_TYPE_URL => {
                let td = self.trust_domain.clone();
                apply_typed(&mut self.addresses, resp, |name, bytes| {
                    let pb = pbw::Address::decode(bytes).map_err(|e| decode_error(name, e))?;
                    convert::address(name, pb, &td)
                })
            }
            AUTHORIZATION_TYPE_URL => apply_typed(&mut self.policies, resp, |name, bytes| {
                let pb = pbs::Authorization::decode(bytes).map_err(|e| decode_error(name, e))?;
                convert::authorization(pb)
            }),
            other => (
                false,
                vec![ConvertError {
                    resource: format!("response of type {other:?}"),
                    problems: vec!["type_url: not a type this client subscribed to".to_owned()],
                }],
            ),
        };
        if TYPE_URLS.contains(&type_url.as_str()) && !self.synced.contains(&type_url) {
            self.synced.push(type_url.clone());
        }
        // The response that completes the first sync makes a new state even when it carried
        // nothing (no policies at all): that state is the first complete one.
        let changed = changed || (!was_synced && self.synced());
        let error_detail = (!rejected.is_empty()).then(|| Status {
            code: INVALID_ARGUMENT,
            message: rejected
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n"),
            details: Vec::new(),
        });
        Applied {
            changed,
            rejected,
            reply: DeltaDiscoveryRequest {
                type_url,
                response_nonce: nonce,
                error_detail,
                ..DeltaDiscoveryRequest::default()
            },
        }
    }

    /// The `State` the accepted resources make. Resources that collide with an earlier one
    /// (an IP address reused before the old pod's removal arrived, say) are left out and
    /// returned as messages; the next update usually resolves them. Until every subscribed
    /// type has been answered the state is marked incomplete ([`State::incomplete`]).
    pub fn state(&self) -> (State, Vec<String>) {
        let mut b = State::builder();
        b.capture_by_protocol(true);
        let unanswered = self.unanswered();
        if !unanswered.is_empty() {
            b.incomplete(waiting_for(&unanswered));
        }
        let mut dropped = Vec::new();
        for (name, e) in &self.policies {
            if let Err(err) = b.policy(e.value.clone()) {
                dropped.push(format!("policy {name:?}: {err}"));
            }
        }
        // Services first: a VIP wins over a workload address, as in Istio.
        for (name, e) in &self.addresses {
            if let AddressResource::Service(s) = &e.value
                && let Err(err) = b.service(s.clone())
            {
                dropped.push(format!("service {name:?}: {err}"));
            }
        }
        for (name, e) in &self.addresses {
            let AddressResource::Workload(w) = &e.value else {
                continue;
            };
            let mut w = w.clone();
            if let Some((node, dir)) = &self.netns_dir
                && w.node == *node
            {
                w.netns = Some(dir.join(format!("{}.{}", w.namespace(), w.name)));
            }
            if let Err(err) = b.workload(w) {
                dropped.push(format!("workload {name:?}: {err}"));
            }
        }
        (b.build(), dropped)
    }
}

/// Why a state is incomplete while `unanswered` types have had no response (all of them:
/// the control plane has not answered at all).
pub fn waiting_for(unanswered: &[&str]) -> String {
    let short: Vec<&str> = unanswered
        .iter()
        .map(|t| t.rsplit('/').next().unwrap_or(t))
        .collect();
    format!(
        "waiting for the first xDS sync (no response yet for {})",
        short.join(", ")
    )
}

fn decode_error(name: &str, e: prost::DecodeError) -> ConvertError {
    ConvertError {
        resource: format!("resource {name:?}"),
        problems: vec![format!("resource: cannot decode: {e}")],
    }
}

/// Applies the additions and removals of one response to one type's map.
fn apply_typed<T: PartialEq>(
    map: &mut BTreeMap<String, Entry<T>>,
    resp: DeltaDiscoveryResponse,
    convert: impl Fn(&str, &[u8]) -> Result<T, ConvertError>,
) -> (bool, Vec<ConvertError>) {
    let mut changed = false;
    let mut rejected = Vec::new();
    for r in resp.resources {
        // A resource without a body is a TTL heartbeat: nothing to change.
        let Some(any) = r.resource else { continue };
        if any.type_url != resp.type_url {
            rejected.push(ConvertError {
                resource: format!("resource {:?}", r.name),
                problems: vec![format!(
                    "resource.type_url: {:?} in a response of type {:?}",
                    any.type_url, resp.type_url
                )],
            });
            continue;
        }
        match convert(&r.name, &any.value) {
            Ok(value) => {
                changed |= map.get(&r.name).is_none_or(|e| e.value != value);
                map.insert(
                    r.name,
                    Entry {
                        version: r.version,
                        value,
                    },
                );
            }
            Err(e) => rejected.push(e),
        }
    }
    for name in resp.removed_resources {
        changed |= map.remove(&name).is_some();
    }
    (changed, rejected)
}

#[cfg(test)]
mod tests;
