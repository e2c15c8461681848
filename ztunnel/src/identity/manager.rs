//! The certificate cache: one certificate per local workload identity, fetched on first use
//! and re-issued in the background half-way through its lifetime.
//!
//! Rules this module keeps:
//! - concurrent callers asking for the same identity share one fetch (renewals included);
//! - a failed renewal is retried with exponential backoff, capped at an eighth of the
//!   certificate's lifetime (so a short-lived certificate gets several tries before it
//!   expires), while the old certificate keeps being served until it expires;
//! - an expired certificate is never served: callers get `ManagerError::Expired`, naming the
//!   identity, the expiry and the CA's last error. Right after a failure callers get it at
//!   once (no hang, and no request to the CA per connection); after `initial_backoff` the
//!   next caller asks the CA again and waits for that answer, so traffic brings a
//!   certificate back as soon as the CA answers;
//! - `forget` drops an identity and stops its refresh, so certificates of workloads that left
//!   the node are neither served nor renewed.
//!
//! Time comes from an injected `Clock`, so tests drive rotation without sleeping.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};

use super::Identity;
use super::ca::{CaError, CertificateSource};
use super::cert::WorkloadCert;
use crate::time::rfc3339;

/// Wall-clock time and sleeping, injectable for tests.
pub trait Clock: Send + Sync {
    fn now(&self) -> SystemTime;
    /// Resolves once `duration` has passed on this clock.
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// The real clock: `SystemTime` for certificate validity, tokio timers for waiting.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(tokio::time::sleep(duration))
    }
}

/// Retry timing for failed fetches.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// First wait after a failed renewal; also how long callers get the last failure at once
    /// before one of them asks the CA again.
    pub initial_backoff: Duration,
    /// Longest wait between renewal attempts (lowered to an eighth of the certificate's
    /// lifetime for short-lived certificates).
    pub max_backoff: Duration,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
        }
    }
}

/// Why no certificate could be handed out.
#[derive(Debug, thiserror::Error, Clone)]
#[non_exhaustive]
pub enum ManagerError {
    #[error("issuing a certificate for {identity}: {source}")]
    Issue {
        identity: Identity,
        source: Arc<CaError>,
    },
    #[error(
        "the certificate for {identity} expired at {} and could not be renewed: {source}",
        rfc3339(*not_after)
    )]
    Expired {
        identity: Identity,
        not_after: SystemTime,
        source: Arc<CaError>,
    },
    #[error("certificate fetch for {0} was aborted")]
    Aborted(Identity),
}

/// What the admin endpoint shows about a cached certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub identity: Identity,
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// Requests to the certificate source since start, for the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ManagerStats {
    /// Certificates issued (first fetches and renewals).
    pub issued: u64,
    /// Requests that failed (the CA unreachable, or refusing).
    pub failed: u64,
}

type Fetch = Shared<BoxFuture<'static, Result<Arc<WorkloadCert>, ManagerError>>>;

/// The last failed fetch of an identity, kept until a certificate is issued.
#[derive(Clone)]
struct Failure {
    at: SystemTime,
    error: Arc<CaError>,
}

#[derive(Default)]
struct Slot {
    cert: Option<Arc<WorkloadCert>>,
    fetch: Option<Fetch>,
    refresher: Option<tokio::task::AbortHandle>,
    failure: Option<Failure>,
    /// Set once the expiry of `cert` without a replacement has been logged.
    expiry_logged: bool,
}

struct Inner {
    source: Arc<dyn CertificateSource>,
    clock: Arc<dyn Clock>,
    config: ManagerConfig,
    slots: Mutex<HashMap<Identity, Slot>>,
    issued: AtomicU64,
    failed: AtomicU64,
}

/// Caches and rotates workload certificates. Cheap to clone; must be used inside a tokio
/// runtime (fetches and refreshes run as tasks).
#[derive(Clone)]
pub struct CertManager {
    inner: Arc<Inner>,
}

impl CertManager {
    pub fn new(
        source: Arc<dyn CertificateSource>,
        clock: Arc<dyn Clock>,
        config: ManagerConfig,
    ) -> Self {
        CertManager {
            inner: Arc::new(Inner {
                source,
                clock,
                config,
                slots: Mutex::new(HashMap::new()),
                issued: AtomicU64::new(0),
                failed: AtomicU64::new(0),
            }),
        }
    }

    /// The current certificate for `id`, fetching one if there is none or it has expired.
    /// Never an expired certificate: then the error says so (`ManagerError::Expired`).
    pub async fn get(&self, id: &Identity) -> Result<Arc<WorkloadCert>, ManagerError> {
        let now = self.inner.clock.now();
        let (fetch, expired) = {
            let mut slots = self.inner.lock();
            let slot = slots.entry(id.clone()).or_default();
            let expired = match &slot.cert {
                Some(cert) if !cert.expired_at(now) => return Ok(cert.clone()),
                Some(cert) => Some(cert.not_after),
                None => None,
            };
            let fetch = match (&slot.fetch, &slot.failure) {
                (Some(fetch), _) => fetch.clone(),
                // Failed a moment ago: say so at once rather than ask the CA again.
                (None, Some(failure)) if now < failure.at + self.inner.config.initial_backoff => {
                    let error = failure.error.clone();
                    if let Some(not_after) = expired {
                        note_expired(slot, id, not_after, &error);
                    }
                    return Err(refusal(id, expired, error));
                }
                _ => fetch_in(&self.inner, slot, id),
            };
            (fetch, expired)
        };
        match fetch.await {
            Err(ManagerError::Issue { source, .. }) => {
                if let Some(not_after) = expired
                    && let Some(slot) = self.inner.lock().get_mut(id)
                {
                    note_expired(slot, id, not_after, &source);
                }
                Err(refusal(id, expired, source))
            }
            other => other,
        }
    }

    /// Whether a certificate for `id` is held and valid now. Asks nothing of the CA.
    pub fn has_valid(&self, id: &Identity) -> bool {
        let now = self.inner.clock.now();
        self.inner
            .lock()
            .get(id)
            .and_then(|slot| slot.cert.as_ref())
            .is_some_and(|cert| !cert.expired_at(now))
    }

    /// Drops the certificate of a workload that left and stops renewing it.
    pub fn forget(&self, id: &Identity) {
        if let Some(slot) = self.inner.lock().remove(id)
            && let Some(refresher) = slot.refresher
        {
            refresher.abort();
        }
    }

    /// The cached certificates, sorted by identity.
    pub fn snapshot(&self) -> Vec<CertInfo> {
        let slots = self.inner.lock();
        let mut out: Vec<CertInfo> = slots
            .values()
            .filter_map(|slot| slot.cert.as_ref())
            .map(|cert| CertInfo {
                identity: cert.identity.clone(),
                serial: cert.serial.clone(),
                not_before: cert.not_before,
                not_after: cert.not_after,
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    /// Requests issued and failed since start.
    pub fn stats(&self) -> ManagerStats {
        ManagerStats {
            issued: self.inner.issued.load(Ordering::Relaxed),
            failed: self.inner.failed.load(Ordering::Relaxed),
        }
    }
}

/// The error for a caller that gets no certificate: `Expired` when there was one.
fn refusal(id: &Identity, expired: Option<SystemTime>, source: Arc<CaError>) -> ManagerError {
    match expired {
        Some(not_after) => ManagerError::Expired {
            identity: id.clone(),
            not_after,
            source,
        },
        None => ManagerError::Issue {
            identity: id.clone(),
            source,
        },
    }
}

/// Logs, once per certificate, that it expired with no replacement.
fn note_expired(slot: &mut Slot, id: &Identity, not_after: SystemTime, error: &CaError) {
    if !slot.expiry_logged {
        slot.expiry_logged = true;
        tracing::error!(identity = %id, expired_at = %rfc3339(not_after), %error,
            "certificate expired and could not be renewed: connections of this identity are refused until the CA issues a new one");
    }
}

/// The fetch in flight for `id`, or a new one.
fn fetch_in(inner: &Arc<Inner>, slot: &mut Slot, id: &Identity) -> Fetch {
    if let Some(fetch) = &slot.fetch {
        return fetch.clone();
    }
    let fetch = start_fetch(inner, id.clone());
    slot.fetch = Some(fetch.clone());
    fetch
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, HashMap<Identity, Slot>> {
        // A panic while holding the lock cannot leave a slot half-written: every update is a
        // single field assignment, so the map is still consistent.
        self.slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Stores a newly issued certificate and makes sure a refresher runs for it. A workload
    /// forgotten meanwhile gets its certificate but nothing is cached.
    fn install(self: &Arc<Self>, id: &Identity, cert: Arc<WorkloadCert>) {
        let mut slots = self.lock();
        let Some(slot) = slots.get_mut(id) else {
            return;
        };
        match (&slot.cert, &slot.failure) {
            (Some(_), Some(failure)) => {
                tracing::info!(identity = %id, serial = %cert.serial, not_after = %rfc3339(cert.not_after),
                    after_error = %failure.error, "certificate renewed after failed attempts");
            }
            (Some(_), None) => {
                tracing::debug!(identity = %id, serial = %cert.serial, "certificate renewed");
            }
            (None, _) => {
                tracing::debug!(identity = %id, serial = %cert.serial, "certificate issued");
            }
        }
        slot.cert = Some(cert);
        slot.failure = None;
        slot.expiry_logged = false;
        if slot.refresher.is_none() {
            let task = tokio::spawn(refresh_loop(Arc::downgrade(self), id.clone()));
            slot.refresher = Some(task.abort_handle());
        }
    }

    /// Longest wait between renewal attempts for `cert`.
    fn retry_cap(&self, cert: &WorkloadCert) -> Duration {
        let lifetime = cert
            .not_after
            .duration_since(cert.not_before)
            .unwrap_or(Duration::ZERO);
        (lifetime / 8)
            .max(self.config.initial_backoff)
            .min(self.config.max_backoff)
    }
}

/// Runs the fetch as its own task, so a caller that gives up does not cancel it for the
/// others waiting on the same identity. Its outcome is recorded in the slot.
fn start_fetch(inner: &Arc<Inner>, id: Identity) -> Fetch {
    let task_inner = inner.clone();
    let task_id = id.clone();
    let task = tokio::spawn(async move {
        let result = task_inner.source.issue(&task_id).await;
        let mut slots = task_inner.lock();
        if let Some(slot) = slots.get_mut(&task_id) {
            slot.fetch = None;
        }
        match result {
            Ok(cert) => {
                drop(slots);
                task_inner.issued.fetch_add(1, Ordering::Relaxed);
                let cert = Arc::new(cert);
                task_inner.install(&task_id, cert.clone());
                Ok(cert)
            }
            Err(e) => {
                task_inner.failed.fetch_add(1, Ordering::Relaxed);
                let error = Arc::new(e);
                if let Some(slot) = slots.get_mut(&task_id) {
                    slot.failure = Some(Failure {
                        at: task_inner.clock.now(),
                        error: error.clone(),
                    });
                }
                Err(ManagerError::Issue {
                    identity: task_id,
                    source: error,
                })
            }
        }
    });
    async move { task.await.unwrap_or(Err(ManagerError::Aborted(id))) }
        .boxed()
        .shared()
}

/// Renews `id`'s certificate half-way through its lifetime, retrying failures with backoff,
/// until the identity is forgotten or the manager dropped.
async fn refresh_loop(inner: Weak<Inner>, id: Identity) {
    let mut backoff: Option<Duration> = None;
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let clock = strong.clock.clone();
        let now = clock.now();
        let step = {
            let mut slots = strong.lock();
            let Some(slot) = slots.get_mut(&id) else {
                return;
            };
            let Some(cert) = slot.cert.clone() else {
                return;
            };
            let due = cert.refresh_at();
            if now < due {
                // Not due (again: a caller may have renewed it meanwhile).
                Err(due.duration_since(now).unwrap_or_default())
            } else {
                Ok((cert, fetch_in(&strong, slot, &id)))
            }
        };
        let (cert, fetch) = match step {
            Ok(renew) => renew,
            Err(until_due) => {
                drop(strong);
                backoff = None;
                clock.sleep(until_due).await;
                continue;
            }
        };
        match fetch.await {
            Ok(_) => backoff = None,
            Err(error) => {
                let cap = strong.retry_cap(&cert);
                let wait = backoff
                    .map(|b| (b * 2).min(cap))
                    .unwrap_or(strong.config.initial_backoff.min(cap));
                let expired = cert.expired_at(clock.now());
                tracing::warn!(identity = %id, %error, expired, retry_in = ?wait, "certificate renewal failed");
                if expired
                    && let ManagerError::Issue { source, .. } = &error
                    && let Some(slot) = strong.lock().get_mut(&id)
                {
                    note_expired(slot, &id, cert.not_after, source);
                }
                backoff = Some(wait);
                drop(strong);
                clock.sleep(wait).await;
            }
        }
    }
}

#[cfg(test)]
mod tests;
