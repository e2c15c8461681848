//! Mutual TLS for HBONE: the trust bundle, and the rustls client and server configurations
//! that carry workload identities.
//!
//! Security decisions, in one place (DESIGN.md, "HBONE"):
//! - TLS 1.3 only, ALPN `h2`; cipher suites AES-256-GCM then AES-128-GCM; key exchange X25519
//!   with P-256 as fallback (the ring provider has no hybrid post-quantum group).
//! - Both sides present certificates. The server accepts any client whose chain verifies
//!   against the roots and whose SPIFFE ID is in our trust domain; the client accepts only a
//!   server whose SPIFFE ID is exactly the expected one. No SNI, no host names.
//! - Session resumption is off: a resumed session skips certificate verification, and the
//!   identity checks above must run on every connection.
//!
//! This module never decides *who may talk to whom* beyond those checks (authorization does).

mod verify;

use std::io;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::server::NoServerSessionStorage;
use rustls::{ClientConfig, CommonState, ServerConfig};

use crate::identity::Identity;
pub use crate::identity::TrustBundle;
use crate::identity::cert::{CertError, WorkloadCert, identity_from_cert, not_after_of};

/// The ALPN protocol HBONE negotiates.
pub const ALPN_H2: &[u8] = b"h2";

/// What went wrong setting up or completing mutual TLS.
#[derive(Debug, thiserror::Error, Clone)]
#[non_exhaustive]
pub enum TlsError {
    #[error("trust bundle: {0}")]
    BadBundle(String),
    #[error(transparent)]
    Bundle(#[from] crate::identity::BundleError),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("peer presented identity {presented}, expected {expected}")]
    WrongIdentity {
        presented: Box<Identity>,
        expected: Box<Identity>,
    },
    #[error("peer certificate from trust domain {presented}, expected {expected}")]
    WrongTrustDomain { presented: String, expected: String },
    #[error("no client certificate")]
    NoClientCertificate,
    #[error("no peer certificate")]
    NoPeerCertificate,
    #[error("peer certificate has no usable identity: {0}")]
    PeerIdentity(CertError),
    #[error("peer certificate unreadable: {0}")]
    PeerCertificate(CertError),
    #[error("TLS handshake failed: {0}")]
    Handshake(String),
}

/// The ring provider cut down to HBONE's suites and groups, in preference order.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring;
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
            ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        ],
        kx_groups: vec![ring::kx_group::X25519, ring::kx_group::SECP256R1],
        ..ring::default_provider()
    })
}

/// Server configuration for a workload's HBONE listener.
pub fn server_config(
    cert: &WorkloadCert,
    roots: &TrustBundle,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let verifier =
        verify::SpiffeClientVerifier::new(roots, provider.clone(), cert.identity.trust_domain())?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(cert.chain.clone(), cert.key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Client configuration for tunnels to a peer that must prove `expected_server`.
///
/// Connect with `ServerName::IpAddress` of the destination: it is neither sent (no SNI) nor
/// checked.
pub fn client_config(
    cert: &WorkloadCert,
    roots: &TrustBundle,
    expected_server: Identity,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = verify::SpiffeServerVerifier::new(roots, provider.clone(), expected_server);
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(cert.chain.clone(), cert.key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// The identity the peer of an established connection proved.
pub fn peer_identity(conn: &CommonState) -> Result<Identity, TlsError> {
    let leaf = conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or(TlsError::NoPeerCertificate)?;
    identity_from_cert(leaf).map_err(TlsError::PeerIdentity)
}

/// When the certificate the peer of an established connection presented expires: the
/// connection proves nothing about the peer after that.
pub fn peer_not_after(conn: &CommonState) -> Result<SystemTime, TlsError> {
    let leaf = conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or(TlsError::NoPeerCertificate)?;
    not_after_of(leaf).map_err(TlsError::PeerCertificate)
}

/// Turns the `io::Error` a tokio-rustls handshake (or the first read after it) returns into
/// the most specific `TlsError`, recovering the identity errors our verifiers raised.
pub fn handshake_error(err: &io::Error) -> TlsError {
    let Some(rustls_err) = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return TlsError::Handshake(err.to_string());
    };
    match rustls_err {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => other
            .0
            .downcast_ref::<TlsError>()
            .cloned()
            .unwrap_or_else(|| TlsError::Handshake(rustls_err.to_string())),
        rustls::Error::NoCertificatesPresented => TlsError::NoClientCertificate,
        other => TlsError::Handshake(other.to_string()),
    }
}

#[cfg(test)]
pub(crate) fn verify_chain_for_test(
    cert: &WorkloadCert,
    roots: &TrustBundle,
) -> Result<(), rustls::Error> {
    use rustls::client::danger::ServerCertVerifier as _;
    let verifier = verify::SpiffeServerVerifier::new(roots, provider(), cert.identity.clone());
    let leaf = cert.leaf().ok_or(rustls::Error::NoCertificatesPresented)?;
    verifier
        .verify_server_cert(
            leaf,
            &cert.chain[1..],
            &rustls_pki_types::ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into()),
            &[],
            rustls_pki_types::UnixTime::now(),
        )
        .map(|_| ())
}

#[cfg(test)]
pub(crate) mod tests;
