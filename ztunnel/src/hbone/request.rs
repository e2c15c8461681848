//! The HBONE CONNECT request, without I/O: building it for an original destination and
//! validating one that arrived.
//!
//! Wire facts (DESIGN.md, "HBONE"): one HTTP/2 CONNECT (RFC 9113 §8.5) per proxied TCP
//! connection; `:authority` is the original destination `ip:port` (IPv6 in brackets, RFC 3986
//! §3.2.2); optional `baggage`, `forwarded: for="<src ip:port>"` (RFC 7239) and
//! `traceparent` (W3C Trace Context) headers. Rejections use Istio's status codes.

use std::net::{IpAddr, SocketAddr};

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, StatusCode, Uri, Version};

pub const BAGGAGE: HeaderName = HeaderName::from_static("baggage");
pub const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Optional headers a client adds to its CONNECT.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectHeaders {
    /// W3C baggage naming the source workload (cluster, namespace, workload names).
    pub baggage: Option<String>,
    /// The original client address, sent as `forwarded: for="<ip:port>"`.
    pub forwarded_for: Option<SocketAddr>,
    /// The service host name that was addressed, appended as `;host=<name>`.
    pub forwarded_host: Option<String>,
    pub traceparent: Option<String>,
}

/// Why a CONNECT request could not be built.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RequestError {
    #[error("header {name} value {value:?} is not a valid HTTP header value")]
    BadHeader { name: &'static str, value: String },
    #[error("CONNECT request for {0} could not be built: {1}")]
    Build(SocketAddr, String),
}

/// Why an incoming request is not an acceptable HBONE CONNECT; `status()` is the answer.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reject {
    #[error("method {0} is not CONNECT")]
    NotConnect(Method),
    #[error("CONNECT request has no :authority")]
    MissingAuthority,
    #[error("CONNECT :authority {0:?} is not an ip:port")]
    BadAuthority(String),
}

impl Reject {
    pub fn status(&self) -> StatusCode {
        match self {
            Reject::NotConnect(_) => StatusCode::METHOD_NOT_ALLOWED,
            Reject::MissingAuthority | Reject::BadAuthority(_) => StatusCode::BAD_REQUEST,
        }
    }
}

/// The `:authority` for a destination: `ip:port`, IPv6 bracketed, without any scope id.
pub fn authority(dst: SocketAddr) -> String {
    match dst.ip() {
        IpAddr::V4(ip) => format!("{ip}:{}", dst.port()),
        IpAddr::V6(ip) => format!("[{ip}]:{}", dst.port()),
    }
}

/// Builds the CONNECT request for the original destination `dst`.
pub fn build_connect(
    dst: SocketAddr,
    headers: &ConnectHeaders,
) -> Result<Request<()>, RequestError> {
    let uri: Uri = authority(dst)
        .parse()
        .map_err(|e: http::uri::InvalidUri| RequestError::Build(dst, e.to_string()))?;
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(uri)
        .version(Version::HTTP_2)
        .body(())
        .map_err(|e| RequestError::Build(dst, e.to_string()))?;
    let map = request.headers_mut();
    if let Some(baggage) = &headers.baggage {
        map.insert(BAGGAGE, value("baggage", baggage)?);
    }
    if let Some(forwarded) = forwarded_value(headers) {
        map.insert(FORWARDED, value("forwarded", &forwarded)?);
    }
    if let Some(traceparent) = &headers.traceparent {
        map.insert(TRACEPARENT, value("traceparent", traceparent)?);
    }
    Ok(request)
}

fn forwarded_value(headers: &ConnectHeaders) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(src) = headers.forwarded_for {
        parts.push(format!("for=\"{}\"", authority(src)));
    }
    if let Some(host) = &headers.forwarded_host {
        parts.push(format!("host={host}"));
    }
    (!parts.is_empty()).then(|| parts.join(";"))
}

fn value(name: &'static str, v: &str) -> Result<HeaderValue, RequestError> {
    HeaderValue::from_str(v).map_err(|_| RequestError::BadHeader {
        name,
        value: v.to_owned(),
    })
}

/// A fresh W3C `traceparent` (Trace Context, §3.2 "traceparent Header"): version `00`, a
/// random 16-byte trace id and 8-byte parent id in lowercase hex, flags `01` (sampled). Each
/// proxied connection starts its own trace, as Istio's ztunnel does.
pub fn new_traceparent() -> String {
    traceparent(rand::random(), rand::random())
}

/// `traceparent` for the given ids; an all-zero id is invalid (§3.2.2.3, §3.2.2.4), so zero
/// becomes one.
pub fn traceparent(trace_id: u128, parent_id: u64) -> String {
    format!("00-{:032x}-{:016x}-01", trace_id.max(1), parent_id.max(1))
}

/// True when `value` has the shape of a version-00 `traceparent`.
pub fn is_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    matches!(parts.as_slice(), [v, t, p, f]
        if *v == "00" && hex(t, 32) && hex(p, 16) && hex(f, 2)
            && t.bytes().any(|b| b != b'0') && p.bytes().any(|b| b != b'0'))
}

/// Checks an incoming request and returns the destination it asks for.
pub fn validate(method: &Method, uri: &Uri) -> Result<SocketAddr, Reject> {
    if method != Method::CONNECT {
        return Err(Reject::NotConnect(method.clone()));
    }
    let authority = uri.authority().ok_or(Reject::MissingAuthority)?.as_str();
    let addr: SocketAddr = authority
        .parse()
        .map_err(|_| Reject::BadAuthority(authority.to_owned()))?;
    if addr.port() == 0 || addr.ip().is_unspecified() {
        return Err(Reject::BadAuthority(authority.to_owned()));
    }
    Ok(addr)
}

/// The client address from a `forwarded` header's first `for=` element, if it is an
/// `ip:port` (quoted or not).
pub fn forwarded_for(headers: &HeaderMap) -> Option<SocketAddr> {
    let text = headers.get(FORWARDED)?.to_str().ok()?;
    let first = text.split(',').next()?;
    first.split(';').find_map(|pair| {
        let (key, val) = pair.trim().split_once('=')?;
        if !key.eq_ignore_ascii_case("for") {
            return None;
        }
        val.trim_matches('"').parse().ok()
    })
}

/// The service hostname a client addressed, from `forwarded: ...;host=<hostname>`.
pub fn forwarded_host(headers: &HeaderMap) -> Option<String> {
    let text = headers.get(FORWARDED)?.to_str().ok()?;
    let first = text.split(',').next()?;
    first.split(';').find_map(|pair| {
        let (key, val) = pair.trim().split_once('=')?;
        key.eq_ignore_ascii_case("host")
            .then(|| val.trim_matches('"').to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn traceparents_are_w3c_version_00_with_random_ids() {
        assert_eq!(
            traceparent(0xabc, 0x12),
            "00-00000000000000000000000000000abc-0000000000000012-01"
        );
        assert!(is_traceparent(&traceparent(0, 0)), "zero ids are invalid");
        let (a, b) = (new_traceparent(), new_traceparent());
        assert!(is_traceparent(&a), "{a}");
        assert_ne!(a, b);
        for bad in [
            "",
            "01-00000000000000000000000000000abc-0000000000000012-01",
            "00-00000000000000000000000000000000-0000000000000012-01",
            "00-00000000000000000000000000000ABC-0000000000000012-01",
            "00-0abc-0000000000000012-01",
        ] {
            assert!(!is_traceparent(bad), "{bad}");
        }
    }

    #[test]
    fn authority_brackets_ipv6_and_drops_scope() {
        assert_eq!(authority(addr("10.0.0.1:80")), "10.0.0.1:80");
        assert_eq!(authority(addr("[2001:db8::1]:8080")), "[2001:db8::1]:8080");
        let scoped = SocketAddr::V6(std::net::SocketAddrV6::new(
            "fe80::1".parse().unwrap(),
            443,
            0,
            3,
        ));
        assert_eq!(authority(scoped), "[fe80::1]:443");
    }

    #[test]
    fn builds_a_bare_connect() {
        let req = build_connect(addr("10.0.0.1:80"), &ConnectHeaders::default()).unwrap();
        assert_eq!(req.method(), Method::CONNECT);
        assert_eq!(req.version(), Version::HTTP_2);
        assert_eq!(req.uri().authority().unwrap().as_str(), "10.0.0.1:80");
        assert!(req.uri().scheme().is_none());
        assert!(req.headers().is_empty());
    }

    #[test]
    fn builds_with_all_headers() {
        let headers = ConnectHeaders {
            baggage: Some("k8s.namespace.name=default".into()),
            forwarded_for: Some(addr("[2001:db8::2]:4711")),
            forwarded_host: Some("reviews.default.svc.cluster.local".into()),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        };
        let req = build_connect(addr("[2001:db8::1]:9080"), &headers).unwrap();
        let h = req.headers();
        assert_eq!(h[BAGGAGE], "k8s.namespace.name=default");
        assert_eq!(
            h[FORWARDED],
            "for=\"[2001:db8::2]:4711\";host=reviews.default.svc.cluster.local"
        );
        assert_eq!(
            h[TRACEPARENT],
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        assert_eq!(forwarded_for(h), Some(addr("[2001:db8::2]:4711")));
    }

    #[test]
    fn forwarded_for_alone() {
        let headers = ConnectHeaders {
            forwarded_for: Some(addr("10.1.1.1:5000")),
            ..Default::default()
        };
        let req = build_connect(addr("10.0.0.1:80"), &headers).unwrap();
        assert_eq!(req.headers()[FORWARDED], "for=\"10.1.1.1:5000\"");
    }

    #[test]
    fn refuses_header_values_with_control_characters() {
        let headers = ConnectHeaders {
            baggage: Some("a\r\nb".into()),
            ..Default::default()
        };
        assert_eq!(
            build_connect(addr("10.0.0.1:80"), &headers).err(),
            Some(RequestError::BadHeader {
                name: "baggage",
                value: "a\r\nb".into()
            })
        );
    }

    #[test]
    fn validates_what_it_builds() {
        for dst in ["10.0.0.1:80", "[2001:db8::1]:9080", "127.0.0.1:65535"] {
            let req = build_connect(addr(dst), &ConnectHeaders::default()).unwrap();
            assert_eq!(validate(req.method(), req.uri()), Ok(addr(dst)));
        }
    }

    #[test]
    fn rejects_other_methods_with_405() {
        for method in [Method::GET, Method::POST, Method::PUT, Method::OPTIONS] {
            let uri: Uri = "10.0.0.1:80".parse().unwrap();
            let err = validate(&method, &uri).unwrap_err();
            assert_eq!(err, Reject::NotConnect(method));
            assert_eq!(err.status(), StatusCode::METHOD_NOT_ALLOWED);
        }
    }

    #[test]
    fn rejects_missing_or_bad_authority_with_400() {
        let no_authority: Uri = "/path".parse().unwrap();
        let err = validate(&Method::CONNECT, &no_authority).unwrap_err();
        assert_eq!(err, Reject::MissingAuthority);
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        for bad in [
            "example.com:80",
            "10.0.0.1",
            "10.0.0.1:0",
            "0.0.0.0:80",
            "[::]:80",
            "2001:db8::1:80",
            "10.0.0.1:99999",
            "[fe80::1%25eth0]:80",
        ] {
            let Ok(uri) = bad.parse::<Uri>() else {
                continue; // not even a URI: h2 would have refused it already
            };
            let err = validate(&Method::CONNECT, &uri).unwrap_err();
            assert!(matches!(err, Reject::BadAuthority(_)), "{bad}: {err:?}");
            assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn forwarded_parsing_is_lenient_about_quotes_and_case() {
        let mut h = HeaderMap::new();
        assert_eq!(forwarded_for(&h), None);
        h.insert(
            FORWARDED,
            HeaderValue::from_static("proto=https;For=10.0.0.9:1234, for=1.1.1.1:1"),
        );
        assert_eq!(forwarded_for(&h), Some(addr("10.0.0.9:1234")));
        h.insert(FORWARDED, HeaderValue::from_static("for=unknown"));
        assert_eq!(forwarded_for(&h), None);
    }
}
