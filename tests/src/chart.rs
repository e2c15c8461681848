//! The Helm chart's test harness: runs the real `helm` on `deploy/chart`, parses what it
//! renders, and validates objects offline: Kubernetes kinds with `kubernetes-validate` (the
//! Kubernetes schemas, strict), Gateway API and Istio kinds with `tests/chart/validate_crds.mjs`
//! (their CRD schemas, from npm). The tools are those `cargo xtask prereqs` installs in
//! `/opt/mesh-chart-tools` (or `$MESH_CHART_TOOLS`); no cluster is involved.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use clap::{CommandFactory, Parser};
use serde_json::Value;
use ztunnel::config::Config;

/// Kubernetes versions the chart supports (Chart.yaml's kubeVersion is >=1.30), up to the
/// newest `kubernetes-validate` 1.37.0 knows. Every object is validated against each.
pub const KUBERNETES_VERSIONS: &[&str] = &[
    "1.30.0", "1.31.0", "1.32.0", "1.33.0", "1.34.0", "1.35.0", "1.36.0", "1.37.0",
];

/// The release name and namespace the tests render with (Istio's namespace).
pub const RELEASE: &str = "dataplane";
pub const NAMESPACE: &str = "istio-system";

/// API groups whose kinds are CRDs, validated against their CRD schemas instead.
const CRD_GROUPS: &[&str] = &[
    "gateway.networking.k8s.io",
    "gateway.networking.x-k8s.io",
    "networking.istio.io",
    "security.istio.io",
    "telemetry.istio.io",
    "extensions.istio.io",
];

/// The installed tools.
pub struct Tools {
    pub helm: PathBuf,
    pub kubernetes_validate: PathBuf,
    /// The npm project holding `@kubernetes-models/*` and TypeScript.
    pub node_dir: PathBuf,
}

impl Tools {
    /// Finds the tools, or panics saying how to install them.
    pub fn find() -> Tools {
        let dir = std::env::var_os("MESH_CHART_TOOLS")
            .filter(|d| !d.is_empty())
            .map_or_else(|| PathBuf::from("/opt/mesh-chart-tools"), PathBuf::from);
        let tools = Tools {
            helm: dir.join("venv/bin/helm"),
            kubernetes_validate: dir.join("venv/bin/kubernetes-validate"),
            node_dir: dir.join("node"),
        };
        for needed in [
            &tools.helm,
            &tools.kubernetes_validate,
            &tools
                .node_dir
                .join("node_modules/@kubernetes-models/gateway-api"),
        ] {
            assert!(
                needed.exists(),
                "{} is missing: run `cargo xtask prereqs` (it installs the chart tests' tools \
                 into {})",
                needed.display(),
                dir.display()
            );
        }
        tools
    }

    /// `helm lint --strict` of the chart with these values files and `--set` values.
    pub fn lint(&self, values: &[&Path], set: &[&str]) -> Output {
        let mut command = Command::new(&self.helm);
        command.arg("lint").arg("--strict").arg(chart_dir());
        add_values(&mut command, values, set);
        command.output().expect("running helm lint")
    }

    /// `helm template` of the chart: its objects, or helm's error output.
    pub fn template(&self, values: &[&Path], set: &[&str]) -> Result<Vec<Value>, String> {
        self.template_with(&[], values, set)
    }

    /// `helm template` with extra arguments (e.g. `--kube-version`).
    pub fn template_with(
        &self,
        extra: &[&str],
        values: &[&Path],
        set: &[&str],
    ) -> Result<Vec<Value>, String> {
        let mut command = Command::new(&self.helm);
        command
            .args(["template", RELEASE])
            .arg(chart_dir())
            .args(["--namespace", NAMESPACE])
            .args(extra);
        add_values(&mut command, values, set);
        let out = command.output().expect("running helm template");
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(parse_documents(&String::from_utf8_lossy(&out.stdout)))
    }

    /// Validates every object: Kubernetes kinds strictly against each of
    /// [`KUBERNETES_VERSIONS`], CRD kinds against their CRDs. Returns how many objects of
    /// each sort passed, or the validators' report naming the object and the field.
    pub fn validate(&self, objects: &[Value]) -> Result<(usize, usize), String> {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut kubernetes = Vec::new();
        let mut crds = Vec::new();
        for (i, object) in objects.iter().enumerate() {
            let file = dir.path().join(format!(
                "{i:02}-{}-{}.json",
                object["kind"].as_str().unwrap_or("unknown"),
                object["metadata"]["name"].as_str().unwrap_or("unnamed")
            ));
            std::fs::write(&file, object.to_string()).expect("writing an object");
            if is_crd_kind(object) {
                crds.push(file);
            } else {
                kubernetes.push(file);
            }
        }
        let mut report = String::new();
        if !kubernetes.is_empty() {
            for version in KUBERNETES_VERSIONS {
                let out = Command::new(&self.kubernetes_validate)
                    .args(["--strict", "--kubernetes-version", version])
                    .args(&kubernetes)
                    .output()
                    .expect("running kubernetes-validate");
                let stdout = String::from_utf8_lossy(&out.stdout);
                // A kind it has no schema for is only a warning to it: a failure here.
                let passed = stdout.lines().filter(|l| l.contains(" passed ")).count();
                if !out.status.success() || passed != kubernetes.len() {
                    let _ = write!(
                        report,
                        "kubernetes-validate {version}: {passed} of {} passed\n{stdout}{}",
                        kubernetes.len(),
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
        }
        if !crds.is_empty() {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("chart/validate_crds.mjs");
            let out = Command::new("node")
                .arg(script)
                .arg(&self.node_dir)
                .args(&crds)
                .output()
                .expect("running node (installed by cargo xtask prereqs)");
            let stdout = String::from_utf8_lossy(&out.stdout);
            let passed = stdout.lines().filter(|l| l.starts_with("ok ")).count();
            if !out.status.success() || passed != crds.len() {
                let _ = write!(
                    report,
                    "CRD validation: {passed} of {} passed\n{stdout}{}",
                    crds.len(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        if report.is_empty() {
            Ok((kubernetes.len(), crds.len()))
        } else {
            Err(report)
        }
    }
}

fn add_values(command: &mut Command, values: &[&Path], set: &[&str]) {
    for file in values {
        command.arg("--values").arg(file);
    }
    for value in set {
        command.args(["--set", value]);
    }
}

/// `deploy/chart`.
pub fn chart_dir() -> PathBuf {
    repo_path("deploy/chart")
}

/// A path from the repository's root.
pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the repository")
        .join(relative)
}

/// The objects of a multi-document YAML text (empty documents dropped).
pub fn parse_documents(yaml: &str) -> Vec<Value> {
    let documents: Vec<Value> =
        serde_saphyr::from_multiple(yaml).unwrap_or_else(|e| panic!("not YAML: {e}\n{yaml}"));
    documents.into_iter().filter(|d| !d.is_null()).collect()
}

/// Whether an object's kind is a CRD's (Gateway API, Istio).
pub fn is_crd_kind(object: &Value) -> bool {
    let group = object["apiVersion"]
        .as_str()
        .and_then(|v| v.split_once('/'))
        .map_or("", |(group, _)| group);
    CRD_GROUPS.contains(&group)
}

/// The one object of this kind and name, or a panic listing what there is.
pub fn object<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| {
            let present: Vec<String> = objects
                .iter()
                .map(|o| format!("{}/{}", o["kind"], o["metadata"]["name"]))
                .collect();
            panic!("no {kind}/{name} among {present:?}")
        })
}

/// A container's environment as `NAME=value` pairs: literal values as they are, downward-API
/// values replaced by the sample `fields` gives (as the kubelet fills them in), and `$(NAME)`
/// references expanded as the kubelet does.
pub fn container_env(container: &Value, fields: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    for var in container["env"].as_array().into_iter().flatten() {
        let name = var["name"]
            .as_str()
            .expect("an env var has a name")
            .to_owned();
        let value = if let Some(value) = var["value"].as_str() {
            let mut value = value.to_owned();
            for (earlier, earlier_value) in &env {
                value = value.replace(&format!("$({earlier})"), earlier_value);
            }
            value
        } else {
            let path = var["valueFrom"]["fieldRef"]["fieldPath"]
                .as_str()
                .unwrap_or_else(|| panic!("env {name}: neither a value nor a fieldRef"));
            fields
                .iter()
                .find(|(field, _)| *field == path)
                .map(|(_, sample)| (*sample).to_owned())
                .unwrap_or_else(|| panic!("env {name}: no sample for field {path}"))
        };
        env.push((name, value));
    }
    env
}

/// Samples of what the kubelet fills in from the downward API.
pub const FIELDS: &[(&str, &str)] = &[
    ("spec.nodeName", "node-a"),
    ("metadata.name", "ztunnel-x7k2p"),
    ("metadata.namespace", NAMESPACE),
    ("status.podIP", "198.18.0.10"),
];

/// The ztunnel container of the rendered DaemonSet.
pub fn ztunnel_container(objects: &[Value]) -> &Value {
    let daemonset = object(objects, "DaemonSet", "ztunnel");
    &daemonset["spec"]["template"]["spec"]["containers"][0]
}

/// ztunnel's configuration from the container's environment, through ztunnel's own parser:
/// each variable must be one a flag of ztunnel reads.
pub fn ztunnel_config(container: &Value) -> Config {
    let command = Config::command();
    let mut args = vec!["ztunnel".to_owned()];
    for (name, value) in container_env(container, FIELDS) {
        let arg = command
            .get_arguments()
            .find(|a| a.get_env() == Some(OsStr::new(&name)))
            .unwrap_or_else(|| panic!("the chart sets {name}, which no flag of ztunnel reads"));
        let long = arg.get_long().expect("ztunnel's flags are long flags");
        if matches!(arg.get_action(), clap::ArgAction::SetTrue) {
            assert_eq!(value, "true", "{name} is a switch: only \"true\" sets it");
            args.push(format!("--{long}"));
        } else {
            args.push(format!("--{long}={value}"));
        }
    }
    Config::try_parse_from(&args)
        .unwrap_or_else(|e| panic!("ztunnel refuses the chart's environment {args:?}: {e}"))
}

/// The volume mounted at the deepest mount path holding `path`, and that volume's source.
pub fn volume_holding<'a>(objects: &'a [Value], path: &Path) -> (&'a str, &'a Value) {
    let pod = &object(objects, "DaemonSet", "ztunnel")["spec"]["template"]["spec"];
    let mount = pod["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| path.starts_with(m["mountPath"].as_str().unwrap()))
        .max_by_key(|m| m["mountPath"].as_str().unwrap().len())
        .unwrap_or_else(|| {
            panic!(
                "{} is in no volume of the ztunnel container",
                path.display()
            )
        });
    let name = mount["name"].as_str().unwrap();
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("mount {name} has no volume"));
    (mount["mountPath"].as_str().unwrap(), volume)
}

/// The waypoint controller's settings, config.yaml of its ConfigMap.
pub fn waypoint_settings(objects: &[Value]) -> Value {
    let map = object(objects, "ConfigMap", "dataplane-waypoint-controller");
    let text = map["data"]["config.yaml"].as_str().expect("config.yaml");
    let mut documents = parse_documents(text);
    assert_eq!(documents.len(), 1, "{text}");
    documents.remove(0)
}

/// Whether a rule of a (Cluster)Role grants `verb` on `resource` of `group` (or `*` does).
pub fn rules_grant(rules: &Value, group: &str, resource: &str, verb: &str) -> bool {
    rules.as_array().unwrap().iter().any(|rule| {
        let has = |field: &str, value: &str| {
            rule[field]
                .as_array()
                .is_some_and(|list| list.iter().any(|v| v == value || v == "*"))
        };
        has("apiGroups", group) && has("resources", resource) && has("verbs", verb)
    })
}
