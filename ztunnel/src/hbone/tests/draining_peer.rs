//! A peer that is draining (a ztunnel replaced by its successor) sends GOAWAY on a
//! connection it accepted just before it stopped accepting, before serving any stream. The
//! stream was never processed: the connect tries once more on a new connection, and only
//! once.

use super::*;

/// A server whose first `draining` connections go away at once: GOAWAY with no stream
/// processed, whatever the client sends. Later ones serve as the test server does. Returns
/// its address and how many connections it accepted.
async fn start_draining_server(
    cert: WorkloadCert,
    roots: TrustBundle,
    draining: usize,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let counter = accepts.clone();
    let config = tls::server_config(&cert, &roots).unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let nth = counter.fetch_add(1, Ordering::SeqCst);
            let config = config.clone();
            tokio::spawn(async move {
                let Ok(tls_stream) = TlsAcceptor::from(config).accept(tcp).await else {
                    return;
                };
                if nth < draining {
                    let Ok(mut h2) = h2::server::handshake(tls_stream).await else {
                        return;
                    };
                    h2.abrupt_shutdown(h2::Reason::NO_ERROR);
                    while let Some(Ok(_ignored)) = h2.accept().await {}
                    return;
                }
                let session = Session::new(tls::peer_identity(tls_stream.get_ref().1).unwrap());
                let config = ServerConfig::default();
                let pending = std::future::pending();
                let _ = serve_until(tls_stream, session, &config, handle, pending).await;
            });
        }
    });
    (addr, accepts)
}

fn client_of(mesh: &Mesh, addr: SocketAddr) -> Client {
    let cert = mesh.cert(CLIENT);
    let tls = ClientTls::new(&cert, &mesh.ca.roots(), id(SERVER)).unwrap();
    Client {
        pool: Pool::new(PoolConfig::default()),
        key: PoolKey {
            src: cert.identity.clone(),
            src_addr: None,
            dst: addr,
            dst_identity: id(SERVER),
        },
        tls,
    }
}

#[tokio::test]
async fn a_new_connection_that_goes_away_before_its_first_stream_is_dialed_again() {
    let mesh = Mesh::new("td");
    let (addr, accepts) = start_draining_server(mesh.cert(SERVER), mesh.ca.roots(), 1).await;
    let client = client_of(&mesh, addr);

    let mut tunnel = client
        .open(PORT_ECHO)
        .await
        .expect("tunnel on the second connection");
    tunnel.write_all(b"after the GOAWAY").await.unwrap();
    tunnel.shutdown().await.unwrap();
    let mut got = Vec::new();
    tunnel.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"after the GOAWAY");
    assert_eq!(
        accepts.load(Ordering::SeqCst),
        2,
        "one dial refused, one served"
    );
    assert_eq!(client.pool.connection_count(&client.key), 1);
}

#[tokio::test]
async fn a_connect_is_dialed_again_only_once() {
    let mesh = Mesh::new("td");
    let (addr, accepts) = start_draining_server(mesh.cert(SERVER), mesh.ca.roots(), 5).await;
    let client = client_of(&mesh, addr);

    let err = client
        .open(PORT_ECHO)
        .await
        .expect_err("both connections went away");
    assert!(err.is_unprocessed(), "{err}");
    assert_eq!(
        accepts.load(Ordering::SeqCst),
        2,
        "the first dial and one more"
    );
}
