//! Rewrites and redirects as data, and the pure functions that compute the new path and the
//! `Location` of a redirect (Istio `HTTPRewrite`/`HTTPRedirect`, Gateway API `URLRewrite`
//! and `RequestRedirect`).

use std::borrow::Cow;

use regex::Regex;

/// How a path is changed.
#[derive(Clone, Debug)]
pub enum PathRewrite {
    /// The whole path becomes this.
    Full(String),
    /// The matched prefix is replaced by this, as a plain string (Istio `rewrite.uri` after
    /// a prefix match; Envoy `prefix_rewrite`).
    Prefix(String),
    /// The matched path prefix is replaced on segment boundaries (Gateway API
    /// `ReplacePrefixMatch`: `/foo` to `/` turns `/foo/bar` into `/bar`, never `//bar`).
    SegmentPrefix(String),
    /// Every match of `re` is replaced with `with` (`\1` groups; Istio `uriRegexRewrite`).
    Regex { re: Regex, with: String },
}

impl PartialEq for PathRewrite {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (PathRewrite::Full(a), PathRewrite::Full(b))
            | (PathRewrite::Prefix(a), PathRewrite::Prefix(b))
            | (PathRewrite::SegmentPrefix(a), PathRewrite::SegmentPrefix(b)) => a == b,
            (PathRewrite::Regex { re: a, with: x }, PathRewrite::Regex { re: b, with: y }) => {
                a.as_str() == b.as_str() && x == y
            }
            _ => false,
        }
    }
}

impl PathRewrite {
    /// The new path. `matched_prefix` is the length of the prefix the route matched (a
    /// prefix rewrite after any other match replaces the whole path, as Istio does).
    pub fn apply<'a>(&self, path: &'a str, matched_prefix: Option<usize>) -> Cow<'a, str> {
        match self {
            PathRewrite::Full(p) => Cow::Owned(p.clone()),
            PathRewrite::Prefix(p) => match matched_prefix.and_then(|n| path.get(n..)) {
                Some(rest) => Cow::Owned(format!("{p}{rest}")),
                None => Cow::Owned(p.clone()),
            },
            PathRewrite::SegmentPrefix(p) => {
                let rest = matched_prefix.and_then(|n| path.get(n..)).unwrap_or("");
                Cow::Owned(join_segments(p, rest))
            }
            PathRewrite::Regex { re, with } => re.replace_all(path, with.as_str()),
        }
    }
}

fn join_segments(prefix: &str, rest: &str) -> String {
    let trailing_slash = rest == "/";
    let rest = rest.strip_prefix('/').unwrap_or(rest);
    let base = prefix.trim_end_matches('/');
    match (base.is_empty(), rest.is_empty()) {
        (true, true) => "/".into(),
        (true, false) => format!("/{rest}"),
        (false, true) if trailing_slash => format!("{base}/"),
        (false, true) => base.into(),
        (false, false) => format!("{base}/{rest}"),
    }
}

/// A rewrite applied before the request goes upstream.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rewrite {
    pub authority: Option<String>,
    pub path: Option<PathRewrite>,
}

/// The port a redirect's `Location` carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedirectPort {
    /// The request's authority port, as written (none if it had none).
    Keep,
    Set(u16),
    /// The scheme's default port (80, 443), so none is written.
    SchemeDefault,
    /// The port the request was sent to (Istio `FROM_REQUEST_PORT`; Gateway API's
    /// "listener port", here the service port).
    Request,
}

/// A redirect answered by the waypoint itself.
#[derive(Clone, Debug, PartialEq)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: RedirectPort,
    pub path: Option<PathRewrite>,
    /// 301, 302, 303, 307 or 308.
    pub code: u16,
}

/// The parts of the request a redirect reads.
#[derive(Clone, Copy, Debug)]
pub struct RedirectInput<'a> {
    pub scheme: &'a str,
    pub authority: &'a str,
    /// The port the request was sent to.
    pub port: u16,
    pub path: &'a str,
    pub query: &'a str,
    pub matched_prefix: Option<usize>,
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

impl Redirect {
    /// The `Location` header (allocated per redirect; redirects are not the hot path).
    pub fn location(&self, r: &RedirectInput<'_>) -> String {
        let scheme = self.scheme.as_deref().unwrap_or(r.scheme);
        let (req_host, req_port) = split_authority(r.authority);
        let host = self.host.as_deref().unwrap_or(req_host);
        let port = match self.port {
            RedirectPort::Keep => req_port,
            RedirectPort::Set(p) => Some(p),
            RedirectPort::SchemeDefault => None,
            RedirectPort::Request => Some(r.port),
        }
        .filter(|p| Some(*p) != default_port(scheme));
        let path = match &self.path {
            Some(p) => p.apply(r.path, r.matched_prefix),
            None => Cow::Borrowed(r.path),
        };
        let mut out = format!("{scheme}://{host}");
        if let Some(p) = port {
            out.push_str(&format!(":{p}"));
        }
        out.push_str(&path);
        if !r.query.is_empty() {
            out.push('?');
            out.push_str(r.query);
        }
        out
    }
}

/// `host[:port]` (IPv6 in brackets) into host and port.
pub fn split_authority(authority: &str) -> (&str, Option<u16>) {
    if let Some(end) = authority.rfind(']') {
        let port = authority[end + 1..]
            .strip_prefix(':')
            .and_then(|p| p.parse().ok());
        return (&authority[..=end], port);
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => match p.parse() {
            Ok(port) => (h, Some(port)),
            Err(_) => (authority, None),
        },
        None => (authority, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_prefix_rewrite_replaces_the_matched_prefix() {
        let r = PathRewrite::Prefix("/".into());
        assert_eq!(r.apply("/assets/app.js", Some(7)), "//app.js");
        let r = PathRewrite::Prefix("/v2".into());
        assert_eq!(r.apply("/v1/items", Some(3)), "/v2/items");
        assert_eq!(
            r.apply("/exact", None),
            "/v2",
            "no prefix matched: whole path"
        );
    }

    #[test]
    fn gateway_prefix_rewrite_keeps_segments() {
        let r = PathRewrite::SegmentPrefix("/".into());
        assert_eq!(r.apply("/prefix/one/two", Some(11)), "/two");
        assert_eq!(r.apply("/prefix/one", Some(11)), "/");
        let r = PathRewrite::SegmentPrefix("/one".into());
        assert_eq!(r.apply("/prefix/two/three", Some(11)), "/one/three");
        assert_eq!(r.apply("/prefix/two/", Some(11)), "/one/");
        let r = PathRewrite::SegmentPrefix("/one/".into());
        assert_eq!(r.apply("/prefix/x", Some(7)), "/one/x");
    }

    #[test]
    fn regex_rewrite_uses_groups() {
        let r = PathRewrite::Regex {
            re: Regex::new("^/service/([^/]+)(/.*)$").expect("valid"),
            with: "${2}/instance/${1}".into(),
        };
        assert_eq!(r.apply("/service/foo/v1/api", None), "/v1/api/instance/foo");
    }

    #[test]
    fn redirect_locations() {
        let input = RedirectInput {
            scheme: "http",
            authority: "reviews:9080",
            port: 9080,
            path: "/old/page",
            query: "a=1",
            matched_prefix: Some(4),
        };
        let to_https = Redirect {
            scheme: Some("https".into()),
            host: None,
            port: RedirectPort::SchemeDefault,
            path: None,
            code: 301,
        };
        assert_eq!(to_https.location(&input), "https://reviews/old/page?a=1");
        let moved = Redirect {
            scheme: None,
            host: Some("ratings".into()),
            port: RedirectPort::Request,
            path: Some(PathRewrite::SegmentPrefix("/new".into())),
            code: 302,
        };
        assert_eq!(moved.location(&input), "http://ratings:9080/new/page?a=1");
        let keep = Redirect {
            scheme: None,
            host: None,
            port: RedirectPort::Keep,
            path: Some(PathRewrite::Full("/x".into())),
            code: 308,
        };
        assert_eq!(
            keep.location(&RedirectInput { query: "", ..input }),
            "http://reviews:9080/x"
        );
        let default_port = Redirect {
            port: RedirectPort::Set(80),
            ..keep
        };
        assert_eq!(
            default_port.location(&RedirectInput { query: "", ..input }),
            "http://reviews/x"
        );
    }

    #[test]
    fn authorities() {
        assert_eq!(split_authority("a:80"), ("a", Some(80)));
        assert_eq!(split_authority("a"), ("a", None));
        assert_eq!(split_authority("[::1]:8080"), ("[::1]", Some(8080)));
        assert_eq!(split_authority("[::1]"), ("[::1]", None));
    }
}
