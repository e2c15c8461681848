//! The rules every source of state applies, whatever its encoding: the local YAML file and
//! istiod's workload xDS both describe workloads, services and policies, and both must mean
//! the same thing by them. Istio's defaults for fields left empty, what a SPIFFE identity part
//! may hold, the canonical labels, the names of the enumerations, how a waypoint address and
//! the parts of a policy match are checked: each rule and its wording lives here once.
//!
//! A front end turns its own encoding into these inputs (text from YAML, bytes and integers
//! from protobuf) and says *where* a problem is (a YAML item, a protobuf field path); this
//! module says *what* is wrong. Pure: no I/O, no state.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::identity::Identity;
use crate::state::policy::Cidr;
use crate::state::service::AppProtocol;
use crate::state::workload::{GatewayAddress, GatewayDestination, HealthStatus};
use crate::state::{Action, NamespacedHostname, Protocol, Scope};

/// Istio's defaults for fields a source may leave empty.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

/// Problems found in one input, each `where: what`, in the order they were found.
#[derive(Debug, Default)]
pub(crate) struct Problems(Vec<String>);

impl Problems {
    pub(crate) fn add(&mut self, at: impl std::fmt::Display, what: impl std::fmt::Display) {
        self.0.push(format!("{at}: {what}"));
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn into_vec(self) -> Vec<String> {
        self.0
    }
}

pub(crate) fn or_default(v: String, default: &str) -> String {
    if v.is_empty() { default.to_owned() } else { v }
}

/// An identity part (namespace, service account, trust domain) must be non-empty and hold no
/// `/` or whitespace, as `Identity::new` requires. The error says what is wrong with `value`.
pub(crate) fn identity_part(value: &str) -> Result<(), String> {
    if value.is_empty() || value.contains('/') || value.contains(char::is_whitespace) {
        return Err(format!(
            "{value:?} must be non-empty, without '/' or spaces (it is part of the SPIFFE identity)"
        ));
    }
    Ok(())
}

/// A workload's identity from its parts, each given with the name its source uses for the
/// field; empty trust domain and service account take `default_trust_domain` and Istio's
/// `default`. Every part that is wrong is reported through `problem(field, what)`.
pub(crate) fn workload_identity(
    trust_domain: (&str, String),
    namespace: (&str, String),
    service_account: (&str, String),
    default_trust_domain: &str,
    mut problem: impl FnMut(&str, String),
) -> Option<Identity> {
    let td = or_default(trust_domain.1, default_trust_domain);
    let sa = or_default(service_account.1, DEFAULT_SERVICE_ACCOUNT);
    let mut ok = true;
    for (field, value) in [
        (namespace.0, &namespace.1),
        (service_account.0, &sa),
        (trust_domain.0, &td),
    ] {
        if let Err(what) = identity_part(value) {
            problem(field, what);
            ok = false;
        }
    }
    if !ok {
        return None;
    }
    match Identity::new(td, namespace.1, sa) {
        Ok(id) => Some(id),
        Err(e) => {
            problem("identity", e.to_string());
            None
        }
    }
}

/// Istio's canonical service name and revision are what telemetry calls `app` and `version`;
/// labels the source sets explicitly win over them.
pub(crate) fn add_canonical_labels(
    labels: &mut BTreeMap<String, String>,
    canonical_name: String,
    canonical_revision: String,
) {
    if !canonical_name.is_empty() {
        labels
            .entry("service.istio.io/canonical-name".into())
            .or_insert_with(|| canonical_name.clone());
        labels.entry("app".into()).or_insert(canonical_name);
    }
    if !canonical_revision.is_empty() {
        labels
            .entry("service.istio.io/canonical-revision".into())
            .or_insert_with(|| canonical_revision.clone());
        labels.entry("version".into()).or_insert(canonical_revision);
    }
}

/// A port number: 1 to 65535, or 0 too where 0 means "the same as the service port".
pub(crate) fn port(value: u32, allow_zero: bool) -> Result<u16, String> {
    match u16::try_from(value) {
        Ok(p) if p != 0 || allow_zero => Ok(p),
        _ if allow_zero => Err(format!("{value} is not a port (0 to 65535)")),
        _ => Err(format!("{value} is not a port (1 to 65535)")),
    }
}

/// What is wrong with a waypoint or gateway address, by the part it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum GatewayProblem {
    Port(String),
    Hostname(String),
}

/// Where a waypoint is reached: an address, or a service named by namespace and hostname.
pub(crate) enum GatewayTarget {
    Address(IpAddr),
    Hostname { namespace: String, hostname: String },
}

/// A waypoint or gateway address: its HBONE port must be a real port, a hostname target must
/// name both namespace and hostname.
pub(crate) fn gateway(
    target: GatewayTarget,
    hbone_port: u32,
) -> Result<GatewayAddress, GatewayProblem> {
    let hbone_mtls_port = port(hbone_port, false).map_err(GatewayProblem::Port)?;
    let destination = match target {
        GatewayTarget::Address(ip) => GatewayDestination::Address(ip),
        GatewayTarget::Hostname {
            namespace,
            hostname,
        } => {
            if namespace.is_empty() || hostname.is_empty() {
                return Err(GatewayProblem::Hostname(
                    "namespace and hostname are required".to_owned(),
                ));
            }
            GatewayDestination::Hostname(NamespacedHostname {
                namespace,
                hostname,
            })
        }
    };
    Ok(GatewayAddress {
        destination,
        hbone_mtls_port,
    })
}

/// The label that sends a service's (or a namespace's services', or a pod's) traffic through
/// a waypoint: the waypoint's name, or `none` to opt out of the namespace's waypoint.
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
/// The namespace of the waypoint named by [`USE_WAYPOINT_LABEL`], when not the object's own.
pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = "istio.io/use-waypoint-namespace";

/// The waypoint Istio's labels give an object in `namespace` with `labels`, whose namespace
/// has `namespace_labels` (`None` for objects the namespace label does not apply to: pods).
/// The object's own label wins over its namespace's, and `none` opts out; the waypoint
/// namespace comes from [`USE_WAYPOINT_NAMESPACE_LABEL`] next to the label that named the
/// waypoint. The waypoint is the service `<name>.<namespace>.svc.cluster.local` on 15008.
pub(crate) fn waypoint_from_labels(
    labels: &BTreeMap<String, String>,
    namespace_labels: Option<&BTreeMap<String, String>>,
    namespace: &str,
) -> Result<Option<GatewayAddress>, String> {
    let (from, whose) = if labels.contains_key(USE_WAYPOINT_LABEL) {
        (labels, "label")
    } else {
        match namespace_labels.filter(|l| l.contains_key(USE_WAYPOINT_LABEL)) {
            Some(ns) => (ns, "namespace label"),
            None => return Ok(None),
        }
    };
    let name = from.get(USE_WAYPOINT_LABEL).map_or("", String::as_str);
    if name == "none" {
        return Ok(None);
    }
    dns_label(name).map_err(|e| format!("{whose} {USE_WAYPOINT_LABEL} {name:?} {e}"))?;
    let ns = match from.get(USE_WAYPOINT_NAMESPACE_LABEL) {
        Some(ns) => {
            dns_label(ns)
                .map_err(|e| format!("{whose} {USE_WAYPOINT_NAMESPACE_LABEL} {ns:?} {e}"))?;
            ns.as_str()
        }
        None => namespace,
    };
    Ok(Some(GatewayAddress {
        destination: GatewayDestination::Hostname(NamespacedHostname {
            namespace: ns.to_owned(),
            hostname: format!("{name}.{ns}.svc.cluster.local"),
        }),
        hbone_mtls_port: crate::hbone::HBONE_PORT,
    }))
}

/// A Kubernetes name that is part of a DNS name (RFC 1123 label): what a service or
/// namespace name may be.
fn dns_label(s: &str) -> Result<(), &'static str> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err("is not a name: 1 to 63 lowercase letters, digits and '-', not at either end")
    }
}

/// An address range of a policy match: the prefix may not be longer than the address.
pub(crate) fn cidr(ip: IpAddr, prefix_len: u32) -> Result<Cidr, String> {
    u8::try_from(prefix_len)
        .ok()
        .and_then(|l| Cidr::new(ip, l))
        .ok_or_else(|| format!("{prefix_len} is longer than the address {ip}"))
}

// The enumerations, by the names either source writes: Istio's YAML spelling (`Allow`) or
// the protobuf enum's (`ALLOW`, what `as_str_name` gives).

/// `HBONE`, or one of the plain-TCP kinds: none (`TCP`, `NONE`) or a sidecar's own mTLS
/// (`LEGACY_ISTIO_MTLS`), which to this data plane is a plain TCP destination.
pub(crate) fn protocol(name: &str) -> Option<Protocol> {
    match name {
        "HBONE" => Some(Protocol::Hbone),
        "TCP" | "NONE" | "LEGACY_ISTIO_MTLS" => Some(Protocol::Tcp),
        _ => None,
    }
}

pub(crate) fn health(name: &str) -> Option<HealthStatus> {
    match name {
        "Healthy" | "HEALTHY" => Some(HealthStatus::Healthy),
        "Unhealthy" | "UNHEALTHY" => Some(HealthStatus::Unhealthy),
        _ => None,
    }
}

pub(crate) fn scope(name: &str) -> Option<Scope> {
    match name {
        "Global" | "GLOBAL" => Some(Scope::Global),
        "Namespace" | "NAMESPACE" => Some(Scope::Namespace),
        "WorkloadSelector" | "WORKLOAD_SELECTOR" => Some(Scope::WorkloadSelector),
        _ => None,
    }
}

pub(crate) fn action(name: &str) -> Option<Action> {
    match name {
        "Allow" | "ALLOW" => Some(Action::Allow),
        "Deny" | "DENY" => Some(Action::Deny),
        _ => None,
    }
}

/// A port's application protocol as Istio names it (`appProtocol`, or the port name's prefix
/// before `-`): HTTP kinds, or any other protocol Istio knows, which a waypoint relays as
/// TCP. `None` for a name Istio does not know.
pub fn app_protocol(name: &str) -> Option<AppProtocol> {
    let name = name.split('-').next().unwrap_or(name).to_ascii_lowercase();
    Some(match name.as_str() {
        "http" | "http11" | "http/1.1" => AppProtocol::Http11,
        "http2" | "h2c" | "kubernetes.io/h2c" => AppProtocol::Http2,
        "grpc" | "grpc-web" => AppProtocol::Grpc,
        "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" | "udp" | "kubernetes.io/ws"
        | "kubernetes.io/wss" => AppProtocol::Tcp,
        _ => return None,
    })
}

/// The local config's `appProtocols` (service port as text -> protocol name): each port must
/// be one of the service's, each name one Istio knows; problems are added to `r`.
pub(crate) fn app_protocols(
    at: &str,
    declared: &BTreeMap<String, String>,
    ports: &BTreeMap<u16, u16>,
    r: &mut Problems,
) -> BTreeMap<u16, AppProtocol> {
    let mut out = BTreeMap::new();
    for (port, name) in declared {
        let Some(p) = port.parse::<u16>().ok().filter(|p| ports.contains_key(p)) else {
            r.add(
                at,
                format!("appProtocols: {port:?} is not one of the service's ports"),
            );
            continue;
        };
        match app_protocol(name) {
            Some(proto) => {
                out.insert(p, proto);
            }
            None => r.add(
                at,
                format!(
                    "appProtocols[{port}]: {name:?} is not a protocol Istio knows (http, http2, grpc, tcp, tls, ...)"
                ),
            ),
        }
    }
    out
}

#[cfg(test)]
mod tests {

    #[test]
    fn app_protocols_by_istio_names_and_port_name_prefixes() {
        use crate::state::service::AppProtocol::*;
        for (name, want) in [
            ("http", Some(Http11)),
            ("HTTP", Some(Http11)),
            ("http-web", Some(Http11)),
            ("http2", Some(Http2)),
            ("kubernetes.io/h2c", Some(Http2)),
            ("grpc", Some(Grpc)),
            ("grpc-api", Some(Grpc)),
            ("tcp", Some(Tcp)),
            ("tls", Some(Tcp)),
            ("mysql-primary", Some(Tcp)),
            ("web", None),
        ] {
            assert_eq!(super::app_protocol(name), want, "{name}");
        }
    }
    use super::*;

    #[test]
    fn identity_parts_reject_separators_and_blanks() {
        assert!(identity_part("default").is_ok());
        for bad in ["", "a/b", "a b", "\t"] {
            let err = identity_part(bad).unwrap_err();
            assert!(err.contains("SPIFFE identity"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn workload_identity_fills_istio_defaults_and_names_each_bad_field() {
        let id = workload_identity(
            ("trustDomain", String::new()),
            ("namespace", "shop".into()),
            ("serviceAccount", String::new()),
            DEFAULT_TRUST_DOMAIN,
            |f, w| panic!("{f}: {w}"),
        )
        .unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/default");

        let mut seen = Vec::new();
        let id = workload_identity(
            ("trust_domain", "a b".into()),
            ("namespace", String::new()),
            ("service_account", "x/y".into()),
            "td",
            |f, _| seen.push(f.to_owned()),
        );
        assert!(id.is_none());
        assert_eq!(seen, ["namespace", "service_account", "trust_domain"]);
    }

    #[test]
    fn canonical_labels_never_override_explicit_ones() {
        let mut labels = BTreeMap::from([("app".to_owned(), "mine".to_owned())]);
        add_canonical_labels(&mut labels, "reviews".into(), "v2".into());
        assert_eq!(labels["app"], "mine");
        assert_eq!(labels["service.istio.io/canonical-name"], "reviews");
        assert_eq!(labels["version"], "v2");
        assert_eq!(labels["service.istio.io/canonical-revision"], "v2");
        let mut none = BTreeMap::new();
        add_canonical_labels(&mut none, String::new(), String::new());
        assert!(none.is_empty());
    }

    #[test]
    fn ports_and_gateways() {
        assert_eq!(port(80, false), Ok(80));
        assert!(port(0, false).is_err());
        assert_eq!(port(0, true), Ok(0));
        assert!(port(65_536, true).is_err());
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        let gw = gateway(GatewayTarget::Address(ip), 15008).unwrap();
        assert_eq!(gw.hbone_mtls_port, 15008);
        assert!(matches!(
            gateway(GatewayTarget::Address(ip), 0),
            Err(GatewayProblem::Port(_))
        ));
        let nameless = GatewayTarget::Hostname {
            namespace: "ns".into(),
            hostname: String::new(),
        };
        assert!(matches!(
            gateway(nameless, 15008),
            Err(GatewayProblem::Hostname(_))
        ));
    }

    #[test]
    fn waypoint_labels_own_first_then_namespace_and_none_opts_out() {
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let host = |r: Result<Option<GatewayAddress>, String>| match r {
            Ok(Some(GatewayAddress {
                destination: GatewayDestination::Hostname(h),
                hbone_mtls_port: 15008,
            })) => Some(h.to_string()),
            Ok(None) => None,
            other => panic!("unexpected {other:?}"),
        };
        let none = labels(&[]);
        let ns_wp = labels(&[(USE_WAYPOINT_LABEL, "ns-wp")]);
        let ns_wp_elsewhere = labels(&[
            (USE_WAYPOINT_LABEL, "shared"),
            (USE_WAYPOINT_NAMESPACE_LABEL, "infra"),
        ]);
        let own = labels(&[(USE_WAYPOINT_LABEL, "wp")]);
        let opt_out = labels(&[(USE_WAYPOINT_LABEL, "none")]);
        let own_elsewhere = labels(&[
            (USE_WAYPOINT_LABEL, "wp"),
            (USE_WAYPOINT_NAMESPACE_LABEL, "infra"),
        ]);
        type Labels = BTreeMap<String, String>;
        let cases: &[(&Labels, Option<&Labels>, Option<&str>)] = &[
            (&none, None, None),
            (&none, Some(&none), None),
            (&own, None, Some("shop/wp.shop.svc.cluster.local")),
            (&own, Some(&ns_wp), Some("shop/wp.shop.svc.cluster.local")),
            (
                &none,
                Some(&ns_wp),
                Some("shop/ns-wp.shop.svc.cluster.local"),
            ),
            (
                &none,
                Some(&ns_wp_elsewhere),
                Some("infra/shared.infra.svc.cluster.local"),
            ),
            (
                &own_elsewhere,
                Some(&ns_wp),
                Some("infra/wp.infra.svc.cluster.local"),
            ),
            (&opt_out, Some(&ns_wp), None),
            (&opt_out, None, None),
            // A pod: the namespace label does not apply.
            (&none, None, None),
        ];
        for (i, (own, ns, want)) in cases.iter().enumerate() {
            assert_eq!(
                host(waypoint_from_labels(own, *ns, "shop")).as_deref(),
                *want,
                "case {i}"
            );
        }
        for (bad, what) in [
            (
                labels(&[(USE_WAYPOINT_LABEL, "")]),
                "label istio.io/use-waypoint \"\"",
            ),
            (
                labels(&[(USE_WAYPOINT_LABEL, "Wp")]),
                "\"Wp\" is not a name",
            ),
            (
                labels(&[
                    (USE_WAYPOINT_LABEL, "wp"),
                    (USE_WAYPOINT_NAMESPACE_LABEL, "a/b"),
                ]),
                "label istio.io/use-waypoint-namespace \"a/b\" is not a name",
            ),
        ] {
            let err = waypoint_from_labels(&bad, None, "shop").unwrap_err();
            assert!(err.contains(what), "{err}");
        }
        let bad_ns = labels(&[(USE_WAYPOINT_LABEL, "-wp")]);
        let err = waypoint_from_labels(&none, Some(&bad_ns), "shop").unwrap_err();
        assert!(
            err.starts_with("namespace label istio.io/use-waypoint"),
            "{err}"
        );
    }

    #[test]
    fn enumerations_take_both_spellings() {
        assert_eq!(scope("Namespace"), scope("NAMESPACE"));
        assert_eq!(action("Deny"), Some(Action::Deny));
        assert_eq!(action("DENY"), Some(Action::Deny));
        assert_eq!(health("UNHEALTHY"), Some(HealthStatus::Unhealthy));
        assert_eq!(protocol("LEGACY_ISTIO_MTLS"), Some(Protocol::Tcp));
        assert_eq!(protocol("QUIC"), None);
        assert!(cidr("10.0.0.0".parse().unwrap(), 33).is_err());
        assert!(cidr("10.0.0.0".parse().unwrap(), 8).is_ok());
    }
}
