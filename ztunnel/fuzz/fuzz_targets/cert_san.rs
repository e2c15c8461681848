//! Hostile certificates and identities: the input is tried as a DER certificate (the SPIFFE
//! URI SAN, and a workload certificate's validity and serial), and when it is UTF-8, as a PEM
//! trust bundle, an Istio CA `cert_chain` entry and a SPIFFE identity. Nothing may panic.
#![no_main]

use std::str::FromStr as _;

use libfuzzer_sys::fuzz_target;
use rustls_pki_types::CertificateDer;
use ztunnel::identity::cert::identity_from_cert;
use ztunnel::identity::istio_ca::parse_chain;
use ztunnel::identity::{Identity, WorkloadCert};
use ztunnel::tls::TrustBundle;

fuzz_target!(|data: &[u8]| {
    if let Ok(id) = identity_from_cert(data) {
        // What a certificate proves must read back as itself.
        assert_eq!(Identity::from_str(&id.to_string()).as_ref(), Ok(&id));
    }
    let chain = vec![CertificateDer::from(data.to_vec())];
    if let Ok(cert) = WorkloadCert::from_parts(chain, Vec::new()) {
        let _ = cert.refresh_at();
    }

    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = TrustBundle::from_pem(text);
    let _ = parse_chain(&[text.to_owned()]);
    if let Ok(id) = Identity::from_str(text) {
        assert_eq!(id.to_string(), text);
    }
});
