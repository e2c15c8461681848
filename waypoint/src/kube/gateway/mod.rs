//! The Gateway controller (`--gateway-controller`): for each Gateway of our GatewayClass it
//! applies the waypoint's ServiceAccount, Service and Deployment (server-side apply, owned by
//! the Gateway, so they go when it goes) and sets the Gateway's `status.addresses` and
//! conditions, which is what makes istiod publish it as the waypoint of the services that
//! name it. `render` decides what to write (pure); this module only reads and writes.

pub mod render;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::discovery::ApiResource;
use kube::runtime::{WatchStreamExt as _, watcher};
use serde_json::Value as Json;

use super::KubeOptions;

/// What the controller is started with.
#[derive(Clone, Debug)]
pub struct GatewayOptions {
    pub kube: KubeOptions,
    /// The GatewayClass whose Gateways it serves.
    pub class: String,
    pub template: render::Template,
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

/// Runs until the watch ends (never, in practice: errors back off and retry).
pub async fn run(opts: GatewayOptions) -> anyhow::Result<()> {
    let client = super::client(&opts.kube).await?;
    let gateway = resource("gateway.networking.k8s.io", "v1", "Gateway", "gateways");
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &gateway);
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    // The waypoint Deployments we made: one deleted or changed by someone else is applied
    // again from its Gateway.
    let deployments: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &resource("apps", "v1", "Deployment", "deployments"),
    );
    let mut owned = watcher(
        deployments,
        watcher::Config::default().labels(render::GATEWAY_NAME_LABEL),
    )
    .default_backoff()
    .boxed();
    let mut gateways: BTreeMap<(String, String), Json> = BTreeMap::new();
    let mut failed: BTreeMap<(String, String), Json> = BTreeMap::new();
    let mut retry = tokio::time::interval(RETRY);
    tracing::info!(class = %opts.class, "Gateway controller started");
    loop {
        let todo: Vec<Json> = tokio::select! {
            event = events.next() => match event {
                None => return Ok(()),
                Some(Ok(watcher::Event::Apply(g) | watcher::Event::InitApply(g))) => {
                    let g = serde_json::to_value(&g).context("Gateway as JSON")?;
                    gateways.insert(key_of(&g), g.clone());
                    vec![g]
                }
                Some(Ok(watcher::Event::Delete(g))) => {
                    let key = key_of(&serde_json::to_value(&g).unwrap_or_default());
                    failed.remove(&key);
                    gateways.remove(&key);
                    tracing::info!(
                        "Gateway {}/{} deleted: Kubernetes removes what it owned",
                        key.0, key.1
                    );
                    Vec::new()
                }
                Some(Ok(_)) => Vec::new(),
                Some(Err(e)) => {
                    tracing::warn!("Gateway watch: {e}; retrying with backoff");
                    Vec::new()
                }
            },
            event = owned.next() => match event {
                None => return Ok(()),
                Some(Ok(
                    watcher::Event::Apply(d)
                    | watcher::Event::InitApply(d)
                    | watcher::Event::Delete(d),
                )) => {
                    // Its Gateway, if it is still there: applying again is a no-op when
                    // nothing differs.
                    let d = serde_json::to_value(&d).unwrap_or_default();
                    let gateway = d
                        .pointer(&format!("/metadata/labels/{}", render::GATEWAY_NAME_LABEL.replace('/', "~1")))
                        .and_then(Json::as_str)
                        .map(|name| (key_of(&d).0, name.to_owned()));
                    gateway.and_then(|k| gateways.get(&k).cloned()).into_iter().collect()
                }
                Some(Ok(_)) => Vec::new(),
                Some(Err(e)) => {
                    tracing::warn!("waypoint Deployment watch: {e}; retrying with backoff");
                    Vec::new()
                }
            },
            _ = retry.tick(), if !failed.is_empty() => failed.values().cloned().collect(),
        };
        for g in todo {
            let key = key_of(&g);
            match reconcile(&client, &opts, &gateway, &g).await {
                Ok(updated) => {
                    failed.remove(&key);
                    // The Gateway as our status patch left it, so a look from the cache
                    // before the patch comes back as an event does not write it again.
                    if let Some(updated) = updated
                        && gateways.contains_key(&key)
                    {
                        gateways.insert(key, updated);
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        "Gateway {}/{}: {e:#}; tried again in {RETRY:?}",
                        key.0,
                        key.1
                    );
                    failed.insert(key, g);
                }
            }
        }
    }
}

fn key_of(g: &Json) -> (String, String) {
    let s = |p: &str| {
        g.pointer(p)
            .and_then(Json::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    (s("/metadata/namespace"), s("/metadata/name"))
}

/// Brings one Gateway's waypoint objects and status to what they should be; the Gateway as
/// the API server answered a status patch, when one was written.
async fn reconcile(
    client: &kube::Client,
    opts: &GatewayOptions,
    gateway_resource: &ApiResource,
    g: &Json,
) -> anyhow::Result<Option<Json>> {
    if g.pointer("/spec/gatewayClassName").and_then(Json::as_str) != Some(opts.class.as_str()) {
        return Ok(None);
    }
    let (namespace, name) = key_of(g);
    for field in ["addresses", "infrastructure"] {
        if g.get("spec").and_then(|s| s.get(field)).is_some() {
            tracing::warn!(
                "Gateway {namespace}/{name}: spec.{field}: accepted, not implemented (ignored)"
            );
        }
    }
    let gateways: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &namespace, gateway_resource);
    let now = k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let addresses = match render::validate(g) {
        Err(problem) => {
            tracing::warn!(
                "Gateway {namespace}/{name}: {}: {}; no waypoint made",
                problem.field,
                problem.message
            );
            let Some(p) = render::status_patch(g, None, Some(&problem), &now) else {
                return Ok(None);
            };
            let updated = gateways
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&p))
                .await
                .context("status")?;
            return Ok(serde_json::to_value(&updated).ok());
        }
        Ok(()) => {
            let apply = PatchParams::apply(&opts.kube.controller_name).force();
            let ns = |r: ApiResource| -> Api<DynamicObject> {
                Api::namespaced_with(client.clone(), &namespace, &r)
            };
            ns(resource("", "v1", "ServiceAccount", "serviceaccounts"))
                .patch(&name, &apply, &Patch::Apply(render::service_account(g)))
                .await
                .context("ServiceAccount")?;
            let service = ns(resource("", "v1", "Service", "services"))
                .patch(&name, &apply, &Patch::Apply(render::service(g)))
                .await
                .context("Service")?;
            ns(resource("apps", "v1", "Deployment", "deployments"))
                .patch(
                    &name,
                    &apply,
                    &Patch::Apply(render::deployment(g, &opts.template)),
                )
                .await
                .context("Deployment")?;
            let service = serde_json::to_value(&service).ok();
            render::addresses(g, service.as_ref(), &opts.template.domain)
        }
    };
    let Some(p) = render::status_patch(g, Some(addresses), None, &now) else {
        return Ok(None);
    };
    let updated = gateways
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&p))
        .await
        .context("status")?;
    tracing::info!("Gateway {namespace}/{name}: waypoint applied, status written");
    Ok(serde_json::to_value(&updated).ok())
}
