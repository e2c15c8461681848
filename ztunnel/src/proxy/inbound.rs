//! Inbound: HBONE tunnels arriving on an enrolled pod's 15008, and plaintext connections
//! steered to its 15006. Each is checked against the pod's L4 authorization policies before
//! ztunnel connects to the application, inside the pod's namespace, from the address policy
//! saw (the TCP peer: the client pod, or the plaintext client; for a tunnel from a waypoint
//! configured for the pod or its services, the original client it names in `forwarded`),
//! or from 127.0.0.6 with `--inbound-source loopback`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::StatusCode;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::copy::{Side as _, Stats, relay};
use super::pods::Pod;
use super::tracker::{ConnMeta, ConnPath, Outcome, Policy, Tracked};
use super::{InboundSource, Proxy, delivery_source};
use crate::capture::Netns;
use crate::hbone;
use crate::identity::Identity;
use crate::state::authz::{Decision, authorize, policy_source};
use crate::state::policy::ConnectionInfo;
use crate::state::{Service, State, Workload};

pub(super) async fn hbone_loop(
    proxy: Arc<Proxy>,
    uid: String,
    _netns: Arc<Netns>,
    listener: TcpListener,
) {
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                warn!(%err, "HBONE accept failed");
                continue;
            }
        };
        let _ = conn.set_nodelay(true);
        let local = conn
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], super::HBONE_PORT)));
        let proxy = proxy.clone();
        let uid = uid.clone();
        let busy = proxy.busy();
        tokio::spawn(async move {
            let _busy = busy;
            if let Err((kind, reason)) = serve_hbone(&proxy, &uid, conn, peer).await {
                Stats::add(&proxy.stats.rejected_inputs, 1);
                warn!(%peer, "HBONE connection rejected: {reason}");
                let meta = ConnMeta::new(ConnPath::HboneIn, peer, local);
                proxy.tracker.reject(meta, kind, &reason);
            }
        });
    }
}

/// Why a tunnel was refused: a short kind (the metric label) and the full reason.
type Rejection = (&'static str, String);

async fn serve_hbone(
    proxy: &Arc<Proxy>,
    uid: &str,
    conn: TcpStream,
    peer: SocketAddr,
) -> Result<(), Rejection> {
    // Only its identity: each stream looks the pod up again, and a pod released meanwhile
    // must not be kept alive by the connections that reached it (see `Pod::routing`).
    let identity = proxy
        .pods
        .get(uid)
        .ok_or(("not_enrolled", "pod no longer enrolled".to_owned()))?
        .workload
        .identity();
    let (cert, tls) = proxy
        .server_tls(&identity)
        .await
        .map_err(|e| ("certificate", e.to_string()))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let handshake = tokio::time::timeout(
        proxy.handshake_timeout,
        acceptor.accept(hbone::tls_io(conn)),
    );
    let mut stream = handshake
        .await
        .map_err(|_| ("tls_handshake", "TLS handshake timed out".to_owned()))?
        .map_err(|e| {
            let reason = format!("TLS handshake: {}", crate::tls::handshake_error(&e));
            ("tls_handshake", reason)
        })?;
    stream
        .get_mut()
        .1
        .set_buffer_limit(Some(hbone::TLS_SEND_BUFFER));
    let session = hbone::Session::from_tls(stream.get_ref().1, cert.not_after)
        .map_err(|e| ("peer_identity", e.to_string()))?;
    let peer_id = session.peer.clone();
    debug!(%peer, identity = %peer_id, "HBONE connection accepted");
    let config = hbone::ServerConfig {
        keepalive: Some(proxy.hbone_keepalive),
        stall_timeout: proxy.hbone_stall_timeout,
        ..Default::default()
    };
    let handler_proxy = proxy.clone();
    let handler_uid = uid.to_owned();
    let mut draining = proxy.draining.subscribe();
    let shutdown = async move {
        let _ = draining.wait_for(|d| *d).await;
    };
    hbone::serve_until(
        stream,
        session,
        &config,
        move |accepted| {
            let proxy = handler_proxy.clone();
            let uid = handler_uid.clone();
            async move { on_stream(proxy, uid, peer, accepted).await }
        },
        shutdown,
    )
    .await
    .map_err(|e| {
        let kind = match e {
            hbone::HboneError::KeepaliveTimeout(_) => "keepalive_timeout",
            _ => "hbone_protocol",
        };
        (kind, format!("HBONE from {peer_id}: {e}"))
    })
}

async fn on_stream(proxy: Arc<Proxy>, uid: String, peer: SocketAddr, accepted: hbone::Accepted) {
    let _busy = proxy.busy();
    let Some(pod) = proxy.pods.get(&uid) else {
        info!(%peer, dst = %accepted.authority, "HBONE stream for a pod no longer enrolled: 503");
        accepted.responder.reject(StatusCode::SERVICE_UNAVAILABLE);
        return;
    };
    let dst = accepted.authority;
    let peer_id = accepted.peer_identity.clone();
    let state = proxy.state.borrow().clone();
    // The client address the sender claims: recorded as claimed, and believed (for records
    // and policy) only from a waypoint configured for this pod or one of its services.
    let claimed = hbone::forwarded_for(&accepted.headers);
    let trusted = state.waypoint_identities(&pod.workload);
    let client = policy_source(peer, claimed, &peer_id, &trusted);
    let forwarded_by_waypoint = claimed.is_some() && trusted.contains(&peer_id);
    // Optional (Istio's ztunnel sends them; nothing here requires them): logged for tracing.
    let header = |name: &str| accepted.headers.get(name).and_then(|v| v.to_str().ok());
    debug!(%dst, %peer, claimed_client = ?claimed, forwarded = ?header("forwarded"),
        baggage = ?header("baggage"), traceparent = ?header("traceparent"),
        "HBONE CONNECT headers");
    if !pod.workload.workload_ips.contains(&dst.ip()) {
        Stats::add(&proxy.stats.rejected_inputs, 1);
        warn!(%dst, identity = %peer_id, "HBONE authority is not this pod; answering 400");
        let mut meta = ConnMeta::new(ConnPath::HboneIn, client, dst);
        meta.src_claimed = claimed;
        meta.src_identity = Some(peer_id);
        proxy.tracker.reject(
            meta,
            "bad_authority",
            &format!("CONNECT to {dst}, which is not this pod; answered 400"),
        );
        accepted.responder.reject(StatusCode::BAD_REQUEST);
        return;
    }
    if let Some(reason) = super::own_port_refusal(dst) {
        Stats::add(&proxy.stats.rejected_inputs, 1);
        warn!(%dst, port = dst.port(), identity = %peer_id, "HBONE CONNECT refused with 400: {reason}");
        let mut meta = ConnMeta::new(ConnPath::HboneIn, client, dst);
        meta.src_claimed = claimed;
        meta.src_identity = Some(peer_id);
        meta.dst_workload = Some(pod.workload.clone());
        proxy
            .tracker
            .reject(meta, super::OWN_PORT, &format!("{reason}; answered 400"));
        accepted.responder.reject(StatusCode::BAD_REQUEST);
        return;
    }
    let mut meta = ConnMeta::new(ConnPath::HboneIn, client, dst);
    meta.src_claimed = claimed;
    meta.upstream = Some(dst);
    // The workload table names the client only when it agrees with the proven identity, or
    // when a trusted waypoint vouches for the address.
    meta.src_workload = state
        .workload_by_ip(client.ip())
        .filter(|w| forwarded_by_waypoint || *w.identity_ref() == peer_id);
    meta.src_identity = Some(peer_id.clone());
    meta.dst_identity = Some(pod.workload.identity());
    meta.dst_workload = Some(pod.workload.clone());
    meta.dst_service = inbound_service(
        &state,
        &pod.workload,
        dst.port(),
        hbone::forwarded_host(&accepted.headers),
    );
    let tracked = proxy.tracker.open(meta);
    // Policy and delivery see the TCP peer (`forwarded` is the client's word, not proof),
    // or the original client a trusted waypoint passed on.
    match admit(
        &proxy,
        &pod,
        dst,
        Some(peer_id.clone()),
        Some(client.ip()),
        None,
        &tracked,
    )
    .await
    {
        Err((status, reason)) => {
            info!(%dst, identity = %peer_id, src = %client, claimed_client = ?claimed, %status,
                "HBONE stream refused: {reason}");
            accepted.responder.reject(status);
            tracked.finish(outcome(status, reason));
        }
        Ok(mut upstream) => {
            let Ok(mut tunnel) = accepted.responder.accept() else {
                tracked.finish(Outcome::Error(
                    "the client went away before the answer".into(),
                ));
                return;
            };
            let result = relay(&proxy.stats, &tracked, &mut tunnel, &mut upstream).await;
            if let Err(err) = &result {
                debug!(%dst, %err, "HBONE stream ended with an error");
                tunnel.reset();
                upstream.reset();
            }
            tracked.finish_relay(&result);
        }
    }
}

/// The service a tunnel was meant for: the one the client named (`forwarded: host=`), else
/// the only service of the workload that targets `port`.
fn inbound_service(
    state: &State,
    w: &Workload,
    port: u16,
    host: Option<String>,
) -> Option<Arc<Service>> {
    if let Some(host) = host
        && let Some(key) = w.services.keys().find(|k| k.hostname == host)
    {
        return state.service(key);
    }
    let mut serving = w.services.iter().filter_map(|(key, ports)| {
        let svc = state.service(key)?;
        let targets_port = svc
            .ports
            .keys()
            .any(|p| svc.target_port(*p, Some(ports)) == Some(port));
        targets_port.then_some(svc)
    });
    match (serving.next(), serving.next()) {
        (Some(svc), None) => Some(svc),
        _ => None,
    }
}

/// How a refused admission ends a connection: 401 is a policy denial, anything else a
/// failure to reach the application.
pub(super) fn outcome(status: StatusCode, reason: String) -> Outcome {
    if status == StatusCode::UNAUTHORIZED {
        Outcome::Denied(reason)
    } else {
        Outcome::ConnectFailed(reason)
    }
}

pub(super) async fn plaintext_loop(
    proxy: Arc<Proxy>,
    uid: String,
    _netns: Arc<Netns>,
    listener: TcpListener,
) {
    loop {
        let (mut conn, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                warn!(%err, "inbound accept failed");
                continue;
            }
        };
        let _ = conn.set_nodelay(true);
        // Steered by sk_lookup: the local address is where the client was going.
        let dst = match conn.local_addr() {
            Ok(dst) => dst,
            Err(err) => {
                info!(%peer, %err, "inbound connection closed before it was read; dropping");
                continue;
            }
        };
        let Some(pod) = proxy.pods.get(&uid) else {
            // Released between the connect and now: refused, as the pod's own stack would
            // have (nothing listens for it any more).
            info!(%peer, %dst, "inbound connection to a pod no longer enrolled; resetting");
            Stats::add(&proxy.stats.failed, 1);
            conn.reset();
            continue;
        };
        if let Some(reason) = super::own_port_refusal(dst) {
            // Steered here (or straight to this listener, for 15006): delivering it would
            // bring it back to a listener of ztunnel's.
            warn!(%peer, %dst, port = dst.port(), "inbound plaintext connection refused, resetting: {reason}");
            Stats::add(&proxy.stats.rejected_inputs, 1);
            let mut meta = ConnMeta::new(ConnPath::PlaintextIn, peer, dst);
            meta.dst_workload = Some(pod.workload.clone());
            proxy.tracker.reject(meta, super::OWN_PORT, &reason);
            conn.reset();
            continue;
        }
        let proxy = proxy.clone();
        let busy = proxy.busy();
        tokio::spawn(async move {
            let _busy = busy;
            let state = proxy.state.borrow().clone();
            let mut meta = ConnMeta::new(ConnPath::PlaintextIn, peer, dst);
            meta.upstream = Some(dst);
            meta.src_workload = state.workload_by_ip(peer.ip());
            meta.dst_workload = Some(pod.workload.clone());
            meta.dst_identity = Some(pod.workload.identity());
            meta.dst_service = inbound_service(&state, &pod.workload, dst.port(), None);
            let tracked = proxy.tracker.open(meta);
            // The client's own connection lives in this namespace: a delivery from its
            // address must not take its port too.
            let client_port = Some(peer.port());
            match admit(
                &proxy,
                &pod,
                dst,
                None,
                Some(peer.ip()),
                client_port,
                &tracked,
            )
            .await
            {
                Err((status, reason)) => {
                    info!(%peer, %dst, "inbound plaintext refused: {reason}");
                    // A reset, as on the outbound side: the client's connect succeeded, so a
                    // clean end of stream would read as a server that accepted and closed.
                    conn.reset();
                    tracked.finish(outcome(status, reason));
                }
                Ok(mut upstream) => {
                    let result = relay(&proxy.stats, &tracked, &mut conn, &mut upstream).await;
                    if result.is_err() {
                        conn.reset();
                        upstream.reset();
                    }
                    tracked.finish_relay(&result);
                }
            }
        });
    }
}

/// Applies the pod's L4 policy to a connection for `dst` and, when allowed, connects to the
/// application inside the pod, from `src_ip` (the address policy saw) unless deliveries
/// come from the loopback. `avoid_port` is a port that delivery must not take (see
/// `SocketKind::Delivery`). The error carries the HBONE status to answer and the reason.
pub(super) async fn admit(
    proxy: &Proxy,
    pod: &Pod,
    dst: SocketAddr,
    src_identity: Option<Identity>,
    src_ip: Option<IpAddr>,
    avoid_port: Option<u16>,
    tracked: &Tracked,
) -> Result<TcpStream, (StatusCode, String)> {
    let state = proxy.state.borrow().clone();
    let info = ConnectionInfo {
        src_identity: src_identity.clone(),
        src_ip: src_ip.unwrap_or(IpAddr::from([0, 0, 0, 0])),
        dst_ip: dst.ip(),
        dst_port: dst.port(),
    };
    if let Decision::Deny { policy, reason } = authorize(&info, &pod.workload, &state) {
        Stats::add(&proxy.stats.denied, 1);
        let who = src_identity.map_or_else(|| "a plaintext client".to_owned(), |id| id.to_string());
        tracked.set_policy(Policy::Denied {
            policy: policy.clone(),
            reason: reason.to_string(),
        });
        let policy = policy.unwrap_or_else(|| "-".to_owned());
        info!(src = %who, %dst, %policy, "connection denied: {reason}");
        return Err((
            StatusCode::UNAUTHORIZED,
            format!("denied by policy {policy}: {reason}"),
        ));
    }
    tracked.set_policy(Policy::Allowed);
    // Never from a client's address into a namespace not set up to route the replies back.
    let mode = if pod.keeps_client_source() {
        proxy.inbound_source
    } else {
        InboundSource::Loopback
    };
    let from = delivery_source(mode, src_ip, dst);
    let avoid_port = avoid_port.filter(|_| !from.is_loopback());
    proxy
        .connect_within(pod.netns.deliver(dst, from, avoid_port))
        .await
        .map_err(|e| {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("application at {dst} unreachable: {e}"),
            )
        })
}
