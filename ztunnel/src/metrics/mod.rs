//! Prometheus metrics: Istio's TCP traffic metrics (names and labels as Istio's ztunnel
//! exports them, so Kiali and the Istio dashboards work unchanged) and the agent's own health.
//!
//! This module only holds and encodes values. Traffic counters are fed by the connection
//! tracker as bytes move; health values are refreshed from the agent just before a scrape
//! (`admin::Agent::refresh_metrics`), so nothing here polls or does I/O.

pub mod traffic;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub use traffic::{Reporter, ResponseFlags, SecurityPolicy, TrafficLabels};

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A label set with a single `reason`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

/// Certificate metrics are per workload identity.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    pub identity: String,
}

/// A label set with a single `result`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

/// Configuration updates by source and result (`applied` or `rejected`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConfigUpdateLabels {
    pub source: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    component: String,
    tag: String,
}

/// Istio's TCP traffic metrics, one series per label set.
#[derive(Debug, Default)]
pub struct Traffic {
    pub opened: Family<TrafficLabels, Counter>,
    pub closed: Family<TrafficLabels, Counter>,
    /// Bytes from the server to the client (Istio: "sent during response").
    pub sent_bytes: Family<TrafficLabels, Counter>,
    /// Bytes from the client to the server (Istio: "received during request").
    pub received_bytes: Family<TrafficLabels, Counter>,
}

/// The agent's own health.
#[derive(Debug, Default)]
pub struct Agent {
    /// Inputs refused before any policy: bad tunnels, failed handshakes, wrong identities,
    /// connections without an original destination.
    pub rejected_inputs: Family<ReasonLabels, Counter>,
    pub connections_open: Gauge,
    pub hbone_pool_connections: Gauge,
    /// Pooled outbound HBONE connections taken out of the pool before their end, by reason
    /// (`certificate_expired`, `keepalive_timeout`).
    pub hbone_pool_evictions: Family<ReasonLabels, Counter>,
    /// HBONE tunnels (either direction) reset because the peer opened no flow-control window
    /// for the stall timeout while bytes waited to be sent.
    pub hbone_stalled_streams: Counter,
    /// Unix time at which each cached workload certificate expires.
    pub certificate_expiry: Family<IdentityLabels, Gauge>,
    /// Requests to the certificate authority by result (`issued` or `failed`).
    pub certificate_requests: Family<ResultLabels, Counter>,
    pub config_updates: Family<ConfigUpdateLabels, Counter>,
    /// Unix time of the last configuration change applied.
    pub config_last_update: Gauge,
    pub pods_enrolled: Gauge,
    /// Pods this node should capture and does not (enrolment failed or pending).
    pub pods_not_captured: Gauge,
    /// Pods captured without a valid certificate (the CA has not issued it): their
    /// connections are refused.
    pub pods_without_certificate: Gauge,
    pub capture_namespaces: Gauge,
    /// 1 while the xDS stream to the control plane is up, 0 while it is not (xDS mode only).
    pub control_plane_connected: Gauge,
}

/// Every metric of one ztunnel, registered once.
pub struct Metrics {
    registry: Registry,
    pub traffic: Traffic,
    pub agent: Agent,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let traffic = Traffic::default();
        let agent = Agent::default();
        // Names are given without `_total`: the encoder appends it to counters.
        registry.register(
            "istio_tcp_connections_opened",
            "The total number of TCP connections opened",
            traffic.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "The total number of TCP connections closed",
            traffic.closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
            traffic.sent_bytes.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
            traffic.received_bytes.clone(),
        );
        let build: Family<BuildLabels, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabels {
                component: "ztunnel".to_owned(),
                tag: env!("CARGO_PKG_VERSION").to_owned(),
            })
            .set(1);
        registry.register("istio_build", "Istio component build info", build);

        registry.register(
            "ztunnel_rejected_inputs",
            "Inputs refused before any policy was applied, by reason",
            agent.rejected_inputs.clone(),
        );
        registry.register(
            "ztunnel_connections_open",
            "Connections being relayed now",
            agent.connections_open.clone(),
        );
        registry.register(
            "ztunnel_hbone_pool_connections",
            "HBONE connections held in the outbound pool",
            agent.hbone_pool_connections.clone(),
        );
        registry.register(
            "ztunnel_hbone_pool_evictions",
            "Outbound HBONE connections taken out of the pool before their end, by reason",
            agent.hbone_pool_evictions.clone(),
        );
        registry.register(
            "ztunnel_hbone_stalled_streams",
            "HBONE tunnels reset because the peer opened no flow-control window for the stall timeout",
            agent.hbone_stalled_streams.clone(),
        );
        registry.register(
            "ztunnel_certificate_expiry_timestamp_seconds",
            "When each workload certificate this node holds expires (Unix time)",
            agent.certificate_expiry.clone(),
        );
        registry.register(
            "ztunnel_certificate_requests",
            "Workload certificate requests to the certificate authority, issued or failed",
            agent.certificate_requests.clone(),
        );
        registry.register(
            "ztunnel_config_updates",
            "Configuration updates from the source, applied or rejected",
            agent.config_updates.clone(),
        );
        registry.register(
            "ztunnel_config_last_update_timestamp_seconds",
            "When the configuration in force was applied (Unix time)",
            agent.config_last_update.clone(),
        );
        registry.register(
            "ztunnel_pods_enrolled",
            "Pods captured by this node",
            agent.pods_enrolled.clone(),
        );
        registry.register(
            "ztunnel_pods_not_captured",
            "Pods this node should capture but does not (enrolment failed or pending)",
            agent.pods_not_captured.clone(),
        );
        registry.register(
            "ztunnel_pods_without_certificate",
            "Pods captured without a valid certificate: their connections are refused until the CA issues one",
            agent.pods_without_certificate.clone(),
        );
        registry.register(
            "ztunnel_capture_namespaces",
            "Network namespaces in the eBPF outbound capture map",
            agent.capture_namespaces.clone(),
        );
        registry.register(
            "ztunnel_control_plane_connected",
            "1 while the xDS stream to the control plane is up, else 0 (xDS mode)",
            agent.control_plane_connected.clone(),
        );
        Metrics {
            registry,
            traffic,
            agent,
        }
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn reject(&self, reason: &str) {
        self.agent
            .rejected_inputs
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }
}

/// Brings a counter mirrored from another counter up to `value` (counters only grow).
pub fn mirror(counter: &Counter, value: u64) {
    counter.inc_by(value.saturating_sub(counter.get()));
}
