//! The waypoint's Prometheus metrics: Istio's HTTP request metrics, reported as
//! `reporter="waypoint"` with Istio's label names (so Kiali and the Istio dashboards read
//! them), and the waypoint's own: mirrored requests, configuration updates, authorization
//! denials.
//!
//! No label value is built per request: the values of each side of a request (the client,
//! the endpoint that answered, the service) are made once per snapshot or tunnel as [`Names`]
//! and shared; a request's [`RequestLabels`] only holds references to them, and hashes as
//! three precomputed numbers.

use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher, Hash, Hasher};
use std::sync::{Arc, LazyLock};

use prometheus_client::encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use ztunnel::identity::Identity;
use ztunnel::state::{Service, Workload};

/// The three label values of one side of a request: a workload's name, namespace and
/// principal, or a service's hostname, name and namespace. Made once, shared by every
/// request that has them.
#[derive(Debug)]
pub struct Names {
    values: [Box<str>; 3],
    /// The hash of `values`, computed once.
    hash: u64,
}

impl Names {
    pub fn new(a: &str, b: &str, c: &str) -> Arc<Names> {
        let values = [a.into(), b.into(), c.into()];
        // A fixed seed: equal values hash equal in every snapshot and tunnel.
        let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(&values);
        Arc::new(Names { values, hash })
    }

    /// A workload as the source or the destination of a request.
    pub fn workload(w: &Workload) -> Arc<Names> {
        Names::new(&w.name, w.namespace(), &w.identity_ref().to_string())
    }

    /// A client known only by its proven identity.
    pub fn peer(workload: Option<&Workload>, peer: &Identity) -> Arc<Names> {
        Names::new(
            workload.map_or("unknown", |w| &w.name),
            peer.namespace(),
            &peer.to_string(),
        )
    }

    /// The service a request was addressed to.
    pub fn service(s: &Service) -> Arc<Names> {
        Names::new(&s.hostname, &s.name, &s.namespace)
    }

    /// No workload or service (`unknown` three times, as Istio reports it).
    pub fn unknown() -> Arc<Names> {
        static UNKNOWN: LazyLock<Arc<Names>> =
            LazyLock::new(|| Names::new("unknown", "unknown", "unknown"));
        UNKNOWN.clone()
    }
}

impl Hash for Names {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl PartialEq for Names {
    fn eq(&self, other: &Names) -> bool {
        std::ptr::eq(self, other) || (self.hash == other.hash && self.values == other.values)
    }
}

impl Eq for Names {}

/// Istio's request metric labels (a subset of its standard set), encoded in Istio's order
/// with `reporter="waypoint"` and `connection_security_policy="mutual_tls"`.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct RequestLabels {
    /// `source_workload`, `source_workload_namespace`, `source_principal`.
    pub source: Arc<Names>,
    /// `destination_workload`, `destination_workload_namespace`, `destination_principal`.
    pub destination: Arc<Names>,
    /// `destination_service`, `destination_service_name`, `destination_service_namespace`.
    pub service: Arc<Names>,
    /// `http` or `grpc`.
    pub request_protocol: &'static str,
    pub response_code: u16,
    /// Envoy's response flags: `-`, `NR` (no route), `UH` (no healthy upstream), `UF`
    /// (upstream connection failure), `UC` (upstream connection ended), `UT` (upstream
    /// timeout), `FI` (fault abort), `DI` (fault delay), `RBAC` (denied by AuthorizationPolicy).
    pub response_flags: &'static str,
}

impl EncodeLabelSet for RequestLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let sides = [
            (
                &self.source,
                [
                    "source_workload",
                    "source_workload_namespace",
                    "source_principal",
                ],
            ),
            (
                &self.destination,
                [
                    "destination_workload",
                    "destination_workload_namespace",
                    "destination_principal",
                ],
            ),
            (
                &self.service,
                [
                    "destination_service",
                    "destination_service_name",
                    "destination_service_namespace",
                ],
            ),
        ];
        ("reporter", "waypoint").encode(encoder.encode_label())?;
        for (names, keys) in sides {
            for (key, value) in keys.iter().zip(&names.values) {
                (*key, &**value).encode(encoder.encode_label())?;
            }
        }
        ("request_protocol", self.request_protocol).encode(encoder.encode_label())?;
        ("response_code", self.response_code).encode(encoder.encode_label())?;
        ("response_flags", self.response_flags).encode(encoder.encode_label())?;
        ("connection_security_policy", "mutual_tls").encode(encoder.encode_label())
    }
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

/// HTTP/1 requests refused before they were read (`server::h1guard`), by reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub reason: &'static str,
}

/// Requests (and relayed tunnels) denied by AuthorizationPolicy, by the policy that denied
/// (`-` when ALLOW policies apply and none matched) and why.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeniedLabels {
    pub policy: String,
    pub reason: &'static str,
}

/// Requests refused by RequestAuthentication (an invalid token), by why (bounded:
/// `policy::jwt::verify::Failure::reason`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JwtRefusedLabels {
    pub reason: &'static str,
}

/// Fetches of `jwksUri` key sets, by result (`ok`, `error`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JwksFetchLabels {
    pub result: &'static str,
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
    pub refused: Family<RefusedLabels, Counter>,
    pub sources: Family<SourceLabels, Gauge>,
    pub denied: Family<DeniedLabels, Counter>,
    pub jwt_refused: Family<JwtRefusedLabels, Counter>,
    pub jwks_fetches: Family<JwksFetchLabels, Counter>,
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
        let refused = Family::<RefusedLabels, Counter>::default();
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
        registry.register(
            "waypoint_refused_requests",
            "HTTP/1 requests answered 400 before they were read, because their framing could smuggle another request (both Content-Length and Transfer-Encoding, a bad first chunk size)",
            refused.clone(),
        );
        let sources = Family::<SourceLabels, Gauge>::default();
        registry.register(
            "waypoint_config_source_connected",
            "1 while a watched config source (the Kubernetes API) answers, 0 while it is away",
            sources.clone(),
        );
        let denied = Family::<DeniedLabels, Counter>::default();
        registry.register(
            "waypoint_authz_denied",
            "Requests denied by AuthorizationPolicy (answered 403 RBAC: access denied, or gRPC status 7), by policy and reason",
            denied.clone(),
        );
        let jwt_refused = Family::<JwtRefusedLabels, Counter>::default();
        registry.register(
            "waypoint_jwt_refused",
            "Requests refused by RequestAuthentication (answered 401, or 403 for an audience not allowed), by reason",
            jwt_refused.clone(),
        );
        let jwks_fetches = Family::<JwksFetchLabels, Counter>::default();
        registry.register(
            "waypoint_jwks_fetches",
            "Fetches of RequestAuthentication jwksUri key sets, by result; while a set cannot be fetched its issuer's tokens are refused",
            jwks_fetches.clone(),
        );
        Metrics {
            registry,
            sources,
            denied,
            jwt_refused,
            jwks_fetches,
            requests,
            duration,
            mirrors,
            config,
            refused,
        }
    }

    /// Counts a denial by `policy` (`namespace/name`, or `-`) for `reason`.
    pub fn authz_denied(&self, policy: &str, reason: &'static str) {
        self.denied
            .get_or_create(&DeniedLabels {
                policy: policy.to_owned(),
                reason,
            })
            .inc();
    }

    pub fn jwt_refused(&self, reason: &'static str) {
        self.jwt_refused
            .get_or_create(&JwtRefusedLabels { reason })
            .inc();
    }

    pub fn jwks_fetch(&self, result: &'static str) {
        self.jwks_fetches
            .get_or_create(&JwksFetchLabels { result })
            .inc();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(source: Arc<Names>) -> RequestLabels {
        RequestLabels {
            source,
            destination: Names::new("reviews-v1", "bookinfo", "spiffe://td/ns/bookinfo/sa/r"),
            service: Names::new("reviews.bookinfo.svc.cluster.local", "reviews", "bookinfo"),
            request_protocol: "http",
            response_code: 200,
            response_flags: "-",
        }
    }

    #[test]
    fn labels_encode_with_istio_names_in_order() {
        let m = Metrics::new();
        m.requests
            .get_or_create(&labels(Names::new("a", "b", "c")))
            .inc();
        let text = m.encode();
        assert!(
            text.contains(r#"istio_requests_total{reporter="waypoint",source_workload="a",source_workload_namespace="b",source_principal="c",destination_workload="reviews-v1",destination_workload_namespace="bookinfo",destination_principal="spiffe://td/ns/bookinfo/sa/r",destination_service="reviews.bookinfo.svc.cluster.local",destination_service_name="reviews",destination_service_namespace="bookinfo",request_protocol="http",response_code="200",response_flags="-",connection_security_policy="mutual_tls"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn equal_values_made_apart_count_in_one_series() {
        let m = Metrics::new();
        m.requests
            .get_or_create(&labels(Names::new("a", "b", "c")))
            .inc();
        m.requests
            .get_or_create(&labels(Names::new("a", "b", "c")))
            .inc();
        m.requests
            .get_or_create(&labels(Names::new("a", "b", "d")))
            .inc();
        let text = m.encode();
        assert!(text.contains(r#"source_principal="c","#), "{text}");
        assert_eq!(text.matches("istio_requests_total{").count(), 2, "{text}");
        assert!(text.contains("} 2\n"), "{text}");
    }
}
