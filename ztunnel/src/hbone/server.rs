//! The inbound side: serve HBONE tunnels on one established mTLS connection.
//!
//! `serve` runs the HTTP/2 server, answers malformed requests itself (400/405) and hands
//! each valid CONNECT to the caller as an `Accepted`. The caller (the inbound proxy or a
//! waypoint) decides: `Responder::accept` answers 200 and yields the tunnel's byte stream,
//! `Responder::reject` answers with a status (401 denied by policy, 503 upstream unreachable,
//! 400). A responder dropped without an answer is answered 503, so a caller bug cannot leave
//! a client waiting forever.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{HeaderMap, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};

use super::request::validate;
use super::stream::H2Stream;
use super::{CONNECTION_WINDOW, HboneError, MAX_FRAME_SIZE, STREAM_WINDOW};
use crate::identity::Identity;

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
        Ok(H2Stream::new(send, body, None))
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
    serve_until(io, peer, config, on_stream, std::future::pending()).await
}

/// Like [`serve`], and when `shutdown` completes, sends GOAWAY: the client opens no new
/// stream here (it goes to a new connection, e.g. to the process replacing this one) while
/// the streams already open run to their end.
pub async fn serve_until<IO, F, Fut, S>(
    io: IO,
    peer: Identity,
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
    let mut going_away = false;
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
            unanswered = &mut keepalive => {
                // The peer reads nothing (a GOAWAY would not reach it either): dropping the
                // connection closes the socket and ends its streams.
                return Err(HboneError::KeepaliveTimeout(unanswered));
            }
        };
        let Some(next) = next else { break };
        let (request, respond) = next?;
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
                    },
                };
                tokio::spawn(on_stream(accepted));
            }
        }
    }
    Ok(())
}

/// Pings the peer every `interval` and completes, with the time waited, when a PING stays
/// unanswered for twice that. Pends forever when disabled or once the connection is closing
/// (`accept` reports that).
async fn keepalive(ping_pong: Option<h2::PingPong>, interval: Option<Duration>) -> Duration {
    let (Some(mut ping_pong), Some(interval)) = (ping_pong, interval) else {
        return std::future::pending().await;
    };
    let timeout = interval * 2;
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(_closing)) => return std::future::pending().await,
            Err(_) => return timeout,
        }
    }
}
