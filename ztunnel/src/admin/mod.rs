//! The node's operator endpoints: the admin server (loopback of the node by default, never in
//! a pod's namespace) and the Prometheus endpoint.
//!
//! Admin (`--admin-addr`, default `127.0.0.1:15000`):
//! - `GET /config_dump`: workloads, services, policies, certificates, enrolled pods with their
//!   capture state, the eBPF capture status, the config source and its version, build info;
//! - `GET /connections`: live connections and the recent history (ended, denied, failed,
//!   rejected) with the reason each ended;
//! - `GET /logging` shows the log filter; `POST /logging?level=<filter>` replaces it
//!   (`debug`, or `info,ztunnel::proxy=debug`), `POST /logging?<target>=<level>` adds one
//!   directive (`ztunnel::proxy=debug`);
//! - `POST /quitquitquit`: orderly stop, as SIGTERM.
//!
//! Metrics (`--metrics-addr`, default `0.0.0.0:15020`): `/metrics` and `/stats/prometheus`.
//!
//! Nothing here changes the data path except the log filter and the stop request.

pub mod cli;
mod config_dump;
use crate::endpoint as http;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use ::http::{Method, StatusCode};
use bytes::Bytes;
use http_body_util::Full;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::info;

use crate::metrics::{
    ConfigUpdateLabels, IdentityLabels, Metrics, ReasonLabels, ResultLabels, mirror,
};
use crate::proxy::Proxy;
use crate::source::SourceStats;
use crate::state::State;

/// Where the configuration comes from, and how far it has got.
#[derive(Debug)]
pub struct SourceInfo {
    /// `file` (local mode) or `xds`.
    pub kind: String,
    /// The file path or the server address.
    pub location: String,
    pub stats: Arc<SourceStats>,
    /// The xDS client's own counters and connection state (xDS mode).
    pub xds: Option<Arc<crate::source::xds::XdsStats>>,
    /// States published since start (the initial one is 1).
    version: AtomicU64,
    last_update: Mutex<SystemTime>,
}

impl SourceInfo {
    /// A source fed by xDS: updates are the ACKed and NACKed responses.
    pub fn xds(location: &str, stats: Arc<crate::source::xds::XdsStats>) -> Arc<SourceInfo> {
        let mut info = SourceInfo::new("xds", location, Arc::new(SourceStats::default()));
        if let Some(info) = Arc::get_mut(&mut info) {
            info.xds = Some(stats);
        }
        info
    }

    pub fn new(kind: &str, location: &str, stats: Arc<SourceStats>) -> Arc<SourceInfo> {
        Arc::new(SourceInfo {
            kind: kind.to_owned(),
            location: location.to_owned(),
            stats,
            xds: None,
            version: AtomicU64::new(1),
            last_update: Mutex::new(SystemTime::now()),
        })
    }

    /// Follows the state channel, counting each new state as a version.
    pub fn follow(self: &Arc<Self>, mut rx: watch::Receiver<Arc<State>>) -> JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            rx.borrow_and_update();
            while rx.changed().await.is_ok() {
                this.version.fetch_add(1, Ordering::Relaxed);
                *this.last_update.lock().unwrap_or_else(|p| p.into_inner()) = SystemTime::now();
            }
        })
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Relaxed)
    }

    pub fn last_update(&self) -> SystemTime {
        *self.last_update.lock().unwrap_or_else(|p| p.into_inner())
    }
}

type ApplyFilter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// The runtime log filter: what is in force, and how to replace it.
pub struct LogControl {
    current: Mutex<String>,
    apply: ApplyFilter,
}

impl std::fmt::Debug for LogControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogControl")
            .field("current", &self.current())
            .finish_non_exhaustive()
    }
}

const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

impl LogControl {
    /// `apply` installs a filter given in `EnvFilter` syntax, or says why it cannot.
    pub fn new(initial: &str, apply: ApplyFilter) -> LogControl {
        LogControl {
            current: Mutex::new(initial.to_owned()),
            apply,
        }
    }

    pub fn current(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the whole filter.
    pub fn set(&self, filter: &str) -> Result<String, String> {
        let filter = filter.trim();
        if filter.is_empty() {
            return Err("empty log filter".to_owned());
        }
        (self.apply)(filter)?;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = filter.to_owned();
        info!(filter, "log filter changed");
        Ok(filter.to_owned())
    }

    /// Adds (or overrides) the level of one target, keeping the rest.
    pub fn set_target(&self, target: &str, level: &str) -> Result<String, String> {
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "unknown level {level:?} for {target}; expected one of {}",
                LEVELS.join(", ")
            ));
        }
        let kept: Vec<String> = self
            .current()
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty() && d.split('=').next() != Some(target))
            .map(str::to_owned)
            .collect();
        let mut filter = kept.join(",");
        if !filter.is_empty() {
            filter.push(',');
        }
        filter.push_str(&format!("{target}={level}"));
        self.set(&filter)
    }
}

/// What the admin and metrics endpoints read.
#[derive(Debug)]
pub struct Agent {
    pub proxy: Arc<Proxy>,
    pub source: Arc<SourceInfo>,
    pub logging: LogControl,
    /// Notified by `/quitquitquit`.
    pub shutdown: Arc<Notify>,
}

impl Agent {
    pub fn metrics(&self) -> &Arc<Metrics> {
        self.proxy.tracker.metrics()
    }

    /// Brings the health metrics up to date with the agent's state.
    pub fn refresh_metrics(&self) {
        let agent = &self.metrics().agent;
        let proxy = &self.proxy;
        agent
            .connections_open
            .set(proxy.tracker.open_count() as i64);
        agent
            .hbone_pool_connections
            .set(proxy.pool.total_connections() as i64);
        let pool = proxy.pool.stats();
        for (reason, value) in [
            ("certificate_expired", pool.certificate_expired),
            ("keepalive_timeout", pool.keepalive_timeout),
        ] {
            mirror(
                &agent
                    .hbone_pool_evictions
                    .get_or_create_owned(&ReasonLabels {
                        reason: reason.to_owned(),
                    }),
                value,
            );
        }
        agent.certificate_expiry.clear();
        for cert in proxy.certs.snapshot() {
            agent
                .certificate_expiry
                .get_or_create(&IdentityLabels {
                    identity: cert.identity.to_string(),
                })
                .set(crate::time::unix(cert.not_after));
        }
        let requests = proxy.certs.stats();
        for (result, value) in [("issued", requests.issued), ("failed", requests.failed)] {
            mirror(
                &agent
                    .certificate_requests
                    .get_or_create_owned(&ResultLabels {
                        result: result.to_owned(),
                    }),
                value,
            );
        }
        let (applied, rejected) = match &self.source.xds {
            Some(xds) => (xds.acks(), xds.nacks()),
            None => (self.source.stats.applied(), self.source.stats.rejected()),
        };
        if let Some(xds) = &self.source.xds {
            agent
                .control_plane_connected
                .set(i64::from(xds.connected()));
        }
        for (result, value) in [("applied", applied), ("rejected", rejected)] {
            mirror(
                &agent
                    .config_updates
                    .get_or_create_owned(&ConfigUpdateLabels {
                        source: self.source.kind.clone(),
                        result: result.to_owned(),
                    }),
                value,
            );
        }
        agent
            .config_last_update
            .set(crate::time::unix(self.source.last_update()));
        agent.pods_enrolled.set(proxy.pods.len() as i64);
        agent
            .pods_not_captured
            .set(crate::readiness::not_captured(proxy).len() as i64);
        agent
            .pods_without_certificate
            .set(crate::readiness::without_certificate(proxy).len() as i64);
        agent
            .capture_namespaces
            .set(proxy.capture.enrolled_namespaces() as i64);
    }
}

/// Starts the admin server on `addr`.
pub async fn serve_admin(addr: SocketAddr, agent: Arc<Agent>) -> std::io::Result<JoinHandle<()>> {
    http::serve(addr, move |req| {
        let agent = agent.clone();
        async move { admin(&agent, req) }
    })
    .await
}

/// Starts the metrics server on `addr`.
pub async fn serve_metrics(addr: SocketAddr, agent: Arc<Agent>) -> std::io::Result<JoinHandle<()>> {
    http::serve(addr, move |req| {
        let agent = agent.clone();
        async move {
            match req.path.as_str() {
                "/metrics" | "/stats/prometheus" => {
                    agent.refresh_metrics();
                    http::reply(
                        StatusCode::OK,
                        crate::metrics::CONTENT_TYPE,
                        agent.metrics().encode(),
                    )
                }
                _ => http::text(StatusCode::NOT_FOUND, "not found: try /metrics\n"),
            }
        }
    })
    .await
}

const HELP: &str = "ztunnel admin\n\
  GET  /config_dump        workloads, services, policies, certificates, pods, capture, source, build\n\
  GET  /connections        live connections and recent history\n\
  GET  /logging            current log filter\n\
  POST /logging?level=F    replace the log filter (e.g. debug, or info,ztunnel::proxy=debug)\n\
  POST /logging?T=L        set level L for target T (e.g. ztunnel::proxy=debug, access=debug)\n\
  POST /quitquitquit       orderly stop\n";

fn admin(agent: &Agent, req: http::Req) -> ::http::Response<Full<Bytes>> {
    match (req.method.clone(), req.path.as_str()) {
        (Method::GET, "/") => http::text(StatusCode::OK, HELP),
        (Method::GET, "/config_dump") => http::json(&config_dump::dump(agent)),
        (Method::GET, "/connections") => http::json(&serde_json::json!({
            "live": agent.proxy.tracker.live(),
            "history": agent.proxy.tracker.history(),
        })),
        (Method::GET, "/logging") => http::text(
            StatusCode::OK,
            format!("current log filter: {}\n", agent.logging.current()),
        ),
        (Method::POST, "/logging") => logging(agent, &req),
        (Method::POST, "/quitquitquit") => {
            info!("stop requested through /quitquitquit");
            agent.shutdown.notify_one();
            http::text(StatusCode::OK, "OK\n")
        }
        (_, "/logging" | "/quitquitquit") => {
            http::text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n")
        }
        _ => http::text(StatusCode::NOT_FOUND, format!("not found\n\n{HELP}")),
    }
}

fn logging(agent: &Agent, req: &http::Req) -> ::http::Response<Full<Bytes>> {
    if req.query.is_empty() {
        return http::text(
            StatusCode::BAD_REQUEST,
            "give ?level=<filter> or ?<target>=<level>\n",
        );
    }
    let mut result = Ok(String::new());
    for (key, value) in &req.query {
        result = if key == "level" {
            agent.logging.set(value)
        } else {
            agent.logging.set_target(key, value)
        };
        if result.is_err() {
            break;
        }
    }
    match result {
        Ok(filter) => http::text(StatusCode::OK, format!("log filter: {filter}\n")),
        Err(e) => http::text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    }
}

/// The admin and metrics servers of a running agent; aborting stops both.
#[derive(Debug)]
pub struct Servers(Vec<JoinHandle<()>>);

impl Servers {
    pub fn abort(&self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Starts the admin server on `admin_addr` and the metrics server on `metrics_addr`.
pub async fn start(
    proxy: Arc<Proxy>,
    source: Arc<SourceInfo>,
    logging: LogControl,
    admin_addr: SocketAddr,
    metrics_addr: SocketAddr,
) -> std::io::Result<(Arc<Agent>, Servers)> {
    let agent = Arc::new(Agent {
        proxy,
        source,
        logging,
        shutdown: Arc::new(Notify::new()),
    });
    let bind_err = |what: &str, addr: SocketAddr| {
        let what = what.to_owned();
        move |e: std::io::Error| std::io::Error::new(e.kind(), format!("{what} on {addr}: {e}"))
    };
    let admin = serve_admin(admin_addr, agent.clone())
        .await
        .map_err(bind_err("admin endpoint", admin_addr))?;
    let metrics = serve_metrics(metrics_addr, agent.clone())
        .await
        .map_err(bind_err("metrics endpoint", metrics_addr))?;
    info!(admin = %admin_addr, metrics = %metrics_addr, "operator endpoints listening");
    Ok((agent, Servers(vec![admin, metrics])))
}
