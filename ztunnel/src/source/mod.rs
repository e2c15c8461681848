//! Where the `State` comes from: the local YAML file (watched for changes) or istiod (xDS).
//! A source only ever publishes a complete, validated `State`; a bad input never replaces a
//! good state.

pub mod discovery;
pub mod local;
pub mod validate;
pub mod watch;
pub mod xds;

pub use local::{LocalConfigError, load};
pub use watch::{FileWatch, SourceStats, spawn_file_watch};

use std::sync::Arc;

use tokio::sync::watch as channel;

use crate::config::Config;
use crate::grpc::GrpcTarget;
use crate::state::State;

/// A running source; dropping it stops it (the last state stays published).
#[derive(Debug)]
pub enum Running {
    File(FileWatch),
    Xds(xds::XdsClient),
}

/// The state published before the control plane has answered: empty, and marked incomplete
/// so that nobody takes its emptiness for "no pods".
fn awaiting_xds() -> Arc<State> {
    let mut empty = State::builder();
    empty.capture_by_protocol(true);
    empty.incomplete(xds::store::waiting_for(&xds::store::TYPE_URLS));
    Arc::new(empty.build())
}

/// Starts the source the configuration names (`--xds-address`, else the `--config` file) and
/// returns the channel its states arrive on. A local file that cannot be loaded is an error,
/// and a file read is complete at once; in xDS mode the states are marked incomplete
/// ([`State::incomplete`]) until istiod has answered every subscribed type. Must be called
/// inside a tokio runtime.
pub fn start(config: &Config) -> Result<(channel::Receiver<Arc<State>>, Running), String> {
    if let Some(address) = &config.xds_address {
        let (tx, rx) = channel::channel(awaiting_xds());
        let xds_config = xds::XdsConfig {
            target: GrpcTarget {
                address: address.clone(),
                root_cert: config
                    .xds_root_cert
                    .clone()
                    .or_else(|| config.ca_root_cert.clone()),
                token_file: config.token_file.clone(),
                cluster_id: config.cluster_id.clone(),
            },
            node: xds::NodeInfo {
                node_name: config.node.clone(),
                pod_name: config.pod_name.clone(),
                pod_namespace: config.pod_namespace.clone(),
                instance_ip: config.instance_ip.clone(),
                cluster_id: config.cluster_id.clone(),
            },
            trust_domain: config.trust_domain.clone(),
            backoff: xds::Backoff::default(),
            netns_dir: config.netns_dir.clone(),
        };
        let Some(proc_root) = &config.proc_root else {
            return Ok((rx, Running::Xds(xds::spawn(xds_config, tx))));
        };
        // Discovery sits between the client and the proxy; it ends when the client does. Its
        // output keeps the incompleteness of its input.
        let (raw_tx, raw_rx) = channel::channel(awaiting_xds());
        let client = xds::spawn(xds_config, raw_tx);
        let discovery = discovery::DiscoveryConfig {
            node: config.node.clone(),
            proc_root: proc_root.clone(),
            rescan: std::time::Duration::from_secs(2),
        };
        drop(discovery::spawn(discovery, raw_rx, tx));
        return Ok((rx, Running::Xds(client)));
    }
    let Some(path) = &config.config else {
        return Err("either --config or --xds-address is required".to_owned());
    };
    let initial = local::load(path).map_err(|e| e.to_string())?;
    let (tx, rx) = channel::channel(Arc::new(initial));
    let watch = spawn_file_watch(path.clone(), tx, |err| {
        tracing::warn!("configuration not applied, keeping the last good one: {err}");
    });
    Ok((rx, Running::File(watch)))
}
