//! Harness for the end-to-end tests: nodes and pods as network namespaces, processes run
//! inside them, test applications and clients. Everything it creates is removed on drop,
//! also when a test panics; what a killed run left behind is removed by the next run.

pub mod ca;
pub mod chart;
pub mod container;
pub mod h2raw;
pub mod http_app;
pub mod jwt;
pub mod kube_api;
pub mod mesh;
pub mod mesh_xds;
pub mod netns;
pub mod operator;
pub mod process;
pub mod sys;
pub mod topology;
pub mod traffic;
pub mod waypoint;
pub mod wire;
pub mod xds;

pub use process::{Proc, wait_until};
pub use topology::{Node, Pod, Topology};

/// Fails the test early, with a clear reason, when it cannot run here (not root).
pub fn require_root() {
    let euid = sys::effective_uid();
    assert_eq!(
        euid, 0,
        "the end-to-end tests create namespaces and load eBPF: run as root"
    );
}
