//! A guard in front of the HTTP/1 server for request framing that can smuggle a request
//! past a proxy. It follows the stream's framing (each request head, then its body by
//! `Content-Length` or chunks) and, when a head carries both `Content-Length` and
//! `Transfer-Encoding`, or when the first chunk-size line that arrived with the head is not
//! a chunk size, hands the HTTP server an unparsable head instead, so the server answers
//! 400 and closes before anything is forwarded (as Envoy refuses such requests). Everything
//! else passes unchanged; whatever the guard does not follow (an upgrade, a head it cannot
//! parse) is passed on as it is, and the HTTP server, with the same parser, judges it.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};

use crate::metrics::{Metrics, RefusedLabels};

/// Heads longer than this are passed on for the HTTP server to refuse (hyper's limit is
/// about 400 KiB).
const MAX_HEAD: usize = 512 * 1024;
const MAX_HEADERS: usize = 128;
const READ_SIZE: usize = 16 * 1024;
/// What the HTTP server is given instead of a smuggling head: a request line it refuses.
const REFUSED: &[u8] = b"\x00 / HTTP/1.1\r\n\r\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Collecting a request head (nothing of it handed on yet); `scanned` bytes of it
    /// searched for its end already.
    Head {
        scanned: usize,
    },
    /// This many body bytes to pass.
    Body(u64),
    /// A chunk-size line, then `ChunkData`.
    ChunkSize,
    /// This many chunk bytes, then CRLF.
    ChunkData(u64),
    ChunkEnd,
    /// Trailer lines up to an empty line.
    Trailers,
    /// Not followed any more: everything passes.
    Through,
    /// A refused head was handed on: nothing more is.
    Refused,
}

/// Why a head is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    ContentLengthAndTransferEncoding,
    BadChunkSize,
}

impl Refusal {
    /// The `reason` label of `waypoint_refused_requests_total`.
    fn label(self) -> &'static str {
        match self {
            Refusal::ContentLengthAndTransferEncoding => "content_length_and_transfer_encoding",
            Refusal::BadChunkSize => "bad_chunk_size",
        }
    }
}

pub(super) struct H1Guard<S> {
    inner: S,
    state: State,
    /// Bytes read and not handed on yet: a head not complete yet, or what did not fit the
    /// reader's buffer. Usually empty, and then without an allocation: bytes are read into
    /// the HTTP server's buffer and checked there.
    pending: BytesMut,
    /// Bytes at the front of `pending` cleared to be handed on.
    ready: usize,
    eof: bool,
    refused: Option<Refusal>,
    metrics: Option<Arc<Metrics>>,
}

/// What a head says once it is whole.
enum HeadScan {
    /// Not whole yet.
    Incomplete,
    /// Whole, `len` bytes, followed by what `next` expects.
    Complete(usize, State),
    Refuse(Refusal),
}

impl<S> H1Guard<S> {
    /// A guard counting its refusals in `metrics` (none in unit tests).
    pub(super) fn new(inner: S, metrics: Option<Arc<Metrics>>) -> H1Guard<S> {
        H1Guard {
            inner,
            state: State::Head { scanned: 0 },
            pending: BytesMut::new(),
            ready: 0,
            eof: false,
            refused: None,
            metrics,
        }
    }

    /// Why the stream's last head was refused, if it was.
    #[cfg(test)]
    fn refused(&self) -> Option<Refusal> {
        self.refused
    }

    /// Follows the framing over `bytes` (which start where the last scan stopped): how many
    /// of them may be handed on, and whether the head after those is refused.
    fn scan(&mut self, bytes: &[u8]) -> (usize, Option<Refusal>) {
        let mut at = 0;
        while at < bytes.len() {
            let rest = &bytes[at..];
            match self.state {
                State::Through => return (bytes.len(), None),
                State::Refused => return (at, None),
                State::Body(n) => {
                    let take = (rest.len() as u64).min(n);
                    at += take as usize;
                    self.state = if take == n {
                        State::Head { scanned: 0 }
                    } else {
                        State::Body(n - take)
                    };
                }
                State::ChunkData(n) => {
                    let take = (rest.len() as u64).min(n);
                    at += take as usize;
                    self.state = if take == n {
                        State::ChunkEnd
                    } else {
                        State::ChunkData(n - take)
                    };
                }
                State::ChunkEnd | State::ChunkSize | State::Trailers => {
                    let Some(len) = line_len(rest) else {
                        return (at, None);
                    };
                    let line = &rest[..len];
                    self.state = match self.state {
                        State::ChunkEnd => State::ChunkSize,
                        State::ChunkSize => match chunk_size(line) {
                            Some(0) => State::Trailers,
                            Some(n) => State::ChunkData(n),
                            // The HTTP server refuses it as well; the head is gone already.
                            None => State::Through,
                        },
                        _ if line.trim_ascii().is_empty() => State::Head { scanned: 0 },
                        other => other,
                    };
                    at += len;
                }
                State::Head { scanned } => match self.head(rest, scanned) {
                    HeadScan::Incomplete => return (at, None),
                    HeadScan::Complete(len, next) => {
                        at += len;
                        self.state = next;
                    }
                    HeadScan::Refuse(why) => return (at, Some(why)),
                },
            }
        }
        (at, None)
    }

    /// A head at the start of `bytes`, of which `scanned` bytes were searched for its end
    /// already.
    fn head(&mut self, bytes: &[u8], scanned: usize) -> HeadScan {
        let Some(end) = head_end(bytes, scanned) else {
            if bytes.len() > MAX_HEAD {
                return HeadScan::Complete(0, State::Through);
            }
            self.state = State::Head {
                scanned: bytes.len().saturating_sub(3),
            };
            return HeadScan::Incomplete;
        };
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let framing = match req.parse(&bytes[..end]) {
            Ok(httparse::Status::Complete(_)) => framing(&req),
            _ => Framing::Unknown,
        };
        let next = match framing {
            Framing::None => State::Head { scanned: 0 },
            Framing::Length(n) => State::Body(n),
            Framing::Chunked => match line_len(&bytes[end..]) {
                Some(len) if chunk_size(&bytes[end..end + len]).is_none() => {
                    return HeadScan::Refuse(Refusal::BadChunkSize);
                }
                _ => State::ChunkSize,
            },
            Framing::Both => return HeadScan::Refuse(Refusal::ContentLengthAndTransferEncoding),
            Framing::Unknown => State::Through,
        };
        HeadScan::Complete(end, next)
    }

    /// From now on the HTTP server reads `REFUSED`, then the end of the stream.
    fn refuse(&mut self, why: Refusal) {
        self.pending.extend_from_slice(REFUSED);
        self.ready = self.pending.len();
        self.state = State::Refused;
        self.refused = Some(why);
        if let Some(m) = &self.metrics {
            m.refused
                .get_or_create(&RefusedLabels {
                    reason: why.label(),
                })
                .inc();
        }
        tracing::info!(
            reason = why.label(),
            "HTTP/1 request refused with 400 before it was read"
        );
    }
}

enum Framing {
    None,
    Length(u64),
    Chunked,
    Both,
    /// Upgrades, CONNECT, and framing the HTTP server refuses itself.
    Unknown,
}

fn framing(req: &httparse::Request<'_, '_>) -> Framing {
    fn named<'h, 'b>(
        headers: &'h [httparse::Header<'b>],
        name: &'static str,
    ) -> impl Iterator<Item = &'h httparse::Header<'b>> {
        headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
    }
    let named = |name: &'static str| named(req.headers, name);
    let te = named("transfer-encoding").count();
    let cl: Vec<&[u8]> = named("content-length").map(|h| h.value).collect();
    if te > 0 && !cl.is_empty() {
        return Framing::Both;
    }
    if req.method == Some("CONNECT") || named("upgrade").count() > 0 {
        return Framing::Unknown;
    }
    if te > 0 {
        let chunked_last = named("transfer-encoding").last().is_some_and(|h| {
            h.value
                .rsplit(|b| *b == b',')
                .next()
                .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"))
        });
        return if chunked_last {
            Framing::Chunked
        } else {
            Framing::Unknown
        };
    }
    let mut lengths = cl.iter().map(|v| {
        std::str::from_utf8(v.trim_ascii())
            .ok()?
            .parse::<u64>()
            .ok()
    });
    match lengths.next() {
        None => Framing::None,
        Some(Some(n)) if lengths.all(|l| l == Some(n)) => Framing::Length(n),
        Some(_) => Framing::Unknown,
    }
}

/// The length of the head at the start of `bytes` (through its empty line), searching
/// from `from`.
fn head_end(bytes: &[u8], from: usize) -> Option<usize> {
    // Empty lines before the request line are skipped by HTTP parsers.
    let start = bytes.iter().position(|b| *b != b'\r' && *b != b'\n')?;
    let from = from.max(start).min(bytes.len());
    bytes[from..]
        .windows(2)
        .enumerate()
        .find_map(|(i, w)| match w {
            b"\n\n" => Some(from + i + 2),
            b"\n\r" if bytes.get(from + i + 2) == Some(&b'\n') => Some(from + i + 3),
            _ => None,
        })
}

/// The length of the line at the start of `bytes`, with its LF.
fn line_len(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|b| *b == b'\n').map(|i| i + 1)
}

/// A chunk-size line's size: hex digits (at most 16), optional extensions after `;`.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\n")?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let size = line.split(|b| *b == b';').next()?.trim_ascii_end();
    if size.is_empty() || size.len() > 16 || !size.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(size).ok()?, 16).ok()
}

impl<S: AsyncRead + Unpin> AsyncRead for H1Guard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.ready > 0 {
                let n = this.ready.min(out.remaining());
                out.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                this.ready -= n;
                if this.pending.is_empty() {
                    // Nothing held while the connection is idle.
                    this.pending = BytesMut::new();
                }
                return Poll::Ready(Ok(()));
            }
            if this.state == State::Refused {
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // A head cut short by the end of the stream goes on as it is.
                this.state = State::Through;
                this.ready = this.pending.len();
                if this.ready == 0 {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            if this.pending.is_empty() {
                // Read into the server's buffer and check the bytes there; hold back only
                // what may not be handed on yet.
                let before = out.filled().len();
                ready!(Pin::new(&mut this.inner).poll_read(cx, out))?;
                let new = &out.filled()[before..];
                if new.is_empty() {
                    this.eof = true;
                    return Poll::Ready(Ok(()));
                }
                let (cleared, refused) = this.scan(new);
                if cleared < new.len() {
                    if refused.is_none() {
                        this.pending.extend_from_slice(&new[cleared..]);
                    }
                    out.set_filled(before + cleared);
                }
                if let Some(why) = refused {
                    this.refuse(why);
                }
                if cleared > 0 {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            // Part of a head is held: read behind it.
            let mut chunk = [0u8; READ_SIZE];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                this.eof = true;
                continue;
            }
            this.pending.extend_from_slice(read.filled());
            let pending = std::mem::take(&mut this.pending);
            let (cleared, refused) = this.scan(&pending);
            this.pending = pending;
            this.ready = cleared;
            if let Some(why) = refused {
                this.pending.truncate(cleared);
                this.refuse(why);
            }
        }
    }
}

write_through!(H1Guard, inner);

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// What the HTTP server reads when a client writes `chunks` (one write each) and
    /// closes.
    async fn through(chunks: &[&[u8]]) -> (Vec<u8>, Option<Refusal>) {
        through_reads(chunks, 64 * 1024).await
    }

    /// `through`, the server reading at most `read_size` bytes at a time.
    async fn through_reads(chunks: &[&[u8]], read_size: usize) -> (Vec<u8>, Option<Refusal>) {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        for c in chunks {
            client.write_all(c).await.unwrap();
        }
        drop(client);
        let mut guard = H1Guard::new(server, None);
        let mut got = Vec::new();
        let mut buf = vec![0u8; read_size];
        loop {
            let n = guard.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        (got, guard.refused())
    }

    /// Every way of cutting `bytes` in two writes.
    async fn every_split(bytes: &[u8]) -> Vec<(Vec<u8>, Option<Refusal>)> {
        let mut all = Vec::new();
        for i in 0..=bytes.len() {
            all.push(through(&[&bytes[..i], &bytes[i..]]).await);
        }
        all
    }

    const PIPELINE: &[u8] = b"\r\nPOST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
GET /b HTTP/1.1\r\nHost: x\r\n\r\n\
POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5;ext=1\r\nworld\r\n0\r\nx-trailer: 1\r\n\r\n\
POST /d HTTP/1.1\nHost: x\ncontent-length: 0\n\n";

    #[tokio::test]
    async fn well_framed_requests_pass_unchanged_however_they_arrive() {
        for (got, refused) in every_split(PIPELINE).await {
            assert_eq!(got, PIPELINE);
            assert_eq!(refused, None);
        }
    }

    #[tokio::test]
    async fn a_head_with_both_lengths_is_refused_even_behind_good_requests() {
        let good = b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n";
        let bad = b"POST /cart HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n";
        let stream = [&good[..], &bad[..]].concat();
        for (got, refused) in every_split(&stream).await {
            assert_eq!(got, [&good[..], REFUSED].concat());
            assert_eq!(refused, Some(Refusal::ContentLengthAndTransferEncoding));
        }
    }

    #[tokio::test]
    async fn a_bad_first_chunk_size_arriving_with_the_head_is_refused() {
        let bad =
            b"POST /cart HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n";
        let (got, refused) = through(&[bad]).await;
        assert_eq!(
            (got.as_slice(), refused),
            (REFUSED, Some(Refusal::BadChunkSize))
        );
        // One that comes later is left to the HTTP server, which refuses it too.
        let head = b"POST /cart HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let (got, refused) = through(&[head, b"3\r\nabc\r\n", b"-1\r\n"]).await;
        assert_eq!(got, [&head[..], b"3\r\nabc\r\n-1\r\n"].concat());
        assert_eq!(refused, None);
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(chunk_size(b"1a\r\n"), Some(26));
        assert_eq!(chunk_size(b"0;name=value\r\n"), Some(0));
        assert_eq!(chunk_size(b"ffffffffffffffff\r\n"), Some(u64::MAX));
        for bad in [
            &b"\r\n"[..],
            b"-1\r\n",
            b"0x10\r\n",
            b"10000000000000000\r\n",
            b" 5\r\n",
            b"5",
        ] {
            assert_eq!(chunk_size(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[tokio::test]
    async fn upgrades_and_unparsable_heads_pass_as_they_are() {
        let upgrade =
            b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x81\x05hello";
        assert_eq!(through(&[upgrade]).await, (upgrade.to_vec(), None));
        let odd = b"GET / HTTP/1.1\r\nno colon here\r\n\r\n";
        assert_eq!(through(&[odd]).await, (odd.to_vec(), None));
        let cut = b"GET / HTTP/1.1\r\nHost: x\r\n";
        assert_eq!(through(&[cut]).await, (cut.to_vec(), None));
    }

    /// Streams built from HTTP-ish pieces (heads with either or both lengths, bodies, chunk
    /// lines good and bad, upgrades, garbage), cut into writes at random and read with
    /// buffers of several sizes: the HTTP server reads either the stream unchanged, or it up
    /// to a head followed by `REFUSED`; and the same whatever the cuts and reads.
    #[tokio::test]
    async fn any_stream_passes_whole_or_up_to_a_refused_head_whatever_the_reads() {
        use rand::{Rng, SeedableRng};
        const PIECES: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST /p HTTP/1.1\r\nContent-Length: 3\r\n\r\n",
            b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST /p HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            b"abc",
            b"3\r\nabc\r\n",
            b"0\r\n\r\n",
            b"zz\r\n",
            b"\r\n",
            b"\n\n",
            b"x-t: 1\r\n",
            b"\x00\xff",
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let mut refusals = 0;
        for _ in 0..2_000 {
            let n = rng.random_range(1..8);
            let stream: Vec<u8> = (0..n)
                .flat_map(|_| PIECES[rng.random_range(0..PIECES.len())].iter().copied())
                .collect();
            let mut outcomes = Vec::new();
            for _ in 0..3 {
                let mut cuts: Vec<usize> = (0..rng.random_range(0..4))
                    .map(|_| rng.random_range(0..=stream.len()))
                    .collect();
                cuts.sort_unstable();
                let mut chunks = Vec::new();
                let mut at = 0;
                for c in cuts.into_iter().chain([stream.len()]) {
                    chunks.push(&stream[at..c]);
                    at = c;
                }
                let read_size = [1, 7, 64, 64 * 1024][rng.random_range(0..4)];
                outcomes.push(through_reads(&chunks, read_size).await);
            }
            // A bad first chunk size is refused early only when it arrived in the same read
            // as its head; otherwise the HTTP server refuses it. Everything else is the same
            // whatever the reads.
            let early_chunk_refusal = outcomes
                .iter()
                .any(|(_, r)| *r == Some(Refusal::BadChunkSize));
            assert!(
                early_chunk_refusal || outcomes.iter().all(|o| o == &outcomes[0]),
                "{:?}: {outcomes:?}",
                String::from_utf8_lossy(&stream)
            );
            for (got, refused) in &outcomes {
                match refused {
                    None => assert_eq!(got, &stream),
                    Some(_) => {
                        refusals += 1;
                        let kept = got
                            .strip_suffix(REFUSED)
                            .expect("ends with the refused head");
                        assert!(
                            stream.starts_with(kept),
                            "{:?}",
                            String::from_utf8_lossy(&stream)
                        );
                    }
                }
            }
        }
        // The generator reaches both outcomes.
        assert!(
            refusals > 0 && refusals < 6_000,
            "{refusals} of 6,000 reads refused"
        );
    }
}
