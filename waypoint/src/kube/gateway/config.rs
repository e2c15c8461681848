//! The controller's settings file (`--controller-config`, the chart's
//! `/etc/waypoint-controller/config.yaml`): what every waypoint it makes gets. Read once at
//! start-up; a file that does not parse, has an unknown key or a value out of range stops
//! the controller with the file, line and column (or the key's path) in the message, since a
//! controller that guessed would make every waypoint wrong.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value as Json;

use super::render::{ROOT_CERT_FILE, TOKEN_FILE, Template};

/// The whole file.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ControllerConfig {
    /// The GatewayClass whose Gateways the controller serves.
    pub gateway_class_name: String,
    /// Its `controllerName`, also the field manager of what the controller applies.
    pub controller_name: String,
    /// The ClusterRole each waypoint's ServiceAccount is bound to.
    pub waypoint_cluster_role: String,
    pub waypoint: Waypoint,
}

/// What each waypoint gets.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Waypoint {
    pub image: String,
    pub image_pull_policy: Option<PullPolicy>,
    /// Names of Secrets with registry credentials.
    #[serde(default)]
    pub image_pull_secrets: Vec<String>,
    #[serde(default = "one")]
    pub replicas: u32,
    /// The waypoint container's `resources` (requests and limits).
    pub resources: Option<Resources>,
    /// The pod's annotations; absent: Istio's Prometheus scrape annotations.
    pub pod_annotations: Option<BTreeMap<String, String>>,
    /// istiod's workload xDS and CA (`https://istiod.istio-system.svc:15012`).
    pub xds_address: Option<String>,
    pub ca_address: Option<String>,
    #[serde(default = "root_cert_config_map")]
    pub root_cert_config_map: String,
    #[serde(default = "token_audience")]
    pub token_audience: String,
    #[serde(default = "token_expiration_seconds")]
    pub token_expiration_seconds: u32,
    pub cluster_id: Option<String>,
    pub trust_domain: Option<String>,
    #[serde(default = "root_namespace")]
    pub root_namespace: String,
    #[serde(default)]
    pub pod_disruption_budget: PodDisruptionBudget,
    #[serde(default)]
    pub autoscaling: Autoscaling,
}

/// The container's `imagePullPolicy`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// A container's requests and limits (`cpu: 100m`, `memory: 128Mi`); the API server checks
/// the quantities.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default)]
    pub requests: BTreeMap<String, Quantity>,
    #[serde(default)]
    pub limits: BTreeMap<String, Quantity>,
}

/// A quantity as YAML may write it: `100m`, `1`, `0.5`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Quantity {
    Text(String),
    Whole(u64),
}

impl Resources {
    pub fn to_json(&self) -> Json {
        let map = |m: &BTreeMap<String, Quantity>| -> Json {
            m.iter()
                .map(|(k, q)| {
                    let v = match q {
                        Quantity::Text(s) => s.clone(),
                        Quantity::Whole(n) => n.to_string(),
                    };
                    (k.clone(), Json::String(v))
                })
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        let mut out = serde_json::Map::new();
        if !self.requests.is_empty() {
            out.insert("requests".into(), map(&self.requests));
        }
        if !self.limits.is_empty() {
            out.insert("limits".into(), map(&self.limits));
        }
        out.into()
    }
}

/// A PodDisruptionBudget per waypoint.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodDisruptionBudget {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "one")]
    pub min_available: u32,
}

/// A HorizontalPodAutoscaler per waypoint, on CPU.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Autoscaling {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "one")]
    pub min_replicas: u32,
    #[serde(default = "five")]
    pub max_replicas: u32,
    #[serde(rename = "targetCPUUtilizationPercentage", default = "eighty")]
    pub target_cpu_utilization_percentage: u32,
}

impl Default for Autoscaling {
    fn default() -> Autoscaling {
        Autoscaling {
            enabled: false,
            min_replicas: one(),
            max_replicas: five(),
            target_cpu_utilization_percentage: eighty(),
        }
    }
}

fn one() -> u32 {
    1
}
fn five() -> u32 {
    5
}
fn eighty() -> u32 {
    80
}
fn root_cert_config_map() -> String {
    "istio-ca-root-cert".into()
}
fn token_audience() -> String {
    "istio-ca".into()
}
fn token_expiration_seconds() -> u32 {
    43_200
}
fn root_namespace() -> String {
    "istio-system".into()
}

/// Why the file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    /// Not YAML, an unknown key or a value of the wrong type (the message has the line and
    /// column).
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    /// A value out of range, by its key's path.
    #[error("{file}: {field}: {message}")]
    Invalid {
        file: String,
        field: &'static str,
        message: String,
    },
}

/// Reads and checks the file.
pub fn load(path: &Path) -> Result<ControllerConfig, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: file.clone(),
        source,
    })?;
    parse(&text, &file)
}

/// Parses and checks the text of a file named `file` (for messages).
pub fn parse(text: &str, file: &str) -> Result<ControllerConfig, ConfigError> {
    let config: ControllerConfig =
        serde_saphyr::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_owned(),
            message: e.to_string(),
        })?;
    let invalid = |field: &'static str, message: String| ConfigError::Invalid {
        file: file.to_owned(),
        field,
        message,
    };
    let w = &config.waypoint;
    for (field, value) in [
        ("gatewayClassName", &config.gateway_class_name),
        ("controllerName", &config.controller_name),
        ("waypointClusterRole", &config.waypoint_cluster_role),
        ("waypoint.image", &w.image),
        ("waypoint.rootNamespace", &w.root_namespace),
    ] {
        if value.is_empty() {
            return Err(invalid(field, "must not be empty".into()));
        }
    }
    let a = &w.autoscaling;
    if a.enabled {
        if a.min_replicas == 0 {
            return Err(invalid(
                "waypoint.autoscaling.minReplicas",
                "must be at least 1".into(),
            ));
        }
        if a.max_replicas < a.min_replicas {
            return Err(invalid(
                "waypoint.autoscaling.maxReplicas",
                format!(
                    "{} is below minReplicas ({})",
                    a.max_replicas, a.min_replicas
                ),
            ));
        }
        if !(1..=100).contains(&a.target_cpu_utilization_percentage) {
            return Err(invalid(
                "waypoint.autoscaling.targetCPUUtilizationPercentage",
                format!(
                    "{} is not a percentage from 1 to 100",
                    a.target_cpu_utilization_percentage
                ),
            ));
        }
    }
    if w.token_expiration_seconds < 600 {
        // The kubelet refuses projected tokens that live less than ten minutes.
        return Err(invalid(
            "waypoint.tokenExpirationSeconds",
            format!("{} is below 600", w.token_expiration_seconds),
        ));
    }
    Ok(config)
}

impl ControllerConfig {
    /// How the waypoint Deployments are made, with `extra_args` (the `--waypoint-arg`s) after
    /// those the file's settings give.
    pub fn template(&self, extra_args: Vec<String>, domain: &str) -> Template {
        let w = &self.waypoint;
        let mut args = Vec::new();
        if let Some(xds) = &w.xds_address {
            args.push(format!("--xds-address={xds}"));
            args.push(format!("--xds-root-cert={ROOT_CERT_FILE}"));
            args.push(format!("--token-file={TOKEN_FILE}"));
        }
        if let Some(ca) = &w.ca_address {
            args.push(format!("--ca-address={ca}"));
            args.push(format!("--ca-root-cert={ROOT_CERT_FILE}"));
            if w.xds_address.is_none() {
                args.push(format!("--token-file={TOKEN_FILE}"));
            }
        }
        if let Some(cluster) = &w.cluster_id {
            args.push(format!("--cluster-id={cluster}"));
        }
        if let Some(domain) = &w.trust_domain {
            args.push(format!("--trust-domain={domain}"));
        }
        args.extend(extra_args);
        Template {
            image: w.image.clone(),
            image_pull_policy: w.image_pull_policy,
            image_pull_secrets: w.image_pull_secrets.clone(),
            replicas: w.replicas,
            resources: w.resources.clone(),
            pod_annotations: w.pod_annotations.clone(),
            root_cert_config_map: w.root_cert_config_map.clone(),
            token_audience: w.token_audience.clone(),
            token_expiration_seconds: w.token_expiration_seconds,
            extra_args: args,
            domain: domain.to_owned(),
            root_namespace: w.root_namespace.clone(),
            cluster_role: self.waypoint_cluster_role.clone(),
            pod_disruption_budget: w
                .pod_disruption_budget
                .enabled
                .then(|| w.pod_disruption_budget.clone()),
            autoscaling: w.autoscaling.enabled.then(|| w.autoscaling.clone()),
        }
    }
}

#[cfg(test)]
mod tests;
