//! Concurrent connects to one peer share the dial in flight: against a peer that never
//! answers they fail together after one connect timeout (not one after another), and
//! against a live one a burst opens one connection per `max_streams_per_conn` tunnels.

use std::future::Future;
use std::io;

use tokio::time::Instant;

use super::*;

/// Opens a tunnel as `Client::open` does, through `dial` instead of a plain TCP connect.
async fn open_via<F, Fut>(client: &Client, dial: F) -> Result<H2Stream, HboneError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = io::Result<TcpStream>>,
{
    let authority = SocketAddr::from(([10, 0, 0, 1], PORT_ECHO));
    client
        .pool
        .connect(
            client.key.clone(),
            authority,
            &ConnectHeaders::default(),
            dial,
            client.tls.clone(),
        )
        .await
}

/// Runs `n` connects at once, each through `dial`; returns how long each took to fail (in
/// the order they finished) and how many dials were made.
async fn fail_together<F, Fut>(client: Arc<Client>, n: usize, dial: F) -> (Vec<Duration>, usize)
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = io::Result<TcpStream>> + Send + 'static,
{
    let dials = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let opens: Vec<_> = (0..n)
        .map(|_| {
            let (client, dials, dial) = (client.clone(), dials.clone(), dial.clone());
            tokio::spawn(async move {
                let counted = || {
                    dials.fetch_add(1, Ordering::SeqCst);
                    dial()
                };
                let result = open_via(&client, counted).await;
                (result.err(), started.elapsed())
            })
        })
        .collect();
    let mut took = Vec::new();
    for open in opens {
        let (error, elapsed) = open.await.unwrap();
        let error = error.expect("a tunnel opened to a peer that never answers");
        assert!(
            error.to_string().contains("did not answer within"),
            "{error}"
        );
        took.push(elapsed);
    }
    (took, dials.load(Ordering::SeqCst))
}

#[tokio::test(start_paused = true)]
async fn concurrent_connects_to_a_silent_peer_share_one_dial_and_fail_after_one_timeout() {
    let (mesh, server) = setup().await;
    let timeout = Duration::from_secs(10);
    let config = PoolConfig {
        connect_timeout: timeout,
        ..Default::default()
    };
    let client = Arc::new(Client::new(&mesh, &server, SERVER, config));
    // A dial that never completes: the SYN of a black-holed peer.
    let (took, dials) = fail_together(client.clone(), 100, || {
        std::future::pending::<io::Result<TcpStream>>()
    })
    .await;
    let slowest = took.iter().max().copied().unwrap_or_default();
    // The paused clock moves in whole milliseconds.
    assert!(
        took.iter()
            .all(|t| *t >= timeout && *t < timeout + Duration::from_millis(10)),
        "connects failed after {:?} to {slowest:?}, expected all after {timeout:?}",
        took.iter().min()
    );
    assert_eq!(dials, 1, "connects to one peer dialed it one after another");
    // Nothing was kept of the failed dial: the next connect dials anew.
    let again = open_via(&client, std::future::pending).await;
    assert!(
        matches!(again, Err(HboneError::Timeout { .. })),
        "{again:?}"
    );
    assert_eq!(client.pool.connection_count(&client.key), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_to_a_listener_that_never_answers_fail_together() {
    let (mesh, server) = setup().await;
    // The kernel completes the TCP handshakes; nothing ever answers TLS.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let timeout = Duration::from_millis(300);
    let config = PoolConfig {
        connect_timeout: timeout,
        ..Default::default()
    };
    let mut client = Client::new(&mesh, &server, SERVER, config);
    client.key.dst = addr;
    let (took, dials) = fail_together(Arc::new(client), 20, move || TcpStream::connect(addr)).await;
    let slowest = took.iter().max().copied().unwrap_or_default();
    // One timeout, and scheduling on a loaded machine.
    assert!(
        slowest < timeout + Duration::from_secs(1),
        "the slowest of 20 connects failed after {slowest:?} (connect timeout {timeout:?})"
    );
    assert_eq!(dials, 1);
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_shares_dials_and_no_connection_takes_more_than_the_cap() {
    let (mesh, server) = setup().await;
    let client = Arc::new(Client::new(&mesh, &server, SERVER, PoolConfig::default()));
    let dst = server.addr;
    let dials = Arc::new(AtomicUsize::new(0));
    // A slow dial, so that the whole burst arrives while the first one is in flight.
    let opens: Vec<_> = (0..250)
        .map(|_| {
            let (client, dials) = (client.clone(), dials.clone());
            tokio::spawn(async move {
                open_via(&client, || {
                    let dials = dials.clone();
                    async move {
                        dials.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        TcpStream::connect(dst).await
                    }
                })
                .await
            })
        })
        .collect();
    let mut streams = Vec::new();
    for open in opens {
        streams.push(open.await.unwrap().unwrap());
    }
    // 100 + 100 + 50.
    assert_eq!(dials.load(Ordering::SeqCst), 3);
    assert_eq!(server.accepts.load(Ordering::SeqCst), 3);
    assert_eq!(client.pool.connection_count(&client.key), 3);
    for (i, s) in streams.iter_mut().enumerate() {
        let msg = format!("{i:03}");
        s.write_all(msg.as_bytes()).await.unwrap();
        let mut b = [0u8; 3];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(b, msg.as_bytes());
    }
    // The third connection has room left: the next tunnel takes it.
    let _next = client.open(PORT_ECHO).await.unwrap();
    assert_eq!(server.accepts.load(Ordering::SeqCst), 3);
}
