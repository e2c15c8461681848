//! `Condition` of an AuthorizationPolicy rule (`when`): the attribute keys Istio documents
//! ("Authorization Policy Conditions"), each with its values read by type (addresses as
//! CIDRs, ports as numbers, the rest as Istio's `*` string forms), and the value parsers
//! the other parts of a policy share.

use ztunnel::state::policy::{Cidr, StringMatch};

use super::super::decode::{Cx, Decode, Fields, Path};
use super::super::yaml::Node;

/// `Condition`: the attribute must have one of `values` and none of `not_values`.
#[derive(Clone, Debug, PartialEq)]
pub struct Condition {
    pub key: Key,
    pub values: Values,
    pub not_values: Values,
}

/// The attribute a condition reads (Istio's "Authorization Policy Conditions").
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    /// `request.headers[<name>]`, the name lowercased.
    Header(String),
    SourceIp,
    RemoteIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationIp,
    DestinationPort,
    /// `connection.sni`: the tunnel has none (HBONE carries no SNI; the HTTP inside is plain).
    ConnectionSni,
    /// `request.auth.principal`: `<iss>/<sub>` of the verified token.
    RequestPrincipal,
    /// `request.auth.audiences`: its `aud`.
    RequestAudiences,
    /// `request.auth.presenter`: its `azp`.
    RequestPresenter,
    /// `request.auth.claims[a][b]`: a claim, by its path (string or list of strings).
    RequestClaim(Vec<String>),
    /// `experimental.envoy.filters.*`: Envoy filter metadata, which the waypoint has none of.
    Experimental(String),
}

impl Key {
    fn parse(s: &str) -> Result<Key, String> {
        if let Some(name) = s
            .strip_prefix("request.headers[")
            .and_then(|r| r.strip_suffix(']'))
        {
            return match http::HeaderName::from_bytes(name.as_bytes()) {
                Ok(h) => Ok(Key::Header(h.as_str().to_owned())),
                Err(_) => Err(format!("{name:?} is not a valid header name")),
            };
        }
        Ok(match s {
            "source.ip" => Key::SourceIp,
            "remote.ip" => Key::RemoteIp,
            "source.namespace" => Key::SourceNamespace,
            "source.principal" => Key::SourcePrincipal,
            "destination.ip" => Key::DestinationIp,
            "destination.port" => Key::DestinationPort,
            "connection.sni" => Key::ConnectionSni,
            "request.auth.principal" => Key::RequestPrincipal,
            "request.auth.audiences" => Key::RequestAudiences,
            "request.auth.presenter" => Key::RequestPresenter,
            _ if s.starts_with("request.auth.claims[") => Key::RequestClaim(claim_path(s)?),
            _ if s.starts_with("experimental.envoy.filters.") => Key::Experimental(s.to_owned()),
            _ => return Err(format!("{s:?} is not a condition key Istio knows")),
        })
    }
}

/// `request.auth.claims[a][b]` → `["a", "b"]`: one or more non-empty bracketed names.
fn claim_path(s: &str) -> Result<Vec<String>, String> {
    let bad = || format!("{s:?}: write a claim as request.auth.claims[name] (nested: [a][b])");
    let mut rest = s.strip_prefix("request.auth.claims").ok_or_else(bad)?;
    let mut path = Vec::new();
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[').ok_or_else(bad)?;
        let end = inner.find(']').ok_or_else(bad)?;
        let name = &inner[..end];
        if name.is_empty() || name.contains('[') {
            return Err(bad());
        }
        path.push(name.to_owned());
        rest = &inner[end + 1..];
    }
    if path.is_empty() {
        return Err(bad());
    }
    Ok(path)
}

/// A condition's values, read by the type its key has.
#[derive(Clone, Debug, PartialEq)]
pub enum Values {
    Strings(Vec<StringMatch>),
    Cidrs(Vec<Cidr>),
    Ports(Vec<u16>),
}

impl Values {
    pub fn is_empty(&self) -> bool {
        match self {
            Values::Strings(v) => v.is_empty(),
            Values::Cidrs(v) => v.is_empty(),
            Values::Ports(v) => v.is_empty(),
        }
    }
}

pub(super) fn parse_cidr(s: &str) -> Result<Cidr, String> {
    s.parse::<Cidr>()
        .map_err(|()| format!("{s:?} is not an IP address or CIDR block"))
}

pub(super) fn parse_port(s: &str) -> Result<u16, String> {
    s.parse::<u16>()
        .map_err(|_| format!("{s:?} is not a port (0..=65535)"))
}

/// Each of `written` through `parse`; every bad one is reported at its index.
pub(super) fn parse_all<T>(
    node: &Node,
    at: &Path<'_>,
    cx: &mut Cx,
    written: &[String],
    parse: impl Fn(&str) -> Result<T, String>,
) -> Option<Vec<T>> {
    let items: &[Node] = match &node.value {
        super::super::yaml::Value::Seq(items) => items,
        _ => &[],
    };
    let mut out = Vec::with_capacity(written.len());
    let mut ok = true;
    for (i, s) in written.iter().enumerate() {
        match parse(s) {
            Ok(v) => out.push(v),
            Err(why) => {
                cx.invalid(&at.index(i), items.get(i).unwrap_or(node), why);
                ok = false;
            }
        }
    }
    ok.then_some(out)
}

impl Decode for Condition {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let key = f.req_with("key", cx, |n, at, cx| {
            let s = String::decode(n, at, cx)?;
            Key::parse(&s).map_err(|why| cx.invalid(at, n, why)).ok()
        });
        let read = |f: &mut Fields<'_, '_>, name: &str, cx: &mut Cx| -> Option<Values> {
            let Some(key) = key.as_ref() else {
                // Values of an unknown key cannot be read; the key's error says why.
                f.ignore(name);
                return None;
            };
            let v = f.opt_with(name, cx, |n, at, cx| {
                let written = Vec::<String>::decode(n, at, cx)?;
                match key {
                    Key::SourceIp | Key::RemoteIp | Key::DestinationIp => {
                        parse_all(n, at, cx, &written, parse_cidr).map(Values::Cidrs)
                    }
                    Key::DestinationPort => {
                        parse_all(n, at, cx, &written, parse_port).map(Values::Ports)
                    }
                    _ => Some(Values::Strings(
                        written.iter().map(|s| StringMatch::from_istio(s)).collect(),
                    )),
                }
            });
            if f.has(name) && v.is_none() {
                return None;
            }
            Some(v.unwrap_or(Values::Strings(Vec::new())))
        };
        let values = read(&mut f, "values", cx);
        let not_values = read(&mut f, "notValues", cx);
        let mut ok = true;
        if let (Some(v), Some(nv)) = (&values, &not_values)
            && v.is_empty()
            && nv.is_empty()
        {
            f.invalid(
                "values",
                cx,
                "at least one of values or notValues must be set",
            );
            ok = false;
        }
        match &key {
            Some(Key::ConnectionSni) => f.not_implemented(
                "key",
                cx,
                "connection.sni (the tunnel carries none): never matches in ALLOW, always in DENY",
            ),
            Some(Key::Experimental(_)) => f.not_implemented(
                "key",
                cx,
                "experimental.envoy.filters.* (no Envoy filter metadata): never matches in ALLOW, always in DENY",
            ),
            _ => {}
        }
        let ok = f.finish(cx) && ok;
        Some(Condition {
            key: key?,
            values: values?,
            not_values: not_values?,
        })
        .filter(|_| ok)
    }
}
