//! ztunnel: the node agent of an Istio-compatible ambient mesh.
//!
//! It captures enrolled pods' TCP traffic with eBPF, carries it between nodes in HBONE
//! tunnels (HTTP/2 CONNECT over mutual TLS on port 15008) and applies L4 authorization.
//!
//! The library has two layers. The lower one — `identity`, `tls`, `hbone`, `state`, `source`
//! (local config and the xDS client), `metrics`, `endpoint`, `net`, `time` — knows nothing of
//! the kernel and is what the waypoint links (`default-features = false`). The node layer
//! behind the `node` feature (on by default) — `capture`, `proxy`, `handoff`, `admin`,
//! `readiness` — adds eBPF capture and the per-pod data path, and is the only place that
//! depends on aya.

pub mod config;
pub mod endpoint;
pub mod grpc;
pub mod hbone;
pub mod identity;
pub mod metrics;
pub mod net;
pub mod proto;
pub mod source;
pub mod state;
pub mod time;
pub mod tls;

#[cfg(feature = "node")]
pub mod admin;
#[cfg(feature = "node")]
pub mod capture;
#[cfg(feature = "node")]
pub mod handoff;
#[cfg(feature = "node")]
pub mod proxy;
#[cfg(feature = "node")]
pub mod readiness;
