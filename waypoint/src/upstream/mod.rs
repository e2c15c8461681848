//! The waypoint's side towards endpoints: HBONE tunnels to each endpoint's 15008 under the
//! waypoint's own identity (`dial`), and HTTP connections over them, kept for reuse (`pool`).
//! The destination ztunnel sees the waypoint as the client, and authorizes it as such.

pub mod dial;
pub mod pool;

use std::net::SocketAddr;

use ztunnel::identity::Identity;

pub use dial::Dialer;
pub use pool::{Body, Failed, HttpPool, Protocol, UpstreamError};

/// One endpoint: where to deliver, and the identity its ztunnel must prove.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// The workload's address and target port (the CONNECT authority).
    pub addr: SocketAddr,
    pub identity: Identity,
}
