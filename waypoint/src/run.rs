//! The waypoint process: its identity and certificate, the mesh state (the local config file
//! ztunnel reads, watched), the route files (watched; a change with errors is refused whole
//! and the last good table kept), the snapshot both make, readiness on 15021, and the HBONE
//! listener on 15008.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use tokio::sync::watch;

use ztunnel::hbone::{Pool, PoolConfig};
use ztunnel::identity::{
    CertManager, CertificateSource, Identity, IstioCa, LocalCa, ManagerConfig, SystemClock,
    TrustBundle,
};
use ztunnel::state::State;

use crate::config::{self, LoadOptions, Severity};
use crate::metrics::Metrics;
use crate::route::{self, CompileOptions, RouteTable};
use crate::server::{self, Ctx};
use crate::snapshot::Snapshot;
use crate::upstream::{Dialer, HttpPool};

/// Where the mesh's workloads and services come from: the same sources as ztunnel's.
#[derive(Clone, Debug)]
pub enum MeshSource {
    /// ztunnel's local config format, watched.
    File(PathBuf),
    /// istiod's workload API (delta ADS), as ztunnel's xDS client reads it.
    Xds(Box<ztunnel::source::xds::XdsConfig>),
}

/// Where the waypoint's certificate comes from: the same CA as ztunnel's.
#[derive(Clone, Debug)]
pub enum CaSource {
    /// The local CA's directory (`ca-key.pem`, `root-cert.pem`), as ztunnel's `--ca-dir`.
    Local(PathBuf),
    /// Istio's CA (`IstioCertificateService` on istiod's 15012); `root` is the PEM file of
    /// the mesh's root, which also verifies istiod's serving certificate.
    Istio {
        target: ztunnel::grpc::GrpcTarget,
        root: PathBuf,
        ttl: Duration,
    },
}

/// What the process is started with.
#[derive(Clone, Debug)]
pub struct Options {
    pub mesh: MeshSource,
    /// Route files or directories (VirtualService, DestinationRule, HTTPRoute, GRPCRoute).
    pub routes: Vec<PathBuf>,
    pub identity: Identity,
    /// Where the waypoint's certificate comes from.
    pub ca: CaSource,
    pub listen: SocketAddr,
    pub ready_addr: SocketAddr,
    /// Prometheus metrics (`/metrics`).
    pub metrics_addr: SocketAddr,
    /// Admin (`/config_dump`), loopback by default.
    pub admin_addr: SocketAddr,
    pub load: LoadOptions,
    pub compile: CompileOptions,
    /// How often the route files are looked at for changes.
    pub poll: Duration,
    /// Append `-shadow` to mirrored requests' host.
    pub mirror_shadow_suffix: bool,
    /// See `server::Ctx::protocol_detection_timeout`.
    pub protocol_detection_timeout: Option<Duration>,
    /// Read the routes from the Kubernetes API instead of `routes`.
    pub kube: Option<crate::kube::KubeOptions>,
}

/// Loads and compiles the route files: the table, and whether anything was rejected.
pub fn load_routes(opts: &Options) -> (RouteTable, Vec<String>) {
    let mut resources = Vec::new();
    let mut problems = Vec::new();
    let mut rejected = Vec::new();
    for p in &opts.routes {
        let loaded = config::load_path(p, &opts.load);
        rejected.extend(loaded.rejected.iter().cloned());
        problems.extend(
            loaded
                .diagnostics
                .iter()
                .map(|d| (d.severity(), d.to_string())),
        );
        resources.extend(loaded.resources);
    }
    let mut compiled = route::compile(&resources, &opts.compile);
    compiled.table.authz.reject_all(&rejected, &opts.compile);
    compiled.table.authn.reject_all(&rejected, &opts.compile);
    problems.extend(
        compiled
            .diagnostics
            .iter()
            .map(|d| (d.severity(), d.to_string())),
    );
    let mut errors = Vec::new();
    for (severity, text) in problems {
        match severity {
            Severity::Error => {
                tracing::warn!("route config: {text}");
                errors.push(text);
            }
            Severity::Warning => tracing::info!("route config: {text}"),
        }
    }
    (compiled.table, errors)
}

/// Name, modification time and size of every route file: a change in any is a new config.
fn fingerprint(paths: &[PathBuf]) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
    let mut out = Vec::new();
    let mut add = |p: &Path| {
        let meta = std::fs::metadata(p).ok();
        out.push((
            p.to_owned(),
            meta.as_ref().and_then(|m| m.modified().ok()),
            meta.map_or(0, |m| m.len()),
        ));
    };
    for p in paths {
        add(p);
        if let Ok(entries) = std::fs::read_dir(p) {
            let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            files.sort();
            files.iter().for_each(|f| add(f));
        }
    }
    out
}

/// Re-reads the route files when they change. A change with errors is not applied: the
/// table in force stays, and the errors are logged with file, document and field.
/// The route config's history, for `/config_dump`: how the last change ended and its errors.
#[derive(Debug, Default)]
pub(crate) struct RouteStatus {
    /// `initial`, `applied` or `rejected` (`waiting` for the Kubernetes API's first lists).
    pub(crate) last_change: &'static str,
    /// The errors of the last change (of the initial load when it was the last), as logged;
    /// from the Kubernetes API, those of every object in force.
    pub(crate) errors: Vec<String>,
}

pub(crate) type SharedStatus = Arc<std::sync::Mutex<RouteStatus>>;

fn watch_routes(
    opts: Options,
    tx: watch::Sender<Arc<RouteTable>>,
    metrics: Arc<Metrics>,
    status: SharedStatus,
) {
    let applied = metrics.config("routes", "applied");
    let rejected = metrics.config("routes", "rejected");
    tokio::spawn(async move {
        let mut seen = fingerprint(&opts.routes);
        loop {
            tokio::time::sleep(opts.poll).await;
            let now = fingerprint(&opts.routes);
            if now == seen {
                continue;
            }
            seen = now;
            let o = opts.clone();
            let Ok((table, errors)) = tokio::task::spawn_blocking(move || load_routes(&o)).await
            else {
                continue;
            };
            let ok = errors.is_empty();
            if let Ok(mut s) = status.lock() {
                s.last_change = if ok { "applied" } else { "rejected" };
                s.errors.clone_from(&errors);
            }
            if ok {
                tracing::info!(hosts = table.hosts().len(), "route config applied");
                tx.send_replace(Arc::new(table));
                applied.inc();
            } else {
                rejected.inc();
                tracing::warn!(
                    errors = errors.len(),
                    "route config not applied, keeping the last good one"
                );
            }
        }
    });
}

/// Publishes a new snapshot whenever the mesh state or the route table changes.
fn combine(
    mut state: watch::Receiver<Arc<State>>,
    mut routes: watch::Receiver<Arc<RouteTable>>,
    tx: watch::Sender<Arc<Snapshot>>,
) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                changed = state.changed() => if changed.is_err() { return },
                changed = routes.changed() => if changed.is_err() { return },
            }
            let snap = Snapshot::new(
                state.borrow_and_update().clone(),
                routes.borrow_and_update().clone(),
            );
            tx.send_replace(Arc::new(snap));
        }
    });
}

/// What `/config_dump` shows: who the waypoint is, what it knows of the mesh, which hosts
/// have routes, and how the last route change ended (with its errors).
fn config_dump(
    identity: &str,
    source: &str,
    snap: &Snapshot,
    status: &SharedStatus,
) -> serde_json::Value {
    let (last_change, errors) = status
        .lock()
        .map(|s| (s.last_change, s.errors.clone()))
        .unwrap_or(("unknown", Vec::new()));
    serde_json::json!({
        "identity": identity,
        "mesh": {
            "source": source,
            "complete": snap.state.incomplete().is_none(),
            "workloads": snap.state.workloads().count(),
            "services": snap.state.services().map(|s| s.hostname.clone()).collect::<Vec<_>>(),
        },
        "routes": {
            "hosts": snap.table.hosts(),
            "authorization_policies": snap.table.authz.keys(),
            "request_authentications": snap.table.authn.keys(),
            "last_change": last_change,
            "errors": errors,
        },
    })
}

/// The route files: loaded now (the resources with errors left out) and watched.
fn file_routes(
    opts: &Options,
    metrics: &Arc<Metrics>,
) -> (SharedStatus, watch::Receiver<Arc<RouteTable>>) {
    let (table, errors) = load_routes(opts);
    if !errors.is_empty() {
        tracing::warn!(
            errors = errors.len(),
            "route config: the resources with errors are left out"
        );
    }
    tracing::info!(hosts = table.hosts().len(), "route config applied");
    let (routes_tx, routes_rx) = watch::channel(Arc::new(table));
    metrics.config("routes", "applied").inc();
    let status: SharedStatus = Arc::new(std::sync::Mutex::new(RouteStatus {
        last_change: "initial",
        errors,
    }));
    watch_routes(opts.clone(), routes_tx, metrics.clone(), status.clone());
    (status, routes_rx)
}

/// The routes from the Kubernetes API: none until every kind is listed (readiness waits).
async fn kube_routes(
    opts: &Options,
    kube: &crate::kube::KubeOptions,
    metrics: &Arc<Metrics>,
    state: &watch::Receiver<Arc<State>>,
) -> anyhow::Result<(
    SharedStatus,
    watch::Receiver<Arc<RouteTable>>,
    crate::kube::Handle,
)> {
    let client = crate::kube::client(kube).await?;
    let empty = route::compile(&[], &opts.compile).table;
    let (routes_tx, routes_rx) = watch::channel(Arc::new(empty));
    let status: SharedStatus = Arc::new(std::sync::Mutex::new(RouteStatus {
        last_change: "waiting",
        errors: Vec::new(),
    }));
    let handle = crate::kube::spawn(crate::kube::source::Inputs {
        client,
        opts: kube.clone(),
        load: opts.load.clone(),
        compile: opts.compile.clone(),
        routes: routes_tx,
        state: state.clone(),
        metrics: metrics.clone(),
        status: status.clone(),
        identity: opts.identity.clone(),
    });
    Ok((status, routes_rx, handle))
}

/// Keeps the mesh source running (dropping it stops it).
enum MeshHandle {
    File(ztunnel::source::FileWatch),
    /// Held only to keep the client running.
    Xds {
        _client: ztunnel::source::xds::XdsClient,
    },
}

/// Runs the waypoint until SIGTERM or SIGINT.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let (state_rx, mesh_handle) = match &opts.mesh {
        MeshSource::File(path) => {
            let initial = ztunnel::source::load(path)
                .with_context(|| format!("mesh config {}", path.display()))?;
            let (tx, rx) = watch::channel(Arc::new(initial));
            let watch = ztunnel::source::spawn_file_watch(path.clone(), tx, |err| {
                tracing::warn!("mesh config not applied, keeping the last good one: {err}");
            });
            (rx, MeshHandle::File(watch))
        }
        MeshSource::Xds(config) => {
            // Nothing is known until istiod has answered every type once: readiness waits.
            let mut empty = State::builder();
            empty.capture_by_protocol(true);
            empty.incomplete("waiting for the first answer of istiod's workload API");
            let (tx, rx) = watch::channel(Arc::new(empty.build()));
            let client = ztunnel::source::xds::spawn((**config).clone(), tx);
            (rx, MeshHandle::Xds { _client: client })
        }
    };

    let (status, routes_rx, kube_synced) = match &opts.kube {
        None => {
            let (status, rx) = file_routes(&opts, &metrics);
            (status, rx, None)
        }
        Some(kube) => {
            let (status, rx, handle) = kube_routes(&opts, kube, &metrics, &state_rx).await?;
            (status, rx, Some(handle.synced))
        }
    };
    let first = Snapshot::new(state_rx.borrow().clone(), routes_rx.borrow().clone());
    let (snap_tx, snap_rx) = watch::channel(Arc::new(first));
    combine(state_rx, routes_rx, snap_tx);

    let (ca, roots): (Arc<dyn CertificateSource>, TrustBundle) = match &opts.ca {
        CaSource::Local(dir) => {
            let ca = LocalCa::load_or_create(dir, opts.identity.trust_domain())
                .with_context(|| format!("local CA in {}", dir.display()))?;
            let roots = ca.roots();
            (Arc::new(ca), roots)
        }
        CaSource::Istio { target, root, ttl } => {
            let pem = std::fs::read_to_string(root)
                .with_context(|| format!("CA root certificate {}", root.display()))?;
            let roots = TrustBundle::from_pem(&pem)
                .with_context(|| format!("CA root certificate {}", root.display()))?;
            let ca = IstioCa::new(target.clone(), *ttl).context("Istio CA")?;
            (Arc::new(ca), roots)
        }
    };
    let certs = CertManager::new(ca, Arc::new(SystemClock), ManagerConfig::default());
    certs
        .get(&opts.identity)
        .await
        .with_context(|| format!("certificate for {}", opts.identity))?;

    let dialer = Dialer::new(
        opts.identity.clone(),
        certs.clone(),
        roots.clone(),
        Pool::new(PoolConfig::default()),
    );
    let mut ctx = Ctx::new(
        opts.identity.clone(),
        certs,
        roots,
        snap_rx,
        HttpPool::new(dialer),
    );
    ctx.mirror_shadow_suffix = opts.mirror_shadow_suffix;
    ctx.protocol_detection_timeout = opts.protocol_detection_timeout;
    ctx.metrics = metrics.clone();
    let ctx = Arc::new(ctx);
    // RequestAuthentication `jwksUri`s of the config in force, fetched and refreshed.
    tokio::spawn(crate::policy::jwt::fetch::run(
        ctx.jwks.clone(),
        ctx.snapshot.clone(),
        metrics.clone(),
    ));
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("listening on {}", opts.listen))?;
    let ready_state = ctx.snapshot.clone();
    let _ready = ztunnel::endpoint::serve(opts.ready_addr, move |req| {
        let routes_waiting = kube_synced.as_ref().is_some_and(|s| !*s.borrow());
        let incomplete = ready_state
            .borrow()
            .state
            .incomplete()
            .map(str::to_owned)
            .or_else(|| {
                routes_waiting
                    .then(|| "waiting for the first lists of the Kubernetes API".to_owned())
            });
        async move {
            match (req.path.as_str(), incomplete) {
                ("/healthz/ready", None) => {
                    ztunnel::endpoint::text(http::StatusCode::OK, "ready\n")
                }
                ("/healthz/ready", Some(why)) => ztunnel::endpoint::text(
                    http::StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why}\n"),
                ),
                _ => ztunnel::endpoint::text(http::StatusCode::NOT_FOUND, "not found\n"),
            }
        }
    })
    .await
    .with_context(|| format!("readiness on {}", opts.ready_addr))?;
    let file_stats = match &mesh_handle {
        MeshHandle::File(watch) => Some(watch.stats()),
        MeshHandle::Xds { .. } => None,
    };
    let _metrics = ztunnel::endpoint::serve(opts.metrics_addr, move |req| {
        let metrics = metrics.clone();
        let file_stats = file_stats.clone();
        async move {
            if req.path != "/metrics" && req.path != "/stats/prometheus" {
                return ztunnel::endpoint::text(http::StatusCode::NOT_FOUND, "not found\n");
            }
            // The mesh file's watcher counts its own updates (its first read included).
            if let Some(stats) = &file_stats {
                ztunnel::metrics::mirror(&metrics.config("mesh", "applied"), stats.applied());
                ztunnel::metrics::mirror(&metrics.config("mesh", "rejected"), stats.rejected());
            }
            ztunnel::endpoint::reply(
                http::StatusCode::OK,
                ztunnel::metrics::CONTENT_TYPE,
                metrics.encode(),
            )
        }
    })
    .await
    .with_context(|| format!("metrics on {}", opts.metrics_addr))?;
    let dump_state = ctx.snapshot.clone();
    let identity = opts.identity.to_string();
    let source = match &opts.mesh {
        MeshSource::File(p) => format!("file {}", p.display()),
        MeshSource::Xds(x) => format!("xds {}", x.target.address),
    };
    let routes_source = if opts.kube.is_some() { "kube" } else { "files" };
    let _admin = ztunnel::endpoint::serve(opts.admin_addr, move |req| {
        let body = (req.path == "/config_dump").then(|| {
            let mut dump = config_dump(&identity, &source, &dump_state.borrow(), &status);
            dump["routes"]["source"] = routes_source.into();
            dump
        });
        async move {
            match body {
                Some(json) => ztunnel::endpoint::json(&json),
                None => ztunnel::endpoint::text(http::StatusCode::NOT_FOUND, "not found\n"),
            }
        }
    })
    .await
    .with_context(|| format!("admin on {}", opts.admin_addr))?;
    tracing::info!(identity = %opts.identity, listen = %opts.listen, "waypoint started");
    tokio::select! {
        () = server::serve(listener, ctx) => {}
        () = shutdown_signal() => {}
    }
    tracing::info!("waypoint stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
