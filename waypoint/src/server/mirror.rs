//! Mirroring: a copy of a request sent, fire and forget, to another service (Istio
//! `mirror`/`mirrors`, Envoy's request mirror policy). The client's answer is the main
//! route's; the mirror's is read and dropped. A request body is teed: each chunk goes to the
//! main request and, while the mirror keeps up, to the mirror's copy; a mirror that falls
//! behind by more than a few chunks is abandoned, never the main request.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Request, header};
use http_body_util::BodyExt;
use hyper::body::{Frame, SizeHint};
use tokio::sync::mpsc;

use std::sync::Arc;

use crate::metrics::Metrics;
use crate::route::table::Mirror;
use crate::snapshot::Snapshot;
use crate::upstream::{Body, Endpoint, HttpPool, Protocol};

/// Chunks a mirror may lag behind the main request before it is abandoned.
const MIRROR_LAG: usize = 16;

/// A body that hands a copy of each chunk to the mirrors' bodies.
pub(super) struct Tee {
    inner: Body,
    copies: Vec<mpsc::Sender<Result<Frame<Bytes>, hyper::Error>>>,
}

impl Tee {
    /// Wraps `inner`; returns it with a body per mirror that receives the same chunks.
    pub(super) fn split(inner: Body, mirrors: usize) -> (Body, Vec<Body>) {
        let mut copies = Vec::with_capacity(mirrors);
        let mut bodies = Vec::with_capacity(mirrors);
        for _ in 0..mirrors {
            let (tx, rx) = mpsc::channel(MIRROR_LAG);
            copies.push(tx);
            bodies.push(http_body_util::StreamBody::new(tokio_stream_from(rx)).boxed_unsync());
        }
        (Tee { inner, copies }.boxed_unsync(), bodies)
    }
}

/// A receiver as a stream of frames.
fn tokio_stream_from(
    mut rx: mpsc::Receiver<Result<Frame<Bytes>, hyper::Error>>,
) -> impl futures::Stream<Item = Result<Frame<Bytes>, hyper::Error>> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

impl hyper::body::Body for Tee {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None | Some(Err(_))) = &polled {
            // The end (or a broken body): the mirrors' bodies end with it.
            self.copies.clear();
        }
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            let copy = |f: &Frame<Bytes>| match (f.data_ref(), f.trailers_ref()) {
                (Some(data), _) => Some(Frame::data(data.clone())),
                (None, Some(trailers)) => Some(Frame::trailers(trailers.clone())),
                (None, None) => None,
            };
            if copy(frame).is_some() {
                // A mirror that cannot take the chunk now is dropped (its body ends short
                // and its request fails): the main request never waits for it.
                self.copies
                    .retain(|tx| copy(frame).is_some_and(|c| tx.try_send(Ok(c)).is_ok()));
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The parts of the request a mirror copies.
pub(super) struct Copy<'a> {
    pub(super) method: &'a http::Method,
    pub(super) version: http::Version,
    pub(super) authority: &'a str,
    pub(super) path_and_query: &'a str,
    pub(super) headers: &'a http::HeaderMap,
}

/// Sends a copy of the request to an endpoint of `mirror`, in the background; the answer is
/// dropped. `suffix` appends `-shadow` to the authority's host (Envoy's and older Istio's
/// behaviour; off by default, as Istio 1.28+).
#[allow(clippy::too_many_arguments)]
pub(super) fn send(
    pool: &HttpPool,
    snap: &Snapshot,
    mirror: &Mirror,
    port: u16,
    copy: &Copy<'_>,
    body: Body,
    protocol: Protocol,
    suffix: bool,
    metrics: &Arc<Metrics>,
) {
    let Some(service) = snap.service(&mirror.host) else {
        tracing::debug!(host = %mirror.host, "mirror: no such service");
        return;
    };
    let eps = snap.endpoints(
        service,
        mirror.port.unwrap_or(port),
        mirror.subset.as_deref(),
    );
    let Some((w, addr)) = eps.random() else {
        tracing::debug!(host = %mirror.host, "mirror: no healthy endpoint");
        return;
    };
    let ep = Endpoint::new(w.clone(), *addr);
    let authority = if suffix {
        shadow(copy.authority)
    } else {
        copy.authority.to_owned()
    };
    let uri = match protocol {
        Protocol::Http1 => copy.path_and_query.to_owned(),
        Protocol::Http2 => format!("http://{authority}{}", copy.path_and_query),
    };
    let mut req = Request::new(body);
    *req.method_mut() = copy.method.clone();
    *req.version_mut() = copy.version;
    *req.headers_mut() = copy.headers.clone();
    match uri.parse() {
        Ok(uri) => *req.uri_mut() = uri,
        Err(_) => return,
    }
    if let Ok(host) = HeaderValue::from_str(&authority) {
        req.headers_mut().insert(header::HOST, host);
    }
    let pool = pool.clone();
    let metrics = metrics.clone();
    metrics.mirror("started");
    tokio::spawn(async move {
        match pool.send(&ep, protocol, req).await {
            Ok(response) => {
                // Read to the end, so the connection can serve the next request.
                let _ = response.into_body().collect().await;
            }
            Err((error, _)) => tracing::debug!(endpoint = %ep.addr, %error, "mirror failed"),
        }
        metrics.mirror("finished");
    });
}

/// `host[:port]` with `-shadow` appended to the host.
fn shadow(authority: &str) -> String {
    let (host, port) = crate::policy::redirect::split_authority(authority);
    match port {
        Some(p) => format!("{host}-shadow:{p}"),
        None => format!("{host}-shadow"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn shadow_suffix_goes_on_the_host() {
        assert_eq!(super::shadow("reviews:9080"), "reviews-shadow:9080");
        assert_eq!(super::shadow("reviews"), "reviews-shadow");
        assert_eq!(super::shadow("[::1]:80"), "[::1]-shadow:80");
    }
}
