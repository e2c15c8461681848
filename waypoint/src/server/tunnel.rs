//! One HBONE tunnel into the waypoint: find what its CONNECT authority names (a service VIP
//! or a workload of the mesh), who the client is, then serve HTTP/1.1 or HTTP/2 (h2c, told by
//! the connection preface) inside it, each request through `forward`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use http::StatusCode;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

use ztunnel::hbone::{Accepted, forwarded_for};
use ztunnel::identity::Identity;
use ztunnel::state::service::AppProtocol;
use ztunnel::state::{Service, Workload};

use crate::metrics::Names;
use crate::upstream::Endpoint;

use super::Ctx;
use crate::snapshot::{Destination, Snapshot};

/// What every request of one tunnel shares.
pub(super) struct Downstream {
    pub(super) destination: Destination,
    /// The CONNECT authority: the service VIP (or workload address) and port the client
    /// dialled.
    pub(super) authority: SocketAddr,
    /// The identity the client proved (its ztunnel acts for it).
    pub(super) peer: Identity,
    /// The client workload, when it is known (its labels are `sourceLabels`).
    pub(super) source: Option<Arc<Workload>>,
    /// The client's metric label values, made once per tunnel.
    pub(super) names: Arc<Names>,
}

static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

impl Downstream {
    /// The client's namespace, from its proven identity (`sourceNamespace`).
    pub(super) fn source_namespace(&self) -> &str {
        self.peer.namespace()
    }

    /// The client workload's labels (none when it is not known).
    pub(super) fn source_labels(&self) -> &BTreeMap<String, String> {
        self.source.as_ref().map_or(&NO_LABELS, |w| &w.labels)
    }
}

/// The client workload. The address in `forwarded` is only a hint of which pod of the
/// identity it is: a workload counts only if it runs as the identity the peer proved.
fn source(snap: &Snapshot, peer: &Identity, client: Option<SocketAddr>) -> Option<Arc<Workload>> {
    client
        .and_then(|c| snap.state.workload_by_ip(c.ip()))
        .filter(|w| w.identity_ref() == peer)
}

/// A port declared as not HTTP: the tunnel's bytes go to an endpoint of the service as they
/// are (no routes apply). No endpoint, or none reachable: the tunnel is refused (503), so the
/// client's ztunnel resets the client's connection.
async fn relay_tcp(
    ctx: &Ctx,
    snap: &Snapshot,
    service: &Service,
    peer_addr: SocketAddr,
    accepted: Accepted,
) {
    let port = accepted.authority.port();
    let eps = snap.endpoints(service, port, None);
    let Some((w, addr)) = eps.random() else {
        tracing::info!(service = %service.hostname, port, "TCP tunnel refused: no healthy endpoint");
        accepted.responder.reject(StatusCode::SERVICE_UNAVAILABLE);
        return;
    };
    let ep = Endpoint::new(w.clone(), *addr);
    let mut upstream = match ctx.upstream.dialer().tunnel(&ep).await {
        Ok(up) => up,
        Err(error) => {
            tracing::info!(service = %service.hostname, endpoint = %ep.addr, %error, "TCP tunnel refused");
            accepted.responder.reject(StatusCode::SERVICE_UNAVAILABLE);
            return;
        }
    };
    let Ok(mut downstream) = accepted.responder.accept() else {
        return;
    };
    match tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
        Ok((sent, received)) => {
            tracing::debug!(peer = %peer_addr, endpoint = %ep.addr, sent, received, "TCP relay done");
        }
        Err(error) => {
            tracing::debug!(peer = %peer_addr, endpoint = %ep.addr, %error, "TCP relay ended");
            downstream.abort();
            upstream.abort();
        }
    }
}

pub(super) async fn serve(ctx: Arc<Ctx>, peer_addr: SocketAddr, accepted: Accepted) {
    let snap = ctx.snapshot();
    let authority = accepted.authority;
    let Some(destination) = snap.destination(authority.ip()) else {
        tracing::info!(peer = %peer_addr, identity = %accepted.peer_identity, %authority,
            "tunnel refused: the authority is neither a service nor a workload of the mesh");
        accepted.responder.reject(StatusCode::SERVICE_UNAVAILABLE);
        return;
    };
    if let Destination::Service(service) = &destination
        && service.app_protocols.get(&authority.port()) == Some(&AppProtocol::Tcp)
    {
        let service = service.clone();
        // Boxed: the relay's future would otherwise make every HTTP tunnel's task larger.
        Box::pin(relay_tcp(&ctx, &snap, &service, peer_addr, accepted)).await;
        return;
    }
    let client = forwarded_for(&accepted.headers);
    let source = source(&snap, &accepted.peer_identity, client);
    let names = match &source {
        Some(w) => snap.workload_names(w),
        None => Names::peer(None, &accepted.peer_identity),
    };
    let down = Arc::new(Downstream {
        source,
        names,
        destination,
        authority,
        peer: accepted.peer_identity,
    });
    drop(snap);
    let stream = match accepted.responder.accept() {
        Ok(stream) => stream,
        Err(error) => {
            tracing::debug!(peer = %peer_addr, %error, "tunnel closed before it was accepted");
            return;
        }
    };
    let service = {
        let ctx = ctx.clone();
        let down = down.clone();
        service_fn(move |req| super::forward::handle(ctx.clone(), down.clone(), req))
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .initial_stream_window_size(ztunnel::hbone::STREAM_WINDOW)
        .initial_connection_window_size(ztunnel::hbone::CONNECTION_WINDOW);
    if let Err(error) = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .await
    {
        tracing::debug!(peer = %peer_addr, %authority, %error, "HTTP connection in tunnel ended");
    }
}
