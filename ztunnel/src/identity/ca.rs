//! Where workload certificates come from.
//!
//! `CertificateSource` is the seam: the local CA below signs in-process from a key and root
//! kept on disk (the local mode of DESIGN.md), and an Istio CA client (`CreateCertificate`
//! over gRPC) can implement the same trait later. This module signs; it never caches or
//! rotates (see `manager`).

use std::fs;
use std::future::Future;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData as _, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;

use super::Identity;
use super::TrustBundle;
use super::cert::{CertError, WorkloadCert};

/// File names inside the CA directory (the names Istio's plug-in CA uses).
pub const CA_KEY_FILE: &str = "ca-key.pem";
pub const ROOT_CERT_FILE: &str = "root-cert.pem";

const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Backdating absorbs small clock differences between nodes.
const BACKDATE: Duration = Duration::from_secs(60);
const DEFAULT_WORKLOAD_TTL: Duration = Duration::from_secs(24 * 3600);

/// Why a certificate could not be issued, or the CA could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    #[error("CA directory {dir} has {present} but not {missing}: provide both files or neither")]
    Partial {
        dir: PathBuf,
        present: &'static str,
        missing: &'static str,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("issued certificate is unusable: {0}")]
    Issued(#[from] CertError),
    #[error("CA for trust domain {ca} cannot sign {requested}")]
    WrongTrustDomain { ca: String, requested: Identity },
    #[error("certificate validity ends before it starts")]
    EmptyValidity,
    #[error("certificate authority: {0}")]
    Remote(String),
}

/// A boxed future, so the trait stays object-safe (`Arc<dyn CertificateSource>`).
pub type IssueFuture<'a> = Pin<Box<dyn Future<Output = Result<WorkloadCert, CaError>> + Send + 'a>>;

/// Something that can issue a certificate for a workload identity.
pub trait CertificateSource: Send + Sync {
    fn issue<'a>(&'a self, id: &'a Identity) -> IssueFuture<'a>;
}

/// An in-process certificate authority backed by a key and root certificate on disk.
pub struct LocalCa {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    root_der: CertificateDer<'static>,
    root_pem: String,
    workload_ttl: Duration,
}

impl LocalCa {
    /// Loads `ca-key.pem` and `root-cert.pem` from `dir`, or creates both (ECDSA P-256,
    /// ten years) when neither exists. One without the other is an error: silently replacing
    /// a root would break every peer that trusts the old one.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<LocalCa, CaError> {
        let key_path = dir.join(CA_KEY_FILE);
        let root_path = dir.join(ROOT_CERT_FILE);
        match (key_path.exists(), root_path.exists()) {
            (true, true) => Self::load(&key_path, &root_path, trust_domain),
            (false, false) => Self::create(dir, &key_path, &root_path, trust_domain),
            (true, false) => Err(CaError::Partial {
                dir: dir.to_owned(),
                present: CA_KEY_FILE,
                missing: ROOT_CERT_FILE,
            }),
            (false, true) => Err(CaError::Partial {
                dir: dir.to_owned(),
                present: ROOT_CERT_FILE,
                missing: CA_KEY_FILE,
            }),
        }
    }

    /// Lifetime of the workload certificates `issue` hands out (default 24 hours).
    pub fn with_workload_ttl(mut self, ttl: Duration) -> Self {
        self.workload_ttl = ttl;
        self
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The root certificate, PEM-encoded.
    pub fn root_pem(&self) -> String {
        self.root_pem.clone()
    }

    /// The roots a peer of this CA should trust.
    pub fn roots(&self) -> TrustBundle {
        TrustBundle::from_ders(vec![self.root_der.clone()])
    }

    /// Signs a workload certificate valid for `ttl`, backdated by a minute (or a tenth of
    /// `ttl` when that is shorter: renewal happens at half of the whole validity, so a long
    /// backdate on a short-lived certificate would make it due for renewal at once).
    pub fn sign(&self, id: &Identity, ttl: Duration) -> Result<WorkloadCert, CaError> {
        let now = SystemTime::now();
        let backdate = BACKDATE.min(ttl / 10);
        self.sign_with_validity(id, now - backdate, now + ttl)
    }

    /// Signs a workload certificate with an explicit validity window (tests use it to make
    /// expired or not-yet-valid certificates).
    pub fn sign_with_validity(
        &self,
        id: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCert, CaError> {
        if id.trust_domain() != self.trust_domain {
            return Err(CaError::WrongTrustDomain {
                ca: self.trust_domain.clone(),
                requested: id.clone(),
            });
        }
        if not_after <= not_before {
            return Err(CaError::EmptyValidity);
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        // Istio workload certificates carry an empty subject; the identity is the URI SAN.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial());
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(WorkloadCert::from_parts(
            vec![cert.der().clone()],
            key.serialize_der(),
        )?)
    }

    fn load(key_path: &Path, root_path: &Path, trust_domain: &str) -> Result<LocalCa, CaError> {
        let key_pem = read(key_path)?;
        let root_pem = read(root_path)?;
        let bad = |path: &Path, reason: String| CaError::BadFile {
            path: path.to_owned(),
            reason,
        };
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| bad(key_path, format!("not a PKCS#8 private key: {e}")))?;
        let root_der = CertificateDer::from_pem_slice(root_pem.as_bytes())
            .map_err(|e| bad(root_path, format!("no PEM certificate: {e}")))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&root_der)
            .map_err(|e| bad(root_path, format!("not an X.509 certificate: {e}")))?;
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(bad(
                key_path,
                format!("key does not match the root certificate in {ROOT_CERT_FILE}"),
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&root_der, key)
            .map_err(|e| bad(root_path, format!("not usable as a CA certificate: {e}")))?;
        Ok(LocalCa {
            trust_domain: trust_domain.to_owned(),
            issuer,
            root_der,
            root_pem,
            workload_ttl: DEFAULT_WORKLOAD_TTL,
        })
    }

    fn create(
        dir: &Path,
        key_path: &Path,
        root_path: &Path,
        trust_domain: &str,
    ) -> Result<LocalCa, CaError> {
        fs::create_dir_all(dir).map_err(|source| CaError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, trust_domain);
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + ROOT_VALIDITY).into();
        params.serial_number = Some(random_serial());
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let root = params.self_signed(&key)?;
        write_private(key_path, &key.serialize_pem())?;
        write_private(root_path, &root.pem())?;
        Ok(LocalCa {
            trust_domain: trust_domain.to_owned(),
            root_der: root.der().clone(),
            root_pem: root.pem(),
            issuer: Issuer::new(params, key),
            workload_ttl: DEFAULT_WORKLOAD_TTL,
        })
    }
}

impl CertificateSource for LocalCa {
    fn issue<'a>(&'a self, id: &'a Identity) -> IssueFuture<'a> {
        Box::pin(async move { self.sign(id, self.workload_ttl) })
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // A positive INTEGER whose first octet is never zero keeps the DER encoding 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn read(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|source| CaError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes with mode 0600: the CA key must not be world-readable.
fn write_private(path: &Path, contents: &str) -> Result<(), CaError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| CaError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    file.write_all(contents.as_bytes()).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::cert::identity_from_cert;

    fn id(s: &str) -> Identity {
        s.parse().unwrap()
    }

    #[test]
    fn creates_then_reloads_the_same_root() {
        let dir = tempfile::tempdir().unwrap();
        let first = LocalCa::load_or_create(dir.path(), "td").unwrap();
        let again = LocalCa::load_or_create(dir.path(), "td").unwrap();
        assert_eq!(first.root_pem(), again.root_pem());
        assert!(first.root_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        // A certificate from the reloaded CA chains to the root written by the first one.
        let cert = again
            .sign(&id("spiffe://td/ns/a/sa/b"), Duration::from_secs(3600))
            .unwrap();
        let roots = first.roots();
        crate::tls::verify_chain_for_test(&cert, &roots).unwrap();
    }

    #[test]
    fn one_file_without_the_other_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        LocalCa::load_or_create(dir.path(), "td").unwrap();
        fs::remove_file(dir.path().join(ROOT_CERT_FILE)).unwrap();
        let err = LocalCa::load_or_create(dir.path(), "td").err().unwrap();
        let msg = err.to_string();
        assert!(
            msg.contains("has ca-key.pem but not root-cert.pem"),
            "{msg}"
        );
    }

    #[test]
    fn mismatched_key_is_rejected() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        LocalCa::load_or_create(a.path(), "td").unwrap();
        LocalCa::load_or_create(b.path(), "td").unwrap();
        fs::copy(b.path().join(CA_KEY_FILE), a.path().join(CA_KEY_FILE)).unwrap();
        let msg = LocalCa::load_or_create(a.path(), "td")
            .err()
            .unwrap()
            .to_string();
        assert!(msg.contains("does not match"), "{msg}");
    }

    #[test]
    fn signs_leaf_with_spiffe_san_and_usages() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path(), "td").unwrap();
        let who = id("spiffe://td/ns/a/sa/b");
        let cert = ca.sign(&who, Duration::from_secs(3600)).unwrap();
        assert_eq!(cert.identity, who);
        assert_eq!(cert.chain.len(), 1);
        assert_eq!(cert.serial.len(), 32);
        let leaf = cert.leaf().unwrap();
        assert_eq!(identity_from_cert(leaf).unwrap(), who);
        let (_, x) = x509_parser::parse_x509_certificate(leaf).unwrap();
        let ku = x.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
        let eku = x.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let san = x.subject_alternative_name().unwrap().unwrap().value;
        assert_eq!(san.general_names.len(), 1, "only the URI SAN, no DNS SAN");
        let now = SystemTime::now();
        assert!(cert.not_before <= now - Duration::from_secs(55));
        assert!(cert.not_after > now + Duration::from_secs(3500));
    }

    #[test]
    fn refuses_other_trust_domains() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path(), "td").unwrap();
        let err = ca.sign(&id("spiffe://other/ns/a/sa/b"), Duration::from_secs(60));
        assert!(matches!(err, Err(CaError::WrongTrustDomain { .. })));
    }

    #[tokio::test]
    async fn usable_as_a_shared_source() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path(), "td")
            .unwrap()
            .with_workload_ttl(Duration::from_secs(600));
        let source: std::sync::Arc<dyn CertificateSource> = std::sync::Arc::new(ca);
        let cert = source.issue(&id("spiffe://td/ns/a/sa/b")).await.unwrap();
        let lifetime = cert.not_after.duration_since(cert.not_before).unwrap();
        assert_eq!(lifetime, Duration::from_secs(660));
    }
}
