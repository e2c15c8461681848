//! `RequestAuthentication` (`security.istio.io` v1, v1beta1), as written. Field names follow
//! istio/api `security/v1beta1/request_authentication.proto` and `jwt.proto` in their JSON
//! form, checked as Istio's validation checks them (an issuer is required, `jwksUri` is an
//! http or https URL, an inline `jwks` must hold a key the waypoint can use, header names
//! are header names). Which policies apply here and how tokens are verified is
//! `policy::jwt`.

use std::time::Duration;

use super::super::decode::{Cx, Decode, Fields, Path};
use super::super::duration::duration;
use super::super::istio::common::Labels;
use super::super::yaml::Node;
use super::authorization_policy::{TargetRef, selection};

/// `RequestAuthentication.spec`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RequestAuthentication {
    /// `selector.matchLabels`: a workload selector, which a waypoint does not read.
    pub selector: Option<Labels>,
    /// `targetRefs`, with the older single `targetRef` folded in.
    pub target_refs: Vec<TargetRef>,
    pub jwt_rules: Vec<JwtRule>,
}

/// `JWTRule`: how tokens of one issuer are found and checked.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JwtRule {
    pub issuer: String,
    /// Empty: any audience (Istio's default).
    pub audiences: Vec<String>,
    /// Fetched by the waypoint itself (no istiod resolves it here).
    pub jwks_uri: Option<String>,
    /// Inline JWKS JSON; used instead of `jwks_uri` when both are set, as Istio does.
    pub jwks: Option<String>,
    pub from_headers: Vec<JwtHeader>,
    pub from_params: Vec<String>,
    pub from_cookies: Vec<String>,
    pub output_payload_to_header: Option<http::HeaderName>,
    pub forward_original_token: bool,
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// The JWKS fetch timeout; `None` is Istio's default (5 s).
    pub timeout: Option<Duration>,
}

/// `JWTHeader`: a header a token is read from, after `prefix`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwtHeader {
    pub name: http::HeaderName,
    pub prefix: String,
}

/// `ClaimToHeader`: a claim copied to a request header once the token is verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimToHeader {
    pub header: http::HeaderName,
    /// The claim's name; `a.b` reads the nested claim `b` of `a`.
    pub claim: String,
}

impl Decode for RequestAuthentication {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let (selector, target_refs, ok) = selection(&mut f, cx);
        let jwt_rules = f.list::<JwtRule>("jwtRules", cx);
        let ok = f.finish(cx) && ok;
        ok.then_some(RequestAuthentication {
            selector,
            target_refs,
            jwt_rules,
        })
    }
}

impl Decode for JwtRule {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let issuer = f.req_with("issuer", cx, |n, at, cx| {
            let s = String::decode(n, at, cx)?;
            if s.is_empty() {
                cx.invalid(at, n, "must not be empty");
                return None;
            }
            Some(s)
        });
        let audiences = f.list::<String>("audiences", cx);
        let jwks_uri = f.opt_with("jwksUri", cx, |n, at, cx| {
            let s = String::decode(n, at, cx)?;
            check_uri(&s).map_err(|why| cx.invalid(at, n, why)).ok()?;
            Some(s)
        });
        let jwks = f.opt_with("jwks", cx, |n, at, cx| {
            let s = String::decode(n, at, cx)?;
            match crate::policy::jwt::jwks::Jwks::parse(&s) {
                Ok(_) => Some(s),
                Err(why) => {
                    cx.invalid(at, n, why);
                    None
                }
            }
        });
        let from_headers = f.list::<JwtHeader>("fromHeaders", cx);
        let from_params = nonempty_names(&mut f, "fromParams", cx);
        let from_cookies = nonempty_names(&mut f, "fromCookies", cx);
        let output_payload_to_header = f.opt_with("outputPayloadToHeader", cx, header_name);
        let forward_original_token = f.opt::<bool>("forwardOriginalToken", cx).unwrap_or(false);
        let output_claim_to_headers = f.list::<ClaimToHeader>("outputClaimToHeaders", cx);
        let timeout = f.opt_with("timeout", cx, duration);
        let ok = f.finish(cx);
        Some(JwtRule {
            issuer: issuer?,
            audiences,
            jwks_uri,
            jwks,
            from_headers,
            from_params,
            from_cookies,
            output_payload_to_header,
            forward_original_token,
            output_claim_to_headers,
            timeout,
        })
        .filter(|_| ok)
    }
}

impl Decode for JwtHeader {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let name = f.req_with("name", cx, header_name);
        let prefix = f.opt::<String>("prefix", cx).unwrap_or_default();
        let ok = f.finish(cx);
        Some(JwtHeader {
            name: name?,
            prefix,
        })
        .filter(|_| ok)
    }
}

impl Decode for ClaimToHeader {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let header = f.req_with("header", cx, header_name);
        let claim = f.req_with("claim", cx, |n, at, cx| {
            let s = String::decode(n, at, cx)?;
            if s.is_empty() {
                cx.invalid(at, n, "must not be empty");
                return None;
            }
            Some(s)
        });
        let ok = f.finish(cx);
        Some(ClaimToHeader {
            header: header?,
            claim: claim?,
        })
        .filter(|_| ok)
    }
}

fn header_name(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<http::HeaderName> {
    let s = String::decode(node, at, cx)?;
    match http::HeaderName::from_bytes(s.as_bytes()) {
        Ok(h) => Some(h),
        Err(_) => {
            cx.invalid(at, node, format!("{s:?} is not a valid header name"));
            None
        }
    }
}

/// A list of query parameter or cookie names, none empty.
fn nonempty_names(f: &mut Fields<'_, '_>, key: &str, cx: &mut Cx) -> Vec<String> {
    f.opt_with(key, cx, |n, at, cx| {
        let names = Vec::<String>::decode(n, at, cx)?;
        if names.iter().any(String::is_empty) {
            cx.invalid(at, n, "a name must not be empty");
            return None;
        }
        Some(names)
    })
    .unwrap_or_default()
}

/// `jwksUri`: an absolute http or https URL with a host, as Istio validates it.
fn check_uri(s: &str) -> Result<(), String> {
    let uri: http::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(format!("{s:?}: the scheme must be http or https")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{s:?} has no host"));
    }
    Ok(())
}
