//! Each matcher on its own, including the edges where implementations differ.

use std::collections::BTreeMap;

use http::{HeaderMap, HeaderValue};

use super::*;
use crate::route::request::Source;

fn exact(s: &str) -> StrMatch {
    StrMatch::Exact(s.into())
}
fn prefix(s: &str) -> StrMatch {
    StrMatch::Prefix(s.into())
}
fn regex(s: &str) -> StrMatch {
    StrMatch::Regex(full_match_regex(s).expect("valid regex"))
}

#[test]
fn exact_is_case_sensitive_and_whole() {
    let m = exact("/productpage");
    assert!(m.matches("/productpage"));
    assert!(!m.matches("/productpage/"));
    assert!(!m.matches("/ProductPage"));
    assert!(!m.matches("/product"));
    assert!(!m.matches(""));
    assert!(exact("").matches(""));
}

#[test]
fn prefix_is_a_plain_string_prefix() {
    let m = prefix("/api");
    assert!(m.matches("/api"));
    assert!(m.matches("/api/v1"));
    assert!(m.matches("/apiary"), "Istio prefixes are not segment-aware");
    assert!(!m.matches("/ap"));
    assert!(!m.matches("/API"));
}

#[test]
fn case_insensitive_variants() {
    assert!(StrMatch::ExactNoCase("/Login".into()).matches("/lOGIN"));
    assert!(!StrMatch::ExactNoCase("/Login".into()).matches("/logins"));
    assert!(StrMatch::PrefixNoCase("/API".into()).matches("/api/x"));
    assert!(!StrMatch::PrefixNoCase("/API".into()).matches("/ap"));
    // A multi-byte character where the prefix ends must not panic.
    assert!(!StrMatch::PrefixNoCase("/ab".into()).matches("/aé"));
}

#[test]
fn regex_is_a_full_match() {
    let m = regex("/reviews/[0-9]+");
    assert!(m.matches("/reviews/12"));
    assert!(!m.matches("/reviews/12/x"), "anchored at the end");
    assert!(!m.matches("x/reviews/12"), "anchored at the start");
    // Alternation must not escape the anchors.
    let alt = regex("a|b");
    assert!(alt.matches("a"));
    assert!(!alt.matches("ab"));
    assert!(!alt.matches("xa"));
    assert!(full_match_regex("(unclosed").is_err());
    assert!(
        full_match_regex("(a)\\1").is_err(),
        "backreferences are not RE2"
    );
}

#[test]
fn present_matches_any_value() {
    assert!(StrMatch::Present.matches(""));
    assert!(StrMatch::Present.matches("anything"));
}

#[test]
fn segment_prefix_matches_whole_segments() {
    let m = PathMatch::segments("/v2");
    assert_eq!(m.matches("/v2"), Some(Some(3)));
    assert_eq!(m.matches("/v2/"), Some(Some(3)));
    assert_eq!(m.matches("/v2/x"), Some(Some(3)));
    assert_eq!(m.matches("/v2example"), None);
    assert_eq!(m.matches("/v"), None);
    let trailing = PathMatch::segments("/v2/");
    assert_eq!(
        trailing.matches("/v2"),
        Some(Some(3)),
        "a trailing slash is ignored"
    );
    assert_eq!(trailing.matches("/v2x"), None);
    let root = PathMatch::segments("/");
    assert_eq!(root.matches("/"), Some(Some(0)));
    assert_eq!(root.matches("/anything"), Some(Some(0)));
}

#[test]
fn path_match_reports_the_prefix_length() {
    assert_eq!(
        PathMatch::Str(prefix("/assets")).matches("/assets/app.js"),
        Some(Some(7))
    );
    assert_eq!(PathMatch::Str(exact("/a")).matches("/a"), Some(None));
    assert_eq!(PathMatch::Str(exact("/a")).matches("/b"), None);
    assert_eq!(PathMatch::Str(regex("/a.*")).matches("/abc"), Some(None));
}

fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(*k, HeaderValue::from_static(v));
    }
    h
}

fn header(name: &'static str, value: StrMatch, invert: bool) -> HeaderMatch {
    HeaderMatch {
        name: HeaderName::from_static(name),
        value,
        invert,
    }
}

#[test]
fn header_exact_prefix_regex_present() {
    let h = headers(&[("x-dark-launch", "v2"), ("user-agent", "curl/8.5")]);
    assert!(header("x-dark-launch", exact("v2"), false).matches(&h));
    assert!(
        !header("x-dark-launch", exact("V2"), false).matches(&h),
        "values are case-sensitive"
    );
    assert!(header("user-agent", prefix("curl/"), false).matches(&h));
    assert!(header("user-agent", regex("curl/[0-9.]+"), false).matches(&h));
    assert!(
        !header("user-agent", regex("curl"), false).matches(&h),
        "full match"
    );
    assert!(header("x-dark-launch", StrMatch::Present, false).matches(&h));
    assert!(!header("x-missing", StrMatch::Present, false).matches(&h));
    assert!(
        !header("x-missing", exact(""), false).matches(&h),
        "absent is not empty"
    );
}

#[test]
fn header_names_are_case_insensitive_on_the_wire() {
    // http::HeaderMap lowercases names it parses; a sender's `X-Dark-Launch` arrives lowercase.
    let mut h = HeaderMap::new();
    h.insert(
        HeaderName::from_bytes(b"X-Dark-Launch").expect("valid"),
        HeaderValue::from_static("v2"),
    );
    assert!(header("x-dark-launch", exact("v2"), false).matches(&h));
}

#[test]
fn repeated_headers_are_joined_with_commas() {
    let h = headers(&[("x-tag", "a"), ("x-tag", "b")]);
    assert!(header("x-tag", exact("a,b"), false).matches(&h));
    assert!(!header("x-tag", exact("a"), false).matches(&h));
}

#[test]
fn non_utf8_header_values_never_match() {
    let mut h = HeaderMap::new();
    h.insert(
        "x-bin",
        HeaderValue::from_bytes(&[0xff, 0xfe]).expect("opaque bytes allowed"),
    );
    assert!(!header("x-bin", StrMatch::Present, false).matches(&h));
}

#[test]
fn without_headers_inverts() {
    let h = headers(&[("x-canary", "yes")]);
    assert!(!header("x-canary", exact("yes"), true).matches(&h));
    assert!(header("x-canary", exact("no"), true).matches(&h));
    assert!(
        header("x-other", exact("yes"), true).matches(&h),
        "absent header: matches"
    );
    assert!(
        !header("x-canary", StrMatch::Present, true).matches(&h),
        "must be absent"
    );
    assert!(header("x-other", StrMatch::Present, true).matches(&h));
}

#[test]
fn query_params() {
    assert_eq!(query_param("a=1&b=2", "b"), Some("2"));
    assert_eq!(
        query_param("a=1&a=2", "a"),
        Some("1"),
        "the first occurrence"
    );
    assert_eq!(query_param("flag&b=2", "flag"), Some(""));
    assert_eq!(query_param("ab=1", "a"), None);
    assert_eq!(query_param("", "a"), None);
    assert_eq!(query_param("a==x", "a"), Some("=x"));
    let q = QueryMatch {
        name: "version".into(),
        value: exact("v2"),
    };
    assert!(q.matches("user=x&version=v2"));
    assert!(!q.matches("version=v2x"));
    assert!(!q.matches("Version=v2"), "names are case-sensitive");
    let r = QueryMatch {
        name: "id".into(),
        value: regex("[0-9]+"),
    };
    assert!(r.matches("id=42"));
    assert!(!r.matches("id=42a"));
}

fn request<'a>(h: &'a HeaderMap, labels: &'a BTreeMap<String, String>) -> Request<'a> {
    Request {
        method: "GET",
        scheme: "http",
        authority: "reviews:9080",
        path: "/reviews/1",
        query: "x=1",
        headers: h,
        port: 9080,
        source: Source {
            namespace: "bookinfo",
            labels,
        },
    }
}

#[test]
fn a_block_needs_every_condition() {
    let h = headers(&[("end-user", "jason")]);
    let mut labels = BTreeMap::new();
    labels.insert("app".to_string(), "productpage".to_string());
    labels.insert("version".to_string(), "v1".to_string());
    let req = request(&h, &labels);
    let all = RouteMatch {
        port: Some(9080),
        method: Some(exact("GET")),
        path: Some(PathMatch::Str(prefix("/reviews"))),
        headers: vec![header("end-user", exact("jason"), false)].into(),
        query: vec![QueryMatch {
            name: "x".into(),
            value: exact("1"),
        }]
        .into(),
        scheme: Some(exact("http")),
        authority: Some(prefix("reviews")),
        source_namespace: Some("bookinfo".into()),
        source_labels: vec![("app".into(), "productpage".into())].into(),
        never: false,
    };
    assert_eq!(all.matches(&req), Some(Some(8)));
    assert_eq!(
        RouteMatch::default().matches(&req),
        Some(None),
        "no conditions: everything"
    );

    let fails: Vec<(&str, RouteMatch)> = vec![
        (
            "port",
            RouteMatch {
                port: Some(80),
                ..all.clone()
            },
        ),
        (
            "method",
            RouteMatch {
                method: Some(exact("POST")),
                ..all.clone()
            },
        ),
        (
            "path",
            RouteMatch {
                path: Some(PathMatch::Str(exact("/reviews"))),
                ..all.clone()
            },
        ),
        (
            "header",
            RouteMatch {
                headers: vec![header("end-user", exact("mike"), false)].into(),
                ..all.clone()
            },
        ),
        (
            "query",
            RouteMatch {
                query: vec![QueryMatch {
                    name: "x".into(),
                    value: exact("2"),
                }]
                .into(),
                ..all.clone()
            },
        ),
        (
            "scheme",
            RouteMatch {
                scheme: Some(exact("https")),
                ..all.clone()
            },
        ),
        (
            "authority",
            RouteMatch {
                authority: Some(exact("ratings")),
                ..all.clone()
            },
        ),
        (
            "namespace",
            RouteMatch {
                source_namespace: Some("other".into()),
                ..all.clone()
            },
        ),
        (
            "labels",
            RouteMatch {
                source_labels: vec![("version".into(), "v2".into())].into(),
                ..all.clone()
            },
        ),
        (
            "missing label",
            RouteMatch {
                source_labels: vec![("tier".into(), "web".into())].into(),
                ..all.clone()
            },
        ),
        (
            "never",
            RouteMatch {
                never: true,
                ..all.clone()
            },
        ),
    ];
    for (what, m) in fails {
        assert_eq!(m.matches(&req), None, "{what} should not match");
    }
}
