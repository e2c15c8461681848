//! The Kubernetes API as the waypoint's route config source (`--kube`): VirtualService,
//! DestinationRule, HTTPRoute, GRPCRoute, AuthorizationPolicy and RequestAuthentication
//! listed and watched with kube-runtime's watcher
//! (resourceVersion resume, re-list after `410 Gone`, bookmarks, backoff on errors), each
//! object decoded by the same decoder as the route files and the whole set compiled by the
//! same compile step, then swapped in as the files' table is. It also writes the Gateway API
//! status of the routes attached to the Services the waypoint serves.
//!
//! `kinds` names what is watched, `json` turns objects into the decoder's input, `store`
//! holds the objects (pure), `status` computes route status (pure), `own_gateway` follows
//! the waypoint's own Gateway for its class; `source` is the only part that talks to the
//! API server. `gateway` is the Gateway controller, a mode of its own.

pub mod gateway;
pub mod json;
pub mod kinds;
mod own_gateway;
pub mod source;
pub mod status;
pub mod store;
pub mod waypoint_accepted;

use std::path::PathBuf;

pub use source::Handle;
pub(crate) use source::spawn;

/// Our Gateway API `controllerName`, written in the route status entries we own.
pub const DEFAULT_CONTROLLER_NAME: &str = "ambient-dataplane.io/waypoint-controller";

/// How to reach the API server and what to write there.
#[derive(Clone, Debug)]
pub struct KubeOptions {
    /// A kubeconfig file (its current context); without one, the in-cluster config (the
    /// service account token and CA that Kubernetes mounts in the pod).
    pub kubeconfig: Option<PathBuf>,
    /// The `controllerName` of our route status entries.
    pub controller_name: String,
    /// Write route status (off for a waypoint without RBAC to patch it).
    pub write_status: bool,
    /// The namespaces whose objects the waypoint reads, one watch per kind in each (a
    /// waypoint may read only where RoleBindings let it); empty: all namespaces.
    pub namespaces: Vec<String>,
}

/// Builds the client from the kubeconfig or the pod's service account.
pub async fn client(opts: &KubeOptions) -> anyhow::Result<kube::Client> {
    use anyhow::Context as _;
    let config = match &opts.kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => kube::Config::incluster()
            .context("in-cluster Kubernetes config (no --kubeconfig given)")?,
    };
    kube::Client::try_from(config).context("Kubernetes API client")
}
