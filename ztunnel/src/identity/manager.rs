//! The certificate cache: one certificate per local workload identity, fetched on first use
//! and re-issued in the background half-way through its lifetime.
//!
//! Rules this module keeps:
//! - concurrent callers asking for the same identity share one fetch;
//! - a failed refresh is retried with exponential backoff while the old certificate keeps
//!   being served, until it expires (then callers wait for a fresh fetch, or get its error);
//! - `forget` drops an identity and stops its refresh, so certificates of workloads that left
//!   the node are neither served nor renewed.
//!
//! Time comes from an injected `Clock`, so tests drive rotation without sleeping.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};

use super::Identity;
use super::ca::{CaError, CertificateSource};
use super::cert::WorkloadCert;

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

/// Retry timing for failed refreshes.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    pub initial_backoff: Duration,
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

type Fetch = Shared<BoxFuture<'static, Result<Arc<WorkloadCert>, ManagerError>>>;

#[derive(Default)]
struct Slot {
    cert: Option<Arc<WorkloadCert>>,
    fetch: Option<Fetch>,
    refresher: Option<tokio::task::AbortHandle>,
}

struct Inner {
    source: Arc<dyn CertificateSource>,
    clock: Arc<dyn Clock>,
    config: ManagerConfig,
    slots: Mutex<HashMap<Identity, Slot>>,
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
            }),
        }
    }

    /// The current certificate for `id`, fetching one if there is none or it has expired.
    pub async fn get(&self, id: &Identity) -> Result<Arc<WorkloadCert>, ManagerError> {
        let fetch = {
            let mut slots = self.inner.lock();
            let slot = slots.entry(id.clone()).or_default();
            match (&slot.cert, &slot.fetch) {
                (Some(cert), _) if !cert.expired_at(self.inner.clock.now()) => {
                    return Ok(cert.clone());
                }
                (_, Some(fetch)) => fetch.clone(),
                _ => {
                    let fetch = start_fetch(&self.inner, id.clone());
                    slot.fetch = Some(fetch.clone());
                    fetch
                }
            }
        };
        fetch.await
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
        slot.cert = Some(cert);
        if slot.refresher.is_none() {
            let task = tokio::spawn(refresh_loop(Arc::downgrade(self), id.clone()));
            slot.refresher = Some(task.abort_handle());
        }
    }
}

/// Runs the fetch as its own task, so a caller that gives up does not cancel it for the
/// others waiting on the same identity.
fn start_fetch(inner: &Arc<Inner>, id: Identity) -> Fetch {
    let task_inner = inner.clone();
    let task_id = id.clone();
    let task = tokio::spawn(async move {
        let result = task_inner.source.issue(&task_id).await;
        let mut slots = task_inner.lock();
        if let Some(slot) = slots.get_mut(&task_id) {
            slot.fetch = None;
        }
        drop(slots);
        match result {
            Ok(cert) => {
                let cert = Arc::new(cert);
                task_inner.install(&task_id, cert.clone());
                Ok(cert)
            }
            Err(e) => Err(ManagerError::Issue {
                identity: task_id,
                source: Arc::new(e),
            }),
        }
    });
    async move { task.await.unwrap_or(Err(ManagerError::Aborted(id))) }
        .boxed()
        .shared()
}

async fn refresh_loop(inner: Weak<Inner>, id: Identity) {
    let mut backoff: Option<Duration> = None;
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let clock = strong.clock.clone();
        let due = match strong.lock().get(&id).and_then(|slot| slot.cert.clone()) {
            Some(cert) => cert.refresh_at(),
            None => return,
        };
        let now = clock.now();
        if now < due {
            drop(strong);
            clock
                .sleep(due.duration_since(now).unwrap_or_default())
                .await;
            continue;
        }
        match strong.source.issue(&id).await {
            Ok(cert) => {
                tracing::debug!(identity = %id, serial = %cert.serial, "certificate renewed");
                strong.install(&id, Arc::new(cert));
                backoff = None;
            }
            Err(error) => {
                let config = &strong.config;
                let wait = backoff
                    .map(|b| (b * 2).min(config.max_backoff))
                    .unwrap_or(config.initial_backoff);
                tracing::warn!(identity = %id, %error, retry_in = ?wait, "certificate renewal failed");
                backoff = Some(wait);
                drop(strong);
                clock.sleep(wait).await;
            }
        }
    }
}

#[cfg(test)]
mod tests;
