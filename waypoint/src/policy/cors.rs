//! CORS (Istio `corsPolicy`, Gateway API `HTTPCORSFilter`; Envoy's CORS filter semantics),
//! compiled once per route: which origins are allowed, and the header values answered, already
//! joined. Per request, `decide` says whether to answer a preflight, add headers to the
//! response, or do nothing.

use http::{HeaderMap, HeaderName, HeaderValue, Method, header};
use regex::Regex;

use crate::config::gateway::filter::Cors as GatewayCors;
use crate::config::istio::common::StringMatch;
use crate::config::istio::http_policy::CorsPolicy;

/// How an origin is matched.
#[derive(Clone, Debug)]
enum Origin {
    Any,
    Exact(String),
    Prefix(String),
    Regex(Regex),
    /// Gateway API `https://*.example.com`: what precedes and follows the `*`; the `*` stands
    /// for one or more characters of the host.
    Wildcard(String, String),
}

impl Origin {
    fn matches(&self, origin: &str) -> bool {
        match self {
            Origin::Any => true,
            Origin::Exact(e) => e == origin,
            Origin::Prefix(p) => origin.starts_with(p.as_str()),
            Origin::Regex(r) => r.is_match(origin),
            Origin::Wildcard(before, after) => {
                origin.len() > before.len() + after.len()
                    && origin.starts_with(before.as_str())
                    && origin.ends_with(after.as_str())
                    && !origin[before.len()..origin.len() - after.len()].contains('/')
            }
        }
    }

    fn same(&self, other: &Origin) -> bool {
        match (self, other) {
            (Origin::Any, Origin::Any) => true,
            (Origin::Exact(a), Origin::Exact(b)) | (Origin::Prefix(a), Origin::Prefix(b)) => a == b,
            (Origin::Regex(a), Origin::Regex(b)) => a.as_str() == b.as_str(),
            (Origin::Wildcard(a, x), Origin::Wildcard(b, y)) => a == b && x == y,
            _ => false,
        }
    }
}

/// A route's CORS policy, ready to apply.
#[derive(Clone, Debug)]
pub struct Cors {
    origins: Vec<Origin>,
    allow_methods: Option<HeaderValue>,
    allow_headers: Option<HeaderValue>,
    expose_headers: Option<HeaderValue>,
    max_age: Option<HeaderValue>,
    allow_credentials: bool,
    /// A preflight from an origin not allowed goes to the backend (Istio's `FORWARD`, the
    /// default); otherwise it is answered without CORS headers (`IGNORE`).
    forward_unmatched_preflights: bool,
}

impl PartialEq for Cors {
    fn eq(&self, other: &Cors) -> bool {
        self.origins.len() == other.origins.len()
            && self
                .origins
                .iter()
                .zip(&other.origins)
                .all(|(a, b)| a.same(b))
            && self.allow_methods == other.allow_methods
            && self.allow_headers == other.allow_headers
            && self.expose_headers == other.expose_headers
            && self.max_age == other.max_age
            && self.allow_credentials == other.allow_credentials
            && self.forward_unmatched_preflights == other.forward_unmatched_preflights
    }
}

/// What CORS asks of one request.
#[derive(Debug)]
pub enum CorsDecision {
    /// Not a cross-origin request, or CORS does not apply: nothing to do.
    None,
    /// A preflight this waypoint answers itself, with these headers (status 200).
    Preflight(HeaderMap),
    /// A cross-origin request from an allowed origin: add these headers to its response.
    Allowed(HeaderMap),
}

fn joined(list: &[String]) -> Option<HeaderValue> {
    if list.is_empty() {
        return None;
    }
    HeaderValue::from_str(&list.join(",")).ok()
}

impl Cors {
    /// From Istio's `corsPolicy`; an error names the regex that does not compile.
    pub fn from_istio(p: &CorsPolicy) -> Result<Cors, String> {
        let origins = p
            .allow_origins
            .iter()
            .map(|m| match m {
                StringMatch::Exact(e) if e == "*" => Ok(Origin::Any),
                StringMatch::Exact(e) => Ok(Origin::Exact(e.clone())),
                StringMatch::Prefix(p) => Ok(Origin::Prefix(p.clone())),
                StringMatch::Regex(r) => Regex::new(&format!("^(?:{r})$"))
                    .map(Origin::Regex)
                    .map_err(|e| format!("allowOrigins regex {r:?}: {e}")),
                StringMatch::Present => Ok(Origin::Any),
            })
            .collect::<Result<_, _>>()?;
        Ok(Cors {
            origins,
            allow_methods: joined(&p.allow_methods),
            allow_headers: joined(&p.allow_headers),
            expose_headers: joined(&p.expose_headers),
            max_age: p.max_age.map(|d| HeaderValue::from(d.as_secs())),
            allow_credentials: p.allow_credentials.unwrap_or(false),
            forward_unmatched_preflights: p.unmatched_preflights_forward,
        })
    }

    /// From a Gateway API CORS filter.
    pub fn from_gateway(f: &GatewayCors) -> Cors {
        let origins = f
            .allow_origins
            .iter()
            .map(|o| match o.split_once('*') {
                _ if o == "*" => Origin::Any,
                Some((before, after)) => Origin::Wildcard(before.to_owned(), after.to_owned()),
                None => Origin::Exact(o.clone()),
            })
            .collect();
        Cors {
            origins,
            allow_methods: joined(&f.allow_methods),
            allow_headers: joined(&f.allow_headers),
            expose_headers: joined(&f.expose_headers),
            max_age: Some(HeaderValue::from(f.max_age)),
            allow_credentials: f.allow_credentials,
            forward_unmatched_preflights: true,
        }
    }

    fn allows(&self, origin: &str) -> bool {
        self.origins.iter().any(|o| o.matches(origin))
    }

    /// What to do for a request with these method and headers.
    pub fn decide(&self, method: &Method, headers: &HeaderMap) -> CorsDecision {
        let Some(origin) = headers.get(header::ORIGIN) else {
            return CorsDecision::None;
        };
        let allowed = origin.to_str().is_ok_and(|o| self.allows(o));
        let preflight = method == Method::OPTIONS
            && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
        let mut out = HeaderMap::new();
        if !allowed {
            return if preflight && !self.forward_unmatched_preflights {
                CorsDecision::Preflight(out)
            } else {
                CorsDecision::None
            };
        }
        out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        if self.allow_credentials {
            out.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if preflight {
            let set = |out: &mut HeaderMap, name: HeaderName, v: &Option<HeaderValue>| {
                if let Some(v) = v {
                    out.insert(name, v.clone());
                }
            };
            set(
                &mut out,
                header::ACCESS_CONTROL_ALLOW_METHODS,
                &self.allow_methods,
            );
            set(
                &mut out,
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                &self.allow_headers,
            );
            set(&mut out, header::ACCESS_CONTROL_MAX_AGE, &self.max_age);
            return CorsDecision::Preflight(out);
        }
        if let Some(v) = &self.expose_headers {
            out.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
        }
        CorsDecision::Allowed(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn istio(origins: Vec<StringMatch>, forward: bool) -> Cors {
        Cors::from_istio(&CorsPolicy {
            allow_origins: origins,
            allow_methods: vec!["GET".into(), "POST".into()],
            allow_headers: vec!["x-custom".into()],
            expose_headers: vec!["x-exposed".into()],
            max_age: Some(std::time::Duration::from_secs(3600)),
            allow_credentials: Some(true),
            unmatched_preflights_forward: forward,
        })
        .expect("valid")
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn preflight_from_an_allowed_origin_is_answered() {
        let c = istio(vec![StringMatch::Exact("https://a.example".into())], true);
        let req = headers(&[
            ("origin", "https://a.example"),
            ("access-control-request-method", "POST"),
        ]);
        let CorsDecision::Preflight(h) = c.decide(&Method::OPTIONS, &req) else {
            panic!("a preflight answer")
        };
        assert_eq!(h["access-control-allow-origin"], "https://a.example");
        assert_eq!(h["access-control-allow-methods"], "GET,POST");
        assert_eq!(h["access-control-allow-headers"], "x-custom");
        assert_eq!(h["access-control-max-age"], "3600");
        assert_eq!(h["access-control-allow-credentials"], "true");
    }

    #[test]
    fn unmatched_origins_get_nothing_and_preflights_follow_the_setting() {
        let forward = istio(vec![StringMatch::Prefix("https://a.".into())], true);
        let ignore = istio(vec![StringMatch::Prefix("https://a.".into())], false);
        let pre = headers(&[
            ("origin", "https://b.example"),
            ("access-control-request-method", "GET"),
        ]);
        assert!(matches!(
            forward.decide(&Method::OPTIONS, &pre),
            CorsDecision::None
        ));
        assert!(
            matches!(ignore.decide(&Method::OPTIONS, &pre), CorsDecision::Preflight(h) if h.is_empty())
        );
        let get = headers(&[("origin", "https://b.example")]);
        assert!(matches!(
            forward.decide(&Method::GET, &get),
            CorsDecision::None
        ));
        assert!(matches!(
            forward.decide(&Method::GET, &HeaderMap::new()),
            CorsDecision::None
        ));
    }

    #[test]
    fn actual_requests_get_origin_and_exposed_headers() {
        let c = istio(
            vec![StringMatch::Regex(r"https://.*\.example".into())],
            true,
        );
        let get = headers(&[("origin", "https://x.example")]);
        let CorsDecision::Allowed(h) = c.decide(&Method::GET, &get) else {
            panic!("allowed")
        };
        assert_eq!(h["access-control-allow-origin"], "https://x.example");
        assert_eq!(h["access-control-expose-headers"], "x-exposed");
        assert!(!h.contains_key("access-control-allow-methods"));
        // A regex is a full match.
        let longer = headers(&[("origin", "https://x.example.evil")]);
        assert!(matches!(
            c.decide(&Method::GET, &longer),
            CorsDecision::None
        ));
    }

    #[test]
    fn gateway_wildcards_match_one_host_part() {
        let c = Cors::from_gateway(&GatewayCors {
            allow_origins: vec!["https://*.example.com".into()],
            allow_credentials: false,
            allow_methods: vec![],
            allow_headers: vec![],
            expose_headers: vec![],
            max_age: 5,
        });
        assert!(c.allows("https://api.example.com"));
        assert!(!c.allows("https://example.com"));
        assert!(!c.allows("http://api.example.com"));
        assert!(!c.allows("https://a/b.example.com"));
        assert!(
            Cors::from_gateway(&GatewayCors {
                allow_origins: vec!["*".into()],
                allow_credentials: false,
                allow_methods: vec![],
                allow_headers: vec![],
                expose_headers: vec![],
                max_age: 5,
            })
            .allows("https://anything")
        );
    }
}
