//! HTTP connections to endpoints over HBONE tunnels, kept for the next request. An HTTP/1.1
//! connection carries one request at a time: it goes back to the pool when its response body
//! has been read to the end (a response abandoned half-way closes it). An HTTP/2 connection is
//! shared by every request to its endpoint. A request that finds its pooled connection
//! already closed (the endpoint closed it while idle) is sent again on a new one: it was
//! never written.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::Endpoint;
use super::dial::{DialError, Dialer};

/// Every body the waypoint sends or receives.
pub type Body = UnsyncBoxBody<Bytes, hyper::Error>;

/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 64;

/// The HTTP version spoken to an endpoint: the one the client spoke (gRPC needs HTTP/2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http1,
    Http2,
}

/// Why a request got no response from its endpoint.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to {addr}: {source}")]
    Connect { addr: SocketAddr, source: DialError },
    #[error("HTTP handshake with {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("{addr} reset or closed the connection before a response: {source}")]
    Request {
        addr: SocketAddr,
        source: hyper::Error,
    },
}

impl UpstreamError {
    /// No connection was made (Envoy's `connect-failure`): nothing reached the endpoint.
    pub fn is_connect_failure(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect { .. } | UpstreamError::Handshake { .. }
        )
    }
}

/// A request that got no response, and the request itself if it was not sent.
pub type Failed = (UpstreamError, Option<Request<Body>>);

/// The pool. Cheap to clone.
#[derive(Clone)]
pub struct HttpPool {
    inner: Arc<Inner>,
}

struct Inner {
    dialer: Dialer,
    h1: Mutex<HashMap<Endpoint, Vec<http1::SendRequest<Body>>>>,
    h2: Mutex<HashMap<Endpoint, http2::SendRequest<Body>>>,
}

impl HttpPool {
    pub fn new(dialer: Dialer) -> HttpPool {
        HttpPool {
            inner: Arc::new(Inner {
                dialer,
                h1: Mutex::new(HashMap::new()),
                h2: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The dialer the pool's connections are made with (also for TCP relays).
    pub fn dialer(&self) -> &Dialer {
        &self.inner.dialer
    }

    /// Sends `req` to `ep` and returns the response head; its body streams from the endpoint.
    /// On failure the request comes back if none of it was sent (it may be sent elsewhere).
    pub async fn send(
        &self,
        ep: &Endpoint,
        protocol: Protocol,
        req: Request<Body>,
    ) -> Result<Response<Body>, Failed> {
        match protocol {
            Protocol::Http1 => self.send_h1(ep, req).await,
            Protocol::Http2 => self.send_h2(ep, req).await,
        }
    }

    async fn send_h1(
        &self,
        ep: &Endpoint,
        mut req: Request<Body>,
    ) -> Result<Response<Body>, Failed> {
        let addr = ep.addr;
        loop {
            let (mut sender, pooled) = match self.idle_h1(ep) {
                Some(sender) => (sender, true),
                // Boxed: dialling is rare, and its future (TLS handshake and all) would
                // otherwise be part of every request's, held per client connection.
                None => match Box::pin(self.dial_h1(ep)).await {
                    Ok(sender) => (sender, false),
                    Err(error) => return Err((error, Some(req))),
                },
            };
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                // Switched protocols: the connection now belongs to the upgraded stream.
                Ok(response) if response.status() == http::StatusCode::SWITCHING_PROTOCOLS => {
                    return Ok(response.map(BodyExt::boxed_unsync));
                }
                Ok(response) => {
                    let (parts, body) = response.into_parts();
                    let body = GiveBack {
                        body,
                        back: Some((self.clone(), ep.clone(), sender)),
                    };
                    return Ok(Response::from_parts(parts, body.boxed_unsync()));
                }
                Err(mut failed) => match failed.take_message() {
                    // Not written: the pooled connection was closing. Once more, anew.
                    Some(unsent) if pooled => req = unsent,
                    unsent => {
                        let error = UpstreamError::Request {
                            addr,
                            source: failed.into_error(),
                        };
                        return Err((error, unsent));
                    }
                },
            }
        }
    }

    fn idle_h1(&self, ep: &Endpoint) -> Option<http1::SendRequest<Body>> {
        let mut idle = self.inner.h1.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(ep)?;
        while let Some(sender) = list.pop() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    fn give_back(&self, ep: Endpoint, sender: http1::SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.inner.h1.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(ep).or_default();
        if list.len() < MAX_IDLE_PER_ENDPOINT {
            list.push(sender);
        }
    }

    async fn dial_h1(&self, ep: &Endpoint) -> Result<http1::SendRequest<Body>, UpstreamError> {
        let addr = ep.addr;
        let tunnel = self
            .inner
            .dialer
            .tunnel(ep)
            .await
            .map_err(|source| UpstreamError::Connect { addr, source })?;
        let (sender, connection) = http1::Builder::new()
            .max_buf_size(crate::H1_MAX_BUF)
            .handshake(TokioIo::new(tunnel))
            .await
            .map_err(|source| UpstreamError::Handshake { addr, source })?;
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(%addr, %error, "upstream HTTP/1.1 connection ended");
            }
        });
        Ok(sender)
    }

    async fn send_h2(
        &self,
        ep: &Endpoint,
        mut req: Request<Body>,
    ) -> Result<Response<Body>, Failed> {
        let addr = ep.addr;
        let mut dialed = false;
        loop {
            let shared = {
                let h2 = self.inner.h2.lock().unwrap_or_else(|p| p.into_inner());
                h2.get(ep).filter(|s| !s.is_closed()).cloned()
            };
            let mut sender = match shared {
                Some(sender) => sender,
                None => {
                    let sender = match Box::pin(self.dial_h2(ep)).await {
                        Ok(sender) => sender,
                        Err(error) => return Err((error, Some(req))),
                    };
                    dialed = true;
                    self.inner
                        .h2
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(ep.clone(), sender.clone());
                    sender
                }
            };
            match sender.try_send_request(req).await {
                Ok(response) => return Ok(response.map(BodyExt::boxed_unsync)),
                Err(mut failed) => match failed.take_message() {
                    Some(unsent) if !dialed => {
                        self.forget_h2(ep);
                        req = unsent;
                    }
                    unsent => {
                        let error = UpstreamError::Request {
                            addr,
                            source: failed.into_error(),
                        };
                        return Err((error, unsent));
                    }
                },
            }
        }
    }

    fn forget_h2(&self, ep: &Endpoint) {
        let mut h2 = self.inner.h2.lock().unwrap_or_else(|p| p.into_inner());
        if h2.get(ep).is_some_and(http2::SendRequest::is_closed) {
            h2.remove(ep);
        }
    }

    async fn dial_h2(&self, ep: &Endpoint) -> Result<http2::SendRequest<Body>, UpstreamError> {
        let addr = ep.addr;
        let tunnel = self
            .inner
            .dialer
            .tunnel(ep)
            .await
            .map_err(|source| UpstreamError::Connect { addr, source })?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(ztunnel::hbone::STREAM_WINDOW)
            .initial_connection_window_size(ztunnel::hbone::CONNECTION_WINDOW)
            .handshake(TokioIo::new(tunnel))
            .await
            .map_err(|source| UpstreamError::Handshake { addr, source })?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%addr, %error, "upstream HTTP/2 connection ended");
            }
        });
        Ok(sender)
    }
}

/// A response body that gives its HTTP/1.1 connection back to the pool once read to the end.
struct GiveBack {
    body: Incoming,
    back: Option<(HttpPool, Endpoint, http1::SendRequest<Body>)>,
}

impl hyper::body::Body for GiveBack {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(None) = polled
            && let Some((pool, ep, sender)) = self.back.take()
        {
            pool.give_back(ep, sender);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for GiveBack {
    fn drop(&mut self) {
        // A body known to be empty may never be polled: its connection is free all the same.
        if self.body.is_end_stream()
            && let Some((pool, ep, sender)) = self.back.take()
        {
            pool.give_back(ep, sender);
        }
    }
}
