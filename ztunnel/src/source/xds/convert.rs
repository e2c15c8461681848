//! Workload API resources (`istio.workload.Address`, `istio.security.Authorization`) to the
//! internal model. Pure: no I/O, no state. Every problem found in a resource is reported,
//! each naming the field (the protobuf field name, with list indexes), so a NACK tells the
//! operator exactly what istiod sent that this data plane cannot use.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::identity::Identity;
use crate::proto::istio::security as pbs;
use crate::proto::istio::workload as pbw;
use crate::state::policy::{Cidr, Match, ServiceAccountMatch, StringMatch};
use crate::state::workload::{GatewayAddress, GatewayDestination, HealthStatus};
use crate::state::{Action, Authorization, NamespacedHostname, Protocol, Scope, Service, Workload};

/// Istio's defaults for fields istiod may leave empty.
const DEFAULT_SERVICE_ACCOUNT: &str = "default";
const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

/// Why a resource was rejected: which resource, and every problem in it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{resource}: {}", problems.join("; "))]
pub struct ConvertError {
    /// e.g. `workload "Kubernetes//Pod/default/echo-1"` or `policy "default/deny"`.
    pub resource: String,
    /// e.g. `addresses[0]: 5 bytes is not an IP address`.
    pub problems: Vec<String>,
}

/// What an `istio.workload.Address` resource holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressResource {
    Workload(Workload),
    Service(Service),
}

/// Collects the problems of one resource.
struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, field: impl fmt::Display, what: impl fmt::Display) {
        self.0.push(format!("{field}: {what}"));
    }

    fn finish<T>(self, resource: String, value: impl FnOnce() -> T) -> Result<T, ConvertError> {
        if self.0.is_empty() {
            Ok(value())
        } else {
            Err(ConvertError {
                resource,
                problems: self.0,
            })
        }
    }
}

/// Converts the resource named `name`. `trust_domain` fills in a workload's elided trust
/// domain (istiod leaves the mesh default out).
pub fn address(
    name: &str,
    pb: pbw::Address,
    trust_domain: &str,
) -> Result<AddressResource, ConvertError> {
    match pb.r#type {
        Some(pbw::address::Type::Workload(w)) => {
            workload(w, trust_domain).map(AddressResource::Workload)
        }
        Some(pbw::address::Type::Service(s)) => service(s).map(AddressResource::Service),
        None => Err(ConvertError {
            resource: format!("address {name:?}"),
            problems: vec!["type: neither workload nor service is set".to_owned()],
        }),
    }
}

fn ip_from_bytes(bytes: &[u8]) -> Result<IpAddr, String> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        Ok(IpAddr::V4(Ipv4Addr::from(v4)))
    } else if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
        Ok(IpAddr::V6(Ipv6Addr::from(v6)))
    } else {
        Err(format!("{} bytes is not an IP address", bytes.len()))
    }
}

fn port16(value: u32, allow_zero: bool) -> Result<u16, String> {
    match u16::try_from(value) {
        Ok(p) if p != 0 || allow_zero => Ok(p),
        _ if allow_zero => Err(format!("{value} is not a port (0 to 65535)")),
        _ => Err(format!("{value} is not a port (1 to 65535)")),
    }
}

/// An identity part must be non-empty, without `/` or whitespace (see `Identity::new`).
fn identity_part(field: &str, value: &str, p: &mut Problems) {
    if value.is_empty() || value.contains('/') || value.contains(char::is_whitespace) {
        p.add(
            field,
            format!("{value:?} must be non-empty, without '/' or spaces (it is part of the SPIFFE identity)"),
        );
    }
}

fn or_default(v: String, default: &str) -> String {
    if v.is_empty() { default.to_owned() } else { v }
}

pub fn workload(pb: pbw::Workload, trust_domain: &str) -> Result<Workload, ConvertError> {
    let resource = format!("workload {:?}", pb.uid);
    let mut p = Problems(Vec::new());
    if pb.uid.is_empty() {
        p.add("uid", "is required");
    }
    let td = or_default(pb.trust_domain, trust_domain);
    let sa = or_default(pb.service_account, DEFAULT_SERVICE_ACCOUNT);
    identity_part("namespace", &pb.namespace, &mut p);
    identity_part("service_account", &sa, &mut p);
    identity_part("trust_domain", &td, &mut p);

    let mut ips = Vec::new();
    for (i, a) in pb.addresses.iter().enumerate() {
        match ip_from_bytes(a) {
            Ok(ip) => ips.push(ip),
            Err(e) => p.add(format_args!("addresses[{i}]"), e),
        }
    }
    let protocol = match pbw::TunnelProtocol::try_from(pb.tunnel_protocol) {
        Ok(pbw::TunnelProtocol::Hbone) => Protocol::Hbone,
        // A sidecar (LEGACY_ISTIO_MTLS) does its own mTLS; to this data plane it is a plain
        // TCP destination, as a workload outside the mesh is.
        Ok(pbw::TunnelProtocol::None | pbw::TunnelProtocol::LegacyIstioMtls) => Protocol::Tcp,
        Err(_) => {
            p.add(
                "tunnel_protocol",
                format!("unknown value {}", pb.tunnel_protocol),
            );
            Protocol::Tcp
        }
    };
    let status = match pbw::WorkloadStatus::try_from(pb.status) {
        Ok(pbw::WorkloadStatus::Healthy) => HealthStatus::Healthy,
        Ok(pbw::WorkloadStatus::Unhealthy) => HealthStatus::Unhealthy,
        Err(_) => {
            p.add("status", format!("unknown value {}", pb.status));
            HealthStatus::Healthy
        }
    };

    let mut services = BTreeMap::new();
    // Sorted, so the problems come out in the same order every time.
    let mut entries: Vec<_> = pb.services.into_iter().collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    for (key, list) in entries {
        let Ok(nh) = key.parse::<NamespacedHostname>() else {
            p.add(
                format_args!("services[{key:?}]"),
                "key is not <namespace>/<hostname>",
            );
            continue;
        };
        let mut map = BTreeMap::new();
        for (j, port) in list.ports.iter().enumerate() {
            let at = format!("services[{key:?}].ports[{j}]");
            match (
                port16(port.service_port, false),
                port16(port.target_port, true),
            ) {
                (Ok(sp), Ok(tp)) => {
                    map.insert(sp, tp);
                }
                (Err(e), _) => p.add(format_args!("{at}.service_port"), e),
                (_, Err(e)) => p.add(format_args!("{at}.target_port"), e),
            }
        }
        services.insert(nh, map);
    }
    for (i, key) in pb.authorization_policies.iter().enumerate() {
        if key
            .split_once('/')
            .is_none_or(|(ns, n)| ns.is_empty() || n.is_empty())
        {
            p.add(
                format_args!("authorization_policies[{i}]"),
                format!("{key:?} is not <namespace>/<name>"),
            );
        }
    }
    let waypoint = pb.waypoint.and_then(|g| gateway("waypoint", g, &mut p));

    let mut labels = BTreeMap::new();
    // Istio's canonical name and revision are what telemetry calls app and version.
    if !pb.canonical_name.is_empty() {
        labels.insert(
            "service.istio.io/canonical-name".to_owned(),
            pb.canonical_name.clone(),
        );
        labels.insert("app".to_owned(), pb.canonical_name);
    }
    if !pb.canonical_revision.is_empty() {
        labels.insert(
            "service.istio.io/canonical-revision".to_owned(),
            pb.canonical_revision.clone(),
        );
        labels.insert("version".to_owned(), pb.canonical_revision);
    }

    let identity = match Identity::new(td, pb.namespace, sa) {
        Ok(id) => Some(id),
        Err(e) => {
            // Already reported field by field above; this only catches what they missed.
            if p.0.is_empty() {
                p.add("identity", e);
            }
            None
        }
    };
    let (Some(identity), true) = (identity, p.0.is_empty()) else {
        return Err(ConvertError {
            resource,
            problems: p.0,
        });
    };
    let mut w = Workload::new(pb.uid, pb.name, identity);
    w.workload_ips = ips;
    w.protocol = protocol;
    w.status = status;
    w.node = pb.node;
    w.cluster_id = or_default(pb.cluster_id, DEFAULT_CLUSTER_ID);
    w.services = services;
    w.labels = labels;
    w.authorization_policies = pb.authorization_policies;
    w.waypoint = waypoint;
    Ok(w)
}

fn gateway(field: &str, g: pbw::GatewayAddress, p: &mut Problems) -> Option<GatewayAddress> {
    let port = match port16(g.hbone_mtls_port, false) {
        Ok(port) => port,
        Err(e) => {
            p.add(format_args!("{field}.hbone_mtls_port"), e);
            return None;
        }
    };
    let destination = match g.destination {
        Some(pbw::gateway_address::Destination::Address(a)) => match ip_from_bytes(&a.address) {
            Ok(ip) => GatewayDestination::Address(ip),
            Err(e) => {
                p.add(format_args!("{field}.address.address"), e);
                return None;
            }
        },
        Some(pbw::gateway_address::Destination::Hostname(h)) => {
            if h.namespace.is_empty() || h.hostname.is_empty() {
                p.add(
                    format_args!("{field}.hostname"),
                    "namespace and hostname are required",
                );
                return None;
            }
            GatewayDestination::Hostname(NamespacedHostname {
                namespace: h.namespace,
                hostname: h.hostname,
            })
        }
        None => {
            p.add(
                format_args!("{field}.destination"),
                "neither address nor hostname is set",
            );
            return None;
        }
    };
    Some(GatewayAddress {
        destination,
        hbone_mtls_port: port,
    })
}

pub fn service(pb: pbw::Service) -> Result<Service, ConvertError> {
    let resource = format!("service \"{}/{}\"", pb.namespace, pb.hostname);
    let mut p = Problems(Vec::new());
    for (field, v) in [
        ("name", &pb.name),
        ("namespace", &pb.namespace),
        ("hostname", &pb.hostname),
    ] {
        if v.is_empty() {
            p.add(field, "is required");
        }
    }
    let mut vips = Vec::new();
    for (i, a) in pb.addresses.iter().enumerate() {
        match ip_from_bytes(&a.address) {
            Ok(ip) => vips.push(ip),
            Err(e) => p.add(format_args!("addresses[{i}].address"), e),
        }
    }
    let mut ports = BTreeMap::new();
    for (i, port) in pb.ports.iter().enumerate() {
        match (
            port16(port.service_port, false),
            port16(port.target_port, true),
        ) {
            (Ok(sp), Ok(tp)) => {
                ports.insert(sp, tp);
            }
            (Err(e), _) => p.add(format_args!("ports[{i}].service_port"), e),
            (_, Err(e)) => p.add(format_args!("ports[{i}].target_port"), e),
        }
    }
    let waypoint = pb.waypoint.and_then(|g| gateway("waypoint", g, &mut p));
    p.finish(resource, || Service {
        name: pb.name,
        namespace: pb.namespace,
        hostname: pb.hostname,
        vips,
        ports,
        subject_alt_names: pb.subject_alt_names,
        waypoint,
    })
}

pub fn authorization(pb: pbs::Authorization) -> Result<Authorization, ConvertError> {
    let resource = format!("policy \"{}/{}\"", pb.namespace, pb.name);
    let mut p = Problems(Vec::new());
    for (field, v) in [("name", &pb.name), ("namespace", &pb.namespace)] {
        if v.is_empty() {
            p.add(field, "is required");
        }
    }
    let scope = match pbs::Scope::try_from(pb.scope) {
        Ok(pbs::Scope::Global) => Scope::Global,
        Ok(pbs::Scope::Namespace) => Scope::Namespace,
        Ok(pbs::Scope::WorkloadSelector) => Scope::WorkloadSelector,
        Err(_) => {
            p.add("scope", format!("unknown value {}", pb.scope));
            Scope::Global
        }
    };
    let action = match pbs::Action::try_from(pb.action) {
        Ok(pbs::Action::Allow) => Action::Allow,
        Ok(pbs::Action::Deny) => Action::Deny,
        Err(_) => {
            p.add("action", format!("unknown value {}", pb.action));
            Action::Allow
        }
    };
    let mut rules = Vec::new();
    for (ri, rule) in pb.rules.into_iter().enumerate() {
        let mut clauses = Vec::new();
        for (ci, clause) in rule.clauses.into_iter().enumerate() {
            let mut matches = Vec::new();
            for (mi, m) in clause.matches.into_iter().enumerate() {
                let at = format!("rules[{ri}].clauses[{ci}].matches[{mi}]");
                matches.push(rbac_match(&at, m, &mut p));
            }
            clauses.push(matches);
        }
        rules.push(clauses);
    }
    p.finish(resource, || Authorization {
        name: pb.name,
        namespace: pb.namespace,
        scope,
        action,
        rules,
        dry_run: pb.dry_run,
    })
}

fn rbac_match(at: &str, m: pbs::Match, p: &mut Problems) -> Match {
    let mut strings = |field: &str, v: Vec<pbs::StringMatch>| -> Vec<StringMatch> {
        let mut out = Vec::new();
        for (i, s) in v.into_iter().enumerate() {
            use pbs::string_match::MatchType;
            match s.match_type {
                Some(MatchType::Exact(x)) => out.push(StringMatch::Exact(x)),
                Some(MatchType::Prefix(x)) => out.push(StringMatch::Prefix(x)),
                Some(MatchType::Suffix(x)) => out.push(StringMatch::Suffix(x)),
                Some(MatchType::Presence(())) => out.push(StringMatch::Presence),
                None => p.add(
                    format_args!("{at}.{field}[{i}]"),
                    "match_type is not set (exact, prefix, suffix or presence)",
                ),
            }
        }
        out
    };
    let namespaces = strings("namespaces", m.namespaces);
    let not_namespaces = strings("not_namespaces", m.not_namespaces);
    let principals = strings("principals", m.principals);
    let not_principals = strings("not_principals", m.not_principals);
    let sas = |v: Vec<pbs::ServiceAccountMatch>| -> Vec<ServiceAccountMatch> {
        v.into_iter()
            .map(|s| ServiceAccountMatch {
                namespace: s.namespace,
                service_account: s.service_account,
            })
            .collect()
    };
    let mut cidrs = |field: &str, v: Vec<pbs::Address>| -> Vec<Cidr> {
        let mut out = Vec::new();
        for (i, a) in v.iter().enumerate() {
            let here = format!("{at}.{field}[{i}]");
            let ip = match ip_from_bytes(&a.address) {
                Ok(ip) => ip,
                Err(e) => {
                    p.add(format_args!("{here}.address"), e);
                    continue;
                }
            };
            match u8::try_from(a.length).ok().and_then(|l| Cidr::new(ip, l)) {
                Some(c) => out.push(c),
                None => p.add(
                    format_args!("{here}.length"),
                    format!("{} is longer than the address {ip}", a.length),
                ),
            }
        }
        out
    };
    let source_ips = cidrs("source_ips", m.source_ips);
    let not_source_ips = cidrs("not_source_ips", m.not_source_ips);
    let destination_ips = cidrs("destination_ips", m.destination_ips);
    let not_destination_ips = cidrs("not_destination_ips", m.not_destination_ips);
    let mut ports = |field: &str, v: Vec<u32>| -> Vec<u16> {
        let mut out = Vec::new();
        for (i, port) in v.into_iter().enumerate() {
            match port16(port, false) {
                Ok(port) => out.push(port),
                Err(e) => p.add(format_args!("{at}.{field}[{i}]"), e),
            }
        }
        out
    };
    let destination_ports = ports("destination_ports", m.destination_ports);
    let not_destination_ports = ports("not_destination_ports", m.not_destination_ports);
    Match {
        namespaces,
        not_namespaces,
        service_accounts: sas(m.service_accounts),
        not_service_accounts: sas(m.not_service_accounts),
        principals,
        not_principals,
        source_ips,
        not_source_ips,
        destination_ips,
        not_destination_ips,
        destination_ports,
        not_destination_ports,
    }
}

#[cfg(test)]
mod tests;
