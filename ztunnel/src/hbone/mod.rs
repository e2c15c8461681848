//! HBONE: TCP connections carried as HTTP/2 CONNECT streams over mutual TLS (port 15008).
//!
//! - `request`: the CONNECT request rules, pure (build, validate, Istio status codes);
//! - `stream`: one tunnel as an `AsyncRead + AsyncWrite` byte stream;
//! - `client`: the pool of outbound HTTP/2 connections, keyed by who talks to whom;
//! - `pool_state`: the pool's decisions for one key (reuse, wait for a dial, dial), no I/O;
//! - `server`: accepting tunnels on an established TLS connection; the caller decides;
//! - `lifetime`: when a connection stops taking tunnels (certificate expiry, keep-alive).
//!
//! This module moves bytes and enforces the protocol. It never decides policy: which
//! destination is allowed, which identity to expect, where to connect are the callers'.

pub mod client;
mod lifetime;
mod pool_state;
pub mod request;
pub mod server;
pub mod stream;

use std::net::SocketAddr;

pub use client::{ClientTls, Pool, PoolConfig, PoolKey, PoolStats};
pub use request::{
    ConnectHeaders, Reject, forwarded_for, forwarded_host, is_traceparent, new_traceparent,
};
pub use server::{Accepted, Responder, ServerConfig, Session, serve, serve_until};
pub use stream::{H2Stream, Stalled, stalled};

use crate::tls::TlsError;

/// How long a tunnel may wait for flow-control window with bytes to send before it is
/// reset (`--hbone-stall-timeout`).
pub const DEFAULT_STALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The HBONE port every mesh workload (and waypoint) listens on.
pub const HBONE_PORT: u16 = 15008;
/// Flow-control windows (ztunnel's sizes): per stream and per connection.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest HTTP/2 frame either side accepts. With the default 16 KiB, every DATA frame is
/// its own TLS record and its own socket write; larger frames let one write carry several
/// records. 64 KiB is the most the relay reads from a socket at once, so each read still
/// goes out as one frame; a larger limit (Istio's ztunnel advertises 1 MiB) gains nothing
/// for that and leaves every connection that once received a large frame holding a read
/// buffer of its size (1.4 MB per connection after a 1 MiB upload through the waypoint).
pub const MAX_FRAME_SIZE: u32 = 64 * 1024;
/// Bytes read from the socket at once under TLS. rustls asks for 4 KiB at a time; this
/// buffer turns four or more of those reads into one system call.
pub(crate) const TLS_READ_BUFFER: usize = 64 * 1024;

/// Encrypted bytes a TLS session may hold before the socket takes them (rustls' buffer
/// limit; its default is 64 KiB). A relayed chunk is up to 64 KiB (one socket read) and h2
/// hands it over with its 9-byte frame header in one vectored write: under a 64 KiB limit
/// rustls takes all but the last few bytes, and those become a record and a system call of
/// their own — two writes per chunk instead of one.
pub const TLS_SEND_BUFFER: usize = 128 * 1024;

/// The TCP connection under an HBONE TLS session, read through [`TLS_READ_BUFFER`].
pub type TlsIo = tokio::io::BufReader<tokio::net::TcpStream>;

/// Wraps an HBONE TCP connection for TLS (see [`TlsIo`]).
pub fn tls_io(tcp: tokio::net::TcpStream) -> TlsIo {
    tokio::io::BufReader::with_capacity(TLS_READ_BUFFER, tcp)
}

/// Why a tunnel could not be opened or served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HboneError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("mTLS with {addr}: {source}")]
    Tls { addr: SocketAddr, source: TlsError },
    #[error("HTTP/2 with {addr}: {source}")]
    H2 { addr: SocketAddr, source: h2::Error },
    #[error("HTTP/2: {0}")]
    Protocol(#[from] h2::Error),
    #[error("{addr} did not answer within {after:?}")]
    Timeout {
        addr: SocketAddr,
        after: std::time::Duration,
    },
    #[error("peer left a PING unanswered for {0:?}: it is gone or stopped reading")]
    KeepaliveTimeout(std::time::Duration),
    #[error("tunnel denied by the destination (401)")]
    Denied,
    #[error("destination answered CONNECT with status {0}")]
    Status(http::StatusCode),
    #[error(transparent)]
    Request(#[from] request::RequestError),
    /// The failure of a dial that concurrent connects to one peer shared: each of them gets
    /// it (its message and source are the dial's).
    #[error(transparent)]
    Shared(std::sync::Arc<HboneError>),
}

impl HboneError {
    /// Classifies an h2 error on a connection to `addr`: a TLS alert or certificate error
    /// that only surfaced after the handshake (TLS 1.3 client auth) is reported as TLS.
    pub(crate) fn from_h2(addr: SocketAddr, source: h2::Error) -> Self {
        let tls = source
            .get_io()
            .filter(|io| {
                io.get_ref()
                    .is_some_and(|inner| inner.is::<rustls::Error>())
            })
            .map(crate::tls::handshake_error);
        match tls {
            Some(source) => HboneError::Tls { addr, source },
            None => HboneError::H2 { addr, source },
        }
    }

    /// Whether the peer said it turned the stream away without processing it: a GOAWAY
    /// that leaves the stream out, or a `REFUSED_STREAM` reset. Such a request can be sent
    /// again on another connection (RFC 9113, section 8.7).
    pub fn is_unprocessed(&self) -> bool {
        match self {
            HboneError::H2 { source, .. } | HboneError::Protocol(source) => {
                source.is_remote()
                    && (source.is_go_away() || source.reason() == Some(h2::Reason::REFUSED_STREAM))
            }
            HboneError::Shared(inner) => inner.is_unprocessed(),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests;
