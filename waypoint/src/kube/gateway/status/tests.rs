use serde_json::json;

use super::*;
use crate::kube::gateway::render::addresses;

fn gateway(listeners: Json) -> Json {
    json!({
        "metadata": {"name": "waypoint", "namespace": "bookinfo", "uid": "u-1", "generation": 3},
        "spec": {"gatewayClassName": "ambient-waypoint", "listeners": listeners},
    })
}

fn mesh() -> Json {
    json!([{"name": "mesh", "port": 15008, "protocol": "HBONE"}])
}

fn of<'a>(conditions: &'a Json, kind: &str) -> &'a Json {
    conditions
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == kind))
        .unwrap_or(&Json::Null)
}

#[test]
fn status_has_the_cluster_ip_and_is_written_once() {
    let mut g = gateway(mesh());
    let svc = json!({"spec": {"clusterIP": "198.18.200.7"}});
    let addrs = addresses(&g, Some(&svc), "cluster.local");
    assert_eq!(
        addrs,
        json!([{"type": "IPAddress", "value": "198.18.200.7"}])
    );
    let hostname = addresses(&g, None, "cluster.local");
    assert_eq!(hostname[0]["value"], "waypoint.bookinfo.svc.cluster.local");
    let p = gateway_patch(&g, Some(addrs.clone()), None, "t1").expect("a patch");
    assert_eq!(p["status"]["conditions"][0]["status"], "True");
    assert_eq!(p["status"]["conditions"][1]["type"], "Programmed");
    assert_eq!(p["status"]["conditions"][0]["observedGeneration"], 3);
    g["status"] = p["status"].clone();
    assert_eq!(gateway_patch(&g, Some(addrs), None, "t2"), None);
    let bad = Invalid {
        field: "spec.listeners".into(),
        message: "x".into(),
    };
    let p = gateway_patch(&g, None, Some(&bad), "t3").expect("a patch");
    assert_eq!(p["status"]["conditions"][0]["reason"], "Invalid");
    assert_eq!(p["status"]["conditions"][0]["message"], "spec.listeners: x");
    assert_eq!(p["status"]["conditions"][0]["lastTransitionTime"], "t3");
}

#[test]
fn the_hbone_listener_is_served_and_others_are_refused_by_reason() {
    let g = gateway(json!([
        {"name": "mesh", "port": 15008, "protocol": "HBONE"},
        {"name": "http", "port": 80, "protocol": "HTTP"},
        {"name": "alt", "port": 15009, "protocol": "HBONE"},
        {"name": "kinds", "port": 15008, "protocol": "HBONE",
         "allowedRoutes": {"kinds": [{"kind": "HTTPRoute"}]}},
    ]));
    let p = gateway_patch(&g, None, None, "t1").expect("a patch");
    let accepted = of(&p["status"]["conditions"], "Accepted");
    assert_eq!(accepted["status"], "True");
    assert_eq!(accepted["reason"], "ListenersNotValid");
    assert!(
        accepted["message"].as_str().unwrap().contains("http, alt"),
        "{accepted}"
    );
    let ls = p["status"]["listeners"].as_array().expect("listeners");
    assert_eq!(ls.len(), 4);
    for l in ls {
        assert_eq!(l["supportedKinds"], json!([]));
        assert_eq!(l["attachedRoutes"], 0);
        assert_eq!(of(&l["conditions"], "Accepted")["observedGeneration"], 3);
    }
    let status = |i: usize, kind: &str| {
        let c = of(&ls[i]["conditions"], kind);
        (c["status"].as_str().unwrap(), c["reason"].as_str().unwrap())
    };
    assert_eq!(ls[0]["name"], "mesh");
    assert_eq!(status(0, "Accepted"), ("True", "Accepted"));
    assert_eq!(status(0, "Programmed"), ("True", "Programmed"));
    assert_eq!(status(0, "ResolvedRefs"), ("True", "ResolvedRefs"));
    assert_eq!(status(1, "Accepted"), ("False", "UnsupportedProtocol"));
    assert_eq!(status(1, "Programmed"), ("False", "Invalid"));
    assert_eq!(status(2, "Accepted"), ("False", "PortUnavailable"));
    assert_eq!(status(3, "Accepted"), ("True", "Accepted"));
    assert_eq!(status(3, "ResolvedRefs"), ("False", "InvalidRouteKinds"));
}

#[test]
fn a_listener_condition_keeps_its_transition_time_while_its_status_stays() {
    let mut g = gateway(mesh());
    let p = gateway_patch(&g, None, None, "t1").expect("a patch");
    g["status"] = p["status"].clone();
    g["metadata"]["generation"] = json!(4);
    let p = gateway_patch(&g, None, None, "t2").expect("the generation moved");
    let c = of(&p["status"]["listeners"][0]["conditions"], "Programmed");
    assert_eq!(
        (
            c["lastTransitionTime"].as_str(),
            c["observedGeneration"].as_i64()
        ),
        (Some("t1"), Some(4))
    );
}

fn bundles(version: &str) -> Bundles {
    CRDS.iter().map(|c| (*c, Ok(version.to_owned()))).collect()
}

#[test]
fn our_gateway_class_is_accepted_at_a_supported_version_and_others_are_left_alone() {
    let mut class = json!({
        "metadata": {"name": "ambient-waypoint", "generation": 1},
        "spec": {"controllerName": "ambient-dataplane.io/waypoint-controller"},
    });
    let ours = "ambient-dataplane.io/waypoint-controller";
    let v1 = bundles("v1.2.1");
    let p = class_patch(&class, "ambient-waypoint", ours, &v1, "t1").expect("a patch");
    let cs = &p["status"]["conditions"];
    assert_eq!(of(cs, "Accepted")["status"], "True");
    assert_eq!(of(cs, "Accepted")["reason"], "Accepted");
    assert_eq!(of(cs, "SupportedVersion")["status"], "True");
    assert_eq!(of(cs, "SupportedVersion")["observedGeneration"], 1);
    class["status"] = p["status"].clone();
    assert_eq!(
        class_patch(&class, "ambient-waypoint", ours, &v1, "t2"),
        None,
        "written once"
    );
    let p = class_patch(&class, "another", ours, &v1, "t3").expect("not the class served");
    assert_eq!(
        of(&p["status"]["conditions"], "Accepted")["reason"],
        "Unsupported"
    );
    class["spec"]["controllerName"] = json!("istio.io/gateway-controller");
    assert_eq!(
        class_patch(&class, "ambient-waypoint", ours, &v1, "t4"),
        None,
        "not ours"
    );
}

#[test]
fn a_crd_of_another_release_or_without_its_bundle_version_is_not_supported() {
    let class = json!({
        "metadata": {"name": "c", "generation": 2},
        "spec": {"controllerName": "x/y"},
    });
    for (version, ok) in [
        ("v1.0.0", true),
        ("v1.3.0-rc.1", true),
        ("v2.0.0", false),
        ("v0.8.1", false),
        ("v1", false),
        ("1.2.0", false),
    ] {
        let p = class_patch(&class, "c", "x/y", &bundles(version), "t").expect("a patch");
        let supported = of(&p["status"]["conditions"], "SupportedVersion");
        assert_eq!(supported["status"] == "True", ok, "{version}: {supported}");
        if !ok {
            assert_eq!(supported["reason"], "UnsupportedVersion");
            assert!(
                supported["message"]
                    .as_str()
                    .unwrap()
                    .starts_with("gateways.gateway.networking.k8s.io: bundle version"),
                "{supported}"
            );
            let accepted = of(&p["status"]["conditions"], "Accepted");
            assert_eq!(accepted["status"], "True", "best effort");
        }
    }
    let unread: Bundles = vec![
        (CRDS[0], Ok("v1.2.1".into())),
        (CRDS[1], Err("no bundle-version annotation".into())),
    ];
    let p = class_patch(&class, "c", "x/y", &unread, "t").expect("a patch");
    let supported = of(&p["status"]["conditions"], "SupportedVersion");
    assert_eq!(supported["status"], "False");
    assert!(
        supported["message"]
            .as_str()
            .unwrap()
            .contains("gatewayclasses.gateway.networking.k8s.io: no bundle-version annotation"),
        "{supported}"
    );
}
