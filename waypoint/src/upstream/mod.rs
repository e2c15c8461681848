//! The waypoint's side towards endpoints: HBONE tunnels to each endpoint's 15008 under the
//! waypoint's own identity (`dial`), and HTTP connections over them, kept for reuse (`pool`).
//! The destination ztunnel sees the waypoint as the client, and authorizes it as such.

pub mod dial;
pub mod pool;

use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;

use ztunnel::identity::Identity;
use ztunnel::state::Workload;

pub use dial::Dialer;
pub use pool::{Body, Failed, HttpPool, Protocol, UpstreamError};

/// One endpoint: where to deliver, and the workload whose identity its ztunnel must prove.
/// Cheap to clone (the workload is shared, its identity never copied per request); equal
/// when the address and the identity are.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// The workload's address and target port (the CONNECT authority).
    pub addr: SocketAddr,
    pub workload: Arc<Workload>,
}

impl Endpoint {
    pub fn new(workload: Arc<Workload>, addr: SocketAddr) -> Endpoint {
        Endpoint { addr, workload }
    }

    /// The identity the endpoint's ztunnel must prove.
    pub fn identity(&self) -> &Identity {
        self.workload.identity_ref()
    }
}

impl PartialEq for Endpoint {
    fn eq(&self, other: &Endpoint) -> bool {
        self.addr == other.addr && self.identity() == other.identity()
    }
}

impl Eq for Endpoint {}

impl Hash for Endpoint {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.addr.hash(state);
        self.identity().hash(state);
    }
}
