//! The Gateway controller's settings file (`--controller-config`, the chart's
//! `/etc/waypoint-controller/config.yaml`) against the stand-in API server: its resources
//! reach the waypoint container, and with the PodDisruptionBudget and the autoscaler enabled
//! each waypoint gets both, owned by its Gateway (the Deployment then leaves its replica count
//! to the autoscaler). A file with an unknown key or a wrong value stops the controller at
//! start-up, naming the file, line and column, before it touches the API server; so does an
//! argument every waypoint would get and refuse.

use std::process::Command;
use std::time::Duration;

use mesh_tests::kube_api::harness::start_api;
use mesh_tests::kube_api::kubeconfig_path;
use mesh_tests::process::binary;
use mesh_tests::waypoint::mesh;
use mesh_tests::{Proc, wait_until};
use serde_json::json;

const GATEWAY: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: bookinfo
spec:
  gatewayClassName: mesh-waypoint
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
"#;

const SETTINGS: &str = r#"
gatewayClassName: mesh-waypoint
controllerName: example.com/waypoints
waypointClusterRole: release-waypoint
waypoint:
  image: registry.example.com/waypoint:2
  imagePullPolicy: Always
  replicas: 2
  resources:
    requests:
      cpu: 250m
      memory: 256Mi
    limits:
      memory: 1Gi
  xdsAddress: https://istiod.istio-system.svc:15012
  caAddress: https://istiod.istio-system.svc:15012
  clusterId: east
  trustDomain: example.org
  rootNamespace: mesh-root
  podDisruptionBudget:
    enabled: true
    minAvailable: 2
  autoscaling:
    enabled: true
    minReplicas: 2
    maxReplicas: 6
    targetCPUUtilizationPercentage: 70
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_settings_file_gives_each_waypoint_its_resources_budget_and_autoscaler() {
    let mesh = mesh();
    let api = start_api(&mesh, GATEWAY).await;
    let kubeconfig = kubeconfig_path(&mesh);
    let settings = mesh.dir.path().join("config.yaml");
    std::fs::write(&settings, SETTINGS).expect("settings");

    let mut cmd = Command::new(binary("waypoint"));
    cmd.arg("--gateway-controller")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--controller-config")
        .arg(&settings)
        .env("RUST_LOG", "info");
    let ctl = Proc::spawn(
        "gateway-controller",
        &mesh.netns("wp"),
        cmd,
        mesh.dir.path(),
    )
    .expect("controller");
    let done = tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(20), || {
            api.object("Gateway", "bookinfo", "waypoint")
                .is_some_and(|g| g.pointer("/status/addresses/0").is_some())
        })
    });
    assert!(done.is_ok(), "no status written:\n{}", ctl.log());

    let uid = api
        .object("Gateway", "bookinfo", "waypoint")
        .expect("gateway")["metadata"]["uid"]
        .clone();
    let deployment = api
        .object("Deployment", "bookinfo", "waypoint")
        .expect("deployment");
    assert!(
        deployment["spec"].get("replicas").is_none(),
        "the autoscaler owns the count: {deployment}"
    );
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], "registry.example.com/waypoint:2");
    assert_eq!(container["imagePullPolicy"], "Always");
    assert_eq!(
        container["resources"],
        json!({"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}})
    );
    let args: Vec<&str> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    for arg in [
        "--xds-address=https://istiod.istio-system.svc:15012",
        "--cluster-id=east",
        "--trust-domain=example.org",
        "--root-namespace=mesh-root",
        "--kube-namespace=mesh-root",
    ] {
        assert!(args.contains(&arg), "{arg} in {args:?}");
    }
    let root = api
        .object("RoleBinding", "mesh-root", "bookinfo.waypoint")
        .expect("root binding");
    assert_eq!(root["roleRef"]["name"], "release-waypoint");

    let pdb = api
        .object("PodDisruptionBudget", "bookinfo", "waypoint")
        .unwrap_or_else(|| panic!("no PodDisruptionBudget:\n{}", ctl.log()));
    assert_eq!(pdb["spec"]["minAvailable"], 2);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"]["gateway.networking.k8s.io/gateway-name"],
        "waypoint"
    );
    let hpa = api
        .object("HorizontalPodAutoscaler", "bookinfo", "waypoint")
        .unwrap_or_else(|| panic!("no HorizontalPodAutoscaler:\n{}", ctl.log()));
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "waypoint");
    assert_eq!(
        (
            hpa["spec"]["minReplicas"].as_u64(),
            hpa["spec"]["maxReplicas"].as_u64()
        ),
        (Some(2), Some(6))
    );
    assert_eq!(
        hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"],
        70
    );
    for o in [&pdb, &hpa] {
        assert_eq!(o["metadata"]["ownerReferences"][0]["uid"], uid, "{o}");
    }
    // Someone deletes the budget: it is made again.
    assert!(api.delete("PodDisruptionBudget", "bookinfo", "waypoint"));
    let again = tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(10), || {
            api.object("PodDisruptionBudget", "bookinfo", "waypoint")
                .is_some()
        })
    });
    assert!(again.is_ok(), "not made again:\n{}", ctl.log());
    // Applied with the file's controllerName as field manager.
    assert!(
        api.seen()
            .iter()
            .filter(|s| s.content_type.as_deref() == Some("application/apply-patch+yaml"))
            .all(|s| s.uri.contains("fieldManager=example.com%2Fwaypoints")),
        "field manager"
    );
}

#[test]
fn an_invalid_settings_file_stops_the_controller_naming_line_and_column() {
    let dir = tempfile::tempdir().expect("dir");
    let settings = dir.path().join("config.yaml");
    let kubeconfig = dir.path().join("kubeconfig");
    // Never reached: the controller must stop before it calls the API server.
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://198.18.0.1:1\n\
         contexts:\n- name: c\n  context:\n    cluster: c\ncurrent-context: c\nusers: []\n",
    )
    .expect("kubeconfig");
    for (broken, expected) in [
        (SETTINGS.replace("  replicas: 2", "  replica: 2"), "line 8"),
        (
            SETTINGS.replace("minAvailable: 2", "minAvailable: two"),
            "line 22",
        ),
    ] {
        std::fs::write(&settings, &broken).expect("settings");
        let out = Command::new(binary("waypoint"))
            .arg("--gateway-controller")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--controller-config")
            .arg(&settings)
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(&format!("{}: ", settings.display()))
                && stderr.contains(expected)
                && stderr.contains("column"),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // An argument every waypoint would get and refuse stops the controller, not each pod.
    std::fs::write(&settings, SETTINGS).expect("settings");
    let out = Command::new(binary("waypoint"))
        .arg("--gateway-controller")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--controller-config")
        .arg(&settings)
        .arg("--waypoint-arg=--log=debug")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("a waypoint would refuse its arguments") && stderr.contains("--log"),
        "{stderr}"
    );
    // The settings replace the flags: both at once is refused.
    let out = Command::new(binary("waypoint"))
        .args([
            "--gateway-controller",
            "--gateway-class=x",
            "--controller-config",
        ])
        .arg(&settings)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot be used with"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
