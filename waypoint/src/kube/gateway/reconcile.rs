//! One Gateway brought to what it should be: its waypoint's objects applied (server-side
//! apply with our field manager, forced: they are ours), then its status written when it
//! differs from what is there.

use anyhow::Context as _;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::discovery::ApiResource;
use serde_json::Value as Json;

use super::{
    GatewayOptions, key_of, rbac, render, resource, role_binding_resource, scaling, status,
};

/// Brings one Gateway's waypoint objects and status to what they should be; the Gateway as
/// the API server answered a status patch, when one was written.
pub(super) async fn reconcile(
    client: &kube::Client,
    opts: &GatewayOptions,
    gateway_resource: &ApiResource,
    g: &Json,
) -> anyhow::Result<Option<Json>> {
    if !super::is_ours(g, opts) {
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
            let Some(p) = status::gateway_patch(g, None, Some(&problem), &now) else {
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
            let t = &opts.template;
            for binding in rbac::role_bindings(g, &t.cluster_role, &t.root_namespace) {
                let at = render::str_at(&binding, "/metadata/namespace").to_owned();
                let called = render::str_at(&binding, "/metadata/name").to_owned();
                Api::<DynamicObject>::namespaced_with(
                    client.clone(),
                    &at,
                    &role_binding_resource(),
                )
                .patch(&called, &apply, &Patch::Apply(&binding))
                .await
                .with_context(|| format!("RoleBinding {at}/{called}"))?;
            }
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
            if let Some(settings) = &t.pod_disruption_budget {
                ns(resource(
                    "policy",
                    "v1",
                    "PodDisruptionBudget",
                    "poddisruptionbudgets",
                ))
                .patch(
                    &name,
                    &apply,
                    &Patch::Apply(scaling::pod_disruption_budget(g, settings)),
                )
                .await
                .context("PodDisruptionBudget")?;
            }
            if let Some(settings) = &t.autoscaling {
                ns(resource(
                    "autoscaling",
                    "v2",
                    "HorizontalPodAutoscaler",
                    "horizontalpodautoscalers",
                ))
                .patch(
                    &name,
                    &apply,
                    &Patch::Apply(scaling::horizontal_pod_autoscaler(g, settings)),
                )
                .await
                .context("HorizontalPodAutoscaler")?;
            }
            let service = serde_json::to_value(&service).ok();
            render::addresses(g, service.as_ref(), &opts.template.domain)
        }
    };
    let Some(p) = status::gateway_patch(g, Some(addresses), None, &now) else {
        return Ok(None);
    };
    let updated = gateways
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&p))
        .await
        .context("status")?;
    tracing::info!("Gateway {namespace}/{name}: waypoint applied, status written");
    Ok(serde_json::to_value(&updated).ok())
}
