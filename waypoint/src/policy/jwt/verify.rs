//! One token checked against the rules of its issuer, in the order Envoy's `jwt_authn`
//! checks it (envoyproxy/envoy `jwt_authn/authenticator.cc`, google/jwt_verify_lib): the
//! form (three base64url parts, JSON header and payload, a known `alg`), the issuer, the
//! time window (`exp`, `nbf`, with Envoy's default 60 s clock skew), the audiences, then the
//! signature against the issuer's keys. Pure: the keys and the time are given.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value as Json};

use super::jwks::{Jwks, algorithm};

/// Envoy's default `clock_skew_seconds`.
pub const CLOCK_SKEW_SECS: u64 = 60;

/// Why a token was refused. The message is Envoy's (jwt_verify_lib `getStatusString`), the
/// body of its answer; the reason is the bounded label of the refusal counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    BadFormat,
    HeaderParse,
    /// `alg` is `none`, HMAC, or unknown.
    BadAlg,
    PayloadParse,
    SignatureParse,
    UnknownIssuer,
    AudienceNotAllowed,
    Expired,
    NotYetValid,
    /// No key of the issuer has the token's `kid` and `alg`.
    NoMatchingKey,
    BadSignature,
    /// The issuer's `jwksUri` has not been fetched (fail closed).
    JwksUnavailable,
    /// A RequestAuthentication that covers the request was rejected (fail closed).
    PolicyRejected,
}

impl Failure {
    pub fn message(self) -> &'static str {
        match self {
            Failure::BadFormat => "Jwt is not in the form of Header.Payload.Signature",
            Failure::HeaderParse => "Jwt header is an invalid Base64url input or an invalid JSON",
            Failure::BadAlg => "Jwt header [alg] field value is invalid",
            Failure::PayloadParse => "Jwt payload is an invalid Base64 or an invalid JSON",
            Failure::SignatureParse => "Jwt signature is an invalid Base64",
            Failure::UnknownIssuer => "Jwt issuer is not configured",
            Failure::AudienceNotAllowed => "Audiences in Jwt are not allowed",
            Failure::Expired => "Jwt is expired",
            Failure::NotYetValid => "Jwt not yet valid",
            Failure::NoMatchingKey => "Jwks doesn't have key to match kid or alg from Jwt",
            Failure::BadSignature | Failure::PolicyRejected => "Jwt verification fails",
            Failure::JwksUnavailable => "Jwks remote fetch is failed",
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Failure::BadFormat
            | Failure::HeaderParse
            | Failure::PayloadParse
            | Failure::SignatureParse => "malformed",
            Failure::BadAlg => "bad_alg",
            Failure::UnknownIssuer => "unknown_issuer",
            Failure::AudienceNotAllowed => "audience",
            Failure::Expired => "expired",
            Failure::NotYetValid => "not_yet_valid",
            Failure::NoMatchingKey => "unknown_key",
            Failure::BadSignature => "bad_signature",
            Failure::JwksUnavailable => "jwks_unavailable",
            Failure::PolicyRejected => "policy_rejected",
        }
    }

    /// Envoy answers 403 to a token whose audience is not allowed, 401 to the rest.
    pub fn status(self) -> u16 {
        if self == Failure::AudienceNotAllowed {
            403
        } else {
            401
        }
    }
}

/// A token split and decoded, not yet trusted.
#[derive(Debug)]
pub struct Parsed<'t> {
    pub alg: Algorithm,
    pub kid: Option<String>,
    pub payload: Map<String, Json>,
    /// `header.payload`, what the signature covers.
    signed: &'t str,
    signature: &'t str,
    /// The payload as sent (base64url), for `outputPayloadToHeader`.
    pub encoded_payload: &'t str,
}

impl<'t> Parsed<'t> {
    pub fn parse(token: &'t str) -> Result<Parsed<'t>, Failure> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Failure::BadFormat);
        };
        let header: Json = decode_json(h).ok_or(Failure::HeaderParse)?;
        let header = header.as_object().ok_or(Failure::HeaderParse)?;
        let alg = header
            .get("alg")
            .and_then(Json::as_str)
            .and_then(algorithm)
            .ok_or(Failure::BadAlg)?;
        let kid = match header.get("kid") {
            None => None,
            Some(Json::String(k)) => Some(k.clone()),
            Some(_) => return Err(Failure::HeaderParse),
        };
        let Some(Json::Object(payload)) = decode_json(p) else {
            return Err(Failure::PayloadParse);
        };
        for time in ["exp", "nbf", "iat"] {
            if payload.get(time).is_some_and(|v| !v.is_u64()) {
                return Err(Failure::PayloadParse);
            }
        }
        if s.is_empty() || URL_SAFE_NO_PAD.decode(s).is_err() {
            return Err(Failure::SignatureParse);
        }
        Ok(Parsed {
            alg,
            kid,
            payload,
            signed: &token[..h.len() + 1 + p.len()],
            signature: s,
            encoded_payload: p,
        })
    }

    /// The `iss` claim, empty when absent.
    pub fn issuer(&self) -> &str {
        self.payload.get("iss").and_then(Json::as_str).unwrap_or("")
    }

    /// `aud`: a string or a list of strings.
    pub fn audiences(&self) -> Vec<String> {
        match self.payload.get("aud") {
            Some(Json::String(a)) => vec![a.clone()],
            Some(Json::Array(list)) => list
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The time window at `now` (seconds since the epoch), with the clock skew allowed.
    pub fn check_time(&self, now: u64) -> Result<(), Failure> {
        let claim = |k: &str| self.payload.get(k).and_then(Json::as_u64);
        if claim("nbf").is_some_and(|nbf| now + CLOCK_SKEW_SECS < nbf) {
            return Err(Failure::NotYetValid);
        }
        if claim("exp").is_some_and(|exp| now > exp + CLOCK_SKEW_SECS) {
            return Err(Failure::Expired);
        }
        Ok(())
    }

    /// Whether an audience of the token is `allowed` (empty: any). Compared as
    /// jwt_verify_lib does, without an `http://`/`https://` scheme or a trailing `/`.
    pub fn check_audience(&self, allowed: &[String]) -> Result<(), Failure> {
        if allowed.is_empty() {
            return Ok(());
        }
        let norm = |s: &str| {
            let s = s
                .strip_prefix("https://")
                .or_else(|| s.strip_prefix("http://"))
                .unwrap_or(s);
            s.strip_suffix('/').unwrap_or(s).to_owned()
        };
        let allowed: Vec<String> = allowed.iter().map(|a| norm(a)).collect();
        if self.audiences().iter().any(|a| allowed.contains(&norm(a))) {
            Ok(())
        } else {
            Err(Failure::AudienceNotAllowed)
        }
    }

    /// The signature against the keys of the issuer.
    pub fn check_signature(&self, keys: &Jwks) -> Result<(), Failure> {
        let mut any = false;
        for key in keys.candidates(self.kid.as_deref(), self.alg) {
            any = true;
            let ok =
                jsonwebtoken::crypto::verify(self.signature, self.signed.as_bytes(), key, self.alg);
            if matches!(ok, Ok(true)) {
                return Ok(());
            }
        }
        Err(if any {
            Failure::BadSignature
        } else {
            Failure::NoMatchingKey
        })
    }
}

fn decode_json(part: &str) -> Option<Json> {
    let bytes = URL_SAFE_NO_PAD.decode(part.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}
