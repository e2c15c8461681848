//! The status the waypoint writes on the Gateway API routes that attach to a Service it
//! serves (GAMMA: `parentRefs` of kind `Service` whose `istio.io/use-waypoint` is this one): one `status.parents[]` entry per such
//! parent, with our `controllerName` and the conditions `Accepted` and `ResolvedRefs`.
//! Pure: it computes the entries and the merge patch, and says when nothing changed (then
//! nothing is written, so our own patch coming back as a watch event ends the loop).

use serde_json::{Value as Json, json};

/// What the route's parents and backends are checked against.
pub trait Mesh {
    /// Whether the waypoint serves the Service `namespace/name` (its routes apply there).
    fn serves(&self, namespace: &str, name: &str) -> bool;
    /// Whether the Service `namespace/name` exists in the mesh.
    fn has_service(&self, namespace: &str, name: &str) -> bool;
    /// Whether the waypoint serves any Service of `namespace`.
    fn serves_namespace(&self, namespace: &str) -> bool;
}

/// One condition before it gets its transition time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    pub kind: &'static str,
    pub ok: bool,
    pub reason: &'static str,
    pub message: String,
}

/// Our entries of `status.parents`, one per parentRef that is a Service we serve. `error`
/// is the first error that rejected the route (field path and problem), if any.
pub fn parents(route: &Json, error: Option<&str>, mesh: &dyn Mesh) -> Vec<(Json, [Condition; 2])> {
    let namespace = route
        .pointer("/metadata/namespace")
        .and_then(Json::as_str)
        .unwrap_or("default");
    let accepted = match error {
        None => Condition {
            kind: "Accepted",
            ok: true,
            reason: "Accepted",
            message: "routes served by the waypoint".into(),
        },
        Some(e) => Condition {
            kind: "Accepted",
            ok: false,
            reason: "UnsupportedValue",
            message: e.to_owned(),
        },
    };
    let resolved = resolved_refs(route, namespace, mesh);
    let refs = route
        .pointer("/spec/parentRefs")
        .and_then(Json::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    refs.iter()
        .filter(|r| is_service(r, false))
        .filter(|r| {
            let ns = r
                .get("namespace")
                .and_then(Json::as_str)
                .unwrap_or(namespace);
            let name = r.get("name").and_then(Json::as_str).unwrap_or_default();
            mesh.serves(ns, name)
        })
        .map(|r| (r.clone(), [accepted.clone(), resolved.clone()]))
        .collect()
}

/// A reference names a core Service: group `""` and kind `Service`. A parentRef's group
/// defaults to the Gateway API's and its kind to `Gateway` (so both must be written, as the
/// compile step reads them); a backendRef's default to the core group and `Service`.
fn is_service(r: &Json, backend: bool) -> bool {
    let group = r.get("group").and_then(Json::as_str);
    let kind = r.get("kind").and_then(Json::as_str);
    if backend {
        group.is_none_or(str::is_empty) && kind.is_none_or(|k| k == "Service")
    } else {
        group == Some("") && kind == Some("Service")
    }
}

fn resolved_refs(route: &Json, namespace: &str, mesh: &dyn Mesh) -> Condition {
    let rules = route
        .pointer("/spec/rules")
        .and_then(Json::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for (i, rule) in rules.iter().enumerate() {
        let backends = rule
            .get("backendRefs")
            .and_then(Json::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for (j, b) in backends.iter().enumerate() {
            let field = format!("spec.rules[{i}].backendRefs[{j}]");
            if !is_service(b, true) {
                return Condition {
                    kind: "ResolvedRefs",
                    ok: false,
                    reason: "InvalidKind",
                    message: format!("{field}: only a core Service can be a backend"),
                };
            }
            let ns = b
                .get("namespace")
                .and_then(Json::as_str)
                .unwrap_or(namespace);
            let name = b.get("name").and_then(Json::as_str).unwrap_or_default();
            if !mesh.has_service(ns, name) {
                return Condition {
                    kind: "ResolvedRefs",
                    ok: false,
                    reason: "BackendNotFound",
                    message: format!("{field}: Service {ns}/{name} is not in the mesh"),
                };
            }
        }
    }
    Condition {
        kind: "ResolvedRefs",
        ok: true,
        reason: "ResolvedRefs",
        message: "every backendRef is a Service of the mesh".into(),
    }
}

/// Condition `c` as written: its `lastTransitionTime` kept from the same condition with the
/// same status in `old` (a list of conditions), else `now`.
pub fn condition(old: Option<&Json>, c: &Condition, generation: Option<i64>, now: &str) -> Json {
    let status = if c.ok { "True" } else { "False" };
    let since = old
        .and_then(Json::as_array)
        .and_then(|cs| {
            cs.iter().find(|x| {
                x.get("type").and_then(Json::as_str) == Some(c.kind)
                    && x.get("status").and_then(Json::as_str) == Some(status)
            })
        })
        .and_then(|x| x.get("lastTransitionTime").cloned())
        .unwrap_or_else(|| Json::String(now.to_owned()));
    let mut cond = json!({
        "type": c.kind,
        "status": status,
        "reason": c.reason,
        "message": c.message,
        "lastTransitionTime": since,
    });
    if let Some(g) = generation {
        cond["observedGeneration"] = json!(g);
    }
    cond
}

/// The merge patch that makes the route's status say `ours`, or `None` when it already does.
/// Other controllers' entries are kept (a merge patch replaces a list whole). A condition
/// keeps its `lastTransitionTime` while its status stays; `now` stamps the ones that change.
pub fn patch(
    route: &Json,
    ours: &[(Json, [Condition; 2])],
    controller: &str,
    now: &str,
) -> Option<Json> {
    let generation = route.pointer("/metadata/generation").and_then(Json::as_i64);
    let existing = route
        .pointer("/status/parents")
        .and_then(Json::as_array)
        .cloned()
        .unwrap_or_default();
    let (mine, others): (Vec<Json>, Vec<Json>) = existing
        .into_iter()
        .partition(|p| p.get("controllerName").and_then(Json::as_str) == Some(controller));
    let mut wanted = Vec::with_capacity(ours.len());
    for (parent_ref, conditions) in ours {
        let old = mine.iter().find(|p| p.get("parentRef") == Some(parent_ref));
        let old = old.and_then(|p| p.get("conditions"));
        let conditions: Vec<Json> = conditions
            .iter()
            .map(|c| condition(old, c, generation, now))
            .collect();
        wanted.push(json!({
            "parentRef": parent_ref,
            "controllerName": controller,
            "conditions": conditions,
        }));
    }
    if wanted == mine {
        return None;
    }
    let mut all = others;
    all.extend(wanted);
    Some(json!({ "status": { "parents": all } }))
}

#[cfg(test)]
mod tests;
