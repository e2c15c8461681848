//! Fetching a JWKS from real servers on the loopback: plain http, https with a CA made here,
//! the answers that are not a key set, and a URI whose server is not there at first (its
//! keys are missing until it comes up; then they are fetched on the next retry).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tokio::net::TcpListener;

use super::*;

const JWKS: &str = r#"{"keys": [{"kty": "EC", "crv": "P-256", "kid": "k",
  "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
  "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;

/// Serves `status` and `body` to every request on `listener`, over TLS with `tls`.
fn serve(
    listener: TcpListener,
    status: u16,
    body: &'static str,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let tls = tls.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_req| async move {
                    http::Response::builder()
                        .status(status)
                        .body(Full::new(Bytes::from_static(body.as_bytes())))
                });
                let http = hyper::server::conn::http1::Builder::new();
                let _ = match tls {
                    Some(t) => match t.accept(conn).await {
                        Ok(s) => http.serve_connection(TokioIo::new(s), service).await,
                        Err(_) => return,
                    },
                    None => http.serve_connection(TokioIo::new(conn), service).await,
                };
            });
        }
    });
}

async fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    (l, addr)
}

#[tokio::test]
async fn http_answers_are_read_as_a_key_set() {
    let (l, addr) = listener().await;
    serve(l, 200, JWKS, None);
    let jwks = fetch(&format!("http://{addr}/jwks"), &None)
        .await
        .expect("fetched");
    assert_eq!(
        jwks.candidates(Some("k"), jsonwebtoken::Algorithm::ES256)
            .count(),
        1
    );
    for (status, body, why) in [
        (404, "not here", "404"),
        (200, "<html>", "not JSON"),
        (200, r#"{"keys": []}"#, "none of the JWKS"),
    ] {
        let (l, addr) = listener().await;
        serve(l, status, body, None);
        let err = fetch(&format!("http://{addr}/jwks"), &None)
            .await
            .expect_err(why);
        assert!(err.contains(why), "{why}: {err}");
    }
}

#[tokio::test]
async fn https_needs_a_trusted_certificate() {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .signed_by(&key, &issuer)
        .expect("cert");
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .expect("server TLS");
    let (l, addr) = listener().await;
    serve(
        l,
        200,
        JWKS,
        Some(tokio_rustls::TlsAcceptor::from(Arc::new(server))),
    );
    let uri = format!("https://localhost:{}/jwks", addr.port());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).expect("root");
    assert!(fetch(&uri, &tls_with_roots(roots)).await.is_ok());
    let untrusted = fetch(&uri, &tls_with_roots(rustls::RootCertStore::empty()))
        .await
        .expect_err("an unknown CA");
    assert!(untrusted.contains("TLS with localhost"), "{untrusted}");
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
async fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

#[tokio::test]
async fn keys_are_missing_until_the_server_comes_up() {
    // A port nobody listens on, until the server is started on it below.
    let (l, addr) = listener().await;
    drop(l);
    let uri = format!("http://{addr}/jwks");
    let store = Arc::new(JwksStore::default());
    let metrics = Arc::new(Metrics::new());
    let task = tokio::spawn(keep_fetched(
        store.clone(),
        uri.clone(),
        Duration::from_secs(1),
        None,
        metrics.clone(),
    ));
    let errors = || {
        metrics
            .jwks_fetches
            .get_or_create(&crate::metrics::JwksFetchLabels { result: "error" })
            .get()
    };
    assert!(eventually(Duration::from_secs(5), || errors() >= 1).await);
    assert!(store.get(&uri).is_none(), "no keys while nothing answers");
    let l = TcpListener::bind(addr).await.expect("the same port again");
    serve(l, 200, JWKS, None);
    assert!(
        eventually(Duration::from_secs(10), || store.get(&uri).is_some()).await,
        "fetched on a retry"
    );
    task.abort();
}
