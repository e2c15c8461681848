//! Hostile HBONE CONNECT requests, at two depths (the first input byte chooses):
//!
//! - even: the pure request rules. The input is `<method>\n<uri or authority>\n<forwarded>`;
//!   `validate` sees the method and the URI both as `http` parses a request target and as h2
//!   builds it from a `:authority` pseudo-header, and `forwarded_for`/`forwarded_host` see
//!   the header value.
//! - odd: the HTTP/2 server (`hbone::serve`, no TLS) over an in-memory pipe, fed the client
//!   preface and then the input's bytes as frames. The handler rejects each CONNECT (401), or
//!   for half of the inputs accepts it and echoes a little, so both answer paths run.
//!
//! Nothing may panic; the server must end once the client's bytes are exhausted.
#![no_main]

use std::time::Duration;

use http::header::HeaderValue;
use http::{HeaderMap, Method, StatusCode, Uri};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use ztunnel::hbone::request::{FORWARDED, validate};
use ztunnel::hbone::{Accepted, ServerConfig, forwarded_for, forwarded_host, serve};
use ztunnel::identity::Identity;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        request_rules(rest);
    } else {
        h2_server(mode & 2 != 0, rest);
    }
});

fn request_rules(data: &[u8]) {
    let mut parts = data.splitn(3, |&b| b == b'\n');
    let method = parts.next().unwrap_or_default();
    let target = parts.next().unwrap_or_default();
    let forwarded = parts.next().unwrap_or_default();

    if let Ok(method) = Method::from_bytes(method) {
        if let Ok(uri) = Uri::try_from(target) {
            check_validated(&method, &uri);
        }
        // h2 builds a CONNECT's URI from `:authority` alone (RFC 9113 §8.5).
        if let Ok(uri) = Uri::builder().authority(target).build() {
            check_validated(&method, &uri);
        }
    }

    if let Ok(value) = HeaderValue::from_bytes(forwarded) {
        let mut headers = HeaderMap::new();
        headers.insert(FORWARDED, value);
        let _ = forwarded_for(&headers);
        let _ = forwarded_host(&headers);
    }
}

/// A destination `validate` accepts is a usable one.
fn check_validated(method: &Method, uri: &Uri) {
    if let Ok(dst) = validate(method, uri) {
        assert_eq!(method, Method::CONNECT);
        assert_ne!(dst.port(), 0);
        assert!(!dst.ip().is_unspecified());
    }
}

fn h2_server(accept: bool, frames: &[u8]) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime");
    let mut input = Vec::with_capacity(PREFACE.len() + frames.len());
    input.extend_from_slice(PREFACE);
    input.extend_from_slice(frames);
    runtime.block_on(async move {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (mut client_rx, mut client_tx) = tokio::io::split(client);
        let peer = Identity::new("cluster.local", "default", "sleep").expect("a valid identity");
        let config = ServerConfig::default();
        let write = async move {
            let _ = client_tx.write_all(&input).await;
            let _ = client_tx.shutdown().await;
            // Keep the write half open until the server is done with it.
            std::future::pending::<()>().await
        };
        let drain = async move {
            let mut sink = [0u8; 8192];
            while matches!(client_rx.read(&mut sink).await, Ok(n) if n > 0) {}
            std::future::pending::<()>().await
        };
        let server = serve(server, peer, &config, move |accepted: Accepted| {
            let _ = forwarded_for(&accepted.headers);
            let _ = forwarded_host(&accepted.headers);
            let responder = accepted.responder;
            async move {
                if !accept {
                    responder.reject(StatusCode::UNAUTHORIZED);
                    return;
                }
                if let Ok(mut stream) = responder.accept() {
                    let mut buf = [0u8; 256];
                    if let Ok(n) = stream.read(&mut buf).await {
                        let _ = stream.write_all(&buf[..n]).await;
                    }
                    let _ = stream.shutdown().await;
                }
            }
        });
        // The client's bytes are finite: a server still running after this long is a hang.
        let result = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::select! {
                result = server => result,
                () = write => unreachable!(),
                () = drain => unreachable!(),
            }
        })
        .await;
        assert!(
            result.is_ok(),
            "hbone::serve did not end after the client's EOF"
        );
    });
}
