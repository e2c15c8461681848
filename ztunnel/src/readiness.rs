//! `/healthz/ready` on 15021: ready only when every pod this node should capture is enrolled
//! (listeners open, capture on); otherwise 503 with the reason.
//!
//! Nor is a node ready before it knows which pods those are: in xDS mode until istiod has
//! answered every subscribed type once (the state is incomplete), and until that first
//! complete configuration has been applied to the pods. An empty view is not "no pods".
//!
//! A pod whose certificate the CA has not issued yet (the CA unreachable when it was
//! enrolled) counts as captured: its connections are refused, each with the reason, until
//! the certificate comes, which is the fail-closed state readiness is there to guarantee
//! (not captured would mean plaintext around the mesh). A CA outage is the control plane's
//! fault, not the node's: answering 503 for it would take every node out of service at once
//! and stall their rollouts, and would change nothing for those pods' traffic. Readiness
//! answers 200 then and names those pods in its body (as does `/config_dump`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::task::JoinHandle;
use tracing::debug;

use crate::proxy::Proxy;

/// Why the node is not ready, or `None` when it is.
pub fn not_ready_reason(proxy: &Proxy) -> Option<String> {
    if let Some(why) = proxy.state.borrow().incomplete() {
        return Some(why.to_owned());
    }
    if !*proxy.synced.borrow() {
        return Some("configuration not applied to the pods yet".to_owned());
    }
    let missing = not_captured(proxy);
    if missing.is_empty() {
        None
    } else {
        Some(format!("pods not yet captured: {}", missing.join(", ")))
    }
}

/// The pods (`namespace/name`) this node should capture and does not.
pub fn not_captured(proxy: &Proxy) -> Vec<String> {
    let state = proxy.state.borrow().clone();
    let enrolled = proxy.pods.uids();
    state
        .local_workloads(&proxy.node)
        .into_iter()
        .filter(|w| crate::proxy::wanted(&state, &proxy.node, w))
        .filter(|w| !enrolled.contains(&w.uid))
        .map(|w| format!("{}/{}", w.namespace(), w.name))
        .collect()
}

/// The enrolled pods (`namespace/name`) that hold no valid certificate: their connections
/// are refused until the CA issues one.
pub fn without_certificate(proxy: &Proxy) -> Vec<String> {
    let mut pods: Vec<String> = proxy
        .pods
        .uids()
        .into_iter()
        .filter_map(|uid| proxy.pods.get(&uid))
        .filter(|pod| !proxy.certs.has_valid(pod.workload.identity_ref()))
        .map(|pod| format!("{}/{}", pod.workload.namespace(), pod.workload.name))
        .collect();
    pods.sort();
    pods
}

/// Starts the readiness server.
pub async fn serve(addr: SocketAddr, proxy: Arc<Proxy>) -> std::io::Result<JoinHandle<()>> {
    let listener = crate::net::reusable_listener(addr)?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                continue;
            };
            let proxy = proxy.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let proxy = proxy.clone();
                    async move { Ok::<_, Infallible>(answer(&proxy, &req)) }
                });
                if let Err(err) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(conn), service)
                    .await
                {
                    debug!(%err, "readiness connection ended");
                }
            });
        }
    }))
}

fn answer(proxy: &Proxy, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, body) = if req.uri().path() != "/healthz/ready" {
        (StatusCode::NOT_FOUND, "not found\n".to_owned())
    } else {
        match not_ready_reason(proxy) {
            None => match without_certificate(proxy) {
                waiting if waiting.is_empty() => (StatusCode::OK, "ready\n".to_owned()),
                waiting => (
                    StatusCode::OK,
                    format!(
                        "ready; captured without a certificate (connections refused until the CA issues one): {}\n",
                        waiting.join(", ")
                    ),
                ),
            },
            Some(reason) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {reason}\n"),
            ),
        }
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}
