//! Does a request match a policy: Istio's rule semantics over what the waypoint knows of a
//! request. A policy matches when any rule does; a rule when all of its `from` (any source),
//! `to` (any operation) and `when` (every condition) hold; a source or operation when every
//! field it sets holds (a positive list: any entry; a `not` list: no entry).
//!
//! JWT attributes (`requestPrincipals`, `request.auth.*`) are those of the token
//! RequestAuthentication verified (`policy::jwt`); a request without one has no request
//! principal and no claims, so a positive match fails and a `not` match holds, as in Envoy.
//!
//! Some attributes the waypoint cannot see: `connection.sni` (the tunnel carries none), Envoy
//! filter metadata, and every HTTP attribute (JWT ones included) when a tunnel is relayed
//! as bytes. A field on
//! such an attribute takes the value that fails closed: it never matches in an ALLOW policy
//! (fewer requests allowed) and always matches in a DENY or CUSTOM one (more denied). This is
//! what Istio does to HTTP fields in policies enforced on TCP.

use std::borrow::Cow;
use std::net::IpAddr;

use http::HeaderMap;
use ztunnel::identity::Identity;
use ztunnel::state::policy::{Cidr, ServiceAccountMatch};

use crate::config::security::authorization_policy::{
    Condition, Key, Operation, Rule, Source, Values,
};
use crate::policy::jwt::Claims;

/// What a policy sees of a request.
#[derive(Clone, Copy, Debug)]
pub struct Attributes<'a> {
    /// The identity the peer proved over mTLS (never from a header).
    pub peer: &'a Identity,
    /// `peer` as a principal: `<trust domain>/ns/<namespace>/sa/<account>`.
    pub principal: &'a str,
    /// `source.ip`: the client workload's address when the peer proved that workload's
    /// identity, else the tunnel's TCP peer.
    pub source_ip: IpAddr,
    /// `destination.ip` and `destination.port`: the address the client dialled.
    pub destination_ip: IpAddr,
    pub destination_port: u16,
    /// `None` for a tunnel relayed as bytes.
    pub http: Option<HttpAttributes<'a>>,
    /// What the request's verified JWT says; `None` without one.
    pub auth: Option<&'a Claims>,
}

/// The HTTP part of a request.
#[derive(Clone, Copy, Debug)]
pub struct HttpAttributes<'a> {
    pub method: &'a str,
    /// `:authority` or `Host`, as sent.
    pub host: &'a str,
    /// The path without the query string.
    pub path: &'a str,
    pub headers: &'a HeaderMap,
}

/// Matching one request, with the value an unseen attribute takes.
pub(super) struct Matcher<'a> {
    pub(super) a: &'a Attributes<'a>,
    /// `false` in ALLOW policies, `true` in DENY and CUSTOM ones.
    pub(super) unseen: bool,
}

/// A positive list (empty, or any entry hits) and a negative list (no entry hits).
fn both<T>(positive: &[T], negative: &[T], hit: impl Fn(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&hit)) && !negative.iter().any(&hit)
}

impl Matcher<'_> {
    pub(super) fn rule(&self, rule: &Rule) -> bool {
        (rule.from.is_empty() || rule.from.iter().any(|s| self.source(s)))
            && (rule.to.is_empty() || rule.to.iter().any(|o| self.operation(o)))
            && rule.when.iter().all(|c| self.condition(c))
    }

    fn source(&self, s: &Source) -> bool {
        let a = self.a;
        let ns = a.peer.namespace();
        let sa_hit = |m: &ServiceAccountMatch| {
            m.namespace == ns && m.service_account == a.peer.service_account()
        };
        let ip_hit = |c: &Cidr| c.contains(a.source_ip);
        let jwt = if s.request_principals.is_empty() && s.not_request_principals.is_empty() {
            true
        } else if a.http.is_none() {
            self.unseen
        } else {
            let principal = a.auth.map_or("", |c| c.principal.as_str());
            both(&s.request_principals, &s.not_request_principals, |m| {
                !principal.is_empty() && m.matches(principal)
            })
        };
        jwt && both(&s.principals, &s.not_principals, |m| m.matches(a.principal))
            && both(&s.namespaces, &s.not_namespaces, |m| m.matches(ns))
            && both(&s.service_accounts, &s.not_service_accounts, sa_hit)
            && both(&s.trust_domains, &s.not_trust_domains, |m| {
                m.matches(a.peer.trust_domain())
            })
            && both(&s.ip_blocks, &s.not_ip_blocks, ip_hit)
            // remote.ip is the source: no X-Forwarded-For hop is trusted (Envoy's default).
            && both(&s.remote_ip_blocks, &s.not_remote_ip_blocks, ip_hit)
    }

    fn operation(&self, o: &Operation) -> bool {
        let port = self.a.destination_port;
        if !both(&o.ports, &o.not_ports, |p| *p == port) {
            return false;
        }
        let Some(http) = &self.a.http else {
            let http_fields = [
                &o.hosts,
                &o.not_hosts,
                &o.methods,
                &o.not_methods,
                &o.paths,
                &o.not_paths,
            ];
            return http_fields.iter().all(|f| f.is_empty()) || self.unseen;
        };
        let host = if o.hosts.is_empty() && o.not_hosts.is_empty() {
            Cow::Borrowed("")
        } else {
            lowercase(http.host)
        };
        both(&o.hosts, &o.not_hosts, |m| m.matches(&host))
            && both(&o.methods, &o.not_methods, |m| m.matches(http.method))
            && both(&o.paths, &o.not_paths, |m| m.matches(http.path))
    }

    fn condition(&self, c: &Condition) -> bool {
        let a = self.a;
        let strings = |v: &Values, s: Option<&str>| match (v, s) {
            (Values::Strings(list), Some(s)) => list.iter().any(|m| m.matches(s)),
            _ => false,
        };
        let holds = |hit: &dyn Fn(&Values) -> bool| {
            (c.values.is_empty() || hit(&c.values)) && !hit(&c.not_values)
        };
        match &c.key {
            Key::Header(name) => {
                let Some(http) = &a.http else {
                    return self.unseen;
                };
                let value = header(http.headers, name);
                holds(&|v| strings(v, value.as_deref()))
            }
            Key::SourceIp | Key::RemoteIp => holds(&|v| ip_in(v, a.source_ip)),
            Key::DestinationIp => holds(&|v| ip_in(v, a.destination_ip)),
            Key::DestinationPort => holds(&|v| match v {
                Values::Ports(p) => p.contains(&a.destination_port),
                _ => false,
            }),
            Key::SourceNamespace => holds(&|v| strings(v, Some(a.peer.namespace()))),
            Key::SourcePrincipal => holds(&|v| strings(v, Some(a.principal))),
            Key::RequestPrincipal
            | Key::RequestAudiences
            | Key::RequestPresenter
            | Key::RequestClaim(_)
                if a.http.is_none() =>
            {
                self.unseen
            }
            Key::RequestPrincipal => holds(&|v| strings(v, a.auth.map(|c| c.principal.as_str()))),
            Key::RequestAudiences => holds(&|v| {
                a.auth
                    .is_some_and(|c| c.audiences.iter().any(|aud| strings(v, Some(aud))))
            }),
            Key::RequestPresenter => {
                holds(&|v| strings(v, a.auth.and_then(|c| c.presenter.as_deref())))
            }
            Key::RequestClaim(path) => holds(&|v| match a.auth.and_then(|c| c.get(path)) {
                Some(serde_json::Value::String(s)) => strings(v, Some(s)),
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .any(|e| e.as_str().is_some_and(|s| strings(v, Some(s)))),
                _ => false,
            }),
            Key::ConnectionSni | Key::Experimental(_) => self.unseen,
        }
    }
}

fn ip_in(v: &Values, ip: IpAddr) -> bool {
    matches!(v, Values::Cidrs(c) if c.iter().any(|c| c.contains(ip)))
}

fn lowercase(s: &str) -> Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(s.to_ascii_lowercase())
    } else {
        Cow::Borrowed(s)
    }
}

/// A header's value; several are joined with `,` (as Envoy matches them). `None` when
/// absent or not text.
fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<Cow<'h, str>> {
    let mut all = headers.get_all(name).iter();
    let first = all.next()?.to_str().ok()?;
    let mut joined: Option<String> = None;
    for more in all {
        let s = joined.get_or_insert_with(|| first.to_owned());
        s.push(',');
        s.push_str(more.to_str().ok()?);
    }
    Some(joined.map_or(Cow::Borrowed(first), Cow::Owned))
}
