#![no_std]
//! Library target so ztunnel can name this crate as a build-dependency (aya-build needs that
//! to rebuild the programs when they change); the programs themselves are in main.rs.
