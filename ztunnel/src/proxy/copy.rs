//! Moving bytes both ways between two connections until both directions are done, with
//! counts.
//!
//! Bytes are moved as `Bytes` chunks: a chunk read from a TCP socket is handed to HTTP/2 as
//! it is, and a chunk received over HTTP/2 is written to the socket as it is, so the only
//! copies in user space are TLS's. A connection with nothing to read holds no buffer: one is
//! allocated when the socket is readable and released when it has been drained.

use std::future::poll_fn;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf as _, Bytes, BytesMut};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use super::tracker::Tracked;
use crate::hbone::H2Stream;

/// Node-wide connection counters (the metrics module reads them).
#[derive(Debug, Default)]
pub struct Stats {
    pub opened: AtomicU64,
    pub closed: AtomicU64,
    pub denied: AtomicU64,
    pub failed: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    /// Inputs rejected before any policy: bad tunnels, failed handshakes, wrong identities.
    pub rejected_inputs: AtomicU64,
}

impl Stats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub(super) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Largest read from a socket at once; also the buffer allocated for it.
const READ_CHUNK: usize = 64 * 1024;

/// One end of a relayed connection: a TCP socket or an HBONE tunnel.
pub(super) trait Side {
    /// The next chunk of bytes (`None` at end of stream); `buf` is this direction's buffer.
    fn poll_chunk(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<Option<Bytes>>>;

    /// Writes some of `data` (at least one byte), advancing it past what was written.
    fn poll_send(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>>;

    /// Ends the write direction (FIN, END_STREAM); the other direction keeps flowing.
    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Ends the connection abruptly, so that a reset on one side of a relay reaches the other
    /// side as a reset (not as a clean end of stream).
    fn reset(&mut self);
}

impl Side for TcpStream {
    fn poll_chunk(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<Option<Bytes>>> {
        // No buffer until there is something to read: idle connections hold none.
        ready!(self.poll_read_ready(cx))?;
        if buf.capacity() - buf.len() < READ_CHUNK / 8 {
            *buf = BytesMut::with_capacity(READ_CHUNK);
        }
        // tokio's read notes a short read as "drained", saving the system call that would
        // only say so.
        match tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut *self), cx, buf) {
            Poll::Ready(Ok(0)) => Poll::Ready(Ok(None)),
            Poll::Ready(Ok(_)) => Poll::Ready(Ok(Some(buf.split().freeze()))),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                *buf = BytesMut::new();
                Poll::Pending
            }
        }
    }

    fn poll_send(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        let n = ready!(std::pin::Pin::new(&mut *self).poll_write(cx, data))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        data.advance(n);
        Poll::Ready(Ok(()))
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::pin::Pin::new(self).poll_shutdown(cx)
    }

    fn reset(&mut self) {
        // Closing with a zero linger sends RST instead of FIN.
        let _ = self.set_zero_linger();
    }
}

impl Side for H2Stream {
    fn poll_chunk(
        &mut self,
        cx: &mut Context<'_>,
        _buf: &mut BytesMut,
    ) -> Poll<io::Result<Option<Bytes>>> {
        H2Stream::poll_chunk(self, cx)
    }

    fn poll_send(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        H2Stream::poll_send(self, cx, data)
    }

    fn poll_finish(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.finish())
    }

    fn reset(&mut self) {
        self.abort();
    }
}

/// One direction of a relay.
#[derive(Default)]
struct Flow {
    buf: BytesMut,
    /// Read and not yet written.
    pending: Bytes,
    eof: bool,
    done: bool,
    moved: u64,
}

impl Flow {
    /// Moves bytes `from` -> `to` until `from` ends and `to` has been finished, telling
    /// `on_read` of every chunk read and `on_write` of every write.
    fn poll<R: Side, W: Side>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut W,
        on_read: impl Fn(u64),
        on_write: impl Fn(u64),
    ) -> Poll<io::Result<u64>> {
        while !self.done {
            if !self.pending.is_empty() {
                let before = self.pending.len();
                ready!(to.poll_send(cx, &mut self.pending))?;
                let n = (before - self.pending.len()) as u64;
                on_write(n);
                self.moved += n;
            } else if self.eof {
                ready!(to.poll_finish(cx))?;
                self.done = true;
            } else {
                match ready!(from.poll_chunk(cx, &mut self.buf))? {
                    Some(chunk) => {
                        on_read(chunk.len() as u64);
                        self.pending = chunk;
                    }
                    None => {
                        self.eof = true;
                        self.buf = BytesMut::new();
                    }
                }
            }
        }
        Poll::Ready(Ok(self.moved))
    }
}

/// Relays `client` <-> `upstream` until both sides have closed; a half-close on one side is
/// passed on to the other, and an error on either ends both (the caller resets them). A
/// tunnel reset for making no progress (`hbone::Stalled`) is counted and logged here, with
/// the peer that stalled it.
/// Bytes are counted on `tracked` as they move: received when read from the client, sent
/// when written to it. Returns (bytes client -> upstream, bytes
/// upstream -> client).
pub(super) async fn relay<A: Side, B: Side>(
    stats: &Stats,
    tracked: &Tracked,
    client: &mut A,
    upstream: &mut B,
) -> io::Result<(u64, u64)> {
    Stats::add(&stats.opened, 1);
    let mut up = Flow::default();
    let mut down = Flow::default();
    let mut sent = None;
    let mut received = None;
    let mut upstream_failed = false;
    let result = poll_fn(|cx| {
        if sent.is_none()
            && let Poll::Ready(n) =
                up.poll(cx, client, upstream, |n| tracked.add_received(n), |_| {})
        {
            upstream_failed = n.is_err();
            sent = Some(n?);
        }
        if received.is_none()
            && let Poll::Ready(n) = down.poll(cx, upstream, client, |_| {}, |n| tracked.add_sent(n))
        {
            received = Some(n?);
        }
        match (sent, received) {
            (Some(s), Some(r)) => Poll::Ready(Ok((s, r))),
            _ => Poll::Pending,
        }
    })
    .await;
    Stats::add(&stats.closed, 1);
    if let Err(err) = &result
        && let Some(stall) = crate::hbone::stalled(err)
    {
        tracked.stalled(stall, upstream_failed);
    }
    if let Ok((sent, received)) = result {
        Stats::add(&stats.bytes_sent, sent);
        Stats::add(&stats.bytes_received, received);
    }
    result
}
