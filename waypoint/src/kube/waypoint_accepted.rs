//! The `WaypointAccepted` condition the waypoint writes on the AuthorizationPolicies and
//! RequestAuthentications it reads (`--kube`), as istiod writes it for Istio's waypoints:
//! `True`, reason `Accepted`, `bound to <namespace>/<gateway>` on a policy every `targetRefs`
//! entry of which is this waypoint (its Gateway, or a Service it serves); `False`, reason
//! `Invalid`, with the field and the problem, on a policy it refused that covers requests
//! through it (and which it therefore fails closed on). A VirtualService or DestinationRule
//! it refuses (in its namespace, the root namespace, or one of a Service it serves) gets the
//! same `False`, taken back once the object is fixed; an accepted one gets nothing.
//!
//! Several waypoints may read one policy; each writes only what it alone can say, so they
//! never overwrite one another back and forth: nothing on a policy for the `istio-waypoint`
//! class or one naming other waypoints too, and the refusal's message names no waypoint (it
//! is the same from each). A condition saying the policy is bound here is removed when it no
//! longer is. Other conditions (istiod's `ZtunnelAccepted`) are kept. Pure.

use serde_json::{Value as Json, json};

use super::status::{Condition, Mesh, condition};

const KIND: &str = "WaypointAccepted";
const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// This waypoint, as a policy names it.
pub struct Here<'a> {
    pub namespace: &'a str,
    pub gateway: &'a str,
    pub root_namespace: &'a str,
}

impl Here<'_> {
    fn bound(&self) -> String {
        format!("bound to {}/{}", self.namespace, self.gateway)
    }
}

/// What our condition on one policy should become.
#[derive(Debug, PartialEq, Eq)]
pub enum Wanted {
    Set(Condition),
    /// A `bound to` us that no longer holds.
    Remove,
    /// Not ours to say.
    Leave,
}

/// Our condition for `policy`, an object of kind `kind`; `error` is the first error that
/// made us refuse it.
pub fn wanted(
    kind: &str,
    policy: &Json,
    error: Option<&str>,
    here: &Here<'_>,
    mesh: &dyn Mesh,
) -> Wanted {
    let namespace = policy
        .pointer("/metadata/namespace")
        .and_then(Json::as_str)
        .unwrap_or("default");
    if let Some(error) = error {
        // As `policy::authz` fails closed: on every request for a policy of the waypoint's or
        // the root namespace, on the requests for its namespace's services otherwise.
        let covers = namespace == here.namespace
            || namespace == here.root_namespace
            || mesh.serves_namespace(namespace);
        return if covers {
            Wanted::Set(Condition {
                kind: KIND,
                ok: false,
                reason: "Invalid",
                message: format!("{error}; the requests it covers are refused"),
            })
        } else {
            Wanted::Leave
        };
    }
    if !matches!(kind, "AuthorizationPolicy" | "RequestAuthentication") {
        return unsaid(policy, here);
    }
    let refs = target_refs(policy);
    let here_only = !refs.is_empty()
        && refs.iter().all(|r| {
            let field = |k: &str| r.get(k).and_then(Json::as_str).unwrap_or_default();
            match (field("group"), field("kind")) {
                (GATEWAY_GROUP, "Gateway") => {
                    namespace == here.namespace && field("name") == here.gateway
                }
                ("", "Service") => mesh.serves(namespace, field("name")),
                _ => false,
            }
        });
    if here_only {
        Wanted::Set(Condition {
            kind: KIND,
            ok: true,
            reason: "Accepted",
            message: here.bound(),
        })
    } else {
        unsaid(policy, here)
    }
}

/// An object accepted here that is not bound here: what we said of it before, if anything,
/// no longer holds (a `bound to` us, or a refusal every waypoint would now take back).
fn unsaid(object: &Json, here: &Here<'_>) -> Wanted {
    let ours = existing(object).is_some_and(|c| {
        let field = |k: &str| c.get(k).and_then(Json::as_str);
        field("message") == Some(here.bound().as_str()) || field("reason") == Some("Invalid")
    });
    if ours { Wanted::Remove } else { Wanted::Leave }
}

/// `targetRefs`, or the older single `targetRef`.
fn target_refs(policy: &Json) -> Vec<&Json> {
    let spec = policy.get("spec");
    let many = spec
        .and_then(|s| s.get("targetRefs"))
        .and_then(Json::as_array);
    match many {
        Some(refs) => refs.iter().collect(),
        None => spec.and_then(|s| s.get("targetRef")).into_iter().collect(),
    }
}

fn conditions(policy: &Json) -> Vec<Json> {
    policy
        .pointer("/status/conditions")
        .and_then(Json::as_array)
        .cloned()
        .unwrap_or_default()
}

fn existing(policy: &Json) -> Option<Json> {
    conditions(policy)
        .into_iter()
        .find(|c| c.get("type").and_then(Json::as_str) == Some(KIND))
}

/// The merge patch that makes the policy's status say `wanted`, or `None` when it already
/// does. The condition keeps its `lastTransitionTime` while its status stays.
pub fn patch(policy: &Json, wanted: &Wanted, now: &str) -> Option<Json> {
    let old = conditions(policy);
    let (mine, mut others): (Vec<Json>, Vec<Json>) = old
        .iter()
        .cloned()
        .partition(|c| c.get("type").and_then(Json::as_str) == Some(KIND));
    let generation = policy
        .pointer("/metadata/generation")
        .and_then(Json::as_i64);
    let new = match wanted {
        Wanted::Leave => return None,
        Wanted::Remove => None,
        Wanted::Set(c) => Some(condition(Some(&Json::Array(old)), c, generation, now)),
    };
    if new.iter().cloned().collect::<Vec<_>>() == mine {
        return None;
    }
    others.extend(new);
    Some(json!({ "status": { "conditions": others } }))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Serves(&'static [(&'static str, &'static str)]);

    impl Mesh for Serves {
        fn serves(&self, namespace: &str, name: &str) -> bool {
            self.0.contains(&(namespace, name))
        }
        fn has_service(&self, namespace: &str, name: &str) -> bool {
            self.serves(namespace, name)
        }
        fn serves_namespace(&self, namespace: &str) -> bool {
            self.0.iter().any(|(ns, _)| *ns == namespace)
        }
    }

    const HERE: Here<'static> = Here {
        namespace: "default",
        gateway: "waypoint",
        root_namespace: "istio-system",
    };
    const MESH: Serves = Serves(&[("default", "ratings"), ("shop", "cart")]);

    fn policy(namespace: &str, refs: Json) -> Json {
        json!({
            "metadata": {"name": "p", "namespace": namespace, "generation": 3},
            "spec": {"targetRefs": refs},
        })
    }

    fn gateway(name: &str) -> Json {
        json!({"group": GATEWAY_GROUP, "kind": "Gateway", "name": name})
    }

    fn service(name: &str) -> Json {
        json!({"group": "", "kind": "Service", "name": name})
    }

    fn set(ok: bool) -> impl Fn(&Wanted) -> bool {
        move |w| matches!(w, Wanted::Set(c) if c.ok == ok)
    }

    #[test]
    fn bound_only_when_every_target_is_this_waypoint() {
        let w = |p: &Json| wanted("AuthorizationPolicy", p, None, &HERE, &MESH);
        let accepted = w(&policy("default", json!([gateway("waypoint")])));
        assert_eq!(
            accepted,
            Wanted::Set(Condition {
                kind: KIND,
                ok: true,
                reason: "Accepted",
                message: "bound to default/waypoint".into(),
            })
        );
        assert!(set(true)(&w(&policy(
            "default",
            json!([service("ratings")])
        ))));
        assert!(set(true)(&w(&policy(
            "default",
            json!([gateway("waypoint"), service("ratings")])
        ))));
        // Another waypoint's Gateway or Service, a mix, a class, another namespace: not ours.
        for p in [
            policy("default", json!([gateway("other")])),
            policy("default", json!([service("reviews")])),
            policy("default", json!([gateway("waypoint"), service("reviews")])),
            policy(
                "istio-system",
                json!([{"group": GATEWAY_GROUP, "kind": "GatewayClass", "name": "istio-waypoint"}]),
            ),
            policy("shop", json!([gateway("waypoint")])),
            policy("default", json!([])),
        ] {
            assert_eq!(w(&p), Wanted::Leave, "{p}");
        }
        // The older single targetRef.
        let single = json!({"metadata": {"namespace": "default"}, "spec": {"targetRef": gateway("waypoint")}});
        assert!(set(true)(&w(&single)));
    }

    #[test]
    fn a_refused_policy_is_invalid_where_it_fails_closed() {
        for ns in ["default", "istio-system", "shop"] {
            let w = wanted(
                "RequestAuthentication",
                &policy(ns, json!([])),
                Some("spec.rules[0].to: unknown field"),
                &HERE,
                &MESH,
            );
            let Wanted::Set(c) = w else {
                panic!("{ns}: {w:?}")
            };
            assert!(!c.ok);
            assert_eq!(c.reason, "Invalid");
            assert!(
                c.message.starts_with("spec.rules[0].to: unknown field"),
                "{}",
                c.message
            );
            assert!(
                !c.message.contains("waypoint"),
                "names a waypoint: {}",
                c.message
            );
        }
        let elsewhere = wanted(
            "AuthorizationPolicy",
            &policy("other", json!([])),
            Some("bad"),
            &HERE,
            &MESH,
        );
        assert_eq!(elsewhere, Wanted::Leave);
    }

    #[test]
    fn a_refused_route_object_is_invalid_until_it_is_fixed() {
        let mut vs = json!({
            "metadata": {"name": "details", "namespace": "default", "generation": 1},
            "spec": {"hosts": ["details"]},
        });
        let w = wanted(
            "VirtualService",
            &vs,
            Some("spec.http[0].retries.attempts: not a number"),
            &HERE,
            &MESH,
        );
        assert!(set(false)(&w), "{w:?}");
        vs["status"] = patch(&vs, &w, "2026-12-08T00:00:00Z").unwrap()["status"].clone();
        // Fixed: taken back; accepted and never refused: nothing to say.
        let w = wanted("VirtualService", &vs, None, &HERE, &MESH);
        assert_eq!(w, Wanted::Remove);
        assert_eq!(
            patch(&vs, &w, "2026-12-08T01:00:00Z").unwrap()["status"]["conditions"],
            json!([])
        );
        vs["status"] = json!({});
        assert_eq!(
            wanted("VirtualService", &vs, None, &HERE, &MESH),
            Wanted::Leave
        );
    }

    #[test]
    fn patches_keep_other_conditions_and_are_made_only_on_change() {
        let mut p = policy("default", json!([gateway("waypoint")]));
        p["status"] = json!({"conditions": [{"type": "ZtunnelAccepted", "status": "True"}]});
        let w = wanted("AuthorizationPolicy", &p, None, &HERE, &MESH);
        let first = patch(&p, &w, "2026-12-08T00:00:00Z").expect("a patch");
        let conds = first["status"]["conditions"].as_array().unwrap();
        assert_eq!(conds.len(), 2);
        assert_eq!(conds[0]["type"], "ZtunnelAccepted");
        assert_eq!(conds[1]["type"], KIND);
        assert_eq!(conds[1]["observedGeneration"], 3);
        // Applied: nothing more to write, even later.
        p["status"] = first["status"].clone();
        assert_eq!(patch(&p, &w, "2026-12-08T01:00:00Z"), None);
        // No longer bound here: our condition goes, istiod's stays.
        p["spec"]["targetRefs"] = json!([gateway("other")]);
        let w = wanted("AuthorizationPolicy", &p, None, &HERE, &MESH);
        assert_eq!(w, Wanted::Remove);
        let removed = patch(&p, &w, "2026-12-08T02:00:00Z").expect("a patch");
        assert_eq!(
            removed["status"]["conditions"],
            json!([{"type": "ZtunnelAccepted", "status": "True"}])
        );
    }
}
