//! The local config file's shape, as serde reads it: Istio's field names (camelCase), loosely
//! typed (addresses and ports as text) so that `convert` can say which value is wrong.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::de::IgnoredAny;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) workloads: Vec<RawWorkload>,
    #[serde(default)]
    pub(super) services: Vec<RawService>,
    #[serde(default)]
    pub(super) policies: Vec<RawPolicy>,
    /// Extension: namespaces and their labels.
    #[serde(default)]
    pub(super) namespaces: Vec<RawNamespace>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawNamespace {
    pub(super) name: String,
    #[serde(default)]
    pub(super) labels: BTreeMap<String, String>,
}

// The Istio fields accepted and not used are never read.
#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawWorkload {
    #[serde(default)]
    pub(super) uid: String,
    #[serde(default)]
    pub(super) name: String,
    #[serde(default)]
    pub(super) namespace: String,
    #[serde(default)]
    pub(super) service_account: String,
    #[serde(default)]
    pub(super) trust_domain: String,
    #[serde(default)]
    pub(super) workload_ips: Vec<String>,
    #[serde(default)]
    pub(super) protocol: Option<String>,
    #[serde(default)]
    pub(super) status: Option<String>,
    #[serde(default)]
    pub(super) node: String,
    #[serde(default)]
    pub(super) cluster_id: String,
    #[serde(default)]
    pub(super) canonical_name: String,
    #[serde(default)]
    pub(super) canonical_revision: String,
    /// `namespace/hostname` -> { service port: target port }. Ports are read as text so a bad
    /// one is reported with its service and port.
    #[serde(default)]
    pub(super) services: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    pub(super) authorization_policies: Vec<String>,
    #[serde(default)]
    pub(super) waypoint: Option<RawGatewayAddress>,
    /// Extension: pod labels.
    #[serde(default)]
    pub(super) labels: BTreeMap<String, String>,
    /// Extension: the pod's network namespace, e.g. `/var/run/netns/echo-1`.
    #[serde(default)]
    pub(super) netns: Option<String>,

    // Istio fields accepted and not used (yet).
    #[serde(default)]
    pub(super) network: Option<IgnoredAny>,
    #[serde(default)]
    pub(super) network_mode: Option<IgnoredAny>,
    #[serde(default)]
    pub(super) network_gateway: Option<IgnoredAny>,
    #[serde(default)]
    pub(super) workload_name: Option<IgnoredAny>,
    #[serde(default)]
    pub(super) workload_type: Option<IgnoredAny>,
    #[serde(default)]
    pub(super) hostname: Option<IgnoredAny>,
    #[serde(default)]
    pub(super) native_tunnel: Option<IgnoredAny>,
    #[serde(default)]
    pub(super) application_tunnel: Option<IgnoredAny>,
    #[serde(default)]
    pub(super) locality: Option<IgnoredAny>,
    #[serde(default)]
    pub(super) capacity: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawGatewayAddress {
    /// `network/ip` or `namespace/hostname`, as Istio writes it.
    pub(super) destination: String,
    pub(super) hbone_mtls_port: u16,
}

// The Istio fields accepted and not used are never read.
#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawService {
    #[serde(default)]
    pub(super) name: String,
    #[serde(default)]
    pub(super) namespace: String,
    #[serde(default)]
    pub(super) hostname: String,
    /// `network/ip` (Istio's form, network may be empty: `/10.96.0.10`) or a bare IP.
    #[serde(default)]
    pub(super) vips: Vec<String>,
    #[serde(default)]
    pub(super) ports: BTreeMap<String, String>,
    #[serde(default)]
    pub(super) subject_alt_names: Vec<String>,
    #[serde(default)]
    pub(super) waypoint: Option<RawGatewayAddress>,
    /// Extension: service labels (`istio.io/use-waypoint`, `istio.io/use-waypoint-namespace`).
    #[serde(default)]
    pub(super) labels: BTreeMap<String, String>,
    /// Extension: service port -> application protocol (Istio's `appProtocol` or port-name
    /// prefix: `http`, `http2`, `grpc`, `tcp`, ...).
    #[serde(default)]
    pub(super) app_protocols: BTreeMap<String, String>,

    // Istio fields accepted and not used (yet).
    #[serde(default)]
    pub(super) canonical: Option<IgnoredAny>,
    #[serde(default)]
    pub(super) cidr_vips: Option<IgnoredAny>,
    #[serde(default)]
    pub(super) endpoints: Option<IgnoredAny>,
    #[serde(default)]
    pub(super) load_balancer: Option<IgnoredAny>,
    #[serde(default)]
    pub(super) ip_families: Option<IgnoredAny>,
    #[serde(default)]
    pub(super) weighted_waypoints: Option<IgnoredAny>,
    #[serde(default)]
    pub(super) visibility: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawPolicy {
    #[serde(default)]
    pub(super) name: String,
    #[serde(default)]
    pub(super) namespace: String,
    #[serde(default)]
    pub(super) scope: String,
    #[serde(default)]
    pub(super) action: String,
    /// rules -> clauses -> matches.
    #[serde(default)]
    pub(super) rules: Vec<Vec<Vec<RawMatch>>>,
    #[serde(default)]
    pub(super) dry_run: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawMatch {
    #[serde(default)]
    pub(super) namespaces: Vec<RawStringMatch>,
    #[serde(default)]
    pub(super) not_namespaces: Vec<RawStringMatch>,
    #[serde(default)]
    pub(super) service_accounts: Vec<RawServiceAccountMatch>,
    #[serde(default)]
    pub(super) not_service_accounts: Vec<RawServiceAccountMatch>,
    #[serde(default)]
    pub(super) principals: Vec<RawStringMatch>,
    #[serde(default)]
    pub(super) not_principals: Vec<RawStringMatch>,
    #[serde(default)]
    pub(super) source_ips: Vec<String>,
    #[serde(default)]
    pub(super) not_source_ips: Vec<String>,
    #[serde(default)]
    pub(super) destination_ips: Vec<String>,
    #[serde(default)]
    pub(super) not_destination_ips: Vec<String>,
    #[serde(default)]
    pub(super) destination_ports: Vec<u16>,
    #[serde(default)]
    pub(super) not_destination_ports: Vec<u16>,
}

/// Istio ztunnel's YAML for `StringMatch`: `{Exact: x}`, `{Prefix: x}`, `{Suffix: x}`,
/// `{Presence: []}` (any value after `Presence` is ignored).
#[derive(Debug, Deserialize)]
pub(super) enum RawStringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence(IgnoredAny),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawServiceAccountMatch {
    pub(super) namespace: String,
    pub(super) service_account: String,
}
