//! `AuthorizationPolicy` (`security.istio.io` v1, v1beta1), as written. Field names follow
//! istio/api `security/v1beta1/authorization.proto` in their JSON form; values are checked
//! as Istio's validation checks them (CIDRs, ports, condition keys, a `from` or `to` that
//! says nothing), so a policy Istio would refuse is refused here with its field path.
//! Which policies apply to this waypoint, and what they decide, is `policy::authz`.

use ztunnel::state::policy::{Cidr, ServiceAccountMatch, StringMatch};

pub use super::condition::{Condition, Key, Values};
use super::condition::{parse_all, parse_cidr, parse_port};

use super::super::decode::{Cx, Decode, Fields, Path};
use super::super::diag::Problem;
use super::super::istio::common::Labels;
use super::super::yaml::Node;

/// `spec.action`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Action {
    #[default]
    Allow,
    Deny,
    Audit,
    Custom,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
            Action::Custom => "CUSTOM",
        }
    }
}

/// `AuthorizationPolicy.spec`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AuthorizationPolicy {
    /// `selector.matchLabels`: a workload selector, which a waypoint does not read.
    pub selector: Option<Labels>,
    /// `targetRefs`, with the older single `targetRef` folded in.
    pub target_refs: Vec<TargetRef>,
    pub action: Action,
    /// `provider.name` of a CUSTOM policy.
    pub provider: Option<String>,
    pub rules: Vec<Rule>,
}

/// `PolicyTargetReference`; the namespace is always the policy's (Istio refuses others).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TargetRef {
    pub group: String,
    pub kind: String,
    pub name: String,
}

/// `Rule`: every part must match (each list: any of its entries).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
    pub when: Vec<Condition>,
}

/// `Source`: every field set must match.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Source {
    /// Matched against `<trust domain>/ns/<namespace>/sa/<account>`.
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    /// JWT request principals (`<iss>/<sub>` of a token RequestAuthentication verified).
    pub request_principals: Vec<StringMatch>,
    pub not_request_principals: Vec<StringMatch>,
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub service_accounts: Vec<ServiceAccountMatch>,
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    pub trust_domains: Vec<StringMatch>,
    pub not_trust_domains: Vec<StringMatch>,
    pub ip_blocks: Vec<Cidr>,
    pub not_ip_blocks: Vec<Cidr>,
    pub remote_ip_blocks: Vec<Cidr>,
    pub not_remote_ip_blocks: Vec<Cidr>,
}

/// `Operation`: every field set must match.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Operation {
    /// Lowercased: hosts are compared without case.
    pub hosts: Vec<StringMatch>,
    pub not_hosts: Vec<StringMatch>,
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
    pub methods: Vec<StringMatch>,
    pub not_methods: Vec<StringMatch>,
    pub paths: Vec<StringMatch>,
    pub not_paths: Vec<StringMatch>,
}

/// What a security policy applies to, read as both kinds write it: `selector`, or
/// `targetRefs` with the older single `targetRef` folded in; false when more than one is set
/// (reported).
pub(super) fn selection(
    f: &mut Fields<'_, '_>,
    cx: &mut Cx,
) -> (Option<Labels>, Vec<TargetRef>, bool) {
    let selector = f.opt_with("selector", cx, |n, at, cx| {
        let mut s = Fields::new(n, at, cx)?;
        let labels = s.map::<String>("matchLabels", cx);
        s.finish(cx).then_some(labels)
    });
    let target_ref = f.opt::<TargetRef>("targetRef", cx);
    let mut target_refs = f.list::<TargetRef>("targetRefs", cx);
    let mut ok = true;
    if target_ref.is_some() && !target_refs.is_empty() {
        f.invalid(
            "targetRef",
            cx,
            "only one of targetRef, targetRefs may be set",
        );
        ok = false;
    }
    if selector.is_some() && (target_ref.is_some() || !target_refs.is_empty()) {
        f.invalid(
            "selector",
            cx,
            "only one of selector, targetRef, targetRefs may be set",
        );
        ok = false;
    }
    target_refs.extend(target_ref);
    (selector, target_refs, ok)
}

impl Decode for AuthorizationPolicy {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let (selector, target_refs, mut ok) = selection(&mut f, cx);
        let action = f.opt_with("action", cx, action).unwrap_or_default();
        let provider = f.opt_with("provider", cx, |n, at, cx| {
            let mut p = Fields::new(n, at, cx)?;
            let name = p.req::<String>("name", cx);
            p.finish(cx).then_some(name).flatten()
        });
        let rules = f.list::<Rule>("rules", cx);
        match (action, &provider) {
            (Action::Custom, None) => {
                f.invalid("provider", cx, "a CUSTOM policy needs provider.name");
                ok = false;
            }
            (Action::Allow | Action::Deny | Action::Audit, Some(_)) => {
                f.invalid("provider", cx, "provider is only for action CUSTOM");
                ok = false;
            }
            _ => {}
        }
        let ok = f.finish(cx) && ok;
        ok.then_some(AuthorizationPolicy {
            selector,
            target_refs,
            action,
            provider,
            rules,
        })
    }
}

fn action(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Action> {
    let s = String::decode(node, at, cx)?;
    Some(match s.as_str() {
        "ALLOW" => Action::Allow,
        "DENY" => Action::Deny,
        "AUDIT" => Action::Audit,
        "CUSTOM" => Action::Custom,
        _ => {
            cx.invalid(
                at,
                node,
                format!("{s:?} is not ALLOW, DENY, AUDIT or CUSTOM"),
            );
            return None;
        }
    })
}

impl Decode for TargetRef {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let group = f.opt::<String>("group", cx).unwrap_or_default();
        let kind = f.req::<String>("kind", cx);
        let name = f.req::<String>("name", cx);
        let mut ok = true;
        if f.opt::<String>("namespace", cx)
            .is_some_and(|ns| !ns.is_empty())
        {
            f.invalid(
                "namespace",
                cx,
                "cross namespace referencing is not supported (the target is in the policy's namespace)",
            );
            ok = false;
        }
        let ok = f.finish(cx) && ok;
        Some(TargetRef {
            group,
            kind: kind?,
            name: name?,
        })
        .filter(|_| ok)
    }
}

impl Decode for Rule {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let from = f.opt_with("from", cx, |n, at, cx| {
            nonempty_list(n, at, cx, "source", |n, at, cx| {
                let mut e = Fields::new(n, at, cx)?;
                let s = e.req::<Source>("source", cx);
                e.finish(cx).then_some(s).flatten()
            })
        });
        let to = f.opt_with("to", cx, |n, at, cx| {
            nonempty_list(n, at, cx, "operation", |n, at, cx| {
                let mut e = Fields::new(n, at, cx)?;
                let o = e.req::<Operation>("operation", cx);
                e.finish(cx).then_some(o).flatten()
            })
        });
        let when = f.list::<Condition>("when", cx);
        let ok = f.finish(cx);
        ok.then(|| Rule {
            from: from.unwrap_or_default(),
            to: to.unwrap_or_default(),
            when,
        })
    }
}

/// A list Istio refuses empty when it is written (`from: []` says nothing).
fn nonempty_list<T>(
    node: &Node,
    at: &Path<'_>,
    cx: &mut Cx,
    what: &str,
    item: impl Fn(&Node, &Path<'_>, &mut Cx) -> Option<T>,
) -> Option<Vec<T>> {
    let items = match &node.value {
        super::super::yaml::Value::Seq(items) if !items.is_empty() => items,
        super::super::yaml::Value::Seq(_) => {
            cx.invalid(
                at,
                node,
                format!("must not be empty (each entry names a {what})"),
            );
            return None;
        }
        _ => return Vec::<String>::decode(node, at, cx).and(None),
    };
    let mut out = Vec::new();
    let mut ok = true;
    for (i, n) in items.iter().enumerate() {
        match item(n, &at.index(i), cx) {
            Some(v) => out.push(v),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

/// A list of strings read as Istio's `*` matches.
fn matches(f: &mut Fields<'_, '_>, key: &str, cx: &mut Cx) -> Vec<StringMatch> {
    f.list::<String>(key, cx)
        .iter()
        .map(|s| StringMatch::from_istio(s))
        .collect()
}

/// `None` when the field is set and wrong.
fn cidrs(f: &mut Fields<'_, '_>, key: &str, cx: &mut Cx) -> Option<Vec<Cidr>> {
    let set = f.has(key);
    let v = f.opt_with(key, cx, |n, at, cx| {
        let written = Vec::<String>::decode(n, at, cx)?;
        parse_all(n, at, cx, &written, parse_cidr)
    });
    if set { v } else { Some(Vec::new()) }
}

fn service_accounts(f: &mut Fields<'_, '_>, key: &str, cx: &mut Cx) -> Vec<ServiceAccountMatch> {
    f.opt_with(key, cx, |n, at, cx| {
        let written = Vec::<String>::decode(n, at, cx)?;
        if written.len() > 16 {
            cx.invalid(at, n, "at most 16 service accounts");
            return None;
        }
        parse_all(n, at, cx, &written, |s| match s.split_once('/') {
            Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {
                Ok(ServiceAccountMatch {
                    namespace: ns.to_owned(),
                    service_account: sa.to_owned(),
                })
            }
            _ => Err(format!("{s:?} is not <namespace>/<service account>")),
        })
    })
    .unwrap_or_default()
}

impl Decode for Source {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let mut ok = true;
        let mut cidr = |f: &mut Fields<'_, '_>, key: &str, cx: &mut Cx| {
            let v = cidrs(f, key, cx);
            ok &= v.is_some();
            v.unwrap_or_default()
        };
        let ip_blocks = cidr(&mut f, "ipBlocks", cx);
        let not_ip_blocks = cidr(&mut f, "notIpBlocks", cx);
        let remote_ip_blocks = cidr(&mut f, "remoteIpBlocks", cx);
        let not_remote_ip_blocks = cidr(&mut f, "notRemoteIpBlocks", cx);
        let request_principals = matches(&mut f, "requestPrincipals", cx);
        let not_request_principals = matches(&mut f, "notRequestPrincipals", cx);
        let s = Source {
            principals: matches(&mut f, "principals", cx),
            not_principals: matches(&mut f, "notPrincipals", cx),
            request_principals,
            not_request_principals,
            namespaces: matches(&mut f, "namespaces", cx),
            not_namespaces: matches(&mut f, "notNamespaces", cx),
            service_accounts: service_accounts(&mut f, "serviceAccounts", cx),
            not_service_accounts: service_accounts(&mut f, "notServiceAccounts", cx),
            trust_domains: matches(&mut f, "trustDomains", cx),
            not_trust_domains: matches(&mut f, "notTrustDomains", cx),
            ip_blocks,
            not_ip_blocks,
            remote_ip_blocks,
            not_remote_ip_blocks,
        };
        if !s.service_accounts.is_empty() && (!s.namespaces.is_empty() || !s.principals.is_empty())
        {
            f.invalid(
                "serviceAccounts",
                cx,
                "cannot be set with namespaces or principals",
            );
            ok = false;
        }
        if s == Source::default() && ok {
            cx.invalid(at, node, "must not be empty (set at least one field)");
            ok = false;
        }
        for (key, list) in [
            ("principals", &s.principals),
            ("notPrincipals", &s.not_principals),
        ] {
            if list.iter().any(|m| matches!(m, StringMatch::Exact(v) | StringMatch::Prefix(v) if v.starts_with("spiffe://")))
            {
                cx.report(
                    &at.field(key),
                    node.pos,
                    Problem::Note(
                        "principals are written without spiffe:// (cluster.local/ns/NS/sa/SA); this one never matches".into(),
                    ),
                );
            }
        }
        let ok = f.finish(cx) && ok;
        ok.then_some(s)
    }
}

impl Decode for Operation {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let mut ok = true;
        let mut ports = |f: &mut Fields<'_, '_>, key: &str, cx: &mut Cx| {
            let v = f.opt_with(key, cx, |n, at, cx| {
                let written = Vec::<String>::decode(n, at, cx)?;
                parse_all(n, at, cx, &written, parse_port)
            });
            ok &= !f.has(key) || v.is_some();
            v.unwrap_or_default()
        };
        let p = ports(&mut f, "ports", cx);
        let np = ports(&mut f, "notPorts", cx);
        let mut paths = |f: &mut Fields<'_, '_>, key: &str, cx: &mut Cx| {
            let v = f.opt_with(key, cx, |n, at, cx| {
                let written = Vec::<String>::decode(n, at, cx)?;
                parse_all(n, at, cx, &written, parse_path)
            });
            ok &= !f.has(key) || v.is_some();
            v.unwrap_or_default()
        };
        let paths_ = paths(&mut f, "paths", cx);
        let not_paths = paths(&mut f, "notPaths", cx);
        let lower = |v: Vec<StringMatch>| v.iter().map(StringMatch::to_lowercase).collect();
        let o = Operation {
            hosts: lower(matches(&mut f, "hosts", cx)),
            not_hosts: lower(matches(&mut f, "notHosts", cx)),
            ports: p,
            not_ports: np,
            methods: matches(&mut f, "methods", cx),
            not_methods: matches(&mut f, "notMethods", cx),
            paths: paths_,
            not_paths,
        };
        if o == Operation::default() && ok {
            cx.invalid(at, node, "must not be empty (set at least one field)");
            ok = false;
        }
        let ok = f.finish(cx) && ok;
        ok.then_some(o)
    }
}

/// A path as Istio takes it: exact, `prefix*`, `*suffix` or `*`. Path templates (`{*}`,
/// `{**}`) are not implemented: refused, so that a policy never means less than was written.
fn parse_path(s: &str) -> Result<StringMatch, String> {
    if s.contains('{') || s.contains('}') {
        return Err(format!(
            "{s:?}: path templates ({{*}}, {{**}}) are not implemented by the waypoint"
        ));
    }
    let inner = s.strip_prefix('*').unwrap_or(s);
    let inner = inner.strip_suffix('*').unwrap_or(inner);
    if inner.contains('*') {
        return Err(format!(
            "{s:?}: a '*' may only be the first or the last character"
        ));
    }
    Ok(StringMatch::from_istio(s))
}
