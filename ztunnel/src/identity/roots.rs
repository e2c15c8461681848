//! The root certificates a workload trusts: read once from PEM (a file, the CA's answer) or
//! made in-process by the local CA. TLS builds its verifiers from them; this module does not
//! depend on TLS.

use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;

/// Why a PEM text is not a usable trust bundle.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    #[error("trust bundle: invalid PEM: {0}")]
    Pem(String),
    #[error("trust bundle: no CERTIFICATE block in PEM")]
    Empty,
    #[error("trust bundle: unusable root certificate: {0}")]
    Unusable(String),
}

/// The root certificates a workload trusts.
#[derive(Clone, Debug)]
pub struct TrustBundle {
    ders: Vec<CertificateDer<'static>>,
    store: Arc<RootCertStore>,
}

impl TrustBundle {
    /// Reads every `CERTIFICATE` block of a PEM text; at least one is required.
    pub fn from_pem(pem: &str) -> Result<Self, BundleError> {
        let ders = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BundleError::Pem(e.to_string()))?;
        if ders.is_empty() {
            return Err(BundleError::Empty);
        }
        let mut store = RootCertStore::empty();
        for der in &ders {
            store
                .add(der.clone())
                .map_err(|e| BundleError::Unusable(e.to_string()))?;
        }
        Ok(TrustBundle {
            ders,
            store: Arc::new(store),
        })
    }

    /// Builds a bundle from DER roots produced in-process; a root that cannot be used as a
    /// trust anchor is skipped (the CA that made it already parsed it).
    pub fn from_ders(ders: Vec<CertificateDer<'static>>) -> Self {
        let mut store = RootCertStore::empty();
        let (_added, _ignored) = store.add_parsable_certificates(ders.iter().cloned());
        TrustBundle {
            ders,
            store: Arc::new(store),
        }
    }

    pub fn certificates(&self) -> &[CertificateDer<'static>] {
        &self.ders
    }

    /// The roots as rustls' store, for building verifiers.
    pub fn store(&self) -> Arc<RootCertStore> {
        self.store.clone()
    }
}
