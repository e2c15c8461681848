//! How ztunnel reaches istiod (xDS and CA): the gRPC channel, TLS with a configured root, and
//! the headers istiod authenticates a node agent by (`authorization: Bearer <token>` from a
//! projected service-account token file, and `clusterid`). Shared by `source::xds` and
//! `identity::istio_ca`; it never decides what to ask.

use std::path::PathBuf;
use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a gRPC channel or request could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GrpcError {
    #[error("address {address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error("root certificate {path}: {source}")]
    RootCert {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("token file {path}: {reason}")]
    Token { path: PathBuf, reason: String },
    #[error("cluster id {0:?} is not a valid header value")]
    ClusterId(String),
    #[error("connecting to {address}: {source}")]
    Connect {
        address: String,
        source: tonic::transport::Error,
    },
}

/// A gRPC server of the control plane and how to authenticate to it.
#[derive(Debug, Clone)]
pub struct GrpcTarget {
    /// `https://host:port` (TLS, verified against `root_cert`) or `http://host:port`
    /// (plaintext: tests, or a local control plane).
    pub address: String,
    /// PEM root certificate(s) the server's certificate must chain to.
    pub root_cert: Option<PathBuf>,
    /// File holding a bearer token (re-read for every request: Kubernetes rotates it).
    pub token_file: Option<PathBuf>,
    /// Sent as the `clusterid` header with the token, as Istio's agents do.
    pub cluster_id: String,
}

impl GrpcTarget {
    fn endpoint(&self) -> Result<Endpoint, GrpcError> {
        let bad = |reason: String| GrpcError::Address {
            address: self.address.clone(),
            reason,
        };
        let endpoint = Endpoint::from_shared(self.address.clone())
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        let uri = endpoint.uri();
        match uri.scheme_str() {
            Some("http") => Ok(endpoint),
            Some("https") => {
                let mut tls = ClientTlsConfig::new();
                if let Some(path) = &self.root_cert {
                    let pem = std::fs::read(path).map_err(|source| GrpcError::RootCert {
                        path: path.clone(),
                        source,
                    })?;
                    tls = tls.ca_certificate(Certificate::from_pem(pem));
                }
                endpoint.tls_config(tls).map_err(|e| bad(e.to_string()))
            }
            _ => Err(bad("expected http://host:port or https://host:port".into())),
        }
    }

    /// A channel that connects now; the error says why it could not.
    pub async fn connect(&self) -> Result<Channel, GrpcError> {
        self.endpoint()?
            .connect()
            .await
            .map_err(|source| GrpcError::Connect {
                address: self.address.clone(),
                source,
            })
    }

    /// A channel that connects on first use and reconnects by itself. Must be called inside
    /// a tokio runtime.
    pub fn connect_lazy(&self) -> Result<Channel, GrpcError> {
        Ok(self.endpoint()?.connect_lazy())
    }

    /// Adds the authentication headers to `req` (nothing without a token file).
    pub fn authorize<T>(&self, req: &mut tonic::Request<T>) -> Result<(), GrpcError> {
        let Some(path) = &self.token_file else {
            return Ok(());
        };
        let token_err = |reason: String| GrpcError::Token {
            path: path.clone(),
            reason,
        };
        let token = std::fs::read_to_string(path).map_err(|e| token_err(e.to_string()))?;
        let token = token.trim();
        if token.is_empty() {
            return Err(token_err("the file is empty".into()));
        }
        let bearer: MetadataValue<_> = format!("Bearer {token}")
            .parse()
            .map_err(|_| token_err("the token is not a valid header value".into()))?;
        let cluster: MetadataValue<_> = self
            .cluster_id
            .parse()
            .map_err(|_| GrpcError::ClusterId(self.cluster_id.clone()))?;
        req.metadata_mut().insert("authorization", bearer);
        req.metadata_mut().insert("clusterid", cluster);
        Ok(())
    }
}
