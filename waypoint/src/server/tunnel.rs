//! One HBONE tunnel into the waypoint: find what its CONNECT authority names (a service VIP
//! or a workload of the mesh), who the client is, then serve HTTP/1.1 or HTTP/2 (h2c, told by
//! the connection preface) inside it, each request through `forward`. A port declared as not
//! HTTP is relayed as bytes; one that declares nothing is read as HTTP when its first bytes
//! are HTTP (`sniff`) and relayed as bytes otherwise.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::StatusCode;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

use bytes::BytesMut;

use ztunnel::hbone::{Accepted, H2Stream, forwarded_for};
use ztunnel::identity::Identity;
use ztunnel::state::Workload;
use ztunnel::state::service::AppProtocol;

use crate::metrics::Names;
use crate::upstream::Endpoint;

use super::Ctx;
use super::h1guard::H1Guard;
use super::sniff::{self, Detected, Replay};
use crate::snapshot::{Destination, Snapshot};

/// What every request of one tunnel shares.
pub(super) struct Downstream {
    pub(super) destination: Destination,
    /// The CONNECT authority: the service VIP (or workload address) and port the client
    /// dialled.
    pub(super) authority: SocketAddr,
    /// The identity the client proved (its ztunnel acts for it).
    pub(super) peer: Identity,
    /// `peer` as a policy principal, made once per tunnel when a policy first asks.
    principal: std::sync::OnceLock<String>,
    /// The client's address for policy (`source.ip`): the workload of `source` when there is
    /// one (its address is only believed for a workload of the proven identity), else the
    /// tunnel's TCP peer.
    pub(super) source_ip: IpAddr,
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

    /// The client's principal (`<trust domain>/ns/<namespace>/sa/<account>`).
    pub(super) fn principal(&self) -> &str {
        self.principal.get_or_init(|| self.peer.principal())
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

/// The endpoint a relayed tunnel goes to: one of the service's, at random, or the workload
/// addressed. `None` when there is none.
fn relay_endpoint(
    snap: &Snapshot,
    destination: &Destination,
    authority: SocketAddr,
) -> Option<Endpoint> {
    match destination {
        Destination::Service(service) => {
            let eps = snap.endpoints(service, authority.port(), None);
            let (w, addr) = eps.random()?;
            Some(Endpoint::new(w.clone(), *addr))
        }
        Destination::Workload(w) => Some(Endpoint::new(w.clone(), authority)),
    }
}

/// A port declared as not HTTP: the tunnel's bytes go to an endpoint as they are (no
/// routes apply). No endpoint, or none reachable: the tunnel is refused (503), so the
/// client's ztunnel resets the client's connection.
async fn relay_declared(
    ctx: &Ctx,
    destination: &Destination,
    peer_addr: SocketAddr,
    accepted: Accepted,
) {
    let authority = accepted.authority;
    let ep = relay_endpoint(&ctx.snapshot(), destination, authority);
    let Some(ep) = ep else {
        tracing::info!(%authority, "TCP tunnel refused: no healthy endpoint");
        accepted.responder.reject(StatusCode::SERVICE_UNAVAILABLE);
        return;
    };
    let upstream = match ctx.upstream.dialer().tunnel(&ep).await {
        Ok(up) => up,
        Err(error) => {
            tracing::info!(%authority, endpoint = %ep.addr, %error, "TCP tunnel refused");
            accepted.responder.reject(StatusCode::SERVICE_UNAVAILABLE);
            return;
        }
    };
    let Ok(downstream) = accepted.responder.accept() else {
        return;
    };
    relay(
        Replay::new(BytesMut::new(), downstream),
        upstream,
        peer_addr,
        &ep,
    )
    .await;
}

/// A port that declares no protocol and whose client did not speak HTTP: relayed as bytes,
/// those read to decide first. The tunnel is already accepted, so a missing or unreachable
/// endpoint resets it.
async fn relay_detected(
    ctx: &Ctx,
    down: &Downstream,
    peer_addr: SocketAddr,
    mut downstream: Replay<H2Stream>,
) {
    let authority = down.authority;
    let ep = relay_endpoint(&ctx.snapshot(), &down.destination, authority);
    let Some(ep) = ep else {
        tracing::info!(%authority, "TCP tunnel reset: no healthy endpoint");
        downstream.inner.abort();
        return;
    };
    match ctx.upstream.dialer().tunnel(&ep).await {
        Ok(upstream) => relay(downstream, upstream, peer_addr, &ep).await,
        Err(error) => {
            tracing::info!(%authority, endpoint = %ep.addr, %error, "TCP tunnel reset");
            downstream.inner.abort();
        }
    }
}

async fn relay(
    mut downstream: Replay<H2Stream>,
    mut upstream: H2Stream,
    peer_addr: SocketAddr,
    ep: &Endpoint,
) {
    match tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
        Ok((sent, received)) => {
            tracing::debug!(peer = %peer_addr, endpoint = %ep.addr, sent, received, "TCP relay done");
        }
        Err(error) => {
            tracing::debug!(peer = %peer_addr, endpoint = %ep.addr, %error, "TCP relay ended");
            downstream.inner.abort();
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
    let declared = match &destination {
        Destination::Service(service) => service.app_protocols.get(&authority.port()).copied(),
        Destination::Workload(_) => None,
    };
    let client = forwarded_for(&accepted.headers);
    let source = source(&snap, &accepted.peer_identity, client);
    let names = match &source {
        Some(w) => snap.workload_names(w),
        None => Names::peer(None, &accepted.peer_identity),
    };
    let source_ip = match (&source, client) {
        (Some(_), Some(c)) => c.ip(),
        _ => peer_addr.ip(),
    };
    let down = Arc::new(Downstream {
        source,
        names,
        destination,
        authority,
        principal: std::sync::OnceLock::new(),
        peer: accepted.peer_identity.clone(),
        source_ip,
    });
    if declared == Some(AppProtocol::Tcp) {
        // Bytes only: the policies' HTTP fields are unseen (they fail closed).
        if !super::authorize::check(&ctx, &snap, &down, None, None).is_allow() {
            accepted.responder.reject(StatusCode::FORBIDDEN);
            return;
        }
        drop(snap);
        // Boxed: the relay's future would otherwise make every HTTP tunnel's task larger.
        Box::pin(relay_declared(&ctx, &down.destination, peer_addr, accepted)).await;
        return;
    }
    drop(snap);
    let mut stream = match accepted.responder.accept() {
        Ok(stream) => stream,
        Err(error) => {
            tracing::debug!(peer = %peer_addr, %error, "tunnel closed before it was accepted");
            return;
        }
    };
    // A port declared HTTP waits for the client as long as it takes, and what is not HTTP
    // on it is answered 400 by the HTTP server.
    let timeout = match declared {
        Some(_) => None,
        None => ctx.protocol_detection_timeout,
    };
    match sniff::detect(&mut stream, timeout).await {
        Ok((Detected::Http, head)) => {
            serve_http(ctx, down, peer_addr, Replay::new(head, stream)).await;
        }
        Ok((Detected::Opaque | Detected::Silent, head)) if declared.is_some() => {
            serve_http(ctx, down, peer_addr, Replay::new(head, stream)).await;
        }
        Ok((detected @ (Detected::Opaque | Detected::Silent), head)) => {
            tracing::debug!(peer = %peer_addr, %authority, ?detected, "not HTTP: relayed as TCP");
            if !super::authorize::check(&ctx, &ctx.snapshot(), &down, None, None).is_allow() {
                stream.abort();
                return;
            }
            Box::pin(relay_detected(
                &ctx,
                &down,
                peer_addr,
                Replay::new(head, stream),
            ))
            .await;
        }
        Ok((Detected::Closed, _)) => {}
        Err(error) => {
            tracing::debug!(peer = %peer_addr, %authority, %error, "tunnel ended before its protocol was known");
        }
    }
}

/// HTTP/2 when the stream starts with its preface, else HTTP/1.1 behind the framing guard;
/// each request through `forward`.
async fn serve_http(
    ctx: Arc<Ctx>,
    down: Arc<Downstream>,
    peer_addr: SocketAddr,
    stream: Replay<H2Stream>,
) {
    let authority = down.authority;
    let ended = if sniff::is_h2(stream.head()) {
        let ctx = ctx.clone();
        let service = service_fn(move |req| super::forward::handle(ctx.clone(), down.clone(), req));
        http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(ztunnel::hbone::STREAM_WINDOW)
            .initial_connection_window_size(ztunnel::hbone::CONNECTION_WINDOW)
            .serve_connection(TokioIo::new(stream), service)
            .await
    } else {
        // hyper's HTTP/1 connection keeps room for one request's future for as long as it
        // lives, idle or not: boxed, that room is a pointer instead of the whole request
        // handling (4 KiB), for one allocation per request.
        let service = {
            let ctx = ctx.clone();
            service_fn(move |req| Box::pin(super::forward::handle(ctx.clone(), down.clone(), req)))
        };
        http1::Builder::new()
            // A client may shut its side after the request and wait for the answer.
            .half_close(true)
            .max_buf_size(crate::H1_MAX_BUF)
            .max_header_size(crate::MAX_REQUEST_HEAD)
            .serve_connection(
                TokioIo::new(H1Guard::new(stream, Some(ctx.metrics.clone()))),
                service,
            )
            .with_upgrades()
            .await
    };
    if let Err(error) = ended {
        tracing::debug!(peer = %peer_addr, %authority, %error, "HTTP connection in tunnel ended");
    }
}
