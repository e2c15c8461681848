//! When failed work on a pod is tried again: enrolments that failed (namespace not there yet,
//! a listener that could not be opened, a capture map error) and the first certificate of a
//! pod enrolled while the CA did not answer. Only the schedule lives here, with no clock:
//! the callers own the timers.

use std::collections::BTreeSet;
use std::time::Duration;

/// First wait before enrolling again a pod that could not be enrolled.
pub(super) const ENROL_RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest wait between enrolment attempts.
pub(super) const ENROL_RETRY_MAX: Duration = Duration::from_secs(30);
/// First wait before asking again for the certificate of an enrolled pod. Asking sooner
/// would ask nothing: the certificate manager answers with the last failure for a second.
pub(super) const CERT_RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest wait between two background requests for a pod's first certificate (a
/// connection of the pod asks at once, whatever this says).
pub(super) const CERT_RETRY_MAX: Duration = Duration::from_secs(30);

/// Exponential backoff: `first`, then doubled after each failure up to `max`.
#[derive(Debug, Clone)]
pub(super) struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(super) fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            next: first.min(max),
        }
    }

    /// The wait before the next attempt; the one after it is twice as long, up to the cap.
    pub(super) fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        wait
    }

    pub(super) fn reset(&mut self) {
        self.next = self.first.min(self.max);
    }
}

/// The schedule of `reconcile` while some pod this node should capture is not enrolled.
///
/// The backoff starts again from its first step when every pod is enrolled, and when a pod
/// fails that was not failing at the previous attempt: a pod that just appeared is retried
/// after a second, not after the long wait another, long-broken pod has reached.
#[derive(Debug)]
pub(super) struct EnrolRetry {
    backoff: Backoff,
    /// Uids of the pods that failed at the previous attempt.
    failing: BTreeSet<String>,
}

impl Default for EnrolRetry {
    fn default() -> Self {
        EnrolRetry {
            backoff: Backoff::new(ENROL_RETRY_FIRST, ENROL_RETRY_MAX),
            failing: BTreeSet::new(),
        }
    }
}

impl EnrolRetry {
    /// After an attempt that left the pods `failing` (uids) not enrolled: how long to wait
    /// before the next attempt, or `None` when there is nothing to retry.
    pub(super) fn after(&mut self, failing: impl IntoIterator<Item = String>) -> Option<Duration> {
        let failing: BTreeSet<String> = failing.into_iter().collect();
        if failing.is_empty() || !failing.is_subset(&self.failing) {
            self.backoff.reset();
        }
        self.failing = failing;
        (!self.failing.is_empty()).then(|| self.backoff.next_wait())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn uids(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(secs(1), secs(30));
        let waits: Vec<u64> = (0..8).map(|_| b.next_wait().as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        b.reset();
        assert_eq!(b.next_wait(), secs(1));
    }

    #[test]
    fn backoff_never_exceeds_a_cap_below_its_first_step() {
        let mut b = Backoff::new(secs(5), secs(2));
        assert_eq!(b.next_wait(), secs(2));
        assert_eq!(b.next_wait(), secs(2));
    }

    #[test]
    fn nothing_failing_means_no_retry() {
        let mut r = EnrolRetry::default();
        assert_eq!(r.after(uids(&[])), None);
    }

    #[test]
    fn the_same_pods_failing_wait_longer_each_time() {
        let mut r = EnrolRetry::default();
        let waits: Vec<Option<Duration>> = (0..7).map(|_| r.after(uids(&["a", "b"]))).collect();
        assert_eq!(
            waits,
            [1, 2, 4, 8, 16, 30, 30].map(|s| Some(secs(s))).to_vec()
        );
        // One of them got through: the other keeps its backoff.
        assert_eq!(r.after(uids(&["b"])), Some(secs(30)));
    }

    #[test]
    fn a_newly_failing_pod_restarts_the_backoff() {
        let mut r = EnrolRetry::default();
        for _ in 0..4 {
            r.after(uids(&["old"]));
        }
        assert_eq!(r.after(uids(&["old", "new"])), Some(secs(1)));
        assert_eq!(r.after(uids(&["old", "new"])), Some(secs(2)));
    }

    #[test]
    fn success_resets_the_backoff() {
        let mut r = EnrolRetry::default();
        for _ in 0..4 {
            r.after(uids(&["a"]));
        }
        assert_eq!(r.after(uids(&[])), None);
        assert_eq!(r.after(uids(&["a"])), Some(secs(1)));
    }
}
