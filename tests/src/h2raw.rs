//! HTTP/2 spoken by hand, for hostile-peer tests: frames are written byte by byte (9-byte
//! header + payload) so a test can break the rules a real client library enforces (more
//! streams than allowed, endless CONTINUATION, floods), and frames read back are only split,
//! never interpreted beyond what a test asserts.
//!
//! HPACK: requests use literal fields without indexing and with literal names (no table
//! state, no Huffman); answers are decoded only as far as `:status` (`status`).

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

pub const SETTINGS_ENABLE_PUSH: u16 = 0x2;
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;

/// Error codes (RFC 9113 §7).
pub const PROTOCOL_ERROR: u32 = 0x1;
pub const REFUSED_STREAM: u32 = 0x7;
pub const COMPRESSION_ERROR: u32 = 0x9;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// The largest frame payload a peer may send before the server raises SETTINGS_MAX_FRAME_SIZE.
pub const MAX_FRAME: usize = 16_384;

/// Appends one frame to `buf`.
pub fn frame(buf: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    assert!(payload.len() < 1 << 24, "frame payload too long");
    buf.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    buf.push(kind);
    buf.push(flags);
    buf.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    buf.extend_from_slice(payload);
}

/// A SETTINGS frame with these (identifier, value) pairs.
pub fn settings(buf: &mut Vec<u8>, params: &[(u16, u32)]) {
    let mut payload = Vec::with_capacity(params.len() * 6);
    for (id, value) in params {
        payload.extend_from_slice(&id.to_be_bytes());
        payload.extend_from_slice(&value.to_be_bytes());
    }
    frame(buf, SETTINGS, 0, 0, &payload);
}

/// The client preface and an initial SETTINGS frame with `params`.
pub fn preface(params: &[(u16, u32)]) -> Vec<u8> {
    let mut buf = PREFACE.to_vec();
    settings(&mut buf, params);
    buf
}

/// HPACK integer with an `n`-bit prefix whose high bits are `first` (RFC 7541 §5.1).
fn hpack_int(buf: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        buf.push(first | value as u8);
        return;
    }
    buf.push(first | max as u8);
    value -= max;
    while value >= 128 {
        buf.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    buf.push(value as u8);
}

/// One header field as an HPACK literal without indexing, with a literal name: decoding it
/// changes no table, so blocks can be cut and resent anywhere.
pub fn hpack_literal(buf: &mut Vec<u8>, name: &str, value: &[u8]) {
    buf.push(0x00);
    hpack_int(buf, 0, 7, name.len());
    buf.extend_from_slice(name.as_bytes());
    hpack_int(buf, 0, 7, value.len());
    buf.extend_from_slice(value);
}

/// One header field as an HPACK literal *with* incremental indexing (and a literal name): the
/// decoder adds it to its dynamic table, where it is index 62 until the next one is added.
pub fn hpack_indexed_literal(buf: &mut Vec<u8>, name: &str, value: &[u8]) {
    buf.push(0x40);
    hpack_int(buf, 0, 7, name.len());
    buf.extend_from_slice(name.as_bytes());
    hpack_int(buf, 0, 7, value.len());
    buf.extend_from_slice(value);
}

/// A reference to a table entry (RFC 7541 §6.1): 1 to 61 static, 62 and up dynamic.
pub fn hpack_indexed(buf: &mut Vec<u8>, index: usize) {
    hpack_int(buf, 0x80, 7, index);
}

/// The header block of a CONNECT for `authority`.
pub fn connect_block(authority: SocketAddr) -> Vec<u8> {
    let mut block = Vec::new();
    hpack_literal(&mut block, ":method", b"CONNECT");
    hpack_literal(&mut block, ":authority", authority.to_string().as_bytes());
    block
}

/// A header block as one HEADERS frame and as many CONTINUATION frames as it needs
/// (`chunk` bytes each), the last with END_HEADERS.
pub fn header_frames(buf: &mut Vec<u8>, stream: u32, block: &[u8], chunk: usize) {
    let mut parts = block.chunks(chunk).peekable();
    let mut kind = HEADERS;
    while let Some(part) = parts.next() {
        let flags = if parts.peek().is_none() {
            END_HEADERS
        } else {
            0
        };
        frame(buf, kind, flags, stream, part);
        kind = CONTINUATION;
    }
}

/// A frame as read from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The error code of a RST_STREAM or GOAWAY.
    pub fn error_code(&self) -> Option<u32> {
        let at = match self.kind {
            RST_STREAM => 0,
            GOAWAY => 4,
            _ => return None,
        };
        let bytes = self.payload.get(at..at + 4)?;
        Some(u32::from_be_bytes(bytes.try_into().ok()?))
    }

    /// The debug data of a GOAWAY (h2 names the limit a peer ran into).
    pub fn goaway_debug(&self) -> String {
        match self.kind {
            GOAWAY => String::from_utf8_lossy(self.payload.get(8..).unwrap_or_default()).into(),
            _ => String::new(),
        }
    }
}

/// Reads one frame; `Ok(None)` at a clean end of the connection.
pub async fn read_frame(r: &mut (impl AsyncRead + Unpin)) -> io::Result<Option<Frame>> {
    let mut head = [0u8; 9];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(Some(Frame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        payload,
    }))
}

/// Decodes response header blocks far enough to find `:status`, keeping the dynamic table
/// entries that hold a status (the server indexes statuses outside the static table, such as
/// 431 or 503, and refers to them by index afterwards). Strings are decoded when they are raw
/// or Huffman-coded digits, which is all a status is.
#[derive(Debug, Default)]
pub struct StatusDecoder {
    /// Newest first, as HPACK numbers them (index 62 is the newest); `None` for entries that
    /// are not a status.
    dynamic: Vec<Option<u16>>,
}

/// `:status` values of the HPACK static table (indices 8 to 14).
const STATIC_STATUS: [(usize, u16); 7] = [
    (8, 200),
    (9, 204),
    (10, 206),
    (11, 304),
    (12, 400),
    (13, 404),
    (14, 500),
];

impl StatusDecoder {
    /// The `:status` of one complete response header block (`None` if it has none).
    pub fn status(&mut self, block: &[u8]) -> io::Result<Option<u16>> {
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
        let mut at = 0;
        let mut status = None;
        while at < block.len() {
            let b = block[at];
            if b & 0x80 != 0 {
                let index = read_int(block, &mut at, 7).ok_or_else(|| bad("index"))?;
                if let Some(s) = self.lookup(index) {
                    status = Some(s);
                }
            } else if b & 0xe0 == 0x20 {
                // Dynamic table size update: no field.
                read_int(block, &mut at, 5).ok_or_else(|| bad("size update"))?;
            } else {
                let (prefix, indexing) = if b & 0x40 != 0 { (6, true) } else { (4, false) };
                let name = read_int(block, &mut at, prefix).ok_or_else(|| bad("name"))?;
                let is_status = if name == 0 {
                    read_string(block, &mut at).ok_or_else(|| bad("name string"))?
                        == Some(":status".to_owned())
                } else {
                    (8..=14).contains(&name) || self.lookup(name).is_some()
                };
                let value = read_string(block, &mut at).ok_or_else(|| bad("value"))?;
                let value = value.and_then(|v| v.parse::<u16>().ok());
                let value = value.filter(|_| is_status);
                if value.is_some() {
                    status = value;
                }
                if indexing {
                    self.dynamic.insert(0, value);
                }
            }
        }
        Ok(status)
    }

    fn lookup(&self, index: usize) -> Option<u16> {
        if let Some((_, s)) = STATIC_STATUS.iter().find(|(i, _)| *i == index) {
            return Some(*s);
        }
        index
            .checked_sub(62)
            .and_then(|i| self.dynamic.get(i).copied().flatten())
    }
}

fn read_int(block: &[u8], at: &mut usize, prefix: u32) -> Option<usize> {
    let max = (1usize << prefix) - 1;
    let mut value = (*block.get(*at)? as usize) & max;
    *at += 1;
    if value < max {
        return Some(value);
    }
    let mut shift = 0;
    loop {
        let b = *block.get(*at)?;
        *at += 1;
        value += ((b & 0x7f) as usize) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Some(value);
        }
        if shift > 28 {
            return None;
        }
    }
}

/// A string literal: `Some(None)` when it is Huffman-coded and not only digits.
fn read_string(block: &[u8], at: &mut usize) -> Option<Option<String>> {
    let huffman = *block.get(*at)? & 0x80 != 0;
    let len = read_int(block, at, 7)?;
    let bytes = block.get(*at..*at + len)?;
    *at += len;
    if !huffman {
        return Some(Some(String::from_utf8_lossy(bytes).into_owned()));
    }
    Some(huffman_digits(bytes))
}

/// Decodes a Huffman-coded string made of digits only (RFC 7541 Appendix B: `0`-`2` are the
/// 5-bit codes 0-2, `3`-`9` the 6-bit codes 0x19-0x1f), or `None`.
fn huffman_digits(bytes: &[u8]) -> Option<String> {
    let bits = bytes.len() * 8;
    let bit = |i: usize| (bytes[i / 8] >> (7 - i % 8)) & 1;
    let take = |from: usize, n: usize| (from..from + n).fold(0u8, |acc, i| (acc << 1) | bit(i));
    let mut out = String::new();
    let mut i = 0;
    while i < bits {
        let rest = bits - i;
        if rest < 8 && (i..bits).all(|j| bit(j) == 1) {
            break; // EOS padding
        }
        if rest >= 5 && take(i, 5) <= 2 {
            out.push((b'0' + take(i, 5)) as char);
            i += 5;
        } else if rest >= 6 && (0x19..=0x1f).contains(&take(i, 6)) {
            out.push((b'3' + take(i, 6) - 0x19) as char);
            i += 6;
        } else {
            return None;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_as_h2_encodes_them() {
        let mut d = StatusDecoder::default();
        // Indexed static entry: 200.
        assert_eq!(d.status(&[0x88]).unwrap(), Some(200));
        // Literal with incremental indexing, name index 8, Huffman "431" (0x69 0x90 0xff).
        assert_eq!(
            d.status(&[0x48, 0x83, 0x69, 0x90, 0xff]).unwrap(),
            Some(431)
        );
        // The same status again, by its dynamic index.
        assert_eq!(d.status(&[0xbe]).unwrap(), Some(431));
        // A raw literal status.
        assert_eq!(
            d.status(&[0x08, 0x03, b'5', b'0', b'3']).unwrap(),
            Some(503)
        );
    }

    /// What these helpers write is what h2's server accepts: a CONNECT, answered.
    #[tokio::test]
    async fn a_hand_written_connect_reaches_h2s_server() {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let target: SocketAddr = "10.0.0.1:8080".parse().unwrap();
        let serve = tokio::spawn(async move {
            let mut conn = h2::server::handshake(server).await?;
            let (req, mut respond) = conn.accept().await.expect("a request")?;
            respond.send_response(http::Response::new(()), false)?;
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            Ok::<_, h2::Error>((req.method().clone(), req.uri().to_string()))
        });
        let mut buf = preface(&[]);
        header_frames(&mut buf, 1, &connect_block(target), 7);
        client.write_all(&buf).await.unwrap();
        let (method, uri) = serve.await.unwrap().unwrap();
        assert_eq!(
            (method.as_str(), uri.as_str()),
            ("CONNECT", "10.0.0.1:8080")
        );
        let mut decoder = StatusDecoder::default();
        loop {
            let frame = read_frame(&mut client).await.unwrap().expect("an answer");
            if frame.kind == HEADERS {
                assert_eq!(decoder.status(&frame.payload).unwrap(), Some(200));
                break;
            }
        }
    }

    #[test]
    fn integers_past_their_prefix() {
        let mut buf = Vec::new();
        hpack_int(&mut buf, 0, 7, 1337);
        assert_eq!(read_int(&buf, &mut 0, 7), Some(1337));
    }
}
