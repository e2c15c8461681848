//! Opens HBONE tunnels to endpoints: mTLS as the waypoint's identity, the endpoint's own
//! identity required of the peer, through ztunnel's connection pool (one HTTP/2 connection
//! carries many tunnels to the same node).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use ztunnel::hbone::{ClientTls, ConnectHeaders, H2Stream, HboneError, Pool, PoolKey};
use ztunnel::identity::{CertManager, Identity, WorkloadCert};
use ztunnel::tls::TrustBundle;

use super::Endpoint;

/// Why no tunnel to an endpoint could be opened.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("no certificate for the waypoint's identity: {0}")]
    Certificate(String),
    #[error("TLS configuration for {peer}: {source}")]
    Tls {
        peer: Identity,
        source: ztunnel::tls::TlsError,
    },
    #[error(
        "endpoint {0} runs as the waypoint's own identity: a waypoint is never a destination (it would dial itself again and again)"
    )]
    Itself(SocketAddr),
    #[error(transparent)]
    Hbone(#[from] HboneError),
}

/// Client TLS per peer identity, rebuilt when the waypoint's certificate is renewed.
type TlsCache = HashMap<Identity, (Arc<WorkloadCert>, ClientTls)>;

/// Dials tunnels for the waypoint. Cheap to clone.
#[derive(Clone)]
pub struct Dialer {
    inner: Arc<Inner>,
}

struct Inner {
    identity: Identity,
    certs: CertManager,
    roots: TrustBundle,
    pool: Pool,
    tls: Mutex<TlsCache>,
    headers: ConnectHeaders,
}

impl Dialer {
    pub fn new(identity: Identity, certs: CertManager, roots: TrustBundle, pool: Pool) -> Dialer {
        Dialer {
            inner: Arc::new(Inner {
                identity,
                certs,
                roots,
                pool,
                tls: Mutex::new(HashMap::new()),
                headers: ConnectHeaders::default(),
            }),
        }
    }

    pub fn identity(&self) -> &Identity {
        &self.inner.identity
    }

    /// A tunnel to `ep` (its HBONE port on its address).
    pub async fn tunnel(&self, ep: &Endpoint) -> Result<H2Stream, DialError> {
        if ep.identity() == &self.inner.identity {
            return Err(DialError::Itself(ep.addr));
        }
        let tls = self.client_tls(ep.identity()).await?;
        let peer = SocketAddr::new(ep.addr.ip(), ztunnel::hbone::HBONE_PORT);
        let key = PoolKey {
            src: self.inner.identity.clone(),
            src_addr: None,
            dst: peer,
            dst_identity: ep.identity().clone(),
        };
        let connect = move || async move {
            let tcp = tokio::net::TcpStream::connect(peer).await?;
            tcp.set_nodelay(true)?;
            Ok(tcp)
        };
        Ok(self
            .inner
            .pool
            .connect(key, ep.addr, &self.inner.headers, connect, tls)
            .await?)
    }

    async fn client_tls(&self, peer: &Identity) -> Result<ClientTls, DialError> {
        let cert = self
            .inner
            .certs
            .get(&self.inner.identity)
            .await
            .map_err(|e| DialError::Certificate(e.to_string()))?;
        let mut cache = self.inner.tls.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((held, tls)) = cache.get(peer)
            && Arc::ptr_eq(held, &cert)
        {
            return Ok(tls.clone());
        }
        let tls = ClientTls::new(&cert, &self.inner.roots, peer.clone()).map_err(|source| {
            DialError::Tls {
                peer: peer.clone(),
                source,
            }
        })?;
        cache.insert(peer.clone(), (cert, tls.clone()));
        Ok(tls)
    }
}
