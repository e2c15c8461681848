//! Rotation driven by a manual clock: time moves only when a test says so.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Semaphore, watch};

use super::*;
use crate::identity::ca::IssueFuture;

struct ManualClock {
    now: watch::Sender<SystemTime>,
}

impl ManualClock {
    fn new() -> Arc<Self> {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        Arc::new(ManualClock {
            now: watch::Sender::new(start),
        })
    }

    fn advance(&self, by: Duration) {
        self.now.send_modify(|t| *t += by);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.now.borrow()
    }

    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let target = self.now() + duration;
        let mut rx = self.now.subscribe();
        Box::pin(async move {
            let _ = rx.wait_for(|now| *now >= target).await;
        })
    }
}

/// Issues certificates valid for `LIFETIME` from the clock's now, numbered by serial.
struct FakeSource {
    clock: Arc<ManualClock>,
    attempts: AtomicUsize,
    fail_next: AtomicUsize,
    gate: Option<Semaphore>,
}

const LIFETIME: Duration = Duration::from_secs(100);

impl FakeSource {
    fn new(clock: &Arc<ManualClock>) -> Self {
        FakeSource {
            clock: clock.clone(),
            attempts: AtomicUsize::new(0),
            fail_next: AtomicUsize::new(0),
            gate: None,
        }
    }

    fn attempts(&self) -> usize {
        self.attempts.load(Ordering::SeqCst)
    }
}

impl CertificateSource for FakeSource {
    fn issue<'a>(&'a self, id: &'a Identity) -> IssueFuture<'a> {
        Box::pin(async move {
            let n = self.attempts.fetch_add(1, Ordering::SeqCst) + 1;
            if let Some(gate) = &self.gate {
                gate.acquire()
                    .await
                    .map_err(|e| CaError::Remote(e.to_string()))?
                    .forget();
            }
            let failing = self
                .fail_next
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |f| f.checked_sub(1))
                .is_ok();
            if failing {
                return Err(CaError::Remote("CA unavailable".into()));
            }
            let now = self.clock.now();
            Ok(WorkloadCert::from_known(
                id.clone(),
                Vec::new(),
                Vec::new(),
                now,
                now + LIFETIME,
                format!("{n:02}"),
            ))
        })
    }
}

fn id(s: &str) -> Identity {
    s.parse().unwrap()
}

fn manager(clock: &Arc<ManualClock>, source: &Arc<FakeSource>) -> CertManager {
    CertManager::new(source.clone(), clock.clone(), ManagerConfig::default())
}

/// Waits (with a deadline) until `cond` holds; background tasks run meanwhile.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Lets spawned tasks run without moving the manual clock.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
}

#[tokio::test]
async fn caches_after_first_fetch() {
    let clock = ManualClock::new();
    let source = Arc::new(FakeSource::new(&clock));
    let certs = manager(&clock, &source);
    let who = id("spiffe://td/ns/a/sa/b");
    let first = certs.get(&who).await.unwrap();
    let second = certs.get(&who).await.unwrap();
    assert_eq!(first.serial, second.serial);
    assert_eq!(source.attempts(), 1);
    assert_eq!(
        certs.snapshot(),
        vec![CertInfo {
            identity: who,
            serial: "01".into(),
            not_before: first.not_before,
            not_after: first.not_after,
        }]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_share_one_fetch() {
    let clock = ManualClock::new();
    let mut fake = FakeSource::new(&clock);
    fake.gate = Some(Semaphore::new(0));
    let source = Arc::new(fake);
    let certs = manager(&clock, &source);
    let who = id("spiffe://td/ns/a/sa/b");
    let callers: Vec<_> = (0..10)
        .map(|_| {
            let certs = certs.clone();
            let who = who.clone();
            tokio::spawn(async move { certs.get(&who).await })
        })
        .collect();
    eventually("the fetch to start", || source.attempts() == 1).await;
    settle().await;
    source.gate.as_ref().unwrap().add_permits(1);
    for caller in callers {
        assert_eq!(caller.await.unwrap().unwrap().serial, "01");
    }
    assert_eq!(source.attempts(), 1);
}

#[tokio::test]
async fn renews_half_way_through_the_lifetime() {
    let clock = ManualClock::new();
    let source = Arc::new(FakeSource::new(&clock));
    let certs = manager(&clock, &source);
    let who = id("spiffe://td/ns/a/sa/b");
    assert_eq!(certs.get(&who).await.unwrap().serial, "01");

    clock.advance(Duration::from_secs(49));
    settle().await;
    assert_eq!(source.attempts(), 1, "renewed before half-life");

    clock.advance(Duration::from_secs(1));
    eventually("renewal", || source.attempts() == 2).await;
    eventually("new serial served", || certs.snapshot()[0].serial == "02").await;
    assert_eq!(certs.get(&who).await.unwrap().serial, "02");

    // The next renewal is half-way through the new certificate's lifetime.
    clock.advance(Duration::from_secs(50));
    eventually("second renewal", || source.attempts() == 3).await;
}

#[tokio::test]
async fn failed_renewal_backs_off_and_keeps_serving_the_old_certificate() {
    let clock = ManualClock::new();
    let source = Arc::new(FakeSource::new(&clock));
    let certs = manager(&clock, &source);
    let who = id("spiffe://td/ns/a/sa/b");
    certs.get(&who).await.unwrap();
    source.fail_next.store(3, Ordering::SeqCst);

    clock.advance(Duration::from_secs(50));
    eventually("first renewal attempt", || source.attempts() == 2).await;
    assert_eq!(certs.get(&who).await.unwrap().serial, "01");

    // Backoff 1 s, then 2 s, then 4 s.
    for (wait, attempts) in [(1, 3), (2, 4), (4, 5)] {
        clock.advance(Duration::from_secs(wait) - Duration::from_millis(500));
        settle().await;
        assert_eq!(
            source.attempts(),
            attempts - 1,
            "retried before the backoff elapsed"
        );
        clock.advance(Duration::from_millis(500));
        eventually("retry", || source.attempts() == attempts).await;
    }
    eventually("renewed certificate", || certs.snapshot()[0].serial == "05").await;
    assert_eq!(certs.get(&who).await.unwrap().serial, "05");
}

#[tokio::test]
async fn expired_certificate_is_not_served() {
    let clock = ManualClock::new();
    let source = Arc::new(FakeSource::new(&clock));
    let certs = manager(&clock, &source);
    let who = id("spiffe://td/ns/a/sa/b");
    certs.get(&who).await.unwrap();
    source.fail_next.store(usize::MAX, Ordering::SeqCst);
    clock.advance(LIFETIME);
    let err = certs.get(&who).await.unwrap_err();
    assert!(matches!(err, ManagerError::Expired { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "the certificate for spiffe://td/ns/a/sa/b expired at 2023-11-14T22:15:00Z and could not \
         be renewed: certificate authority: CA unavailable"
    );
}

#[tokio::test]
async fn after_expiry_callers_fail_fast_then_bring_the_certificate_back() {
    let clock = ManualClock::new();
    let source = Arc::new(FakeSource::new(&clock));
    let certs = manager(&clock, &source);
    let who = id("spiffe://td/ns/a/sa/b");
    certs.get(&who).await.unwrap();
    source.fail_next.store(usize::MAX, Ordering::SeqCst);
    // Past half-life: the renewal fails (then waits 1 s); past expiry, the next callers
    // see the expiry.
    clock.advance(LIFETIME / 2);
    eventually("renewal attempt", || source.attempts() == 2).await;
    clock.advance(LIFETIME / 2);
    let err = certs.get(&who).await.unwrap_err();
    assert!(matches!(err, ManagerError::Expired { .. }), "{err:?}");
    settle().await;
    let attempts = source.attempts();
    // Right after a failure, callers are answered without asking the CA again.
    for _ in 0..5 {
        let err = certs.get(&who).await.unwrap_err();
        assert!(matches!(err, ManagerError::Expired { .. }), "{err:?}");
    }
    assert_eq!(source.attempts(), attempts, "a CA request per caller");
    // The CA is back: after the backoff, a caller asks again and gets a fresh certificate.
    source.fail_next.store(0, Ordering::SeqCst);
    clock.advance(Duration::from_secs(1));
    let cert = certs.get(&who).await.unwrap();
    assert!(!cert.expired_at(clock.now()));
    let stats = certs.stats();
    assert_eq!(stats.failed + stats.issued, source.attempts() as u64);
    assert_eq!(stats.issued, 2);
}

#[tokio::test]
async fn renewal_retries_are_capped_at_an_eighth_of_the_lifetime() {
    let clock = ManualClock::new();
    let source = Arc::new(FakeSource::new(&clock));
    let certs = manager(&clock, &source);
    let who = id("spiffe://td/ns/a/sa/b");
    certs.get(&who).await.unwrap();
    source.fail_next.store(usize::MAX, Ordering::SeqCst);
    clock.advance(LIFETIME / 2);
    eventually("renewal attempt", || source.attempts() == 2).await;
    // 1, 2, 4, 8 s, then 12.5 s (100 s / 8) instead of 16.
    for (wait, attempts) in [
        (1000, 3),
        (2000, 4),
        (4000, 5),
        (8000, 6),
        (12500, 7),
        (12500, 8),
    ] {
        clock.advance(Duration::from_millis(wait - 100));
        settle().await;
        assert_eq!(source.attempts(), attempts - 1, "retried too early");
        clock.advance(Duration::from_millis(100));
        eventually("retry", || source.attempts() == attempts).await;
    }
}

#[tokio::test]
async fn forgotten_identities_are_not_renewed() {
    let clock = ManualClock::new();
    let source = Arc::new(FakeSource::new(&clock));
    let certs = manager(&clock, &source);
    let a = id("spiffe://td/ns/a/sa/a");
    let b = id("spiffe://td/ns/a/sa/b");
    certs.get(&a).await.unwrap();
    certs.get(&b).await.unwrap();
    assert_eq!(certs.snapshot().len(), 2);
    certs.forget(&a);
    let left: Vec<_> = certs.snapshot().into_iter().map(|c| c.identity).collect();
    assert_eq!(left, vec![b]);
    clock.advance(Duration::from_secs(50));
    eventually("b renewed", || source.attempts() == 3).await;
    settle().await;
    assert_eq!(source.attempts(), 3, "a was renewed after forget");
}

/// The last pod of an identity may leave while its certificate is being fetched (the proxy
/// asks ahead of traffic): the caller still gets the answer, but nothing is kept or renewed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_forgotten_during_its_fetch_is_not_kept() {
    let clock = ManualClock::new();
    let mut fake = FakeSource::new(&clock);
    fake.gate = Some(Semaphore::new(0));
    let source = Arc::new(fake);
    let certs = manager(&clock, &source);
    let who = id("spiffe://td/ns/a/sa/gone");
    let caller = {
        let (certs, who) = (certs.clone(), who.clone());
        tokio::spawn(async move { certs.get(&who).await })
    };
    eventually("the fetch to start", || source.attempts() == 1).await;
    certs.forget(&who);
    source.gate.as_ref().unwrap().add_permits(10);
    assert_eq!(caller.await.unwrap().unwrap().serial, "01");
    assert!(certs.snapshot().is_empty());
    assert!(!certs.has_valid(&who));
    clock.advance(LIFETIME);
    settle().await;
    assert_eq!(source.attempts(), 1, "a forgotten identity was renewed");
}

#[tokio::test]
async fn has_valid_tells_without_asking_the_ca() {
    let clock = ManualClock::new();
    let source = Arc::new(FakeSource::new(&clock));
    let certs = manager(&clock, &source);
    let who = id("spiffe://td/ns/a/sa/b");
    assert!(!certs.has_valid(&who));
    source.fail_next.store(1, Ordering::SeqCst);
    certs.get(&who).await.unwrap_err();
    assert!(!certs.has_valid(&who), "after a failed first fetch");
    clock.advance(Duration::from_secs(1));
    certs.get(&who).await.unwrap();
    assert!(certs.has_valid(&who));
    let asked = source.attempts();
    clock.advance(LIFETIME);
    assert!(!certs.has_valid(&who), "expired");
    assert_eq!(source.attempts(), asked, "has_valid asked the CA");
}
