//! The Gateway controller (`waypoint --gateway-controller`) against the stand-in API server:
//! a Gateway of our class gets its waypoint's ServiceAccount, Service and Deployment (owned
//! by the Gateway) and a status with the Service's address and conditions; a Gateway without
//! the HBONE listener is refused in its status, naming the field; another class is left alone;
//! a deleted waypoint Deployment, Service or RoleBinding is made again. The Gateways' listeners get their status, and
//! our GatewayClass `Accepted` and `SupportedVersion` (from the CRDs' bundle version). The controller is ready once it has
//! listed the Gateways, and its metrics count Gateways, reconciles and watch errors. Each waypoint's ServiceAccount is bound to the
//! waypoint ClusterRole in its namespace (owned by the Gateway) and in the root namespace
//! (labelled with the Gateway, deleted by the controller when the Gateway goes), and the
//! waypoint reads those two namespaces only.

use std::process::Command;
use std::time::Duration;

use mesh_tests::kube_api::harness::{sample, start_api};
use mesh_tests::kube_api::{ApiServer, kubeconfig_path};
use mesh_tests::mesh::http_get;
use mesh_tests::process::binary;
use mesh_tests::waypoint::mesh;
use mesh_tests::{Proc, wait_until};
use serde_json::Value as Json;

/// A waypoint Gateway as `istioctl waypoint apply` writes it, with our class; a broken one
/// (an HTTP listener only) and one of another class.
const GATEWAYS: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: gateways.gateway.networking.k8s.io
  annotations:
    gateway.networking.k8s.io/bundle-version: v1.2.1
    gateway.networking.k8s.io/channel: standard
spec:
  group: gateway.networking.k8s.io
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: gatewayclasses.gateway.networking.k8s.io
  annotations:
    gateway.networking.k8s.io/bundle-version: v1.2.1
    gateway.networking.k8s.io/channel: standard
spec:
  group: gateway.networking.k8s.io
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata:
  name: ambient-waypoint
spec:
  controllerName: ambient-dataplane.io/waypoint-controller
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata:
  name: istio
spec:
  controllerName: istio.io/gateway-controller
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: default
  labels:
    istio.io/waypoint-for: service
spec:
  gatewayClassName: ambient-waypoint
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: broken
  namespace: default
spec:
  gatewayClassName: ambient-waypoint
  listeners:
  - name: http
    port: 80
    protocol: HTTP
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: ingress
  namespace: default
spec:
  gatewayClassName: istio
  listeners:
  - name: http
    port: 80
    protocol: HTTP
"#;

/// The condition `kind` of an object's status, or of a listener's status entry.
fn condition(object: &Json, kind: &str) -> Json {
    object
        .pointer("/status/conditions")
        .or_else(|| object.get("conditions"))
        .and_then(Json::as_array)
        .and_then(|cs| cs.iter().find(|c| c["type"] == kind).cloned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waypoint_gateway_gets_its_deployment_service_and_status() {
    let mesh = mesh();
    let api = start_api(&mesh, GATEWAYS).await;
    let kubeconfig = kubeconfig_path(&mesh);

    let mut cmd = Command::new(binary("waypoint"));
    cmd.arg("--gateway-controller")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--waypoint-image")
        .arg("example.test/waypoint:dev")
        .arg("--waypoint-arg=--xds-address=https://istiod.istio-system.svc:15012")
        .arg("--waypoint-cluster-role=test-waypoint")
        .arg("--root-namespace=istio-system")
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
            api.object("Gateway", "default", "waypoint")
                .is_some_and(|g| g.pointer("/status/addresses/0").is_some())
                && api
                    .object("Gateway", "default", "broken")
                    .is_some_and(|g| g.pointer("/status/conditions/0").is_some())
                && api
                    .object("GatewayClass", "", "ambient-waypoint")
                    .is_some_and(|c| c.pointer("/status/conditions/0").is_some())
        })
    });
    assert!(done.is_ok(), "no status written:\n{}", ctl.log());

    // Our GatewayClass is accepted, at a supported version; another controller's is not ours.
    let class = api
        .object("GatewayClass", "", "ambient-waypoint")
        .expect("class");
    for kind in ["Accepted", "SupportedVersion"] {
        let c = condition(&class, kind);
        assert_eq!(
            (&c["status"], &c["reason"]),
            (&"True".into(), &kind.into()),
            "{class}"
        );
        assert_eq!(c["observedGeneration"], 1, "{class}");
    }
    assert!(
        condition(&class, "SupportedVersion")["message"]
            .as_str()
            .is_some_and(|m| m.contains("v1.2.1")),
        "from the CRDs' bundle-version: {class}"
    );
    let istio = api.object("GatewayClass", "", "istio").expect("istio");
    assert!(istio.get("status").is_none(), "{istio}");

    let gateway = api
        .object("Gateway", "default", "waypoint")
        .expect("gateway");
    let uid = gateway["metadata"]["uid"].clone();
    for kind in ["ServiceAccount", "Service", "Deployment", "RoleBinding"] {
        let o = api
            .object(kind, "default", "waypoint")
            .unwrap_or_else(|| panic!("no {kind}:\n{}", ctl.log()));
        let owner = &o["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "Gateway", "{kind}: {o}");
        assert_eq!(owner["uid"], uid, "{kind}: {o}");
        assert_eq!(owner["controller"], true, "{kind}: {o}");
        assert_eq!(o["metadata"]["labels"]["istio.io/waypoint-for"], "service");
    }
    let service = api
        .object("Service", "default", "waypoint")
        .expect("service");
    assert_eq!(service["spec"]["ports"][0]["port"], 15008);
    let ip = service["spec"]["clusterIP"].clone();
    assert_eq!(
        gateway["status"]["addresses"][0],
        serde_json::json!({"type": "IPAddress", "value": ip}),
        "{gateway}"
    );
    assert_eq!(
        condition(&gateway, "Accepted")["status"],
        "True",
        "{gateway}"
    );
    assert_eq!(
        condition(&gateway, "Programmed")["status"],
        "True",
        "{gateway}"
    );
    // Its one listener: served, no route attaches to it (routes attach to Services).
    let listeners = gateway["status"]["listeners"]
        .as_array()
        .expect("listeners");
    assert_eq!(listeners.len(), 1, "{gateway}");
    assert_eq!(listeners[0]["name"], "mesh");
    assert_eq!(listeners[0]["attachedRoutes"], 0);
    assert_eq!(listeners[0]["supportedKinds"], serde_json::json!([]));
    for kind in ["Accepted", "Programmed", "ResolvedRefs"] {
        assert_eq!(
            condition(&listeners[0], kind)["status"],
            "True",
            "{kind}: {gateway}"
        );
    }
    let deployment = api
        .object("Deployment", "default", "waypoint")
        .expect("deployment");
    let pod = &deployment["spec"]["template"];
    assert_eq!(pod["spec"]["serviceAccountName"], "waypoint");
    assert_eq!(pod["metadata"]["labels"]["istio.io/dataplane-mode"], "none");
    let container = &pod["spec"]["containers"][0];
    assert_eq!(container["image"], "example.test/waypoint:dev");
    let args: Vec<&str> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Json::as_str)
        .collect();
    assert!(
        args.contains(&"--kube")
            && args.contains(&"--xds-address=https://istiod.istio-system.svc:15012"),
        "{args:?}"
    );
    assert!(
        args.contains(&"--kube-namespace=default")
            && args.contains(&"--kube-namespace=istio-system")
            && args.contains(&"--root-namespace=istio-system"),
        "it reads where it is bound: {args:?}"
    );
    // Bound to the waypoint ClusterRole where it reads: its namespace (owned, checked above)
    // and the root namespace (no owner across namespaces: labels name the Gateway).
    let account =
        serde_json::json!([{"kind": "ServiceAccount", "name": "waypoint", "namespace": "default"}]);
    let role = serde_json::json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "test-waypoint"});
    let local = api
        .object("RoleBinding", "default", "waypoint")
        .expect("binding");
    assert_eq!(
        (&local["roleRef"], &local["subjects"]),
        (&role, &account),
        "{local}"
    );
    let root = api
        .object("RoleBinding", "istio-system", "default.waypoint")
        .unwrap_or_else(|| panic!("no root namespace RoleBinding:\n{}", ctl.log()));
    assert_eq!(
        (&root["roleRef"], &root["subjects"]),
        (&role, &account),
        "{root}"
    );
    assert!(root["metadata"].get("ownerReferences").is_none(), "{root}");
    let labels = &root["metadata"]["labels"];
    assert_eq!(
        labels["gateway.networking.k8s.io/gateway-name"], "waypoint",
        "{root}"
    );
    assert_eq!(
        labels["ambient-dataplane.io/gateway-namespace"], "default",
        "{root}"
    );
    assert!(api.object("RoleBinding", "default", "broken").is_none());
    // Server-side apply, with our field manager.
    let applies: Vec<_> = api
        .seen()
        .into_iter()
        .filter(|s| s.content_type.as_deref() == Some("application/apply-patch+yaml"))
        .collect();
    assert!(
        applies.iter().all(|s| s
            .uri
            .contains("fieldManager=ambient-dataplane.io%2Fwaypoint-controller")),
        "{applies:?}"
    );

    // The broken Gateway: refused in its status, naming the field; nothing made for it.
    let broken = api.object("Gateway", "default", "broken").expect("broken");
    let accepted = condition(&broken, "Accepted");
    assert_eq!(accepted["status"], "False", "{broken}");
    assert_eq!(accepted["reason"], "Invalid", "{broken}");
    assert!(
        accepted["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("spec.listeners")),
        "{broken}"
    );
    assert!(api.object("Deployment", "default", "broken").is_none());
    let listener = &broken["status"]["listeners"][0];
    assert_eq!(listener["name"], "http", "{broken}");
    let accepted = condition(listener, "Accepted");
    assert_eq!(
        (&accepted["status"], &accepted["reason"]),
        (&"False".into(), &"UnsupportedProtocol".into()),
        "{broken}"
    );
    assert_eq!(
        condition(listener, "Programmed")["status"],
        "False",
        "{broken}"
    );
    // Another class's Gateway is not ours.
    let ingress = api
        .object("Gateway", "default", "ingress")
        .expect("ingress");
    assert!(ingress.get("status").is_none(), "{ingress}");
    assert!(api.object("Deployment", "default", "ingress").is_none());

    // Written once: neither our own status echo nor a label change makes another status
    // patch; the label change reaches the objects (applied again).
    api.apply_yaml(&GATEWAYS.replace("waypoint-for: service", "waypoint-for: all"))
        .expect("a label changed");
    let relabelled = tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(10), || {
            api.object("Service", "default", "waypoint")
                .is_some_and(|s| s["metadata"]["labels"]["istio.io/waypoint-for"] == "all")
        })
    });
    assert!(relabelled.is_ok(), "not applied again:\n{}", ctl.log());
    let status_patches: Vec<_> = api
        .seen()
        .into_iter()
        .filter(|s| s.method == "PATCH" && s.uri.contains("/gateways/waypoint/status"))
        .map(|s| s.body)
        .collect();
    assert_eq!(
        status_patches.len(),
        1,
        "one status patch for the waypoint Gateway: {status_patches:?}"
    );
    let class_patches = api
        .seen()
        .iter()
        .filter(|s| s.method == "PATCH" && s.uri.contains("/gatewayclasses/"))
        .count();
    assert_eq!(
        class_patches, 1,
        "one status patch, for our GatewayClass only"
    );

    // Someone deletes the waypoint's Deployment: the controller applies it again.
    assert!(api.delete("Deployment", "default", "waypoint"));
    let again = tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(10), || {
            api.object("Deployment", "default", "waypoint").is_some()
        })
    });
    assert!(
        again.is_ok(),
        "the Deployment was not made again:\n{}",
        ctl.log()
    );
    // So is any other object it made, the root namespace RoleBinding included.
    for (kind, namespace, name) in [
        ("Service", "default", "waypoint"),
        ("RoleBinding", "default", "waypoint"),
        ("RoleBinding", "istio-system", "default.waypoint"),
    ] {
        assert!(api.delete(kind, namespace, name), "{kind}");
        let again = tokio::task::block_in_place(|| {
            wait_until(Duration::from_secs(10), || {
                api.object(kind, namespace, name).is_some()
            })
        });
        assert!(
            again.is_ok(),
            "{kind} {namespace}/{name} not made again:\n{}",
            ctl.log()
        );
    }

    // The Gateway goes: the garbage collector takes what it owns; the controller deletes the
    // root namespace RoleBinding, which nothing owns.
    assert!(api.delete("Gateway", "default", "waypoint"));
    let unbound = tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(10), || {
            api.object("RoleBinding", "istio-system", "default.waypoint")
                .is_none()
        })
    });
    assert!(unbound.is_ok(), "root RoleBinding left:\n{}", ctl.log());
    let deletes: Vec<String> = api
        .seen()
        .into_iter()
        .filter(|s| s.method == "DELETE")
        .map(|s| s.uri.trim_end_matches('?').to_owned())
        .collect();
    assert_eq!(
        deletes,
        [
            "/apis/rbac.authorization.k8s.io/v1/namespaces/istio-system/rolebindings/default.waypoint"
        ],
        "the one delete"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_is_ready_once_it_has_listed_the_gateways_and_counts_its_work() {
    let mesh = mesh();
    let mut api = ApiServer::new(
        &mesh.netns("wp"),
        "127.0.0.1:16443".parse().unwrap(),
        Duration::from_millis(500),
    )
    .expect("API server");
    api.apply_yaml(GATEWAYS).expect("objects");
    let kubeconfig = kubeconfig_path(&mesh);
    api.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    // The API server is not listening yet.
    let mut cmd = Command::new(binary("waypoint"));
    cmd.arg("--gateway-controller")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--waypoint-image")
        .arg("example.test/waypoint:dev")
        .env("RUST_LOG", "info");
    let netns = mesh.netns("wp");
    let ctl = Proc::spawn("gateway-controller", &netns, cmd, mesh.dir.path()).expect("controller");
    let ready = || http_get(&netns, "127.0.0.1:15021".parse().unwrap(), "/healthz/ready");
    let answered =
        tokio::task::block_in_place(|| wait_until(Duration::from_secs(10), || ready().is_ok()));
    assert!(answered.is_ok(), "no readiness endpoint:\n{}", ctl.log());
    let (status, body) = ready().expect("readiness");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("waiting for the first list of Gateways"),
        "{body}"
    );
    let metrics = || {
        let (status, body) = http_get(&netns, "127.0.0.1:15020".parse().unwrap(), "/metrics")
            .expect("controller metrics");
        assert_eq!(status, 200, "{body}");
        body
    };
    let value = |series: &str| sample(&metrics(), series).unwrap_or(0.0);
    // The API server away: the Gateway watch's errors are counted.
    let counted = tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(10), || {
            value(r#"waypoint_controller_watch_errors_total{watch="gateways"}"#) >= 1.0
        })
    });
    assert!(counted.is_ok(), "no watch error counted:\n{}", metrics());

    api.start().expect("listen");
    let listed = tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(30), || {
            ready().is_ok_and(|(status, _)| status == 200)
        })
    });
    assert!(listed.is_ok(), "not ready after the list:\n{}", ctl.log());
    assert!(
        api.seen().iter().any(|s| s
            .uri
            .starts_with("/apis/gateway.networking.k8s.io/v1/gateways?")),
        "ready without a list"
    );
    // Two Gateways of our class (`waypoint`, `broken`; `ingress` is another's), each
    // reconciled: one made, one refused in its status.
    let reconciled = tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(10), || {
            value(r#"waypoint_controller_reconciles_total{result="ok"}"#) >= 2.0
        })
    });
    assert!(reconciled.is_ok(), "{}", metrics());
    let text = metrics();
    assert_eq!(
        sample(&text, "waypoint_controller_gateways "),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"waypoint_controller_reconciles_total{result="failed"}"#
        ),
        None,
        "{text}"
    );

    // A Gateway whose status cannot be written: a failed reconcile, retried until it passes.
    api.refuse_status_patches(true);
    api.apply_yaml(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: second, namespace: default}
spec:
  gatewayClassName: ambient-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"#,
    )
    .expect("second Gateway");
    let failing = tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(10), || {
            let text = metrics();
            sample(
                &text,
                r#"waypoint_controller_reconciles_total{result="failed"}"#,
            )
            .is_some_and(|n| n >= 1.0)
                && sample(&text, "waypoint_controller_retrying_gateways ") == Some(1.0)
        })
    });
    assert!(failing.is_ok(), "{}\n{}", metrics(), ctl.log());
    assert_eq!(value("waypoint_controller_gateways "), 3.0);
    api.refuse_status_patches(false);
    let recovered = tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(15), || {
            value("waypoint_controller_retrying_gateways ") == 0.0
        })
    });
    assert!(recovered.is_ok(), "{}\n{}", metrics(), ctl.log());
}
