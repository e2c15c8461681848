//! A workload certificate: the chain and key that prove one `Identity`, and the facts about it
//! that rotation and the admin endpoint need (validity window, serial).
//!
//! This module only reads certificates; it never signs them (see `ca`) and never decides when
//! to fetch them (see `manager`).

use std::fmt;
use std::time::{Duration, SystemTime};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::extensions::GeneralName;

use super::{Identity, IdentityError};

/// Why a certificate could not be read as a workload certificate.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CertError {
    #[error("certificate is not valid DER X.509: {0}")]
    Parse(String),
    #[error("certificate has no SPIFFE URI SAN")]
    NoSpiffeSan,
    #[error("certificate has {0} SPIFFE URI SANs, expected exactly one")]
    ManySpiffeSans(usize),
    #[error("certificate SAN is not an Istio identity: {0}")]
    BadIdentity(#[from] IdentityError),
    #[error("workload certificate chain is empty")]
    EmptyChain,
}

/// A certificate and private key proving `identity`.
///
/// The key is kept as PKCS#8 bytes so the whole value is `Clone`; `Debug` never prints it.
#[derive(Clone)]
pub struct WorkloadCert {
    pub identity: Identity,
    /// Leaf first, then intermediates (the root is not included).
    pub chain: Vec<CertificateDer<'static>>,
    key_pkcs8: Vec<u8>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Serial number of the leaf, lower-case hex without separators.
    pub serial: String,
}

impl WorkloadCert {
    /// Builds a workload certificate from a chain (leaf first) and its PKCS#8 key, reading
    /// the identity, validity and serial from the leaf.
    pub fn from_parts(
        chain: Vec<CertificateDer<'static>>,
        key_pkcs8: Vec<u8>,
    ) -> Result<Self, CertError> {
        let leaf = chain.first().ok_or(CertError::EmptyChain)?;
        let facts = LeafFacts::read(leaf)?;
        Ok(WorkloadCert {
            identity: facts.identity,
            chain,
            key_pkcs8,
            not_before: facts.not_before,
            not_after: facts.not_after,
            serial: facts.serial,
        })
    }

    /// Assembles a certificate from already-known facts, without parsing the chain.
    /// Meant for certificate sources that know what they issued, and for tests.
    pub fn from_known(
        identity: Identity,
        chain: Vec<CertificateDer<'static>>,
        key_pkcs8: Vec<u8>,
        not_before: SystemTime,
        not_after: SystemTime,
        serial: String,
    ) -> Self {
        WorkloadCert {
            identity,
            chain,
            key_pkcs8,
            not_before,
            not_after,
            serial,
        }
    }

    /// The private key, in the form rustls takes.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.clone()))
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> Option<&CertificateDer<'static>> {
        self.chain.first()
    }

    /// True once `now` is at or past the end of the validity window.
    pub fn expired_at(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }

    /// When a replacement should be fetched: half-way through the lifetime, as Istio does,
    /// so a failed refresh still leaves half the lifetime for retries.
    pub fn refresh_at(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO);
        self.not_before + lifetime / 2
    }

    /// True once the certificate is half-way through its lifetime.
    pub fn refresh_due(&self, now: SystemTime) -> bool {
        now >= self.refresh_at()
    }
}

impl fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity.to_string())
            .field("serial", &self.serial)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// Reads the one SPIFFE identity in a certificate's URI SANs.
pub fn identity_from_cert(der: &[u8]) -> Result<Identity, CertError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| CertError::Parse(e.to_string()))?;
    identity_of(&cert)
}

/// When a certificate stops being valid (its `notAfter`).
pub fn not_after_of(der: &[u8]) -> Result<SystemTime, CertError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| CertError::Parse(e.to_string()))?;
    Ok(to_system_time(cert.validity().not_after.timestamp()))
}

fn identity_of(
    cert: &x509_parser::certificate::X509Certificate<'_>,
) -> Result<Identity, CertError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CertError::Parse(e.to_string()))?;
    let spiffe: Vec<&str> = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(*uri),
            _ => None,
        })
        .collect();
    match spiffe.as_slice() {
        [] => Err(CertError::NoSpiffeSan),
        [one] => Ok(one.parse()?),
        many => Err(CertError::ManySpiffeSans(many.len())),
    }
}

struct LeafFacts {
    identity: Identity,
    not_before: SystemTime,
    not_after: SystemTime,
    serial: String,
}

impl LeafFacts {
    fn read(der: &[u8]) -> Result<Self, CertError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| CertError::Parse(e.to_string()))?;
        let validity = cert.validity();
        Ok(LeafFacts {
            identity: identity_of(&cert)?,
            not_before: to_system_time(validity.not_before.timestamp()),
            not_after: to_system_time(validity.not_after.timestamp()),
            serial: hex(cert.tbs_certificate.raw_serial()),
        })
    }
}

fn to_system_time(unix: i64) -> SystemTime {
    if unix >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(unix.unsigned_abs())
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(unix.unsigned_abs())
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};

    fn cert_with_sans(sans: Vec<SanType>) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.self_signed(&key).unwrap().der().clone()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn reads_the_spiffe_san() {
        let der = cert_with_sans(vec![
            SanType::DnsName("x.example".try_into().unwrap()),
            uri("spiffe://td/ns/a/sa/b"),
        ]);
        assert_eq!(
            identity_from_cert(&der).unwrap().to_string(),
            "spiffe://td/ns/a/sa/b"
        );
    }

    #[test]
    fn rejects_missing_duplicate_and_malformed_sans() {
        let none = cert_with_sans(vec![uri("https://example.com/")]);
        assert_eq!(identity_from_cert(&none), Err(CertError::NoSpiffeSan));
        let two = cert_with_sans(vec![
            uri("spiffe://td/ns/a/sa/b"),
            uri("spiffe://td/ns/a/sa/c"),
        ]);
        assert_eq!(identity_from_cert(&two), Err(CertError::ManySpiffeSans(2)));
        let bad = cert_with_sans(vec![uri("spiffe://td/workload")]);
        assert!(matches!(
            identity_from_cert(&bad),
            Err(CertError::BadIdentity(_))
        ));
        assert!(matches!(
            identity_from_cert(b"junk"),
            Err(CertError::Parse(_))
        ));
    }

    #[test]
    fn refresh_is_due_half_way_and_expiry_at_the_end() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let cert = WorkloadCert::from_known(
            "spiffe://td/ns/a/sa/b".parse().unwrap(),
            Vec::new(),
            Vec::new(),
            start,
            start + Duration::from_secs(100),
            "01".into(),
        );
        assert!(!cert.refresh_due(start + Duration::from_secs(49)));
        assert!(cert.refresh_due(start + Duration::from_secs(50)));
        assert!(!cert.expired_at(start + Duration::from_secs(99)));
        assert!(cert.expired_at(start + Duration::from_secs(100)));
        assert!(!format!("{cert:?}").contains("key_pkcs8"));
    }

    #[test]
    fn hex_is_lower_case_without_separators() {
        assert_eq!(hex(&[0x00, 0xab, 0x10]), "00ab10");
    }
}
