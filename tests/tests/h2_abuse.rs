//! HTTP/2 abuse on a pod's HBONE port (15008) by a peer holding a valid mesh certificate,
//! written frame by frame (`mesh_tests::h2raw`) so it can break the rules a client library
//! keeps. In every scenario a legitimate tunnel (sleep on node1 -> echo on node2) flows
//! through the same ztunnel the whole time, and each test ends with the same checks: those
//! bytes kept arriving, ztunnel still serves new tunnels, and its peak resident memory stayed
//! within `RSS_BOUND_KIB` of what it was before the attack (in development runs the peak did
//! not move at all: the attacks added nothing over ztunnel's start-up peak).
//!
//! What ztunnel (h2's server, with the limits in `hbone::ServerConfig`) was seen to do:
//! - more streams than SETTINGS_MAX_CONCURRENT_STREAMS (200): exactly 200 tunnels open, each
//!   extra stream gets RST_STREAM(REFUSED_STREAM); the connection stays up.
//! - a header block over 64 KiB: 431 on that stream, the connection stays up; a block spread
//!   over more CONTINUATION frames than 64 KiB needs (1 MiB, or an endless run), or one that
//!   decodes (HPACK indexing) to over 4 x 64 KiB: GOAWAY(ENHANCE_YOUR_CALM), then closed.
//! - SETTINGS or PING floods from a peer that never reads: each frame is answered, and the
//!   next is read only once that answer is written, so when the socket buffers are full
//!   ztunnel stops reading (memory bounded by the kernel's buffers; in development runs the
//!   attacker's writes stalled after 150,000-300,000 of its 2,000,000 frames). The peer then
//!   cannot answer ztunnel's keep-alive PING either, and the connection is closed after
//!   `--hbone-keepalive-secs` x 3 at most (`ztunnel_rejected_inputs_total{reason=
//!   "keepalive_timeout"}`); the attacker's pending writes fail with a reset.
//! - a zero flow-control window on a tunnel whose application sends a lot: the tunnel waits
//!   (ztunnel stops reading the application: its writes block) for as long as the peer
//!   answers PINGs: there is no stall timeout, flow control is the bound. Once the peer stops
//!   reading, keep-alive closes the connection and the application's connection with it.

use std::collections::HashMap;
use std::io::{self, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_tests::h2raw::{self, Frame, StatusDecoder};
use mesh_tests::mesh::{Mesh, PodSpec, mtls_connect};
use mesh_tests::netns::in_netns;
use mesh_tests::operator::{sample, scrape};
use mesh_tests::traffic::{AppServer, connect, echo_roundtrip, payload};
use mesh_tests::wait_until;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream as TokioTcp;
use tokio::sync::watch;
use tokio_rustls::client::TlsStream;

/// Keep-alive PING interval of the ztunnels under test (a peer silent for twice that is cut).
const KEEPALIVE_SECS: u64 = 2;
/// How much more resident memory ztunnel may hold at its peak than before the attack.
const RSS_BOUND_KIB: u64 = 64 * 1024;
/// Bound on each wait for an observable outcome (a loaded 2-core machine, debug builds).
const WAIT: Duration = Duration::from_secs(60);
const ECHO_PORT: u16 = 8080;

type Tls = TlsStream<TokioTcp>;

/// The mesh, the echo server, and the legitimate flow running through node2's ztunnel.
struct Fixture {
    /// First: it stops (and checks it never failed) while the mesh still runs.
    flow: Flow,
    mesh: Mesh,
    echo: AppServer,
    /// ztunnel's resident memory, now and at its peak so far, once the flow runs.
    rss_before_kib: u64,
    peak_before_kib: u64,
}

impl Fixture {
    fn new() -> Fixture {
        let pods = vec![
            PodSpec::new("sleep", "node1", "sleep"),
            PodSpec::new("echo", "node2", "echo"),
        ];
        let mut mesh = Mesh::new(&["node1", "node2"], pods, Vec::new()).unwrap();
        mesh.topo.add_outside_host("attacker").unwrap();
        mesh.ztunnel_args = vec![
            "--hbone-keepalive-secs".to_owned(),
            KEEPALIVE_SECS.to_string(),
        ];
        let echo = AppServer::start(&mesh.netns("echo"), "echo", app(&mesh, ECHO_PORT)).unwrap();
        mesh.start().unwrap();
        let flow = Flow::start(&mesh.netns("sleep"), app(&mesh, ECHO_PORT));
        flow.wait_for_more_than(0);
        let rss_before_kib = mesh.ztunnel("node2").rss_kib();
        let peak_before_kib = mesh.ztunnel("node2").peak_rss_kib();
        Fixture {
            flow,
            mesh,
            echo,
            rss_before_kib,
            peak_before_kib,
        }
    }

    /// A connection to echo's HBONE port from outside the mesh, with a valid certificate,
    /// that has sent the client preface with `settings` (before anything else can be sent).
    async fn attacker(&self, settings: &[(u16, u32)]) -> (ReadHalf<Tls>, Writer) {
        let cert = self
            .mesh
            .ca()
            .sign(
                &"spiffe://cluster.local/ns/default/sa/sleep"
                    .parse()
                    .unwrap(),
                Duration::from_secs(600),
            )
            .unwrap();
        let echo_id = "spiffe://cluster.local/ns/default/sa/echo".parse().unwrap();
        let hbone = SocketAddr::new(self.mesh.ip("echo").into(), 15008);
        let mut tls = mtls_connect(&self.mesh, "attacker", &cert, echo_id, hbone)
            .await
            .unwrap();
        tls.write_all(&h2raw::preface(settings)).await.unwrap();
        let (r, w) = tokio::io::split(tls);
        (r, Arc::new(tokio::sync::Mutex::new(w)))
    }

    fn rejected(&self, reason: &str) -> u64 {
        sample(
            &scrape(&self.mesh, "node2"),
            "ztunnel_rejected_inputs_total",
            &[("reason", reason)],
        )
    }

    /// Waits until node2 counted at least `n` rejected connections for `reason`.
    fn wait_rejected(&self, reason: &str, n: u64) {
        wait_until(WAIT, || self.rejected(reason) >= n).unwrap_or_else(|_| {
            panic!(
                "rejected_inputs{{reason={reason}}} stayed at {} (< {n})",
                self.rejected(reason)
            )
        });
    }

    /// What every scenario ends with: the legitimate flow moved on since `mark` (bytes it
    /// had when the attack was in place), ztunnel still opens new tunnels, and its peak
    /// memory stayed within the bound.
    fn assert_unharmed(&mut self, scenario: &str, mark: u64) {
        self.flow.wait_for_more_than(mark);
        let sleep = self.mesh.netns("sleep");
        let got = echo_roundtrip(&sleep, app(&self.mesh, ECHO_PORT), b"ok".to_vec()).unwrap();
        assert_eq!(got, b"okbye", "{scenario}: a new tunnel after the attack");
        let z = self.mesh.ztunnel("node2");
        assert!(z.exited().is_none(), "{scenario}: ztunnel exited");
        let peak = z.peak_rss_kib();
        let growth = peak.saturating_sub(self.rss_before_kib);
        eprintln!(
            "{scenario}: ztunnel RSS {} KiB before the attack, peak {} KiB before and {peak} KiB \
             after (+{} KiB); legitimate flow {} bytes",
            self.rss_before_kib,
            self.peak_before_kib,
            peak.saturating_sub(self.peak_before_kib),
            self.flow.bytes()
        );
        assert!(
            growth < RSS_BOUND_KIB,
            "{scenario}: ztunnel peak RSS grew by {growth} KiB"
        );
    }
}

fn app(mesh: &Mesh, port: u16) -> SocketAddr {
    SocketAddr::new(mesh.ip("echo").into(), port)
}

/// A long-lived echo tunnel from sleep through both ztunnels, sending and reading back
/// 16 KiB at a time until stopped; counts the bytes that came back intact.
struct Flow {
    bytes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<io::Result<()>>>,
}

impl Flow {
    fn start(netns: &str, dst: SocketAddr) -> Flow {
        let bytes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut conn = connect(netns, dst).unwrap();
        let (count, done) = (bytes.clone(), stop.clone());
        let thread = std::thread::spawn(move || -> io::Result<()> {
            let chunk = payload(16 * 1024, 7);
            let mut back = vec![0u8; chunk.len()];
            while !done.load(Ordering::Relaxed) {
                conn.write_all(&chunk)?;
                conn.read_exact(&mut back)?;
                if back != chunk {
                    return Err(io::Error::other("echo returned other bytes"));
                }
                count.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            conn.shutdown(Shutdown::Write)
        });
        Flow {
            bytes,
            stop,
            thread: Some(thread),
        }
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Waits until at least 256 KiB more than `mark` came back.
    fn wait_for_more_than(&self, mark: u64) {
        let want = mark + 256 * 1024;
        wait_until(WAIT, || {
            self.bytes() >= want || self.thread.as_ref().is_none_or(|t| t.is_finished())
        })
        .unwrap_or_else(|_| panic!("legitimate flow stuck at {} bytes", self.bytes()));
        assert!(
            self.bytes() >= want,
            "legitimate flow ended at {} bytes",
            self.bytes()
        );
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take()
            && !std::thread::panicking()
        {
            let result = t.join().expect("flow thread panicked");
            result.expect("legitimate flow failed");
        }
    }
}

/// What the attacker has received so far, and how the connection ended.
#[derive(Debug, Default, Clone)]
struct Received {
    frames: Vec<Frame>,
    /// `:status` per stream.
    statuses: HashMap<u32, u16>,
    /// PINGs from ztunnel the attacker answered.
    pings_answered: u64,
    /// Set when reading stopped: "EOF" or the error.
    end: Option<String>,
}

impl Received {
    fn of_kind(&self, kind: u8) -> impl Iterator<Item = &Frame> {
        self.frames.iter().filter(move |f| f.kind == kind)
    }

    fn goaway(&self) -> Option<&Frame> {
        self.of_kind(h2raw::GOAWAY).next()
    }

    fn resets(&self) -> HashMap<u32, u32> {
        self.of_kind(h2raw::RST_STREAM)
            .map(|f| (f.stream, f.error_code().unwrap_or(u32::MAX)))
            .collect()
    }

    fn data_on(&self, stream: u32) -> Vec<u8> {
        self.of_kind(h2raw::DATA)
            .filter(|f| f.stream == stream)
            .flat_map(|f| f.payload.clone())
            .collect()
    }
}

type Writer = Arc<tokio::sync::Mutex<WriteHalf<Tls>>>;

/// Reads everything ztunnel sends on `r` into a watch channel; answers ztunnel's SETTINGS
/// and, while `answer_pings` holds, its PINGs, as a live (if hostile) client would.
fn spawn_reader(
    mut r: ReadHalf<Tls>,
    w: Writer,
    answer_pings: Arc<AtomicBool>,
) -> watch::Receiver<Received> {
    let (tx, rx) = watch::channel(Received::default());
    tokio::spawn(async move {
        let mut decoder = StatusDecoder::default();
        loop {
            let frame = match h2raw::read_frame(&mut r).await {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    tx.send_modify(|got| got.end = Some("EOF".to_owned()));
                    return;
                }
                Err(e) => {
                    tx.send_modify(|got| got.end = Some(e.to_string()));
                    return;
                }
            };
            let mut reply = Vec::new();
            let mut answered_ping = false;
            match (frame.kind, frame.flags & h2raw::ACK) {
                (h2raw::SETTINGS, 0) => {
                    h2raw::frame(&mut reply, h2raw::SETTINGS, h2raw::ACK, 0, &[]);
                }
                (h2raw::PING, 0) if answer_pings.load(Ordering::Relaxed) => {
                    h2raw::frame(&mut reply, h2raw::PING, h2raw::ACK, 0, &frame.payload);
                    answered_ping = true;
                }
                _ => {}
            }
            if !reply.is_empty() {
                let mut w = w.lock().await;
                let _ = w.write_all(&reply).await;
                let _ = w.flush().await;
            }
            let status = match frame.kind {
                // ztunnel's answers are a few bytes: one HEADERS frame each.
                h2raw::HEADERS => decoder.status(&frame.payload).ok().flatten(),
                _ => None,
            };
            tx.send_modify(|got| {
                if let Some(status) = status {
                    got.statuses.insert(frame.stream, status);
                }
                got.pings_answered += u64::from(answered_ping);
                got.frames.push(frame);
            });
        }
    });
    rx
}

/// Waits (bounded) until what was received satisfies `done`, and returns it.
async fn received_until(
    rx: &mut watch::Receiver<Received>,
    what: &str,
    done: impl Fn(&Received) -> bool,
) -> Received {
    let seen = match tokio::time::timeout(WAIT, rx.wait_for(|got| done(got))).await {
        Ok(Ok(got)) => Some(got.clone()),
        _ => None,
    };
    seen.unwrap_or_else(|| {
        let got = summary(&rx.borrow());
        panic!("{what}: not seen within {WAIT:?}; got {got}")
    })
}

fn summary(got: &Received) -> String {
    let mut kinds: HashMap<u8, usize> = HashMap::new();
    for f in &got.frames {
        *kinds.entry(f.kind).or_default() += 1;
    }
    format!(
        "frames by type {kinds:?}, statuses {:?}, goaway {:?}, end {:?}",
        got.statuses
            .values()
            .fold(HashMap::<u16, usize>::new(), |mut m, s| {
                *m.entry(*s).or_default() += 1;
                m
            }),
        got.goaway().map(|g| (g.error_code(), g.goaway_debug())),
        got.end
    )
}

async fn write(w: &Writer, bytes: &[u8]) -> io::Result<()> {
    let mut w = w.lock().await;
    w.write_all(bytes).await?;
    w.flush().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_the_advertised_maximum_are_refused() {
    let mut f = tokio::task::block_in_place(Fixture::new);
    let (r, w) = f.attacker(&[]).await;
    let mut rx = spawn_reader(r, w.clone(), Arc::new(AtomicBool::new(true)));
    let apps_before = f.echo.peers().len();

    // 400 CONNECTs at once, ignoring the server's SETTINGS_MAX_CONCURRENT_STREAMS (200).
    const STREAMS: u32 = 400;
    let target = app(&f.mesh, ECHO_PORT);
    let mut buf = Vec::new();
    for i in 0..STREAMS {
        let block = h2raw::connect_block(target);
        h2raw::header_frames(&mut buf, 1 + 2 * i, &block, h2raw::MAX_FRAME);
    }
    write(&w, &buf).await.unwrap();
    let got = received_until(&mut rx, "an answer on every stream", |got| {
        got.statuses.len() + got.resets().len() >= STREAMS as usize
            || got.goaway().is_some()
            || got.end.is_some()
    })
    .await;
    let mark = f.flow.bytes();

    let opened: Vec<u32> = got
        .statuses
        .iter()
        .filter(|(_, s)| **s == 200)
        .map(|(id, _)| *id)
        .collect();
    let resets = got.resets();
    eprintln!(
        "{STREAMS} streams: {} answered 200, {} reset ({:?})",
        opened.len(),
        resets.len(),
        resets
            .values()
            .fold(HashMap::<u32, usize>::new(), |mut m, c| {
                *m.entry(*c).or_default() += 1;
                m
            })
    );
    assert!(got.goaway().is_none(), "{}", summary(&got));
    assert_eq!(opened.len(), 200, "{}", summary(&got));
    assert_eq!(resets.len(), (STREAMS - 200) as usize, "{}", summary(&got));
    assert!(
        resets
            .iter()
            .all(|(id, code)| *code == h2raw::REFUSED_STREAM && !opened.contains(id)),
        "{resets:?}"
    );
    // The application saw exactly the 200 tunnels, never 400.
    tokio::task::block_in_place(|| {
        wait_until(WAIT, || f.echo.peers().len() >= apps_before + 200).unwrap();
    });
    assert_eq!(f.echo.peers().len(), apps_before + 200);

    // The tunnels that were opened are real ones: bytes go through the first.
    let first = *opened.iter().min().unwrap();
    let mut data = Vec::new();
    h2raw::frame(&mut data, h2raw::DATA, 0, first, b"still here");
    write(&w, &data).await.unwrap();
    let got = received_until(&mut rx, "echo on an accepted stream", |got| {
        got.data_on(first).len() >= 10 || got.end.is_some()
    })
    .await;
    assert_eq!(got.data_on(first), b"still here");

    tokio::task::block_in_place(|| f.assert_unharmed("max concurrent streams", mark));
}

/// A CONNECT's header block padded with `x-pad-<n>` fields of `value_len` bytes until it is
/// at least `size` bytes long.
fn padded_block(target: SocketAddr, size: usize, value_len: usize) -> Vec<u8> {
    let mut block = h2raw::connect_block(target);
    let value = vec![b'a'; value_len];
    let mut n = 0;
    while block.len() < size {
        h2raw::hpack_literal(&mut block, &format!("x-pad-{n}"), &value);
        n += 1;
    }
    block
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_header_blocks_are_refused_without_being_kept() {
    let mut f = tokio::task::block_in_place(Fixture::new);
    let target = app(&f.mesh, ECHO_PORT);
    let pings = Arc::new(AtomicBool::new(true));

    // 1. 90 KiB of headers (HEADERS + 5 CONTINUATION): over the 64 KiB limit, so the stream
    //    is answered 431; the connection lives on and opens a tunnel next.
    let (r, w) = f.attacker(&[]).await;
    let mut rx = spawn_reader(r, w.clone(), pings.clone());
    let mut buf = Vec::new();
    let block = padded_block(target, 90 * 1024, 1000);
    h2raw::header_frames(&mut buf, 1, &block, h2raw::MAX_FRAME);
    write(&w, &buf).await.unwrap();
    let got = received_until(&mut rx, "an answer to 90 KiB of headers", |got| {
        got.statuses.contains_key(&1) || got.goaway().is_some() || got.end.is_some()
    })
    .await;
    assert_eq!(got.statuses.get(&1), Some(&431), "{}", summary(&got));
    let mut buf = Vec::new();
    h2raw::header_frames(&mut buf, 3, &h2raw::connect_block(target), h2raw::MAX_FRAME);
    write(&w, &buf).await.unwrap();
    let got = received_until(&mut rx, "a tunnel after the 431", |got| {
        got.statuses.contains_key(&3) || got.end.is_some()
    })
    .await;
    assert_eq!(got.statuses.get(&3), Some(&200), "{}", summary(&got));
    let mark = f.flow.bytes();

    // 2. 1 MiB of headers (HEADERS + 63 CONTINUATION), 3. an endless run of small
    //    CONTINUATION frames, and 4. an HPACK bomb (one 4 KB field added to the dynamic table,
    //    then referenced a thousand times: 5 KB on the wire, 4 MB decoded): each ends the
    //    connection with GOAWAY(ENHANCE_YOUR_CALM) long before it is all read.
    let mut huge = Vec::new();
    h2raw::header_frames(
        &mut huge,
        1,
        &padded_block(target, 1024 * 1024, 4000),
        h2raw::MAX_FRAME,
    );
    let mut endless = Vec::new();
    let block = h2raw::connect_block(target);
    h2raw::frame(&mut endless, h2raw::HEADERS, 0, 1, &block);
    let mut more = Vec::new();
    h2raw::hpack_literal(&mut more, "x-more", b"headers");
    let mut bomb = h2raw::connect_block(target);
    h2raw::hpack_indexed_literal(&mut bomb, "x-bomb", &[b'b'; 4000]);
    for _ in 0..1000 {
        h2raw::hpack_indexed(&mut bomb, 62);
    }
    let mut bomb_frame = Vec::new();
    h2raw::header_frames(&mut bomb_frame, 1, &bomb, h2raw::MAX_FRAME);
    // (what, the frames, the payload of CONTINUATION frames sent after them without end)
    let attacks = [
        ("1 MiB of headers", huge, None),
        ("endless CONTINUATION", endless, Some(more)),
        ("HPACK bomb", bomb_frame, None),
    ];
    let rejected_before = f.rejected("hbone_protocol");
    for (what, frames, continuation) in attacks {
        let (r, w) = f.attacker(&[]).await;
        let mut rx = spawn_reader(r, w.clone(), pings.clone());
        let endless = continuation.is_some();
        let writer = {
            let w = w.clone();
            tokio::spawn(async move {
                write(&w, &frames).await?;
                let Some(payload) = continuation else {
                    return Ok(0);
                };
                // Up to a million CONTINUATION frames (25 MB, more than socket buffers hold).
                let mut batch = Vec::new();
                for _ in 0..1000 {
                    h2raw::frame(&mut batch, h2raw::CONTINUATION, 0, 1, &payload);
                }
                let mut sent = 0u64;
                while sent < 1_000_000 {
                    write(&w, &batch).await?;
                    sent += 1000;
                }
                Ok::<u64, io::Error>(sent)
            })
        };
        let got = received_until(&mut rx, what, |got| got.end.is_some()).await;
        let goaway = got
            .goaway()
            .unwrap_or_else(|| panic!("{what}: no GOAWAY; {}", summary(&got)));
        eprintln!(
            "{what}: GOAWAY {:?} {:?}, then {}; stream 1 answered: {:?}",
            goaway.error_code(),
            goaway.goaway_debug(),
            got.end.as_deref().unwrap_or_default(),
            got.statuses.get(&1)
        );
        assert_eq!(
            goaway.error_code(),
            Some(h2raw::ENHANCE_YOUR_CALM),
            "{what}: {}",
            summary(&got)
        );
        assert!(!got.statuses.contains_key(&1), "{what}: {}", summary(&got));
        let written = tokio::time::timeout(WAIT, writer).await.unwrap().unwrap();
        if endless {
            assert!(written.is_err(), "{what}: never cut off: {written:?}");
        }
    }
    // Each closed connection is a rejected input.
    tokio::task::block_in_place(|| {
        f.wait_rejected("hbone_protocol", rejected_before + 3);
        f.assert_unharmed("oversized headers", mark);
    });
}

/// Writes `frame` (one SETTINGS or PING) `count` times, never reading
/// what ztunnel answers, until ztunnel cuts the connection; then reads what it had sent.
async fn flood(f: &mut Fixture, what: &str, frame: Vec<u8>, count: u64, answer_kind: u8) {
    let (r, w) = f.attacker(&[]).await;
    let keepalive_before = f.rejected("keepalive_timeout");
    // Ok(frames written), or the frames written when writing failed, and why.
    let writer = {
        let w = w.clone();
        tokio::spawn(async move {
            let batch: Vec<u8> = frame.repeat(1000);
            let mut sent = 0;
            while sent < count {
                if let Err(e) = write(&w, &batch).await {
                    return Err((sent, e));
                }
                sent += 1000;
            }
            Ok(sent)
        })
    };
    let mark = f.flow.bytes();
    // The attacker reads nothing, so it answers no PING: keep-alive cuts it off.
    tokio::task::block_in_place(|| {
        f.flow.wait_for_more_than(mark);
        f.wait_rejected("keepalive_timeout", keepalive_before + 1);
    });
    let written = tokio::time::timeout(WAIT, writer)
        .await
        .unwrap_or_else(|_| panic!("{what}: the writer is still blocked after the cut"))
        .unwrap();
    // Now read what ztunnel had answered before closing.
    let mut rx = spawn_reader(r, w, Arc::new(AtomicBool::new(false)));
    let got = received_until(&mut rx, "the end of the connection", |got| {
        got.end.is_some()
    })
    .await;
    let acks = got
        .of_kind(answer_kind)
        .filter(|f| f.flags & h2raw::ACK != 0)
        .count();
    eprintln!(
        "{what}: writer {written:?} of {count} frames; {acks} ACKs read back, then {}",
        got.end.as_deref().unwrap_or_default()
    );
    // The flood never completed: its writes stalled once ztunnel stopped reading (socket
    // buffers full), then failed when keep-alive closed the connection.
    assert!(written.is_err(), "{what}: all {count} frames written");
    assert!(
        acks as u64 <= count,
        "{what}: more ACKs than frames: {}",
        summary(&got)
    );
    assert!(got.goaway().is_none(), "{what}: {}", summary(&got));
    tokio::task::block_in_place(|| f.assert_unharmed(what, mark));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settings_flood_is_answered_at_the_pace_it_is_read_then_cut_off() {
    let mut f = tokio::task::block_in_place(Fixture::new);
    let mut frame = Vec::new();
    h2raw::settings(&mut frame, &[(h2raw::SETTINGS_ENABLE_PUSH, 0)]);
    flood(&mut f, "SETTINGS flood", frame, 2_000_000, h2raw::SETTINGS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_flood_is_answered_at_the_pace_it_is_read_then_cut_off() {
    let mut f = tokio::task::block_in_place(Fixture::new);
    let mut frame = Vec::new();
    h2raw::frame(&mut frame, h2raw::PING, 0, 0, b"flooding");
    flood(&mut f, "PING flood", frame, 2_000_000, h2raw::PING).await;
}

/// An application that, for each connection, writes as much as it can (up to 1 GiB),
/// counting what the socket took, until a write fails.
struct Firehose {
    written: Arc<AtomicU64>,
    ended: Arc<Mutex<Option<String>>>,
}

impl Firehose {
    fn start(netns: &str, at: SocketAddr) -> Firehose {
        let listener = in_netns(netns, move || TcpListener::bind(at))
            .unwrap()
            .unwrap();
        let written = Arc::new(AtomicU64::new(0));
        let ended = Arc::new(Mutex::new(None));
        let (count, end) = (written.clone(), ended.clone());
        std::thread::spawn(move || {
            let Ok((mut conn, _)) = listener.accept() else {
                return;
            };
            let chunk = payload(64 * 1024, 3);
            let result = loop {
                if count.load(Ordering::Relaxed) >= 1 << 30 {
                    break "wrote 1 GiB".to_owned();
                }
                match conn.write(&chunk) {
                    Ok(n) => count.fetch_add(n as u64, Ordering::Relaxed),
                    Err(e) => break e.to_string(),
                };
            };
            *end.lock().unwrap() = Some(result);
        });
        Firehose { written, ended }
    }

    fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    fn ended(&self) -> Option<String> {
        self.ended.lock().unwrap().clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_window_stalls_only_its_tunnel_and_keepalive_ends_a_dead_reader() {
    let mut f = tokio::task::block_in_place(Fixture::new);
    let firehose = Firehose::start(&f.mesh.netns("echo"), app(&f.mesh, 9100));
    let (r, w) = f
        .attacker(&[(h2raw::SETTINGS_INITIAL_WINDOW_SIZE, 0)])
        .await;
    let pings = Arc::new(AtomicBool::new(true));
    let mut rx = spawn_reader(r, w.clone(), pings.clone());

    // A tunnel to the firehose, with an initial stream window of 0 that is never opened.
    let mut buf = Vec::new();
    h2raw::header_frames(
        &mut buf,
        1,
        &h2raw::connect_block(app(&f.mesh, 9100)),
        h2raw::MAX_FRAME,
    );
    write(&w, &buf).await.unwrap();
    let got = received_until(&mut rx, "the tunnel's answer", |got| {
        got.statuses.contains_key(&1) || got.end.is_some()
    })
    .await;
    assert_eq!(got.statuses.get(&1), Some(&200), "{}", summary(&got));
    tokio::task::block_in_place(|| {
        wait_until(WAIT, || firehose.written() > 0).expect("the application never wrote");
    });
    let mark = f.flow.bytes();

    // The stall outlives several keep-alive periods while the attacker answers PINGs:
    // ztunnel has no stall timeout; flow control holds the application back.
    let got = received_until(&mut rx, "three keep-alive PINGs", |got| {
        got.pings_answered >= 3 || got.end.is_some()
    })
    .await;
    assert!(got.end.is_none(), "{}", summary(&got));
    assert!(
        got.resets().is_empty() && got.goaway().is_none(),
        "{}",
        summary(&got)
    );
    assert!(got.data_on(1).is_empty(), "DATA beyond a zero window");
    tokio::task::block_in_place(|| f.assert_unharmed("zero window", mark));
    let held = firehose.written();
    eprintln!(
        "zero window: the application wrote {held} bytes, then blocked ({:?})",
        firehose.ended()
    );
    assert!(firehose.ended().is_none(), "{:?}", firehose.ended());
    assert!(
        held < RSS_BOUND_KIB * 1024,
        "the application wrote {held} bytes into a zero window"
    );

    // The attacker stops answering: keep-alive closes the connection and the tunnel's
    // application connection with it.
    let keepalive_before = f.rejected("keepalive_timeout");
    pings.store(false, Ordering::Relaxed);
    let got = received_until(&mut rx, "the end of the connection", |got| {
        got.end.is_some()
    })
    .await;
    eprintln!(
        "zero window: connection ended ({}) after {} PINGs answered",
        got.end.as_deref().unwrap_or_default(),
        got.pings_answered
    );
    tokio::task::block_in_place(|| {
        f.wait_rejected("keepalive_timeout", keepalive_before + 1);
        wait_until(WAIT, || firehose.ended().is_some())
            .expect("the application's connection outlived the tunnel");
    });
    eprintln!(
        "zero window: the application's writes ended: {:?}",
        firehose.ended()
    );
}
