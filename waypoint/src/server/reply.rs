//! Responses the waypoint makes itself: errors, direct responses, redirects, aborts.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full};

use crate::upstream::Body;

pub(super) fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub(super) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Marks a response the waypoint made itself (not an endpoint's).
#[derive(Clone, Copy, Debug)]
pub(super) struct Local;

/// A plain-text answer, as Envoy words its own (`no healthy upstream`, ...).
pub(super) fn text(status: u16, text: &str) -> Response<Body> {
    let mut r = Response::new(full(Bytes::copy_from_slice(text.as_bytes())));
    r.extensions_mut().insert(Local);
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// A gRPC error: HTTP 200 with `grpc-status` in a trailers-only response (gRPC over HTTP/2).
pub(super) fn grpc(code: u8, message: &str) -> Response<Body> {
    let mut r = Response::new(empty());
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(u16::from(code)));
    if let Ok(m) = HeaderValue::from_str(message) {
        h.insert("grpc-message", m);
    }
    r
}

/// The gRPC status for an HTTP status (gRPC's "HTTP to gRPC status code mapping", as Envoy
/// applies it to its own replies).
pub(super) fn grpc_status_of(http: u16) -> u8 {
    match http {
        400 => 13,             // INTERNAL
        401 => 16,             // UNAUTHENTICATED
        403 => 7,              // PERMISSION_DENIED
        404 => 12,             // UNIMPLEMENTED
        429 | 502..=504 => 14, // UNAVAILABLE
        _ => 2,                // UNKNOWN
    }
}

/// A reply of the waypoint's own to a gRPC request, as gRPC clients read it: HTTP 200 with
/// the mapped `grpc-status` and the text as `grpc-message` (a trailers-only response).
/// Replies that already carry a `grpc-status` (fault aborts) are left as they are.
pub(super) fn for_grpc(response: Response<Body>) -> Response<Body> {
    if response.extensions().get::<Local>().is_none()
        || response.headers().contains_key("grpc-status")
    {
        return response;
    }
    let status = response.status();
    let reason = status.canonical_reason().unwrap_or("");
    let mut r = grpc(
        grpc_status_of(status.as_u16()),
        &format!("waypoint: HTTP {} {reason}", status.as_u16()),
    );
    r.extensions_mut().insert(Local);
    r
}

#[cfg(test)]
mod tests {
    #[test]
    fn http_statuses_map_to_grpc_codes() {
        for (http, grpc) in [
            (400, 13),
            (401, 16),
            (403, 7),
            (404, 12),
            (429, 14),
            (503, 14),
            (504, 14),
            (500, 2),
        ] {
            assert_eq!(super::grpc_status_of(http), grpc, "{http}");
        }
    }
}
