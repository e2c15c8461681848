//! ztunnel: the node agent of an Istio-compatible ambient mesh.
//!
//! It captures enrolled pods' TCP traffic with eBPF, carries it between nodes in HBONE
//! tunnels (HTTP/2 CONNECT over mutual TLS on port 15008) and applies L4 authorization.
//! The waypoint reuses `identity`, `tls`, `hbone` and `metrics` from this library.

pub mod admin;
pub mod capture;
pub mod config;
pub mod grpc;
pub mod handoff;
pub mod hbone;
pub mod identity;
pub mod metrics;
pub mod proto;
pub mod proxy;
pub mod readiness;
pub mod source;
pub mod state;
pub mod tls;
