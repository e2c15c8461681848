//! Compiled request conditions. Built once per config (regexes compiled and anchored, names
//! parsed into `http` types), then matched on borrowed `&str`s without allocating, except
//! when a header is sent several times and its values must be joined as Envoy does.

use std::borrow::Cow;

use http::{HeaderMap, HeaderName};
use regex::Regex;

use super::request::Request;

/// A compiled string condition.
#[derive(Clone, Debug)]
pub enum StrMatch {
    Exact(Box<str>),
    Prefix(Box<str>),
    /// ASCII case-insensitive (`ignoreUriCase`).
    ExactNoCase(Box<str>),
    PrefixNoCase(Box<str>),
    /// Anchored at both ends: RE2's full match.
    Regex(Regex),
    /// Any value (the header or parameter only has to be there).
    Present,
}

/// Compiles `pattern` so that it must match the whole input.
pub fn full_match_regex(pattern: &str) -> Result<Regex, regex::Error> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(crate::config::istio::common::REGEX_SIZE_LIMIT)
        .build()
}

impl StrMatch {
    #[inline]
    pub fn matches(&self, v: &str) -> bool {
        match self {
            StrMatch::Exact(s) => v == &**s,
            StrMatch::Prefix(s) => v.starts_with(&**s),
            StrMatch::ExactNoCase(s) => v.eq_ignore_ascii_case(s),
            StrMatch::PrefixNoCase(s) => v
                .as_bytes()
                .get(..s.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(s.as_bytes())),
            StrMatch::Regex(r) => r.is_match(v),
            StrMatch::Present => true,
        }
    }
}

/// A path condition; a match reports how much of the path a prefix covered (for rewrites).
#[derive(Clone, Debug)]
pub enum PathMatch {
    /// Istio `uri` (exact, plain string prefix, regex, with `ignoreUriCase`).
    Str(StrMatch),
    /// Gateway API `PathPrefix`: whole segments (`/v2` matches `/v2`, `/v2/`, `/v2/x`, never
    /// `/v2x`). Stored without a trailing `/`; `/` alone is stored empty and matches all.
    Segments(Box<str>),
}

impl PathMatch {
    /// `None` for no match; else the length of the matched prefix, if a prefix matched
    /// (`Some(None)` for an exact or regex match).
    #[inline]
    pub fn matches(&self, path: &str) -> Option<Option<usize>> {
        match self {
            PathMatch::Str(m @ (StrMatch::Prefix(p) | StrMatch::PrefixNoCase(p))) => {
                m.matches(path).then_some(Some(p.len()))
            }
            PathMatch::Str(m) => m.matches(path).then_some(None),
            PathMatch::Segments(p) => {
                let ok = path.starts_with(&**p)
                    && matches!(path.as_bytes().get(p.len()), None | Some(b'/'));
                ok.then_some(Some(p.len()))
            }
        }
    }

    pub fn segments(prefix: &str) -> PathMatch {
        PathMatch::Segments(prefix.trim_end_matches('/').into())
    }
}

/// A header condition (`headers`, or inverted for `withoutHeaders`).
#[derive(Clone, Debug)]
pub struct HeaderMatch {
    pub name: HeaderName,
    pub value: StrMatch,
    /// `withoutHeaders`: the request matches when the header is absent or does not match.
    pub invert: bool,
}

impl HeaderMatch {
    #[inline]
    pub fn matches(&self, headers: &HeaderMap) -> bool {
        let found = match header_value(headers, &self.name) {
            Some(v) => self.value.matches(&v),
            None => false,
        };
        found != self.invert
    }
}

/// The value of a header for matching: the only value, or all values joined with `,`
/// (Envoy's rule for repeated headers). Values that are not UTF-8 never match a string.
#[inline]
fn header_value<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<Cow<'h, str>> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let first = std::str::from_utf8(first.as_bytes()).ok()?;
    match values.next() {
        None => Some(Cow::Borrowed(first)),
        Some(second) => {
            let mut joined = String::from(first);
            for v in std::iter::once(second).chain(values) {
                joined.push(',');
                joined.push_str(std::str::from_utf8(v.as_bytes()).ok()?);
            }
            Some(Cow::Owned(joined))
        }
    }
}

/// A query parameter condition, on the raw (not percent-decoded) query string; the first
/// occurrence of the name counts.
#[derive(Clone, Debug)]
pub struct QueryMatch {
    pub name: Box<str>,
    pub value: StrMatch,
}

impl QueryMatch {
    #[inline]
    pub fn matches(&self, query: &str) -> bool {
        query_param(query, &self.name).is_some_and(|v| self.value.matches(v))
    }
}

/// The first value of `name` in a raw query string (`a=1&b=2`); a bare `a` has value "".
#[inline]
pub fn query_param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// One block of conditions: all must hold.
#[derive(Clone, Debug, Default)]
pub struct RouteMatch {
    pub port: Option<u16>,
    pub method: Option<StrMatch>,
    pub path: Option<PathMatch>,
    pub headers: Box<[HeaderMatch]>,
    pub query: Box<[QueryMatch]>,
    pub scheme: Option<StrMatch>,
    pub authority: Option<StrMatch>,
    pub source_namespace: Option<Box<str>>,
    pub source_labels: Box<[(Box<str>, Box<str>)]>,
    /// Set for a block that can never match here (bound to gateways other than `mesh`).
    pub never: bool,
}

impl RouteMatch {
    /// `Some` when every condition holds, with the matched path prefix length if a prefix
    /// matched. Cheap tests come first.
    #[inline]
    pub fn matches(&self, req: &Request<'_>) -> Option<Option<usize>> {
        if self.never || self.port.is_some_and(|p| p != req.port) {
            return None;
        }
        if let Some(m) = &self.method
            && !m.matches(req.method)
        {
            return None;
        }
        let prefix = match &self.path {
            Some(p) => p.matches(req.path)?,
            None => None,
        };
        if let Some(ns) = &self.source_namespace
            && **ns != *req.source.namespace
        {
            return None;
        }
        if !self
            .source_labels
            .iter()
            .all(|(k, v)| req.source.labels.get(&**k).is_some_and(|x| **x == **v))
        {
            return None;
        }
        if let Some(m) = &self.scheme
            && !m.matches(req.scheme)
        {
            return None;
        }
        if let Some(m) = &self.authority
            && !m.matches(req.authority)
        {
            return None;
        }
        if !self.headers.iter().all(|h| h.matches(req.headers)) {
            return None;
        }
        if !self.query.iter().all(|q| q.matches(req.query)) {
            return None;
        }
        Some(prefix)
    }
}

#[cfg(test)]
mod tests;
