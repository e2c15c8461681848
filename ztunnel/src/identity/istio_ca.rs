//! A `CertificateSource` backed by Istio's CA API
//! (`istio.v1.auth.IstioCertificateService/CreateCertificate`, served by istiod on 15012).
//!
//! For each request: a fresh ECDSA P-256 key (it never leaves this process), a CSR carrying
//! the SPIFFE identity as its URI SAN, the agent's bearer token and `clusterid` headers, and
//! `ImpersonatedIdentity` in the request metadata — a node agent asks on behalf of the
//! workloads of its node, and istiod only grants that to a ztunnel. The answer is a PEM chain,
//! leaf first; the leaf must carry the identity that was asked for.
//!
//! This module issues; caching, rotation at half-life and retries are `manager`'s.

use std::collections::BTreeMap;
use std::time::Duration;

use prost_types::value::Kind;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use tonic::transport::Channel;

use super::Identity;
use super::ca::{CaError, CertificateSource, IssueFuture};
use super::cert::WorkloadCert;
use crate::grpc::{GrpcError, GrpcTarget};
use crate::proto::istio::v1::auth::IstioCertificateRequest;
use crate::proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;

/// The metadata key istiod reads to issue for another identity than the caller's.
const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// How long one `CreateCertificate` may take, connecting included: a CA that accepts
/// connections and never answers must not hold the callers waiting for a certificate.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A client of an Istio CA.
pub struct IstioCa {
    target: GrpcTarget,
    client: IstioCertificateServiceClient<Channel>,
    ttl: Duration,
}

impl IstioCa {
    /// A client that connects on first use. `ttl` is the lifetime asked for (the CA may give
    /// less). Must be called inside a tokio runtime.
    pub fn new(target: GrpcTarget, ttl: Duration) -> Result<IstioCa, GrpcError> {
        let channel = target.connect_lazy()?;
        Ok(IstioCa {
            target,
            client: IstioCertificateServiceClient::new(channel),
            ttl,
        })
    }

    async fn create(&self, id: &Identity) -> Result<WorkloadCert, CaError> {
        let remote = |what: &str, e: &dyn std::fmt::Display| {
            CaError::Remote(format!("{} for {id}: {what}: {e}", self.target.address))
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let csr = csr_pem(id, &key)?;
        let metadata = prost_types::Struct {
            fields: BTreeMap::from([(
                IMPERSONATED_IDENTITY.to_owned(),
                prost_types::Value {
                    kind: Some(Kind::StringValue(id.to_string())),
                },
            )]),
        };
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: Some(metadata),
        });
        req.set_timeout(REQUEST_TIMEOUT);
        self.target
            .authorize(&mut req)
            .map_err(|e| remote("authentication", &e))?;
        let resp = self
            .client
            .clone()
            .create_certificate(req)
            .await
            .map_err(|status| remote("CreateCertificate", &status_text(&status)))?
            .into_inner();
        let chain = parse_chain(&resp.cert_chain).map_err(|e| remote("response", &e))?;
        let cert = WorkloadCert::from_parts(chain, key.serialize_der())?;
        if cert.identity != *id {
            return Err(remote(
                "response",
                &format_args!("the certificate is for {}", cert.identity),
            ));
        }
        Ok(cert)
    }
}

impl CertificateSource for IstioCa {
    fn issue<'a>(&'a self, id: &'a Identity) -> IssueFuture<'a> {
        Box::pin(async move {
            tokio::time::timeout(REQUEST_TIMEOUT, self.create(id))
                .await
                .unwrap_or_else(|_| {
                    Err(CaError::Remote(format!(
                        "{} for {id}: CreateCertificate: no answer within {REQUEST_TIMEOUT:?}",
                        self.target.address
                    )))
                })
        })
    }
}

/// A gRPC status with the root cause tonic keeps out of its message (`tcp connect error`
/// alone does not say whether the CA refused, timed out or could not be resolved).
fn status_text(status: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    let mut root = None;
    let mut cause = std::error::Error::source(status);
    while let Some(e) = cause {
        root = Some(e);
        cause = e.source();
    }
    if let Some(root) = root.map(ToString::to_string)
        && !text.contains(&root)
    {
        text.push_str(": ");
        text.push_str(&root);
    }
    text
}

/// A PEM PKCS#10 request for `id`, signed by `key`: only the URI SAN, no subject.
pub fn csr_pem(id: &Identity, key: &KeyPair) -> Result<String, CaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    Ok(params.serialize_request(key)?.pem()?)
}

/// The certificates of a `cert_chain` answer (each entry may hold one or more PEM blocks),
/// leaf first. A self-signed last certificate is the root: it is not part of the chain a
/// workload presents.
pub fn parse_chain(entries: &[String]) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut chain = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let before = chain.len();
        for cert in CertificateDer::pem_slice_iter(entry.as_bytes()) {
            chain.push(cert.map_err(|e| format!("cert_chain[{i}]: {e}"))?);
        }
        if chain.len() == before {
            return Err(format!("cert_chain[{i}]: no PEM certificate"));
        }
    }
    if chain.is_empty() {
        return Err("cert_chain is empty".to_owned());
    }
    if chain.len() > 1 && chain.last().is_some_and(|c| self_signed(c)) {
        chain.pop();
    }
    Ok(chain)
}

fn self_signed(der: &CertificateDer<'_>) -> bool {
    x509_parser::parse_x509_certificate(der)
        .is_ok_and(|(_, c)| c.subject().as_raw() == c.issuer().as_raw())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::PublicKeyData as _;

    #[test]
    fn csr_carries_the_spiffe_uri_san() {
        let id: Identity = "spiffe://td/ns/a/sa/b".parse().unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let pem = csr_pem(&id, &key).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        let params = rcgen::CertificateSigningRequestParams::from_pem(&pem).unwrap();
        assert_eq!(
            params.params.subject_alt_names,
            vec![SanType::URI("spiffe://td/ns/a/sa/b".try_into().unwrap())]
        );
        assert_eq!(params.public_key.der_bytes(), key.der_bytes());
    }

    /// A root and a leaf for `id` signed by it, as PEM.
    fn root_and_leaf(id: &str) -> (String, String) {
        let root_key = KeyPair::generate().unwrap();
        let mut root = CertificateParams::default();
        root.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let root_cert = root.self_signed(&root_key).unwrap();
        let issuer = rcgen::Issuer::new(root, root_key);
        let leaf_key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::default();
        leaf.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
        (root_cert.pem(), leaf_cert.pem())
    }

    #[test]
    fn chain_drops_the_root_and_rejects_junk() {
        let (root, leaf) = root_and_leaf("spiffe://td/ns/a/sa/b");
        let chain = parse_chain(&[leaf.clone(), root.clone()]).unwrap();
        assert_eq!(chain.len(), 1, "root dropped");
        assert_eq!(
            super::super::cert::identity_from_cert(&chain[0])
                .unwrap()
                .to_string(),
            "spiffe://td/ns/a/sa/b"
        );
        // One entry holding both blocks reads the same.
        assert_eq!(parse_chain(&[format!("{leaf}{root}")]).unwrap(), chain);
        // A lone certificate is kept, even self-signed.
        assert_eq!(parse_chain(std::slice::from_ref(&root)).unwrap().len(), 1);
        assert!(parse_chain(&[]).unwrap_err().contains("empty"));
        assert!(
            parse_chain(&["junk".into()])
                .unwrap_err()
                .contains("cert_chain[0]")
        );
    }
}
