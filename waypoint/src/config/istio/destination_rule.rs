//! `DestinationRule` (`networking.istio.io` v1, v1beta1, v1alpha3), as written. Subsets are
//! what routing needs today; the traffic policies are read and checked as data for the
//! upstream module (load balancing, pool limits, outlier detection), which does not act on
//! them yet, so each one set is reported as not implemented.

use std::time::Duration;

use super::super::decode::{Cx, Decode, Fields, Path};
use super::super::duration::duration;
use super::super::yaml::Node;
use super::common::{Labels, PortSelector, host_name};

/// Until the upstream module enforces traffic policies, a set one is reported with this.
const UPSTREAM_PENDING: &str = "traffic policies are read but not enforced yet";

/// `DestinationRule.spec`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DestinationRule {
    pub host: String,
    pub traffic_policy: Option<TrafficPolicy>,
    pub subsets: Vec<Subset>,
    pub export_to: Vec<String>,
}

impl Decode for DestinationRule {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let host = f.req_with("host", cx, host_name);
        let traffic_policy = f.opt::<TrafficPolicy>("trafficPolicy", cx);
        let subsets = f.list::<Subset>("subsets", cx);
        let export_to = f.list::<String>("exportTo", cx);
        f.not_implemented(
            "workloadSelector",
            cx,
            "workload selectors (sidecar-only in Istio)",
        );
        let mut ok = true;
        for (i, s) in subsets.iter().enumerate() {
            if subsets[..i].iter().any(|o| o.name == s.name) {
                f.invalid(
                    "subsets",
                    cx,
                    format!("subset name {:?} is used twice", s.name),
                );
                ok = false;
            }
        }
        let ok = f.finish(cx) && ok;
        Some(DestinationRule {
            host: host?,
            traffic_policy,
            subsets,
            export_to,
        })
        .filter(|_| ok)
    }
}

/// `Subset`: endpoints with these labels, and a policy that overrides the top-level one.
#[derive(Clone, Debug, PartialEq)]
pub struct Subset {
    pub name: String,
    pub labels: Labels,
    pub traffic_policy: Option<TrafficPolicy>,
}

impl Decode for Subset {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let name = f.req::<String>("name", cx);
        let labels = f.map::<String>("labels", cx);
        let traffic_policy = f.opt::<TrafficPolicy>("trafficPolicy", cx);
        let ok = f.finish(cx);
        Some(Subset {
            name: name?,
            labels,
            traffic_policy,
        })
        .filter(|_| ok)
    }
}

/// `TrafficPolicy`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrafficPolicy {
    pub load_balancer: Option<LoadBalancer>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
    pub port_level_settings: Vec<PortTrafficPolicy>,
}

impl Decode for TrafficPolicy {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let (load_balancer, connection_pool, outlier_detection) = policies(&mut f, cx);
        let port_level_settings = f.list::<PortTrafficPolicy>("portLevelSettings", cx);
        for (key, what) in [
            (
                "tls",
                "upstream TLS settings (the waypoint always uses HBONE mTLS)",
            ),
            ("tunnel", "tunnel settings"),
            ("proxyProtocol", "PROXY protocol"),
            ("retryBudget", "retry budgets"),
        ] {
            f.not_implemented(key, cx, what);
        }
        let ok = f.finish(cx);
        ok.then_some(TrafficPolicy {
            load_balancer,
            connection_pool,
            outlier_detection,
            port_level_settings,
        })
    }
}

type Policies = (
    Option<LoadBalancer>,
    Option<ConnectionPool>,
    Option<OutlierDetection>,
);

fn policies(f: &mut Fields<'_, '_>, cx: &mut Cx) -> Policies {
    let lb = f.opt::<LoadBalancer>("loadBalancer", cx);
    let pool = f.opt::<ConnectionPool>("connectionPool", cx);
    let outlier = f.opt::<OutlierDetection>("outlierDetection", cx);
    for (key, set) in [
        ("loadBalancer", lb.is_some()),
        ("connectionPool", pool.is_some()),
        ("outlierDetection", outlier.is_some()),
    ] {
        if set {
            f.not_implemented(key, cx, UPSTREAM_PENDING);
        }
    }
    (lb, pool, outlier)
}

/// `TrafficPolicy.PortTrafficPolicy`.
#[derive(Clone, Debug, PartialEq)]
pub struct PortTrafficPolicy {
    pub port: Option<PortSelector>,
    pub load_balancer: Option<LoadBalancer>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
}

impl Decode for PortTrafficPolicy {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let port = f.opt::<PortSelector>("port", cx);
        let (load_balancer, connection_pool, outlier_detection) = policies(&mut f, cx);
        f.not_implemented(
            "tls",
            cx,
            "upstream TLS settings (the waypoint always uses HBONE mTLS)",
        );
        let ok = f.finish(cx);
        ok.then_some(PortTrafficPolicy {
            port,
            load_balancer,
            connection_pool,
            outlier_detection,
        })
    }
}

/// `LoadBalancerSettings.SimpleLB`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimpleLb {
    /// `UNSPECIFIED` and `LEAST_CONN` (its old name) are `LEAST_REQUEST`.
    LeastRequest,
    Random,
    Passthrough,
    RoundRobin,
}

/// How a consistent hash picks its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashKey {
    Header(String),
    Cookie {
        name: String,
        path: Option<String>,
        ttl: Option<Duration>,
    },
    SourceIp,
    QueryParameter(String),
}

/// `LoadBalancerSettings`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadBalancer {
    Simple(SimpleLb),
    /// Ring hash with at least `minimum_ring_size` entries (Envoy's default 1024).
    ConsistentHash {
        key: HashKey,
        minimum_ring_size: Option<u64>,
    },
}

impl Decode for LoadBalancer {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let simple = f.opt_with("simple", cx, |n, at, cx| {
            match String::decode(n, at, cx)?.as_str() {
                "UNSPECIFIED" | "LEAST_REQUEST" | "LEAST_CONN" => Some(SimpleLb::LeastRequest),
                "RANDOM" => Some(SimpleLb::Random),
                "PASSTHROUGH" => Some(SimpleLb::Passthrough),
                "ROUND_ROBIN" => Some(SimpleLb::RoundRobin),
                other => {
                    cx.invalid(
                        at,
                        n,
                        format!(
                            "{other:?}: expected LEAST_REQUEST, ROUND_ROBIN, RANDOM or PASSTHROUGH"
                        ),
                    );
                    None
                }
            }
        });
        let hash = f.opt_with("consistentHash", cx, consistent_hash);
        for (key, what) in [
            ("localityLbSetting", "locality load balancing"),
            ("warmupDurationSecs", "slow start"),
            ("warmup", "slow start"),
            ("backendUtilization", "utilization-based load balancing"),
            ("zoneAwareLbSetting", "zone-aware load balancing"),
        ] {
            f.not_implemented(key, cx, what);
        }
        let one = super::super::decode::at_most_one(
            &mut f,
            cx,
            &["simple", "consistentHash"],
            &[simple.is_some(), hash.is_some()],
        );
        let ok = f.finish(cx) && one;
        if !ok {
            return None;
        }
        Some(match (simple, hash) {
            (_, Some(h)) => h,
            (Some(s), None) => LoadBalancer::Simple(s),
            (None, None) => LoadBalancer::Simple(SimpleLb::LeastRequest),
        })
    }
}

fn consistent_hash(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<LoadBalancer> {
    let mut f = Fields::new(node, at, cx)?;
    let header = f
        .opt::<String>("httpHeaderName", cx)
        .map(|h| HashKey::Header(h.to_ascii_lowercase()));
    let cookie = f.opt_with("httpCookie", cx, |n, at, cx| {
        let mut c = Fields::new(n, at, cx)?;
        let name = c.req::<String>("name", cx);
        let path = c.opt::<String>("path", cx);
        let ttl = c.opt_with("ttl", cx, duration);
        c.not_implemented("attributes", cx, "cookie attributes");
        let ok = c.finish(cx);
        Some(HashKey::Cookie {
            name: name?,
            path,
            ttl,
        })
        .filter(|_| ok)
    });
    let source_ip = f
        .opt::<bool>("useSourceIp", cx)
        .filter(|b| *b)
        .map(|_| HashKey::SourceIp);
    let query = f
        .opt::<String>("httpQueryParameterName", cx)
        .map(HashKey::QueryParameter);
    let min_top = f.opt::<u64>("minimumRingSize", cx);
    let ring = f.opt_with("ringHash", cx, |n, at, cx| {
        let mut r = Fields::new(n, at, cx)?;
        let min = r.opt::<u64>("minimumRingSize", cx);
        r.finish(cx).then_some(min)
    });
    f.not_implemented("maglev", cx, "Maglev hashing (ring hash is used)");
    let keys = [header, cookie, source_ip, query];
    let set: Vec<bool> = keys.iter().map(Option::is_some).collect();
    let one = super::super::decode::at_most_one(
        &mut f,
        cx,
        &[
            "httpHeaderName",
            "httpCookie",
            "useSourceIp",
            "httpQueryParameterName",
        ],
        &set,
    );
    let mut ok = f.finish(cx) && one;
    let key = keys.into_iter().flatten().next();
    if key.is_none() {
        cx.invalid(at, node, "a consistent hash needs one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName");
        ok = false;
    }
    let minimum_ring_size = ring.flatten().or(min_top);
    Some(LoadBalancer::ConsistentHash {
        key: key?,
        minimum_ring_size,
    })
    .filter(|_| ok)
}

/// `ConnectionPoolSettings`: the limits this data plane honours (DESIGN.md).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectionPool {
    pub max_connections: Option<u32>,
    pub connect_timeout: Option<Duration>,
    pub http1_max_pending_requests: Option<u32>,
    pub http2_max_requests: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
    pub max_retries: Option<u32>,
    pub idle_timeout: Option<Duration>,
}

fn non_negative(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<u32> {
    let v = i32::decode(node, at, cx)?;
    u32::try_from(v).ok().or_else(|| {
        cx.invalid(at, node, format!("{v} is negative"));
        None
    })
}

impl Decode for ConnectionPool {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let mut out = ConnectionPool::default();
        let tcp_ok = f.opt_with("tcp", cx, |n, at, cx| {
            let mut t = Fields::new(n, at, cx)?;
            out.max_connections = t.opt_with("maxConnections", cx, non_negative);
            out.connect_timeout = t.opt_with("connectTimeout", cx, duration);
            out.idle_timeout = t.opt_with("idleTimeout", cx, duration);
            t.not_implemented("tcpKeepalive", cx, "upstream TCP keep-alive settings");
            t.not_implemented("maxConnectionDuration", cx, "connection lifetimes");
            t.finish(cx).then_some(())
        });
        let http_ok = f.opt_with("http", cx, |n, at, cx| {
            let mut h = Fields::new(n, at, cx)?;
            out.http1_max_pending_requests =
                h.opt_with("http1MaxPendingRequests", cx, non_negative);
            out.http2_max_requests = h.opt_with("http2MaxRequests", cx, non_negative);
            out.max_requests_per_connection =
                h.opt_with("maxRequestsPerConnection", cx, non_negative);
            out.max_retries = h.opt_with("maxRetries", cx, non_negative);
            if let Some(d) = h.opt_with("idleTimeout", cx, duration) {
                out.idle_timeout = Some(d);
            }
            for (key, what) in [
                ("h2UpgradePolicy", "HTTP/2 upgrade policy"),
                ("useClientProtocol", "client protocol passthrough"),
                ("maxConcurrentStreams", "upstream stream limits"),
                ("http2KeepAlive", "upstream HTTP/2 keep-alive"),
            ] {
                h.not_implemented(key, cx, what);
            }
            h.finish(cx).then_some(())
        });
        let mut ok = f.finish(cx);
        ok &= tcp_ok.is_some() || f_absent(node, "tcp");
        ok &= http_ok.is_some() || f_absent(node, "http");
        ok.then_some(out)
    }
}

fn f_absent(node: &Node, key: &str) -> bool {
    node.get(key)
        .is_none_or(|n| matches!(n.value, super::super::yaml::Value::Null))
}

/// `OutlierDetection`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutlierDetection {
    pub consecutive_5xx_errors: Option<u32>,
    pub consecutive_gateway_errors: Option<u32>,
    pub interval: Option<Duration>,
    pub base_ejection_time: Option<Duration>,
    pub max_ejection_percent: Option<u32>,
    pub min_health_percent: Option<u32>,
}

impl Decode for OutlierDetection {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let consecutive_5xx_errors = f.opt::<u32>("consecutive5xxErrors", cx);
        let old = f.opt_with("consecutiveErrors", cx, non_negative);
        if old.is_some() {
            f.not_implemented(
                "consecutiveErrors",
                cx,
                "deprecated; use consecutive5xxErrors",
            );
        }
        let consecutive_gateway_errors = f.opt::<u32>("consecutiveGatewayErrors", cx);
        let interval = f.opt_with("interval", cx, duration);
        let base_ejection_time = f.opt_with("baseEjectionTime", cx, duration);
        let max_ejection_percent = f.opt_with("maxEjectionPercent", cx, non_negative);
        let min_health_percent = f.opt_with("minHealthPercent", cx, non_negative);
        for (key, what) in [
            (
                "splitExternalLocalOriginErrors",
                "local-origin error accounting",
            ),
            (
                "consecutiveLocalOriginFailures",
                "local-origin error accounting",
            ),
            (
                "outlierDetectionHttpErrorCodes",
                "custom outlier status codes",
            ),
        ] {
            f.not_implemented(key, cx, what);
        }
        let mut ok = f.finish(cx);
        for (key, v) in [
            ("maxEjectionPercent", max_ejection_percent),
            ("minHealthPercent", min_health_percent),
        ] {
            if v.is_some_and(|v| v > 100) {
                cx.invalid(&at.field(key), node, "must be in 0..=100");
                ok = false;
            }
        }
        ok.then_some(OutlierDetection {
            consecutive_5xx_errors,
            consecutive_gateway_errors,
            interval,
            base_ejection_time,
            max_ejection_percent,
            min_health_percent,
        })
    }
}
