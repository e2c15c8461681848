//! Fault injection: delays and aborts on a share of requests (Istio `HTTPFaultInjection`,
//! Envoy's fault filter). Absent percentage means no request is affected, as Istio reads it.

use std::time::Duration;

use super::Fraction;

/// What an aborted request is answered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbortCode {
    Http(u16),
    /// A gRPC status code; the response is HTTP 200 with `grpc-status` (gRPC over HTTP/2).
    Grpc(u8),
}

/// The fault policy of a route.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fault {
    pub delay: Option<(Duration, Fraction)>,
    pub abort: Option<(AbortCode, Fraction)>,
}

/// What to do to one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultDecision {
    pub delay: Option<Duration>,
    pub abort: Option<AbortCode>,
}

impl Fault {
    /// Decides with two independent uniform random numbers (delay first, then abort).
    pub fn decide(&self, random_delay: u64, random_abort: u64) -> FaultDecision {
        FaultDecision {
            delay: self
                .delay
                .filter(|(_, f)| f.applies(random_delay))
                .map(|(d, _)| d),
            abort: self
                .abort
                .filter(|(_, f)| f.applies(random_abort))
                .map(|(c, _)| c),
        }
    }
}

/// gRPC status names (grpc/grpc `doc/statuscodes.md`) and their codes.
const GRPC: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// A gRPC status by name (`UNAVAILABLE`) or number (`14`).
pub fn grpc_status(s: &str) -> Option<u8> {
    if let Ok(n) = s.parse::<u8>() {
        return (usize::from(n) < GRPC.len()).then_some(n);
    }
    GRPC.iter()
        .position(|n| *n == s)
        .and_then(|i| u8::try_from(i).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_decide_independently() {
        let f = Fault {
            delay: Some((Duration::from_secs(7), Fraction::from_percent(50.0))),
            abort: Some((AbortCode::Http(500), Fraction::from_percent(10.0))),
        };
        let low = 0;
        let high = u64::MAX;
        assert_eq!(
            f.decide(low, low),
            FaultDecision {
                delay: Some(Duration::from_secs(7)),
                abort: Some(AbortCode::Http(500))
            }
        );
        assert_eq!(f.decide(high, high), FaultDecision::default());
        // 0.3 of the range: delayed (under 50%), not aborted (over 10%).
        let r = u64::MAX / 10 * 3;
        assert_eq!(f.decide(r, r).delay, Some(Duration::from_secs(7)));
        assert_eq!(f.decide(r, r).abort, None);
    }

    #[test]
    fn grpc_names() {
        assert_eq!(grpc_status("UNAVAILABLE"), Some(14));
        assert_eq!(grpc_status("CANCELLED"), Some(1));
        assert_eq!(grpc_status("16"), Some(16));
        assert_eq!(grpc_status("17"), None);
        assert_eq!(grpc_status("unavailable"), None);
    }
}
