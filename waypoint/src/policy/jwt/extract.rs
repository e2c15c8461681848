//! Where a rule looks for a token (`fromHeaders`, `fromParams`, `fromCookies`), and the
//! default when it names none: `Authorization: Bearer <token>` and the `access_token`
//! query parameter (istio/api `JWTRule`, Envoy's `jwt_authn` defaults).

use std::borrow::Cow;

use http::{HeaderMap, HeaderName, header};

/// One place a token may be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A header; the token follows `prefix` (e.g. `Bearer `).
    Header {
        name: HeaderName,
        prefix: String,
    },
    Param(String),
    Cookie(String),
}

/// The places read when a rule names none.
pub(super) fn defaults() -> [Location; 2] {
    [
        Location::Header {
            name: header::AUTHORIZATION,
            prefix: "Bearer ".into(),
        },
        Location::Param("access_token".into()),
    ]
}

impl Location {
    /// The token at this place in a request, if there is one.
    pub fn find<'r>(&self, headers: &'r HeaderMap, query: &'r str) -> Option<Cow<'r, str>> {
        let token = match self {
            Location::Header { name, prefix } => headers.get_all(name).iter().find_map(|v| {
                let v = v.to_str().ok()?.trim();
                // The scheme of `Authorization` is case-insensitive (RFC 9110 §11.1).
                let rest = if v.len() >= prefix.len()
                    && v.is_char_boundary(prefix.len())
                    && v[..prefix.len()].eq_ignore_ascii_case(prefix)
                {
                    &v[prefix.len()..]
                } else {
                    return None;
                };
                Some(rest.trim())
            })?,
            Location::Param(p) => query.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=')?;
                (k == p).then_some(v)
            })?,
            Location::Cookie(c) => headers.get_all(header::COOKIE).iter().find_map(|v| {
                v.to_str().ok()?.split(';').find_map(|pair| {
                    let (k, v) = pair.trim().split_once('=')?;
                    (k == c).then_some(v.trim_matches('"'))
                })
            })?,
        };
        (!token.is_empty()).then_some(Cow::Borrowed(token))
    }
}
