//! The data path: per enrolled pod, ztunnel's three listeners inside the pod's network
//! namespace (15001 outbound, 15006 inbound plaintext, 15008 HBONE), and the copying of bytes
//! between them and the tunnels or the application.
//!
//! Decisions (where a destination goes, whether policy allows a connection) are made by
//! `state`; identities and TLS by `identity` and `tls`; this module wires them to sockets.

mod copy;
mod inbound;
mod outbound;
pub mod pod_index;
mod pods;
mod retry;
#[cfg(test)]
mod stall_tests;
pub mod tracker;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::capture::Capture;
pub use crate::config::InboundSource;
use crate::hbone;
use crate::identity::{CertManager, Identity, WorkloadCert};
use crate::state::State;
use crate::tls::TrustBundle;

pub use pods::{PodRegistry, wanted};

/// Port of the outbound capture listener in each pod (Istio's).
pub const OUTBOUND_PORT: u16 = 15001;
/// Port of the inbound plaintext listener in each pod.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// HBONE port in each pod.
pub const HBONE_PORT: u16 = 15008;
/// Every port ztunnel serves, in pods (15001, 15006, 15008) or on the node (15000 admin,
/// 15020 metrics, 15021 readiness): Istio's reserved ports. Nothing is ever delivered to a
/// pod on one of them: a connection to a pod's 15006 (or its 15008 through a tunnel) would
/// come back into ztunnel's own listener, which would accept and deliver it again, a loop.
/// Applications in the mesh cannot use these ports, as in Istio.
pub const OWN_PORTS: [u16; 6] = [
    15000,
    OUTBOUND_PORT,
    INBOUND_PLAINTEXT_PORT,
    HBONE_PORT,
    15020,
    15021,
];

// The capture program leaves exactly the HBONE port to the pod's own stack.
const _: () = assert!(ztunnel_ebpf_common::INBOUND_UNSTEERED_PORT == HBONE_PORT);

/// Why a connection for `dst` (a pod address and port) is not delivered, when `dst`'s port
/// is one of ztunnel's own: the reason names the port. The metric label is `own_port`.
pub fn own_port_refusal(dst: SocketAddr) -> Option<String> {
    OWN_PORTS.contains(&dst.port()).then(|| {
        format!(
            "{dst} is ztunnel's own port {}: never delivered (it would come back into ztunnel)",
            dst.port()
        )
    })
}

/// The `ztunnel_rejected_inputs_total` reason of [`own_port_refusal`].
pub const OWN_PORT: &str = "own_port";
/// Source address of ztunnel's deliveries to applications with `--inbound-source loopback`.
pub const DELIVERY_SOURCE: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 6);
/// Source address of deliveries to applications over IPv6 (the pod's loopback).
pub const DELIVERY_SOURCE_V6: std::net::Ipv6Addr = std::net::Ipv6Addr::LOCALHOST;

/// Timeouts of the data path, and where deliveries come from.
#[derive(Debug, Clone, Copy)]
pub struct ProxyOptions {
    pub handshake_timeout: std::time::Duration,
    pub connect_timeout: std::time::Duration,
    pub hbone_keepalive: std::time::Duration,
    /// A tunnel that has bytes to send and gets no flow-control window for this long is
    /// reset (`None`: never).
    pub hbone_stall_timeout: Option<std::time::Duration>,
    /// Test only: see `Config::test_fail_first_capture`.
    pub test_fail_first_capture: bool,
    pub inbound_source: InboundSource,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            handshake_timeout: std::time::Duration::from_secs(10),
            connect_timeout: std::time::Duration::from_secs(10),
            hbone_keepalive: std::time::Duration::from_secs(10),
            hbone_stall_timeout: Some(hbone::DEFAULT_STALL_TIMEOUT),
            test_fail_first_capture: false,
            inbound_source: InboundSource::Client,
        }
    }
}

/// An accepted connection in progress (see [`Proxy::busy`]).
#[derive(Debug)]
pub struct Busy(Arc<std::sync::atomic::AtomicU64>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A TLS configuration with the certificate it was built from (rebuilt when that rotates).
type Cached<T> = (Arc<WorkloadCert>, T);

/// Everything the per-connection tasks share.
pub struct Proxy {
    pub node: String,
    pub state: watch::Receiver<Arc<State>>,
    pub capture: Arc<Capture>,
    pub certs: CertManager,
    pub roots: TrustBundle,
    pub pool: hbone::Pool,
    pub pods: PodRegistry,
    pub stats: Arc<copy::Stats>,
    /// Listening sockets handed over by the process this one replaces (see
    /// [`Proxy::inherit`]).
    inherited: std::sync::OnceLock<crate::handoff::Inherited>,
    /// Set once the first complete configuration has been applied to the pods.
    pub synced: watch::Sender<bool>,
    busy: Arc<std::sync::atomic::AtomicU64>,
    /// Test only: fails each pod's first enrolment half-way.
    fail_first_capture: pods::FailFirstCapture,
    /// How long a peer may take to complete the TLS handshake on 15008 (slowloris bound).
    pub handshake_timeout: std::time::Duration,
    /// Bound on connecting anywhere (peers, applications, passthrough destinations).
    pub connect_timeout: std::time::Duration,
    /// PING interval on HBONE connections, inbound and pooled outbound; a peer silent for
    /// twice that is cut off.
    pub hbone_keepalive: std::time::Duration,
    /// Bound on a tunnel's wait for flow-control window with bytes to send, inbound and
    /// outbound (`None`: none).
    pub hbone_stall_timeout: Option<std::time::Duration>,
    /// Set when this process stops taking new work (replaced, or shutting down): HBONE
    /// connections get GOAWAY so peers open new streams elsewhere.
    pub draining: watch::Sender<bool>,
    /// Where deliveries to applications come from (`--inbound-source`).
    pub inbound_source: InboundSource,
    /// Live connections, their history, Istio's traffic metrics and the access log.
    pub tracker: Arc<tracker::Tracker>,
    client_tls: Mutex<HashMap<(Identity, Identity), Cached<hbone::ClientTls>>>,
    server_tls: Mutex<HashMap<Identity, Cached<Arc<rustls::ServerConfig>>>>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

pub use copy::Stats;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The source names the identity.
    #[error("no valid certificate: {source}")]
    Certificate {
        identity: Identity,
        source: crate::identity::ManagerError,
    },
    #[error("TLS configuration for {identity}: {source}")]
    Tls {
        identity: Identity,
        source: crate::tls::TlsError,
    },
}

impl Proxy {
    pub fn new(
        node: String,
        state: watch::Receiver<Arc<State>>,
        capture: Arc<Capture>,
        certs: CertManager,
        roots: TrustBundle,
        options: ProxyOptions,
    ) -> Arc<Proxy> {
        Arc::new(Proxy {
            node,
            state,
            capture,
            certs,
            roots,
            pool: hbone::Pool::new(hbone::PoolConfig {
                connect_timeout: options.connect_timeout,
                keepalive: Some(options.hbone_keepalive),
                stall_timeout: options.hbone_stall_timeout,
                ..hbone::PoolConfig::default()
            }),
            pods: PodRegistry::default(),
            stats: Arc::new(copy::Stats::default()),
            inherited: std::sync::OnceLock::new(),
            synced: watch::Sender::new(false),
            draining: watch::Sender::new(false),
            handshake_timeout: options.handshake_timeout,
            connect_timeout: options.connect_timeout,
            hbone_keepalive: options.hbone_keepalive,
            hbone_stall_timeout: options.hbone_stall_timeout,
            inbound_source: options.inbound_source,
            busy: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            fail_first_capture: pods::FailFirstCapture::new(options.test_fail_first_capture),
            tracker: Arc::new(tracker::Tracker::new(Arc::new(
                crate::metrics::Metrics::new(),
            ))),
            client_tls: Mutex::new(HashMap::new()),
            server_tls: Mutex::new(HashMap::new()),
        })
    }

    /// Takes the listening sockets a predecessor handed over (upgrade), for the pods'
    /// enrolments to use. Only the first call counts; call it before [`Proxy::run`].
    pub fn inherit(&self, sockets: crate::handoff::Inherited) {
        if self.inherited.set(sockets).is_err() {
            tracing::warn!("inherited sockets given twice; keeping the first ones");
        }
    }

    /// Keeps the set of enrolled pods in line with the state, until the state channel closes.
    /// Reconciles on every state change and, while some pod could not be enrolled, again
    /// after a backoff (1 s doubling to 30 s) without waiting for a change: a namespace that
    /// appears late or a transient capture error must not leave a pod out of the mesh.
    ///
    /// An incomplete state ([`State::incomplete`]: xDS before istiod's first full answer)
    /// changes nothing: no pod is enrolled or released, no stale capture entry pruned, since
    /// what it lacks may only not have arrived yet. Pruning on an empty view would empty the
    /// shared capture map in an upgrade and let the pods' traffic out of the mesh.
    pub async fn run(self: Arc<Self>) {
        let mut rx = self.state.clone();
        let mut retry = retry::EnrolRetry::default();
        loop {
            let state = rx.borrow_and_update().clone();
            if let Some(why) = state.incomplete() {
                tracing::debug!("pods and capture left as they are: {why}");
                if rx.changed().await.is_err() {
                    break;
                }
                continue;
            }
            let failed = pods::reconcile(&self, &state).await;
            if !*self.synced.borrow() {
                // Enrolments a crashed predecessor left in the pinned map, for pods that are
                // gone or no longer ours. Those of the pods still wanted stay, enrolled or
                // not yet: a predecessor's capture of a pod whose enrolment failed here
                // steers to the sockets it handed over (the retry serves them), and
                // removing it would let the pod's traffic out of the mesh, and leave the
                // replies to its deliveries without their route, until then.
                let mut keep = self.pods.cookies();
                keep.extend(failed.iter().filter_map(|f| f.netns));
                let pruned = self.capture.prune_enrolled(&keep);
                if pruned > 0 {
                    tracing::info!(pruned, "removed stale capture entries");
                }
                self.synced.send_replace(true);
            }
            let wait = retry.after(failed.iter().map(|f| f.workload.uid.clone()));
            if let Some(wait) = wait {
                for f in &failed {
                    let w = &f.workload;
                    tracing::warn!(workload = %w.name, namespace = %w.namespace(), retry_in = ?wait,
                        "cannot enroll pod: {}", f.reason);
                }
            }
            let changed = match wait {
                None => rx.changed().await,
                // Whichever comes first: a state change, or the time to try again.
                Some(wait) => tokio::time::timeout(wait, rx.changed())
                    .await
                    .unwrap_or(Ok(())),
            };
            if changed.is_err() {
                break;
            }
        }
    }

    /// Marks one accepted connection (or HBONE stream) as in progress until the guard is
    /// dropped: from accept to the end of its relay, so draining never cuts one that is still
    /// being set up.
    pub fn busy(&self) -> Busy {
        self.busy.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Busy(self.busy.clone())
    }

    /// `connect`, failed with `TimedOut` after the connect timeout.
    pub async fn connect_within<T>(
        &self,
        connect: impl std::future::Future<Output = std::io::Result<T>>,
    ) -> std::io::Result<T> {
        tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {:?}", self.connect_timeout),
                )
            })?
    }

    /// Connections and HBONE streams in progress right now.
    pub fn active_connections(&self) -> u64 {
        self.busy.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until no connection is being relayed, or `deadline` passes. Returns how many
    /// were still open at the end.
    pub async fn drain(&self, deadline: std::time::Duration) -> u64 {
        let until = tokio::time::Instant::now() + deadline;
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
        loop {
            let open = self.active_connections();
            if open == 0 || tokio::time::Instant::now() >= until {
                return open;
            }
            tick.tick().await;
        }
    }

    /// Drops what this node holds for `id`, an identity none of its pods has any more: the
    /// certificate (so it is neither served nor renewed) and the TLS configurations built from
    /// it. Pooled connections dialled with it take no new tunnel after its expiry, as always.
    fn forget_identity(&self, id: &Identity) {
        self.certs.forget(id);
        self.client_tls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(src, _), _| src != id);
        self.server_tls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        tracing::info!(identity = %id, "no pod of this node has this identity any more: its certificate is dropped and no longer renewed");
    }

    /// Client TLS for tunnels from `src` to a peer that must prove `dst`, cached while `src`'s
    /// certificate stays the same. It carries that certificate's expiry, which bounds the
    /// pooled connections dialled with it.
    async fn client_tls(
        &self,
        src: &Identity,
        dst: &Identity,
    ) -> Result<hbone::ClientTls, ProxyError> {
        let cert = self.certs.get(src).await.map_err(|source| {
            // Counted as the server side counts a tunnel it cannot accept for want of a
            // certificate (`inbound`): the application's connection is refused.
            self.tracker.metrics().reject("certificate");
            ProxyError::Certificate {
                identity: src.clone(),
                source,
            }
        })?;
        let key = (src.clone(), dst.clone());
        let mut cache = self.client_tls.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((cached_cert, config)) = cache.get(&key)
            && Arc::ptr_eq(cached_cert, &cert)
        {
            return Ok(config.clone());
        }
        let config = hbone::ClientTls::new(&cert, &self.roots, dst.clone()).map_err(|source| {
            ProxyError::Tls {
                identity: src.clone(),
                source,
            }
        })?;
        cache.insert(key, (cert, config.clone()));
        Ok(config)
    }

    /// Server TLS for `id`'s HBONE listener, cached while its certificate stays the same;
    /// with the certificate it presents (its expiry bounds the connections it accepts).
    async fn server_tls(
        &self,
        id: &Identity,
    ) -> Result<Cached<Arc<rustls::ServerConfig>>, ProxyError> {
        let cert = self
            .certs
            .get(id)
            .await
            .map_err(|source| ProxyError::Certificate {
                identity: id.clone(),
                source,
            })?;
        let mut cache = self.server_tls.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((cached_cert, config)) = cache.get(id)
            && Arc::ptr_eq(cached_cert, &cert)
        {
            return Ok((cert, config.clone()));
        }
        let config =
            crate::tls::server_config(&cert, &self.roots).map_err(|source| ProxyError::Tls {
                identity: id.clone(),
                source,
            })?;
        cache.insert(id.clone(), (cert.clone(), config.clone()));
        Ok((cert, config))
    }
}

/// The address ztunnel connects to an application at `dst` from: the client's, when the
/// mode keeps it and it is of `dst`'s family; otherwise the loopback address ztunnel uses
/// instead (127.0.0.6, or ::1).
pub fn delivery_source(mode: InboundSource, client: Option<IpAddr>, dst: SocketAddr) -> IpAddr {
    let loopback = if dst.is_ipv6() {
        IpAddr::V6(DELIVERY_SOURCE_V6)
    } else {
        IpAddr::V4(DELIVERY_SOURCE)
    };
    match (mode, client.map(|ip| ip.to_canonical())) {
        (InboundSource::Client, Some(ip))
            if ip.is_ipv6() == dst.is_ipv6() && !ip.is_unspecified() =>
        {
            ip
        }
        _ => loopback,
    }
}

/// The address ztunnel's HBONE listener has for a workload address.
fn hbone_addr(dst: SocketAddr) -> SocketAddr {
    SocketAddr::new(dst.ip(), HBONE_PORT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ztunnel_ports_are_refused_with_the_port_named() {
        for port in [15000, 15001, 15006, 15008, 15020, 15021] {
            let dst = SocketAddr::from(([10, 0, 0, 1], port));
            let reason = own_port_refusal(dst).unwrap_or_default();
            assert!(reason.contains(&format!("own port {port}")), "{reason}");
        }
        for port in [80, 8080, 15002, 15007, 15009, 15090] {
            assert_eq!(
                own_port_refusal(SocketAddr::from(([10, 0, 0, 1], port))),
                None
            );
        }
    }

    #[test]
    fn deliveries_keep_the_client_address_of_the_destination_family() {
        let dst4: SocketAddr = "198.19.2.10:8080".parse().unwrap();
        let dst6: SocketAddr = "[fd00:198:19:2::10]:8080".parse().unwrap();
        let c4: IpAddr = "198.19.1.10".parse().unwrap();
        let c6: IpAddr = "fd00:198:19:1::10".parse().unwrap();
        let client = InboundSource::Client;
        assert_eq!(delivery_source(client, Some(c4), dst4), c4);
        assert_eq!(delivery_source(client, Some(c6), dst6), c6);
        // An IPv4 client written as IPv4-mapped IPv6 is still an IPv4 client.
        let mapped: IpAddr = "::ffff:198.19.1.10".parse().unwrap();
        assert_eq!(delivery_source(client, Some(mapped), dst4), c4);
        // No address of the destination's family, or none at all: the loopback address.
        let lo4 = IpAddr::V4(DELIVERY_SOURCE);
        let lo6 = IpAddr::V6(DELIVERY_SOURCE_V6);
        assert_eq!(delivery_source(client, Some(c4), dst6), lo6);
        assert_eq!(delivery_source(client, Some(c6), dst4), lo4);
        assert_eq!(delivery_source(client, None, dst4), lo4);
        let any: IpAddr = "0.0.0.0".parse().unwrap();
        assert_eq!(delivery_source(client, Some(any), dst4), lo4);
        // Loopback mode ignores the client.
        let loopback = InboundSource::Loopback;
        assert_eq!(delivery_source(loopback, Some(c4), dst4), lo4);
        assert_eq!(delivery_source(loopback, Some(c6), dst6), lo6);
    }
}
