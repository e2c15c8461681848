//! The waypoint's Prometheus metrics: Istio's HTTP request metrics, reported as
//! `reporter="waypoint"` with Istio's label names (so Kiali and the Istio dashboards read
//! them), and the waypoint's own: mirrored requests, configuration updates.
//!
//! Label values are built once per request from strings the snapshot already holds; the
//! benchmark issue tracks interning them per route and endpoint.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Istio's request metric labels (a subset of its standard set).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    /// `http` or `grpc`.
    pub request_protocol: &'static str,
    pub response_code: u16,
    /// Envoy's response flags: `-`, `NR` (no route), `UH` (no healthy upstream), `UF`
    /// (upstream connection failure), `UC` (upstream connection ended), `UT` (upstream
    /// timeout), `FI` (fault abort), `DI` (fault delay).
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

/// A mirrored request's phase: `started` when it is sent, `finished` once answered or failed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: &'static str,
}

/// Configuration updates by source (`mesh`, `routes`) and result (`applied`, `rejected`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConfigLabels {
    pub source: &'static str,
    pub result: &'static str,
}

/// A config source (`kube`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: &'static str,
}

/// Istio's buckets for `istio_request_duration_milliseconds`.
const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<RequestLabels, Histogram>,
    pub mirrors: Family<PhaseLabels, Counter>,
    pub config: Family<ConfigLabels, Counter>,
    pub sources: Family<SourceLabels, Gauge>,
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
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Family::<RequestLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(DURATION_BUCKETS)) as fn() -> Histogram,
        );
        let mirrors = Family::<PhaseLabels, Counter>::default();
        let config = Family::<ConfigLabels, Counter>::default();
        registry.register(
            "istio_requests",
            "Requests through the waypoint, by source, destination and response",
            requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Time from the request's arrival to its response head, in milliseconds",
            duration.clone(),
        );
        registry.register(
            "waypoint_mirror_requests",
            "Mirrored copies of requests: started, and finished (answered or failed)",
            mirrors.clone(),
        );
        registry.register(
            "waypoint_config_updates",
            "Configuration changes applied or rejected (a rejected one keeps the last good)",
            config.clone(),
        );
        let sources = Family::<SourceLabels, Gauge>::default();
        registry.register(
            "waypoint_config_source_connected",
            "1 while a watched config source (the Kubernetes API) answers, 0 while it is away",
            sources.clone(),
        );
        Metrics {
            registry,
            sources,
            requests,
            duration,
            mirrors,
            config,
        }
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn mirror(&self, phase: &'static str) {
        self.mirrors.get_or_create(&PhaseLabels { phase }).inc();
    }

    /// The connected gauge of a watched source.
    pub fn source_connected(&self, source: &'static str) -> Gauge {
        self.sources.get_or_create(&SourceLabels { source }).clone()
    }

    pub fn config(&self, source: &'static str, result: &'static str) -> Counter {
        self.config
            .get_or_create(&ConfigLabels { source, result })
            .clone()
    }
}
