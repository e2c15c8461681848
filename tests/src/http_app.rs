//! An HTTP application for the waypoint tests, and a client that speaks HTTP through an
//! HBONE tunnel.
//!
//! The application (`HttpApp`) serves HTTP/1.1 and h2c (told apart by the preface) on a pod
//! address. It answers every request with 200 and a text body that says who answered and
//! what arrived: `server <name>`, `method`, `path` (with query), `version`, `peer` (the TCP
//! peer it saw), then each request header as `header <name>: <value>`. A request header
//! `x-app-status: <code>` makes it answer with that status instead; with
//! `x-app-fail-percent: <p>` it answers 503 to each request with probability p/100, drawn
//! independently; `x-app-delay-ms: <ms>` delays the answer. A WebSocket handshake
//! (`Upgrade: websocket`) is accepted, and every message is echoed back prefixed with the
//! server's name. A gRPC request (`content-type: application/grpc...`) with
//! `x-app-echo-stream: 1` is answered as a stream: each chunk of its body is sent back as soon
//! as it arrives, then trailers with `grpc-status: 0`. It counts requests.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::netns::in_netns;

/// A running application; it stops when the test process ends (its thread is detached).
#[derive(Debug)]
pub struct HttpApp {
    pub addr: SocketAddr,
    requests: Arc<AtomicU64>,
    seen: Seen,
}

/// What the application saw of each request: its authority (`Host` or `:authority`) and
/// body length.
type Seen = Arc<std::sync::Mutex<Vec<(String, usize)>>>;

impl HttpApp {
    pub fn start(netns: &str, name: &str, addr: SocketAddr) -> io::Result<HttpApp> {
        HttpApp::start_failing(netns, name, addr, 0)
    }

    /// Like [`HttpApp::start`], and this instance answers 503 to each request with probability
    /// `fail_percent`/100 whatever the request says (an unhealthy replica).
    pub fn start_failing(
        netns: &str,
        name: &str,
        addr: SocketAddr,
        fail_percent: u64,
    ) -> io::Result<HttpApp> {
        let listener = in_netns(netns, move || std::net::TcpListener::bind(addr))??;
        listener.set_nonblocking(true)?;
        let requests = Arc::new(AtomicU64::new(0));
        let counted = requests.clone();
        let seen: Seen = Arc::default();
        let recorded = seen.clone();
        let name: Arc<str> = name.into();
        std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                while let Ok((conn, peer)) = listener.accept().await {
                    let name = name.clone();
                    let counted = counted.clone();
                    let recorded = recorded.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |req| {
                            counted.fetch_add(1, Ordering::Relaxed);
                            answer(name.clone(), peer, req, recorded.clone(), fail_percent)
                        });
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection_with_upgrades(TokioIo::new(conn), service)
                            .await;
                    });
                }
            });
        });
        Ok(HttpApp {
            addr,
            requests,
            seen,
        })
    }

    /// The authority and body length of every request answered so far, in order.
    pub fn seen(&self) -> Vec<(String, usize)> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

/// Accepts a WebSocket handshake and echoes messages on the upgraded connection.
/// The application's response bodies.
type AppBody = http_body_util::combinators::UnsyncBoxBody<Bytes, hyper::Error>;

fn full(bytes: Bytes) -> AppBody {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Echoes a streaming request's body chunk by chunk, then `grpc-status: 0` in trailers.
fn echo_stream(req: Request<Incoming>) -> Response<AppBody> {
    let (tx, mut rx) =
        tokio::sync::mpsc::channel::<Result<hyper::body::Frame<Bytes>, hyper::Error>>(16);
    let mut body = req.into_body();
    tokio::spawn(async move {
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Ok(data) = f.into_data()
                        && tx.send(Ok(hyper::body::Frame::data(data))).await.is_err()
                    {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let _ = tx.send(Ok(hyper::body::Frame::trailers(trailers))).await;
    });
    let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut r = Response::new(http_body_util::StreamBody::new(stream).boxed_unsync());
    r.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/grpc"),
    );
    r
}

fn websocket(name: Arc<str>, mut req: Request<Incoming>) -> Response<AppBody> {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{Message, handshake::derive_accept_key, protocol::Role};
    let Some(key) = req.headers().get("sec-websocket-key") else {
        let mut r = Response::new(full(Bytes::from_static(b"no sec-websocket-key\n")));
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return r;
    };
    let accept = derive_accept_key(key.as_bytes());
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        while let Some(Ok(msg)) = ws.next().await {
            let reply = match msg {
                Message::Text(t) => Message::text(format!("{name}: {t}")),
                Message::Binary(b) => Message::Binary(b),
                Message::Close(_) => break,
                _ => continue,
            };
            if ws.send(reply).await.is_err() {
                break;
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("upgrade", "websocket")
        .header("connection", "upgrade")
        .header("sec-websocket-accept", accept)
        .body(full(Bytes::new()))
        .unwrap_or_else(|_| Response::new(full(Bytes::new())))
}

async fn answer(
    name: Arc<str>,
    peer: SocketAddr,
    req: Request<Incoming>,
    seen: Seen,
    fail_percent: u64,
) -> Result<Response<AppBody>, Infallible> {
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get("host")
                .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
        })
        .unwrap_or_default();
    if req
        .headers()
        .get("upgrade")
        .is_some_and(|u| u.as_bytes().eq_ignore_ascii_case(b"websocket"))
    {
        return Ok(websocket(name, req));
    }
    let grpc = req
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc && req.headers().contains_key("x-app-echo-stream") {
        return Ok(echo_stream(req));
    }
    let mut text = format!(
        "server {name}\nmethod {}\npath {}\nversion {:?}\npeer {peer}\n",
        req.method(),
        req.uri().path_and_query().map_or("/", |p| p.as_str()),
        req.version(),
    );
    if let Some(a) = req.uri().authority() {
        text.push_str(&format!("authority {a}\n"));
    }
    for (k, v) in req.headers() {
        text.push_str(&format!(
            "header {k}: {}\n",
            String::from_utf8_lossy(v.as_bytes())
        ));
    }
    let number = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    let mut status = number("x-app-status")
        .and_then(|s| u16::try_from(s).ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    if let Some(p) = number("x-app-fail-percent").or(Some(fail_percent).filter(|p| *p > 0))
        && rand::random_range(0..100) < p
    {
        status = StatusCode::SERVICE_UNAVAILABLE;
    }
    if let Some(ms) = number("x-app-delay-ms") {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    text.push_str(&format!("body-length {}\n", body.len()));
    if let Ok(mut s) = seen.lock() {
        s.push((authority, body.len()));
    }
    let mut resp = Response::new(full(Bytes::from(text)));
    *resp.status_mut() = status;
    Ok(resp)
}

/// A response as the tests read it.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Answer {
    /// The `server` line of the application's body (who answered), if it answered.
    pub fn server(&self) -> Option<&str> {
        self.line("server")
    }

    /// The value of a `<key> <value>` line of the body.
    pub fn line(&self, key: &str) -> Option<&str> {
        self.body
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
    }

    /// The request headers the application saw.
    pub fn request_headers(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for l in self.body.lines() {
            if let Some((k, v)) = l.strip_prefix("header ").and_then(|h| h.split_once(": ")) {
                out.entry(k.to_owned()).or_default().push(v.to_owned());
            }
        }
        out
    }
}

/// Which HTTP version a client speaks inside its tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Http1,
    /// HTTP/2 with prior knowledge (h2c).
    Http2,
}

/// An HTTP connection inside one HBONE tunnel: requests go one after another (HTTP/1.1) or
/// side by side (HTTP/2) on it.
#[derive(Clone)]
pub enum HttpConn {
    Http1(Arc<tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<Full<Bytes>>>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl HttpConn {
    /// Speaks `version` over `io` (a tunnel).
    pub async fn handshake<T>(io: T, version: Version) -> io::Result<HttpConn>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let io = TokioIo::new(io);
        match version {
            Version::Http1 => {
                let (send, conn) = hyper::client::conn::http1::handshake(io)
                    .await
                    .map_err(io::Error::other)?;
                tokio::spawn(conn);
                Ok(HttpConn::Http1(Arc::new(tokio::sync::Mutex::new(send))))
            }
            Version::Http2 => {
                let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(io::Error::other)?;
                tokio::spawn(conn);
                Ok(HttpConn::Http2(send))
            }
        }
    }

    /// Sends a request (`authority` becomes `Host` or `:authority`) and reads the whole answer.
    pub async fn send(
        &self,
        method: &str,
        authority: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> io::Result<Answer> {
        let mut b = Request::builder().method(method);
        b = match self {
            HttpConn::Http1(_) => b.uri(path).header("host", authority),
            HttpConn::Http2(_) => b.uri(format!("http://{authority}{path}")),
        };
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(body)).map_err(io::Error::other)?;
        let resp = match self {
            HttpConn::Http1(send) => {
                let mut send = send.lock().await;
                send.ready().await.map_err(io::Error::other)?;
                send.send_request(req).await
            }
            HttpConn::Http2(send) => send.clone().send_request(req).await,
        }
        .map_err(io::Error::other)?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(io::Error::other)?
            .to_bytes();
        Ok(Answer {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    /// A GET of `path` with extra headers.
    pub async fn get(
        &self,
        authority: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> io::Result<Answer> {
        self.send("GET", authority, path, headers, Bytes::new())
            .await
    }
}
