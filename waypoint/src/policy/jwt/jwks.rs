//! A JSON Web Key Set (RFC 7517) read into the public keys a token may be verified with.
//!
//! Only asymmetric signing keys are kept: RSA (RS256/384/512, PS256/384/512), EC on P-256
//! and P-384 (ES256, ES384) and Ed25519 (EdDSA). A symmetric (`oct`) key in a published set
//! would let anyone who read the set mint tokens, so it is never used; keys of kinds the
//! waypoint cannot use, or marked for encryption, are skipped, as Envoy skips them, and a
//! set with no usable key at all is refused.

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value as Json;

/// The usable keys of one set.
#[derive(Clone)]
pub struct Jwks {
    keys: Vec<Key>,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.keys.iter().map(|k| (&k.kid, k.kind)))
            .finish()
    }
}

#[derive(Clone)]
struct Key {
    kid: Option<String>,
    /// The key's own `alg`, when it names one.
    alg: Option<Algorithm>,
    kind: Kind,
    key: DecodingKey,
}

/// What a key can verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl Kind {
    fn verifies(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        match self {
            Kind::Rsa => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
            Kind::P256 => alg == ES256,
            Kind::P384 => alg == ES384,
            Kind::Ed25519 => alg == EdDSA,
        }
    }
}

/// The token signing algorithms the waypoint verifies (`none` and HMAC never are).
pub fn algorithm(name: &str) -> Option<Algorithm> {
    use Algorithm::*;
    let alg: Algorithm = name.parse().ok()?;
    matches!(
        alg,
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 | ES256 | ES384 | EdDSA
    )
    .then_some(alg)
}

impl Jwks {
    /// Reads a JWKS document; `Err` says why nothing in it can be used.
    pub fn parse(json: &str) -> Result<Jwks, String> {
        let doc: Json =
            serde_json::from_str(json).map_err(|e| format!("the JWKS is not JSON: {e}"))?;
        let Some(entries) = doc.get("keys") else {
            return Err("the JWKS has no \"keys\" field".into());
        };
        let Some(entries) = entries.as_array() else {
            return Err("the JWKS \"keys\" field is not a list".into());
        };
        let keys: Vec<Key> = entries.iter().filter_map(Key::read).collect();
        if keys.is_empty() {
            return Err(format!(
                "none of the JWKS's {} keys is an RSA, EC (P-256, P-384) or Ed25519 signing key",
                entries.len()
            ));
        }
        Ok(Jwks { keys })
    }

    /// A set with no key (an issuer whose keys are not known: its tokens are refused).
    pub fn empty() -> Jwks {
        Jwks { keys: Vec::new() }
    }

    /// The keys that may have signed a token with header `kid` and `alg` (a `kid` on both
    /// sides must be equal; a key's own `alg`, if any, must be the token's).
    pub fn candidates<'s>(
        &'s self,
        kid: Option<&'s str>,
        alg: Algorithm,
    ) -> impl Iterator<Item = &'s DecodingKey> + 's {
        self.keys
            .iter()
            .filter(move |k| k.kind.verifies(alg))
            .filter(move |k| k.alg.is_none_or(|a| a == alg))
            .filter(move |k| match (kid, &k.kid) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            })
            .map(|k| &k.key)
    }
}

impl Key {
    /// One entry of `keys`, or `None` when the waypoint cannot use it.
    fn read(entry: &Json) -> Option<Key> {
        let jwk: Jwk = serde_json::from_value(entry.clone()).ok()?;
        if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
            return None;
        }
        let kind = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Kind::Rsa,
            AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                EllipticCurve::P256 => Kind::P256,
                EllipticCurve::P384 => Kind::P384,
                _ => return None,
            },
            AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
                Kind::Ed25519
            }
            _ => return None,
        };
        let alg = match jwk.common.key_algorithm {
            None => None,
            Some(a) => Some(algorithm(&a.to_string()).filter(|a| kind.verifies(*a))?),
        };
        Some(Key {
            kid: jwk.common.key_id.clone(),
            alg,
            kind,
            key: DecodingKey::from_jwk(&jwk).ok()?,
        })
    }
}
