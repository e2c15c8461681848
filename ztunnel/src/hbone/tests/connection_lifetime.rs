//! When a connection stops taking tunnels: the certificates of its handshake expire (pool and
//! server), or the peer stops answering PINGs (pool). Real TLS on loopback; the only waits
//! are for a certificate's lifetime, a couple of seconds.

use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;
use tokio::time::Instant;

use super::*;
use crate::hbone::lifetime::wall_clock_reaches;

/// A certificate for `identity` that expires in one to two seconds (`notAfter` has whole
/// seconds).
fn short_lived(mesh: &Mesh, identity: &str) -> WorkloadCert {
    let now = SystemTime::now();
    mesh.ca
        .sign_with_validity(
            &id(identity),
            now - Duration::from_secs(60),
            now + Duration::from_secs(2),
        )
        .unwrap()
}

/// Writes `msg` into the tunnel and reads it back from the echo handler.
async fn echo(s: &mut H2Stream, msg: &[u8]) {
    let roundtrip = async {
        s.write_all(msg).await?;
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).await.map(|_| back)
    };
    let back = tokio::time::timeout(Duration::from_secs(5), roundtrip)
        .await
        .expect("no echo in time")
        .unwrap();
    assert_eq!(back, msg);
}

#[tokio::test]
async fn a_pooled_connection_is_not_reused_once_the_peer_certificate_expired() {
    let mesh = Mesh::new("td");
    let short = short_lived(&mesh, SERVER);
    // The server never retires connections itself: only the pool can keep this one out.
    let server = start_server_with(short.clone(), mesh.ca.roots(), Bound::No).await;
    let client = Client::new(&mesh, &server, SERVER, PoolConfig::default());
    let mut first = client.open(PORT_ECHO).await.unwrap();
    echo(&mut first, b"before").await;
    // Renewed on the server; the pooled connection still rests on the old certificate.
    server.rotate(&mesh.cert(SERVER));

    // The one wait that cannot be avoided: the certificate's lifetime.
    wall_clock_reaches(short.not_after).await;
    let mut second = client.open(PORT_ECHO).await.unwrap();
    echo(&mut second, b"second").await;
    assert_eq!(
        server.accepts.load(Ordering::SeqCst),
        2,
        "a tunnel went over the connection whose server certificate expired"
    );
    assert_eq!(client.pool.connection_count(&client.key), 1);
    assert_eq!(client.pool.stats().certificate_expired, 1);
    // Opened while the certificate was valid: it carries on.
    echo(&mut first, b"after").await;
}

#[tokio::test]
async fn the_server_sends_goaway_when_the_client_certificate_expires() {
    let mesh = Mesh::new("td");
    let server = start_server_with(mesh.cert(SERVER), mesh.ca.roots(), Bound::Certificates).await;
    let short = short_lived(&mesh, CLIENT);
    let config = tls::client_config(&short, &mesh.ca.roots(), id(SERVER)).unwrap();
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let name = ServerName::IpAddress(server.addr.ip().into());
    let tls_stream = TlsConnector::from(config).connect(name, tcp).await.unwrap();
    let (send, connection) = h2::client::handshake(tls_stream).await.unwrap();
    tokio::spawn(connection);
    let request = request::build_connect(
        SocketAddr::from(([10, 0, 0, 1], PORT_ECHO)),
        &Default::default(),
    )
    .unwrap();
    let (response, stream) = send
        .clone()
        .ready()
        .await
        .unwrap()
        .send_request(request, false)
        .unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut first = H2Stream::new(stream, response.into_body(), None, None);
    echo(&mut first, b"before").await;

    // Once h2 has the GOAWAY it opens no stream on this connection. Polled for from the
    // start, so that a GOAWAY sent early would be seen too.
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        if let Err(e) = send.clone().ready().await {
            break e;
        }
        assert!(Instant::now() < deadline, "no GOAWAY after the expiry");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let seen_at = SystemTime::now();
    assert!(refused.is_go_away() && refused.is_remote(), "{refused}");
    assert_eq!(refused.reason(), Some(h2::Reason::NO_ERROR), "{refused}");
    assert!(seen_at >= short.not_after, "GOAWAY before the expiry");
    let late = seen_at.duration_since(short.not_after).unwrap();
    assert!(
        late < Duration::from_secs(1),
        "GOAWAY {late:?} after the expiry"
    );
    // The tunnel opened before the expiry still passes bytes.
    echo(&mut first, b"after").await;
    assert_eq!(server.accepts.load(Ordering::SeqCst), 1);
}

/// A TCP relay that can be frozen: it then forwards nothing either way and closes nothing,
/// like a dead node behind a link that drops packets silently.
struct Relay {
    addr: SocketAddr,
    frozen: watch::Sender<bool>,
}

async fn start_relay(upstream: SocketAddr) -> Relay {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let frozen = watch::Sender::new(false);
    let freeze = frozen.clone();
    tokio::spawn(async move {
        while let Ok((downstream, _)) = listener.accept().await {
            let upstream = TcpStream::connect(upstream).await.unwrap();
            let (down_read, down_write) = downstream.into_split();
            let (up_read, up_write) = upstream.into_split();
            tokio::spawn(forward(down_read, up_write, freeze.subscribe()));
            tokio::spawn(forward(up_read, down_write, freeze.subscribe()));
        }
    });
    Relay { addr, frozen }
}

async fn forward(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            _ = frozen.wait_for(|f| *f) => break,
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
        };
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
    // Frozen: nothing moves, and both sockets stay open (this future owns them).
    std::future::pending::<()>().await;
}

#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_dropped_from_the_pool_with_its_tunnels() {
    let (mesh, server) = setup().await;
    let relay = start_relay(server.addr).await;
    let interval = Duration::from_millis(200);
    let config = PoolConfig {
        keepalive: Some(interval),
        ..Default::default()
    };
    let mut client = Client::new(&mesh, &server, SERVER, config);
    client.key.dst = relay.addr;
    let mut tunnel = client.open(PORT_ECHO).await.unwrap();
    echo(&mut tunnel, b"warm").await;
    // A peer that answers is kept, idle or not: let several PINGs go by.
    tokio::time::sleep(interval * 4).await;
    echo(&mut tunnel, b"still").await;
    assert_eq!(client.pool.connection_count(&client.key), 1);
    assert_eq!(client.pool.stats().keepalive_timeout, 0);

    relay.frozen.send_replace(true);
    let frozen_at = Instant::now();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), tunnel.read(&mut byte))
        .await
        .expect("a tunnel over a silent peer was left hanging");
    let took = frozen_at.elapsed();
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // At worst the next PING leaves one interval after the last answer, and is given up on
    // two intervals later.
    assert!(
        took < interval * 3 + Duration::from_millis(500),
        "tunnel ended {took:?} after the peer went silent"
    );
    assert_eq!(client.pool.connection_count(&client.key), 0);
    assert_eq!(client.pool.stats().keepalive_timeout, 1);
}
