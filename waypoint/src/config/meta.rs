//! The parts every Kubernetes resource has: `apiVersion`, `kind` and `metadata`.

use std::collections::BTreeMap;

use super::decode::{Cx, Decode, Fields, Path};
use super::yaml::Node;

/// `ObjectMeta`, the fields that matter to routing; the rest is accepted and ignored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectMeta {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// RFC 3339 (`2024-05-01T10:00:00Z`), as the API server writes it; absent in hand-written
    /// files. Gateway API precedence prefers the oldest route.
    pub creation_timestamp: Option<String>,
}

/// Fields of `ObjectMeta` set by the API server or controllers; they never change routing.
const IGNORED: [&str; 11] = [
    "uid",
    "resourceVersion",
    "generation",
    "managedFields",
    "ownerReferences",
    "finalizers",
    "generateName",
    "selfLink",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "clusterName",
];

impl ObjectMeta {
    /// Reads `metadata`; `namespace` defaults to `default_namespace`.
    pub fn decode(
        node: &Node,
        at: &Path<'_>,
        cx: &mut Cx,
        default_namespace: &str,
    ) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let name = f.req_with("name", cx, |n, at, cx| {
            let s = String::decode(n, at, cx)?;
            dns_subdomain(&s).then_some(s).or_else(|| {
                cx.invalid(
                    at,
                    n,
                    "not a valid name (lowercase letters, digits, '-' and '.', at most 253)",
                );
                None
            })
        });
        let namespace = f.opt_with("namespace", cx, |n, at, cx| {
            let s = String::decode(n, at, cx)?;
            dns_label(&s).then_some(s).or_else(|| {
                cx.invalid(
                    at,
                    n,
                    "not a valid namespace (lowercase letters, digits and '-', at most 63)",
                );
                None
            })
        });
        let labels = f.map::<String>("labels", cx);
        let annotations = f.map::<String>("annotations", cx);
        let creation_timestamp = f.opt::<String>("creationTimestamp", cx);
        for key in IGNORED {
            f.ignore(key);
        }
        let ok = f.finish(cx);
        Some(ObjectMeta {
            name: name?,
            namespace: namespace.unwrap_or_else(|| default_namespace.to_owned()),
            labels,
            annotations,
            creation_timestamp,
        })
        .filter(|_| ok)
    }
}

/// RFC 1123 label: what a namespace name must be.
pub fn dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// RFC 1123 subdomain: what most resource names must be.
pub fn dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(dns_label("istioinaction"));
        assert!(dns_label("ns-1"));
        assert!(!dns_label("Ns"));
        assert!(!dns_label("-a"));
        assert!(!dns_label(""));
        assert!(dns_subdomain("reviews.v1"));
        assert!(!dns_subdomain("reviews..v1"));
        assert!(!dns_subdomain("reviews_v1"));
    }
}
