//! The stall timeout of relayed tunnels, against a raw HTTP/2 peer on an in-memory
//! connection, with tokio's clock paused: a peer that answers PINGs but never opens its
//! flow-control window has the tunnel reset after the timeout (counted once, the
//! application's side reset by the caller); a slow peer that keeps opening it is left alone
//! however long the transfer takes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::copy::{Side as _, Stats, relay};
use super::tracker::{ConnMeta, ConnPath, Tracker};
use crate::hbone::{self, H2Stream};
use crate::metrics::Metrics;

const STALL: Duration = Duration::from_secs(60);
/// The peer's stream window: what it accepts before it must release something.
const WINDOW: u32 = 16 * 1024;
const PEER: &str = "198.18.2.20:15008";

/// How the peer's side of the stream ended.
#[derive(Debug, PartialEq, Eq)]
enum PeerEnd {
    /// RST_STREAM with this reason, after this many bytes.
    Reset(Option<h2::Reason>, usize),
    /// END_STREAM after this many bytes.
    Finished(usize),
}

/// A raw HTTP/2 server on `io` that accepts one stream and reads it, giving back what it
/// read (a WINDOW_UPDATE) `release_after` each chunk, or never. It keeps serving the
/// connection, so PINGs are answered throughout. Ends its answer when the stream ends.
fn raw_peer(
    io: tokio::io::DuplexStream,
    release_after: Option<Duration>,
) -> oneshot::Receiver<PeerEnd> {
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let mut conn = h2::server::Builder::new()
            .initial_window_size(WINDOW)
            .handshake::<_, Bytes>(io)
            .await
            .expect("HTTP/2 handshake");
        let (request, mut respond) = conn
            .accept()
            .await
            .expect("a stream")
            .expect("a valid stream");
        tokio::spawn(async move {
            let mut body = request.into_body();
            let mut send = respond
                .send_response(Response::new(()), false)
                .expect("answer 200");
            let mut got = 0;
            let end = loop {
                match body.data().await {
                    Some(Ok(data)) => {
                        got += data.len();
                        if let Some(after) = release_after {
                            tokio::time::sleep(after).await;
                            let _ = body.flow_control().release_capacity(data.len());
                        }
                    }
                    Some(Err(e)) => break PeerEnd::Reset(e.reason(), got),
                    None => {
                        let _ = send.send_data(Bytes::new(), true);
                        break PeerEnd::Finished(got);
                    }
                }
            };
            let _ = tx.send(end);
            // Holds the answer open until the connection ends.
            std::future::pending::<()>().await;
            drop(send);
        });
        // Drives the connection: PING answers, WINDOW_UPDATEs, the reset.
        while let Some(Ok(_)) = conn.accept().await {}
    });
    rx
}

/// An outbound tunnel to a raw peer, as the pool hands it over (stall timeout set), and a
/// task PINGing the peer every 10 s that counts the answers.
async fn tunnel(
    release_after: Option<Duration>,
) -> (H2Stream, oneshot::Receiver<PeerEnd>, Arc<AtomicUsize>) {
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let peer = raw_peer(theirs, release_after);
    let (client, mut conn) = h2::client::handshake(ours).await.expect("HTTP/2 handshake");
    let mut ping_pong = conn.ping_pong().expect("ping-pong handle");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let pongs = Arc::new(AtomicUsize::new(0));
    let counted = pongs.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            if ping_pong.ping(h2::Ping::opaque()).await.is_err() {
                return;
            }
            counted.fetch_add(1, Ordering::Relaxed);
        }
    });
    let mut client = client.ready().await.expect("ready for a stream");
    let request = Request::builder()
        .method(Method::POST)
        .uri("http://198.18.2.20:8080/")
        .body(())
        .expect("request");
    let (response, send) = client.send_request(request, false).expect("stream opened");
    let response = response.await.expect("answer");
    let stream = H2Stream::new(send, response.into_body(), None, Some(STALL));
    (stream, peer, pongs)
}

/// The application's connection (`app`) and ztunnel's end of it.
async fn app_connection() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let app = TcpStream::connect(listener.local_addr().expect("address"))
        .await
        .expect("connect");
    let (ours, _) = listener.accept().await.expect("accept");
    (app, ours)
}

fn tracker() -> (Arc<Metrics>, Arc<Tracker>) {
    let metrics = Arc::new(Metrics::new());
    (metrics.clone(), Arc::new(Tracker::new(metrics)))
}

fn meta(app: &TcpStream) -> ConnMeta {
    let mut meta = ConnMeta::new(
        ConnPath::HboneOut,
        app.local_addr().expect("address"),
        "198.18.2.20:8080".parse().expect("address"),
    );
    meta.upstream = Some(PEER.parse::<SocketAddr>().expect("address"));
    meta
}

#[tokio::test(start_paused = true)]
async fn tunnel_to_a_peer_that_never_opens_its_window_is_reset_after_the_stall_timeout() {
    let (metrics, tracker) = tracker();
    let (mut tunnel, peer, pongs) = tunnel(None).await;
    let (mut app, mut ours) = app_connection().await;
    let tracked = tracker.open(meta(&app));
    let writer = tokio::spawn(async move {
        let _ = app.write_all(&vec![7u8; 1024 * 1024]).await;
        app
    });

    let start = Instant::now();
    let result = tokio::time::timeout(
        STALL * 3,
        relay(&Stats::default(), &tracked, &mut ours, &mut tunnel),
    )
    .await
    .expect("the relay ended (stall timeout)");
    let waited = start.elapsed();

    let err = result.expect_err("the stalled relay failed");
    assert_eq!(
        hbone::stalled(&err),
        Some(&hbone::Stalled { after: STALL }),
        "{err}"
    );
    assert!(
        waited >= STALL && waited < STALL + Duration::from_secs(1),
        "reset after {waited:?}, stall timeout {STALL:?}"
    );
    assert!(
        pongs.load(Ordering::Relaxed) >= 4,
        "the peer answered PINGs meanwhile (keep-alive alone would not end this)"
    );
    // The peer got its window's worth, then the reset.
    let end = tokio::time::timeout(Duration::from_secs(1), peer)
        .await
        .expect("the peer saw the stream end")
        .expect("peer report");
    assert_eq!(
        end,
        PeerEnd::Reset(Some(h2::Reason::CANCEL), WINDOW as usize)
    );
    assert_eq!(metrics.agent.hbone_stalled_streams.get(), 1);
    assert!(
        metrics
            .encode()
            .contains("ztunnel_hbone_stalled_streams_total 1"),
        "{}",
        metrics.encode()
    );

    // The caller resets the application's side of a failed relay (outbound and inbound
    // paths alike): the application sees a reset, not a clean end.
    ours.reset();
    drop(ours);
    tracked.finish_relay(&Err(err));
    let mut app = writer.await.expect("writer task");
    let mut rest = Vec::new();
    let read = app.read_to_end(&mut rest).await;
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset)
    );
}

#[tokio::test(start_paused = true)]
async fn slow_peer_that_keeps_opening_its_window_is_not_reset() {
    const TOTAL: usize = 4 * WINDOW as usize;
    let (metrics, tracker) = tracker();
    // Each window's worth is given back after half the stall timeout: slower than the
    // whole transfer may take without the timer restarting.
    let (mut tunnel, peer, _pongs) = tunnel(Some(STALL / 2)).await;
    let (mut app, mut ours) = app_connection().await;
    let tracked = tracker.open(meta(&app));
    let writer = tokio::spawn(async move {
        app.write_all(&vec![7u8; TOTAL]).await.expect("write");
        app.shutdown().await.expect("half-close");
        app
    });

    let start = Instant::now();
    let result = tokio::time::timeout(
        STALL * 10,
        relay(&Stats::default(), &tracked, &mut ours, &mut tunnel),
    )
    .await
    .expect("the relay ended");
    let took = start.elapsed();

    assert_eq!(
        result.as_ref().expect("relayed without a reset"),
        &(TOTAL as u64, 0)
    );
    assert!(
        took > STALL,
        "the transfer outlasted one stall timeout ({took:?})"
    );
    let end = peer.await.expect("peer report");
    assert_eq!(end, PeerEnd::Finished(TOTAL));
    assert_eq!(metrics.agent.hbone_stalled_streams.get(), 0);
    tracked.finish_relay(&result);
    writer.await.expect("writer task");
}
