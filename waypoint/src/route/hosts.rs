//! Host names and DestinationRule subsets: short names resolve in the resource's namespace
//! (`reviews` in `bookinfo` is `reviews.bookinfo.svc.cluster.local`); a name with a dot is
//! taken as written, as Istio does (`reviews.other` is not expanded: write the full name).

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::istio::DestinationRule;
use crate::config::{Resource, Spec};

use super::table::SubsetSelector;

/// Resolves a host as written in a resource of namespace `ns`.
pub fn resolve(host: &str, ns: &str, domain: &str) -> String {
    if host.contains('.') || host.starts_with('*') {
        host.to_owned()
    } else {
        format!("{host}.{ns}.svc.{domain}")
    }
}

/// The namespace of `name.ns.svc.<domain>`.
pub fn namespace_of<'h>(fqdn: &'h str, domain: &str) -> Option<&'h str> {
    let rest = fqdn.strip_suffix(domain)?.strip_suffix(".svc.")?;
    rest.split_once('.')
        .map(|(_, ns)| ns)
        .filter(|ns| !ns.contains('.'))
}

/// Whether a resource of namespace `own` with `exportTo` list `to` is visible in namespace
/// `from` (Istio: empty is every namespace, `*` every namespace, `.` its own, `~` none, else
/// the namespaces named).
pub fn exported(to: &[String], own: &str, from: &str) -> bool {
    to.is_empty()
        || to
            .iter()
            .any(|t| t == "*" || (t == "." && own == from) || (t != "~" && t == from))
}

fn covers(pattern: &str, host: &str) -> bool {
    pattern == host
        || pattern == "*"
        || pattern
            .strip_prefix('*')
            .is_some_and(|suffix| host.ends_with(suffix))
}

/// The DestinationRules of a config, for subset lookups.
pub struct Subsets<'c> {
    /// (namespace, resolved host, rule)
    rules: Vec<(&'c str, String, &'c DestinationRule)>,
    root_namespace: &'c str,
    domain: &'c str,
    cache: HashMap<(String, String, String), Arc<SubsetSelector>>,
}

impl<'c> Subsets<'c> {
    pub fn new(resources: &'c [Resource], root_namespace: &'c str, domain: &'c str) -> Self {
        let mut rules: Vec<(&str, String, &DestinationRule)> = resources
            .iter()
            .filter_map(|r| match &r.spec {
                Spec::DestinationRule(dr) => Some((
                    r.meta.namespace.as_str(),
                    resolve(&dr.host, &r.meta.namespace, domain),
                    &**dr,
                )),
                _ => None,
            })
            .collect();
        // Exact hosts before wildcards, longer wildcards first: the most specific rule wins.
        rules.sort_by_key(|(_, h, _)| (h.starts_with('*'), std::cmp::Reverse(h.len())));
        Subsets {
            rules,
            root_namespace,
            domain,
            cache: HashMap::new(),
        }
    }

    /// The DestinationRule that applies to `host` for a proxy in namespace `from` (the
    /// waypoint's): one in `from`, else in the service's namespace, else in the root
    /// namespace (mesh-wide); a rule counts only where its `exportTo` makes it visible to
    /// `from`.
    pub fn rule_for(&self, host: &str, from: &str) -> Option<&'c DestinationRule> {
        let service_ns = namespace_of(host, self.domain);
        let order = [Some(from), service_ns, Some(self.root_namespace)];
        order.iter().flatten().find_map(|ns| {
            self.rules
                .iter()
                .find(|(rns, h, dr)| {
                    rns == ns && covers(h, host) && exported(&dr.export_to, rns, from)
                })
                .map(|(_, _, dr)| *dr)
        })
    }

    /// The selector of subset `name` of `host`, shared by every route that names it.
    /// `labels: None` when no DestinationRule defines it.
    pub fn selector(&mut self, host: &str, from: &str, name: &str) -> Arc<SubsetSelector> {
        let key = (host.to_owned(), from.to_owned(), name.to_owned());
        if let Some(s) = self.cache.get(&key) {
            return s.clone();
        }
        let labels = self
            .rule_for(host, from)
            .and_then(|dr| dr.subsets.iter().find(|s| s.name == name))
            .map(|s| s.labels.clone());
        let s = Arc::new(SubsetSelector {
            name: name.to_owned(),
            labels,
        });
        self.cache.insert(key, s.clone());
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_resolve_in_the_namespace() {
        assert_eq!(
            resolve("reviews", "bookinfo", "cluster.local"),
            "reviews.bookinfo.svc.cluster.local"
        );
        assert_eq!(
            resolve("helloworld.test", "default", "cluster.local"),
            "helloworld.test"
        );
        assert_eq!(
            resolve("a.b.svc.cluster.local", "x", "cluster.local"),
            "a.b.svc.cluster.local"
        );
        assert_eq!(resolve("*", "x", "cluster.local"), "*");
    }

    #[test]
    fn namespaces_of_service_hosts() {
        assert_eq!(
            namespace_of("reviews.bookinfo.svc.cluster.local", "cluster.local"),
            Some("bookinfo")
        );
        assert_eq!(namespace_of("example.com", "cluster.local"), None);
        assert_eq!(
            namespace_of("a.b.c.svc.cluster.local", "cluster.local"),
            None
        );
    }

    #[test]
    fn export_to_visibility() {
        let to = |l: &[&str]| l.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert!(exported(&to(&[]), "a", "b"));
        assert!(exported(&to(&["*"]), "a", "b"));
        assert!(exported(&to(&["."]), "a", "a"));
        assert!(!exported(&to(&["."]), "a", "b"));
        assert!(!exported(&to(&["~"]), "a", "a"));
        assert!(exported(&to(&["c", "b"]), "a", "b"));
        assert!(!exported(&to(&["c"]), "a", "b"));
    }

    #[test]
    fn wildcards() {
        assert!(covers("*", "a.b"));
        assert!(covers(
            "*.bookinfo.svc.cluster.local",
            "reviews.bookinfo.svc.cluster.local"
        ));
        assert!(!covers(
            "*.bookinfo.svc.cluster.local",
            "reviews.other.svc.cluster.local"
        ));
        assert!(covers("a", "a"));
    }
}
