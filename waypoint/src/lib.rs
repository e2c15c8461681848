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
