//! The local-mode config file: the mesh described in YAML, with the top-level keys and field
//! names of Istio ztunnel's local config (`workloads`, `services`, `policies`, camelCase
//! fields, e.g. `examples/localhost.yaml` in istio/ztunnel), plus extensions of ours:
//! `namespaces: [{name, labels}]` (the `istio.io/dataplane-mode` enrolment label), a
//! per-workload `netns` (the path of the pod's network namespace) and `labels`, and
//! per-service `labels`. Istio's `istio.io/use-waypoint` labels (on a service, its
//! namespace, or a pod) are resolved here into the `waypoint` the workload API would carry,
//! so the data path reads only `Service::waypoint` / `Workload::waypoint`.
//!
//! Parsing is two steps: serde-saphyr turns text into loosely typed `Raw*` structs (syntax
//! errors and unknown fields are reported with line:column), then `convert` checks every value
//! and builds the `State`, collecting every problem with the item and field it is about.
//! Fields Istio defines that this data plane does not use yet are accepted and ignored, so an
//! Istio file loads unchanged; anything else is rejected by name.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use self::raw::{
    RawConfig, RawGatewayAddress, RawMatch, RawPolicy, RawService, RawServiceAccountMatch,
    RawStringMatch, RawWorkload,
};
use crate::identity::Identity;
use crate::source::validate::{
    self, DEFAULT_CLUSTER_ID, DEFAULT_TRUST_DOMAIN, GatewayProblem, GatewayTarget, or_default,
};
use crate::state::policy::{Cidr, Match, ServiceAccountMatch, StringMatch};
use crate::state::workload::{GatewayAddress, HealthStatus};
use crate::state::{
    Authorization, Namespace, NamespacedHostname, Protocol, Service, State, Workload,
};

/// A config file larger than this is refused before parsing (a mesh of thousands of workloads
/// fits in a few MiB).
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// Why a local config file was not applied. The message names the file, then where in it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {size} bytes is more than the {MAX_FILE_BYTES} bytes a config file may have")]
    TooLarge { file: String, size: u64 },
    /// Not YAML, or YAML of the wrong shape (unknown field, wrong type).
    #[error("{file}:{}: {message}", location.map(|(l, c)| format!("{l}:{c}")).unwrap_or_else(|| "?".into()))]
    Syntax {
        file: String,
        /// Line and column, 1-based, when the parser knows them.
        location: Option<(u64, u64)>,
        message: String,
    },
    /// Well-formed YAML with values that are wrong; every problem found is listed.
    #[error("{}", Problems(file, problems))]
    Invalid { file: String, problems: Vec<String> },
}

struct Problems<'a>(&'a str, &'a [String]);

impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.1.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}: {p}", self.0)?;
        }
        Ok(())
    }
}

/// Reads and validates the file at `path`.
pub fn load(path: &Path) -> Result<State, LocalConfigError> {
    let file = path.display().to_string();
    let read_err = |source| LocalConfigError::Read {
        file: file.clone(),
        source,
    };
    let size = std::fs::metadata(path).map_err(read_err)?.len();
    if size > MAX_FILE_BYTES {
        return Err(LocalConfigError::TooLarge { file, size });
    }
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    parse(&file, &text)
}

/// Validates `text`; `file` is the name errors carry.
pub fn parse(file: &str, text: &str) -> Result<State, LocalConfigError> {
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(LocalConfigError::TooLarge {
            file: file.to_owned(),
            size: text.len() as u64,
        });
    }
    // Tighter limits than the defaults: a mesh description needs no alias bombs or deep
    // nesting, and one document only.
    let options = serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_documents: 1,
            max_depth: 64,
            max_aliases: 1_000,
            max_anchors: 1_000,
            max_events: 2_000_000,
        },
        with_snippet: false,
    };
    let raw: RawConfig = if text.trim().is_empty() {
        RawConfig::default()
    } else {
        serde_saphyr::from_str_with_options(text, options).map_err(|e| syntax_error(file, &e))?
    };
    convert(raw).map_err(|problems| LocalConfigError::Invalid {
        file: file.to_owned(),
        problems,
    })
}

fn syntax_error(file: &str, e: &serde_saphyr::Error) -> LocalConfigError {
    let location = e
        .location()
        .filter(|l| l.line() > 0)
        .map(|l| (l.line(), l.column()));
    let mut message = e.to_string();
    // The parser's message may repeat the position; ours leads with it already.
    if let Some((line, col)) = location {
        for suffix in [
            format!(" at line {line} column {col}"),
            format!(" at line {line}, column {col}"),
        ] {
            if let Some(stripped) = message.strip_suffix(&suffix) {
                message = stripped.to_owned();
            }
        }
    }
    LocalConfigError::Syntax {
        file: file.to_owned(),
        location,
        message,
    }
}

// ---- validation and conversion ---------------------------------------------------------

/// Collects problems; `at` is the item ("workloads[2] (name \"echo\")").
type Report = validate::Problems;

fn item(kind: &str, i: usize, name: &str) -> String {
    if name.is_empty() {
        format!("{kind}[{i}]")
    } else {
        format!("{kind}[{i}] (name {name:?})")
    }
}

fn convert(raw: RawConfig) -> Result<State, Vec<String>> {
    let mut r = Report::default();
    let mut b = State::builder();

    // Services read their namespace's labels (`istio.io/use-waypoint`).
    let mut namespace_labels: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (i, ns) in raw.namespaces.into_iter().enumerate() {
        let at = item("namespaces", i, &ns.name);
        if ns.name.is_empty() {
            r.add(&at, "name is required");
            continue;
        }
        namespace_labels
            .entry(ns.name.clone())
            .or_insert_with(|| ns.labels.clone());
        let ns = Namespace {
            name: ns.name,
            labels: ns.labels,
        };
        if let Err(e) = b.namespace(ns) {
            r.add(&at, e);
        }
    }

    let policy_keys: Vec<String> = raw
        .policies
        .iter()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect();
    for (i, p) in raw.policies.into_iter().enumerate() {
        let at = item("policies", i, &p.name);
        if let Some(p) = policy(&at, p, &mut r)
            && let Err(e) = b.policy(p)
        {
            r.add(&at, e);
        }
    }

    let mut service_keys = Vec::new();
    for (i, s) in raw.services.into_iter().enumerate() {
        let at = item("services", i, &s.name);
        let ns_labels = namespace_labels.get(&s.namespace);
        if let Some(s) = service(&at, s, ns_labels, &mut r) {
            service_keys.push(s.key());
            if let Err(e) = b.service(s) {
                r.add(&at, e);
            }
        }
    }

    for (i, w) in raw.workloads.into_iter().enumerate() {
        let at = item("workloads", i, &w.name);
        if let Some(w) = workload(&at, w, &service_keys, &policy_keys, &mut r)
            && let Err(e) = b.workload(w)
        {
            r.add(&at, e);
        }
    }

    if r.is_empty() {
        Ok(b.build())
    } else {
        Err(r.into_vec())
    }
}

fn port(value: &str) -> Option<u16> {
    value.trim().parse().ok()
}

fn workload(
    at: &str,
    w: RawWorkload,
    service_keys: &[NamespacedHostname],
    policy_keys: &[String],
    r: &mut Report,
) -> Option<Workload> {
    let before = r.len();
    if w.name.is_empty() {
        r.add(at, "name is required");
    }
    let cluster_id = or_default(w.cluster_id, DEFAULT_CLUSTER_ID);
    let namespace = w.namespace.clone();
    let identity = validate::workload_identity(
        ("trustDomain", w.trust_domain),
        ("namespace", w.namespace),
        ("serviceAccount", w.service_account),
        DEFAULT_TRUST_DOMAIN,
        |field, what| r.add(at, format!("{field} {what}")),
    );

    let mut ips = Vec::new();
    for (j, ip) in w.workload_ips.iter().enumerate() {
        match ip.parse::<IpAddr>() {
            Ok(addr) => ips.push(addr),
            Err(_) => r.add(at, format!("workloadIps[{j}] {ip:?} is not an IP address")),
        }
    }
    let protocol = match w.protocol.as_deref().map(|p| (p, validate::protocol(p))) {
        None => Protocol::Tcp,
        Some((_, Some(protocol))) => protocol,
        Some((other, None)) => {
            r.add(at, format!("protocol {other:?} is not one of HBONE, TCP"));
            Protocol::Tcp
        }
    };
    let status = match w.status.as_deref().map(|s| (s, validate::health(s))) {
        None => HealthStatus::Healthy,
        Some((_, Some(status))) => status,
        Some((other, None)) => {
            r.add(
                at,
                format!("status {other:?} is not one of Healthy, Unhealthy"),
            );
            HealthStatus::Healthy
        }
    };

    let mut services = BTreeMap::new();
    for (key, ports) in w.services {
        let Ok(nh) = key.parse::<NamespacedHostname>() else {
            r.add(
                at,
                format!("services key {key:?} is not <namespace>/<hostname>"),
            );
            continue;
        };
        if !service_keys.contains(&nh) {
            r.add(
                at,
                format!("services key {key:?} names no service in this file"),
            );
        }
        let mut map = BTreeMap::new();
        for (sp, tp) in ports {
            match (port(&sp).filter(|p| *p != 0), port(&tp)) {
                (Some(sp), Some(tp)) => {
                    map.insert(sp, tp);
                }
                (None, _) => r.add(
                    at,
                    format!("services[{key:?}]: service port {sp:?} is not a number from 1 to 65535"),
                ),
                (_, None) => r.add(
                    at,
                    format!("services[{key:?}][{sp}]: target port {tp:?} is not a number from 0 to 65535"),
                ),
            }
        }
        services.insert(nh, map);
    }

    for (j, p) in w.authorization_policies.iter().enumerate() {
        if !policy_keys.contains(p) {
            r.add(
                at,
                format!("authorizationPolicies[{j}] {p:?} names no policy (<namespace>/<name>) in this file"),
            );
        }
    }
    let waypoint = waypoint(at, w.waypoint, &w.labels, None, &namespace, r);
    let netns = match w.netns {
        Some(p) if !Path::new(&p).is_absolute() => {
            r.add(at, format!("netns {p:?} is not an absolute path"));
            None
        }
        p => p.map(PathBuf::from),
    };

    if r.len() != before {
        return None;
    }
    let identity = identity?;
    let uid = if w.uid.is_empty() {
        format!("{cluster_id}//v1/Pod/{namespace}/{}", w.name)
    } else {
        w.uid
    };
    let mut labels = w.labels;
    validate::add_canonical_labels(&mut labels, w.canonical_name, w.canonical_revision);

    let mut out = Workload::new(uid, w.name, identity);
    out.workload_ips = ips;
    out.protocol = protocol;
    out.status = status;
    out.node = w.node;
    out.cluster_id = cluster_id;
    out.services = services;
    out.labels = labels;
    out.authorization_policies = w.authorization_policies;
    out.waypoint = waypoint;
    out.netns = netns;
    Some(out)
}

/// Istio's `NetworkAddress` text: `network/ip`, the network possibly empty; a bare IP too.
fn network_address(s: &str) -> Option<IpAddr> {
    let ip = s.rsplit_once('/').map_or(s, |(_, ip)| ip);
    ip.parse().ok()
}

fn gateway(at: &str, field: &str, g: RawGatewayAddress, r: &mut Report) -> Option<GatewayAddress> {
    // Istio tries the address form first, then the hostname form.
    let target = if let Some(ip) = network_address(&g.destination) {
        GatewayTarget::Address(ip)
    } else if let Ok(nh) = g.destination.parse::<NamespacedHostname>() {
        GatewayTarget::Hostname {
            namespace: nh.namespace,
            hostname: nh.hostname,
        }
    } else {
        r.add(
            at,
            format!(
                "{field}.destination {:?} is neither <network>/<ip> nor <namespace>/<hostname>",
                g.destination
            ),
        );
        return None;
    };
    match validate::gateway(target, u32::from(g.hbone_mtls_port)) {
        Ok(gw) => Some(gw),
        Err(GatewayProblem::Port(e)) => {
            r.add(at, format!("{field}.hboneMtlsPort: {e}"));
            None
        }
        Err(GatewayProblem::Hostname(e)) => {
            r.add(at, format!("{field}.destination: {e}"));
            None
        }
    }
}

/// The waypoint of an item: its `waypoint` field as Istio writes it, or else the one its
/// `istio.io/use-waypoint` labels name (see `validate::waypoint_from_labels`). Both on the
/// item itself is a conflict, reported.
fn waypoint(
    at: &str,
    field: Option<RawGatewayAddress>,
    labels: &BTreeMap<String, String>,
    namespace_labels: Option<&BTreeMap<String, String>>,
    namespace: &str,
    r: &mut Report,
) -> Option<GatewayAddress> {
    if let Some(g) = field {
        if labels.contains_key(validate::USE_WAYPOINT_LABEL) {
            r.add(
                at,
                format!(
                    "waypoint and the label {} are both set: keep one",
                    validate::USE_WAYPOINT_LABEL
                ),
            );
            return None;
        }
        return gateway(at, "waypoint", g, r);
    }
    validate::waypoint_from_labels(labels, namespace_labels, namespace)
        .map_err(|e| r.add(at, e))
        .ok()
        .flatten()
}

fn service(
    at: &str,
    s: RawService,
    namespace_labels: Option<&BTreeMap<String, String>>,
    r: &mut Report,
) -> Option<Service> {
    let before = r.len();
    for (field, v) in [
        ("name", &s.name),
        ("namespace", &s.namespace),
        ("hostname", &s.hostname),
    ] {
        if v.is_empty() {
            r.add(at, format!("{field} is required"));
        }
    }
    let mut vips = Vec::new();
    for (j, v) in s.vips.iter().enumerate() {
        match network_address(v) {
            Some(ip) => vips.push(ip),
            None => r.add(
                at,
                format!("vips[{j}] {v:?} is not an IP address or <network>/<ip>"),
            ),
        }
    }
    let mut ports = BTreeMap::new();
    for (sp, tp) in &s.ports {
        match (port(sp).filter(|p| *p != 0), port(tp)) {
            (Some(sp), Some(tp)) => {
                ports.insert(sp, tp);
            }
            (None, _) => r.add(
                at,
                format!("ports: service port {sp:?} is not a number from 1 to 65535"),
            ),
            (_, None) => r.add(
                at,
                format!("ports[{sp}]: target port {tp:?} is not a number from 0 to 65535"),
            ),
        }
    }
    let app_protocols = validate::app_protocols(at, &s.app_protocols, &ports, r);
    for (j, san) in s.subject_alt_names.iter().enumerate() {
        if san.parse::<Identity>().is_err() {
            r.add(
                at,
                format!(
                    "subjectAltNames[{j}] {san:?} is not spiffe://<trust-domain>/ns/<ns>/sa/<sa>"
                ),
            );
        }
    }
    let waypoint = waypoint(at, s.waypoint, &s.labels, namespace_labels, &s.namespace, r);
    if r.len() != before {
        return None;
    }
    Some(Service {
        name: s.name,
        namespace: s.namespace,
        hostname: s.hostname,
        vips,
        ports,
        subject_alt_names: s.subject_alt_names,
        waypoint,
        app_protocols,
    })
}

fn policy(at: &str, p: RawPolicy, r: &mut Report) -> Option<Authorization> {
    let before = r.len();
    for (field, v) in [("name", &p.name), ("namespace", &p.namespace)] {
        if v.is_empty() {
            r.add(at, format!("{field} is required"));
        }
    }
    // Istio's YAML names, and the protobuf enum names.
    let scope = validate::scope(&p.scope);
    if scope.is_none() {
        let other = &p.scope;
        r.add(
            at,
            format!("scope {other:?} is not one of Global, Namespace, WorkloadSelector"),
        );
    }
    let action = validate::action(&p.action);
    if action.is_none() {
        let other = &p.action;
        r.add(at, format!("action {other:?} is not one of Allow, Deny"));
    }
    let mut rules = Vec::new();
    for (ri, rule) in p.rules.into_iter().enumerate() {
        let mut clauses = Vec::new();
        for (ci, clause) in rule.into_iter().enumerate() {
            let mut matches = Vec::new();
            for (mi, m) in clause.into_iter().enumerate() {
                let here = format!("rules[{ri}][{ci}][{mi}]");
                matches.push(rbac_match(at, &here, m, r));
            }
            clauses.push(matches);
        }
        rules.push(clauses);
    }
    if r.len() != before {
        return None;
    }
    Some(Authorization {
        name: p.name,
        namespace: p.namespace,
        scope: scope?,
        action: action?,
        rules,
        dry_run: p.dry_run,
    })
}

fn rbac_match(at: &str, here: &str, m: RawMatch, r: &mut Report) -> Match {
    let strings = |v: Vec<RawStringMatch>| -> Vec<StringMatch> {
        v.into_iter()
            .map(|s| match s {
                RawStringMatch::Exact(x) => StringMatch::Exact(x),
                RawStringMatch::Prefix(x) => StringMatch::Prefix(x),
                RawStringMatch::Suffix(x) => StringMatch::Suffix(x),
                RawStringMatch::Presence(_) => StringMatch::Presence,
            })
            .collect()
    };
    let sas = |v: Vec<RawServiceAccountMatch>| -> Vec<ServiceAccountMatch> {
        v.into_iter()
            .map(|s| ServiceAccountMatch {
                namespace: s.namespace,
                service_account: s.service_account,
            })
            .collect()
    };
    let mut cidrs = |field: &str, v: Vec<String>| -> Vec<Cidr> {
        let mut out = Vec::new();
        for (j, s) in v.iter().enumerate() {
            match s.parse::<Cidr>() {
                Ok(c) => out.push(c),
                Err(()) => r.add(
                    at,
                    format!("{here}.{field}[{j}] {s:?} is not an IP address or CIDR (10.0.0.0/8)"),
                ),
            }
        }
        out
    };
    let source_ips = cidrs("sourceIps", m.source_ips);
    let not_source_ips = cidrs("notSourceIps", m.not_source_ips);
    let destination_ips = cidrs("destinationIps", m.destination_ips);
    let not_destination_ips = cidrs("notDestinationIps", m.not_destination_ips);
    let mut ports = |field: &str, v: Vec<u16>| -> Vec<u16> {
        let mut out = Vec::new();
        for (j, port) in v.into_iter().enumerate() {
            match validate::port(u32::from(port), false) {
                Ok(port) => out.push(port),
                Err(e) => r.add(at, format!("{here}.{field}[{j}]: {e}")),
            }
        }
        out
    };
    let destination_ports = ports("destinationPorts", m.destination_ports);
    let not_destination_ports = ports("notDestinationPorts", m.not_destination_ports);
    Match {
        source_ips,
        not_source_ips,
        destination_ips,
        not_destination_ips,
        namespaces: strings(m.namespaces),
        not_namespaces: strings(m.not_namespaces),
        service_accounts: sas(m.service_accounts),
        not_service_accounts: sas(m.not_service_accounts),
        principals: strings(m.principals),
        not_principals: strings(m.not_principals),
        destination_ports,
        not_destination_ports,
    }
}

mod raw;

#[cfg(test)]
mod tests;
