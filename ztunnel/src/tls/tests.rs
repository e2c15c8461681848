//! Real handshakes over an in-memory pipe with certificates from a `LocalCa`.

use std::time::{Duration, SystemTime};

use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::*;
use crate::identity::ca::LocalCa;

pub(crate) struct Mesh {
    _dir: tempfile::TempDir,
    pub(crate) ca: LocalCa,
}

impl Mesh {
    pub(crate) fn new(trust_domain: &str) -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path(), trust_domain).unwrap();
        Mesh { _dir: dir, ca }
    }

    pub(crate) fn cert(&self, id: &str) -> WorkloadCert {
        self.ca
            .sign(&id.parse().unwrap(), Duration::from_secs(3600))
            .unwrap()
    }
}

fn any_name() -> ServerName<'static> {
    ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into())
}

/// Runs one handshake and a one-byte exchange; returns each side's view of the peer.
async fn handshake(
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
) -> (Result<Identity, TlsError>, Result<Identity, TlsError>) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let server_side = tokio::spawn(async move {
        let mut tls = TlsAcceptor::from(server)
            .accept(b)
            .await
            .map_err(|e| handshake_error(&e))?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte)
            .await
            .map_err(|e| handshake_error(&e))?;
        tls.write_all(&byte)
            .await
            .map_err(|e| handshake_error(&e))?;
        tls.flush().await.map_err(|e| handshake_error(&e))?;
        let (_, conn) = tls.get_ref();
        assert_eq!(conn.alpn_protocol(), Some(ALPN_H2));
        peer_identity(conn)
    });
    let client_side = async move {
        let mut tls = TlsConnector::from(client)
            .connect(any_name(), a)
            .await
            .map_err(|e| handshake_error(&e))?;
        let (_, conn) = tls.get_ref();
        assert_eq!(
            conn.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        assert_eq!(
            conn.negotiated_cipher_suite().map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_256_GCM_SHA384)
        );
        let id = peer_identity(conn)?;
        // With TLS 1.3 the server checks our certificate after our handshake completes:
        // a rejection shows up on the first read.
        tls.write_all(b"x").await.map_err(|e| handshake_error(&e))?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte)
            .await
            .map_err(|e| handshake_error(&e))?;
        Ok(id)
    };
    let client_result = client_side.await;
    let server_result = server_side.await.unwrap();
    (client_result, server_result)
}

#[tokio::test]
async fn mutual_tls_carries_both_identities() {
    let mesh = Mesh::new("td");
    let client = mesh.cert("spiffe://td/ns/a/sa/client");
    let server = mesh.cert("spiffe://td/ns/b/sa/server");
    let roots = TrustBundle::from_pem(&mesh.ca.root_pem()).unwrap();
    let (c, s) = handshake(
        client_config(&client, &roots, server.identity.clone()).unwrap(),
        server_config(&server, &roots).unwrap(),
    )
    .await;
    assert_eq!(c.unwrap(), server.identity);
    assert_eq!(s.unwrap(), client.identity);
}

#[tokio::test]
async fn client_rejects_unexpected_server_identity() {
    let mesh = Mesh::new("td");
    let client = mesh.cert("spiffe://td/ns/a/sa/client");
    let server = mesh.cert("spiffe://td/ns/b/sa/impostor");
    let expected: Identity = "spiffe://td/ns/b/sa/server".parse().unwrap();
    let (c, _s) = handshake(
        client_config(&client, &mesh.ca.roots(), expected).unwrap(),
        server_config(&server, &mesh.ca.roots()).unwrap(),
    )
    .await;
    let err = c.unwrap_err();
    assert_eq!(
        err.to_string(),
        "peer presented identity spiffe://td/ns/b/sa/impostor, expected spiffe://td/ns/b/sa/server"
    );
}

#[tokio::test]
async fn server_rejects_other_trust_domain() {
    let ours = Mesh::new("td");
    let theirs = Mesh::new("other");
    // The roots trust both CAs, so only the trust-domain rule can reject.
    let roots = TrustBundle::from_pem(&(ours.ca.root_pem() + &theirs.ca.root_pem())).unwrap();
    let server = ours.cert("spiffe://td/ns/b/sa/server");
    let client = theirs.cert("spiffe://other/ns/a/sa/client");
    let (c, s) = handshake(
        client_config(&client, &roots, server.identity.clone()).unwrap(),
        server_config(&server, &roots).unwrap(),
    )
    .await;
    assert!(c.is_err());
    assert_eq!(
        s.unwrap_err().to_string(),
        "peer certificate from trust domain other, expected td"
    );
}

#[tokio::test]
async fn server_rejects_untrusted_chain() {
    let ours = Mesh::new("td");
    let forged = Mesh::new("td");
    let server = ours.cert("spiffe://td/ns/b/sa/server");
    let client = forged.cert("spiffe://td/ns/a/sa/client");
    let (c, s) = handshake(
        client_config(&client, &ours.ca.roots(), server.identity.clone()).unwrap(),
        server_config(&server, &ours.ca.roots()).unwrap(),
    )
    .await;
    assert!(c.is_err());
    // Same issuer name, different key: the signature check fails.
    let msg = s.unwrap_err().to_string();
    assert!(
        msg.contains("BadSignature") || msg.contains("UnknownIssuer"),
        "{msg}"
    );
}

#[tokio::test]
async fn server_requires_a_client_certificate() {
    let mesh = Mesh::new("td");
    let server = mesh.cert("spiffe://td/ns/b/sa/server");
    let verifier =
        verify::SpiffeServerVerifier::new(&mesh.ca.roots(), provider(), server.identity.clone());
    let anonymous = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    let (c, s) = handshake(
        Arc::new(anonymous),
        server_config(&server, &mesh.ca.roots()).unwrap(),
    )
    .await;
    assert!(c.is_err());
    assert_eq!(s.unwrap_err().to_string(), "no client certificate");
}

#[tokio::test]
async fn expired_server_certificate_is_rejected() {
    let mesh = Mesh::new("td");
    let client = mesh.cert("spiffe://td/ns/a/sa/client");
    let now = SystemTime::now();
    let server = mesh
        .ca
        .sign_with_validity(
            &"spiffe://td/ns/b/sa/server".parse().unwrap(),
            now - Duration::from_secs(7200),
            now - Duration::from_secs(3600),
        )
        .unwrap();
    let (c, _s) = handshake(
        client_config(&client, &mesh.ca.roots(), server.identity.clone()).unwrap(),
        server_config(&server, &mesh.ca.roots()).unwrap(),
    )
    .await;
    let msg = c.unwrap_err().to_string();
    assert!(msg.contains("certificate expired"), "{msg}");
}

#[test]
fn bundle_rejects_text_without_certificates() {
    assert!(TrustBundle::from_pem("").is_err());
    assert!(TrustBundle::from_pem("hello").is_err());
    let mesh = Mesh::new("td");
    let bundle = TrustBundle::from_pem(&mesh.ca.root_pem()).unwrap();
    assert_eq!(bundle.certificates().len(), 1);
}
