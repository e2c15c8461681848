//! End-to-end tunnels on 127.0.0.1: pool → real TCP → real mTLS → server → echo handler.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::{Method, Request, StatusCode};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::*;
use crate::identity::Identity;
use crate::identity::cert::WorkloadCert;
use crate::tls::tests::Mesh;
use crate::tls::{self, TrustBundle};

const CLIENT: &str = "spiffe://td/ns/a/sa/client";
const SERVER: &str = "spiffe://td/ns/b/sa/server";

mod connection_lifetime;
mod draining_peer;
mod shared_dial;

fn id(s: &str) -> Identity {
    s.parse().unwrap()
}

/// What the test server saw.
enum Seen {
    Stream {
        authority: SocketAddr,
        peer: Identity,
    },
    TlsError(String),
}

struct TestServer {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    seen: mpsc::UnboundedReceiver<Seen>,
    /// What the next handshakes present: the TLS configuration and its certificate's expiry.
    current: Arc<Mutex<(Arc<rustls::ServerConfig>, SystemTime)>>,
    roots: TrustBundle,
}

impl TestServer {
    /// Presents `cert` from the next handshake on (a renewal).
    fn rotate(&self, cert: &WorkloadCert) {
        let config = tls::server_config(cert, &self.roots).unwrap();
        *self.current.lock().unwrap() = (config, cert.not_after);
    }
}

/// Whether the test server bounds its connections by the certificates of their handshakes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Bound {
    /// Never: only the client can retire a connection whose certificates expired.
    No,
    Certificates,
}

/// Destination ports that make the handler behave differently.
const PORT_ECHO: u16 = 80;
const PORT_COUNT_THEN_REPLY: u16 = 81;
const PORT_DENY: u16 = 401;
const PORT_UNAVAILABLE: u16 = 503;
const PORT_ABORT: u16 = 666;

async fn start_server(cert: WorkloadCert, roots: TrustBundle) -> TestServer {
    start_server_with(cert, roots, Bound::No).await
}

async fn start_server_with(cert: WorkloadCert, roots: TrustBundle, bound: Bound) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let (tx, seen) = mpsc::unbounded_channel();
    let config = tls::server_config(&cert, &roots).unwrap();
    let current = Arc::new(Mutex::new((config, cert.not_after)));
    let counter = accepts.clone();
    let serving = current.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            counter.fetch_add(1, Ordering::SeqCst);
            let (config, not_after) = serving.lock().unwrap().clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let tls_stream = match TlsAcceptor::from(config).accept(tcp).await {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send(Seen::TlsError(tls::handshake_error(&e).to_string()));
                        return;
                    }
                };
                let session = match bound {
                    Bound::No => Session::new(tls::peer_identity(tls_stream.get_ref().1).unwrap()),
                    Bound::Certificates => {
                        Session::from_tls(tls_stream.get_ref().1, not_after).unwrap()
                    }
                };
                let handler_tx = tx.clone();
                let on_stream = move |acc: Accepted| {
                    let _ = handler_tx.send(Seen::Stream {
                        authority: acc.authority,
                        peer: acc.peer_identity.clone(),
                    });
                    handle(acc)
                };
                let config = ServerConfig::default();
                let result = serve_until(
                    tls_stream,
                    session,
                    &config,
                    on_stream,
                    std::future::pending(),
                )
                .await;
                if let Err(e) = result {
                    let msg = match &e {
                        HboneError::Protocol(h2) => h2
                            .get_io()
                            .map(tls::handshake_error)
                            .map_or_else(|| e.to_string(), |t| t.to_string()),
                        _ => e.to_string(),
                    };
                    let _ = tx.send(Seen::TlsError(msg));
                }
            });
        }
    });
    TestServer {
        addr,
        accepts,
        seen,
        current,
        roots,
    }
}

async fn handle(acc: Accepted) {
    match acc.authority.port() {
        PORT_DENY => acc.responder.reject(StatusCode::UNAUTHORIZED),
        PORT_UNAVAILABLE => drop(acc.responder), // dropped unanswered: 503
        PORT_ABORT => {
            let mut s = acc.responder.accept().unwrap();
            let mut first = [0u8; 1];
            s.read_exact(&mut first).await.unwrap();
            s.abort();
        }
        PORT_COUNT_THEN_REPLY => {
            let mut s = acc.responder.accept().unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            s.write_all(format!("got {} bytes", got.len()).as_bytes())
                .await
                .unwrap();
            s.shutdown().await.unwrap();
        }
        _ => {
            let s = acc.responder.accept().unwrap();
            let (mut r, mut w) = tokio::io::split(s);
            tokio::io::copy(&mut r, &mut w).await.unwrap();
            w.shutdown().await.unwrap();
        }
    }
}

struct Client {
    pool: Pool,
    key: PoolKey,
    tls: ClientTls,
}

impl Client {
    fn new(mesh: &Mesh, server: &TestServer, expect: &str, config: PoolConfig) -> Client {
        let cert = mesh.cert(CLIENT);
        Client::with_cert(cert, &mesh.ca.roots(), server, expect, config)
    }

    fn with_cert(
        cert: WorkloadCert,
        roots: &TrustBundle,
        server: &TestServer,
        expect: &str,
        config: PoolConfig,
    ) -> Client {
        let tls = ClientTls::new(&cert, roots, id(expect)).unwrap();
        Client {
            pool: Pool::new(config),
            key: PoolKey {
                src: cert.identity.clone(),
                src_addr: None,
                dst: server.addr,
                dst_identity: id(expect),
            },
            tls,
        }
    }

    async fn open(&self, port: u16) -> Result<H2Stream, HboneError> {
        let dst = self.key.dst;
        let authority = SocketAddr::from(([10, 0, 0, 1], port));
        let headers = ConnectHeaders {
            forwarded_for: Some("10.0.0.2:40000".parse().unwrap()),
            ..Default::default()
        };
        self.pool
            .connect(
                self.key.clone(),
                authority,
                &headers,
                move || TcpStream::connect(dst),
                self.tls.clone(),
            )
            .await
    }
}

async fn next_seen(server: &mut TestServer) -> Seen {
    tokio::time::timeout(Duration::from_secs(5), server.seen.recv())
        .await
        .expect("server saw nothing in time")
        .expect("server gone")
}

async fn setup() -> (Mesh, TestServer) {
    let mesh = Mesh::new("td");
    let server = start_server(mesh.cert(SERVER), mesh.ca.roots()).await;
    (mesh, server)
}

#[tokio::test]
async fn tunnels_bytes_both_ways() {
    let (mesh, mut server) = setup().await;
    let client = Client::new(&mesh, &server, SERVER, PoolConfig::default());
    let mut s = client.open(PORT_ECHO).await.unwrap();
    s.write_all(b"hello through the mesh").await.unwrap();
    let mut buf = [0u8; 22];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello through the mesh");
    match next_seen(&mut server).await {
        Seen::Stream { authority, peer } => {
            assert_eq!(authority, SocketAddr::from(([10, 0, 0, 1], PORT_ECHO)));
            assert_eq!(peer, id(CLIENT));
        }
        Seen::TlsError(e) => panic!("server error: {e}"),
    }
}

#[tokio::test]
async fn half_close_reaches_the_server_which_can_still_reply() {
    let (mesh, server) = setup().await;
    let client = Client::new(&mesh, &server, SERVER, PoolConfig::default());
    let mut s = client.open(PORT_COUNT_THEN_REPLY).await.unwrap();
    s.write_all(&[7u8; 1000]).await.unwrap();
    s.shutdown().await.unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).await.unwrap();
    assert_eq!(reply, "got 1000 bytes");
}

#[tokio::test]
async fn reset_by_the_peer_is_an_io_error() {
    let (mesh, server) = setup().await;
    let client = Client::new(&mesh, &server, SERVER, PoolConfig::default());
    let mut s = client.open(PORT_ABORT).await.unwrap();
    s.write_all(b"x").await.unwrap();
    let mut rest = Vec::new();
    let err = s.read_to_end(&mut rest).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transfer_is_intact() {
    let (mesh, server) = setup().await;
    let client = Client::new(&mesh, &server, SERVER, PoolConfig::default());
    let s = client.open(PORT_ECHO).await.unwrap();
    let payload: Vec<u8> = (0..32 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let (mut r, mut w) = tokio::io::split(s);
    let to_send = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&to_send).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut echoed = Vec::with_capacity(payload.len());
    r.read_to_end(&mut echoed).await.unwrap();
    writer.await.unwrap();
    assert_eq!(echoed.len(), payload.len());
    assert!(echoed == payload, "echoed bytes differ");
}

#[tokio::test]
async fn client_rejects_wrong_server_identity() {
    let (mesh, server) = setup().await;
    let client = Client::new(
        &mesh,
        &server,
        "spiffe://td/ns/b/sa/other",
        PoolConfig::default(),
    );
    let err = client.open(PORT_ECHO).await.unwrap_err();
    assert!(
        matches!(
            &err,
            HboneError::Tls {
                source: tls::TlsError::WrongIdentity { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains(
            "peer presented identity spiffe://td/ns/b/sa/server, expected spiffe://td/ns/b/sa/other"
        ),
        "{err}"
    );
}

#[tokio::test]
async fn server_rejects_client_from_another_trust_domain() {
    let mesh = Mesh::new("td");
    let other = Mesh::new("other");
    let roots = TrustBundle::from_pem(&(mesh.ca.root_pem() + &other.ca.root_pem())).unwrap();
    let mut server = start_server(mesh.cert(SERVER), roots.clone()).await;
    let cert = other.cert("spiffe://other/ns/a/sa/client");
    let client = Client::with_cert(cert, &roots, &server, SERVER, PoolConfig::default());
    let err = client.open(PORT_ECHO).await.unwrap_err();
    assert!(
        matches!(err, HboneError::Tls { .. } | HboneError::H2 { .. }),
        "{err}"
    );
    match next_seen(&mut server).await {
        Seen::TlsError(e) => assert_eq!(e, "peer certificate from trust domain other, expected td"),
        Seen::Stream { .. } => panic!("stream accepted from another trust domain"),
    }
}

#[tokio::test]
async fn server_rejects_client_without_certificate() {
    let (mesh, mut server) = setup().await;
    let anonymous = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnything))
        .with_no_client_auth();
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let name = ServerName::IpAddress(server.addr.ip().into());
    let result = async {
        let mut t = TlsConnector::from(Arc::new(anonymous))
            .connect(name, tcp)
            .await?;
        t.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        let mut b = [0u8; 1];
        t.read_exact(&mut b).await
    }
    .await;
    assert!(result.is_err());
    match next_seen(&mut server).await {
        Seen::TlsError(e) => assert_eq!(e, "no client certificate"),
        Seen::Stream { .. } => panic!("anonymous stream accepted"),
    }
    drop(mesh);
}

#[tokio::test]
async fn expired_server_certificate_is_rejected() {
    let mesh = Mesh::new("td");
    let now = SystemTime::now();
    let expired = mesh
        .ca
        .sign_with_validity(
            &id(SERVER),
            now - Duration::from_secs(7200),
            now - Duration::from_secs(60),
        )
        .unwrap();
    let server = start_server(expired, mesh.ca.roots()).await;
    let client = Client::new(&mesh, &server, SERVER, PoolConfig::default());
    let err = client.open(PORT_ECHO).await.unwrap_err();
    assert!(err.to_string().contains("certificate expired"), "{err}");
}

#[tokio::test]
async fn rejected_streams_map_to_errors() {
    let (mesh, server) = setup().await;
    let client = Client::new(&mesh, &server, SERVER, PoolConfig::default());
    assert!(matches!(
        client.open(PORT_DENY).await,
        Err(HboneError::Denied)
    ));
    assert!(matches!(
        client.open(PORT_UNAVAILABLE).await,
        Err(HboneError::Status(StatusCode::SERVICE_UNAVAILABLE))
    ));
    // The connection is still good for the next tunnel.
    let mut s = client.open(PORT_ECHO).await.unwrap();
    s.write_all(b"ok").await.unwrap();
    let mut b = [0u8; 2];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"ok");
    assert_eq!(server.accepts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn bad_requests_get_a_status_and_the_connection_keeps_serving() {
    let (mesh, server) = setup().await;
    let cert = mesh.cert(CLIENT);
    let config = tls::client_config(&cert, &mesh.ca.roots(), id(SERVER)).unwrap();
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let name = ServerName::IpAddress(server.addr.ip().into());
    let tls_stream = TlsConnector::from(config).connect(name, tcp).await.unwrap();
    let (send, connection) = h2::client::handshake(tls_stream).await.unwrap();
    tokio::spawn(connection);

    let status = |req: Request<()>| {
        let send = send.clone();
        async move {
            let mut send = send.ready().await.unwrap();
            let (response, _body) = send.send_request(req, true).unwrap();
            response.await.unwrap().status()
        }
    };
    let get = Request::builder()
        .method(Method::GET)
        .uri("https://10.0.0.1:80/")
        .body(())
        .unwrap();
    assert_eq!(status(get).await, StatusCode::METHOD_NOT_ALLOWED);
    let by_name = Request::builder()
        .method(Method::CONNECT)
        .uri("example.com:80")
        .body(())
        .unwrap();
    assert_eq!(status(by_name).await, StatusCode::BAD_REQUEST);
    let good = request::build_connect(
        SocketAddr::from(([10, 0, 0, 1], PORT_DENY)),
        &ConnectHeaders::default(),
    )
    .unwrap();
    assert_eq!(status(good).await, StatusCode::UNAUTHORIZED);
    assert_eq!(server.accepts.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_the_cap_open_a_second_connection() {
    let (mesh, server) = setup().await;
    let client = Arc::new(Client::new(&mesh, &server, SERVER, PoolConfig::default()));
    let opens: Vec<_> = (0..101)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.open(PORT_ECHO).await })
        })
        .collect();
    let mut streams = Vec::new();
    for open in opens {
        streams.push(open.await.unwrap().unwrap());
    }
    assert_eq!(client.pool.connection_count(&client.key), 2);
    assert_eq!(server.accepts.load(Ordering::SeqCst), 2);
    // Every stream works.
    for (i, s) in streams.iter_mut().enumerate() {
        let msg = format!("{i:03}");
        s.write_all(msg.as_bytes()).await.unwrap();
        let mut b = [0u8; 3];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(b, msg.as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connects_share_one_connection() {
    let (mesh, server) = setup().await;
    let client = Arc::new(Client::new(&mesh, &server, SERVER, PoolConfig::default()));
    let opens: Vec<_> = (0..20)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.open(PORT_ECHO).await })
        })
        .collect();
    for open in opens {
        open.await.unwrap().unwrap();
    }
    assert_eq!(server.accepts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn idle_connections_are_released() {
    let (mesh, server) = setup().await;
    let config = PoolConfig {
        idle_timeout: Duration::from_millis(200),
        ..Default::default()
    };
    let client = Client::new(&mesh, &server, SERVER, config);
    let mut s = client.open(PORT_ECHO).await.unwrap();
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    drop(s);
    assert_eq!(client.pool.connection_count(&client.key), 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while client.pool.connection_count(&client.key) > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "idle connection kept"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A new tunnel dials again.
    client.open(PORT_ECHO).await.unwrap();
    assert_eq!(server.accepts.load(Ordering::SeqCst), 2);
}

/// `serve` on one end of an in-memory pipe with keep-alive every 10 s; the other end is
/// returned. Time is the test's (paused) clock.
fn serve_in_memory() -> (
    tokio::io::DuplexStream,
    tokio::task::JoinHandle<Result<(), HboneError>>,
) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let config = ServerConfig {
        keepalive: Some(Duration::from_secs(10)),
        ..Default::default()
    };
    let serving = tokio::spawn(async move { serve(server, id(CLIENT), &config, handle).await });
    (client, serving)
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_stops_reading_is_cut_off_by_keepalive() {
    let (mut client, serving) = serve_in_memory();
    client
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    // Nothing is read: the PING sent after 10 s is never answered.
    let result = tokio::time::timeout(Duration::from_secs(60), serving)
        .await
        .expect("a silent peer kept")
        .unwrap();
    assert!(
        matches!(result, Err(HboneError::KeepaliveTimeout(after)) if after == Duration::from_secs(20)),
        "{result:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_answers_pings_is_kept_however_idle() {
    let (client, serving) = serve_in_memory();
    let (send, connection) = h2::client::handshake(client).await.unwrap();
    tokio::spawn(connection); // answers PINGs
    tokio::time::sleep(Duration::from_secs(300)).await;
    assert!(!serving.is_finished(), "{:?}", serving.await);
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri("10.0.0.1:80")
        .body(())
        .unwrap();
    let (response, _stream) = send
        .ready()
        .await
        .unwrap()
        .send_request(req, false)
        .unwrap();
    assert_eq!(response.await.unwrap().status(), StatusCode::OK);
}

/// Accepts any server certificate: only for the no-client-certificate test.
#[derive(Debug)]
struct AcceptAnything;

impl rustls::client::danger::ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
