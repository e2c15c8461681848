//! The Istio CA client against an in-process `IstioCertificateService` over real gRPC (the
//! harness's [`CaServer`]): the certificate obtained, its rotation by `CertManager`, and a
//! CA outage survived. No namespaces: these run without root.

use std::sync::Arc;
use std::time::Duration;

use mesh_tests::ca::{CaServer, Plan};
use prost_types::value::Kind;
use rcgen::PublicKeyData as _;
use ztunnel::grpc::GrpcTarget;
use ztunnel::identity::{
    CertManager, CertificateSource, Identity, IstioCa, ManagerConfig, SystemClock,
};

/// How long any single expected event may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(10);

/// Waits until `cond` holds, checking every few milliseconds, for at most [`DEADLINE`].
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn id() -> Identity {
    "spiffe://cluster.local/ns/default/sa/echo".parse().unwrap()
}

fn client(ca: &CaServer, token: &tempfile::NamedTempFile) -> IstioCa {
    let target = GrpcTarget {
        address: ca.url(),
        root_cert: None,
        token_file: Some(token.path().to_owned()),
        cluster_id: "cluster-1".into(),
    };
    IstioCa::new(target, Duration::from_secs(7200)).unwrap()
}

fn token() -> tempfile::NamedTempFile {
    let token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token.path(), "ca-token").unwrap();
    token
}

#[tokio::test]
async fn issues_a_certificate_for_the_identity_with_token_and_impersonation() {
    let mut ca = CaServer::start().unwrap();
    let token = token();
    let istio_ca = client(&ca, &token);
    let cert = istio_ca.issue(&id()).await.unwrap();
    assert_eq!(cert.identity, id());
    assert_eq!(cert.chain.len(), 1, "the root is not part of the chain");
    // The certificate is for the key the client generated.
    let key = rcgen::KeyPair::try_from(cert.key().secret_der()).unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(cert.leaf().unwrap()).unwrap();
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        key.der_bytes()
    );
    // rustls accepts it with its key for a server configuration.
    let roots = ztunnel::tls::TrustBundle::from_pem(&ca.root_pem).unwrap();
    ztunnel::tls::server_config(&cert, &roots).expect("usable for TLS");

    let seen = ca.next().await;
    assert_eq!(
        seen.metadata.get("authorization").unwrap(),
        "Bearer ca-token"
    );
    assert_eq!(seen.metadata.get("clusterid").unwrap(), "cluster-1");
    assert_eq!(seen.request.validity_duration, 7200);
    assert!(
        seen.request
            .csr
            .starts_with("-----BEGIN CERTIFICATE REQUEST-----")
    );
    let fields = seen.request.metadata.unwrap().fields;
    assert!(matches!(
        fields.get("ImpersonatedIdentity").and_then(|v| v.kind.as_ref()),
        Some(Kind::StringValue(s)) if *s == id().to_string()
    ));
}

#[tokio::test]
async fn errors_name_the_ca_and_the_identity() {
    let ca = CaServer::start().unwrap();
    ca.plan([Plan::Fail]);
    let token = token();
    let err = client(&ca, &token).issue(&id()).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&ca.url()), "{msg}");
    assert!(
        msg.contains("spiffe://cluster.local/ns/default/sa/echo"),
        "{msg}"
    );
    assert!(msg.contains("Unavailable"), "{msg}");

    // A missing token file is said before anything is sent.
    let target = GrpcTarget {
        address: ca.url(),
        root_cert: None,
        token_file: Some("/nonexistent/token".into()),
        cluster_id: "c".into(),
    };
    let msg = IstioCa::new(target, Duration::from_secs(60))
        .unwrap()
        .issue(&id())
        .await
        .unwrap_err()
        .to_string();
    assert!(msg.contains("/nonexistent/token"), "{msg}");
}

fn manager(ca: &CaServer, token: &tempfile::NamedTempFile) -> CertManager {
    CertManager::new(
        Arc::new(client(ca, token)),
        Arc::new(SystemClock),
        ManagerConfig {
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(100),
        },
    )
}

/// A certificate already past half its life (refreshed at once) but far from expiry.
const DUE: Plan = Plan::Issue {
    before: Duration::from_secs(600),
    after: Duration::from_secs(300),
};

#[tokio::test]
async fn cert_manager_rotates_through_the_istio_ca() {
    let mut ca = CaServer::start().unwrap();
    let token = token();
    ca.plan([DUE]);
    let certs = manager(&ca, &token);
    let first = certs.get(&id()).await.unwrap();
    assert_eq!(ca.next().await.serial, Some(1));
    // Half-way through its life already: the manager renews it in the background.
    let second = ca.next().await;
    assert_eq!(second.serial, Some(2));
    eventually("the renewed certificate served", || {
        certs.snapshot().first().map(|c| c.serial.clone()) != Some(first.serial.clone())
    })
    .await;
    let now = certs.get(&id()).await.unwrap();
    assert_ne!(now.serial, first.serial);
    assert_eq!(now.identity, id());
    assert!(now.not_after > first.not_after);
}

#[tokio::test]
async fn a_ca_outage_leaves_the_current_certificate_served() {
    let mut ca = CaServer::start().unwrap();
    let token = token();
    ca.plan([DUE]);
    ca.set_default(Plan::Fail);
    let certs = manager(&ca, &token);
    let first = certs.get(&id()).await.unwrap();
    assert_eq!(ca.next().await.serial, Some(1));
    // Renewals fail, again and again (with backoff)...
    for _ in 0..3 {
        assert_eq!(ca.next().await.serial, None);
        // ...and the current certificate is still what callers get.
        let served = tokio::time::timeout(DEADLINE, certs.get(&id()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(served.serial, first.serial);
    }
    // The CA comes back: the next retry renews.
    ca.set_default(Plan::Issue {
        before: Duration::from_secs(60),
        after: Duration::from_secs(3600),
    });
    let renewed = loop {
        let seen = ca.next().await;
        if let Some(serial) = seen.serial {
            break serial;
        }
    };
    assert!(renewed >= 2);
    eventually("the renewed certificate served", || {
        certs.snapshot().first().map(|c| c.serial.clone()) != Some(first.serial.clone())
    })
    .await;
}

#[tokio::test]
async fn tls_to_the_ca_is_verified_against_the_configured_root() {
    let ca = CaServer::start_tls().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root-cert.pem");
    std::fs::write(&root, &ca.root_pem).unwrap();
    let target = |root_cert| GrpcTarget {
        address: ca.url(),
        root_cert,
        token_file: None,
        cluster_id: "c".into(),
    };
    let istio_ca = IstioCa::new(target(Some(root)), Duration::from_secs(600)).unwrap();
    let cert = istio_ca.issue(&id()).await.unwrap();
    assert_eq!(cert.identity, id());

    // Another root: the handshake fails and the error says so.
    let other = CaServer::start().unwrap();
    let wrong = dir.path().join("other-root.pem");
    std::fs::write(&wrong, &other.root_pem).unwrap();
    let err = IstioCa::new(target(Some(wrong)), Duration::from_secs(600))
        .unwrap()
        .issue(&id())
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&ca.url()), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_ca_is_reported_with_the_cause() {
    let mut ca = CaServer::start().unwrap();
    let token = token();
    let istio_ca = client(&ca, &token);
    istio_ca.issue(&id()).await.unwrap();
    // Stopping waits for the client's connection to close: this runtime must keep running.
    tokio::task::block_in_place(|| ca.stop()).unwrap();
    let msg = istio_ca.issue(&id()).await.unwrap_err().to_string();
    assert!(msg.contains(&ca.url()), "{msg}");
    assert!(msg.contains("Unavailable"), "{msg}");
    assert!(msg.contains("Connection refused"), "{msg}");
    // Back on the same address: the same client is answered again.
    ca.listen().unwrap();
    istio_ca.issue(&id()).await.unwrap();
    assert_eq!(
        ca.requests().iter().filter(|r| r.serial.is_some()).count(),
        2
    );
}
