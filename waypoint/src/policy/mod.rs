//! Per-request policy as data and pure decisions: retries, faults, mirrors, header edits,
//! rewrites and redirects, L7 authorization (`authz`) and request authentication (`jwt`). The route table carries these per route; the server acts on them.
//! Random choices take the random number as an argument, so every decision is testable.

pub mod authz;
pub mod cors;
pub mod fault;
pub mod headers;
pub mod jwt;
pub mod redirect;
pub mod retry;
pub mod target;

/// Maps a uniform random `u64` onto `0..n` (multiply and shift: no division, no modulo
/// bias worth speaking of for the small `n` used here).
pub fn scale(random: u64, n: u64) -> u64 {
    ((u128::from(random) * u128::from(n)) >> 64) as u64
}

/// A share of requests, in parts per million (Istio percentages have fractions: 0.1% is
/// 1,000 ppm).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Fraction(u32);

impl Fraction {
    pub const ALL: Fraction = Fraction(1_000_000);
    pub const NONE: Fraction = Fraction(0);

    /// From a percentage in 0..=100 (clamped).
    pub fn from_percent(p: f64) -> Fraction {
        let ppm = (p.clamp(0.0, 100.0) * 10_000.0).round();
        // In 0..=1e6 after the clamp, so the cast is exact.
        Fraction(ppm as u32)
    }

    pub fn ppm(self) -> u32 {
        self.0
    }

    /// Whether a request with this uniform random number falls in the share.
    pub fn applies(self, random: u64) -> bool {
        scale(random, 1_000_000) < u64::from(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions() {
        assert_eq!(Fraction::from_percent(100.0), Fraction::ALL);
        assert_eq!(Fraction::from_percent(0.1).ppm(), 1_000);
        assert_eq!(Fraction::from_percent(250.0), Fraction::ALL);
        assert!(Fraction::ALL.applies(u64::MAX));
        assert!(!Fraction::NONE.applies(0));
        let half = Fraction::from_percent(50.0);
        assert!(half.applies(u64::MAX / 2 - 1_000_000_000_000));
        assert!(!half.applies(u64::MAX / 2 + 1_000_000_000_000));
    }

    #[test]
    fn scale_spans_the_range() {
        assert_eq!(scale(0, 10), 0);
        assert_eq!(scale(u64::MAX, 10), 9);
        assert_eq!(scale(u64::MAX / 2, 10), 4);
    }
}
