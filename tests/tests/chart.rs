//! The Helm chart (`deploy/chart`) checked without a cluster: `helm lint --strict` and
//! `helm template` with the default and with non-default values, every rendered object
//! validated against the Kubernetes schemas of 1.30 to 1.37 (unknown fields fail) or its CRD's
//! schema, the facts an Istio ambient install relies on asserted on the rendered objects, the
//! ztunnel container's environment parsed by ztunnel's own flag parser, the waypoint
//! controller's settings file by the controller's own parser, and broken values refused with
//! the field named. Tools: `cargo xtask prereqs` (see `mesh_tests::chart`).

use std::path::{Path, PathBuf};

use mesh_tests::chart::{
    self, NAMESPACE, Tools, object, rules_grant, volume_holding, waypoint_settings, ztunnel_config,
    ztunnel_container,
};
use serde_json::{Value, json};
use ztunnel::config::InboundSource;

fn values(name: &str) -> PathBuf {
    chart::repo_path("tests/chart").join(name)
}

fn render_default() -> Vec<Value> {
    Tools::find()
        .template(&[], &[])
        .unwrap_or_else(|e| panic!("helm template (default values) failed:\n{e}"))
}

fn render_custom() -> Vec<Value> {
    Tools::find()
        .template(&[&values("values-custom.yaml")], &[])
        .unwrap_or_else(|e| panic!("helm template (values-custom.yaml) failed:\n{e}"))
}

/// The rendered config.yaml as the controller reads it (its own parser).
fn controller_config(objects: &[Value]) -> waypoint::kube::gateway::config::ControllerConfig {
    let map = object(objects, "ConfigMap", "dataplane-waypoint-controller");
    let text = map["data"]["config.yaml"].as_str().expect("config.yaml");
    waypoint::kube::gateway::config::parse(text, "config.yaml")
        .unwrap_or_else(|e| panic!("the controller refuses the rendered file: {e}\n{text}"))
}

fn kinds(objects: &[Value]) -> Vec<String> {
    let mut kinds: Vec<String> = objects
        .iter()
        .map(|o| format!("{}/{}", o["kind"].as_str().unwrap(), o["metadata"]["name"]))
        .collect();
    kinds.sort();
    kinds
}

#[test]
fn default_values_lint_clean_and_every_object_validates_on_1_30_to_1_37() {
    let tools = Tools::find();
    let lint = tools.lint(&[], &[]);
    let report = String::from_utf8_lossy(&lint.stdout);
    assert!(lint.status.success(), "helm lint --strict:\n{report}");
    assert!(
        report.contains("1 chart(s) linted, 0 chart(s) failed"),
        "{report}"
    );

    let objects = render_default();
    assert_eq!(
        kinds(&objects),
        [
            "ClusterRole/\"dataplane-waypoint\"",
            "ClusterRole/\"dataplane-waypoint-controller\"",
            "ClusterRoleBinding/\"dataplane-waypoint-controller\"",
            "ConfigMap/\"dataplane-waypoint-controller\"",
            "DaemonSet/\"ztunnel\"",
            "Deployment/\"dataplane-waypoint-controller\"",
            "GatewayClass/\"ambient-waypoint\"",
            "ServiceAccount/\"dataplane-waypoint-controller\"",
            "ServiceAccount/\"ztunnel\"",
        ]
    );
    assert_eq!(tools.validate(&objects), Ok((8, 1)));
}

#[test]
fn renders_for_each_supported_kubernetes_version_and_refuses_older_ones() {
    let tools = Tools::find();
    let expected = kinds(&render_default());
    for version in chart::KUBERNETES_VERSIONS {
        let objects = tools
            .template_with(&["--kube-version", version], &[], &[])
            .unwrap_or_else(|e| panic!("helm template --kube-version {version}:\n{e}"));
        assert_eq!(kinds(&objects), expected, "Kubernetes {version}");
    }
    let error = tools
        .template_with(&["--kube-version", "1.29.0"], &[], &[])
        .unwrap_err();
    assert!(
        error.contains(
            "requires kubeVersion: >=1.30.0-0 which is incompatible with Kubernetes v1.29.0"
        ),
        "{error}"
    );
}

#[test]
fn non_default_values_lint_clean_and_every_object_validates_on_1_30_to_1_37() {
    let tools = Tools::find();
    let lint = tools.lint(&[&values("values-custom.yaml")], &[]);
    let report = String::from_utf8_lossy(&lint.stdout);
    assert!(lint.status.success(), "helm lint --strict:\n{report}");

    let objects = render_custom();
    assert_eq!(tools.validate(&objects), Ok((8, 1)));
}

#[test]
fn ztunnel_daemonset_follows_istio_conventions() {
    let objects = render_default();
    let daemonset = object(&objects, "DaemonSet", "ztunnel");
    assert_eq!(daemonset["metadata"]["namespace"], NAMESPACE);
    let spec = &daemonset["spec"];
    assert_eq!(spec["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(spec["updateStrategy"]["rollingUpdate"]["maxSurge"], 1);
    assert_eq!(spec["updateStrategy"]["rollingUpdate"]["maxUnavailable"], 0);

    let template = &spec["template"];
    assert_eq!(
        template["metadata"]["labels"]["istio.io/dataplane-mode"],
        "none"
    );
    let annotations = &template["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "15020");
    assert_eq!(annotations["prometheus.io/path"], "/stats/prometheus");

    let pod = &template["spec"];
    assert_eq!(pod["serviceAccountName"], "ztunnel");
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(
        pod["tolerations"],
        json!([
            {"effect": "NoSchedule", "operator": "Exists"},
            {"key": "CriticalAddonsOnly", "operator": "Exists"},
            {"effect": "NoExecute", "operator": "Exists"},
        ])
    );
    assert!(pod.get("hostNetwork").is_none() && pod.get("hostPID").is_none());

    let container = &pod["containers"][0];
    let security = &container["securityContext"];
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(
        security["capabilities"]["add"],
        json!(["BPF", "NET_ADMIN", "SYS_ADMIN", "PERFMON"])
    );
    assert_eq!(security["privileged"], false);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);

    let probe = &container["readinessProbe"]["httpGet"];
    assert_eq!(probe["port"], 15021);
    assert_eq!(probe["path"], "/healthz/ready");

    let volume = |name: &str| {
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
            .clone()
    };
    let token = &volume("istio-token")["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(token["audience"], "istio-ca");
    assert_eq!(token["path"], "istio-token");
    assert_eq!(
        volume("istiod-ca-cert")["configMap"]["name"],
        "istio-ca-root-cert"
    );
    for (name, host) in [
        ("host-proc", "/proc"),
        ("host-bpf", "/sys/fs/bpf"),
        ("host-cgroup", "/sys/fs/cgroup"),
        ("state-dir", "/var/run/ztunnel"),
    ] {
        assert_eq!(volume(name)["hostPath"]["path"], host, "volume {name}");
    }
}

#[test]
fn ztunnel_environment_is_what_the_binary_reads_and_its_paths_are_mounted() {
    let objects = render_default();
    let container = ztunnel_container(&objects);
    let config = ztunnel_config(container);
    let istiod = Some("https://istiod.istio-system.svc:15012".to_owned());
    assert_eq!(config.xds_address, istiod);
    assert_eq!(config.ca_address, istiod);
    assert_eq!(config.cluster_id, "Kubernetes");
    assert_eq!(config.trust_domain, "cluster.local");
    assert_eq!(config.node, "node-a");
    assert_eq!(config.pod_name, "ztunnel-x7k2p");
    assert_eq!(config.pod_namespace, NAMESPACE);
    assert_eq!(config.instance_ip, "198.18.0.10");
    assert_eq!(config.inbound_source, InboundSource::Client);
    assert!(config.config.is_none() && config.netns_dir.is_none());

    // Every path ztunnel uses is on the volume meant for it.
    let paths = [
        (config.token_file.clone().unwrap(), "projected"),
        (config.ca_root_cert.clone().unwrap(), "configMap"),
        (config.proc_root.clone().unwrap(), "hostPath"),
        (config.cgroup_root.clone().unwrap(), "hostPath"),
        (config.bpf_pin_dir(), "hostPath"),
        (config.state_dir(), "hostPath"),
    ];
    let host_paths: Vec<String> = paths
        .iter()
        .map(|(path, source)| {
            let (mount, volume) = volume_holding(&objects, path);
            assert!(
                volume.get(*source).is_some(),
                "{} is on {volume}, not a {source} volume",
                path.display()
            );
            volume["hostPath"]["path"]
                .as_str()
                .map(|host| format!("{host} at {mount}"))
                .unwrap_or_default()
        })
        .filter(|s| !s.is_empty())
        .collect();
    assert_eq!(
        host_paths,
        [
            "/proc at /host/proc",
            "/sys/fs/cgroup at /host/cgroup",
            "/sys/fs/bpf at /sys/fs/bpf",
            "/var/run/ztunnel at /var/run/ztunnel",
        ]
    );
    assert_eq!(
        config.bpf_pin_dir(),
        Path::new("/sys/fs/bpf/ztunnel/node-a")
    );
    assert_eq!(config.state_dir(), Path::new("/var/run/ztunnel/node-a"));

    // The kubelet waits for the whole drain before it kills the old pod of an upgrade.
    let grace = object(&objects, "DaemonSet", "ztunnel")["spec"]["template"]["spec"]
        ["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    assert_eq!(config.drain_deadline_secs, 600);
    assert!(grace >= config.drain_deadline_secs, "grace {grace}s");
}

#[test]
fn non_default_values_reach_ztunnel_and_the_waypoints() {
    let objects = render_custom();
    let container = ztunnel_container(&objects);
    assert_eq!(
        container["image"],
        "registry.example.com/mesh/ztunnel:1.2.3"
    );
    assert_eq!(container["imagePullPolicy"], "Always");
    let config = ztunnel_config(container);
    let istiod = Some("https://istiod-canary.istio-system.svc:15012".to_owned());
    assert_eq!(config.xds_address, istiod);
    assert_eq!(config.cluster_id, "east");
    assert_eq!(config.trust_domain, "example.org");
    assert_eq!(config.log, "info,ztunnel::proxy=debug");
    assert!(config.log_json);
    assert_eq!(config.worker_threads, 4);
    assert_eq!(config.inbound_source, InboundSource::Loopback);
    assert_eq!(config.drain_deadline_secs, 900);

    let pod = &object(&objects, "DaemonSet", "ztunnel")["spec"]["template"];
    assert_eq!(pod["spec"]["terminationGracePeriodSeconds"], 960);
    assert_eq!(
        pod["spec"]["imagePullSecrets"],
        json!([{"name": "regcred"}])
    );
    assert_eq!(pod["metadata"]["labels"]["team"], "platform");
    assert_eq!(
        pod["metadata"]["annotations"]["example.com/owner"],
        "platform"
    );
    assert!(
        pod["metadata"]["annotations"]
            .get("prometheus.io/scrape")
            .is_none()
    );
    let (_, cgroup) = volume_holding(&objects, config.cgroup_root.as_ref().unwrap());
    assert_eq!(cgroup["hostPath"]["path"], "/sys/fs/cgroup/unified");
    let (_, state) = volume_holding(&objects, &config.state_dir());
    assert_eq!(state["hostPath"]["path"], "/run/ztunnel");
    let token = &pod["spec"]["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(token["expirationSeconds"], 3600);

    let class = object(&objects, "GatewayClass", "custom-waypoint");
    assert_eq!(
        class["spec"]["controllerName"],
        "mesh.example.com/waypoints"
    );
    let controller = object(&objects, "Deployment", "dataplane-waypoint-controller");
    let container = &controller["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        container["image"],
        "registry.example.com/mesh/waypoint:1.2.3"
    );
    let args = container["args"].as_array().expect("args");
    // The class and controllerName the controller serves are the GatewayClass's: its own
    // parser reads them, and the rest, from the rendered settings file.
    let config = controller_config(&objects);
    assert_eq!(config.gateway_class_name, "custom-waypoint");
    assert_eq!(config.controller_name, "mesh.example.com/waypoints");
    let template = config.template(Vec::new(), "cluster.local");
    assert_eq!(template.image, "registry.example.com/mesh/waypoint:1.2.3");
    assert_eq!(template.root_namespace, "mesh-root");
    assert_eq!(template.replicas, 2);
    assert_eq!(template.image_pull_secrets, ["regcred"]);
    assert!(template.pod_annotations.is_none(), "no scrape annotations");
    assert_eq!(
        template.pod_disruption_budget.map(|p| p.min_available),
        Some(2)
    );
    let autoscaling = template.autoscaling.expect("autoscaling");
    assert_eq!(
        (
            autoscaling.min_replicas,
            autoscaling.max_replicas,
            autoscaling.target_cpu_utilization_percentage
        ),
        (2, 10, 60)
    );
    assert!(
        template
            .extra_args
            .contains(&"--xds-address=https://istiod-canary.istio-system.svc:15012".to_owned()),
        "{:?}",
        template.extra_args
    );
    assert_eq!(
        args.last(),
        Some(&json!("--waypoint-arg=--protocol-detection-timeout-ms=500")),
        "extra arguments come last"
    );

    let settings = waypoint_settings(&objects);
    assert_eq!(settings["gatewayClassName"], "custom-waypoint");
    let waypoint = &settings["waypoint"];
    assert_eq!(waypoint["replicas"], 2);
    assert_eq!(waypoint["rootNamespace"], "mesh-root");
    assert_eq!(waypoint["imagePullSecrets"], json!(["regcred"]));
    assert!(waypoint.get("podAnnotations").is_none());
    assert_eq!(
        waypoint["podDisruptionBudget"],
        json!({"enabled": true, "minAvailable": 2})
    );
    assert_eq!(
        waypoint["autoscaling"],
        json!({"enabled": true, "minReplicas": 2, "maxReplicas": 10, "targetCPUUtilizationPercentage": 60})
    );
    // With those on, and only then, the controller may create them.
    let rules = &object(&objects, "ClusterRole", "dataplane-waypoint-controller")["rules"];
    assert!(rules_grant(
        rules,
        "policy",
        "poddisruptionbudgets",
        "create"
    ));
    assert!(rules_grant(
        rules,
        "autoscaling",
        "horizontalpodautoscalers",
        "create"
    ));
}

#[test]
fn waypoint_class_controller_and_settings_by_default() {
    let objects = render_default();
    let class = object(&objects, "GatewayClass", "ambient-waypoint");
    assert_eq!(
        class["spec"]["controllerName"],
        "ambient-dataplane.io/waypoint-controller"
    );
    let controller = object(&objects, "Deployment", "dataplane-waypoint-controller");
    let pod = &controller["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "dataplane-waypoint-controller");
    let args = pod["containers"][0]["args"].as_array().expect("args");
    assert_eq!(
        args,
        &[
            json!("--gateway-controller"),
            json!("--controller-config=/etc/waypoint-controller/config.yaml")
        ]
    );
    // The controller's own parser takes the rendered file: the class and controllerName are
    // the GatewayClass's, its waypoints are bound to the chart's waypoint ClusterRole and get
    // istiod's address and the credential files where the controller mounts them
    // (render.rs: TOKEN_FILE, ROOT_CERT_FILE, checked against the Deployment it renders by
    // its unit test).
    let config = controller_config(&objects);
    assert_eq!(config.gateway_class_name, "ambient-waypoint");
    assert_eq!(
        config.controller_name,
        "ambient-dataplane.io/waypoint-controller"
    );
    let template = config.template(Vec::new(), "cluster.local");
    assert_eq!(template.cluster_role, "dataplane-waypoint");
    assert_eq!(template.root_namespace, "istio-system");
    assert_eq!(template.image, "waypoint:0.1.0");
    assert_eq!(
        template.resources.map(|r| r.to_json()),
        Some(json!({"requests": {"cpu": "100m", "memory": "128Mi"}}))
    );
    for arg in [
        "--xds-address=https://istiod.istio-system.svc:15012",
        "--ca-address=https://istiod.istio-system.svc:15012",
        "--token-file=/var/run/secrets/tokens/istio-token",
        "--ca-root-cert=/var/run/secrets/istio/root-cert.pem",
        "--cluster-id=Kubernetes",
        "--trust-domain=cluster.local",
    ] {
        assert!(
            template.extra_args.contains(&arg.to_owned()),
            "{arg} in {:?}",
            template.extra_args
        );
    }
    // Ready once it has listed the Gateways (the controller's /healthz/ready on 15021, the
    // default of its --ready-addr).
    assert_eq!(
        pod["containers"][0]["readinessProbe"]["httpGet"],
        json!({"path": "/healthz/ready", "port": 15021})
    );
    // Scraped where it serves its metrics (the default of its --metrics-addr).
    let annotations = &controller["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/port"], "15020");
    assert_eq!(annotations["prometheus.io/path"], "/stats/prometheus");
    assert_eq!(
        pod["containers"][0]["volumeMounts"][0]["mountPath"],
        "/etc/waypoint-controller"
    );
    assert_eq!(
        pod["volumes"][0]["configMap"]["name"],
        "dataplane-waypoint-controller"
    );

    let settings = waypoint_settings(&objects);
    assert_eq!(settings["controllerName"], class["spec"]["controllerName"]);
    assert_eq!(settings["waypointClusterRole"], "dataplane-waypoint");
    let waypoint = &settings["waypoint"];
    assert_eq!(waypoint["image"], "waypoint:0.1.0");
    assert_eq!(
        waypoint["xdsAddress"],
        "https://istiod.istio-system.svc:15012"
    );
    assert_eq!(waypoint["tokenAudience"], "istio-ca");
    assert_eq!(
        waypoint["podAnnotations"],
        json!({"prometheus.io/scrape": "true", "prometheus.io/port": "15020", "prometheus.io/path": "/stats/prometheus"})
    );
    assert_eq!(waypoint["podDisruptionBudget"]["enabled"], false);
    assert_eq!(waypoint["autoscaling"]["enabled"], false);
}

#[test]
fn rbac_grants_each_component_the_least_it_needs() {
    let objects = render_default();
    // ztunnel calls no Kubernetes API: no role, no binding, no token mounted.
    let bound: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"].as_str().is_some_and(|k| k.ends_with("Binding")))
        .flat_map(|o| o["subjects"].as_array().unwrap())
        .collect();
    assert_eq!(
        bound,
        [
            &json!({"kind": "ServiceAccount", "name": "dataplane-waypoint-controller", "namespace": NAMESPACE})
        ]
    );
    assert_eq!(
        object(&objects, "ServiceAccount", "ztunnel")["automountServiceAccountToken"],
        false
    );

    let controller = &object(&objects, "ClusterRole", "dataplane-waypoint-controller")["rules"];
    let waypoint = &object(&objects, "ClusterRole", "dataplane-waypoint")["rules"];
    for rules in [controller, waypoint] {
        for rule in rules.as_array().unwrap() {
            for verb in rule["verbs"].as_array().unwrap() {
                assert!(
                    !["*", "deletecollection", "update", "escalate", "impersonate"]
                        .contains(&verb.as_str().unwrap()),
                    "rule {rule} grants {verb}"
                );
                // The one delete: the controller's root-namespace RoleBindings of deleted
                // Gateways, which no owner reference removes.
                if verb == "delete" {
                    assert_eq!(rule["resources"], json!(["rolebindings"]), "{rule}");
                }
            }
            assert!(
                !rule.to_string().contains("secrets"),
                "rule {rule} reaches secrets"
            );
        }
    }
    let gateway = "gateway.networking.k8s.io";
    assert!(rules_grant(controller, gateway, "gateways", "watch"));
    assert!(rules_grant(controller, gateway, "gateways/status", "patch"));
    assert!(!rules_grant(controller, gateway, "gateways", "patch"));
    for resource in ["deployments", "services", "serviceaccounts"] {
        let group = if resource == "deployments" {
            "apps"
        } else {
            ""
        };
        assert!(
            rules_grant(controller, group, resource, "create"),
            "{resource}"
        );
        assert!(
            rules_grant(controller, group, resource, "patch"),
            "{resource}"
        );
    }
    assert!(rules_grant(
        controller,
        "rbac.authorization.k8s.io",
        "rolebindings",
        "delete"
    ));
    assert!(!rules_grant(
        waypoint,
        "rbac.authorization.k8s.io",
        "rolebindings",
        "delete"
    ));
    // It reads the two Gateway API CRDs it uses (their release), and no other.
    let crds: Vec<&Value> = controller
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["apiGroups"] == json!(["apiextensions.k8s.io"]))
        .collect();
    assert_eq!(crds.len(), 1);
    assert_eq!(crds[0]["verbs"], json!(["get"]));
    assert_eq!(
        crds[0]["resourceNames"],
        json!([
            "gateways.gateway.networking.k8s.io",
            "gatewayclasses.gateway.networking.k8s.io"
        ])
    );
    // It binds waypoints to their ClusterRole, and to no other.
    let bind: Vec<&Value> = controller
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["verbs"] == json!(["bind"]))
        .collect();
    assert_eq!(bind.len(), 1);
    assert_eq!(bind[0]["resourceNames"], json!(["dataplane-waypoint"]));
    assert!(!rules_grant(
        controller,
        "policy",
        "poddisruptionbudgets",
        "create"
    ));
    assert!(!rules_grant(
        controller,
        "autoscaling",
        "horizontalpodautoscalers",
        "create"
    ));

    for (group, resource) in [
        ("networking.istio.io", "virtualservices"),
        ("networking.istio.io", "destinationrules"),
        ("security.istio.io", "authorizationpolicies"),
        ("security.istio.io", "requestauthentications"),
        (gateway, "httproutes"),
        (gateway, "grpcroutes"),
        (gateway, "gateways"),
    ] {
        assert!(
            rules_grant(waypoint, group, resource, "watch"),
            "{resource}"
        );
        assert!(
            !rules_grant(waypoint, group, resource, "patch"),
            "{resource}"
        );
    }
    assert!(rules_grant(waypoint, gateway, "httproutes/status", "patch"));
    for (group, kind) in [
        ("security.istio.io", "authorizationpolicies"),
        ("security.istio.io", "requestauthentications"),
        ("networking.istio.io", "virtualservices"),
        ("networking.istio.io", "destinationrules"),
    ] {
        let status = format!("{kind}/status");
        assert!(rules_grant(waypoint, group, &status, "patch"), "{status}");
    }
}

#[test]
fn a_value_of_the_wrong_type_is_refused_naming_the_field() {
    let tools = Tools::find();
    let file = values("values-wrong-type.yaml");
    let error = tools.template(&[&file], &[]).unwrap_err();
    assert!(
        error.contains(
            "ztunnel.drainDeadlineSeconds: Invalid type. Expected: integer, given: string"
        ),
        "{error}"
    );
    let lint = tools.lint(&[&file], &[]);
    assert!(!lint.status.success());
    assert!(String::from_utf8_lossy(&lint.stdout).contains("ztunnel.drainDeadlineSeconds"));

    let error = tools
        .template(&[], &["ztunnel.drainDeadline=5"])
        .unwrap_err();
    assert!(
        error.contains("ztunnel: Additional property drainDeadline is not allowed"),
        "{error}"
    );
    let error = tools
        .template(&[], &["ztunnel.inboundSource=pod"])
        .unwrap_err();
    assert!(error.contains("ztunnel.inboundSource"), "{error}");
}

#[test]
fn a_grace_period_shorter_than_the_drain_is_refused() {
    let error = Tools::find()
        .template(&[&values("values-short-grace.yaml")], &[])
        .unwrap_err();
    assert!(
        error.contains(
            "ztunnel.terminationGracePeriodSeconds (30) is shorter than ztunnel.drainDeadlineSeconds (600)"
        ),
        "{error}"
    );
}

#[test]
fn the_validators_reject_unknown_fields_and_wrong_types() {
    let tools = Tools::find();
    let objects = render_default();
    let index = |kind: &str| objects.iter().position(|o| o["kind"] == kind).unwrap();

    let mut broken = objects.clone();
    broken[index("DaemonSet")]["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilitiez"] =
        json!({"add": ["BPF"]});
    let report = tools.validate(&broken).unwrap_err();
    assert!(report.contains("'capabilitiez' was unexpected"), "{report}");
    assert!(report.contains("daemonset/ztunnel"), "{report}");

    let mut broken = objects.clone();
    broken[index("GatewayClass")]["spec"]["controllerNames"] = json!("x.io/y");
    let report = tools.validate(&broken).unwrap_err();
    assert!(
        report.contains("'\"controllerNames\"' does not exist"),
        "{report}"
    );

    let mut broken = objects.clone();
    broken[index("GatewayClass")]["spec"]["controllerName"] = json!(5);
    let report = tools.validate(&broken).unwrap_err();
    assert!(
        report.contains("data/spec/controllerName must be string"),
        "{report}"
    );
}

#[test]
fn the_kubernetes_examples_validate_and_the_waypoint_accepts_their_routes() {
    let tools = Tools::find();
    let dir = chart::repo_path("deploy/examples/kubernetes");
    let mut objects = Vec::new();
    for file in ["waypoint.yaml", "routes.yaml", "security.yaml"] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        objects.extend(chart::parse_documents(&text));
    }
    // The Namespace against Kubernetes' schemas; Gateway, HTTPRoute, DestinationRule,
    // RequestAuthentication and AuthorizationPolicy against their CRDs.
    assert_eq!(tools.validate(&objects), Ok((1, 5)));

    let gateway = object(&objects, "Gateway", "waypoint");
    let class = object(&render_default(), "GatewayClass", "ambient-waypoint").clone();
    assert_eq!(
        gateway["spec"]["gatewayClassName"],
        class["metadata"]["name"]
    );
    assert_eq!(
        gateway["spec"]["listeners"],
        json!([{"name": "mesh", "port": 15008, "protocol": "HBONE"}])
    );
    let namespace = object(&objects, "Namespace", "bookinfo");
    assert_eq!(
        namespace["metadata"]["labels"]["istio.io/dataplane-mode"],
        "ambient"
    );
    assert_eq!(
        namespace["metadata"]["labels"]["istio.io/use-waypoint"],
        "waypoint"
    );

    // The routes load in our waypoint as they are.
    let out = std::process::Command::new(mesh_tests::process::binary("waypoint"))
        .arg("--check")
        .arg(&dir)
        .output()
        .expect("running waypoint --check");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        report.contains("4 resources accepted, 0 rejected"),
        "{report}"
    );
}
