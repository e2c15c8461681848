//! The waypoint: the shared L7 proxy of the ambient mesh.
//!
//! Today this crate holds the pure core: `config` reads Istio and Gateway API resources as
//! users write them, and `route` compiles them into immutable route tables and matches
//! requests against them. No I/O happens in either (except reading files in
//! `config::load_path`); the HBONE and HTTP server comes on top.

#![forbid(unsafe_code)]

pub mod config;
pub mod policy;
pub mod route;
