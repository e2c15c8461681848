//! The delta ADS stream driver: connect to istiod, subscribe to the workload API and
//! policies, apply each response through the `Store`, publish the new `State`, then answer
//! (so an ACK means "applied"), and reconnect with jittered exponential backoff when the
//! stream ends, keeping the last good state meanwhile.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prost_types::value::Kind;
use rand::Rng as _;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use super::store::{Store, TYPE_URLS};
use crate::grpc::{GrpcError, GrpcTarget};
use crate::proto::envoy::config::core::v3::Node;
use crate::proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use crate::state::State;

/// istiod pushes the whole mesh in one response at start; big meshes need room.
const MAX_MESSAGE_BYTES: usize = 200 * 1024 * 1024;

/// Who this agent is, as istiod identifies a ztunnel (its pod, namespace, IP and node).
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// The Kubernetes node this agent serves (`NODE_NAME`).
    pub node_name: String,
    /// The agent's own pod (`POD_NAME`, `POD_NAMESPACE`, `INSTANCE_IP`).
    pub pod_name: String,
    pub pod_namespace: String,
    pub instance_ip: String,
    pub cluster_id: String,
}

impl NodeInfo {
    /// The xDS `Node`: the id has the shape istiod parses for a ztunnel
    /// (`ztunnel~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`) and the metadata
    /// the keys it reads (`NAME`, `NAMESPACE`, `INSTANCE_IPS`, `NODE_NAME`, `CLUSTER_ID`).
    pub fn to_node(&self) -> Node {
        let string = |s: &str| prost_types::Value {
            kind: Some(Kind::StringValue(s.to_owned())),
        };
        let fields = BTreeMap::from([
            ("NAME".to_owned(), string(&self.pod_name)),
            ("NAMESPACE".to_owned(), string(&self.pod_namespace)),
            ("INSTANCE_IPS".to_owned(), string(&self.instance_ip)),
            ("NODE_NAME".to_owned(), string(&self.node_name)),
            ("CLUSTER_ID".to_owned(), string(&self.cluster_id)),
        ]);
        Node {
            id: format!(
                "ztunnel~{ip}~{pod}.{ns}~{ns}.svc.cluster.local",
                ip = self.instance_ip,
                pod = self.pod_name,
                ns = self.pod_namespace
            ),
            metadata: Some(prost_types::Struct { fields }),
            user_agent_name: "ztunnel-rs".to_owned(),
            ..Node::default()
        }
    }
}

/// Reconnection timing: each failed attempt doubles the wait up to `max`; the wait actually
/// taken is drawn between half of it and all of it, so agents do not reconnect in step.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(15),
        }
    }
}

impl Backoff {
    /// The wait after `base`, jittered, and the next base.
    fn next(&self, base: Duration) -> (Duration, Duration) {
        let millis = u64::try_from(base.as_millis()).unwrap_or(u64::MAX).max(1);
        let wait = Duration::from_millis(rand::rng().random_range(millis / 2..=millis));
        (wait, (base * 2).min(self.max))
    }
}

#[derive(Debug, Clone)]
pub struct XdsConfig {
    pub target: GrpcTarget,
    pub node: NodeInfo,
    /// Fills in a workload's elided trust domain.
    pub trust_domain: String,
    pub backoff: Backoff,
    /// See [`Store::with_netns_dir`]: this node's pods' namespaces, by name, until they are
    /// discovered through `/proc`.
    pub netns_dir: Option<PathBuf>,
}

/// Counters about the client, for metrics and tests.
#[derive(Debug, Default)]
pub struct XdsStats {
    connected: std::sync::atomic::AtomicBool,
    streams: AtomicU64,
    responses: AtomicU64,
    acks: AtomicU64,
    nacks: AtomicU64,
    published: AtomicU64,
}

impl XdsStats {
    /// Whether a stream to the control plane is up right now.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
    /// Streams established (1 + reconnections).
    pub fn streams(&self) -> u64 {
        self.streams.load(Ordering::Relaxed)
    }
    pub fn responses(&self) -> u64 {
        self.responses.load(Ordering::Relaxed)
    }
    pub fn acks(&self) -> u64 {
        self.acks.load(Ordering::Relaxed)
    }
    pub fn nacks(&self) -> u64 {
        self.nacks.load(Ordering::Relaxed)
    }
    /// New states published.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }
}

/// A running client; dropping it stops it (the last published state stays in the channel).
#[derive(Debug)]
pub struct XdsClient {
    stats: Arc<XdsStats>,
    task: JoinHandle<()>,
}

impl XdsClient {
    pub fn stats(&self) -> Arc<XdsStats> {
        self.stats.clone()
    }
}

impl Drop for XdsClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error(transparent)]
    Setup(#[from] GrpcError),
    #[error("stream: {0}")]
    Status(#[from] tonic::Status),
    #[error("the request stream closed")]
    RequestsClosed,
}

/// Starts the client. It publishes a new `State` on `tx` after each response that changes
/// the accepted resources or completes the first sync (states before that are marked
/// incomplete), and stops when every receiver of `tx` is gone or the returned handle is
/// dropped. Must be called inside a tokio runtime.
pub fn spawn(config: XdsConfig, tx: watch::Sender<Arc<State>>) -> XdsClient {
    let stats = Arc::new(XdsStats::default());
    let task = tokio::spawn(run(config, tx, stats.clone()));
    XdsClient { stats, task }
}

async fn run(config: XdsConfig, tx: watch::Sender<Arc<State>>, stats: Arc<XdsStats>) {
    let mut store = Store::new(config.trust_domain.clone());
    if let Some(dir) = &config.netns_dir {
        store = store.with_netns_dir(config.node.node_name.clone(), dir.clone());
    }
    let mut base = config.backoff.initial;
    loop {
        let result = stream(&config, &mut store, &tx, &stats).await;
        stats.connected.store(false, Ordering::Relaxed);
        if tx.is_closed() {
            return;
        }
        match result {
            // A stream that delivered something was healthy: start the backoff over.
            Ok(true) => {
                info!(address = %config.target.address, "xDS stream ended; reconnecting, keeping the last good state");
                base = config.backoff.initial;
            }
            Ok(false) => {
                warn!(address = %config.target.address, "xDS stream ended before any response; keeping the last good state");
            }
            Err(e) => {
                warn!(address = %config.target.address, "xDS: {e}; keeping the last good state");
            }
        }
        let (wait, next) = config.backoff.next(base);
        base = next;
        debug!(?wait, "xDS reconnecting");
        tokio::time::sleep(wait).await;
    }
}

/// One stream, until it ends. `Ok(true)` when it delivered at least one response.
async fn stream(
    config: &XdsConfig,
    store: &mut Store,
    tx: &watch::Sender<Arc<State>>,
    stats: &XdsStats,
) -> Result<bool, StreamError> {
    let channel = config.target.connect().await?;
    let (req_tx, req_rx) = mpsc::channel(TYPE_URLS.len() + 8);
    let node = config.node.to_node();
    for type_url in TYPE_URLS {
        let initial = store.initial_request(type_url, Some(node.clone()));
        debug!(
            type_url,
            known = initial.initial_resource_versions.len(),
            "xDS subscribing"
        );
        req_tx
            .try_send(initial)
            .map_err(|_| StreamError::RequestsClosed)?;
    }
    let mut request = tonic::Request::new(ReceiverStream::new(req_rx));
    config.target.authorize(&mut request)?;
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let mut responses = client
        .delta_aggregated_resources(request)
        .await?
        .into_inner();
    stats.streams.fetch_add(1, Ordering::Relaxed);
    stats.connected.store(true, Ordering::Relaxed);
    info!(address = %config.target.address, "xDS stream established");

    let mut delivered = false;
    while let Some(resp) = responses.message().await? {
        delivered = true;
        stats.responses.fetch_add(1, Ordering::Relaxed);
        debug!(
            type_url = %resp.type_url,
            resources = resp.resources.len(),
            removed = resp.removed_resources.len(),
            nonce = %resp.nonce,
            "xDS response"
        );
        let applied = store.apply(resp);
        if applied.changed {
            let (state, dropped) = store.state();
            for d in &dropped {
                warn!("xDS resource left out of the state: {d}");
            }
            info!(
                workloads = state.workloads().count(),
                services = state.services().count(),
                policies = state.policies().count(),
                complete = state.incomplete().is_none(),
                "xDS state applied"
            );
            // Counted first, so whoever sees the new state also sees the count.
            stats.published.fetch_add(1, Ordering::Relaxed);
            tx.send_replace(Arc::new(state));
        }
        if applied.rejected.is_empty() {
            stats.acks.fetch_add(1, Ordering::Relaxed);
        } else {
            for e in &applied.rejected {
                warn!("xDS resource rejected (NACK), keeping its previous version: {e}");
            }
            stats.nacks.fetch_add(1, Ordering::Relaxed);
        }
        req_tx
            .send(applied.reply)
            .await
            .map_err(|_| StreamError::RequestsClosed)?;
    }
    Ok(delivered)
}
