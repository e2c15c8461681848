//! The status the controller writes (pure), as the Gateway API defines it
//! (gateway.networking.k8s.io/v1, `GatewayStatus`, `ListenerStatus`, `GatewayClassStatus`):
//!
//! - a Gateway: `addresses`, the conditions `Accepted` and `Programmed`, and one
//!   `listeners[]` entry per listener of its spec with `supportedKinds`, `attachedRoutes` and
//!   the conditions `Accepted`, `Programmed` and `ResolvedRefs`. A waypoint serves its HBONE
//!   listener on 15008; any other listener is refused (`UnsupportedProtocol`, or
//!   `PortUnavailable` for HBONE on another port) and the Gateway is then accepted with the
//!   reason `ListenersNotValid`. Routes reach a waypoint through the Services that use it
//!   (parentRefs of kind Service), never through its listener: no route kind is supported
//!   there, `attachedRoutes` is 0, and a listener asking for route kinds
//!   (`allowedRoutes.kinds`) gets `ResolvedRefs` False, `InvalidRouteKinds`.
//! - our GatewayClass: `Accepted`, and `SupportedVersion` from the `bundle-version`
//!   annotation of the Gateway API CRDs it reads.
//!
//! Every condition carries the object's `observedGeneration` and keeps its
//! `lastTransitionTime` while its status stays; a patch is made only when something differs.

use serde_json::{Value as Json, json};

use super::render::{HBONE_PORT, Invalid};

/// One condition, its `lastTransitionTime` kept from `old` when the status is the same.
fn condition(
    old: Option<&Json>,
    kind: &str,
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &str,
) -> Json {
    let status = if ok { "True" } else { "False" };
    let since = old
        .and_then(Json::as_array)
        .and_then(|cs| {
            cs.iter().find(|c| {
                c.get("type").and_then(Json::as_str) == Some(kind)
                    && c.get("status").and_then(Json::as_str) == Some(status)
            })
        })
        .and_then(|c| c.get("lastTransitionTime").cloned())
        .unwrap_or_else(|| json!(now));
    let mut c = json!({
        "type": kind, "status": status, "reason": reason, "message": message,
        "lastTransitionTime": since,
    });
    if let Some(g) = generation {
        c["observedGeneration"] = json!(g);
    }
    c
}

fn generation(object: &Json) -> Option<i64> {
    object
        .pointer("/metadata/generation")
        .and_then(Json::as_i64)
}

/// What is wrong with a listener for a waypoint, if anything: (reason, message).
fn refused(listener: &Json) -> Option<(&'static str, String)> {
    let protocol = listener
        .get("protocol")
        .and_then(Json::as_str)
        .unwrap_or_default();
    let port = listener.get("port").and_then(Json::as_u64);
    match (protocol, port) {
        ("HBONE", Some(p)) if p == u64::from(HBONE_PORT) => None,
        ("HBONE", _) => Some((
            "PortUnavailable",
            format!("a waypoint serves HBONE on port {HBONE_PORT} only"),
        )),
        _ => Some((
            "UnsupportedProtocol",
            format!(
                "a waypoint serves one listener, protocol HBONE on port {HBONE_PORT}; {protocol:?} is not served"
            ),
        )),
    }
}

/// The `status.listeners` of a Gateway; `valid` says whether the Gateway got its waypoint.
pub fn listeners(gateway: &Json, valid: bool, now: &str) -> Json {
    let generation = generation(gateway);
    let specs = gateway
        .pointer("/spec/listeners")
        .and_then(Json::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let old = gateway
        .pointer("/status/listeners")
        .and_then(Json::as_array);
    specs
        .iter()
        .map(|l| {
            let name = l.get("name").and_then(Json::as_str).unwrap_or_default();
            let old = old
                .and_then(|ls| ls.iter().find(|o| o.get("name").and_then(Json::as_str) == Some(name)))
                .and_then(|o| o.get("conditions"));
            let c = |kind: &str, ok: bool, reason: &str, message: &str| {
                condition(old, kind, ok, reason, message, generation, now)
            };
            let kinds_asked = l
                .pointer("/allowedRoutes/kinds")
                .and_then(Json::as_array)
                .is_some_and(|k| !k.is_empty());
            let resolved = if kinds_asked {
                c(
                    "ResolvedRefs",
                    false,
                    "InvalidRouteKinds",
                    "routes reach a waypoint through the Services that use it (parentRefs of kind Service), not through its listener: no route kind is supported here",
                )
            } else {
                c("ResolvedRefs", true, "ResolvedRefs", "no references to resolve")
            };
            let conditions = match (refused(l), valid) {
                (Some((reason, message)), _) => vec![
                    c("Accepted", false, reason, &message),
                    c("Programmed", false, "Invalid", &message),
                    resolved,
                ],
                (None, true) => vec![
                    c("Accepted", true, "Accepted", "the waypoint serves this listener"),
                    c("Programmed", true, "Programmed", "the waypoint's Deployment and Service are applied"),
                    resolved,
                ],
                (None, false) => vec![
                    c("Accepted", true, "Accepted", "the listener itself is valid"),
                    c("Programmed", false, "Invalid", "the Gateway is not accepted"),
                    resolved,
                ],
            };
            json!({
                "name": name,
                "supportedKinds": [],
                "attachedRoutes": 0,
                "conditions": conditions,
            })
        })
        .collect::<Vec<_>>()
        .into()
}

/// The merge patch that gives the Gateway `addresses`, the conditions `Accepted` and
/// `Programmed` (True, or False with the problem) and its listeners' status, or `None` when
/// its status already says so.
pub fn gateway_patch(
    gateway: &Json,
    addresses: Option<Json>,
    problem: Option<&Invalid>,
    now: &str,
) -> Option<Json> {
    let generation = generation(gateway);
    let old = gateway.pointer("/status/conditions");
    let c = |kind: &str, ok: bool, reason: &str, message: &str| {
        condition(old, kind, ok, reason, message, generation, now)
    };
    let specs = gateway
        .pointer("/spec/listeners")
        .and_then(Json::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let conditions = match problem {
        None => {
            let applied = "the waypoint's Deployment and Service are applied";
            let refused: Vec<&str> = specs
                .iter()
                .filter(|l| refused(l).is_some())
                .filter_map(|l| l.get("name").and_then(Json::as_str))
                .collect();
            let accepted = if refused.is_empty() {
                c("Accepted", true, "Accepted", applied)
            } else {
                c(
                    "Accepted",
                    true,
                    "ListenersNotValid",
                    &format!(
                        "listeners not served: {} (see status.listeners)",
                        refused.join(", ")
                    ),
                )
            };
            vec![accepted, c("Programmed", true, "Programmed", applied)]
        }
        Some(p) => {
            let message = format!("{}: {}", p.field, p.message);
            vec![
                c("Accepted", false, "Invalid", &message),
                c("Programmed", false, "Invalid", &message),
            ]
        }
    };
    let mut wanted = json!({
        "conditions": conditions,
        "listeners": listeners(gateway, problem.is_none(), now),
    });
    if let Some(a) = addresses {
        wanted["addresses"] = a;
    }
    let current = gateway.get("status");
    let same = current.is_some_and(|c| {
        c.get("conditions") == wanted.get("conditions")
            && c.get("listeners") == wanted.get("listeners")
            && (wanted.get("addresses").is_none() || c.get("addresses") == wanted.get("addresses"))
    });
    (!same).then(|| json!({"status": wanted}))
}

/// The Gateway API CRDs the controller reads, by name.
pub const CRDS: [&str; 2] = [
    "gateways.gateway.networking.k8s.io",
    "gatewayclasses.gateway.networking.k8s.io",
];

/// The annotation a Gateway API CRD carries with the release it comes from.
pub const BUNDLE_VERSION: &str = "gateway.networking.k8s.io/bundle-version";

/// Whether a CRD bundle version is one the controller supports: a v1 release (`v1.x.y`), all
/// of which serve the v1 Gateway and GatewayClass fields it reads.
fn supported_bundle(version: &str) -> bool {
    let Some(rest) = version.strip_prefix("v1.") else {
        return false;
    };
    let mut parts = rest.splitn(2, '.');
    let minor = parts.next().unwrap_or_default();
    let patch = parts.next().unwrap_or_default();
    let patch = patch.split('-').next().unwrap_or_default();
    !minor.is_empty()
        && minor.bytes().all(|b| b.is_ascii_digit())
        && !patch.is_empty()
        && patch.bytes().all(|b| b.is_ascii_digit())
}

/// What was read of each of [`CRDS`]: its bundle version, or why there is none.
pub type Bundles = Vec<(&'static str, Result<String, String>)>;

/// The merge patch of a GatewayClass naming our `controller_name`: `Accepted` True when it
/// is the class the controller serves (`class`), False (`Unsupported`) for another class of
/// ours; `SupportedVersion` True when every CRD of [`CRDS`] is of a v1 release by its
/// [`BUNDLE_VERSION`], else False (`UnsupportedVersion`, naming the CRD; the controller goes on
/// with best effort, so `Accepted` stays). `None` for another controller's class or when the
/// status already says so.
pub fn class_patch(
    gateway_class: &Json,
    class: &str,
    controller_name: &str,
    bundles: &Bundles,
    now: &str,
) -> Option<Json> {
    if gateway_class
        .pointer("/spec/controllerName")
        .and_then(Json::as_str)
        != Some(controller_name)
    {
        return None;
    }
    let name = gateway_class
        .pointer("/metadata/name")
        .and_then(Json::as_str)
        .unwrap_or_default();
    let generation = generation(gateway_class);
    let old = gateway_class.pointer("/status/conditions");
    let c = |kind: &str, ok: bool, reason: &str, message: &str| {
        condition(old, kind, ok, reason, message, generation, now)
    };
    let accepted = if name != class {
        c(
            "Accepted",
            false,
            "Unsupported",
            &format!("this controller serves the GatewayClass {class:?} only"),
        )
    } else if gateway_class.pointer("/spec/parametersRef").is_some() {
        c(
            "Accepted",
            true,
            "Accepted",
            "spec.parametersRef: not implemented, not read (the controller's settings come from its config file)",
        )
    } else {
        c(
            "Accepted",
            true,
            "Accepted",
            "Gateways of this class get a waypoint",
        )
    };
    let problems: Vec<String> = bundles
        .iter()
        .filter_map(|(crd, version)| match version {
            Ok(v) if supported_bundle(v) => None,
            Ok(v) => Some(format!("{crd}: bundle version {v} is not a v1 release")),
            Err(why) => Some(format!("{crd}: {why}")),
        })
        .collect();
    let supported = if problems.is_empty() {
        let versions: Vec<String> = bundles
            .iter()
            .filter_map(|(_, v)| v.as_ref().ok().cloned())
            .collect();
        c(
            "SupportedVersion",
            true,
            "SupportedVersion",
            &format!("Gateway API CRDs of bundle version {}", versions.join(", ")),
        )
    } else {
        c(
            "SupportedVersion",
            false,
            "UnsupportedVersion",
            &format!("{} (served with best effort)", problems.join("; ")),
        )
    };
    let conditions = json!([accepted, supported]);
    let same = gateway_class.pointer("/status/conditions") == Some(&conditions);
    (!same).then(|| json!({"status": {"conditions": conditions}}))
}

#[cfg(test)]
mod tests;
