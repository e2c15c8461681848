//! L4 authorization policies in the shape of Istio's `istio.security.Authorization`, and the
//! question "does this connection match this policy". Which policies apply to a workload and
//! what the combined verdict is live in `authz`.
//!
//! Matching semantics (from the Istio API and its ztunnel): a policy matches when ANY rule
//! matches; a rule matches when ALL its clauses match; a clause matches when ANY of its matches
//! matches; a match requires every non-empty field (positive: any entry hits; `not*`: no entry
//! hits). Edge cases, kept as Istio has them: a policy with no rules matches nothing, a rule
//! with no clauses matches everything, a clause with no matches matches, and a match with every
//! field empty matches nothing.

use std::fmt;
use std::net::IpAddr;

use crate::identity::Identity;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Applies to every workload.
    Global,
    /// Applies to the workloads in the policy's namespace.
    Namespace,
    /// Applies to the workloads that list the policy in `authorization_policies`.
    WorkloadSelector,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
}

/// Istio's `StringMatch`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// Any non-empty value.
    Presence,
}

impl StringMatch {
    /// A value as Istio's `AuthorizationPolicy` writes it: `*` is any non-empty value,
    /// `*abc` a suffix, `abc*` a prefix, anything else exact (a `*` elsewhere is a plain
    /// character, as Istio's matcher generator reads it).
    pub fn from_istio(s: &str) -> StringMatch {
        if s == "*" {
            StringMatch::Presence
        } else if let Some(suffix) = s.strip_prefix('*') {
            StringMatch::Suffix(suffix.to_owned())
        } else if let Some(prefix) = s.strip_suffix('*') {
            StringMatch::Prefix(prefix.to_owned())
        } else {
            StringMatch::Exact(s.to_owned())
        }
    }

    /// The same match with its value lowercased, for a value compared without case (host
    /// names): the caller lowercases what it matches too.
    pub fn to_lowercase(&self) -> StringMatch {
        match self {
            StringMatch::Exact(v) => StringMatch::Exact(v.to_ascii_lowercase()),
            StringMatch::Prefix(v) => StringMatch::Prefix(v.to_ascii_lowercase()),
            StringMatch::Suffix(v) => StringMatch::Suffix(v.to_ascii_lowercase()),
            StringMatch::Presence => StringMatch::Presence,
        }
    }

    pub fn matches(&self, s: &str) -> bool {
        match self {
            StringMatch::Exact(v) => s == v,
            StringMatch::Prefix(v) => s.starts_with(v.as_str()),
            StringMatch::Suffix(v) => s.ends_with(v.as_str()),
            StringMatch::Presence => !s.is_empty(),
        }
    }
}

/// An address block, e.g. `10.0.0.0/8`; a bare address is a /32 or /128.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix_len: u8,
}

impl Cidr {
    /// `None` when the prefix is longer than the address.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Option<Cidr> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix_len <= max).then_some(Cidr { addr, prefix_len })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix_len)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix_len)
            }
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let full = usize::from(bits / 8);
    let rest = bits % 8;
    if a[..full] != b[..full] {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    (a[full] & mask) == (b[full] & mask)
}

impl std::str::FromStr for Cidr {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s.split_once('/') {
            None => {
                let addr: IpAddr = s.parse().map_err(|_| ())?;
                let len = if addr.is_ipv4() { 32 } else { 128 };
                Ok(Cidr {
                    addr,
                    prefix_len: len,
                })
            }
            Some((a, l)) => {
                let addr: IpAddr = a.parse().map_err(|_| ())?;
                let len: u8 = l.parse().map_err(|_| ())?;
                Cidr::new(addr, len).ok_or(())
            }
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// Istio's `ServiceAccountMatch`: the source identity's namespace and service account.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
}

/// One `Match` of a clause. Empty lists are "no constraint".
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Match {
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub service_accounts: Vec<ServiceAccountMatch>,
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    /// Matched against the principal `td/ns/<ns>/sa/<sa>` (the SPIFFE ID without `spiffe://`).
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub source_ips: Vec<Cidr>,
    pub not_source_ips: Vec<Cidr>,
    pub destination_ips: Vec<Cidr>,
    pub not_destination_ips: Vec<Cidr>,
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
}

/// A clause: any of its matches.
pub type Clause = Vec<Match>;
/// A rule: all of its clauses.
pub type Rule = Vec<Clause>;

/// What a policy sees of a connection. The source identity is the one the peer proved over
/// mTLS; plaintext connections have none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionInfo {
    pub src_identity: Option<Identity>,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authorization {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub action: Action,
    pub rules: Vec<Rule>,
    /// A dry-run policy is never enforced.
    pub dry_run: bool,
}

impl Authorization {
    /// `namespace/name`, the key workloads use in `authorization_policies`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn matches(&self, conn: &ConnectionInfo) -> bool {
        self.rules.iter().any(|rule| {
            rule.iter()
                .all(|clause| clause.is_empty() || clause.iter().any(|m| m.matches(conn)))
        })
    }
}

impl Match {
    fn is_empty(&self) -> bool {
        *self == Match::default()
    }

    pub fn matches(&self, conn: &ConnectionInfo) -> bool {
        if self.is_empty() {
            return false;
        }
        let id = conn.src_identity.as_ref();
        // Without an identity, namespace and principal are the empty string: only `not*`
        // lists and `Exact("")` can match it, and `Presence` cannot.
        let ns = id.map(Identity::namespace).unwrap_or("");
        // Formatted only if a principal list is there to match it.
        let principal = std::cell::OnceCell::new();
        let sa_hit = |m: &ServiceAccountMatch| {
            id.is_some_and(|i| {
                i.namespace() == m.namespace && i.service_account() == m.service_account
            })
        };
        field(&self.namespaces, &self.not_namespaces, |m| m.matches(ns))
            && field(&self.service_accounts, &self.not_service_accounts, sa_hit)
            && field(&self.principals, &self.not_principals, |m| {
                id.is_some_and(|i| m.matches(principal.get_or_init(|| i.principal())))
            })
            && field(&self.source_ips, &self.not_source_ips, |c| {
                c.contains(conn.src_ip)
            })
            && field(&self.destination_ips, &self.not_destination_ips, |c| {
                c.contains(conn.dst_ip)
            })
            && field(&self.destination_ports, &self.not_destination_ports, |p| {
                *p == conn.dst_port
            })
    }
}

/// A positive list (empty, or any entry hits) and a negative list (no entry hits).
fn field<T>(positive: &[T], negative: &[T], hit: impl Fn(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&hit)) && !negative.iter().any(&hit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn string_matches() {
        let cases = [
            (StringMatch::Exact("a".into()), "a", true),
            (StringMatch::Exact("a".into()), "ab", false),
            (StringMatch::Exact(String::new()), "", true),
            (StringMatch::Prefix("td/ns/".into()), "td/ns/x", true),
            (StringMatch::Prefix("td/ns/".into()), "xtd/ns/", false),
            (
                StringMatch::Suffix("/sa/sleep".into()),
                "td/ns/a/sa/sleep",
                true,
            ),
            (
                StringMatch::Suffix("/sa/sleep".into()),
                "td/ns/a/sa/sleepy",
                false,
            ),
            (StringMatch::Presence, "x", true),
            (StringMatch::Presence, "", false),
        ];
        for (m, s, want) in cases {
            assert_eq!(m.matches(s), want, "{m:?} on {s:?}");
        }
    }

    #[test]
    fn istio_written_values() {
        let cases = [
            ("*", StringMatch::Presence),
            ("*/sa/sleep", StringMatch::Suffix("/sa/sleep".into())),
            ("/api/*", StringMatch::Prefix("/api/".into())),
            ("/a*b", StringMatch::Exact("/a*b".into())),
            ("", StringMatch::Exact(String::new())),
            ("**", StringMatch::Suffix("*".into())),
        ];
        for (written, want) in cases {
            assert_eq!(StringMatch::from_istio(written), want, "{written:?}");
        }
    }

    #[test]
    fn cidrs() {
        let cases = [
            ("10.0.0.0/8", "10.1.2.3", true),
            ("10.0.0.0/8", "11.0.0.0", false),
            ("10.1.2.3", "10.1.2.3", true),
            ("10.1.2.3", "10.1.2.4", false),
            ("10.1.2.0/23", "10.1.3.255", true),
            ("10.1.2.0/23", "10.1.4.0", false),
            ("0.0.0.0/0", "192.168.1.1", true),
            ("0.0.0.0/0", "::1", false),
            ("fd00::/8", "fd12::1", true),
            ("fd00::/8", "fe00::1", false),
            ("::/0", "::1", true),
            ("::1", "::1", true),
        ];
        for (c, addr, want) in cases {
            let cidr: Cidr = c.parse().unwrap();
            assert_eq!(cidr.contains(ip(addr)), want, "{c} contains {addr}");
        }
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "x",
            "10.0.0.0/",
            "10.0.0.0/-1",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad} accepted");
        }
        assert_eq!(
            "10.0.0.1".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.1/32"
        );
    }
}
