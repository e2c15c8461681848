use super::*;

/// The file as the chart renders it with its default values (tests/tests/chart.rs checks the
/// rendered one parses too).
const CHART_DEFAULT: &str = r#"
# Written by the ambient-dataplane chart from its values; read by the waypoint controller.
gatewayClassName: ambient-waypoint
controllerName: ambient-dataplane.io/waypoint-controller
waypointClusterRole: dataplane-waypoint
waypoint:
  image: waypoint:0.1.0
  imagePullPolicy: IfNotPresent
  replicas: 1
  resources:
    requests:
      cpu: 100m
      memory: 128Mi
  podAnnotations:
    prometheus.io/path: /stats/prometheus
    prometheus.io/port: "15020"
    prometheus.io/scrape: "true"
  xdsAddress: https://istiod.istio-system.svc:15012
  caAddress: https://istiod.istio-system.svc:15012
  rootCertConfigMap: istio-ca-root-cert
  tokenAudience: istio-ca
  tokenExpirationSeconds: 43200
  clusterId: Kubernetes
  trustDomain: cluster.local
  rootNamespace: istio-system
  podDisruptionBudget:
    enabled: false
    minAvailable: 1
  autoscaling:
    enabled: true
    minReplicas: 2
    maxReplicas: 5
    targetCPUUtilizationPercentage: 80
"#;

#[test]
fn the_chart_file_gives_the_waypoints_its_settings() {
    let config = parse(CHART_DEFAULT, "config.yaml").expect("parses");
    assert_eq!(config.gateway_class_name, "ambient-waypoint");
    let t = config.template(vec!["--log=debug".into()], "cluster.local");
    assert_eq!(t.image, "waypoint:0.1.0");
    assert_eq!(t.cluster_role, "dataplane-waypoint");
    assert_eq!(t.root_namespace, "istio-system");
    assert_eq!(
        t.resources.as_ref().map(Resources::to_json),
        Some(serde_json::json!({"requests": {"cpu": "100m", "memory": "128Mi"}}))
    );
    assert!(t.pod_disruption_budget.is_none(), "disabled");
    assert_eq!(t.autoscaling.as_ref().map(|a| a.min_replicas), Some(2));
    assert_eq!(
        t.extra_args,
        [
            "--xds-address=https://istiod.istio-system.svc:15012",
            "--xds-root-cert=/var/run/secrets/istio/root-cert.pem",
            "--token-file=/var/run/secrets/tokens/istio-token",
            "--ca-address=https://istiod.istio-system.svc:15012",
            "--ca-root-cert=/var/run/secrets/istio/root-cert.pem",
            "--cluster-id=Kubernetes",
            "--trust-domain=cluster.local",
            "--log=debug",
        ]
    );
}

#[test]
fn an_unknown_key_is_refused_with_its_line_and_column() {
    let text = CHART_DEFAULT.replace("  replicas: 1", "  replica: 1");
    let err = parse(&text, "config.yaml").unwrap_err().to_string();
    assert!(err.starts_with("config.yaml: "), "{err}");
    assert!(err.contains("replica"), "{err}");
    assert!(err.contains("line 9"), "{err}");
    assert!(err.contains("column"), "{err}");
}

#[test]
fn a_wrong_type_is_refused_with_its_line() {
    let text = CHART_DEFAULT.replace("replicas: 1", "replicas: many");
    let err = parse(&text, "config.yaml").unwrap_err().to_string();
    assert!(err.contains("line 9"), "{err}");
    let text = CHART_DEFAULT.replace("IfNotPresent", "Sometimes");
    let err = parse(&text, "config.yaml").unwrap_err().to_string();
    assert!(err.contains("line 8"), "{err}");
}

#[test]
fn values_out_of_range_are_refused_by_their_path() {
    let text = CHART_DEFAULT.replace("maxReplicas: 5", "maxReplicas: 1");
    let err = parse(&text, "config.yaml").unwrap_err().to_string();
    assert_eq!(
        err,
        "config.yaml: waypoint.autoscaling.maxReplicas: 1 is below minReplicas (2)"
    );
    let text = CHART_DEFAULT.replace("image: waypoint:0.1.0", "image: \"\"");
    let err = parse(&text, "config.yaml").unwrap_err().to_string();
    assert_eq!(err, "config.yaml: waypoint.image: must not be empty");
}

#[test]
fn a_minimal_file_takes_the_defaults() {
    let config = parse(
        "gatewayClassName: c\ncontrollerName: x/y\nwaypointClusterRole: r\nwaypoint:\n  image: i\n",
        "f",
    )
    .expect("parses");
    let t = config.template(Vec::new(), "cluster.local");
    assert_eq!(t.replicas, 1);
    assert_eq!(t.root_cert_config_map, "istio-ca-root-cert");
    assert_eq!(t.token_audience, "istio-ca");
    assert!(t.extra_args.is_empty());
    assert!(t.pod_annotations.is_none());
}
