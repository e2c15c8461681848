use serde_json::json;

use super::*;

fn gateway(port: u64) -> Json {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "waypoint", "namespace": "bookinfo", "uid": "u-1", "generation": 3,
                     "labels": {"istio.io/waypoint-for": "service"}},
        "spec": {"gatewayClassName": "ambient-waypoint",
                 "listeners": [{"name": "mesh", "port": port, "protocol": "HBONE"}]}
    })
}

fn template() -> Template {
    Template::new(
        "example/waypoint:1".into(),
        vec![
            "--xds-address".into(),
            "https://istiod.istio-system.svc:15012".into(),
        ],
        "cluster.local".into(),
        "istio-system".into(),
        "dataplane-waypoint".into(),
    )
}

#[test]
fn a_waypoint_gateway_needs_the_hbone_listener() {
    assert_eq!(validate(&gateway(15008)), Ok(()));
    let err = validate(&gateway(80)).unwrap_err();
    assert_eq!(err.field, "spec.listeners");
}

#[test]
fn every_object_is_owned_by_the_gateway_and_labelled_with_it() {
    let g = gateway(15008);
    for o in [
        service_account(&g),
        service(&g),
        deployment(&g, &template()),
    ] {
        let owner = &o["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "Gateway");
        assert_eq!(owner["uid"], "u-1");
        assert_eq!(owner["controller"], true);
        assert_eq!(o["metadata"]["namespace"], "bookinfo");
        assert_eq!(o["metadata"]["labels"][GATEWAY_NAME_LABEL], "waypoint");
        assert_eq!(o["metadata"]["labels"]["istio.io/waypoint-for"], "service");
    }
    let d = deployment(&g, &template());
    let pod = &d["spec"]["template"];
    assert_eq!(pod["metadata"]["labels"]["istio.io/dataplane-mode"], "none");
    assert_eq!(pod["spec"]["serviceAccountName"], "waypoint");
    let args: Vec<&str> = pod["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Json::as_str)
        .collect();
    assert_eq!(
        &args[..5],
        [
            "--kube",
            "--namespace",
            "bookinfo",
            "--service-account",
            "waypoint"
        ]
    );
    assert!(args.contains(&"--xds-address"));
    // It reads where its RoleBindings are: its namespace and the root namespace.
    assert!(args.contains(&"--kube-namespace=bookinfo"), "{args:?}");
    assert!(args.contains(&"--kube-namespace=istio-system"), "{args:?}");
    assert!(args.contains(&"--root-namespace=istio-system"), "{args:?}");
    assert_eq!(service(&g)["spec"]["ports"][0]["port"], 15008);
}

#[test]
fn the_waypoint_pod_has_istios_token_and_root_certificate_where_the_constants_say() {
    let d = deployment(&gateway(15008), &template());
    let pod = &d["spec"]["template"]["spec"];
    let mounts = pod["containers"][0]["volumeMounts"]
        .as_array()
        .expect("mounts");
    let file_of = |volume: &str, file: &str| {
        let m = mounts.iter().find(|m| m["name"] == volume).expect(volume);
        format!("{}/{file}", m["mountPath"].as_str().expect("path"))
    };
    assert_eq!(file_of("istio-token", "istio-token"), TOKEN_FILE);
    assert_eq!(file_of("istiod-ca-cert", "root-cert.pem"), ROOT_CERT_FILE);
    let volumes = pod["volumes"].as_array().expect("volumes");
    let token = volumes
        .iter()
        .find(|v| v["name"] == "istio-token")
        .expect("token");
    let source = &token["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(source["audience"], "istio-ca");
    assert_eq!(source["path"], "istio-token");
    let root = volumes
        .iter()
        .find(|v| v["name"] == "istiod-ca-cert")
        .expect("root");
    assert_eq!(root["configMap"]["name"], "istio-ca-root-cert");
}

#[test]
fn the_settings_reach_the_deployment() {
    let mut t = template();
    let d = deployment(&gateway(15008), &t);
    assert_eq!(d["spec"]["replicas"], 1);
    assert!(
        d["spec"]["template"]["spec"]["containers"][0]
            .get("resources")
            .is_none()
    );
    assert_eq!(
        d["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"],
        "15020"
    );
    let config = crate::kube::gateway::config::parse(
        "gatewayClassName: c\ncontrollerName: x/y\nwaypointClusterRole: r\nwaypoint:\n  image: i\n  \
         imagePullPolicy: Always\n  imagePullSecrets: [regcred]\n  replicas: 3\n  \
         resources: {requests: {cpu: 100m}, limits: {memory: 1Gi}}\n  podAnnotations: {team: mesh}\n  \
         rootCertConfigMap: roots\n  tokenAudience: aud\n  tokenExpirationSeconds: 3600\n",
        "f",
    )
    .expect("parses");
    t = config.template(Vec::new(), "cluster.local");
    let d = deployment(&gateway(15008), &t);
    let pod = &d["spec"]["template"];
    let container = &pod["spec"]["containers"][0];
    assert_eq!(d["spec"]["replicas"], 3);
    assert_eq!(container["imagePullPolicy"], "Always");
    assert_eq!(
        container["resources"],
        json!({"requests": {"cpu": "100m"}, "limits": {"memory": "1Gi"}})
    );
    assert_eq!(
        pod["spec"]["imagePullSecrets"],
        json!([{"name": "regcred"}])
    );
    assert_eq!(pod["metadata"]["annotations"], json!({"team": "mesh"}));
    let volumes = &pod["spec"]["volumes"];
    let token = &volumes[0]["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(
        (
            token["audience"].as_str(),
            token["expirationSeconds"].as_u64()
        ),
        (Some("aud"), Some(3600))
    );
    assert_eq!(volumes[1]["configMap"]["name"], "roots");
    t.autoscaling = Some(crate::kube::gateway::config::Autoscaling::default());
    let d = deployment(&gateway(15008), &t);
    assert!(
        d["spec"].get("replicas").is_none(),
        "the autoscaler owns the count"
    );
}
