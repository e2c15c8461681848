//! What a Gateway of our class becomes (pure): its waypoint's ServiceAccount, Service and
//! Deployment, each owned by the Gateway (so Kubernetes deletes them with it), and the
//! Gateway's addresses once they exist. Istio's conventions: the objects are named after the
//! Gateway, the Service carries the HBONE port 15008 named `mesh`, the pods are never
//! captured themselves (`istio.io/dataplane-mode: none`).

use std::collections::BTreeMap;

use serde_json::{Value as Json, json};

use super::config::{Autoscaling, PodDisruptionBudget, PullPolicy, Resources};

/// How the waypoint Deployments are made: from the flags alone ([`Template::new`]) or from
/// the controller's settings file (`config::ControllerConfig::template`).
#[derive(Clone, Debug)]
pub struct Template {
    /// The waypoint's container image.
    pub image: String,
    pub image_pull_policy: Option<PullPolicy>,
    /// Secrets with registry credentials, by name.
    pub image_pull_secrets: Vec<String>,
    /// The Deployment's replicas (none with an autoscaler, which owns the count).
    pub replicas: u32,
    /// The waypoint container's requests and limits.
    pub resources: Option<Resources>,
    /// The pod's annotations; `None`: Istio's Prometheus scrape annotations.
    pub pod_annotations: Option<BTreeMap<String, String>>,
    /// The ConfigMap with the mesh's root certificate (istiod writes it in every namespace).
    pub root_cert_config_map: String,
    /// The audience and lifetime of the projected token shown to istiod.
    pub token_audience: String,
    pub token_expiration_seconds: u32,
    /// Arguments after the ones every waypoint gets (`--kube`, its namespace and account),
    /// e.g. istiod's address.
    pub extra_args: Vec<String>,
    /// The cluster's DNS domain, for the Service's host name.
    pub domain: String,
    /// Istio's root namespace: the waypoint reads it besides its own (`--kube-namespace`)
    /// and applies its DestinationRules mesh-wide (`--root-namespace`).
    pub root_namespace: String,
    /// The ClusterRole each waypoint's ServiceAccount is bound to (the chart's
    /// `<release>-waypoint`).
    pub cluster_role: String,
    /// A PodDisruptionBudget per waypoint, when set.
    pub pod_disruption_budget: Option<PodDisruptionBudget>,
    /// A HorizontalPodAutoscaler per waypoint, when set.
    pub autoscaling: Option<Autoscaling>,
}

impl Template {
    /// The settings when only flags are given: one replica, Istio's defaults for the token
    /// and root certificate, no resources, budget or autoscaler.
    pub fn new(
        image: String,
        extra_args: Vec<String>,
        domain: String,
        root_namespace: String,
        cluster_role: String,
    ) -> Template {
        Template {
            image,
            image_pull_policy: None,
            image_pull_secrets: Vec::new(),
            replicas: 1,
            resources: None,
            pod_annotations: None,
            root_cert_config_map: "istio-ca-root-cert".into(),
            token_audience: "istio-ca".into(),
            token_expiration_seconds: 43_200,
            extra_args,
            domain,
            root_namespace,
            cluster_role,
            pod_disruption_budget: None,
            autoscaling: None,
        }
    }
}

/// Where a waypoint pod finds the projected token it shows istiod's CA (audience
/// `istio-ca`, as Istio's proxies) and the mesh's root certificate (the `istio-ca-root-cert`
/// ConfigMap istiod writes in every namespace): pass them on with `--waypoint-arg`s
/// (`--token-file`, `--ca-root-cert`; the chart does).
pub const TOKEN_FILE: &str = "/var/run/secrets/tokens/istio-token";
pub const ROOT_CERT_FILE: &str = "/var/run/secrets/istio/root-cert.pem";

/// The port of the waypoint's HBONE listener (Istio's).
pub const HBONE_PORT: u16 = 15008;

/// The label that ties the objects to their Gateway (the Gateway API's own).
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// Why a Gateway cannot get a waypoint: the field at fault and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

/// Checks the Gateway has what a waypoint serves: a listener of protocol HBONE on 15008.
pub fn validate(gateway: &Json) -> Result<(), Invalid> {
    let listeners = gateway
        .pointer("/spec/listeners")
        .and_then(Json::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let hbone = listeners.iter().any(|l| {
        l.get("protocol").and_then(Json::as_str) == Some("HBONE")
            && l.get("port").and_then(Json::as_u64) == Some(u64::from(HBONE_PORT))
    });
    if hbone {
        Ok(())
    } else {
        Err(Invalid {
            field: "spec.listeners".into(),
            message: "a waypoint needs a listener of protocol HBONE on port 15008 (Istio names \
                      it mesh)"
                .into(),
        })
    }
}

fn owner(gateway: &Json) -> Json {
    json!([{
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "name": gateway.pointer("/metadata/name").cloned().unwrap_or(Json::Null),
        "uid": gateway.pointer("/metadata/uid").cloned().unwrap_or(Json::Null),
        "controller": true,
        "blockOwnerDeletion": true,
    }])
}

pub(super) fn meta(gateway: &Json, labels: Json) -> Json {
    json!({
        "name": gateway.pointer("/metadata/name").cloned().unwrap_or(Json::Null),
        "namespace": gateway.pointer("/metadata/namespace").cloned().unwrap_or(Json::Null),
        "labels": labels,
        "ownerReferences": owner(gateway),
    })
}

pub(super) fn str_at<'a>(v: &'a Json, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Json::as_str)
        .unwrap_or_default()
}

/// The labels of every object: the Gateway's name and class, and `istio.io/waypoint-for`
/// when the Gateway says what it is the waypoint for.
pub(super) fn labels(gateway: &Json) -> Json {
    let mut labels = json!({
        GATEWAY_NAME_LABEL: str_at(gateway, "/metadata/name"),
        "gateway.networking.k8s.io/gateway-class-name": str_at(gateway, "/spec/gatewayClassName"),
    });
    if let Some(for_) = gateway.pointer("/metadata/labels/istio.io~1waypoint-for") {
        labels["istio.io/waypoint-for"] = for_.clone();
    }
    labels
}

/// The ServiceAccount the waypoint's identity is made of.
pub fn service_account(gateway: &Json) -> Json {
    json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": meta(gateway, labels(gateway)),
    })
}

/// The Service istiod publishes as the waypoint: HBONE on 15008.
pub fn service(gateway: &Json) -> Json {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(gateway, labels(gateway)),
        "spec": {
            "type": "ClusterIP",
            "selector": { GATEWAY_NAME_LABEL: str_at(gateway, "/metadata/name") },
            "ports": [
                {"name": "mesh", "port": 15008, "targetPort": 15008, "protocol": "TCP", "appProtocol": "hbone"},
                {"name": "status-port", "port": 15021, "targetPort": 15021, "protocol": "TCP"},
            ],
        },
    })
}

/// The waypoint's Deployment.
pub fn deployment(gateway: &Json, template: &Template) -> Json {
    let name = str_at(gateway, "/metadata/name");
    let namespace = str_at(gateway, "/metadata/namespace");
    let mut pod_labels = labels(gateway);
    pod_labels["istio.io/dataplane-mode"] = json!("none");
    let mut args = vec![
        "--kube".to_owned(),
        "--namespace".to_owned(),
        namespace.to_owned(),
        "--service-account".to_owned(),
        name.to_owned(),
        format!("--root-namespace={}", template.root_namespace),
        // Where its RoleBindings let it read (see `rbac`).
        format!("--kube-namespace={namespace}"),
    ];
    if namespace != template.root_namespace {
        args.push(format!("--kube-namespace={}", template.root_namespace));
    }
    args.extend(template.extra_args.iter().cloned());
    let field_env = |env: &str, path: &str| json!({"name": env, "valueFrom": {"fieldRef": {"fieldPath": path}}});
    let annotations = match &template.pod_annotations {
        Some(a) => json!(a),
        None => json!({
            "prometheus.io/scrape": "true",
            "prometheus.io/port": "15020",
            "prometheus.io/path": "/stats/prometheus",
        }),
    };
    let mut d = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(gateway, labels(gateway)),
        "spec": {
            "selector": {"matchLabels": { GATEWAY_NAME_LABEL: name }},
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": annotations,
                },
                "spec": {
                    "serviceAccountName": name,
                    "terminationGracePeriodSeconds": 2,
                    "volumes": [
                        {"name": "istio-token", "projected": {"sources": [{"serviceAccountToken": {
                            "audience": template.token_audience,
                            "expirationSeconds": template.token_expiration_seconds,
                            "path": "istio-token",
                        }}]}},
                        {"name": "istiod-ca-cert", "configMap": {"name": template.root_cert_config_map}},
                    ],
                    "containers": [{
                        "name": "waypoint",
                        "image": template.image,
                        "args": args,
                        "env": [
                            field_env("POD_NAME", "metadata.name"),
                            field_env("NODE_NAME", "spec.nodeName"),
                            field_env("INSTANCE_IP", "status.podIP"),
                        ],
                        "ports": [
                            {"name": "mesh", "containerPort": 15008, "protocol": "TCP"},
                            {"name": "metrics", "containerPort": 15020, "protocol": "TCP"},
                            {"name": "status-port", "containerPort": 15021, "protocol": "TCP"},
                        ],
                        "volumeMounts": [
                            {"name": "istio-token", "mountPath": "/var/run/secrets/tokens", "readOnly": true},
                            {"name": "istiod-ca-cert", "mountPath": "/var/run/secrets/istio", "readOnly": true},
                        ],
                        "readinessProbe": {
                            "httpGet": {"path": "/healthz/ready", "port": 15021},
                            "periodSeconds": 5,
                        },
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "runAsNonRoot": true,
                            "runAsUser": 1337,
                            "capabilities": {"drop": ["ALL"]},
                        },
                    }],
                },
            },
        },
    });
    let container = &mut d["spec"]["template"]["spec"]["containers"][0];
    if let Some(policy) = template.image_pull_policy {
        container["imagePullPolicy"] = json!(policy.as_str());
    }
    if let Some(resources) = &template.resources {
        container["resources"] = resources.to_json();
    }
    if !template.image_pull_secrets.is_empty() {
        let secrets: Vec<Json> = template
            .image_pull_secrets
            .iter()
            .map(|name| json!({ "name": name }))
            .collect();
        d["spec"]["template"]["spec"]["imagePullSecrets"] = json!(secrets);
    }
    // With an autoscaler the count is its to set: a replicas field here would fight it.
    if template.autoscaling.is_none() {
        d["spec"]["replicas"] = json!(template.replicas);
    }
    d
}

/// The Gateway's `status.addresses`: the Service's cluster IP once it has one, else its
/// host name (istiod publishes the waypoint from these).
pub fn addresses(gateway: &Json, service: Option<&Json>, domain: &str) -> Json {
    let ip = service
        .and_then(|s| s.pointer("/spec/clusterIP"))
        .and_then(Json::as_str)
        .filter(|ip| !ip.is_empty() && *ip != "None");
    match ip {
        Some(ip) => json!([{"type": "IPAddress", "value": ip}]),
        None => json!([{
            "type": "Hostname",
            "value": format!(
                "{}.{}.svc.{domain}",
                str_at(gateway, "/metadata/name"),
                str_at(gateway, "/metadata/namespace")
            ),
        }]),
    }
}

#[cfg(test)]
mod tests;
