use serde_json::json;

use super::*;

fn vs(name: &str, version: &str, subset: &str) -> Json {
    json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {
            "name": name, "namespace": "default", "uid": "u-1",
            "resourceVersion": version, "generation": 1,
            "creationTimestamp": "2026-12-07T18:00:00Z",
            "managedFields": [{"manager": "kubectl", "operation": "Apply"}]
        },
        "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews", "subset": subset}}]}]}
    })
}

fn store() -> Store {
    Store::new(LoadOptions::default())
}

fn list(s: &mut Store, kind: usize, objects: Vec<Json>) -> Change {
    s.init(kind);
    for o in objects {
        let e = s.decode(kind, o);
        s.init_apply(kind, e);
    }
    s.init_done(kind)
}

#[test]
fn an_api_server_object_decodes_like_a_file() {
    let s = store();
    let e = s.decode(0, vs("reviews", "5", "v1"));
    assert!(!e.rejected(), "{:?}", e.loaded.diagnostics);
    assert_eq!(e.loaded.resources.len(), 1);
    assert_eq!(e.loaded.resources[0].meta.name, "reviews");
    assert_eq!(e.resource_version, "5");
}

#[test]
fn list_items_without_their_type_get_the_watched_kind() {
    let s = store();
    let mut o = vs("reviews", "5", "v1");
    let map = o.as_object_mut().unwrap();
    map.remove("apiVersion");
    map.remove("kind");
    let e = s.decode(0, o);
    assert!(!e.rejected(), "{:?}", e.loaded.diagnostics);
}

#[test]
fn a_bad_object_is_rejected_by_name_and_field_and_the_others_stay() {
    let mut s = store();
    let mut bad = vs("bad", "7", "v1");
    bad["spec"]["http"][0]["retries"] = json!({"attempts": "three"});
    list(&mut s, 0, vec![vs("reviews", "5", "v1"), bad]);
    assert_eq!(s.resources().len(), 1);
    let errors: Vec<String> = s
        .diagnostics()
        .filter(|d| d.is_error())
        .map(ToString::to_string)
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("VirtualService default/bad")
            && errors[0].contains("spec.http[0].retries.attempts"),
        "{}",
        errors[0]
    );
}

#[test]
fn synced_once_every_kind_is_listed() {
    let mut s = store();
    for kind in 0..WATCHED.len() {
        assert!(!s.synced());
        list(&mut s, kind, Vec::new());
    }
    assert!(s.synced());
}

#[test]
fn a_relist_keeps_the_objects_until_it_is_complete() {
    let mut s = store();
    assert_ne!(
        list(&mut s, 0, vec![vs("reviews", "5", "v1")]),
        Change::None
    );
    s.init(0);
    assert_eq!(s.len(), 1, "the list under way does not empty the store");
    let e = s.decode(0, vs("reviews", "5", "v1"));
    s.init_apply(0, e);
    assert_eq!(
        s.init_done(0),
        Change::None,
        "the same versions: nothing changed"
    );
    assert_eq!(
        list(&mut s, 0, Vec::new()),
        Change::Updated { rejected: false }
    );
    assert!(s.is_empty(), "an object missing from the new list is gone");
}

#[test]
fn apply_of_a_known_version_changes_nothing_and_delete_removes() {
    let mut s = store();
    list(&mut s, 0, vec![vs("reviews", "5", "v1")]);
    assert!(s.known(0, &vs("reviews", "5", "v1")).is_some());
    assert!(s.known(0, &vs("reviews", "6", "v2")).is_none());
    let same = s.decode(0, vs("reviews", "5", "v1"));
    assert_eq!(s.apply(0, same), Change::None);
    let newer = s.decode(0, vs("reviews", "6", "v2"));
    assert_eq!(s.apply(0, newer), Change::Updated { rejected: false });
    assert_eq!(
        s.delete(0, &vs("reviews", "7", "v2")),
        Change::Updated { rejected: false }
    );
    assert!(s.is_empty());
}

#[test]
fn a_kind_the_server_does_not_serve_counts_as_listed_and_empty() {
    let mut s = store();
    let last = WATCHED.len() - 1;
    for kind in 0..last {
        list(&mut s, kind, Vec::new());
    }
    assert!(!s.synced());
    assert!(s.absent(last), "the first time changes the store");
    assert!(s.synced());
    assert!(!s.absent(last), "again: nothing new");
}

#[test]
fn a_new_version_that_reads_the_same_is_kept_but_changes_no_route() {
    let mut s = store();
    list(&mut s, 0, vec![vs("reviews", "5", "v1")]);
    let mut with_status = vs("reviews", "6", "v1");
    with_status["status"] = json!({"observedGeneration": 1});
    let e = s.decode(0, with_status);
    assert_eq!(s.apply(0, e), Change::None);
    assert!(
        s.known(0, &vs("reviews", "6", "v1")).is_some(),
        "the new version is stored"
    );
}

#[test]
fn a_watch_per_kind_and_namespace_each_lists_its_own_objects() {
    let mut s = Store::scoped(
        LoadOptions::default(),
        vec!["istio-system".into(), "default".into(), "default".into()],
    );
    let watches: Vec<(usize, usize, Option<&str>)> = s.watches().collect();
    assert_eq!(
        watches.len(),
        2 * WATCHED.len(),
        "one per kind and namespace"
    );
    assert_eq!(watches[0], (0, 0, Some("default")));
    assert_eq!(watches[1], (1, 0, Some("istio-system")));
    assert_eq!(watches[2], (2, 1, Some("default")));
    assert_eq!(s.slot_of(1, "istio-system"), Some(3));
    assert_eq!(s.slot_of(1, "other"), None, "not watched");
    let mut root = vs("mesh-wide", "9", "v1");
    root["metadata"]["namespace"] = json!("istio-system");
    list(&mut s, 0, vec![vs("reviews", "5", "v1")]);
    list(&mut s, 1, vec![root]);
    // A new list of one namespace leaves the other's objects alone.
    list(&mut s, 0, vec![vs("reviews", "6", "v2")]);
    let names: Vec<String> = s
        .entries()
        .map(|(_, e)| e.resource_version.clone())
        .collect();
    assert_eq!(names, ["6", "9"]);
    assert!(!s.synced(), "the other kinds are not listed yet");
    for slot in 2..2 * WATCHED.len() {
        list(&mut s, slot, Vec::new());
    }
    assert!(s.synced());
    let all = Store::new(LoadOptions::default());
    assert_eq!(all.watches().next(), Some((0, 0, None)));
    assert_eq!(all.slot_of(3, "anywhere"), Some(3));
}
