//! A tiny HTTP/1.1 server for a process's own endpoints (admin, metrics, readiness): no request
//! bodies, one handler deciding from the method, path and query. Shared by ztunnel and the
//! waypoint; it knows nothing of either.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::task::JoinHandle;
use tracing::debug;

/// What a handler sees of a request.
#[derive(Debug, Clone)]
pub struct Req {
    pub method: Method,
    pub path: String,
    /// Decoded `key=value` pairs of the query, in order.
    pub query: Vec<(String, String)>,
}

impl Req {
    pub fn param(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A response: status, content type, body.
pub fn reply(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp
}

pub fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    reply(status, "text/plain; charset=utf-8", body.into())
}

pub fn json(value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut body =
        serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    body.push('\n');
    reply(StatusCode::OK, "application/json", body)
}

/// Binds `addr` and serves every connection with `handler` until the task is aborted.
pub async fn serve<F, Fut>(addr: SocketAddr, handler: F) -> std::io::Result<JoinHandle<()>>
where
    F: Fn(Req) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    // Reusable: during an upgrade the successor binds the same port while this one runs.
    let listener = crate::net::reusable_listener(addr)?;
    let handler = Arc::new(handler);
    Ok(tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(parse(&req)).await) }
                });
                if let Err(err) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(conn), service)
                    .await
                {
                    debug!(%err, "admin connection ended");
                }
            });
        }
    }))
}

fn parse(req: &Request<Incoming>) -> Req {
    let query = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect();
    Req {
        method: req.method().clone(),
        path: req.uri().path().to_owned(),
        query,
    }
}

/// Percent-decoding (and `+` as space) of a query component; invalid escapes stay as is.
pub fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::decode;

    #[test]
    fn decodes_query_components() {
        assert_eq!(decode("ztunnel%3A%3Aproxy%3Ddebug"), "ztunnel::proxy=debug");
        assert_eq!(decode("a+b"), "a b");
        assert_eq!(decode("100%"), "100%");
        assert_eq!(decode("%zz"), "%zz");
    }
}
