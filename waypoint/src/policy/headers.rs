//! Header edits (Istio `Headers.HeaderOperations`, Gateway API `HTTPHeaderFilter`), parsed
//! once into `http` types so applying them allocates nothing but the values it inserts.

use http::{HeaderMap, HeaderName, HeaderValue};

/// Edits applied to a request or a response: remove first, then set, then add (Envoy's order).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderOps {
    pub remove: Vec<HeaderName>,
    /// Replaces every value of the header.
    pub set: Vec<(HeaderName, HeaderValue)>,
    /// Appends a value, keeping those present.
    pub add: Vec<(HeaderName, HeaderValue)>,
}

/// A header name or value that cannot be sent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderOpsError {
    #[error("{0:?} is not a valid header name")]
    Name(String),
    #[error("the value of {0:?} is not a valid header value")]
    Value(String),
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }

    /// Builds the edits from names and values as written.
    pub fn new<'a>(
        set: impl IntoIterator<Item = (&'a str, &'a str)>,
        add: impl IntoIterator<Item = (&'a str, &'a str)>,
        remove: impl IntoIterator<Item = &'a str>,
    ) -> Result<HeaderOps, HeaderOpsError> {
        let pair = |(n, v): (&str, &str)| -> Result<(HeaderName, HeaderValue), HeaderOpsError> {
            let name =
                HeaderName::from_bytes(n.as_bytes()).map_err(|_| HeaderOpsError::Name(n.into()))?;
            let value = HeaderValue::from_str(v).map_err(|_| HeaderOpsError::Value(n.into()))?;
            Ok((name, value))
        };
        Ok(HeaderOps {
            set: set.into_iter().map(pair).collect::<Result<_, _>>()?,
            add: add.into_iter().map(pair).collect::<Result<_, _>>()?,
            remove: remove
                .into_iter()
                .map(|n| {
                    HeaderName::from_bytes(n.as_bytes()).map_err(|_| HeaderOpsError::Name(n.into()))
                })
                .collect::<Result<_, _>>()?,
        })
    }

    /// Appends `other`'s edits after these (a rule's edits, then a backend's).
    pub fn extend(&mut self, other: &HeaderOps) {
        self.remove.extend(other.remove.iter().cloned());
        self.set.extend(other.set.iter().cloned());
        self.add.extend(other.add.iter().cloned());
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_then_set_then_add() {
        let ops = HeaderOps::new([("x-set", "new")], [("x-add", "two")], ["x-gone", "x-set"])
            .expect("valid");
        let mut h = HeaderMap::new();
        h.insert("x-gone", HeaderValue::from_static("1"));
        h.append("x-set", HeaderValue::from_static("old1"));
        h.append("x-set", HeaderValue::from_static("old2"));
        h.insert("x-add", HeaderValue::from_static("one"));
        ops.apply(&mut h);
        assert!(h.get("x-gone").is_none());
        let set: Vec<_> = h.get_all("x-set").iter().collect();
        assert_eq!(set, ["new"]);
        let add: Vec<_> = h.get_all("x-add").iter().collect();
        assert_eq!(add, ["one", "two"]);
    }

    #[test]
    fn invalid_names_and_values_are_refused() {
        assert_eq!(
            HeaderOps::new([("bad name", "v")], [], []),
            Err(HeaderOpsError::Name("bad name".into()))
        );
        assert_eq!(
            HeaderOps::new([], [("x", "line\nbreak")], []),
            Err(HeaderOpsError::Value("x".into()))
        );
    }
}
