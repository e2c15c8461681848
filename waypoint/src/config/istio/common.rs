//! Types shared by VirtualService and DestinationRule (`networking.istio.io`): string
//! matches, destinations, percentages and header operations, with Istio's validation rules.

use std::collections::BTreeMap;

use super::super::decode::{Cx, Decode, Fields, Path, at_most_one};
use super::super::yaml::Node;

/// `StringMatch`: one of `exact`, `prefix`, `regex`. An empty match (`{}`) is allowed where
/// Istio gives it a meaning (a header that must be present, or absent in `withoutHeaders`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    /// RE2 syntax, matched against the whole value.
    Regex(String),
    /// `{}`: any value, the field only has to be present.
    Present,
}

impl Decode for StringMatch {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let exact = f.opt::<String>("exact", cx);
        let prefix = f.opt::<String>("prefix", cx);
        let regex = f.opt_with("regex", cx, regex_pattern);
        let one = at_most_one(
            &mut f,
            cx,
            &["exact", "prefix", "regex"],
            &[exact.is_some(), prefix.is_some(), regex.is_some()],
        );
        let ok = f.finish(cx) && one;
        let m = match (exact, prefix, regex) {
            (Some(e), _, _) => StringMatch::Exact(e),
            (_, Some(p), _) => StringMatch::Prefix(p),
            (_, _, Some(r)) => StringMatch::Regex(r),
            _ => StringMatch::Present,
        };
        ok.then_some(m)
    }
}

/// The largest compiled regex the config may ask for (the `regex` crate's default is 10 MiB;
/// route config needs far less).
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// A regex checked to compile under RE2 rules (the `regex` crate implements RE2's syntax
/// without backreferences or lookaround, as Envoy's RE2 engine does).
pub fn regex_pattern(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<String> {
    let s = String::decode(node, at, cx)?;
    match regex::RegexBuilder::new(&s)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
    {
        Ok(_) => Some(s),
        Err(e) => {
            cx.invalid(at, node, format!("not a valid RE2 regex: {e}"));
            None
        }
    }
}

/// `PortSelector`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortSelector {
    pub number: u16,
}

impl Decode for PortSelector {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let number = f.opt_with("number", cx, port_number);
        let ok = f.finish(cx);
        match number {
            Some(number) if ok => Some(PortSelector { number }),
            None if ok => {
                cx.report(
                    &at.field("number"),
                    node.pos,
                    super::super::diag::Problem::Missing,
                );
                None
            }
            _ => None,
        }
    }
}

/// A TCP port, 1 to 65535.
pub fn port_number(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<u16> {
    let p = u32::decode(node, at, cx)?;
    match u16::try_from(p) {
        Ok(p) if p > 0 => Some(p),
        _ => {
            cx.invalid(at, node, format!("port {p} is not in 1..=65535"));
            None
        }
    }
}

/// `Destination`: a service host, with an optional subset and port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    /// As written: a short name (`reviews`), `reviews.ns`, or a full name.
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<PortSelector>,
}

impl Decode for Destination {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let host = f.req_with("host", cx, host_name);
        let subset = f.opt::<String>("subset", cx);
        let port = f.opt::<PortSelector>("port", cx);
        let ok = f.finish(cx);
        Some(Destination {
            host: host?,
            subset,
            port,
        })
        .filter(|_| ok)
    }
}

/// A host name as VirtualService and DestinationRule take it: DNS labels, optionally with a
/// leading `*` wildcard label. Lowercased, as Kubernetes names are.
pub fn host_name(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<String> {
    let s = String::decode(node, at, cx)?;
    match check_host(&s) {
        Ok(()) => Some(s.to_ascii_lowercase()),
        Err(why) => {
            cx.invalid(at, node, format!("{s:?}: {why}"));
            None
        }
    }
}

fn check_host(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("empty host");
    }
    if s == "*" {
        return Ok(());
    }
    if s.len() > 253 {
        return Err("longer than 253 characters");
    }
    let body = s.strip_prefix("*.").unwrap_or(s);
    for label in body.split('.') {
        let bytes = label.as_bytes();
        let ok = !bytes.is_empty()
            && bytes.len() <= 63
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
            && bytes.first() != Some(&b'-')
            && bytes.last() != Some(&b'-');
        if !ok {
            return Err("not a DNS name (labels of letters, digits and '-'; '*' only first)");
        }
    }
    Ok(())
}

/// `Percent`: 0 to 100, fractions allowed.
pub fn percent(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<f64> {
    let mut f = Fields::new(node, at, cx)?;
    let value = f.opt::<f64>("value", cx).unwrap_or(0.0);
    let ok = f.finish(cx);
    if !(0.0..=100.0).contains(&value) {
        cx.invalid(
            &at.field("value"),
            node,
            format!("{value} is not in 0..=100"),
        );
        return None;
    }
    ok.then_some(value)
}

/// A deprecated integer percentage (`mirrorPercent`, `delay.percent`), 0 to 100.
pub fn int_percent(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<f64> {
    let v = u32::decode(node, at, cx)?;
    if v > 100 {
        cx.invalid(at, node, format!("{v} is not in 0..=100"));
        return None;
    }
    Some(f64::from(v))
}

/// `Headers.HeaderOperations`: set, add, remove.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderOperations {
    pub set: BTreeMap<String, String>,
    pub add: BTreeMap<String, String>,
    pub remove: Vec<String>,
}

impl Decode for HeaderOperations {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let set = f.map::<String>("set", cx);
        let add = f.map::<String>("add", cx);
        let remove = f.list::<String>("remove", cx);
        let mut ok = f.finish(cx);
        for name in set.keys().chain(add.keys()).chain(remove.iter()) {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                cx.invalid(at, node, format!("{name:?} is not a valid header name"));
                ok = false;
            }
        }
        for (name, value) in set.iter().chain(add.iter()) {
            if http::HeaderValue::from_str(value).is_err() {
                cx.invalid(
                    at,
                    node,
                    format!("the value of {name:?} is not a valid header value"),
                );
                ok = false;
            }
        }
        ok.then_some(HeaderOperations { set, add, remove })
    }
}

/// `Headers`: operations on the request and on the response.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers {
    pub request: Option<HeaderOperations>,
    pub response: Option<HeaderOperations>,
}

impl Decode for Headers {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let request = f.opt("request", cx);
        let response = f.opt("response", cx);
        let ok = f.finish(cx);
        ok.then_some(Headers { request, response })
    }
}

/// Kubernetes labels (`map<string, string>`).
pub type Labels = BTreeMap<String, String>;
