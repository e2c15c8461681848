//! The xDS source: a delta ADS client of istiod for the workload API
//! (`istio.workload.Address`) and L4 policies (`istio.security.Authorization`), publishing
//! the resulting `State` on the same kind of watch channel the local file source uses.
//!
//! - `convert`: protobuf resources to the internal model (pure);
//! - `store`: accepted resources, ACK/NACK decisions, `State` assembly (pure, sans-IO);
//! - `client`: the stream driver (connect, subscribe, answer, reconnect with backoff).
//!
//! What it must never do: publish a `State` that drops good resources because one was bad,
//! or drop the last good state because istiod went away.
//!
//! Workloads come without a `netns`: `source::discovery` finds this node's pods' namespaces
//! through `/proc` (`--proc-root`), or `--netns-dir` names them (local harness).

pub mod client;
pub mod convert;
pub mod store;

pub use client::{Backoff, NodeInfo, XdsClient, XdsConfig, XdsStats, spawn};
pub use convert::{AddressResource, ConvertError};
pub use store::Store;
