//! Workload identities: SPIFFE IDs of the form `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`,
//! the certificates that prove them, and where those certificates come from.
//!
//! An `Identity` is parsed once at the edge (config, certificate SAN, xDS) and carried typed.

pub mod ca;
pub mod cert;
pub mod istio_ca;
pub mod manager;
pub mod roots;

pub use ca::{CertificateSource, LocalCa};
pub use cert::WorkloadCert;
pub use istio_ca::IstioCa;
pub use manager::{CertInfo, CertManager, Clock, ManagerConfig, ManagerError, SystemClock};
pub use roots::{BundleError, TrustBundle};

use std::fmt;
use std::str::FromStr;

/// A workload identity as Istio writes it in certificates and policies.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// Why a string is not an Istio SPIFFE identity.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum IdentityError {
    #[error("identity {0:?} does not start with spiffe://")]
    NotSpiffe(String),
    #[error(
        "identity {0:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    Shape(String),
}

impl Identity {
    /// Builds an identity from its parts; empty parts are rejected.
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Result<Self, IdentityError> {
        let id = Identity {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        };
        let valid = |s: &str| !s.is_empty() && !s.contains('/') && !s.contains(char::is_whitespace);
        if valid(&id.trust_domain) && valid(&id.namespace) && valid(&id.service_account) {
            Ok(id)
        } else {
            Err(IdentityError::Shape(id.to_string()))
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The principal as Istio authorization policies name it: the SPIFFE ID without the scheme.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}", self.principal())
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdentityError::NotSpiffe(s.to_owned()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] => {
                Identity::new(*td, *ns, *sa).map_err(|_| IdentityError::Shape(s.to_owned()))
            }
            _ => Err(IdentityError::Shape(s.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_text() {
        let id: Identity = "spiffe://cluster.local/ns/default/sa/sleep"
            .parse()
            .unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "sleep");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/sleep");
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/sleep");
    }

    #[test]
    fn rejects_other_shapes() {
        for bad in [
            "cluster.local/ns/default/sa/sleep",
            "spiffe://cluster.local/ns/default",
            "spiffe://cluster.local/ns//sa/x",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://td/sa/a/ns/b",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad} accepted");
        }
    }
}
