//! The outbound side: a pool of HTTP/2-over-mTLS connections, one CONNECT stream per tunnel.
//!
//! Connections are shared per `PoolKey` (source identity, peer address, peer identity), so a
//! connection opened with one workload's certificate is never used for another's traffic and
//! never reaches a peer that proved a different identity. A connection carries at most
//! `max_streams_per_conn` tunnels. Concurrent connects that find no room share the dial in
//! flight (see `pool_state`), up to `max_streams_per_conn` of them per dial: a burst opens
//! one connection per `max_streams_per_conn` tunnels, not one each, and against a peer that
//! never answers they all fail after one `connect_timeout`, not one after another.
//! Connections with no tunnel for `idle_timeout` are closed (GOAWAY).
//!
//! A connection takes new tunnels only while both certificates of its handshake (the one
//! this side presented, the peer's) are valid: at the first expiry it leaves the pool, and h2
//! closes it once its last tunnel ends; the next tunnel dials anew with the certificates in
//! force. With `keepalive` set, each connection is PINGed that often, and one whose peer
//! leaves a PING unanswered for twice that (gone, or stopped reading) is dropped at once with
//! its tunnels, rather than noticed only when a CONNECT on it times out.
//!
//! The caller supplies the TCP connect (it creates the socket inside the pod's network
//! namespace, with the mark that keeps it out of capture) and the TLS configuration.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use h2::client::SendRequest;
use http::StatusCode;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use super::lifetime::{keepalive, wall_clock_reaches};
use super::pool_state::{KeyState, Step};
use super::request::{ConnectHeaders, build_connect};
use super::stream::{H2Stream, OnDrop};
use super::{CONNECTION_WINDOW, HboneError, MAX_FRAME_SIZE, STREAM_WINDOW, tls_io};
use crate::identity::{Identity, WorkloadCert};
use crate::time::rfc3339;
use crate::tls::{TlsError, TrustBundle};

/// Which connections may be shared.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src: Identity,
    /// The workload address the connection is dialled from, when the dial keeps it. Each
    /// workload gets its own connections even where several share an identity: the peer
    /// authorizes and delivers on the address it sees, which must be the caller's.
    pub src_addr: Option<IpAddr>,
    /// The peer's HBONE address (`ip:15008`).
    pub dst: SocketAddr,
    pub dst_identity: Identity,
}

/// Pool limits; defaults are Istio's.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub max_streams_per_conn: usize,
    pub idle_timeout: Duration,
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    /// Bound on opening a connection (TCP, TLS, HTTP/2) and on waiting for a CONNECT's
    /// answer: a peer that stopped answering (dead node, lossy link) fails the tunnel
    /// instead of hanging it, and a pooled connection that timed out is dropped.
    pub connect_timeout: Duration,
    /// A PING is sent on each connection this often, and a peer that leaves one unanswered
    /// for twice that is taken for gone or stalled: the connection is dropped with its
    /// tunnels. `None`: never.
    pub keepalive: Option<Duration>,
    /// A tunnel with bytes waiting to be sent that the peer grants no flow-control window for
    /// this long (a peer that answers PINGs but never reads) is reset. `None`: never.
    pub stall_timeout: Option<Duration>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_streams_per_conn: 100,
            idle_timeout: Duration::from_secs(300),
            stream_window: STREAM_WINDOW,
            connection_window: CONNECTION_WINDOW,
            max_frame_size: MAX_FRAME_SIZE,
            connect_timeout: Duration::from_secs(10),
            keepalive: Some(Duration::from_secs(10)),
            stall_timeout: Some(super::DEFAULT_STALL_TIMEOUT),
        }
    }
}

/// What the pool dials with: the TLS client configuration, and when the certificate it
/// presents expires (connections made with it take new tunnels until then at most).
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub config: Arc<ClientConfig>,
    /// `not_after` of the certificate `config` presents.
    pub not_after: SystemTime,
}

impl ClientTls {
    /// Presents `cert`, to a peer that must prove `expected_server`.
    pub fn new(
        cert: &WorkloadCert,
        roots: &TrustBundle,
        expected_server: Identity,
    ) -> Result<ClientTls, TlsError> {
        Ok(ClientTls {
            config: crate::tls::client_config(cert, roots, expected_server)?,
            not_after: cert.not_after,
        })
    }
}

/// Connections taken out of the pool before their end, by cause, since the pool was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// A certificate of the handshake expired (the connection's tunnels ran on).
    pub certificate_expired: u64,
    /// The peer left a PING unanswered (the connection was dropped with its tunnels).
    pub keepalive_timeout: u64,
}

/// How a dial ended, as its waiters see it: `None` while it is in flight.
type DialOutcome = Option<Result<SendRequest<Bytes>, Arc<HboneError>>>;

/// One key's connections and dials in flight.
type KeyEntry = KeyState<SendRequest<Bytes>, watch::Receiver<DialOutcome>>;

/// A stream slot taken for one connect, and what to do with it.
enum Slot {
    /// On a pooled connection.
    Pooled {
        id: u64,
        send: SendRequest<Bytes>,
        slot: OnDrop,
    },
    /// Among the waiters of a dial in flight.
    Waiting {
        id: u64,
        outcome: watch::Receiver<DialOutcome>,
        slot: OnDrop,
    },
    /// As the dialer: its waiters learn the outcome through `done`.
    Dialing {
        id: u64,
        done: watch::Sender<DialOutcome>,
        slot: OnDrop,
    },
}

struct PoolInner {
    config: PoolConfig,
    keys: Mutex<HashMap<PoolKey, KeyEntry>>,
    next_id: AtomicU64,
    expired: AtomicU64,
    keepalive_timeouts: AtomicU64,
}

/// The outbound connection pool. Cheap to clone.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

impl Pool {
    pub fn new(config: PoolConfig) -> Self {
        Pool {
            inner: Arc::new(PoolInner {
                config,
                keys: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
                expired: AtomicU64::new(0),
                keepalive_timeouts: AtomicU64::new(0),
            }),
        }
    }

    /// Opens a tunnel to `authority` (the original destination) through the peer in `key`,
    /// reusing a pooled connection when one has a free stream slot.
    ///
    /// `tcp_connect` is called only when a new connection is needed (twice at most, when
    /// the first one's peer turns the stream away); `tls` must verify the peer as
    /// `key.dst_identity` and present `key.src`'s certificate.
    pub async fn connect<F, Fut>(
        &self,
        key: PoolKey,
        authority: SocketAddr,
        headers: &ConnectHeaders,
        tcp_connect: F,
        tls: ClientTls,
    ) -> Result<H2Stream, HboneError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = io::Result<TcpStream>>,
    {
        // A pooled connection that fails before answering (the peer sent GOAWAY because it
        // is being replaced, or the connection died unnoticed) reached nothing yet: it is
        // dropped, and the connect tries once more, on another connection or a new one. So
        // is a new connection whose peer turned the stream away unprocessed (GOAWAY or
        // REFUSED_STREAM): a ztunnel handing over to its successor drains the connections
        // it accepted last, before their first stream.
        let mut retried = false;
        loop {
            let (id, send, slot, fresh) = match self.take_slot(&key) {
                Slot::Pooled { id, send, slot } => (id, send, slot, false),
                Slot::Waiting {
                    id,
                    mut outcome,
                    slot,
                } => {
                    let outcome = outcome.wait_for(Option::is_some).await.map(|o| o.clone());
                    match outcome {
                        Ok(Some(Ok(send))) => (id, send, slot, true),
                        Ok(Some(Err(error))) => return Err(HboneError::Shared(error)),
                        // The dialer went away before the end (its task was cancelled):
                        // its dial is forgotten, and this connect decides again.
                        Ok(None) | Err(_) => {
                            drop(slot);
                            self.inner.abandon_dial(&key, id);
                            continue;
                        }
                    }
                }
                Slot::Dialing { id, done, slot } => {
                    let (send, slot) = self
                        .dial_for_all(&key, id, done, slot, &tcp_connect, tls.clone())
                        .await?;
                    (id, send, slot, true)
                }
            };
            match self.open_stream(&key, send, slot, authority, headers).await {
                Err(Attempt::Unanswered(error))
                    if !retried && (!fresh || error.is_unprocessed()) =>
                {
                    tracing::debug!(peer = %key.dst, %error,
                        "HBONE connection unusable before answering; trying anew");
                    self.inner.remove(&key, id);
                    retried = true;
                }
                result => return result.map_err(Attempt::into_error),
            }
        }
    }

    /// Dials for `key` as dial `id`, within the connect timeout, and tells the dial's
    /// waiters how it ended (`done`). On success the connection enters the pool with a slot
    /// taken for each waiter; `slot` is the dialer's own.
    async fn dial_for_all<F, Fut>(
        &self,
        key: &PoolKey,
        id: u64,
        done: watch::Sender<DialOutcome>,
        slot: OnDrop,
        tcp_connect: F,
        tls: ClientTls,
    ) -> Result<(SendRequest<Bytes>, OnDrop), HboneError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = io::Result<TcpStream>>,
    {
        let timeout = self.inner.config.connect_timeout;
        let dialed = tokio::time::timeout(timeout, self.dial(key, id, tcp_connect, tls))
            .await
            .unwrap_or(Err(HboneError::Timeout {
                addr: key.dst,
                after: timeout,
            }));
        let mut keys = self.inner.lock();
        let entry = keys.entry(key.clone()).or_default();
        match dialed {
            Ok((send, expires)) => {
                entry.dial_succeeded(id, send.clone(), expires, Instant::now());
                drop(keys);
                done.send_replace(Some(Ok(send.clone())));
                Ok((send, slot))
            }
            Err(error) => {
                let waiters = entry.end_dial(id).unwrap_or(0);
                if entry.is_unused() {
                    keys.remove(key);
                }
                drop(keys);
                drop(slot);
                if waiters <= 1 {
                    // Nobody else to tell: the dialer keeps the error as it is.
                    return Err(error);
                }
                tracing::debug!(peer = %key.dst, waiters, %error, "shared HBONE dial failed");
                let error = Arc::new(error);
                done.send_replace(Some(Err(error.clone())));
                Err(HboneError::Shared(error))
            }
        }
    }

    /// Sends the CONNECT on `send` and waits for the answer.
    async fn open_stream(
        &self,
        key: &PoolKey,
        send: SendRequest<Bytes>,
        slot: OnDrop,
        authority: SocketAddr,
        headers: &ConnectHeaders,
    ) -> Result<H2Stream, Attempt> {
        let request = build_connect(authority, headers)
            .map_err(|e| Attempt::Answered(HboneError::from(e)))?;
        let addr = key.dst;
        let unanswered = |e| Attempt::Unanswered(HboneError::from_h2(addr, e));
        let timeout = self.inner.config.connect_timeout;
        let answer = async {
            let mut send = send.ready().await.map_err(unanswered)?;
            let (response, stream) = send.send_request(request, false).map_err(unanswered)?;
            let response = response.await.map_err(unanswered)?;
            Ok::<_, Attempt>((response, stream))
        };
        let (response, stream) = tokio::time::timeout(timeout, answer).await.map_err(|_| {
            Attempt::Unanswered(HboneError::Timeout {
                addr,
                after: timeout,
            })
        })??;
        match response.status() {
            StatusCode::OK => Ok(H2Stream::new(
                stream,
                response.into_body(),
                Some(slot),
                self.inner.config.stall_timeout,
            )),
            StatusCode::UNAUTHORIZED => Err(Attempt::Answered(HboneError::Denied)),
            other => Err(Attempt::Answered(HboneError::Status(other))),
        }
    }

    /// How many connections are pooled for `key` (for tests, metrics and the admin page).
    pub fn connection_count(&self, key: &PoolKey) -> usize {
        self.inner.lock().get(key).map_or(0, |e| e.conns.len())
    }

    /// How many connections are pooled, over all keys.
    pub fn total_connections(&self) -> usize {
        self.inner.lock().values().map(|e| e.conns.len()).sum()
    }

    /// Connections taken out of the pool before their end, by cause (for metrics).
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            certificate_expired: self.inner.expired.load(Ordering::Relaxed),
            keepalive_timeout: self.inner.keepalive_timeouts.load(Ordering::Relaxed),
        }
    }

    /// Takes a stream slot for one connect on `key` (see `pool_state`). Connections whose
    /// certificates have expired are never used: they leave the pool here.
    fn take_slot(&self, key: &PoolKey) -> Slot {
        let max = self.inner.config.max_streams_per_conn;
        let mut keys = self.inner.lock();
        let entry = keys.entry(key.clone()).or_default();
        self.inner.drop_expired(key, entry, SystemTime::now());
        match entry.take(max) {
            Step::Use { id, handle } => Slot::Pooled {
                id,
                send: handle,
                slot: self.slot_guard(key, id),
            },
            Step::Join { id, outcome } => Slot::Waiting {
                id,
                outcome,
                slot: self.slot_guard(key, id),
            },
            Step::Dial => {
                let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
                let (done, outcome) = watch::channel(None);
                entry.start_dial(id, outcome);
                Slot::Dialing {
                    id,
                    done,
                    slot: self.slot_guard(key, id),
                }
            }
        }
    }

    /// Gives the slot taken under `conn_id` back when dropped.
    fn slot_guard(&self, key: &PoolKey, conn_id: u64) -> OnDrop {
        let pool = Arc::downgrade(&self.inner);
        let key = key.clone();
        OnDrop::new(move || {
            if let Some(pool) = pool.upgrade()
                && let Some(entry) = pool.lock().get_mut(&key)
            {
                entry.release(conn_id, Instant::now());
            }
        })
    }

    /// Opens connection `id` (TCP, TLS, HTTP/2) and starts driving it; returns its handle
    /// and when its certificates stop vouching for it.
    async fn dial<F, Fut>(
        &self,
        key: &PoolKey,
        id: u64,
        tcp_connect: F,
        tls: ClientTls,
    ) -> Result<(SendRequest<Bytes>, SystemTime), HboneError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = io::Result<TcpStream>>,
    {
        let addr = key.dst;
        let tcp = tcp_connect()
            .await
            .map_err(|source| HboneError::Connect { addr, source })?;
        tcp.set_nodelay(true)
            .map_err(|source| HboneError::Connect { addr, source })?;
        // The name is neither sent (no SNI) nor checked: the verifier checks the identity.
        let name = ServerName::IpAddress(addr.ip().into());
        let mut tls_stream = TlsConnector::from(tls.config)
            .connect(name, tls_io(tcp))
            .await
            .map_err(|e| HboneError::Tls {
                addr,
                source: crate::tls::handshake_error(&e),
            })?;
        tls_stream
            .get_mut()
            .1
            .set_buffer_limit(Some(super::TLS_SEND_BUFFER));
        let peer_not_after = crate::tls::peer_not_after(tls_stream.get_ref().1)
            .map_err(|source| HboneError::Tls { addr, source })?;
        let expires = tls.not_after.min(peer_not_after);
        let config = &self.inner.config;
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(config.stream_window)
            .initial_connection_window_size(config.connection_window)
            .max_frame_size(config.max_frame_size)
            .enable_push(false)
            .handshake::<_, Bytes>(tls_stream)
            .await
            .map_err(|e| HboneError::from_h2(addr, e))?;
        tokio::spawn(drive(
            Arc::downgrade(&self.inner),
            key.clone(),
            id,
            expires,
            connection,
        ));
        Ok((send, expires))
    }
}

/// How an attempt to open a stream ended, when it did not give a tunnel.
enum Attempt {
    /// The connection failed before the peer answered: safe to retry elsewhere.
    Unanswered(HboneError),
    /// The peer answered (a refusal), or the request could not be built.
    Answered(HboneError),
}

impl Attempt {
    fn into_error(self) -> HboneError {
        match self {
            Attempt::Unanswered(e) | Attempt::Answered(e) => e,
        }
    }
}

impl PoolInner {
    fn lock(&self) -> MutexGuard<'_, HashMap<PoolKey, KeyEntry>> {
        // Every update under this lock is a single assignment or push: still consistent
        // after a panic elsewhere.
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops a connection from the pool; with its `SendRequest` gone, h2 closes it once its
    /// last stream ends.
    fn remove(&self, key: &PoolKey, id: u64) {
        let mut keys = self.lock();
        if let Some(entry) = keys.get_mut(key) {
            entry.remove_conn(id);
            if entry.is_unused() {
                keys.remove(key);
            }
        }
    }

    /// Forgets dial `id`, whose dialer went away without an outcome.
    fn abandon_dial(&self, key: &PoolKey, id: u64) {
        let mut keys = self.lock();
        if let Some(entry) = keys.get_mut(key) {
            entry.end_dial(id);
            if entry.is_unused() {
                keys.remove(key);
            }
        }
    }

    /// Takes the connections whose certificates have expired by `now` out of `key`'s
    /// `entry`: they take no new tunnel, and the ones they carry run on.
    fn drop_expired(&self, key: &PoolKey, entry: &mut KeyEntry, now: SystemTime) {
        entry.conns.retain(|c| {
            let valid = now < c.expires;
            if !valid {
                self.expired.fetch_add(1, Ordering::Relaxed);
                tracing::info!(peer = %key.dst, identity = %key.dst_identity, src = %key.src,
                    expired_at = %rfc3339(c.expires), tunnels = c.active,
                    "certificate of a pooled HBONE connection expired: new tunnels go to a new connection");
            }
            valid
        });
    }

    /// Whether connection `id` has been idle for the whole timeout; if so it is removed.
    /// Otherwise returns when to look again.
    fn reap_if_idle(&self, key: &PoolKey, id: u64) -> Option<Instant> {
        let timeout = self.config.idle_timeout;
        let next = {
            let mut keys = self.lock();
            let conn = keys.get_mut(key)?.conn_mut(id)?;
            if conn.active > 0 {
                Instant::now() + timeout
            } else if conn.idle_since + timeout <= Instant::now() {
                drop(keys);
                self.remove(key, id);
                return None;
            } else {
                conn.idle_since + timeout
            }
        };
        Some(next)
    }
}

/// Drives one connection's I/O, closes it when idle, takes it out of the pool when its
/// certificates expire, drops it when the peer stops answering PINGs, and forgets it when it
/// ends.
async fn drive<T>(
    pool: Weak<PoolInner>,
    key: PoolKey,
    id: u64,
    expires: SystemTime,
    mut connection: h2::client::Connection<T, Bytes>,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Some((timeout, interval)) = pool
        .upgrade()
        .map(|p| (p.config.idle_timeout, p.config.keepalive))
    else {
        return;
    };
    let mut keepalive = std::pin::pin!(keepalive(connection.ping_pong(), interval));
    let mut expiry = std::pin::pin!(wall_clock_reaches(expires));
    let mut connection = std::pin::pin!(connection);
    let mut check_at = Instant::now() + timeout;
    let mut reaped = false;
    let mut expired = false;
    loop {
        tokio::select! {
            result = &mut connection => {
                if let Err(error) = result {
                    tracing::debug!(peer = %key.dst, %error, "HBONE connection ended");
                }
                break;
            }
            _ = tokio::time::sleep_until(check_at), if !reaped => {
                let Some(inner) = pool.upgrade() else { break };
                match inner.reap_if_idle(&key, id) {
                    Some(next) => check_at = next,
                    None => reaped = true,
                }
            }
            () = &mut expiry, if !expired => {
                // `reserve` would do the same on the next tunnel; done here as well so that
                // an idle expired connection closes now and the pool's size is true.
                expired = true;
                let Some(inner) = pool.upgrade() else { break };
                let mut keys = inner.lock();
                if let Some(entry) = keys.get_mut(&key) {
                    inner.drop_expired(&key, entry, SystemTime::now());
                }
            }
            unanswered = &mut keepalive => {
                if let Some(inner) = pool.upgrade() {
                    inner.keepalive_timeouts.fetch_add(1, Ordering::Relaxed);
                    inner.remove(&key, id);
                }
                tracing::warn!(peer = %key.dst, identity = %key.dst_identity, src = %key.src,
                    "HBONE peer left a PING unanswered for {unanswered:?}: connection dropped \
                    with its tunnels");
                // Returning drops the connection: the socket closes and its streams fail.
                return;
            }
        }
    }
    if let Some(inner) = pool.upgrade() {
        inner.remove(&key, id);
    }
}
