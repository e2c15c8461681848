//! The label set of Istio's TCP metrics, filled the way Istio's ztunnel fills it:
//! - `reporter` is `source` on the client's ztunnel and `destination` on the server's;
//! - a value that is not known is `unknown` (Istio's `DefaultedUnknown`);
//! - `source_principal` on the destination side is the identity the peer proved in the TLS
//!   handshake, never one taken from the workload table; without mTLS it is `unknown`;
//! - `*_app` / `*_version` and `*_canonical_service` / `*_canonical_revision` come from the
//!   workload's `app` / `version` labels (Istio's canonical name and revision);
//! - `response_flags` is `-`, `DENY` (policy) or `CONNECT` (upstream connection failed);
//! - `connection_security_policy` is `mutual_tls` on HBONE, `unknown` otherwise.

use std::fmt::Write as _;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};

use crate::identity::Identity;
use crate::state::{Service, Workload};

const UNKNOWN: &str = "unknown";

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Reporter {
    Source,
    Destination,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

impl EncodeLabelValue for Reporter {
    fn encode(&self, w: &mut LabelValueEncoder) -> std::fmt::Result {
        w.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq)]
pub enum ResponseFlags {
    #[default]
    None,
    /// Denied by an authorization policy.
    Deny,
    /// The upstream connection (or tunnel) could not be established.
    Connect,
}

impl ResponseFlags {
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlags::None => "-",
            ResponseFlags::Deny => "DENY",
            ResponseFlags::Connect => "CONNECT",
        }
    }
}

impl EncodeLabelValue for ResponseFlags {
    fn encode(&self, w: &mut LabelValueEncoder) -> std::fmt::Result {
        w.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum SecurityPolicy {
    MutualTls,
    Unknown,
}

impl EncodeLabelValue for SecurityPolicy {
    fn encode(&self, w: &mut LabelValueEncoder) -> std::fmt::Result {
        w.write_str(match self {
            SecurityPolicy::MutualTls => "mutual_tls",
            SecurityPolicy::Unknown => UNKNOWN,
        })
    }
}

/// Istio's `CommonTrafficLabels` for TCP, in Istio's order (without locality).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub request_protocol: String,
    pub response_flags: ResponseFlags,
    pub connection_security_policy: SecurityPolicy,
}

/// What is known about one end of a connection.
#[derive(Clone, Copy, Debug, Default)]
pub struct Peer<'a> {
    pub workload: Option<&'a Workload>,
    /// The identity as proven (mTLS) or, for the local side, as held by this ztunnel.
    pub identity: Option<&'a Identity>,
}

fn or_unknown(v: Option<&str>) -> String {
    v.filter(|s| !s.is_empty()).unwrap_or(UNKNOWN).to_owned()
}

impl TrafficLabels {
    pub fn new(
        reporter: Reporter,
        src: Peer<'_>,
        dst: Peer<'_>,
        service: Option<&Service>,
        security: SecurityPolicy,
    ) -> TrafficLabels {
        let label = |w: Option<&Workload>, key: &str| {
            or_unknown(w.and_then(|w| w.labels.get(key)).map(String::as_str))
        };
        let (sw, dw) = (src.workload, dst.workload);
        TrafficLabels {
            reporter,
            source_workload: or_unknown(sw.map(|w| w.name.as_str())),
            source_canonical_service: label(sw, "app"),
            source_canonical_revision: label(sw, "version"),
            source_workload_namespace: or_unknown(
                sw.map(Workload::namespace)
                    .or(src.identity.map(Identity::namespace)),
            ),
            source_principal: or_unknown(src.identity.map(|i| i.to_string()).as_deref()),
            source_app: label(sw, "app"),
            source_version: label(sw, "version"),
            source_cluster: or_unknown(sw.map(|w| w.cluster_id.as_str())),
            destination_service: or_unknown(service.map(|s| s.hostname.as_str())),
            destination_service_namespace: or_unknown(service.map(|s| s.namespace.as_str())),
            destination_service_name: or_unknown(service.map(|s| s.name.as_str())),
            destination_workload: or_unknown(dw.map(|w| w.name.as_str())),
            destination_canonical_service: label(dw, "app"),
            destination_canonical_revision: label(dw, "version"),
            destination_workload_namespace: or_unknown(dw.map(Workload::namespace)),
            destination_principal: or_unknown(dst.identity.map(|i| i.to_string()).as_deref()),
            destination_app: label(dw, "app"),
            destination_version: label(dw, "version"),
            destination_cluster: or_unknown(dw.map(|w| w.cluster_id.as_str())),
            request_protocol: "tcp".to_owned(),
            response_flags: ResponseFlags::None,
            connection_security_policy: security,
        }
    }

    pub fn with_flags(&self, flags: ResponseFlags) -> TrafficLabels {
        TrafficLabels {
            response_flags: flags,
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Identity {
        s.parse().unwrap()
    }

    #[test]
    fn known_values_fill_labels_and_missing_ones_are_unknown() {
        let sleep_id = id("spiffe://cluster.local/ns/default/sa/sleep");
        let mut sleep = Workload::new("u1", "sleep-1", sleep_id.clone());
        sleep.labels.insert("app".into(), "sleep".into());
        sleep.labels.insert("version".into(), "v1".into());
        let labels = TrafficLabels::new(
            Reporter::Source,
            Peer {
                workload: Some(&sleep),
                identity: Some(&sleep_id),
            },
            Peer::default(),
            None,
            SecurityPolicy::Unknown,
        );
        assert_eq!(labels.source_workload, "sleep-1");
        assert_eq!(labels.source_app, "sleep");
        assert_eq!(labels.source_version, "v1");
        assert_eq!(labels.source_cluster, "Kubernetes");
        assert_eq!(
            labels.source_principal,
            "spiffe://cluster.local/ns/default/sa/sleep"
        );
        assert_eq!(labels.destination_workload, "unknown");
        assert_eq!(labels.destination_service, "unknown");
        assert_eq!(labels.destination_principal, "unknown");

        let mut out = String::new();
        let family: prometheus_client::metrics::family::Family<
            TrafficLabels,
            prometheus_client::metrics::counter::Counter,
        > = Default::default();
        family
            .get_or_create(&labels.with_flags(ResponseFlags::Deny))
            .inc();
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("istio_tcp_connections_opened", "x", family);
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(
            out.contains("istio_tcp_connections_opened_total{reporter=\"source\",source_workload=\"sleep-1\","),
            "{out}"
        );
        assert!(out.contains("response_flags=\"DENY\",connection_security_policy=\"unknown\"} 1"));
    }
}
