use serde_json::json;

use super::*;

struct Known;

impl Mesh for Known {
    fn serves(&self, ns: &str, name: &str) -> bool {
        ns == "default" && name == "ratings"
    }
    fn has_service(&self, ns: &str, name: &str) -> bool {
        ns == "default" && (name == "ratings" || name == "reviews")
    }
    fn serves_namespace(&self, ns: &str) -> bool {
        ns == "default"
    }
}

fn route(backend: &str) -> Json {
    json!({
        "metadata": {"name": "ratings", "namespace": "default", "generation": 2},
        "spec": {
            "parentRefs": [
                {"group": "", "kind": "Service", "name": "ratings", "port": 9080},
                {"name": "some-gateway"}
            ],
            "rules": [{"backendRefs": [{"name": backend, "port": 9080}]}]
        }
    })
}

#[test]
fn accepted_and_resolved_for_a_served_service_parent_only() {
    let ours = parents(&route("ratings"), None, &Known);
    assert_eq!(ours.len(), 1, "the Gateway parent is not ours");
    assert_eq!(ours[0].0["name"], "ratings");
    assert!(ours[0].1.iter().all(|c| c.ok));
    let p = patch(&route("ratings"), &ours, "ctl", "2026-12-07T18:00:00Z").expect("a patch");
    let entry = &p["status"]["parents"][0];
    assert_eq!(entry["controllerName"], "ctl");
    assert_eq!(entry["conditions"][0]["type"], "Accepted");
    assert_eq!(entry["conditions"][0]["status"], "True");
    assert_eq!(entry["conditions"][0]["observedGeneration"], 2);
    assert_eq!(entry["conditions"][1]["type"], "ResolvedRefs");
}

#[test]
fn an_unknown_backend_names_its_field() {
    let ours = parents(&route("nope"), None, &Known);
    let resolved = &ours[0].1[1];
    assert!(!resolved.ok);
    assert_eq!(resolved.reason, "BackendNotFound");
    assert!(
        resolved.message.starts_with("spec.rules[0].backendRefs[0]"),
        "{}",
        resolved.message
    );
}

#[test]
fn a_rejected_route_is_not_accepted_with_the_error_as_message() {
    let ours = parents(
        &route("ratings"),
        Some("spec.rules[0].x: unknown field"),
        &Known,
    );
    let accepted = &ours[0].1[0];
    assert!(!accepted.ok);
    assert_eq!(accepted.message, "spec.rules[0].x: unknown field");
}

#[test]
fn nothing_is_written_when_the_status_already_says_it() {
    let mut r = route("ratings");
    let ours = parents(&r, None, &Known);
    let p = patch(&r, &ours, "ctl", "2026-12-07T18:00:00Z").expect("a patch");
    r["status"] = p["status"].clone();
    assert_eq!(patch(&r, &ours, "ctl", "2026-12-07T19:00:00Z"), None);
    // Another controller's entry is kept when ours changes.
    r["status"]["parents"].as_array_mut().unwrap().insert(
        0,
        json!({"controllerName": "other", "parentRef": {"name": "gw"}}),
    );
    let broken = parents(&route("nope"), None, &Known);
    let p = patch(&r, &broken, "ctl", "2026-12-07T19:00:00Z").expect("a patch");
    let all = p["status"]["parents"].as_array().unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0]["controllerName"], "other");
    // Accepted kept its status, so its time; ResolvedRefs changed, so it is stamped now.
    assert_eq!(
        all[1]["conditions"][0]["lastTransitionTime"],
        "2026-12-07T18:00:00Z"
    );
    assert_eq!(
        all[1]["conditions"][1]["lastTransitionTime"],
        "2026-12-07T19:00:00Z"
    );
}
