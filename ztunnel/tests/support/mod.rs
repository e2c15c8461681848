//! In-process control plane for the integration tests: a delta ADS server (tonic, real gRPC
//! over 127.0.0.1) that hands every stream to the test, so the test decides what istiod says
//! and when, and waits on channels instead of sleeping. (The Istio CA stand-in is the
//! harness's, `mesh_tests::ca`, with the tests of the CA client in `tests/tests/istio_ca.rs`.)

#![allow(dead_code)]

pub(crate) mod xds;

use std::time::Duration;

/// How long any single expected event may take before the test fails.
pub(crate) const DEADLINE: Duration = Duration::from_secs(10);

/// The next item of `rx`, or a panic naming `what` after [`DEADLINE`].
pub(crate) async fn next<T>(rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>, what: &str) -> T {
    match tokio::time::timeout(DEADLINE, rx.recv()).await {
        Ok(Some(v)) => v,
        Ok(None) => panic!("{what}: channel closed"),
        Err(_) => panic!("{what}: nothing within {DEADLINE:?}"),
    }
}

/// Waits until `cond` holds, checking every few milliseconds, for at most [`DEADLINE`].
pub(crate) async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
