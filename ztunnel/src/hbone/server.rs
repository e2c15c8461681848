//! The inbound side: serve HBONE tunnels on one established mTLS connection.
//!
//! `serve` runs the HTTP/2 server, answers malformed requests itself (400/405) and hands
//! each valid CONNECT to the caller as an `Accepted`. The caller (the inbound proxy or a
//! waypoint) decides: `Responder::accept` answers 200 and yields the tunnel's byte stream,
//! `Responder::reject` answers with a status (401 denied by policy, 503 upstream unreachable,
//! 400). A responder dropped without an answer is answered 503, so a caller bug cannot leave
//! a client waiting forever.
//!
//! A connection stops taking tunnels (GOAWAY; open ones run to their end) when the caller
//! shuts it down, or when a certificate of its handshake expires (see `lifetime`).

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream};
use http::{HeaderMap, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};

use super::lifetime::{keepalive, wall_clock_reaches};
use super::request::validate;
use super::stream::H2Stream;
use super::{CONNECTION_WINDOW, DEFAULT_STALL_TIMEOUT, HboneError, MAX_FRAME_SIZE, STREAM_WINDOW};
use crate::identity::Identity;
use crate::time::rfc3339;
use crate::tls::TlsError;

/// HTTP/2 server settings; defaults are Istio's. Each bounds what one (authenticated but
/// possibly hostile) peer can make this process hold.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Streams open at once on one connection; a peer that opens more gets each extra one
    /// refused with RST_STREAM(REFUSED_STREAM) (h2 answers a GOAWAY(ENHANCE_YOUR_CALM) after
    /// 1,024 such refusals).
    pub max_concurrent_streams: u32,
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    /// Largest request header block (decoded, RFC 9113 SETTINGS_MAX_HEADER_LIST_SIZE) that is
    /// read: a larger one is answered 431 without being kept; one four times larger, or a
    /// block spread over more CONTINUATION frames than this size needs, ends the connection
    /// with GOAWAY(ENHANCE_YOUR_CALM). h2's own default would be 16 MiB; CONNECT carries a
    /// few short headers.
    pub max_header_list_size: u32,
    /// Bytes h2 queues per stream for a peer that does not open its flow-control window;
    /// past that, writing to the tunnel waits, and so does reading from the application.
    pub max_send_buffer_size: usize,
    /// A PING is sent after this much time without one, and a peer that has not answered it
    /// within twice this time is taken for dead or stalled (it stopped reading): the
    /// connection is closed. `None`: never.
    pub keepalive: Option<Duration>,
    /// A tunnel with bytes waiting to be sent that the peer grants no flow-control window for
    /// this long (a peer that answers PINGs but never reads) is reset. `None`: never.
    pub stall_timeout: Option<Duration>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_concurrent_streams: 200,
            stream_window: STREAM_WINDOW,
            connection_window: CONNECTION_WINDOW,
            max_frame_size: MAX_FRAME_SIZE,
            max_header_list_size: 64 * 1024,
            max_send_buffer_size: 400 * 1024,
            keepalive: Some(Duration::from_secs(10)),
            stall_timeout: Some(DEFAULT_STALL_TIMEOUT),
        }
    }
}

/// What the TLS handshake of a served connection established: who the client is, and
/// until when the certificates of the handshake vouch for the two sides.
#[derive(Debug, Clone)]
pub struct Session {
    /// The identity the client proved.
    pub peer: Identity,
    /// When the certificate this side presented expires (`None`: no certificate, e.g. an
    /// in-memory pipe in tests).
    pub local_not_after: Option<SystemTime>,
    /// When the certificate the client presented expires.
    pub peer_not_after: Option<SystemTime>,
}

impl Session {
    /// A session that certificates do not bound.
    pub fn new(peer: Identity) -> Session {
        Session {
            peer,
            local_not_after: None,
            peer_not_after: None,
        }
    }

    /// Reads the client's identity and certificate expiry from an established mTLS
    /// connection; `local_not_after` is that of the certificate this side presented.
    pub fn from_tls(
        conn: &rustls::CommonState,
        local_not_after: SystemTime,
    ) -> Result<Session, TlsError> {
        Ok(Session {
            peer: crate::tls::peer_identity(conn)?,
            local_not_after: Some(local_not_after),
            peer_not_after: Some(crate::tls::peer_not_after(conn)?),
        })
    }

    /// The first expiry of the two certificates, and whose certificate it is.
    fn expiry(&self) -> Option<(SystemTime, &'static str)> {
        let local = self.local_not_after.map(|t| (t, "local"));
        let peer = self.peer_not_after.map(|t| (t, "peer"));
        match (local, peer) {
            (Some(l), Some(p)) => Some(if p.0 < l.0 { p } else { l }),
            (one, None) | (None, one) => one,
        }
    }
}

/// A valid CONNECT waiting for the caller's decision.
#[derive(Debug)]
pub struct Accepted {
    /// The original destination the client asked for.
    pub authority: SocketAddr,
    /// The identity the client proved in the TLS handshake.
    pub peer_identity: Identity,
    /// All request headers (`baggage`, `forwarded`, `traceparent`, ...).
    pub headers: HeaderMap,
    pub responder: Responder,
}

/// Answers one CONNECT, exactly once.
pub struct Responder {
    respond: Option<SendResponse<Bytes>>,
    body: Option<RecvStream>,
    stall_timeout: Option<Duration>,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responder")
            .field("answered", &self.respond.is_none())
            .finish()
    }
}

impl Responder {
    /// Answers 200 and returns the tunnel.
    pub fn accept(self) -> Result<H2Stream, HboneError> {
        self.accept_with(HeaderMap::new())
    }

    /// Answers 200 with extra response headers (Istio sends `baggage` back).
    pub fn accept_with(mut self, headers: HeaderMap) -> Result<H2Stream, HboneError> {
        let (Some(mut respond), Some(body)) = (self.respond.take(), self.body.take()) else {
            return Err(HboneError::Status(StatusCode::INTERNAL_SERVER_ERROR));
        };
        let mut response = Response::new(());
        *response.headers_mut() = headers;
        let send = respond.send_response(response, false)?;
        Ok(H2Stream::new(send, body, None, self.stall_timeout))
    }

    /// Answers with `status` and ends the stream.
    pub fn reject(mut self, status: StatusCode) {
        if let Some(respond) = self.respond.take() {
            answer(respond, status);
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if let Some(respond) = self.respond.take() {
            answer(respond, StatusCode::SERVICE_UNAVAILABLE);
        }
    }
}

fn answer(mut respond: SendResponse<Bytes>, status: StatusCode) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    if let Err(error) = respond.send_response(response, true) {
        tracing::debug!(%error, %status, "could not answer HBONE request");
    }
}

/// Serves HBONE on `io`, an mTLS connection whose client proved `peer`, until the client
/// closes it. `on_stream` is called once per valid CONNECT, from the accept loop: it should
/// only build the future, which runs as its own task.
pub async fn serve<IO, F, Fut>(
    io: IO,
    peer: Identity,
    config: &ServerConfig,
    on_stream: F,
) -> Result<(), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    F: Fn(Accepted) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    serve_until(
        io,
        Session::new(peer),
        config,
        on_stream,
        std::future::pending(),
    )
    .await
}

/// Like [`serve`], and sends GOAWAY when `shutdown` completes or a certificate of the
/// `session` expires, whichever comes first: the client opens no new stream here (it goes to
/// a new connection, e.g. to the process replacing this one, or with the certificates in
/// force now) while the streams already open run to their end. After an expiry, a stream
/// that crossed the GOAWAY is refused (RST_STREAM(REFUSED_STREAM): not processed, so the
/// client may retry it elsewhere, RFC 9113 §8.7).
pub async fn serve_until<IO, F, Fut, S>(
    io: IO,
    session: Session,
    config: &ServerConfig,
    on_stream: F,
    shutdown: S,
) -> Result<(), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    F: Fn(Accepted) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
    S: Future<Output = ()>,
{
    let mut shutdown = std::pin::pin!(shutdown);
    let expiry = session.expiry();
    let mut expired = std::pin::pin!(async {
        match expiry {
            Some((at, _)) => wall_clock_reaches(at).await,
            None => std::future::pending().await,
        }
    });
    let mut going_away = false;
    let mut refusing = false;
    let peer = session.peer;
    let mut connection = h2::server::Builder::new()
        .max_concurrent_streams(config.max_concurrent_streams)
        .initial_window_size(config.stream_window)
        .initial_connection_window_size(config.connection_window)
        .max_frame_size(config.max_frame_size)
        .max_header_list_size(config.max_header_list_size)
        .max_send_buffer_size(config.max_send_buffer_size)
        .handshake::<_, Bytes>(io)
        .await?;
    let mut keepalive = std::pin::pin!(keepalive(connection.ping_pong(), config.keepalive));
    // `accept` also drives the connection's I/O for the streams already handed out, and
    // returns `None` only once the connection is closed and its streams are done.
    loop {
        let next = tokio::select! {
            next = connection.accept() => next,
            () = &mut shutdown, if !going_away => {
                going_away = true;
                connection.graceful_shutdown();
                continue;
            }
            () = &mut expired, if !going_away => {
                if let Some((at, whose)) = expiry {
                    tracing::info!(%peer, expired_at = %rfc3339(at),
                        "{whose} certificate of an HBONE connection expired: GOAWAY, open tunnels run to their end");
                }
                going_away = true;
                refusing = true;
                connection.graceful_shutdown();
                continue;
            }
            unanswered = &mut keepalive => {
                // The peer reads nothing (a GOAWAY would not reach it either): dropping the
                // connection closes the socket and ends its streams.
                return Err(HboneError::KeepaliveTimeout(unanswered));
            }
        };
        let Some(next) = next else { break };
        let (request, mut respond) = next?;
        if refusing {
            respond.send_reset(Reason::REFUSED_STREAM);
            continue;
        }
        let (parts, body) = request.into_parts();
        match validate(&parts.method, &parts.uri) {
            Err(reject) => {
                tracing::debug!(peer = %peer, %reject, "rejecting HBONE request");
                answer(respond, reject.status());
            }
            Ok(authority) => {
                let accepted = Accepted {
                    authority,
                    peer_identity: peer.clone(),
                    headers: parts.headers,
                    responder: Responder {
                        respond: Some(respond),
                        body: Some(body),
                        stall_timeout: config.stall_timeout,
                    },
                };
                tokio::spawn(on_stream(accepted));
            }
        }
    }
    Ok(())
}
