//! RequestAuthentication: decoding (errors by field, line and column), selection, and tokens
//! signed here with keys made here (RSA by the `openssl` tool, EC by ring) checked as Envoy
//! checks them.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{HeaderMap, HeaderValue};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use serde_json::{Value as Json, json};

use super::verify::Failure;
use super::*;
use crate::config::{LoadOptions, Problem, load_str};
use crate::route::{CompileOptions, compile};

const ISS: &str = "https://issuer.example.com";
/// A fixed "now" for the time checks.
const NOW: u64 = 1_800_000_000;

enum Signer {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair, &'static str),
    Ed(Ed25519KeyPair),
}

/// A key, its `kid`, and the JWK of its public half.
struct Key {
    kid: &'static str,
    signer: Signer,
}

impl Key {
    fn rsa(kid: &'static str) -> Key {
        let out = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ])
            .args(["-outform", "DER"])
            .output()
            .expect("openssl genpkey");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // `openssl genpkey -outform DER` writes an RSA key as PKCS#1.
        let key = RsaKeyPair::from_der(&out.stdout).expect("RSA PKCS#1");
        Key {
            kid,
            signer: Signer::Rsa(key),
        }
    }

    fn ec(kid: &'static str, curve: &'static str) -> Key {
        let alg = match curve {
            "P-256" => &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            _ => &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
        };
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("EC key");
        let key = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("EC PKCS#8");
        Key {
            kid,
            signer: Signer::Ec(key, curve),
        }
    }

    fn ed(kid: &'static str) -> Key {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("Ed25519 key");
        let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("Ed25519 PKCS#8");
        Key {
            kid,
            signer: Signer::Ed(key),
        }
    }

    fn jwk(&self) -> Json {
        let b64 = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
        match &self.signer {
            Signer::Rsa(k) => {
                let c: signature::RsaPublicKeyComponents<Vec<u8>> = k.public().into();
                json!({"kty": "RSA", "kid": self.kid, "n": b64(&c.n), "e": b64(&c.e)})
            }
            Signer::Ec(k, curve) => {
                let point = k.public_key().as_ref();
                let half = (point.len() - 1) / 2;
                json!({"kty": "EC", "kid": self.kid, "crv": curve,
                       "x": b64(&point[1..=half]), "y": b64(&point[half + 1..])})
            }
            Signer::Ed(k) => {
                json!({"kty": "OKP", "kid": self.kid, "crv": "Ed25519", "x": b64(k.public_key().as_ref())})
            }
        }
    }

    /// A token with `header` fields over the defaults (`alg`, this `kid`).
    fn sign(&self, alg: &str, header: Json, payload: &Json) -> String {
        let mut h = json!({"alg": alg, "kid": self.kid, "typ": "JWT"});
        if let (Some(h), Json::Object(extra)) = (h.as_object_mut(), header) {
            h.extend(extra);
        }
        let b64 = |v: &Json| URL_SAFE_NO_PAD.encode(v.to_string());
        let signed = format!("{}.{}", b64(&h), b64(payload));
        let rng = SystemRandom::new();
        let sig = match &self.signer {
            Signer::Rsa(k) => {
                let padding: &dyn signature::RsaEncoding = match alg {
                    "RS384" => &signature::RSA_PKCS1_SHA384,
                    "RS512" => &signature::RSA_PKCS1_SHA512,
                    "PS256" => &signature::RSA_PSS_SHA256,
                    _ => &signature::RSA_PKCS1_SHA256,
                };
                let mut sig = vec![0; k.public().modulus_len()];
                k.sign(padding, &rng, signed.as_bytes(), &mut sig)
                    .expect("RSA sign");
                sig
            }
            Signer::Ed(k) => k.sign(signed.as_bytes()).as_ref().to_vec(),
            Signer::Ec(k, _) => k
                .sign(&rng, signed.as_bytes())
                .expect("EC sign")
                .as_ref()
                .to_vec(),
        };
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig))
    }
}

fn claims(sub: &str) -> Json {
    json!({"iss": ISS, "sub": sub, "aud": ["bookinfo"], "exp": NOW + 3600, "nbf": NOW - 10,
           "azp": "web", "groups": ["dev", "admin"], "org": {"team": "books"}})
}

fn jwks(keys: &[&Key]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()}).to_string()
}

/// A RequestAuthentication on the waypoint's Gateway with `rules` (YAML flow list).
fn policy(rules: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt}}\nspec:\n  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]\n  jwtRules: {rules}\n"
    )
}

fn authn(yaml: &str) -> (Authn, Vec<String>) {
    let loaded = load_str("ra.yaml", yaml, &LoadOptions::default());
    assert!(!loaded.has_errors(), "{:#?}", loaded.diagnostics);
    let c = compile(&loaded.resources, &CompileOptions::default());
    let notes = loaded
        .diagnostics
        .iter()
        .chain(&c.diagnostics)
        .map(ToString::to_string)
        .collect();
    (c.table.authn, notes)
}

struct NoRemote;
impl RemoteKeys for NoRemote {
    fn get(&self, _: &str) -> Option<Arc<Jwks>> {
        None
    }
}

const SERVICE: Target<'static> = Target::Service {
    namespace: "default",
    name: "productpage",
};

fn bearer(token: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
    );
    h
}

fn run(a: &Authn, headers: &HeaderMap, query: &str) -> Result<Option<Verified>, Failure> {
    a.authenticate(SERVICE, headers, query, &NoRemote, NOW)
        .map_err(|r| r.failure)
}

#[test]
fn tokens_are_checked_as_envoy_checks_them() {
    let rsa = Key::rsa("r1");
    let p256 = Key::ec("e1", "P-256");
    let p384 = Key::ec("e2", "P-384");
    let ed = Key::ed("d1");
    let rules = format!(
        "[{{issuer: \"{ISS}\", audiences: [bookinfo], jwks: '{}'}}]",
        jwks(&[&rsa, &p256, &p384, &ed])
    );
    let (a, _) = authn(&policy(&rules));
    // No token: through, with no principal.
    assert!(run(&a, &HeaderMap::new(), "").expect("no token").is_none());
    // Every supported algorithm, each key with its own.
    for (key, alg) in [
        (&rsa, "RS256"),
        (&rsa, "RS384"),
        (&rsa, "RS512"),
        (&rsa, "PS256"),
        (&p256, "ES256"),
        (&p384, "ES384"),
        (&ed, "EdDSA"),
    ] {
        let v = run(&a, &bearer(&key.sign(alg, json!({}), &claims("alice"))), "")
            .unwrap_or_else(|f| panic!("{alg}: {f:?}"))
            .expect("verified");
        assert_eq!(v.claims.principal, format!("{ISS}/alice"), "{alg}");
        assert_eq!(v.claims.audiences, ["bookinfo"]);
        assert_eq!(v.claims.presenter.as_deref(), Some("web"));
        // forwardOriginalToken defaults to false: the header goes.
        assert_eq!(v.remove, [http::header::AUTHORIZATION]);
    }
    let with = |edit: Json| {
        let mut c = claims("alice");
        if let (Some(c), Json::Object(e)) = (c.as_object_mut(), edit) {
            c.extend(e);
        }
        run(&a, &bearer(&rsa.sign("RS256", json!({}), &c)), "").map(|_| ())
    };
    // Envoy's 60 s clock skew, both ways.
    assert_eq!(with(json!({"exp": NOW - 30})), Ok(()));
    assert_eq!(with(json!({"exp": NOW - 61})), Err(Failure::Expired));
    assert_eq!(with(json!({"nbf": NOW + 30})), Ok(()));
    assert_eq!(with(json!({"nbf": NOW + 61})), Err(Failure::NotYetValid));
    assert_eq!(
        with(json!({"aud": "other"})),
        Err(Failure::AudienceNotAllowed)
    );
    assert_eq!(Failure::AudienceNotAllowed.status(), 403);
    // Audiences compare without scheme and trailing slash (jwt_verify_lib).
    assert_eq!(with(json!({"aud": "https://bookinfo/"})), Ok(()));
    assert_eq!(
        with(json!({"iss": "https://other"})),
        Err(Failure::UnknownIssuer)
    );
    assert_eq!(with(json!({"exp": "soon"})), Err(Failure::PayloadParse));
    // Signed by a key the set does not hold, under a kid it does: bad signature.
    let stranger = Key::ec("e1", "P-256");
    let t = stranger.sign("ES256", json!({}), &claims("alice"));
    assert_eq!(run(&a, &bearer(&t), "").err(), Some(Failure::BadSignature));
    // A kid the set does not have, or an alg the kid's key cannot verify.
    let t = rsa.sign("RS256", json!({"kid": "nope"}), &claims("alice"));
    assert_eq!(run(&a, &bearer(&t), "").err(), Some(Failure::NoMatchingKey));
    let t = rsa.sign("RS256", json!({"kid": "e1"}), &claims("alice"));
    assert_eq!(run(&a, &bearer(&t), "").err(), Some(Failure::NoMatchingKey));
    // A payload changed after signing.
    let t = rsa.sign("RS256", json!({}), &claims("alice"));
    let mut parts: Vec<&str> = t.split('.').collect();
    let forged = URL_SAFE_NO_PAD.encode(claims("root").to_string());
    parts[1] = &forged;
    assert_eq!(
        run(&a, &bearer(&parts.join(".")), "").err(),
        Some(Failure::BadSignature)
    );
    // alg none (no signature) and HMAC are refused outright.
    let b64 = |v: Json| URL_SAFE_NO_PAD.encode(v.to_string());
    let none = format!("{}.{}.", b64(json!({"alg": "none"})), b64(claims("alice")));
    assert_eq!(run(&a, &bearer(&none), "").err(), Some(Failure::BadAlg));
    let hs = format!(
        "{}.{}.c2ln",
        b64(json!({"alg": "HS256"})),
        b64(claims("alice"))
    );
    assert_eq!(run(&a, &bearer(&hs), "").err(), Some(Failure::BadAlg));
    for (bad, why) in [
        ("abc", Failure::BadFormat),
        ("a.b.c.d", Failure::BadFormat),
        ("!!.e30.c2ln", Failure::HeaderParse),
    ] {
        assert_eq!(run(&a, &bearer(bad), "").err(), Some(why), "{bad}");
    }
    // The default places: Authorization Bearer and the access_token query parameter.
    let t = rsa.sign("RS256", json!({}), &claims("bob"));
    let v = run(&a, &HeaderMap::new(), &format!("x=1&access_token={t}"))
        .expect("query token")
        .expect("verified");
    assert_eq!(v.claims.principal, format!("{ISS}/bob"));
    assert!(
        v.remove.is_empty(),
        "a query token leaves no header to remove"
    );
    assert_eq!(
        run(&a, &HeaderMap::new(), "access_token=garbage").err(),
        Some(Failure::BadFormat)
    );
}

#[test]
fn claims_paths_and_header_outputs() {
    let rsa = Key::rsa("r1");
    let rules = format!(
        "[{{issuer: \"{ISS}\", jwks: '{}', fromHeaders: [{{name: x-jwt, prefix: \"Token \"}}], fromCookies: [session], forwardOriginalToken: true, outputPayloadToHeader: x-jwt-payload, outputClaimToHeaders: [{{header: x-sub, claim: sub}}, {{header: x-team, claim: org.team}}, {{header: x-groups, claim: groups}}]}}]",
        jwks(&[&rsa])
    );
    let (a, notes) = authn(&policy(&rules));
    assert!(notes.is_empty(), "{notes:#?}");
    let t = rsa.sign("RS256", json!({}), &claims("carol"));
    // Only the places this rule names: Authorization is not read.
    assert!(run(&a, &bearer(&t), "").expect("not read").is_none());
    let mut h = HeaderMap::new();
    h.insert(
        "x-jwt",
        HeaderValue::from_str(&format!("Token {t}")).expect("v"),
    );
    let v = run(&a, &h, "").expect("x-jwt").expect("verified");
    assert!(v.remove.is_empty(), "forwardOriginalToken keeps the header");
    let set: Vec<(String, String)> = v
        .set
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().expect("ascii").to_owned()))
        .collect();
    let payload = t.split('.').nth(1).expect("payload").to_owned();
    assert_eq!(
        set,
        [
            ("x-jwt-payload".to_owned(), payload),
            ("x-sub".into(), "carol".into()),
            ("x-team".into(), "books".into()),
        ],
        "a list claim (groups) is not copied"
    );
    assert_eq!(
        v.claims.get(&["org".into(), "team".into()]),
        Some(&json!("books"))
    );
    assert_eq!(v.claims.get(&["org".into(), "none".into()]), None);
    let mut h = HeaderMap::new();
    h.insert(
        http::header::COOKIE,
        HeaderValue::from_str(&format!("a=b; session={t}")).expect("v"),
    );
    assert!(run(&a, &h, "").expect("cookie").is_some());
    assert_eq!(
        a.output_headers(SERVICE)
            .map(|h| h.as_str())
            .collect::<Vec<_>>(),
        ["x-jwt-payload", "x-sub", "x-team", "x-groups"]
    );
}

#[test]
fn remote_keys_fail_closed_until_fetched() {
    let rsa = Key::rsa("r1");
    let (a, _) = authn(&policy(&format!(
        "[{{issuer: \"{ISS}\", jwksUri: \"http://198.18.0.9/jwks\", timeout: 2s}}]"
    )));
    assert_eq!(
        a.remote_uris().into_iter().collect::<Vec<_>>(),
        [(
            "http://198.18.0.9/jwks".to_owned(),
            std::time::Duration::from_secs(2)
        )]
    );
    let t = rsa.sign("RS256", json!({}), &claims("dave"));
    assert_eq!(
        run(&a, &bearer(&t), "").err(),
        Some(Failure::JwksUnavailable)
    );
    struct Fetched(Arc<Jwks>);
    impl RemoteKeys for Fetched {
        fn get(&self, uri: &str) -> Option<Arc<Jwks>> {
            (uri == "http://198.18.0.9/jwks").then(|| self.0.clone())
        }
    }
    let keys = Fetched(Arc::new(Jwks::parse(&jwks(&[&rsa])).expect("jwks")));
    let v = a
        .authenticate(SERVICE, &bearer(&t), "", &keys, NOW)
        .expect("valid")
        .expect("token");
    assert_eq!(v.claims.principal, format!("{ISS}/dave"));
}

#[test]
fn decode_errors_name_the_field() {
    let yaml = r#"
apiVersion: security.istio.io/v1beta1
kind: RequestAuthentication
metadata: {name: bad}
spec:
  targetRefs: [{kind: Service, name: reviews}]
  jwtRules:
  - issuer: ""
    jwksUri: "ftp://keys.example.com/jwks"
    jwks: '{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}'
    fromHeaders: [{name: "bad header"}]
    outputClaimToHeaders: [{header: x-ok, claim: ""}]
    timeout: 5 seconds
    fromParam: [token]
"#;
    let loaded = load_str("ra.yaml", yaml, &LoadOptions::default());
    assert!(loaded.resources.is_empty());
    let errors: Vec<String> = loaded.errors().map(ToString::to_string).collect();
    for (at, what) in [
        ("ra.yaml:8:", "spec.jwtRules[0].issuer"),
        ("ra.yaml:9:", "spec.jwtRules[0].jwksUri"),
        ("ra.yaml:10:", "spec.jwtRules[0].jwks"),
        ("ra.yaml:11:", "spec.jwtRules[0].fromHeaders[0].name"),
        (
            "ra.yaml:12:",
            "spec.jwtRules[0].outputClaimToHeaders[0].claim",
        ),
        ("ra.yaml:13:", "spec.jwtRules[0].timeout"),
        ("ra.yaml:14:", "spec.jwtRules[0].fromParam"),
    ] {
        assert!(
            errors.iter().any(|e| e.starts_with(at) && e.contains(what)),
            "{what} at {at}: {errors:#?}"
        );
    }
    assert!(
        errors
            .iter()
            .any(|e| e.contains("oct") || e.contains("none of the JWKS")),
        "the JWKS error says why: {errors:#?}"
    );
}

#[test]
fn selection_follows_authorization_policy_and_rejection_fails_closed() {
    let rsa = Key::rsa("r1");
    let yaml = format!(
        r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: on-reviews}}
spec:
  targetRefs: [{{kind: Service, name: reviews}}]
  jwtRules: [{{issuer: "{ISS}", jwks: '{keys}'}}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: by-selector}}
spec:
  selector: {{matchLabels: {{app: reviews}}}}
  jwtRules: [{{issuer: "https://other", jwks: '{keys}'}}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: bad-target, namespace: shop}}
spec:
  targetRefs: [{{kind: Deployment, group: apps, name: cart}}]
  jwtRules: [{{issuer: "{ISS}", jwks: '{keys}'}}]
"#,
        keys = jwks(&[&rsa])
    );
    let loaded = load_str("ra.yaml", &yaml, &LoadOptions::default());
    let opts = CompileOptions::default();
    // A reference Istio refuses rejects the policy while compiling (`Authn::reject`).
    let c = compile(&loaded.resources, &opts);
    let a = &c.table.authn;
    assert_eq!(a.keys(), ["default/on-reviews", "shop/bad-target"]);
    let notes: Vec<String> = c.diagnostics.iter().map(ToString::to_string).collect();
    assert!(
        notes
            .iter()
            .any(|n| n.contains("by-selector") && n.contains("spec.selector")),
        "{notes:#?}"
    );
    assert!(
        c.diagnostics
            .iter()
            .any(|d| d.path == "spec.targetRefs[0]" && matches!(d.problem, Problem::Invalid(_))),
        "{notes:#?}"
    );
    let t = rsa.sign("RS256", json!({}), &claims("erin"));
    let target = |ns, name| Target::Service {
        namespace: ns,
        name,
    };
    let check = |t: Target<'_>, h: &HeaderMap| {
        a.authenticate(t, h, "", &NoRemote, NOW)
            .map(|v| v.map(|v| v.claims.principal))
            .map_err(|r| (r.failure, r.policy.as_deref().map(str::to_owned)))
    };
    // The Service target: reviews verifies the token; productpage has no rule, so the
    // token is not looked at (and gives no principal).
    assert_eq!(
        check(target("default", "reviews"), &bearer(&t)),
        Ok(Some(format!("{ISS}/erin")))
    );
    assert_eq!(
        check(target("default", "productpage"), &bearer(&t)),
        Ok(None)
    );
    // The rejected policy in shop: a token there is refused, no token passes.
    assert_eq!(
        check(target("shop", "cart"), &bearer(&t)),
        Err((Failure::PolicyRejected, Some("shop/bad-target".into())))
    );
    assert_eq!(check(target("shop", "cart"), &HeaderMap::new()), Ok(None));
}

/// Hostile input: every one-character change to a valid token, anywhere in it (header,
/// payload, signature, the dots), is refused, and nothing panics on the way.
#[test]
fn any_changed_character_is_refused() {
    let p256 = Key::ec("e1", "P-256");
    let rules = format!("[{{issuer: \"{ISS}\", jwks: '{}'}}]", jwks(&[&p256]));
    let (a, _) = authn(&policy(&rules));
    let token = p256.sign("ES256", json!({}), &claims("alice"));
    assert!(run(&a, &bearer(&token), "").is_ok());
    let mut refused = 0;
    for (i, original) in token.char_indices() {
        for replacement in ['A', 'z', '-', '.', '_'] {
            if replacement == original {
                continue;
            }
            let mut changed = token.clone();
            changed.replace_range(i..=i, &replacement.to_string());
            let outcome = run(&a, &bearer(&changed), "");
            assert!(
                outcome.is_err(),
                "position {i}: {original:?} -> {replacement:?} was accepted"
            );
            refused += 1;
        }
    }
    assert!(refused > 4 * token.len() - 10, "{refused}");
}
