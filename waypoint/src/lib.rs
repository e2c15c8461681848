//! The waypoint: the shared L7 proxy of the ambient mesh.
//!
//! The pure core: `config` reads Istio and Gateway API resources as users write them,
//! `route` compiles them into immutable route tables and matches requests against them,
//! `policy` decides retries, faults, rewrites and redirects. No I/O happens there (except
//! reading files in `config::load_path`). Around it: `snapshot` (the mesh and the routes as
//! one value a request is decided against), `server` (HBONE in, HTTP inside) and `upstream`
//! (HBONE out to endpoints, HTTP connections kept for reuse); `run` wires them to the
//! config sources, `kube` is the Kubernetes API as one.

#![forbid(unsafe_code)]

pub mod config;
pub mod kube;
pub mod metrics;
pub mod policy;
pub mod route;
pub mod run;
pub mod server;
pub mod snapshot;
pub mod upstream;

/// Most the read buffer of an HTTP/1.1 connection grows to, downstream and upstream
/// (hyper's default is about 400 KB). Bodies stream through in pieces of at most this
/// size, and an idle connection keeps no more than this after a large body. A message head
/// must fit in it: a longer response head is a 502.
pub const H1_MAX_BUF: usize = 64 * 1024;

/// Longest request head (request line and headers) the waypoint reads; a longer one is
/// answered 431. Envoy's default, so a request Envoy's waypoint takes is taken here.
pub const MAX_REQUEST_HEAD: usize = 60 * 1024;
