//! A workload (a pod, or anything else with an identity and addresses) as the data plane sees
//! it. Field meanings follow Istio's `istio.workload.Workload`; values are already validated
//! when a `Workload` exists, so nothing here can fail.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

use crate::identity::Identity;

/// The label that enrols a namespace (value `ambient`) or opts a workload out (value `none`).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";

/// How a workload accepts inbound traffic (Istio's `TunnelProtocol`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    /// Plain TCP: the workload is not behind a ztunnel that terminates HBONE.
    #[default]
    Tcp,
    /// HBONE on port 15008.
    Hbone,
}

/// Istio's `WorkloadStatus`: unhealthy workloads are not picked as service endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum HealthStatus {
    #[default]
    Healthy,
    Unhealthy,
}

/// A service key as Istio writes it: `<namespace>/<hostname>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamespacedHostname {
    pub namespace: String,
    pub hostname: String,
}

impl fmt::Display for NamespacedHostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.hostname)
    }
}

impl FromStr for NamespacedHostname {
    type Err = ();

    /// Both halves must be non-empty; the hostname may not contain another `/`.
    fn from_str(s: &str) -> Result<Self, ()> {
        match s.split_once('/') {
            Some((ns, host)) if !ns.is_empty() && !host.is_empty() && !host.contains('/') => {
                Ok(NamespacedHostname {
                    namespace: ns.to_owned(),
                    hostname: host.to_owned(),
                })
            }
            _ => Err(()),
        }
    }
}

/// Where a waypoint is reached (Istio's `GatewayAddress`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GatewayAddress {
    pub destination: GatewayDestination,
    /// HBONE port of the waypoint, normally 15008.
    pub hbone_mtls_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum GatewayDestination {
    Address(IpAddr),
    Hostname(NamespacedHostname),
}

/// One workload. Build it with [`Workload::new`] then set the public fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Unique across the mesh, e.g. `Kubernetes//v1/Pod/default/echo-1`.
    pub uid: String,
    pub name: String,
    pub workload_ips: Vec<IpAddr>,
    pub protocol: Protocol,
    pub status: HealthStatus,
    /// The node whose ztunnel acts for this workload.
    pub node: String,
    pub cluster_id: String,
    /// Services this workload is an endpoint of: service port -> target port on this workload.
    pub services: BTreeMap<NamespacedHostname, BTreeMap<u16, u16>>,
    /// Pod labels; includes `app`/`version` derived from Istio's canonical name and revision
    /// when the source gave those and did not set the labels itself.
    pub labels: BTreeMap<String, String>,
    /// Policies selecting this workload (scope `WorkloadSelector`), as `namespace/name`.
    pub authorization_policies: Vec<String>,
    pub waypoint: Option<GatewayAddress>,
    /// Where the pod's network namespace is (local mode: `/var/run/netns/<name>`).
    pub netns: Option<PathBuf>,
    identity: Identity,
}

impl Workload {
    /// A workload with the given identity and defaults elsewhere: TCP, healthy, no addresses.
    /// The namespace of the workload is the namespace of its identity.
    pub fn new(uid: impl Into<String>, name: impl Into<String>, identity: Identity) -> Self {
        Workload {
            uid: uid.into(),
            name: name.into(),
            workload_ips: Vec::new(),
            protocol: Protocol::Tcp,
            status: HealthStatus::Healthy,
            node: String::new(),
            cluster_id: "Kubernetes".to_owned(),
            services: BTreeMap::new(),
            labels: BTreeMap::new(),
            authorization_policies: Vec::new(),
            waypoint: None,
            netns: None,
            identity,
        }
    }

    /// The SPIFFE identity the workload's certificate carries.
    pub fn identity(&self) -> Identity {
        self.identity.clone()
    }

    pub fn identity_ref(&self) -> &Identity {
        &self.identity
    }

    pub fn namespace(&self) -> &str {
        self.identity.namespace()
    }

    pub fn service_account(&self) -> &str {
        self.identity.service_account()
    }

    pub fn trust_domain(&self) -> &str {
        self.identity.trust_domain()
    }

    /// True when the workload's own labels opt it out of the mesh.
    pub fn opted_out(&self) -> bool {
        self.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) == Some("none")
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} (uid {})", self.namespace(), self.name, self.uid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaced_hostname_parses_only_two_non_empty_halves() {
        let nh: NamespacedHostname = "default/echo.default.svc.cluster.local".parse().unwrap();
        assert_eq!(nh.namespace, "default");
        assert_eq!(nh.hostname, "echo.default.svc.cluster.local");
        assert_eq!(nh.to_string(), "default/echo.default.svc.cluster.local");
        for bad in ["", "default", "/x", "x/", "a/b/c"] {
            assert!(
                bad.parse::<NamespacedHostname>().is_err(),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn identity_and_opt_out() {
        let id = Identity::new("cluster.local", "default", "sleep").unwrap();
        let mut w = Workload::new("uid-1", "sleep", id);
        assert_eq!(
            w.identity().to_string(),
            "spiffe://cluster.local/ns/default/sa/sleep"
        );
        assert_eq!(w.namespace(), "default");
        assert!(!w.opted_out());
        w.labels
            .insert(DATAPLANE_MODE_LABEL.to_owned(), "none".to_owned());
        assert!(w.opted_out());
    }
}
