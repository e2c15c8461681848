//! Inbound: HBONE tunnels arriving on an enrolled pod's 15008, and plaintext connections
//! steered to its 15006. Each is checked against the pod's L4 authorization policies before
//! ztunnel connects to the application (from 127.0.0.6, inside the pod's namespace).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::StatusCode;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::copy::{Stats, relay};
use super::pods::Pod;
use super::{DELIVERY_SOURCE, DELIVERY_SOURCE_V6, Proxy};
use crate::capture::Netns;
use crate::hbone;
use crate::identity::Identity;
use crate::state::authz::{Decision, authorize};
use crate::state::policy::ConnectionInfo;

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
        let proxy = proxy.clone();
        let uid = uid.clone();
        tokio::spawn(async move {
            if let Err(reason) = serve_hbone(&proxy, &uid, conn, peer).await {
                Stats::add(&proxy.stats.rejected_inputs, 1);
                warn!(%peer, "HBONE connection rejected: {reason}");
            }
        });
    }
}

async fn serve_hbone(
    proxy: &Arc<Proxy>,
    uid: &str,
    conn: TcpStream,
    peer: SocketAddr,
) -> Result<(), String> {
    let pod = proxy.pods.get(uid).ok_or("pod no longer enrolled")?;
    let tls = proxy
        .server_tls(&pod.workload.identity())
        .await
        .map_err(|e| e.to_string())?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let handshake = tokio::time::timeout(proxy.handshake_timeout, acceptor.accept(conn));
    let stream = handshake
        .await
        .map_err(|_| "TLS handshake timed out".to_owned())?
        .map_err(|e| format!("TLS handshake: {}", crate::tls::handshake_error(&e)))?;
    let peer_id = crate::tls::peer_identity(stream.get_ref().1).map_err(|e| e.to_string())?;
    debug!(%peer, identity = %peer_id, "HBONE connection accepted");
    let config = hbone::ServerConfig::default();
    let handler_proxy = proxy.clone();
    let handler_uid = uid.to_owned();
    let mut draining = proxy.draining.subscribe();
    let shutdown = async move {
        let _ = draining.wait_for(|d| *d).await;
    };
    hbone::serve_until(
        stream,
        peer_id.clone(),
        &config,
        move |accepted| {
            let proxy = handler_proxy.clone();
            let uid = handler_uid.clone();
            async move { on_stream(proxy, uid, peer, accepted).await }
        },
        shutdown,
    )
    .await
    .map_err(|e| format!("HBONE from {peer_id}: {e}"))
}

async fn on_stream(proxy: Arc<Proxy>, uid: String, peer: SocketAddr, accepted: hbone::Accepted) {
    let Some(pod) = proxy.pods.get(&uid) else {
        accepted.responder.reject(StatusCode::SERVICE_UNAVAILABLE);
        return;
    };
    let dst = accepted.authority;
    if !pod.workload.workload_ips.contains(&dst.ip()) {
        Stats::add(&proxy.stats.rejected_inputs, 1);
        warn!(%dst, identity = %accepted.peer_identity, "HBONE authority is not this pod; answering 400");
        accepted.responder.reject(StatusCode::BAD_REQUEST);
        return;
    }
    let src_ip = hbone::forwarded_for(&accepted.headers)
        .map(|a| a.ip())
        .unwrap_or(peer.ip());
    match admit(
        &proxy,
        &pod,
        dst,
        Some(accepted.peer_identity.clone()),
        Some(src_ip),
    )
    .await
    {
        Err((status, reason)) => {
            info!(%dst, identity = %accepted.peer_identity, %status, "HBONE stream refused: {reason}");
            accepted.responder.reject(status);
        }
        Ok(mut upstream) => {
            let Ok(mut tunnel) = accepted.responder.accept() else {
                return;
            };
            if let Err(err) = relay(&proxy.stats, &mut tunnel, &mut upstream).await {
                debug!(%dst, %err, "HBONE stream ended with an error");
            }
        }
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
        let Ok(dst) = conn.local_addr() else {
            continue;
        };
        let Some(pod) = proxy.pods.get(&uid) else {
            continue;
        };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            match admit(&proxy, &pod, dst, None, Some(peer.ip())).await {
                Err((_, reason)) => info!(%peer, %dst, "inbound plaintext refused: {reason}"),
                Ok(mut upstream) => {
                    let _ = relay(&proxy.stats, &mut conn, &mut upstream).await;
                }
            }
        });
    }
}

/// Applies the pod's L4 policy to a connection for `dst` and, when allowed, connects to the
/// application inside the pod. The error carries the HBONE status to answer and the reason.
pub(super) async fn admit(
    proxy: &Proxy,
    pod: &Pod,
    dst: SocketAddr,
    src_identity: Option<Identity>,
    src_ip: Option<IpAddr>,
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
        let policy = policy.unwrap_or_else(|| "-".to_owned());
        info!(src = %who, %dst, %policy, "connection denied: {reason}");
        return Err((
            StatusCode::UNAUTHORIZED,
            format!("denied by policy {policy}: {reason}"),
        ));
    }
    let from = if dst.is_ipv6() {
        SocketAddr::from((DELIVERY_SOURCE_V6, 0))
    } else {
        SocketAddr::from((DELIVERY_SOURCE, 0))
    };
    pod.netns.connect(dst, Some(from)).await.map_err(|e| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("application at {dst} unreachable: {e}"),
        )
    })
}
