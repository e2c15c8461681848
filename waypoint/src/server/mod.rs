//! The waypoint's listener: mTLS on 15008 under the waypoint's identity, HBONE tunnels on
//! each connection (`ztunnel::hbone::serve_until`), HTTP inside each tunnel (`tunnel`),
//! each request decided (`forward`) and sent to an endpoint with its timeout and retries
//! (`attempt`); mirrors (`mirror`), protocol switches (`upgrade`) and the waypoint's own
//! replies (`reply`).
//!
//! Who the client is comes from the TLS handshake only: headers never change it.

/// `AsyncWrite` for a reading wrapper `$ty<S>` whose writes go to its `$field` as they are.
macro_rules! write_through {
    ($ty:ident, $field:ident) => {
        impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $ty<S> {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                tokio::io::AsyncWrite::poll_write(
                    std::pin::Pin::new(&mut self.get_mut().$field),
                    cx,
                    buf,
                )
            }

            fn poll_write_vectored(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                tokio::io::AsyncWrite::poll_write_vectored(
                    std::pin::Pin::new(&mut self.get_mut().$field),
                    cx,
                    bufs,
                )
            }

            fn is_write_vectored(&self) -> bool {
                tokio::io::AsyncWrite::is_write_vectored(&self.$field)
            }

            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                tokio::io::AsyncWrite::poll_flush(
                    std::pin::Pin::new(&mut self.get_mut().$field),
                    cx,
                )
            }

            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                tokio::io::AsyncWrite::poll_shutdown(
                    std::pin::Pin::new(&mut self.get_mut().$field),
                    cx,
                )
            }
        }
    };
}

mod attempt;
mod authenticate;
mod authorize;
mod forward;
mod h1guard;
mod mirror;
mod read_buffer;
mod reply;
mod sniff;
mod tunnel;
mod upgrade;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use ztunnel::hbone::{self, ServerConfig, Session};
use ztunnel::identity::{CertManager, Identity, WorkloadCert};
use ztunnel::tls::TrustBundle;

use crate::snapshot::Snapshot;
use crate::upstream::HttpPool;

/// A TLS handshake that has not finished by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything a connection and its requests need. Shared by all of them.
pub struct Ctx {
    pub identity: Identity,
    pub certs: CertManager,
    pub roots: TrustBundle,
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    pub upstream: HttpPool,
    pub hbone: ServerConfig,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Append `-shadow` to the host of mirrored requests (Envoy's and Istio's up to 1.27
    /// behaviour; Istio 1.28+ leaves the authority as it is).
    pub mirror_shadow_suffix: bool,
    /// On a port that declares no protocol, how long to wait for the client's first bytes
    /// before relaying it as TCP (a protocol where the server speaks first). `None`: wait
    /// as long as it takes (Istio's default, `protocolDetectionTimeout: 0s`).
    pub protocol_detection_timeout: Option<Duration>,
    /// The key sets of RequestAuthentication `jwksUri`s, as fetched.
    pub jwks: Arc<crate::policy::jwt::fetch::JwksStore>,
    /// The server TLS configuration and the certificate it was made with.
    tls: Mutex<Option<(Arc<WorkloadCert>, Arc<rustls::ServerConfig>)>>,
}

impl Ctx {
    pub fn new(
        identity: Identity,
        certs: CertManager,
        roots: TrustBundle,
        snapshot: watch::Receiver<Arc<Snapshot>>,
        upstream: HttpPool,
    ) -> Ctx {
        Ctx {
            identity,
            certs,
            roots,
            snapshot,
            upstream,
            hbone: ServerConfig::default(),
            metrics: Arc::default(),
            mirror_shadow_suffix: false,
            protocol_detection_timeout: None,
            jwks: Arc::default(),
            tls: Mutex::new(None),
        }
    }

    /// The snapshot requests are decided against now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// The server TLS configuration with the current certificate.
    async fn server_tls(&self) -> Result<(Arc<WorkloadCert>, Arc<rustls::ServerConfig>), String> {
        let cert = self
            .certs
            .get(&self.identity)
            .await
            .map_err(|e| format!("no certificate for {}: {e}", self.identity))?;
        let mut held = self.tls.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((c, config)) = held.as_ref()
            && Arc::ptr_eq(c, &cert)
        {
            return Ok((cert, config.clone()));
        }
        let config = ztunnel::tls::server_config(&cert, &self.roots)
            .map_err(|e| format!("TLS configuration: {e}"))?;
        *held = Some((cert.clone(), config.clone()));
        Ok((cert, config))
    }
}

/// Accepts HBONE connections on `listener` until the process ends.
pub async fn serve(listener: TcpListener, ctx: Arc<Ctx>) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let ctx = ctx.clone();
        tokio::spawn(async move {
            if let Err(error) = connection(ctx, tcp, peer).await {
                tracing::info!(%peer, "HBONE connection ended: {error}");
            }
        });
    }
}

async fn connection(
    ctx: Arc<Ctx>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
) -> Result<(), String> {
    let (cert, config) = ctx.server_tls().await?;
    let handshake = TlsAcceptor::from(config).accept(read_buffer::ReadBuffered::new(tcp));
    let mut tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| format!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}"))?
        .map_err(|e| format!("TLS handshake: {}", ztunnel::tls::handshake_error(&e)))?;
    // One write per relayed chunk, as ztunnel's own HBONE sockets (see TLS_SEND_BUFFER).
    tls.get_mut()
        .1
        .set_buffer_limit(Some(hbone::TLS_SEND_BUFFER));
    let session = Session::from_tls(tls.get_ref().1, cert.not_after)
        .map_err(|e| format!("client certificate: {e}"))?;
    tracing::debug!(%peer, identity = %session.peer, "HBONE connection");
    let on_stream = {
        let ctx = ctx.clone();
        move |accepted| tunnel::serve(ctx.clone(), peer, accepted)
    };
    hbone::serve_until(tls, session, &ctx.hbone, on_stream, std::future::pending())
        .await
        .map_err(|e| e.to_string())
}
