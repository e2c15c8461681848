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
//!   (h2 sends RST_STREAM(CANCEL)), which the peer sees as an aborted connection.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf as _, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

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
    _on_drop: Option<OnDrop>,
}

impl H2Stream {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream, on_drop: Option<OnDrop>) -> Self {
        H2Stream {
            send,
            recv,
            pending: Bytes::new(),
            read_done: false,
            write_done: false,
            _on_drop: on_drop,
        }
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
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.read_done {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                None => this.read_done = true,
                Some(Ok(data)) => {
                    // The bytes leave h2's buffer now, so the peer may send that much more.
                    this.recv
                        .flow_control()
                        .release_capacity(data.len())
                        .map_err(h2_to_io)?;
                    this.pending = data;
                }
                Some(Err(e)) if e.reason() == Some(Reason::NO_ERROR) && e.is_reset() => {
                    this.read_done = true;
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
            }
        }
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
        this.send.reserve_capacity(buf.len());
        let capacity = match this.send.capacity() {
            0 => match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(n)) => n,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => return Poll::Ready(Err(closed_error(&mut this.send, cx))),
            },
            n => n,
        };
        let n = capacity.min(buf.len());
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
        let this = self.get_mut();
        if !this.write_done {
            this.write_done = true;
            this.send.reserve_capacity(0);
            this.send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
        }
        Poll::Ready(Ok(()))
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
