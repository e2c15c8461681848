//! JWT issuers for the RequestAuthentication tests: an RSA key made by the `openssl` tool,
//! tokens signed with it (ring), its JWKS, and a small HTTP server that publishes the JWKS
//! inside a network namespace, as an identity provider's `jwksUri` does.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use ring::rand::SystemRandom;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair, RsaPublicKeyComponents};
use serde_json::{Value as Json, json};

use crate::netns::in_netns;

/// An issuer: its `iss`, and the RSA key (`kid`) it signs RS256 tokens with.
pub struct Issuer {
    pub iss: String,
    pub kid: String,
    key: RsaKeyPair,
}

impl Issuer {
    pub fn new(iss: &str, kid: &str) -> Issuer {
        let out = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ])
            .args(["-outform", "DER"])
            .output()
            .expect("openssl genpkey");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // `openssl genpkey -outform DER` writes an RSA key as PKCS#1.
        let key = RsaKeyPair::from_der(&out.stdout).expect("RSA key");
        Issuer {
            iss: iss.to_owned(),
            kid: kid.to_owned(),
            key,
        }
    }

    /// The JWKS publishing the public key.
    pub fn jwks(&self) -> String {
        let c: RsaPublicKeyComponents<Vec<u8>> = self.key.public().into();
        json!({"keys": [{"kty": "RSA", "alg": "RS256", "use": "sig", "kid": self.kid,
                         "n": URL_SAFE_NO_PAD.encode(&c.n), "e": URL_SAFE_NO_PAD.encode(&c.e)}]})
        .to_string()
    }

    /// An RS256 token for `sub`, valid for an hour from now, with `claims` added.
    pub fn token(&self, sub: &str, claims: Json) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut payload = json!({"iss": self.iss, "sub": sub, "iat": now, "exp": now + 3600});
        if let (Some(p), Json::Object(extra)) = (payload.as_object_mut(), claims) {
            p.extend(extra);
        }
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": self.kid});
        let b64 = |v: &Json| URL_SAFE_NO_PAD.encode(v.to_string());
        let signed = format!("{}.{}", b64(&header), b64(&payload));
        let mut sig = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                signed.as_bytes(),
                &mut sig,
            )
            .expect("sign");
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig))
    }
}

/// An HTTP server answering every request with a JWKS; it stops when the test process ends
/// (its thread is detached).
pub struct JwksServer {
    pub url: String,
    requests: Arc<AtomicU64>,
}

impl JwksServer {
    /// Serves `jwks` on `addr` inside `netns`, at `http://<addr>/jwks`.
    pub fn start(netns: &str, addr: SocketAddr, jwks: String) -> io::Result<JwksServer> {
        let listener = in_netns(netns, move || std::net::TcpListener::bind(addr))??;
        listener.set_nonblocking(true)?;
        let requests = Arc::new(AtomicU64::new(0));
        let counted = requests.clone();
        let body = Bytes::from(jwks);
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
                while let Ok((conn, _)) = listener.accept().await {
                    let body = body.clone();
                    let counted = counted.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |_req| {
                            counted.fetch_add(1, Ordering::Relaxed);
                            let resp = http::Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(body.clone()));
                            async move { resp }
                        });
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(conn), service)
                            .await;
                    });
                }
            });
        });
        Ok(JwksServer {
            url: jwks_url(addr),
            requests,
        })
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

/// Where a [`JwksServer`] on `addr` publishes.
pub fn jwks_url(addr: SocketAddr) -> String {
    format!("http://{addr}/jwks")
}
