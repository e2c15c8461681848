//! `/config_dump`: everything this ztunnel acts on, as JSON. The shapes are views made for
//! operators (names as Istio writes them), not the internal types.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::Agent;
use crate::state::{Action, Protocol, Scope, State, Workload};
use crate::time::{rfc3339, unix};

pub(super) fn dump(agent: &Agent) -> Value {
    let proxy = &agent.proxy;
    let state = proxy.state.borrow().clone();
    let now = std::time::SystemTime::now();
    let certificates: Vec<Value> = proxy
        .certs
        .snapshot()
        .into_iter()
        .map(|c| {
            json!({
                "identity": c.identity.to_string(),
                "serial": c.serial,
                "not_before": rfc3339(c.not_before),
                "not_after": rfc3339(c.not_after),
                "expires_in_secs": unix(c.not_after) - unix(now),
            })
        })
        .collect();
    let mut pods: Vec<Value> = proxy
        .pods
        .uids()
        .into_iter()
        .filter_map(|uid| proxy.pods.get(&uid))
        .map(|pod| {
            let w = &pod.workload;
            json!({
                "uid": w.uid,
                "name": w.name,
                "namespace": w.namespace(),
                "identity": w.identity().to_string(),
                "ips": w.workload_ips,
                "netns": pod.netns.path().display().to_string(),
                "netns_cookie": pod.netns.cookie().0,
                "capture": {
                    "outbound": proxy.capture.is_enrolled(pod.netns.cookie()),
                    "listeners": [
                        format!("127.0.0.1:{}", crate::proxy::OUTBOUND_PORT),
                        format!("0.0.0.0:{}", crate::proxy::INBOUND_PLAINTEXT_PORT),
                        format!("0.0.0.0:{}", crate::proxy::HBONE_PORT),
                    ],
                },
            })
        })
        .collect();
    pods.sort_by(|a, b| a["uid"].as_str().cmp(&b["uid"].as_str()));
    let not_captured = crate::readiness::not_captured(proxy);
    let without_certificate = crate::readiness::without_certificate(proxy);
    json!({
        "node": proxy.node,
        "build": {
            "component": "ztunnel",
            "version": env!("CARGO_PKG_VERSION"),
        },
        "config_source": {
            "kind": agent.source.kind,
            "location": agent.source.location,
            "version": agent.source.version(),
            "last_update": rfc3339(agent.source.last_update()),
            "applied": agent.source.xds.as_ref().map_or(agent.source.stats.applied(), |x| x.acks()),
            "rejected": agent.source.xds.as_ref().map_or(agent.source.stats.rejected(), |x| x.nacks()),
            "connected": agent.source.xds.as_ref().map(|x| x.connected()),
            // Why the state is not complete yet (xDS before the first full answer), or null.
            "incomplete": state.incomplete(),
        },
        "workloads": state.workloads().map(|w| workload(&state, w)).collect::<Vec<_>>(),
        "services": services(&state),
        "policies": policies(&state),
        "certificates": certificates,
        "pods": pods,
        "pods_not_captured": not_captured,
        "pods_without_certificate": without_certificate,
        "capture": proxy.capture.status(),
        "connections": {
            "open": proxy.tracker.open_count(),
        },
    })
}

/// A workload as `/config_dump` and the CLI show it.
pub(super) fn workload(state: &State, w: &Workload) -> Value {
    let services: BTreeMap<String, &BTreeMap<u16, u16>> =
        w.services.iter().map(|(k, v)| (k.to_string(), v)).collect();
    json!({
        "uid": w.uid,
        "name": w.name,
        "namespace": w.namespace(),
        "service_account": w.service_account(),
        "identity": w.identity().to_string(),
        "ips": w.workload_ips,
        "protocol": match w.protocol { Protocol::Hbone => "HBONE", Protocol::Tcp => "TCP" },
        "status": format!("{:?}", w.status),
        "node": w.node,
        "cluster_id": w.cluster_id,
        "labels": w.labels,
        "services": services,
        "authorization_policies": w.authorization_policies,
        "captured": state.is_captured(w),
        "netns": w.netns.as_ref().map(|p| p.display().to_string()),
    })
}

fn services(state: &State) -> Vec<Value> {
    state
        .services()
        .map(|s| {
            let endpoints: Vec<Value> = s
                .ports
                .keys()
                .flat_map(|port| {
                    let vip = s
                        .vips
                        .first()
                        .copied()
                        .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
                    state.service_endpoints(s, vip, *port).into_iter().map(
                        move |(w, addr)| json!({"port": port, "workload": w.name, "address": addr}),
                    )
                })
                .collect();
            json!({
                "name": s.name,
                "namespace": s.namespace,
                "hostname": s.hostname,
                "vips": s.vips,
                "ports": s.ports,
                "subject_alt_names": s.subject_alt_names,
                "endpoints": endpoints,
            })
        })
        .collect()
}

fn policies(state: &State) -> Vec<Value> {
    state
        .policies()
        .map(|p| {
            json!({
                "name": p.name,
                "namespace": p.namespace,
                "scope": match p.scope {
                    Scope::Global => "Global",
                    Scope::Namespace => "Namespace",
                    Scope::WorkloadSelector => "WorkloadSelector",
                },
                "action": match p.action { Action::Allow => "Allow", Action::Deny => "Deny" },
                "dry_run": p.dry_run,
                "rules": format!("{:?}", p.rules),
            })
        })
        .collect()
}
