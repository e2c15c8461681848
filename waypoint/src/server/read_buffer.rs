//! The read buffer under a client's TLS connection. rustls asks for 4 KiB at a time; for a
//! bulk transfer, reading the socket through a buffer of one TLS record saves system calls.
//! But a waypoint holds many client connections, most of them idle between small requests,
//! so the buffer exists only during bulk transfers: reads go straight to the socket until
//! one fills all rustls asked for, then through the buffer until the socket has nothing
//! more to read, when the buffer is let go. An idle connection holds no read buffer, and a
//! small request allocates none.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};

/// Bytes read from the socket at once: one whole TLS record (16 KiB and its overhead).
const CAPACITY: usize = 16 * 1024 + 256;

/// A socket read through a buffer that is held only while bytes arrive.
#[derive(Debug)]
pub(super) struct ReadBuffered<IO> {
    io: IO,
    buf: BytesMut,
    /// Reading through `buf` (a bulk transfer), until the socket runs dry.
    buffering: bool,
}

impl<IO> ReadBuffered<IO> {
    pub(super) fn new(io: IO) -> ReadBuffered<IO> {
        ReadBuffered {
            io,
            buf: BytesMut::new(),
            buffering: false,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for ReadBuffered<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buf.is_empty() {
            // No buffer (small reads, or idle before) or a read as large as one: read directly.
            if !this.buffering || out.remaining() >= CAPACITY {
                let wanted = out.remaining();
                let polled = Pin::new(&mut this.io).poll_read(cx, out);
                if let Poll::Ready(Ok(())) = polled
                    && wanted > 0
                    && out.remaining() == 0
                {
                    // The read took all it could: more is likely waiting (a bulk transfer).
                    // Read through the buffer from now on, until the socket runs dry.
                    this.buffering = true;
                }
                return polled;
            }
            // Empty: the allocation is reused whole, or made (uninitialised) when there is none.
            this.buf.reserve(CAPACITY);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.io), cx, &mut this.buf) {
                Poll::Pending => {
                    // Nothing to read until the peer sends again: hold no buffer meanwhile.
                    this.buf = BytesMut::new();
                    this.buffering = false;
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // 0 bytes is the end of the stream: `out` stays empty, which says so.
                Poll::Ready(Ok(_)) => {}
            }
        }
        let n = out.remaining().min(this.buf.len());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

write_through!(ReadBuffered, io);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_pass_in_order_and_an_idle_socket_holds_no_buffer() {
        let (mut peer, io) = tokio::io::duplex(64 * 1024);
        let mut r = ReadBuffered::new(io);
        let sent: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
        peer.write_all(&sent).await.expect("write");
        let mut got = vec![0u8; sent.len()];
        // Small reads, as rustls makes them: the first fills up, the rest go through the
        // buffer.
        r.read_exact(&mut got[..4096]).await.expect("read");
        assert!(r.buffering, "buffered after a full read");
        r.read_exact(&mut got[4096..8192]).await.expect("read");
        assert_eq!(
            r.buf.len(),
            CAPACITY - 4096,
            "one read filled the whole buffer"
        );
        for chunk in got[8192..].chunks_mut(4096) {
            r.read_exact(chunk).await.expect("read");
        }
        assert_eq!(got, sent);
        // Nothing more to read: the next read waits, and the buffer is gone meanwhile.
        let mut one = [0u8; 1];
        let waiting = tokio::time::timeout(std::time::Duration::ZERO, r.read(&mut one)).await;
        assert!(waiting.is_err(), "nothing was sent");
        assert_eq!(r.buf.capacity(), 0);
        assert!(!r.buffering);
        peer.write_all(b"xy").await.expect("write");
        let mut two = [0u8; 4096];
        assert_eq!(r.read(&mut two).await.expect("read"), 2);
        assert_eq!(&two[..2], b"xy");
        assert_eq!(r.buf.capacity(), 0, "a small read needs no buffer");
        assert!(!r.buffering);
        r.write_all(b"back").await.expect("write");
        let mut back = [0u8; 4];
        peer.read_exact(&mut back).await.expect("read");
        assert_eq!(&back, b"back");
        drop(peer);
        assert_eq!(r.read(&mut one).await.expect("end of stream"), 0);
    }
}
