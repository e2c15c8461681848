//! The task that talks to the API server: one kube-runtime watcher per kind, in all
//! namespaces or in each namespace the waypoint may read (`--kube-namespace`) (list, then
//! watch from the list's resourceVersion; a bookmark moves the resume point; `410 Gone`
//! starts a new list; errors back off exponentially), merged into one loop that keeps the
//! [`Store`], compiles the objects in force with the files' compile step, swaps the table in,
//! and writes route status. While the API server is away the last table keeps serving.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt as _, StreamExt as _};
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use prometheus_client::metrics::gauge::Gauge;
use serde_json::Value as Json;
use tokio::sync::watch;

use super::KubeOptions;
use super::kinds::{
    AUTHORIZATION_POLICY, DESTINATION_RULE, GATEWAY, GRPC_ROUTE, HTTP_ROUTE,
    REQUEST_AUTHENTICATION, VIRTUAL_SERVICE, WATCHED,
};
use super::own_gateway::OwnGateway;
use super::status;
use super::store::{Change, Entry, Store};
use super::waypoint_accepted;
use crate::config::{Diagnostic, LoadOptions, ResourceName, Severity};
use crate::metrics::Metrics;
use crate::route::{self, CompileOptions, RouteTable};
use crate::run::SharedStatus;
use ztunnel::identity::Identity;
use ztunnel::state::State;
use ztunnel::state::workload::GatewayDestination;

/// What the rest of the process sees of the source.
#[derive(Clone, Debug)]
pub struct Handle {
    /// True once every kind has been listed and the first table published.
    pub synced: watch::Receiver<bool>,
}

/// Everything the source reads and writes.
pub(crate) struct Inputs {
    pub(crate) client: kube::Client,
    pub(crate) opts: KubeOptions,
    pub(crate) load: LoadOptions,
    pub(crate) compile: CompileOptions,
    pub(crate) routes: watch::Sender<Arc<RouteTable>>,
    pub(crate) state: watch::Receiver<Arc<State>>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) status: SharedStatus,
    /// Whose routes: the Services whose waypoint has this identity.
    pub(crate) identity: Identity,
}

/// How long after a failed status patch it is tried again, when nothing else happens.
const STATUS_RETRY: Duration = Duration::from_secs(5);

/// How long one status patch may take before the loop goes on without it.
const PATCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts the watches; the task runs as long as the process.
pub(crate) fn spawn(inputs: Inputs) -> Handle {
    let (synced_tx, synced) = watch::channel(false);
    tokio::spawn(run(inputs, synced_tx));
    Handle { synced }
}

type Event = (usize, Result<watcher::Event<DynamicObject>, watcher::Error>);

async fn run(mut inputs: Inputs, synced_tx: watch::Sender<bool>) {
    let store = Store::scoped(inputs.load.clone(), inputs.opts.namespaces.clone());
    let streams: Vec<_> = store
        .watches()
        .map(|(slot, kind, namespace)| {
            let resource = WATCHED[kind].api_resource();
            let api: Api<DynamicObject> = match namespace {
                Some(ns) => Api::namespaced_with(inputs.client.clone(), ns, &resource),
                None => Api::all_with(inputs.client.clone(), &resource),
            };
            watcher(api, watcher::Config::default())
                .default_backoff()
                .map(move |event| (slot, event))
                .boxed()
        })
        .collect();
    let mut events = futures::stream::select_all(streams);
    // The waypoint's own Gateway, for its class (`own_gateway`).
    let own_api: Api<DynamicObject> = Api::namespaced_with(
        inputs.client.clone(),
        &inputs.compile.namespace,
        &GATEWAY.api_resource(),
    );
    let own_selector = format!("metadata.name={}", inputs.compile.gateway_name);
    let mut own_events = watcher(own_api, watcher::Config::default().fields(&own_selector))
        .default_backoff()
        .boxed();
    let mut own = OwnGateway::new(&inputs.compile.gateway_name);
    let connected = inputs.metrics.source_connected("kube");
    let mut source = Source {
        store,
        metrics: inputs.metrics.clone(),
        connected,
        logged: BTreeSet::new(),
        routes_touched: false,
        compile_findings: Vec::new(),
    };
    let mut status_retry = false;
    let mut retry_at = tokio::time::Instant::now();
    loop {
        let mut changed = false;
        let mut state_changed = false;
        tokio::select! {
            event = events.next() => {
                let Some(event) = event else { return };
                changed |= source.handle(event);
                // Take everything already delivered before compiling once.
                while let Some(Some(event)) = events.next().now_or_never() {
                    changed |= source.handle(event);
                }
            }
            event = own_events.next() => {
                let Some(event) = event else { return };
                if own.handle(event) {
                    inputs.compile.gateway_class = own.class().cloned();
                    changed = true;
                }
            }
            result = inputs.state.changed() => {
                if result.is_err() { return }
                state_changed = true;
            }
            () = tokio::time::sleep_until(retry_at), if status_retry => {}
        }
        if !source.store.synced() || !own.listed() {
            continue;
        }
        // The first complete set, whichever watch completed it (the own Gateway's list
        // changes nothing when there is no Gateway): published, and its status written.
        let first = !*synced_tx.borrow();
        if changed || first {
            source.compile_findings = source.publish(&inputs);
            synced_tx.send_replace(true);
        }
        let routes_touched = std::mem::take(&mut source.routes_touched);
        let look = changed || first || state_changed || status_retry || routes_touched;
        if inputs.opts.write_status && look {
            status_retry =
                !write_status(&inputs, &mut source.store, &source.compile_findings).await;
            if status_retry {
                retry_at = tokio::time::Instant::now() + STATUS_RETRY;
            }
        }
    }
}

struct Source {
    store: Store,
    metrics: Arc<Metrics>,
    connected: Gauge,
    /// Compile findings already logged, so a recompile does not repeat them.
    logged: BTreeSet<String>,
    /// A route object changed since the last look at route status.
    routes_touched: bool,
    /// What the last compile said, for the status of the routes it rejected.
    compile_findings: Vec<Diagnostic>,
}

impl Source {
    /// Applies one watch event; true when the objects in force changed.
    fn handle(&mut self, (slot, event): Event) -> bool {
        let kind = self.store.kind_of(slot);
        let name = WATCHED[kind].kind;
        let event = match event {
            Ok(e) => e,
            Err(watcher::Error::InitialListFailed(kube::Error::Api(status)))
                if status.is_not_found() =>
            {
                // The kind's CRD is not installed: nothing of it to read, which must not
                // keep the waypoint unready. The watcher keeps looking, with backoff.
                self.up();
                let changed = self.store.absent(slot);
                if changed {
                    tracing::warn!(
                        "{name} is not served by the API server (is its CRD installed?): none \
                         read; looked for again with backoff"
                    );
                }
                return changed;
            }
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                // The resume point was compacted away: not an outage, a new list follows.
                tracing::info!(
                    "{name}: resourceVersion expired (410 Gone: {}); listing again, the routes \
                     in force stay until the list is complete",
                    status.message
                );
                self.metrics.config("kube", "relist").inc();
                return false;
            }
            Err(e) => {
                if self.connected.get() != 0 {
                    tracing::warn!(
                        "Kubernetes API away ({name} watch: {e}); the last good routes keep \
                         serving, retrying with backoff"
                    );
                } else {
                    tracing::debug!("Kubernetes API still away ({name} watch: {e})");
                }
                self.connected.set(0);
                self.metrics.config("kube", "error").inc();
                return false;
            }
        };
        match event {
            watcher::Event::Init => {
                tracing::debug!("{name}: listing");
                self.store.init(slot);
                false
            }
            watcher::Event::InitApply(obj) => {
                self.up();
                let entry = self.entry(slot, &obj);
                self.store.init_apply(slot, entry);
                false
            }
            watcher::Event::InitDone => {
                self.up();
                tracing::info!("{name}: listed");
                self.store.init_done(slot) != Change::None
            }
            watcher::Event::Apply(obj) => {
                self.up();
                // A new version of a route may carry a status that is no longer ours to
                // keep (written over by someone): look at it even if its routes are the same.
                self.routes_touched |= WATCHED[kind] == HTTP_ROUTE || WATCHED[kind] == GRPC_ROUTE;
                let entry = self.entry(slot, &obj);
                self.store.apply(slot, entry) != Change::None
            }
            watcher::Event::Delete(obj) => {
                self.up();
                let json = serde_json::to_value(&obj).unwrap_or(Json::Null);
                self.store.delete(slot, &json) != Change::None
            }
        }
    }

    fn up(&self) {
        if self.connected.get() == 0 {
            tracing::info!("Kubernetes API reached");
        }
        self.connected.set(1);
    }

    /// The decoded object, its findings logged and counted the first time this version is seen.
    fn entry(&mut self, slot: usize, obj: &DynamicObject) -> Entry {
        let json = serde_json::to_value(obj).unwrap_or(Json::Null);
        if let Some(known) = self.store.known(slot, &json) {
            return known.clone();
        }
        let kind = self.store.kind_of(slot);
        let entry = self.store.decode(slot, json);
        for d in &entry.loaded.diagnostics {
            match d.severity() {
                Severity::Error => tracing::warn!("route config: {d}"),
                Severity::Warning => tracing::info!("route config: {d}"),
            }
        }
        let result = if entry.rejected() {
            tracing::warn!(
                "route config: {} rejected; the other objects keep serving",
                describe(kind, &entry)
            );
            "rejected"
        } else {
            "applied"
        };
        self.metrics.config("kube", result).inc();
        entry
    }

    /// Compiles the objects in force and swaps the table in; returns the compile findings.
    fn publish(&mut self, inputs: &Inputs) -> Vec<Diagnostic> {
        let resources = self.store.resources();
        let mut compiled = route::compile(&resources, &inputs.compile);
        compiled
            .table
            .authz
            .reject_all(self.store.rejected(), &inputs.compile);
        compiled
            .table
            .authn
            .reject_all(self.store.rejected(), &inputs.compile);
        let mut now_logged = BTreeSet::new();
        for d in &compiled.diagnostics {
            let text = d.to_string();
            if !self.logged.contains(&text) {
                match d.severity() {
                    Severity::Error => tracing::warn!("route config: {text}"),
                    Severity::Warning => tracing::info!("route config: {text}"),
                }
            }
            now_logged.insert(text);
        }
        self.logged = now_logged;
        let errors: Vec<String> = self
            .store
            .diagnostics()
            .chain(&compiled.diagnostics)
            .filter(|d| d.is_error())
            .map(ToString::to_string)
            .collect();
        tracing::info!(
            objects = self.store.len(),
            hosts = compiled.table.hosts().len(),
            errors = errors.len(),
            "route config from the Kubernetes API applied"
        );
        inputs.routes.send_replace(Arc::new(compiled.table));
        if let Ok(mut s) = inputs.status.lock() {
            s.last_change = "applied";
            s.errors = errors;
        }
        compiled.diagnostics
    }
}

fn describe(kind: usize, entry: &Entry) -> String {
    let meta = |k: &str| {
        entry
            .raw
            .pointer(&format!("/metadata/{k}"))
            .and_then(Json::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    format!(
        "{} {}/{} (resourceVersion {})",
        WATCHED[kind].kind,
        meta("namespace"),
        meta("name"),
        entry.resource_version
    )
}

/// The mesh as route status sees it: the mesh state and who this waypoint is.
struct MeshView<'a> {
    state: Arc<State>,
    identity: &'a Identity,
}

impl MeshView<'_> {
    fn find(&self, namespace: &str, name: &str) -> Option<&Arc<ztunnel::state::Service>> {
        self.state
            .services()
            .find(|s| s.namespace == namespace && s.name == name)
    }
}

impl status::Mesh for MeshView<'_> {
    /// The Service's waypoint (`istio.io/use-waypoint`, the workload API's
    /// `Service.waypoint`) is this one: a service whose endpoints, or the workload at that
    /// address, have this waypoint's identity.
    fn serves(&self, namespace: &str, name: &str) -> bool {
        let Some(waypoint) = self.find(namespace, name).and_then(|s| s.waypoint.as_ref()) else {
            return false;
        };
        let ours = |w: &Arc<ztunnel::state::Workload>| w.identity() == *self.identity;
        match &waypoint.destination {
            GatewayDestination::Hostname(host) => self
                .state
                .service(host)
                .is_some_and(|s| self.state.members(&s.key()).iter().any(ours)),
            GatewayDestination::Address(ip) => match self.state.service_by_vip(*ip) {
                Some(s) => self.state.members(&s.key()).iter().any(ours),
                None => self.state.workload_by_ip(*ip).as_ref().is_some_and(ours),
            },
        }
    }
    fn has_service(&self, namespace: &str, name: &str) -> bool {
        self.find(namespace, name).is_some()
    }

    fn serves_namespace(&self, namespace: &str) -> bool {
        self.state
            .services()
            .filter(|s| s.namespace == namespace)
            .any(|s| self.serves(&s.namespace, &s.name))
    }
}

/// The first error that rejected the route (from decoding or compiling), as `field: problem`.
fn first_error(entry: &Entry, compile: &[Diagnostic]) -> Option<String> {
    let name = entry
        .loaded
        .resources
        .first()
        .map(crate::config::Resource::name);
    let mine = |d: &&Diagnostic| match (&d.resource, &name) {
        (Some(r), Some(n)) => r == n,
        _ => false,
    };
    entry
        .loaded
        .diagnostics
        .iter()
        .chain(compile.iter().filter(mine))
        .find(|d| d.is_error())
        .map(|d| {
            if d.path.is_empty() {
                d.problem.to_string()
            } else {
                format!("{}: {}", d.path, d.problem)
            }
        })
}

/// Patches what changed of the status of every Gateway API route whose status we own, and
/// of the `WaypointAccepted` condition of every object that is ours to say
/// (`waypoint_accepted`); false when a patch failed (the loop tries again on its next
/// event). The object the API server answers replaces the stored one, so a look before our
/// own write comes back as a watch event sees the status already written and does not write
/// it twice.
async fn write_status(inputs: &Inputs, store: &mut Store, compile: &[Diagnostic]) -> bool {
    let mesh = MeshView {
        state: inputs.state.borrow().clone(),
        identity: &inputs.identity,
    };
    let now = k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let controller = &inputs.opts.controller_name;
    let mut wanted = Vec::new();
    let here = waypoint_accepted::Here {
        namespace: &inputs.compile.namespace,
        gateway: &inputs.compile.gateway_name,
        root_namespace: &inputs.compile.root_namespace,
    };
    for (kind, entry) in store.entries() {
        let error = first_error(entry, compile);
        let (patch, what) = if kind == HTTP_ROUTE || kind == GRPC_ROUTE {
            let ours = status::parents(&entry.raw, error.as_deref(), &mesh);
            let what = format!("{} parent(s)", ours.len());
            (status::patch(&entry.raw, &ours, controller, &now), what)
        } else if [
            AUTHORIZATION_POLICY,
            REQUEST_AUTHENTICATION,
            VIRTUAL_SERVICE,
            DESTINATION_RULE,
        ]
        .contains(&kind)
        {
            let ours =
                waypoint_accepted::wanted(kind.kind, &entry.raw, error.as_deref(), &here, &mesh);
            let what = match &ours {
                waypoint_accepted::Wanted::Set(c) => format!("WaypointAccepted {}", c.ok),
                _ => "WaypointAccepted removed".to_owned(),
            };
            (waypoint_accepted::patch(&entry.raw, &ours, &now), what)
        } else {
            continue;
        };
        if let Some(patch) = patch {
            let name = ResourceName {
                kind: kind.kind.to_owned(),
                namespace: json_str(&entry.raw, "/metadata/namespace"),
                name: json_str(&entry.raw, "/metadata/name"),
            };
            wanted.push((kind, name, patch, what));
        }
    }
    let mut all_written = true;
    for (kind, name, patch, what) in wanted {
        let api: Api<DynamicObject> =
            Api::namespaced_with(inputs.client.clone(), &name.namespace, &kind.api_resource());
        let params = PatchParams::default();
        let patch = Patch::Merge(&patch);
        let call = api.patch_status(&name.name, &params, &patch);
        match tokio::time::timeout(PATCH_TIMEOUT, call).await {
            Ok(Ok(updated)) => {
                tracing::info!("{name}: status written ({what})");
                inputs.metrics.config("kube_status", "applied").inc();
                let slot = WATCHED
                    .iter()
                    .position(|k| *k == kind)
                    .and_then(|i| store.slot_of(i, &name.namespace));
                if let (Some(slot), Ok(json)) = (slot, serde_json::to_value(&updated)) {
                    let entry = store.decode(slot, json);
                    store.apply(slot, entry);
                }
            }
            Ok(Err(e)) => {
                tracing::warn!("{name}: status not written (tried again later): {e}");
                inputs.metrics.config("kube_status", "error").inc();
                all_written = false;
            }
            Err(_) => {
                tracing::warn!(
                    "{name}: status not written (tried again later): no answer in {PATCH_TIMEOUT:?}"
                );
                inputs.metrics.config("kube_status", "error").inc();
                all_written = false;
            }
        }
    }
    all_written
}

fn json_str(v: &Json, pointer: &str) -> String {
    v.pointer(pointer)
        .and_then(Json::as_str)
        .unwrap_or_default()
        .to_owned()
}
