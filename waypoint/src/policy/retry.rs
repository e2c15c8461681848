//! Retry policy: when a failed attempt is tried again, with Envoy's meanings of `retryOn`
//! (router filter, `x-envoy-retry-on` and `x-envoy-retry-grpc-on`) and Istio's defaults.
//! Pure data and decisions; the server counts attempts and runs the timers.

use std::fmt;
use std::time::Duration;

/// One condition of `retryOn`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum RetryCondition {
    /// Any 5xx, or no response at all (reset, connect failure, refused stream, per-try timeout).
    FiveXx = 1 << 0,
    /// 502, 503, 504, or no response at all.
    GatewayError = 1 << 1,
    /// No response: disconnect, reset or per-try timeout.
    Reset = 1 << 2,
    /// Reset before the request was sent upstream.
    ResetBeforeRequest = 1 << 3,
    /// The upstream connection could not be made (includes connect timeouts).
    ConnectFailure = 1 << 4,
    /// Status 409.
    Retriable4xx = 1 << 5,
    /// The upstream reset the stream with `REFUSED_STREAM`.
    RefusedStream = 1 << 6,
    /// A status in the policy's list of codes.
    RetriableStatusCodes = 1 << 7,
    /// Accepted for compatibility; nothing sets the header it looks for here.
    EnvoyRateLimited = 1 << 8,
    /// Accepted for compatibility; Istio offers no way to list the headers.
    RetriableHeaders = 1 << 9,
    /// Accepted for compatibility; there is no HTTP/3 upstream.
    Http3PostConnectFailure = 1 << 10,
    /// gRPC status 1.
    Cancelled = 1 << 11,
    /// gRPC status 4.
    DeadlineExceeded = 1 << 12,
    /// gRPC status 13.
    Internal = 1 << 13,
    /// gRPC status 8.
    ResourceExhausted = 1 << 14,
    /// gRPC status 14.
    Unavailable = 1 << 15,
}

const NAMES: [(&str, RetryCondition); 16] = [
    ("5xx", RetryCondition::FiveXx),
    ("gateway-error", RetryCondition::GatewayError),
    ("reset", RetryCondition::Reset),
    ("reset-before-request", RetryCondition::ResetBeforeRequest),
    ("connect-failure", RetryCondition::ConnectFailure),
    ("retriable-4xx", RetryCondition::Retriable4xx),
    ("refused-stream", RetryCondition::RefusedStream),
    (
        "retriable-status-codes",
        RetryCondition::RetriableStatusCodes,
    ),
    ("envoy-ratelimited", RetryCondition::EnvoyRateLimited),
    ("retriable-headers", RetryCondition::RetriableHeaders),
    (
        "http3-post-connect-failure",
        RetryCondition::Http3PostConnectFailure,
    ),
    ("cancelled", RetryCondition::Cancelled),
    ("deadline-exceeded", RetryCondition::DeadlineExceeded),
    ("internal", RetryCondition::Internal),
    ("resource-exhausted", RetryCondition::ResourceExhausted),
    ("unavailable", RetryCondition::Unavailable),
];

/// A set of retry conditions and the status codes `retriable-status-codes` refers to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetryOn {
    bits: u32,
    codes: Vec<u16>,
}

/// Why a `retryOn` string was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RetryOnError {
    #[error(
        "unknown retry condition {0:?} (expected Envoy's names, e.g. 5xx, gateway-error, connect-failure, or an HTTP status code)"
    )]
    Unknown(String),
    #[error("{0} is not an HTTP status code (100..=599)")]
    BadStatus(u32),
}

impl RetryOn {
    /// Parses Istio's `retryOn`: comma-separated Envoy conditions; a number is a retriable
    /// status code and implies `retriable-status-codes`, as Istio translates it.
    pub fn parse(s: &str) -> Result<RetryOn, RetryOnError> {
        let mut out = RetryOn::default();
        for token in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if let Ok(code) = token.parse::<u32>() {
                let c = u16::try_from(code)
                    .ok()
                    .filter(|c| (100..=599).contains(c))
                    .ok_or(RetryOnError::BadStatus(code))?;
                out.add_code(c);
                continue;
            }
            let (_, cond) = NAMES
                .iter()
                .find(|(n, _)| *n == token)
                .ok_or_else(|| RetryOnError::Unknown(token.to_owned()))?;
            out.insert(*cond);
        }
        Ok(out)
    }

    /// Istio's default when a route sets no retry policy (or sets `retryOn` to nothing):
    /// `connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes` with 503.
    pub fn istio_default() -> RetryOn {
        let mut r = RetryOn::default();
        for c in [
            RetryCondition::ConnectFailure,
            RetryCondition::RefusedStream,
            RetryCondition::Unavailable,
            RetryCondition::Cancelled,
        ] {
            r.insert(c);
        }
        r.add_code(503);
        r
    }

    /// Retries on the given HTTP status codes (Gateway API `retry.codes`).
    pub fn status_codes(codes: &[u16]) -> RetryOn {
        let mut r = RetryOn::default();
        for c in codes {
            r.add_code(*c);
        }
        r
    }

    pub fn insert(&mut self, c: RetryCondition) {
        self.bits |= c as u32;
    }

    fn add_code(&mut self, code: u16) {
        self.insert(RetryCondition::RetriableStatusCodes);
        if !self.codes.contains(&code) {
            self.codes.push(code);
        }
    }

    pub fn contains(&self, c: RetryCondition) -> bool {
        self.bits & c as u32 != 0
    }

    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    pub fn codes(&self) -> &[u16] {
        &self.codes
    }

    /// Whether an attempt that ended this way may be retried under these conditions.
    pub fn should_retry(&self, outcome: Outcome) -> bool {
        use RetryCondition as C;
        let any = |cs: &[C]| cs.iter().any(|c| self.contains(*c));
        match outcome {
            Outcome::Response {
                status,
                grpc_status,
            } => {
                let by_status = (status >= 500 && any(&[C::FiveXx]))
                    || (matches!(status, 502..=504) && any(&[C::GatewayError]))
                    || (status == 409 && any(&[C::Retriable4xx]))
                    || (any(&[C::RetriableStatusCodes]) && self.codes.contains(&status));
                let by_grpc = match grpc_status {
                    Some(1) => any(&[C::Cancelled]),
                    Some(4) => any(&[C::DeadlineExceeded]),
                    Some(8) => any(&[C::ResourceExhausted]),
                    Some(13) => any(&[C::Internal]),
                    Some(14) => any(&[C::Unavailable]),
                    _ => false,
                };
                by_status || by_grpc
            }
            Outcome::ConnectFailure => any(&[C::FiveXx, C::GatewayError, C::ConnectFailure]),
            Outcome::RefusedStream => any(&[C::FiveXx, C::Reset, C::RefusedStream]),
            Outcome::ResetBeforeRequest => {
                any(&[C::FiveXx, C::GatewayError, C::Reset, C::ResetBeforeRequest])
            }
            Outcome::Reset | Outcome::PerTryTimeout => any(&[C::FiveXx, C::GatewayError, C::Reset]),
        }
    }
}

impl fmt::Display for RetryOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (name, c) in NAMES {
            if self.contains(c) {
                if !first {
                    f.write_str(",")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        for code in &self.codes {
            write!(f, ",{code}")?;
        }
        Ok(())
    }
}

/// How one upstream attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response arrived; `grpc_status` from its headers or trailers for gRPC.
    Response {
        status: u16,
        grpc_status: Option<u8>,
    },
    ConnectFailure,
    RefusedStream,
    ResetBeforeRequest,
    /// Reset or disconnected after the request was sent, before a response.
    Reset,
    PerTryTimeout,
}

/// Envoy's default base interval of the retry backoff.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);
/// Retries try another host this many times before accepting a previous one (Istio's value).
pub const HOST_SELECTION_ATTEMPTS: u32 = 5;

/// The retry policy of a route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt: at most `1 + attempts` upstream requests.
    pub attempts: u32,
    /// Absent: each attempt is bounded only by the route timeout.
    pub per_try_timeout: Option<Duration>,
    pub retry_on: RetryOn,
    /// Prefer a host not tried before (Envoy's previous-hosts predicate).
    pub avoid_previous_hosts: bool,
    pub host_selection_attempts: u32,
    /// Fully jittered exponential backoff: base, capped at 10 × base (Envoy).
    pub backoff_base: Duration,
}

impl RetryPolicy {
    /// What Istio applies when a route has no `retries`: 2 retries on
    /// connect-failure, refused-stream, unavailable, cancelled and 503.
    pub fn istio_default() -> RetryPolicy {
        RetryPolicy {
            attempts: 2,
            per_try_timeout: None,
            retry_on: RetryOn::istio_default(),
            avoid_previous_hosts: true,
            host_selection_attempts: HOST_SELECTION_ATTEMPTS,
            backoff_base: DEFAULT_BACKOFF_BASE,
        }
    }

    pub fn backoff_max(&self) -> Duration {
        self.backoff_base.saturating_mul(10)
    }

    /// The delay before retry number `retry` (1-based), given a uniform random `u64`: uniform
    /// in `[0, min(base × 2^(retry-1), max))`, Envoy's fully jittered backoff.
    pub fn backoff(&self, retry: u32, random: u64) -> Duration {
        let exp = retry.saturating_sub(1).min(20);
        let ceiling = self
            .backoff_base
            .saturating_mul(1u32 << exp)
            .min(self.backoff_max());
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(super::scale(random, nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(s: u16) -> Outcome {
        Outcome::Response {
            status: s,
            grpc_status: None,
        }
    }
    fn grpc(g: u8) -> Outcome {
        Outcome::Response {
            status: 200,
            grpc_status: Some(g),
        }
    }

    #[test]
    fn parse_names_and_codes() {
        let r = RetryOn::parse("5xx, reset,503,retriable-4xx").expect("valid");
        assert!(r.contains(RetryCondition::FiveXx));
        assert!(r.contains(RetryCondition::Reset));
        assert!(r.contains(RetryCondition::Retriable4xx));
        assert!(
            r.contains(RetryCondition::RetriableStatusCodes),
            "a code implies the condition"
        );
        assert_eq!(r.codes(), [503]);
        assert_eq!(
            r.to_string(),
            "5xx,reset,retriable-4xx,retriable-status-codes,503"
        );
        assert_eq!(
            RetryOn::parse("5xxx"),
            Err(RetryOnError::Unknown("5xxx".into()))
        );
        assert_eq!(RetryOn::parse("700"), Err(RetryOnError::BadStatus(700)));
        assert!(RetryOn::parse("").expect("empty").is_empty());
    }

    #[test]
    fn five_xx_retries_any_5xx_and_no_response() {
        let r = RetryOn::parse("5xx").expect("valid");
        for s in [500, 501, 503, 599] {
            assert!(r.should_retry(status(s)), "{s}");
        }
        for s in [200, 404, 409, 499] {
            assert!(!r.should_retry(status(s)), "{s}");
        }
        for o in [
            Outcome::ConnectFailure,
            Outcome::RefusedStream,
            Outcome::Reset,
            Outcome::PerTryTimeout,
            Outcome::ResetBeforeRequest,
        ] {
            assert!(r.should_retry(o), "{o:?}");
        }
    }

    #[test]
    fn gateway_error_only_502_503_504() {
        let r = RetryOn::parse("gateway-error").expect("valid");
        for (s, want) in [
            (500, false),
            (501, false),
            (502, true),
            (503, true),
            (504, true),
            (505, false),
        ] {
            assert_eq!(r.should_retry(status(s)), want, "{s}");
        }
        assert!(r.should_retry(Outcome::ConnectFailure));
        assert!(!r.should_retry(Outcome::RefusedStream));
    }

    #[test]
    fn narrow_conditions() {
        let c = RetryOn::parse("connect-failure").expect("valid");
        assert!(c.should_retry(Outcome::ConnectFailure));
        assert!(!c.should_retry(Outcome::Reset));
        assert!(!c.should_retry(status(503)));
        let r = RetryOn::parse("retriable-4xx").expect("valid");
        assert!(r.should_retry(status(409)));
        assert!(!r.should_retry(status(400)));
        let rs = RetryOn::parse("refused-stream").expect("valid");
        assert!(rs.should_retry(Outcome::RefusedStream));
        assert!(!rs.should_retry(Outcome::Reset));
    }

    #[test]
    fn grpc_conditions_read_grpc_status() {
        let r =
            RetryOn::parse("cancelled,deadline-exceeded,internal,resource-exhausted,unavailable")
                .expect("valid");
        for g in [1, 4, 8, 13, 14] {
            assert!(r.should_retry(grpc(g)), "grpc {g}");
        }
        for g in [0, 2, 3, 5, 16] {
            assert!(!r.should_retry(grpc(g)), "grpc {g}");
        }
        let only = RetryOn::parse("unavailable").expect("valid");
        assert!(!only.should_retry(grpc(1)));
        assert!(!only.should_retry(status(503)));
    }

    #[test]
    fn istio_default_policy() {
        let p = RetryPolicy::istio_default();
        assert_eq!(p.attempts, 2);
        assert_eq!(
            p.retry_on.to_string(),
            "connect-failure,refused-stream,retriable-status-codes,cancelled,unavailable,503"
        );
        assert!(p.retry_on.should_retry(status(503)));
        assert!(!p.retry_on.should_retry(status(500)));
        assert!(!p.retry_on.should_retry(Outcome::Reset));
        assert!(p.avoid_previous_hosts);
        assert_eq!(p.host_selection_attempts, 5);
    }

    #[test]
    fn backoff_is_jittered_exponential_with_a_cap() {
        let p = RetryPolicy::istio_default();
        let ms = Duration::from_millis;
        // The largest random value lands just under each ceiling: 25, 50, 100, 200, 250, 250.
        for (retry, ceiling) in [(1, 25), (2, 50), (3, 100), (4, 200), (5, 250), (9, 250)] {
            let top = p.backoff(retry, u64::MAX);
            assert!(top < ms(ceiling), "retry {retry}: {top:?}");
            assert!(top >= ms(ceiling) - ms(1), "retry {retry}: {top:?}");
            assert_eq!(p.backoff(retry, 0), Duration::ZERO);
        }
    }
}
