//! Certificate verifiers for HBONE: standard WebPKI chain checks (signature, validity time,
//! key usage) against the mesh roots, plus the SPIFFE identity checks that host-name
//! verification would do on the web.
//!
//! Host names play no part: HBONE sends no SNI and certificates carry no DNS SAN, so the
//! `ServerName` rustls passes in is ignored on purpose.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::server::ParsedCertificate;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::{TlsError, TrustBundle};
use crate::identity::Identity;
use crate::identity::cert::identity_from_cert;

/// Wraps one of our errors so rustls carries it (and sends a `bad_certificate` alert);
/// `super::handshake_error` unwraps it again for the caller.
fn reject(err: TlsError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(err))))
}

fn peer_id(end_entity: &CertificateDer<'_>) -> Result<Identity, rustls::Error> {
    identity_from_cert(end_entity).map_err(|e| reject(TlsError::PeerIdentity(e)))
}

/// Server side: a client certificate is mandatory, must chain to the roots, and must name a
/// SPIFFE identity in our trust domain. Which identities may do what is authorization's
/// business, not this verifier's.
#[derive(Debug)]
pub(super) struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl SpiffeClientVerifier {
    pub(super) fn new(
        roots: &TrustBundle,
        provider: Arc<CryptoProvider>,
        trust_domain: &str,
    ) -> Result<Self, TlsError> {
        let inner =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.store(), provider)
                .build()
                .map_err(|e| TlsError::BadBundle(e.to_string()))?;
        Ok(SpiffeClientVerifier {
            inner,
            trust_domain: trust_domain.to_owned(),
        })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = peer_id(end_entity)?;
        if id.trust_domain() != self.trust_domain {
            return Err(reject(TlsError::WrongTrustDomain {
                presented: id.trust_domain().to_owned(),
                expected: self.trust_domain.clone(),
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client side: the server certificate must chain to the roots and carry exactly the
/// identity the destination is expected to have.
#[derive(Debug)]
pub(super) struct SpiffeServerVerifier {
    roots: TrustBundle,
    provider: Arc<CryptoProvider>,
    expected: Identity,
}

impl SpiffeServerVerifier {
    pub(super) fn new(
        roots: &TrustBundle,
        provider: Arc<CryptoProvider>,
        expected: Identity,
    ) -> Self {
        SpiffeServerVerifier {
            roots: roots.clone(),
            provider,
            expected,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots.store(),
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let id = peer_id(end_entity)?;
        if id != self.expected {
            return Err(reject(TlsError::WrongIdentity {
                presented: Box::new(id),
                expected: Box::new(self.expected.clone()),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
