//! Fetching the key sets of `jwksUri`s (there is no istiod here to inline them): one task per
//! URI in force, which fetches it over http or https within the rule's timeout, keeps it for
//! Envoy's default cache duration (10 minutes) and fetches it again. A set that cannot be
//! fetched is retried with backoff, logged and counted; until one has been fetched, tokens
//! of its issuer are refused (fail closed). A set that was fetched stays in use while a
//! refresh fails: it is still the issuer's.
//!
//! The only I/O of `policy::jwt`: the tasks write `JwksStore`, requests read it.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::RemoteKeys;
use super::jwks::Jwks;
use crate::metrics::Metrics;
use crate::snapshot::Snapshot;

/// Envoy's default `remote_jwks.cache_duration`.
pub const REFRESH: Duration = Duration::from_secs(600);
/// Backoff between failed fetches: from the first to the last, doubling.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// A key set larger than this is refused (a JWKS is a few kilobytes).
const MAX_BODY: usize = 1024 * 1024;

/// The client TLS configuration for https URIs.
type Tls = Option<Arc<rustls::ClientConfig>>;

/// The key sets fetched, by URI.
#[derive(Debug, Default)]
pub struct JwksStore {
    keys: RwLock<HashMap<String, Arc<Jwks>>>,
}

impl RemoteKeys for JwksStore {
    fn get(&self, uri: &str) -> Option<Arc<Jwks>> {
        self.keys.read().ok()?.get(uri).cloned()
    }
}

impl JwksStore {
    fn set(&self, uri: &str, jwks: Option<Arc<Jwks>>) {
        if let Ok(mut keys) = self.keys.write() {
            match jwks {
                Some(k) => keys.insert(uri.to_owned(), k),
                None => keys.remove(uri),
            };
        }
    }
}

/// Keeps one fetch task per `jwksUri` of the config in force, until the config changes.
pub async fn run(
    store: Arc<JwksStore>,
    mut snapshot: watch::Receiver<Arc<Snapshot>>,
    metrics: Arc<Metrics>,
) {
    let mut tasks: HashMap<String, (Duration, JoinHandle<()>)> = HashMap::new();
    let mut tls = None;
    loop {
        let wanted = snapshot.borrow_and_update().table.authn.remote_uris();
        tasks.retain(|uri, (timeout, task)| {
            let keep = wanted.get(uri) == Some(timeout);
            if !keep {
                task.abort();
            }
            if !wanted.contains_key(uri) {
                // No rule names it any more; a new timeout alone keeps the keys.
                store.set(uri, None);
            }
            keep
        });
        for (uri, timeout) in wanted {
            tasks.entry(uri.clone()).or_insert_with(|| {
                // The system's roots, read once, when the first URI needs them.
                let tls = tls.get_or_insert_with(system_tls).clone();
                let task = tokio::spawn(keep_fetched(
                    store.clone(),
                    uri,
                    timeout,
                    tls,
                    metrics.clone(),
                ));
                (timeout, task)
            });
        }
        if snapshot.changed().await.is_err() {
            break;
        }
    }
    for (_, (_, task)) in tasks {
        task.abort();
    }
}

async fn keep_fetched(
    store: Arc<JwksStore>,
    uri: String,
    timeout: Duration,
    tls: Tls,
    metrics: Arc<Metrics>,
) {
    let mut retry = RETRY_FIRST;
    let mut failing = false;
    loop {
        match tokio::time::timeout(timeout, fetch(&uri, &tls)).await {
            Ok(Ok(jwks)) => {
                metrics.jwks_fetch("ok");
                if failing || store.get(&uri).is_none() {
                    tracing::info!(uri, "JWKS fetched");
                }
                store.set(&uri, Some(Arc::new(jwks)));
                failing = false;
                retry = RETRY_FIRST;
                tokio::time::sleep(REFRESH).await;
            }
            outcome => {
                let why = match outcome {
                    Ok(Err(e)) => e,
                    _ => format!("no answer within {timeout:?}"),
                };
                metrics.jwks_fetch("error");
                let held = store.get(&uri).is_some();
                if !failing {
                    tracing::warn!(
                        uri,
                        error = why,
                        "JWKS fetch failed; {}; retrying with backoff",
                        if held {
                            "the keys fetched before stay in use"
                        } else {
                            "tokens of its issuer are refused until it succeeds"
                        }
                    );
                } else {
                    tracing::debug!(uri, error = why, "JWKS fetch failed again");
                }
                failing = true;
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(RETRY_MAX);
            }
        }
    }
}

/// One GET of `uri` (https with `tls`), read as a JWKS.
async fn fetch(uri: &str, tls: &Tls) -> Result<Jwks, String> {
    let parsed: http::Uri = uri.parse().map_err(|e| format!("bad URI: {e}"))?;
    let https = parsed.scheme_str() == Some("https");
    let host = parsed.host().ok_or("no host")?.to_owned();
    let port = parsed.port_u16().unwrap_or(if https { 443 } else { 80 });
    let bare_host = host.trim_start_matches('[').trim_end_matches(']');
    let tcp = TcpStream::connect((bare_host, port))
        .await
        .map_err(|e| format!("connect {host}:{port}: {e}"))?;
    let authority = parsed
        .authority()
        .map_or(host.clone(), |a| a.as_str().to_owned());
    let path = parsed
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    if https {
        let name = rustls_pki_types::ServerName::try_from(bare_host.to_owned())
            .map_err(|e| format!("{host} is not a TLS server name: {e}"))?;
        let tls =
            tokio_rustls::TlsConnector::from(tls.clone().ok_or("no TLS client configuration")?)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS with {host}: {e}"))?;
        get(tls, &authority, &path).await
    } else {
        get(tcp, &authority, &path).await
    }
}

async fn get<S>(stream: S, authority: &str, path: &str) -> Result<Jwks, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::get(path)
        .header(http::header::HOST, authority)
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("GET: {e}"))?;
    if resp.status() != http::StatusCode::OK {
        return Err(format!("answered {}", resp.status()));
    }
    let body = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| format!("reading the body: {e}"))?
        .to_bytes();
    let text = std::str::from_utf8(&body).map_err(|_| "the body is not UTF-8".to_owned())?;
    Jwks::parse(text)
}

/// Client TLS with the system's roots.
fn system_tls() -> Tls {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::warn!("reading the system's CA certificates (for https jwksUri): {e}");
    }
    for cert in found.certs {
        let _ = roots.add(cert);
    }
    tls_with_roots(roots)
}

/// Client TLS trusting `roots`, on the ring provider the workspace uses; `None` (https
/// fetches fail, and say why) if the provider cannot make one.
fn tls_with_roots(roots: rustls::RootCertStore) -> Tls {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    match rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
    {
        Ok(b) => Some(Arc::new(
            b.with_root_certificates(roots).with_no_client_auth(),
        )),
        Err(e) => {
            tracing::error!("no TLS client configuration for https jwksUri: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests;
