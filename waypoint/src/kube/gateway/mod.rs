//! The Gateway controller (`--gateway-controller`): for each Gateway of our GatewayClass it
//! applies the waypoint's ServiceAccount, RoleBindings, Service and Deployment (server-side
//! apply, owned by the Gateway, so they go when it goes) and sets the Gateway's
//! `status.addresses` and conditions, which is what makes istiod publish it as the waypoint
//! of the services that name it, and its listeners' status; it also writes the status of the
//! GatewayClasses that name its controllerName. `config` reads its settings file; `render`, `rbac` and
//! `scaling` decide what to write (pure), `reconcile` writes one Gateway's objects; this
//! module watches and dispatches.

pub mod config;
mod metrics;
pub mod rbac;
mod reconcile;
pub mod render;
pub mod scaling;
pub mod status;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::{FutureExt as _, StreamExt as _};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::discovery::ApiResource;
use kube::runtime::{WatchStreamExt as _, watcher};
use serde_json::Value as Json;

use super::KubeOptions;
use metrics::ControllerMetrics;

/// What the controller is started with.
#[derive(Clone, Debug)]
pub struct GatewayOptions {
    pub kube: KubeOptions,
    /// The GatewayClass whose Gateways it serves.
    pub class: String,
    pub template: render::Template,
    /// Where `/healthz/ready` answers 200 once every Gateway has been listed (503 before).
    pub ready_addr: SocketAddr,
    /// Where the controller's Prometheus metrics are served.
    pub metrics_addr: SocketAddr,
}

/// Whether Gateway `g` is of the class the controller serves.
fn is_ours(g: &Json, opts: &GatewayOptions) -> bool {
    g.pointer("/spec/gatewayClassName").and_then(Json::as_str) == Some(opts.class.as_str())
}

/// How often Gateways whose objects could not be written are tried again.
const RETRY: Duration = Duration::from_secs(5);

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: group.to_owned(),
        version: version.to_owned(),
        api_version: if group.is_empty() {
            version.to_owned()
        } else {
            format!("{group}/{version}")
        },
        kind: kind.to_owned(),
        plural: plural.to_owned(),
    }
}

fn role_binding_resource() -> ApiResource {
    resource(
        "rbac.authorization.k8s.io",
        "v1",
        "RoleBinding",
        "rolebindings",
    )
}

type Key = (String, String);

/// What the controller knows of the cluster.
#[derive(Default)]
struct Known {
    gateways: BTreeMap<Key, Json>,
    /// A re-list of Gateways under way: those seen since it started.
    relist: Option<BTreeMap<Key, Json>>,
    /// Every Gateway has been listed once: a Gateway not in `gateways` is gone.
    listed: bool,
    /// Our RoleBindings in the root namespace, by name, with the Gateway each is for.
    root_bindings: BTreeMap<String, Key>,
    /// Gateways whose objects could not be written, tried again every [`RETRY`].
    failed: BTreeMap<Key, Json>,
    /// A root RoleBinding could not be deleted: the sweep is tried again.
    sweep_failed: bool,
    /// GatewayClasses whose status could not be written, tried again every [`RETRY`].
    failed_classes: BTreeMap<String, Json>,
    /// Gateways one of whose objects someone changed or deleted.
    touched: BTreeSet<Key>,
}

/// Runs until the watch ends (never, in practice: errors back off and retry).
pub async fn run(opts: GatewayOptions) -> anyhow::Result<()> {
    let client = super::client(&opts.kube).await?;
    let gateway = resource("gateway.networking.k8s.io", "v1", "Gateway", "gateways");
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &gateway);
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    // What we made for each Gateway: one deleted or changed by someone else is applied again
    // from its Gateway.
    let streams: Vec<_> = owned_kinds(&opts.template)
        .iter()
        .map(|kind| {
            watcher(
                Api::<DynamicObject>::all_with(client.clone(), kind),
                watcher::Config::default().labels(render::GATEWAY_NAME_LABEL),
            )
            .default_backoff()
            .boxed()
        })
        .collect();
    let mut owned = futures::stream::select_all(streams);
    // Our RoleBindings in the root namespace, which no owner reference removes.
    let root_bindings: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &opts.template.root_namespace,
        &role_binding_resource(),
    );
    let mut bindings = watcher(
        root_bindings.clone(),
        watcher::Config::default().labels(rbac::GATEWAY_NAMESPACE_LABEL),
    )
    .default_backoff()
    .boxed();
    // The GatewayClasses, for the status of those naming our controllerName.
    let classes: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &resource(
            "gateway.networking.k8s.io",
            "v1",
            "GatewayClass",
            "gatewayclasses",
        ),
    );
    let mut class_events = watcher(classes.clone(), watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut known = Known::default();
    // Ready once every Gateway has been listed: before that, a Gateway may be waiting for
    // its waypoint, and a root RoleBinding may look orphaned.
    let (listed_tx, listed) = tokio::sync::watch::channel(false);
    let _ready = ztunnel::endpoint::serve(opts.ready_addr, move |req| {
        let ready = *listed.borrow();
        async move {
            match (req.path.as_str(), ready) {
                ("/healthz/ready", true) => {
                    ztunnel::endpoint::text(http::StatusCode::OK, "ready\n")
                }
                ("/healthz/ready", false) => ztunnel::endpoint::text(
                    http::StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: waiting for the first list of Gateways\n",
                ),
                _ => ztunnel::endpoint::text(http::StatusCode::NOT_FOUND, "not found\n"),
            }
        }
    })
    .await
    .with_context(|| format!("readiness on {}", opts.ready_addr))?;
    let metrics = Arc::new(ControllerMetrics::new());
    let served = metrics.clone();
    let _metrics = ztunnel::endpoint::serve(opts.metrics_addr, move |req| {
        let metrics = served.clone();
        async move {
            if req.path != "/metrics" && req.path != "/stats/prometheus" {
                return ztunnel::endpoint::text(http::StatusCode::NOT_FOUND, "not found\n");
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
    let mut retry = tokio::time::interval(RETRY);
    tracing::info!(class = %opts.class, "Gateway controller started");
    loop {
        let todo: Vec<Json> = tokio::select! {
            event = events.next() => match event {
                None => return Ok(()),
                Some(Ok(event)) => known.gateway_event(event)?,
                Some(Err(e)) => {
                    tracing::warn!("Gateway watch: {e}; retrying with backoff");
                    metrics.watch_error("gateways");
                    Vec::new()
                }
            },
            event = owned.next() => {
                let Some(event) = event else { return Ok(()) };
                known.owned_event(event, &metrics);
                // Everything already delivered first, so a Gateway is applied once for all.
                while let Some(Some(event)) = owned.next().now_or_never() {
                    known.owned_event(event, &metrics);
                }
                known.take_touched()
            },
            event = bindings.next() => {
                match event {
                    None => return Ok(()),
                    Some(Ok(event)) => known.binding_event(event),
                    Some(Err(e)) => {
                        tracing::warn!("root namespace RoleBinding watch: {e}; retrying with backoff");
                        metrics.watch_error("rolebindings");
                    }
                }
                Vec::new()
            },
            event = class_events.next() => {
                match event {
                    None => return Ok(()),
                    Some(Ok(watcher::Event::Apply(c) | watcher::Event::InitApply(c))) => {
                        let c = serde_json::to_value(&c).unwrap_or_default();
                        class_status(&client, &classes, &opts, c, &mut known.failed_classes).await;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::warn!("GatewayClass watch: {e}; retrying with backoff");
                        metrics.watch_error("gatewayclasses");
                    }
                }
                Vec::new()
            },
            _ = retry.tick(), if !known.failed.is_empty()
                || known.sweep_failed
                || !known.failed_classes.is_empty() => {
                for c in std::mem::take(&mut known.failed_classes).into_values() {
                    class_status(&client, &classes, &opts, c, &mut known.failed_classes).await;
                }
                known.failed.values().cloned().collect()
            }
        };
        for g in todo {
            let key = key_of(&g);
            tracing::debug!(
                "reconciling {}/{} at resourceVersion {:?}",
                key.0,
                key.1,
                g.pointer("/metadata/resourceVersion")
            );
            let ours = is_ours(&g, &opts);
            match reconcile::reconcile(&client, &opts, &gateway, &g).await {
                Ok(updated) => {
                    if ours {
                        metrics.reconciled(true);
                    }
                    known.failed.remove(&key);
                    // The Gateway as our status patch left it, so a look from the cache
                    // before the patch comes back as an event does not write it again.
                    if let Some(updated) = updated {
                        known.updated(key, updated);
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        "Gateway {}/{}: {e:#}; tried again in {RETRY:?}",
                        key.0,
                        key.1
                    );
                    metrics.reconciled(false);
                    known.failed.insert(key, g);
                }
            }
        }
        metrics.gateways(
            known
                .gateways
                .values()
                .filter(|g| is_ours(g, &opts))
                .count(),
        );
        metrics.retrying(known.failed.len());
        known.sweep(&root_bindings, &opts).await;
        if known.listed && !*listed_tx.borrow() {
            tracing::info!("Gateways listed: ready");
            listed_tx.send_replace(true);
        }
    }
}

impl Known {
    /// Takes a Gateway event in; the Gateways to reconcile.
    fn gateway_event(&mut self, event: watcher::Event<DynamicObject>) -> anyhow::Result<Vec<Json>> {
        Ok(match event {
            watcher::Event::Init => {
                self.relist = Some(BTreeMap::new());
                Vec::new()
            }
            watcher::Event::Apply(g) | watcher::Event::InitApply(g) => {
                let g = serde_json::to_value(&g).context("Gateway as JSON")?;
                if let Some(relist) = &mut self.relist {
                    relist.insert(key_of(&g), g.clone());
                }
                self.gateways.insert(key_of(&g), g.clone());
                vec![g]
            }
            watcher::Event::InitDone => {
                // Those not listed again were deleted while the watch was away.
                if let Some(listed) = self.relist.take() {
                    self.failed.retain(|k, _| listed.contains_key(k));
                    self.gateways = listed;
                }
                self.listed = true;
                Vec::new()
            }
            watcher::Event::Delete(g) => {
                let key = key_of(&serde_json::to_value(&g).unwrap_or_default());
                self.failed.remove(&key);
                self.gateways.remove(&key);
                if let Some(relist) = &mut self.relist {
                    relist.remove(&key);
                }
                tracing::info!(
                    "Gateway {}/{} deleted: Kubernetes removes what it owned",
                    key.0,
                    key.1
                );
                Vec::new()
            }
        })
    }

    /// Takes an event of an object we made in: its Gateway, if it is still there, is applied
    /// again (a no-op when nothing differs).
    fn owned_event(
        &mut self,
        event: Result<watcher::Event<DynamicObject>, watcher::Error>,
        metrics: &ControllerMetrics,
    ) {
        match event {
            Ok(
                watcher::Event::Apply(o) | watcher::Event::InitApply(o) | watcher::Event::Delete(o),
            ) => {
                let o = serde_json::to_value(&o).unwrap_or_default();
                if let Some(key) = gateway_of(&o)
                    && self.gateways.contains_key(&key)
                {
                    self.touched.insert(key);
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("watch of the waypoints' objects: {e}; retrying with backoff");
                metrics.watch_error("owned");
            }
        }
    }

    /// The Gateways whose objects were touched since the last call.
    fn take_touched(&mut self) -> Vec<Json> {
        std::mem::take(&mut self.touched)
            .into_iter()
            .filter_map(|k| self.gateways.get(&k).cloned())
            .collect()
    }

    /// A Gateway as our own status patch left it, in place of the version known (and of
    /// the one a list under way holds, which would otherwise bring the old one back).
    fn updated(&mut self, key: Key, gateway: Json) {
        if let Some(relist) = &mut self.relist
            && relist.contains_key(&key)
        {
            relist.insert(key.clone(), gateway.clone());
        }
        if self.gateways.contains_key(&key) {
            self.gateways.insert(key, gateway);
        }
    }

    /// Takes an event of our RoleBindings in the root namespace in.
    fn binding_event(&mut self, event: watcher::Event<DynamicObject>) {
        let mut remember = |b: &DynamicObject| {
            let json = serde_json::to_value(b).unwrap_or_default();
            if let (Some(name), Some(gateway)) = (b.metadata.name.clone(), rbac::gateway_of(&json))
            {
                self.root_bindings.insert(name, gateway);
            }
        };
        match event {
            watcher::Event::Init => self.root_bindings.clear(),
            watcher::Event::Apply(b) | watcher::Event::InitApply(b) => remember(&b),
            watcher::Event::Delete(b) => {
                if let Some(name) = &b.metadata.name {
                    self.root_bindings.remove(name);
                }
            }
            watcher::Event::InitDone => {}
        }
    }

    /// Deletes the root-namespace RoleBindings whose Gateway is gone, once every Gateway
    /// has been listed (before that, a Gateway not yet seen is not a deleted one).
    async fn sweep(&mut self, api: &Api<DynamicObject>, opts: &GatewayOptions) {
        if !self.listed {
            return;
        }
        self.sweep_failed = false;
        for name in rbac::orphans(&self.root_bindings, &self.gateways, &opts.class) {
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {
                    tracing::info!(
                        "RoleBinding {}/{name} deleted: its Gateway is gone",
                        opts.template.root_namespace
                    );
                    self.root_bindings.remove(&name);
                }
                Err(kube::Error::Api(status)) if status.is_not_found() => {
                    self.root_bindings.remove(&name);
                }
                Err(e) => {
                    tracing::warn!(
                        "RoleBinding {}/{name} of a deleted Gateway not deleted: {e}; tried again in {RETRY:?}",
                        opts.template.root_namespace
                    );
                    self.sweep_failed = true;
                }
            }
        }
    }
}

/// Writes the status of a GatewayClass naming our controllerName when it differs; one that
/// could not be written goes to `failed`.
async fn class_status(
    client: &kube::Client,
    api: &Api<DynamicObject>,
    opts: &GatewayOptions,
    class: Json,
    failed: &mut BTreeMap<String, Json>,
) {
    let now = k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let name = class
        .pointer("/metadata/name")
        .and_then(Json::as_str)
        .unwrap_or_default()
        .to_owned();
    failed.remove(&name);
    if class.pointer("/spec/controllerName").and_then(Json::as_str)
        != Some(opts.kube.controller_name.as_str())
    {
        return;
    }
    let bundles = bundle_versions(client).await;
    let Some(patch) = status::class_patch(
        &class,
        &opts.class,
        &opts.kube.controller_name,
        &bundles,
        &now,
    ) else {
        return;
    };
    match api
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => tracing::info!("GatewayClass {name}: status written"),
        Err(e) => {
            tracing::warn!(
                "GatewayClass {name}: status not written: {e}; tried again in {RETRY:?}"
            );
            failed.insert(name, class);
        }
    }
}

/// The bundle version of each Gateway API CRD the controller reads (its annotation), or why
/// it is not known.
async fn bundle_versions(client: &kube::Client) -> status::Bundles {
    let crds: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &resource(
            "apiextensions.k8s.io",
            "v1",
            "CustomResourceDefinition",
            "customresourcedefinitions",
        ),
    );
    let mut bundles = Vec::new();
    for name in status::CRDS {
        let version = match crds.get(name).await {
            Ok(crd) => crd
                .metadata
                .annotations
                .and_then(|a| a.get(status::BUNDLE_VERSION).cloned())
                .ok_or_else(|| format!("no {} annotation", status::BUNDLE_VERSION)),
            Err(e) => Err(format!("not read: {e}")),
        };
        bundles.push((name, version));
    }
    bundles
}

/// The kinds of what the controller makes for a Gateway, as the settings ask for them.
fn owned_kinds(template: &render::Template) -> Vec<ApiResource> {
    let mut kinds = vec![
        resource("", "v1", "ServiceAccount", "serviceaccounts"),
        resource("", "v1", "Service", "services"),
        resource("apps", "v1", "Deployment", "deployments"),
        role_binding_resource(),
    ];
    if template.pod_disruption_budget.is_some() {
        kinds.push(resource(
            "policy",
            "v1",
            "PodDisruptionBudget",
            "poddisruptionbudgets",
        ));
    }
    if template.autoscaling.is_some() {
        kinds.push(resource(
            "autoscaling",
            "v2",
            "HorizontalPodAutoscaler",
            "horizontalpodautoscalers",
        ));
    }
    kinds
}

/// The Gateway an object we made is for, from its labels (the root-namespace RoleBinding
/// names its Gateway's namespace in a label of its own).
fn gateway_of(object: &Json) -> Option<Key> {
    let label = |key: &str| {
        object
            .pointer(&format!("/metadata/labels/{}", key.replace('/', "~1")))
            .and_then(Json::as_str)
    };
    let name = label(render::GATEWAY_NAME_LABEL)?;
    let namespace = label(rbac::GATEWAY_NAMESPACE_LABEL)
        .map(str::to_owned)
        .unwrap_or_else(|| key_of(object).0);
    Some((namespace, name.to_owned()))
}

fn key_of(g: &Json) -> Key {
    let s = |p: &str| {
        g.pointer(p)
            .and_then(Json::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    (s("/metadata/namespace"), s("/metadata/name"))
}
