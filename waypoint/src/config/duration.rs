//! Durations as the two APIs write them: Istio's (Go `time.ParseDuration` units) and
//! Gateway API's (GEP-2257).

use std::time::Duration;

use super::decode::{Cx, Decode, Path};
use super::yaml::Node;

/// A duration as Istio reads it (Go's `time.ParseDuration` units: `1.5s`, `1m`, `250ms`,
/// `1h30m`); negative durations are refused.
pub fn duration(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Duration> {
    let s = String::decode(node, at, cx)?;
    match parse_duration(&s, false) {
        Ok(d) => Some(d),
        Err(why) => {
            cx.invalid(at, node, format!("{s:?}: {why}"));
            None
        }
    }
}

/// A Gateway API `Duration`: 1 to 4 groups of up to 5 digits with `h`, `m`, `s` or `ms`
/// (GEP-2257), e.g. `1h30m`, `500ms`.
pub fn gateway_duration(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Duration> {
    let s = String::decode(node, at, cx)?;
    match parse_duration(&s, true) {
        Ok(d) => Some(d),
        Err(why) => {
            cx.invalid(at, node, format!("{s:?}: {why}"));
            None
        }
    }
}

/// Parses `<number><unit>` groups. `gateway` restricts the form to GEP-2257's.
pub fn parse_duration(s: &str, gateway: bool) -> Result<Duration, String> {
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if s == "0" && !gateway {
        return Ok(Duration::ZERO);
    }
    if s.starts_with('-') {
        return Err("a duration cannot be negative".into());
    }
    let mut rest = s;
    let mut total_nanos: u128 = 0;
    let mut groups = 0;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || (!gateway && c == '.')))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_end);
        if num.is_empty() || num == "." {
            return Err("expected a number before each unit".into());
        }
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let unit_nanos: u128 = match unit {
            "h" => 3_600_000_000_000,
            "m" => 60_000_000_000,
            "s" => 1_000_000_000,
            "ms" => 1_000_000,
            "us" | "µs" if !gateway => 1_000,
            "ns" if !gateway => 1,
            "" => return Err("missing unit (h, m, s or ms)".into()),
            other => return Err(format!("unknown unit {other:?}")),
        };
        if gateway && num.len() > 5 {
            return Err("at most 5 digits per unit".into());
        }
        let (int, frac) = num.split_once('.').unwrap_or((num, ""));
        if !frac.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("malformed number {num:?}"));
        }
        let int: u128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| "number too large".to_string())?
        };
        let mut nanos = int
            .checked_mul(unit_nanos)
            .ok_or_else(|| "duration too large".to_string())?;
        let mut scale = unit_nanos;
        for d in frac.bytes() {
            scale /= 10;
            nanos += u128::from(d - b'0') * scale;
        }
        total_nanos = total_nanos
            .checked_add(nanos)
            .ok_or_else(|| "duration too large".to_string())?;
        groups += 1;
        rest = tail;
    }
    if gateway && groups > 4 {
        return Err("at most 4 unit groups".into());
    }
    let secs = u64::try_from(total_nanos / 1_000_000_000).map_err(|_| "duration too large")?;
    let nanos = (total_nanos % 1_000_000_000) as u32;
    Ok(Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_durations() {
        let ms = Duration::from_millis;
        assert_eq!(parse_duration("2s", false), Ok(ms(2000)));
        assert_eq!(parse_duration("1.5s", false), Ok(ms(1500)));
        assert_eq!(parse_duration("0.25s", false), Ok(ms(250)));
        assert_eq!(parse_duration("250ms", false), Ok(ms(250)));
        assert_eq!(parse_duration("1m", false), Ok(ms(60_000)));
        assert_eq!(parse_duration("1h30m", false), Ok(ms(5_400_000)));
        assert_eq!(parse_duration("10us", false), Ok(Duration::from_micros(10)));
        assert_eq!(parse_duration("0", false), Ok(Duration::ZERO));
        for bad in ["", "-1s", "5", "1x", "s", "1.5.s", "1d"] {
            assert!(parse_duration(bad, false).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn gateway_durations_follow_gep_2257() {
        let ms = Duration::from_millis;
        assert_eq!(parse_duration("1h2m3s4ms", true), Ok(ms(3_723_004)));
        assert_eq!(parse_duration("500ms", true), Ok(ms(500)));
        for bad in ["1.5s", "0", "123456s", "1h1h1h1h1h", "10us"] {
            assert!(parse_duration(bad, true).is_err(), "{bad:?} accepted");
        }
    }
}
