//! Workload API resources (`istio.workload.Address`, `istio.security.Authorization`) to the
//! internal model. Pure: no I/O, no state. Every problem found in a resource is reported,
//! each naming the field (the protobuf field name, with list indexes), so a NACK tells the
//! operator exactly what istiod sent that this data plane cannot use.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::proto::istio::security as pbs;
use crate::proto::istio::workload as pbw;
use crate::source::validate::{
    self, DEFAULT_CLUSTER_ID, GatewayProblem, GatewayTarget, Problems, or_default,
};
use crate::state::policy::{Cidr, Match, ServiceAccountMatch, StringMatch};
use crate::state::workload::GatewayAddress;
use crate::state::{Action, Authorization, NamespacedHostname, Protocol, Scope, Service, Workload};

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

/// The resource's value, or every problem found in it.
fn finish<T>(p: Problems, resource: String, value: impl FnOnce() -> T) -> Result<T, ConvertError> {
    if p.is_empty() {
        Ok(value())
    } else {
        Err(ConvertError {
            resource,
            problems: p.into_vec(),
        })
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

use validate::port as port16;

/// An enumeration value by its protobuf name (what `validate` reads), or the problem.
fn enum_name<E: TryFrom<i32>>(
    field: &str,
    value: i32,
    name: impl Fn(&E) -> &'static str,
    p: &mut Problems,
) -> &'static str {
    match E::try_from(value) {
        Ok(e) => name(&e),
        Err(_) => {
            p.add(field, format!("unknown value {value}"));
            ""
        }
    }
}

pub fn workload(pb: pbw::Workload, trust_domain: &str) -> Result<Workload, ConvertError> {
    let resource = format!("workload {:?}", pb.uid);
    let mut p = Problems::default();
    if pb.uid.is_empty() {
        p.add("uid", "is required");
    }
    let identity = validate::workload_identity(
        ("trust_domain", pb.trust_domain),
        ("namespace", pb.namespace),
        ("service_account", pb.service_account),
        trust_domain,
        |field, what| p.add(field, what),
    );

    let mut ips = Vec::new();
    for (i, a) in pb.addresses.iter().enumerate() {
        match ip_from_bytes(a) {
            Ok(ip) => ips.push(ip),
            Err(e) => p.add(format_args!("addresses[{i}]"), e),
        }
    }
    let protocol = enum_name(
        "tunnel_protocol",
        pb.tunnel_protocol,
        pbw::TunnelProtocol::as_str_name,
        &mut p,
    );
    let protocol = validate::protocol(protocol).unwrap_or(Protocol::Tcp);
    let status = enum_name(
        "status",
        pb.status,
        pbw::WorkloadStatus::as_str_name,
        &mut p,
    );
    let status = validate::health(status).unwrap_or_default();

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
    validate::add_canonical_labels(&mut labels, pb.canonical_name, pb.canonical_revision);

    let (Some(identity), true) = (identity, p.is_empty()) else {
        return Err(ConvertError {
            resource,
            problems: p.into_vec(),
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
    let target = match g.destination {
        Some(pbw::gateway_address::Destination::Address(a)) => match ip_from_bytes(&a.address) {
            Ok(ip) => GatewayTarget::Address(ip),
            Err(e) => {
                p.add(format_args!("{field}.address.address"), e);
                return None;
            }
        },
        Some(pbw::gateway_address::Destination::Hostname(h)) => GatewayTarget::Hostname {
            namespace: h.namespace,
            hostname: h.hostname,
        },
        None => {
            p.add(
                format_args!("{field}.destination"),
                "neither address nor hostname is set",
            );
            return None;
        }
    };
    match validate::gateway(target, g.hbone_mtls_port) {
        Ok(gw) => Some(gw),
        Err(GatewayProblem::Port(e)) => {
            p.add(format_args!("{field}.hbone_mtls_port"), e);
            None
        }
        Err(GatewayProblem::Hostname(e)) => {
            p.add(format_args!("{field}.hostname"), e);
            None
        }
    }
}

pub fn service(pb: pbw::Service) -> Result<Service, ConvertError> {
    let resource = format!("service \"{}/{}\"", pb.namespace, pb.hostname);
    let mut p = Problems::default();
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
    let mut app_protocols = BTreeMap::new();
    for (i, port) in pb.ports.iter().enumerate() {
        match (
            port16(port.service_port, false),
            port16(port.target_port, true),
        ) {
            (Ok(sp), Ok(tp)) => {
                ports.insert(sp, tp);
                if let Some(proto) = app_protocol(port.app_protocol) {
                    app_protocols.insert(sp, proto);
                }
            }
            (Err(e), _) => p.add(format_args!("ports[{i}].service_port"), e),
            (_, Err(e)) => p.add(format_args!("ports[{i}].target_port"), e),
        }
    }
    let waypoint = pb.waypoint.and_then(|g| gateway("waypoint", g, &mut p));
    finish(p, resource, || Service {
        name: pb.name,
        namespace: pb.namespace,
        hostname: pb.hostname,
        vips,
        ports,
        subject_alt_names: pb.subject_alt_names,
        waypoint,
        app_protocols,
    })
}

/// The workload API's `AppProtocol` (`UNKNOWN`: none declared).
fn app_protocol(value: i32) -> Option<crate::state::service::AppProtocol> {
    use crate::state::service::AppProtocol;
    match pbw::AppProtocol::try_from(value).ok()? {
        pbw::AppProtocol::Unknown => None,
        pbw::AppProtocol::Http11 => Some(AppProtocol::Http11),
        pbw::AppProtocol::Http2 => Some(AppProtocol::Http2),
        pbw::AppProtocol::Grpc => Some(AppProtocol::Grpc),
        pbw::AppProtocol::Tcp | pbw::AppProtocol::Tls => Some(AppProtocol::Tcp),
    }
}

pub fn authorization(pb: pbs::Authorization) -> Result<Authorization, ConvertError> {
    let resource = format!("policy \"{}/{}\"", pb.namespace, pb.name);
    let mut p = Problems::default();
    for (field, v) in [("name", &pb.name), ("namespace", &pb.namespace)] {
        if v.is_empty() {
            p.add(field, "is required");
        }
    }
    let scope = enum_name("scope", pb.scope, pbs::Scope::as_str_name, &mut p);
    let scope = validate::scope(scope).unwrap_or(Scope::Global);
    let action = enum_name("action", pb.action, pbs::Action::as_str_name, &mut p);
    let action = validate::action(action).unwrap_or(Action::Allow);
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
    finish(p, resource, || Authorization {
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
            match validate::cidr(ip, a.length) {
                Ok(c) => out.push(c),
                Err(e) => p.add(format_args!("{here}.length"), e),
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
