//! One tunnelled TCP connection as a byte stream: an HTTP/2 stream pair adapted to tokio's
//! `AsyncRead`/`AsyncWrite`, for `tokio::io::copy_bidirectional`.
//!
//! Semantics that proxying depends on:
//! - writes wait for HTTP/2 send capacity (flow control), so a slow receiver slows the sender
//!   instead of growing buffers; read data is handed back to the window as it is consumed;
//! - `poll_shutdown` sends END_STREAM: a TCP half-close travels through the tunnel and the
//!   other direction keeps flowing;
//! - a RST_STREAM from the peer is an `io::Error` (`ConnectionReset`), except RST(NO_ERROR)
//!   while reading, which RFC 9113 §8.1 uses for "response complete, stop sending" and is read
//!   as end of stream. Dropping an `H2Stream` that was not shut down resets the stream
//!   (h2 sends RST_STREAM(CANCEL)), which the peer sees as an aborted connection;
//! - with a stall timeout, a write that waits for window longer than that without the peer
//!   granting any (a peer that answers PINGs, so keep-alive holds, but never opens the
//!   window) resets the stream and fails with [`Stalled`]; each grant restarts the clock.
//!   Tokio's clock, so tests run it paused.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf as _, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The error of a write that made no progress for the stall timeout (inside an
/// `io::Error` of kind `TimedOut`; [`stalled`] finds it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "HBONE stream stalled: the peer opened no flow-control window for {after:?} with bytes waiting to be sent"
)]
pub struct Stalled {
    pub after: Duration,
}

/// The [`Stalled`] behind `err`, when a tunnel was reset for making no progress.
pub fn stalled(err: &io::Error) -> Option<&Stalled> {
    err.get_ref()?.downcast_ref::<Stalled>()
}

/// The stall clock of a stream's writes: runs while a write waits for window.
struct StallTimer {
    after: Duration,
    /// Allocated the first time a write waits, then reused.
    sleep: Option<Pin<Box<Sleep>>>,
    running: bool,
}

impl StallTimer {
    /// Starts the clock if it is not running (a write began to wait); `Ready` once it ran
    /// out.
    fn poll_waiting(&mut self, cx: &mut Context<'_>) -> Poll<Stalled> {
        if !self.running {
            let deadline = Instant::now() + self.after;
            match &mut self.sleep {
                Some(sleep) => sleep.as_mut().reset(deadline),
                None => self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            self.running = true;
        }
        let Some(sleep) = &mut self.sleep else {
            return Poll::Pending;
        };
        ready!(sleep.as_mut().poll(cx));
        Poll::Ready(Stalled { after: self.after })
    }

    /// The peer granted window: the clock stops.
    fn progress(&mut self) {
        self.running = false;
    }
}

/// Runs a closure when dropped (the pool uses it to release a stream slot).
pub(crate) struct OnDrop(Option<Box<dyn FnOnce() + Send>>);

impl OnDrop {
    pub(crate) fn new(f: impl FnOnce() + Send + 'static) -> Self {
        OnDrop(Some(Box::new(f)))
    }
}

impl Drop for OnDrop {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// A bidirectional byte stream carried by one HTTP/2 stream.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received bytes not yet handed to the reader.
    pending: Bytes,
    read_done: bool,
    write_done: bool,
    stall: Option<StallTimer>,
    _on_drop: Option<OnDrop>,
}

impl H2Stream {
    /// A tunnel over `send`/`recv`; with `stall_timeout`, writes that get no window for that
    /// long reset it.
    pub(crate) fn new(
        send: SendStream<Bytes>,
        recv: RecvStream,
        on_drop: Option<OnDrop>,
        stall_timeout: Option<Duration>,
    ) -> Self {
        H2Stream {
            send,
            recv,
            pending: Bytes::new(),
            read_done: false,
            write_done: false,
            stall: stall_timeout.map(|after| StallTimer {
                after,
                sleep: None,
                running: false,
            }),
            _on_drop: on_drop,
        }
    }

    /// The next chunk of received bytes, as h2 received it (no copy); `None` at end of
    /// stream. Its size goes back to the flow-control window at once: the caller holds one
    /// chunk at a time.
    pub fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if !self.pending.is_empty() {
            return Poll::Ready(Ok(Some(std::mem::take(&mut self.pending))));
        }
        loop {
            if self.read_done {
                return Poll::Ready(Ok(None));
            }
            match ready!(self.recv.poll_data(cx)) {
                None => self.read_done = true,
                Some(Ok(data)) => {
                    // The bytes leave h2's buffer now, so the peer may send that much more.
                    self.recv
                        .flow_control()
                        .release_capacity(data.len())
                        .map_err(h2_to_io)?;
                    if !data.is_empty() {
                        return Poll::Ready(Ok(Some(data)));
                    }
                }
                Some(Err(e)) if e.reason() == Some(Reason::NO_ERROR) && e.is_reset() => {
                    self.read_done = true;
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
            }
        }
    }

    /// Sends as much of `data` as the peer's flow-control window allows (at least one
    /// byte, waiting for window if there is none), advancing `data` past it. The bytes are
    /// handed to h2 as they are (no copy).
    pub fn poll_send(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        if self.write_done {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(()));
        }
        let n = ready!(self.poll_window(cx, data.len()))?;
        self.send
            .send_data(data.split_to(n), false)
            .map_err(h2_to_io)?;
        Poll::Ready(Ok(()))
    }

    /// Waits until up to `want` bytes may be sent; returns how many. Past the stall
    /// timeout without window, resets the stream and fails with [`Stalled`].
    fn poll_window(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        self.send.reserve_capacity(want);
        let capacity = match self.send.capacity() {
            0 => match self.send.poll_capacity(cx) {
                Poll::Ready(Some(Ok(n))) => n,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(h2_to_io(e))),
                Poll::Ready(None) => return Poll::Ready(Err(closed_error(&mut self.send, cx))),
                Poll::Pending => {
                    let Some(stall) = &mut self.stall else {
                        return Poll::Pending;
                    };
                    let stalled = ready!(stall.poll_waiting(cx));
                    self.abort();
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, stalled)));
                }
            },
            n => n,
        };
        if capacity > 0
            && let Some(stall) = &mut self.stall
        {
            stall.progress();
        }
        Poll::Ready(Ok(capacity.min(want)))
    }

    /// Ends the sending direction with END_STREAM (a half-close); reading goes on.
    pub fn finish(&mut self) -> io::Result<()> {
        if !self.write_done {
            self.write_done = true;
            self.send.reserve_capacity(0);
            self.send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
        }
        Ok(())
    }

    /// Aborts the tunnel with RST_STREAM(CANCEL), e.g. when the upstream connection failed.
    pub fn abort(&mut self) {
        self.send.send_reset(Reason::CANCEL);
        self.write_done = true;
    }
}

impl fmt::Debug for H2Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("H2Stream")
            .field("stream_id", &self.send.stream_id().as_u32())
            .field("read_done", &self.read_done)
            .field("write_done", &self.write_done)
            .field("stall_timeout", &self.stall.as_ref().map(|s| s.after))
            .finish()
    }
}

/// Maps an h2 error to the `io::Error` a TCP socket would have given.
pub(crate) fn h2_to_io(err: h2::Error) -> io::Error {
    if err.is_io() {
        return err
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    if err.is_reset() {
        return io::Error::new(io::ErrorKind::ConnectionReset, err);
    }
    if err.is_go_away() {
        return io::Error::new(io::ErrorKind::ConnectionAborted, err);
    }
    io::Error::other(err)
}

impl AsyncRead for H2Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(mut chunk) = ready!(this.poll_chunk(cx))? {
            let n = chunk.len().min(buf.remaining());
            buf.put_slice(&chunk[..n]);
            chunk.advance(n);
            // A chunk read to its end is dropped, not kept empty: it shares h2's read buffer
            // (up to a whole frame), which an idle tunnel would otherwise keep alive.
            if !chunk.is_empty() {
                this.pending = chunk;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write_done {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(this.poll_window(cx, buf.len()))?;
        this.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(h2_to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Data handed to h2 is written by the connection task; nothing is held here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.get_mut().finish())
    }
}

/// The send side closed under us: report the peer's reset if there was one.
fn closed_error(send: &mut SendStream<Bytes>, cx: &mut Context<'_>) -> io::Error {
    match send.poll_reset(cx) {
        Poll::Ready(Ok(reason)) => io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!("stream reset by peer: {reason}"),
        ),
        Poll::Ready(Err(e)) => h2_to_io(e),
        Poll::Pending => io::Error::new(io::ErrorKind::BrokenPipe, "stream closed"),
    }
}
