//! Protocol detection for ports that declare none: the first bytes a client sends tell an
//! HTTP/1 request line or the HTTP/2 preface from anything else, as Istio's proxies detect
//! it. What was read to decide is replayed (`Replay`), so the HTTP server or the TCP relay
//! sees the stream from its first byte.
//!
//! HTTP parsers skip empty lines before a request line, and so does this: otherwise a client
//! could hide a request from the waypoint's routes behind a leading CRLF and still have the
//! backend read it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

/// What the first bytes say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Detected {
    Http,
    /// Not HTTP: relayed as bytes.
    Opaque,
    /// The client sent nothing within the detection timeout (a protocol where the server
    /// speaks first): relayed as bytes.
    Silent,
    /// The client closed before sending a byte.
    Closed,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether what `detect` read starts an HTTP/2 connection.
pub(super) fn is_h2(head: &[u8]) -> bool {
    head.starts_with(H2_PREFACE)
}

/// Past this many bytes without the end of a request line that is HTTP so far, it is taken
/// as HTTP: the HTTP server answers an overlong line itself (414/400).
const MAX_LINE: usize = 16 * 1024;

/// `Some` once `bytes` decide; `None` while they could still be either.
pub(super) fn classify(bytes: &[u8]) -> Option<Detected> {
    let n = H2_PREFACE.len().min(bytes.len());
    if bytes[..n] == H2_PREFACE[..n] {
        return (bytes.len() >= H2_PREFACE.len()).then_some(Detected::Http);
    }
    let start = bytes
        .iter()
        .position(|b| *b != b'\r' && *b != b'\n')
        .unwrap_or(bytes.len());
    if start > MAX_LINE {
        return Some(Detected::Opaque);
    }
    request_line(&bytes[start..])
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `method SP target SP HTTP/d.d CRLF`, checked as far as `line` goes.
fn request_line(line: &[u8]) -> Option<Detected> {
    let opaque = Some(Detected::Opaque);
    let method = line.iter().take_while(|b| is_tchar(**b)).count();
    let &after_method = line.get(method)?;
    if method == 0 || after_method != b' ' {
        return opaque;
    }
    let rest = &line[method + 1..];
    let target = rest
        .iter()
        .take_while(|b| **b > b' ' && **b != 0x7f)
        .count();
    let Some(&after_target) = rest.get(target) else {
        return (line.len() > MAX_LINE).then_some(Detected::Http);
    };
    if target == 0 || after_target != b' ' {
        return opaque;
    }
    let version = &rest[target + 1..];
    const SHAPE: &[u8] = b"HTTP/d.d";
    for (i, want) in SHAPE.iter().enumerate() {
        let &b = version.get(i)?;
        let fits = if *want == b'd' {
            b.is_ascii_digit()
        } else {
            b == *want
        };
        if !fits {
            return opaque;
        }
    }
    match version.get(SHAPE.len()..) {
        Some([b'\n', ..] | [b'\r', b'\n', ..]) => Some(Detected::Http),
        Some([] | [b'\r']) => None,
        _ => opaque,
    }
}

/// Reads from `stream` until its first bytes decide. `timeout`: how long to wait for the
/// first byte (`None`: as long as it takes, Istio's default).
pub(super) async fn detect<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Option<Duration>,
) -> io::Result<(Detected, BytesMut)> {
    let mut seen = BytesMut::with_capacity(1024);
    loop {
        let first = seen.is_empty();
        let read = stream.read_buf(&mut seen);
        let n = match (timeout, first) {
            (Some(t), true) => match tokio::time::timeout(t, read).await {
                Ok(n) => n?,
                Err(_) => return Ok((Detected::Silent, seen)),
            },
            _ => read.await?,
        };
        if n == 0 {
            let end = if seen.is_empty() {
                Detected::Closed
            } else {
                // Ended before deciding: whatever it was, it is passed on as bytes.
                classify(&seen).unwrap_or(Detected::Opaque)
            };
            return Ok((end, seen));
        }
        if let Some(d) = classify(&seen) {
            return Ok((d, seen));
        }
    }
}

/// A stream that first yields bytes already read from it.
pub(super) struct Replay<S> {
    head: BytesMut,
    pub(super) inner: S,
}

impl<S> Replay<S> {
    pub(super) fn new(head: BytesMut, inner: S) -> Replay<S> {
        Replay { head, inner }
    }

    /// The bytes read ahead and not yet replayed.
    pub(super) fn head(&self) -> &[u8] {
        &self.head
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.head.has_remaining() {
            let n = self.head.len().min(buf.remaining());
            buf.put_slice(&self.head[..n]);
            self.head.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

write_through!(Replay, inner);

#[cfg(test)]
mod tests {
    use super::*;

    fn every_prefix(bytes: &[u8]) -> Vec<Option<Detected>> {
        (1..=bytes.len()).map(|n| classify(&bytes[..n])).collect()
    }

    #[test]
    fn request_lines_and_the_h2_preface_are_http() {
        for line in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"POST /cart?id=1 HTTP/1.0\n",
            b"PURGE-ALL /x HTTP/1.1\r\n",
            b"OPTIONS * HTTP/1.1\r\n",
            b"\r\n\r\nGET http://reviews:9080/ HTTP/1.1\r\n",
            H2_PREFACE,
        ] {
            let all = every_prefix(line);
            let (last, before) = all.split_last().unwrap();
            assert_eq!(
                *last,
                Some(Detected::Http),
                "{:?}",
                String::from_utf8_lossy(line)
            );
            // Undecided until the line is whole.
            assert!(
                before.iter().all(Option::is_none),
                "{:?}: {before:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn anything_else_is_opaque_as_soon_as_a_byte_says_so() {
        for (bytes, decided_at) in [
            (&b"\x16\x03\x01\x02\x00"[..], 1), // a TLS ClientHello
            (b"\x00\x01 not http\n", 1),
            (b"GET\t/ HTTP/1.1\r\n", 4),
            (b"GET  / HTTP/1.1\r\n", 5),
            (b"GET / FTP/1.1\r\n", 7),
            (b"GET / HTTP/1.x\r\n", 14),
            (b"GET / HTTP/1.1 extra\r\n", 15),
        ] {
            let all = every_prefix(bytes);
            let first = all.iter().position(Option::is_some).expect("decided");
            assert_eq!(
                first + 1,
                decided_at,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
            assert_eq!(all[first], Some(Detected::Opaque));
        }
    }

    #[test]
    fn a_broken_h2_preface_is_still_an_http_request_line() {
        // The HTTP server answers it (400), as it would without detection.
        assert_eq!(classify(&H2_PREFACE[..18]), None);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nXX"), Some(Detected::Http));
    }

    #[test]
    fn an_overlong_target_is_left_to_the_http_server() {
        let mut line = b"GET /".to_vec();
        line.extend(std::iter::repeat_n(b'a', MAX_LINE));
        assert_eq!(classify(&line), Some(Detected::Http));
        assert_eq!(classify(&line[..MAX_LINE / 2]), None);
    }

    #[tokio::test]
    async fn what_was_read_is_replayed_and_silence_times_out() {
        let (mut client, server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"\x00hello")
            .await
            .unwrap();
        let mut server = server;
        let (d, head) = detect(&mut server, None).await.unwrap();
        assert_eq!(d, Detected::Opaque);
        let mut replay = Replay::new(head, server);
        tokio::io::AsyncWriteExt::write_all(&mut client, b" world")
            .await
            .unwrap();
        drop(client);
        let mut all = Vec::new();
        replay.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"\x00hello world");

        let (_client, mut server) = tokio::io::duplex(64);
        let (d, head) = detect(&mut server, Some(Duration::from_millis(20)))
            .await
            .unwrap();
        assert_eq!((d, head.len()), (Detected::Silent, 0));

        let (client, mut server) = tokio::io::duplex(64);
        drop(client);
        let (d, _) = detect(&mut server, None).await.unwrap();
        assert_eq!(d, Detected::Closed);
    }

    /// Once the first bytes decide, more bytes never change the decision, whatever they are.
    #[test]
    fn a_decision_never_changes_with_more_bytes() {
        use rand::{Rng, SeedableRng};
        // A request line's parts, each chosen from good and bad variants.
        const PARTS: [&[&[u8]]; 6] = [
            &[b"", b"\r\n", b"\n\n", b"\x16\x03"],
            &[b"GET", b"PRI", b"M-SEARCH", b"", b"G\x00T"],
            &[b" ", b"  ", b"\t"],
            &[b"/x", b"*", b"http://a/b?c", b""],
            &[
                b" HTTP/1.1",
                b" HTTP/2.0",
                b" HTTP/1.x",
                b" FTP/1.0",
                b"HTTP/1.0",
            ],
            &[b"\r\n", b"\n", b"\r", b" \r\n", b"\r\n\r\nSM\r\n\r\n", b""],
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut decided = [0usize; 2];
        for _ in 0..5_000 {
            let bytes: Vec<u8> = PARTS
                .iter()
                .flat_map(|variants| {
                    variants[rng.random_range(0..variants.len())]
                        .iter()
                        .copied()
                })
                .collect();
            let all = every_prefix(&bytes);
            if let Some(first) = all.iter().position(Option::is_some) {
                assert!(
                    all[first..].iter().all(|d| *d == all[first]),
                    "{:?}: {all:?}",
                    String::from_utf8_lossy(&bytes)
                );
                decided[usize::from(all[first] == Some(Detected::Http))] += 1;
            }
        }
        // The generator reaches both decisions.
        assert!(decided.iter().all(|n| *n > 0), "{decided:?}");
    }
}
