//! The waypoint L7 proxy.
//!
//! `waypoint --mesh-config MESH.yaml --routes FILE|DIR...` (or `--xds-address` for istiod's
//! workload API instead of the file) serves HBONE on 15008 as
//! `spiffe://<trust domain>/ns/<namespace>/sa/<service account>` and routes the HTTP inside
//! each tunnel by the VirtualServices, DestinationRules, HTTPRoutes and GRPCRoutes of the
//! route files (watched), or of the Kubernetes API with `--kube` (listed and watched).
//!
//! `waypoint --check FILE|DIR...` reads each file (or every `.yaml`/`.yml`/`.json` file of a
//! directory), compiles the route table, prints every error and warning with file, line,
//! document, resource and field path, and exits 1 if any resource was rejected.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use waypoint::config::{self, LoadOptions, Severity};
use waypoint::route::{self, CompileOptions};
use ztunnel::identity::Identity;

/// Shared L7 proxy of the ambient mesh.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Check these route config files or directories (VirtualService, DestinationRule,
    /// HTTPRoute; other kinds are skipped) and exit: 0 if all load, 1 if any is rejected.
    #[arg(long, value_name = "PATH", num_args = 1.., conflicts_with_all = ["mesh_config", "xds_address"])]
    check: Vec<PathBuf>,
    /// The mesh's workloads and services, in ztunnel's local config format (watched).
    #[arg(long, value_name = "FILE", required_unless_present_any = ["check", "xds_address", "gateway_controller"])]
    mesh_config: Option<PathBuf>,
    /// Or from istiod's workload API (delta ADS) at this address, e.g.
    /// `https://istiod.istio-system.svc:15012` (`http://` for a plaintext test server).
    #[arg(long, env = "XDS_ADDRESS", conflicts_with = "mesh_config")]
    xds_address: Option<String>,
    /// PEM root certificate(s) istiod's serving certificate must chain to.
    #[arg(long, env = "XDS_ROOT_CA")]
    xds_root_cert: Option<PathBuf>,
    /// Bearer token sent to istiod (a projected service account token), re-read per request.
    #[arg(long, env = "XDS_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    cluster_id: String,
    /// The waypoint's pod and node, as istiod identifies its clients.
    #[arg(long, env = "POD_NAME", default_value = "waypoint")]
    pod_name: String,
    #[arg(long, env = "NODE_NAME", default_value = "")]
    node: String,
    #[arg(long, env = "INSTANCE_IP", default_value = "")]
    instance_ip: String,
    /// Route config files or directories to serve (watched; a change with errors is not
    /// applied and the last good routes stay).
    #[arg(long, value_name = "PATH", num_args = 1.., conflicts_with = "kube")]
    routes: Vec<PathBuf>,
    /// Read the routes (VirtualService, DestinationRule, HTTPRoute, GRPCRoute, all
    /// namespaces) from the Kubernetes API instead of files: listed and watched; an object
    /// with errors is left out and the others serve; while the API server is away the last
    /// good routes keep serving. Readiness waits for the first complete list.
    #[arg(long)]
    kube: bool,
    /// With `--kube`, read only this namespace (repeat it): one list and watch per kind and
    /// namespace, for a waypoint whose RoleBindings let it read there only (the Gateway
    /// controller gives its waypoints their own namespace and the root namespace). Without
    /// it, all namespaces.
    #[arg(long, value_name = "NAMESPACE", requires = "kube")]
    kube_namespace: Vec<String>,
    /// The kubeconfig of `--kube` and `--gateway-controller` (its current context); without
    /// it, the in-cluster config (the pod's service account).
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// Run the Gateway controller instead of a proxy: for each Gateway of `--gateway-class`,
    /// apply the waypoint's ServiceAccount, Service and Deployment (owned by the Gateway)
    /// and set its status.addresses and conditions.
    #[arg(long, conflicts_with_all = ["check", "kube", "routes"])]
    gateway_controller: bool,
    /// The controller's settings file (the chart's /etc/waypoint-controller/config.yaml):
    /// its GatewayClass, controllerName, the waypoint ClusterRole, and what each waypoint
    /// gets (image, replicas, resources, istiod's address, root namespace,
    /// PodDisruptionBudget, HorizontalPodAutoscaler). Read once at start-up: an invalid file
    /// stops the controller with its line and column. It replaces the flags of the same
    /// settings, which may not be given with it.
    #[arg(
        long,
        value_name = "FILE",
        requires = "gateway_controller",
        conflicts_with_all = ["gateway_class", "controller_name", "waypoint_image", "waypoint_cluster_role", "root_namespace"]
    )]
    controller_config: Option<PathBuf>,
    /// The GatewayClass whose Gateways `--gateway-controller` serves.
    #[arg(long, default_value = "ambient-waypoint")]
    gateway_class: String,
    /// The waypoint image of the Deployments `--gateway-controller` makes.
    #[arg(long, value_name = "IMAGE")]
    waypoint_image: Option<String>,
    /// An argument added to those of every waypoint `--gateway-controller` makes (repeat it),
    /// e.g. `--waypoint-arg=--xds-address=https://istiod.istio-system.svc:15012`.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    waypoint_arg: Vec<String>,
    /// The ClusterRole `--gateway-controller` binds each waypoint's ServiceAccount to, with a
    /// RoleBinding in the Gateway's namespace and one in `--root-namespace` (the chart's
    /// `<release>-waypoint`).
    #[arg(long, default_value = "dataplane-waypoint")]
    waypoint_cluster_role: String,
    /// The Gateway API `controllerName` of the route status `--kube` writes (and the field
    /// manager of what `--gateway-controller` applies).
    #[arg(long, default_value = waypoint::kube::DEFAULT_CONTROLLER_NAME)]
    controller_name: String,
    /// With `--kube`, do not write status (`Accepted`, `ResolvedRefs` on HTTPRoutes and
    /// GRPCRoutes attached to the Services the waypoint serves; `WaypointAccepted` on the
    /// AuthorizationPolicies and RequestAuthentications bound to it or refused by it).
    #[arg(long, requires = "kube")]
    no_route_status: bool,
    /// The waypoint's namespace; also that of resources that do not name one.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// The waypoint's service account: its identity is
    /// spiffe://<trust domain>/ns/<namespace>/sa/<service account>.
    #[arg(long, default_value = "waypoint")]
    service_account: String,
    /// The name of the waypoint's Gateway, which AuthorizationPolicy `targetRefs` name to
    /// apply to every request through it; default: the service account (Istio names a
    /// waypoint's service account after its Gateway).
    #[arg(long, env = "GATEWAY_NAME")]
    gateway_name: Option<String>,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// The local CA's directory (ca-key.pem, root-cert.pem; created if absent).
    #[arg(long, default_value = "/var/run/ztunnel/ca")]
    ca_dir: PathBuf,
    /// Take the certificate from Istio's CA at this address instead (istiod's 15012, e.g.
    /// `https://istiod.istio-system.svc:15012`), as ztunnel does.
    #[arg(long, env = "CA_ADDRESS", requires = "ca_root_cert")]
    ca_address: Option<String>,
    /// PEM root of the mesh (verifies istiod and the peers); with `--ca-address`.
    #[arg(long, env = "CA_ROOT_CERT")]
    ca_root_cert: Option<PathBuf>,
    /// Lifetime asked of Istio's CA for the certificate, in seconds.
    #[arg(long, default_value_t = 86_400)]
    cert_ttl_secs: u64,
    /// HBONE listener.
    #[arg(long, default_value = "0.0.0.0:15008")]
    listen: SocketAddr,
    /// Readiness (`/healthz/ready`; with `--gateway-controller`: 200 once it has listed the
    /// Gateways).
    #[arg(long, default_value = "0.0.0.0:15021")]
    ready_addr: SocketAddr,
    /// Prometheus metrics (`/metrics`, `/stats/prometheus`; with `--gateway-controller`, the
    /// controller's own).
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    /// Admin (`/config_dump`: identity, mesh, route hosts, the last route change's errors).
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// Milliseconds between looks at the route files for changes.
    #[arg(long, default_value_t = 500)]
    poll_ms: u64,
    /// The cluster's DNS domain, for short host names.
    #[arg(long, default_value = "cluster.local")]
    domain: String,
    /// Istio's root namespace, whose DestinationRules apply mesh-wide (with
    /// `--gateway-controller`: the waypoints it makes read it besides their own namespace).
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
    /// Append `-shadow` to the host of mirrored requests, as Envoy and Istio up to 1.27 do
    /// (Istio 1.28+ leaves the authority unchanged: the default).
    #[arg(long)]
    mirror_shadow_suffix: bool,
    /// On a port that declares no protocol, milliseconds to wait for the client's first bytes
    /// before relaying the connection as TCP (for protocols where the server speaks first,
    /// such as MySQL or SMTP). 0 waits as long as it takes, as Istio's default
    /// `protocolDetectionTimeout: 0s`; declare such ports `tcp` instead where you can.
    #[arg(long, default_value_t = 0)]
    protocol_detection_timeout_ms: u64,
    /// Worker threads of the runtime.
    #[arg(long, default_value_t = 2)]
    worker_threads: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !args.check.is_empty() {
        return check(&args);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    if args.gateway_controller {
        return gateway_controller(&args);
    }
    let mesh = match (&args.mesh_config, &args.xds_address) {
        (Some(path), _) => waypoint::run::MeshSource::File(path.clone()),
        (None, Some(address)) => {
            use ztunnel::source::xds;
            waypoint::run::MeshSource::Xds(Box::new(xds::XdsConfig {
                target: ztunnel::grpc::GrpcTarget {
                    address: address.clone(),
                    root_cert: args.xds_root_cert.clone(),
                    token_file: args.token_file.clone(),
                    cluster_id: args.cluster_id.clone(),
                },
                node: xds::NodeInfo {
                    node_name: args.node.clone(),
                    pod_name: args.pod_name.clone(),
                    pod_namespace: args.namespace.clone(),
                    instance_ip: args.instance_ip.clone(),
                    cluster_id: args.cluster_id.clone(),
                },
                trust_domain: args.trust_domain.clone(),
                backoff: xds::Backoff::default(),
                netns_dir: None,
            }))
        }
        (None, None) => {
            eprintln!("--mesh-config or --xds-address is required");
            return ExitCode::FAILURE;
        }
    };
    let identity = match Identity::new(&args.trust_domain, &args.namespace, &args.service_account) {
        Ok(id) => id,
        Err(e) => {
            eprintln!("waypoint identity: {e}");
            return ExitCode::FAILURE;
        }
    };
    let opts = waypoint::run::Options {
        mesh,
        routes: args.routes.clone(),
        identity,
        ca: match (&args.ca_address, &args.ca_root_cert) {
            (Some(address), Some(root)) => waypoint::run::CaSource::Istio {
                target: ztunnel::grpc::GrpcTarget {
                    address: address.clone(),
                    root_cert: Some(root.clone()),
                    token_file: args.token_file.clone(),
                    cluster_id: args.cluster_id.clone(),
                },
                root: root.clone(),
                ttl: Duration::from_secs(args.cert_ttl_secs.max(60)),
            },
            _ => waypoint::run::CaSource::Local(args.ca_dir.clone()),
        },
        listen: args.listen,
        ready_addr: args.ready_addr,
        metrics_addr: args.metrics_addr,
        admin_addr: args.admin_addr,
        load: LoadOptions {
            default_namespace: args.namespace.clone(),
        },
        compile: CompileOptions {
            domain_suffix: args.domain.clone(),
            root_namespace: args.root_namespace.clone(),
            namespace: args.namespace.clone(),
            gateway_name: gateway_name(&args),
            gateway_class: None,
            canonical_labels_only: args.xds_address.is_some(),
        },
        poll: Duration::from_millis(args.poll_ms.max(10)),
        mirror_shadow_suffix: args.mirror_shadow_suffix,
        protocol_detection_timeout: (args.protocol_detection_timeout_ms > 0)
            .then(|| Duration::from_millis(args.protocol_detection_timeout_ms)),
        kube: args.kube.then(|| waypoint::kube::KubeOptions {
            kubeconfig: args.kubeconfig.clone(),
            controller_name: args.controller_name.clone(),
            write_status: !args.no_route_status,
            namespaces: args.kube_namespace.clone(),
        }),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.worker_threads.max(1))
        .enable_all()
        .thread_name("waypoint")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(waypoint::run::run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn gateway_controller(args: &Args) -> ExitCode {
    use waypoint::kube::gateway::{GatewayOptions, config, render::Template};
    let (class, controller_name, template) = match &args.controller_config {
        Some(path) => match config::load(path) {
            Ok(c) => {
                let template = c.template(args.waypoint_arg.clone(), &args.domain);
                (c.gateway_class_name, c.controller_name, template)
            }
            Err(e) => {
                eprintln!("controller settings: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => {
            let Some(image) = args.waypoint_image.clone() else {
                eprintln!("--gateway-controller needs --waypoint-image or --controller-config");
                return ExitCode::FAILURE;
            };
            let template = Template::new(
                image,
                args.waypoint_arg.clone(),
                args.domain.clone(),
                args.root_namespace.clone(),
                args.waypoint_cluster_role.clone(),
            );
            (
                args.gateway_class.clone(),
                args.controller_name.clone(),
                template,
            )
        }
    };
    if let Err(e) = check_waypoint_args(&template) {
        eprintln!("controller settings: a waypoint would refuse its arguments: {e}");
        return ExitCode::FAILURE;
    }
    let opts = GatewayOptions {
        kube: waypoint::kube::KubeOptions {
            kubeconfig: args.kubeconfig.clone(),
            controller_name,
            write_status: true,
            namespaces: Vec::new(),
        },
        class,
        template,
        ready_addr: args.ready_addr,
        metrics_addr: args.metrics_addr,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(waypoint::kube::gateway::run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Parses the arguments a waypoint Deployment of `template` gets, as the waypoint would, so
/// that a setting or `--waypoint-arg` it does not take stops the controller now instead of
/// every waypoint pod later. Only a missing argument is let through (the mesh source may come
/// from the environment).
fn check_waypoint_args(template: &waypoint::kube::gateway::render::Template) -> Result<(), String> {
    let sample = serde_json::json!({"metadata": {"name": "waypoint", "namespace": "default"}});
    let deployment = waypoint::kube::gateway::render::deployment(&sample, template);
    let given = deployment
        .pointer("/spec/template/spec/containers/0/args")
        .and_then(serde_json::Value::as_array)
        .cloned()
        .unwrap_or_default();
    let argv = std::iter::once("waypoint".to_owned())
        .chain(given.iter().filter_map(|a| a.as_str().map(str::to_owned)));
    match Args::try_parse_from(argv) {
        Err(e) if e.kind() != clap::error::ErrorKind::MissingRequiredArgument => {
            Err(e.render().to_string().trim().to_owned())
        }
        _ => Ok(()),
    }
}

fn check(args: &Args) -> ExitCode {
    let load = LoadOptions {
        default_namespace: args.namespace.clone(),
    };
    let mut loaded = config::Loaded::default();
    for p in &args.check {
        let l = config::load_path(p, &load);
        loaded.resources.extend(l.resources);
        loaded.diagnostics.extend(l.diagnostics);
        loaded.rejected.extend(l.rejected);
        loaded.skipped += l.skipped;
    }
    let compiled = route::compile(
        &loaded.resources,
        &CompileOptions {
            domain_suffix: args.domain.clone(),
            root_namespace: args.root_namespace.clone(),
            namespace: args.namespace.clone(),
            gateway_name: gateway_name(args),
            gateway_class: None,
            canonical_labels_only: false,
        },
    );
    let all = loaded.diagnostics.iter().chain(&compiled.diagnostics);
    let mut errors = 0;
    let mut warnings = 0;
    for d in all {
        match d.severity() {
            Severity::Error => errors += 1,
            Severity::Warning => warnings += 1,
        }
        println!("{d}");
    }
    let rejected = loaded.rejected.len() + compiled.rejected.len();
    println!(
        "{} resources accepted, {rejected} rejected, {} of other kinds skipped; {errors} errors, {warnings} warnings; routes for {} hosts",
        loaded.resources.len() - compiled.rejected.len(),
        loaded.skipped,
        compiled.table.hosts().len(),
    );
    if errors > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// `--gateway-name`, else the service account's name.
fn gateway_name(args: &Args) -> String {
    args.gateway_name
        .clone()
        .unwrap_or_else(|| args.service_account.clone())
}
