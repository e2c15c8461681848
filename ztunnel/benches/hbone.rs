//! Micro-benchmark: opening an HBONE tunnel on an already pooled connection (issue 13) — one
//! HTTP/2 CONNECT and its 200 over mutual TLS on loopback, with certificates from a
//! `LocalCa`. No TLS handshake is measured: the pool keeps the connection.
//!
//! `cargo bench -p ztunnel --bench hbone`

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use ztunnel::hbone::{self, ConnectHeaders, Pool, PoolConfig, PoolKey, ServerConfig};
use ztunnel::identity::{Identity, LocalCa};
use ztunnel::tls;

const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/default/sa/server";

/// An HBONE server on loopback that accepts every tunnel, writes one byte and closes it.
async fn start_server(ca: &LocalCa) -> SocketAddr {
    let id: Identity = SERVER.parse().expect("valid identity");
    let cert = ca
        .sign(&id, Duration::from_secs(3600))
        .expect("server cert");
    let acceptor = TlsAcceptor::from(tls::server_config(&cert, &ca.roots()).expect("tls config"));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls_stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(peer) = tls::peer_identity(tls_stream.get_ref().1) else {
                    return;
                };
                let config = ServerConfig::default();
                let _ = hbone::serve(tls_stream, peer, &config, |accepted| async move {
                    if let Ok(mut stream) = accepted.responder.accept() {
                        let _ = stream.shutdown().await;
                    }
                })
                .await;
            });
        }
    });
    addr
}

fn open_stream(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = LocalCa::load_or_create(dir.path(), "cluster.local").expect("local CA");
    let src: Identity = CLIENT.parse().expect("valid identity");
    let cert = ca
        .sign(&src, Duration::from_secs(3600))
        .expect("client cert");
    let server_id: Identity = SERVER.parse().expect("valid identity");
    let tls = hbone::ClientTls::new(&cert, &ca.roots(), server_id.clone()).expect("tls config");
    let addr = runtime.block_on(start_server(&ca));
    let pool = Pool::new(PoolConfig::default());
    let key = PoolKey {
        src,
        src_addr: None,
        dst: addr,
        dst_identity: server_id,
    };
    let authority: SocketAddr = "10.0.0.1:8080".parse().expect("address");
    let headers = ConnectHeaders {
        forwarded_for: Some("10.0.0.2:40000".parse().expect("address")),
        ..ConnectHeaders::default()
    };
    let open = || {
        let (pool, key, headers, tls) = (pool.clone(), key.clone(), headers.clone(), tls.clone());
        async move {
            pool.connect(
                key,
                authority,
                &headers,
                move || TcpStream::connect(addr),
                tls,
            )
            .await
            .expect("tunnel opened")
        }
    };
    // The first tunnel dials and handshakes; the measured ones reuse that connection.
    drop(runtime.block_on(open()));
    assert_eq!(pool.connection_count(&key), 1);
    c.bench_function("HBONE: open a tunnel on a pooled mTLS connection", |b| {
        b.to_async(&runtime)
            .iter(|| async { black_box(open().await) });
    });
    assert_eq!(pool.connection_count(&key), 1, "the pool dialled again");
}

criterion_group!(benches, open_stream);
criterion_main!(benches);
