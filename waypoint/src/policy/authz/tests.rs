use std::net::IpAddr;

use http::HeaderMap;
use serde_json::json;
use ztunnel::identity::Identity;

use super::*;
use crate::config::{LoadOptions, Problem, load_str};
use crate::route::{CompileOptions, compile};

/// Compiles `yaml` (which must load without errors) for the waypoint `waypoint` in `default`.
fn authz(yaml: &str) -> (Authz, Vec<String>) {
    let loaded = load_str("p.yaml", yaml, &LoadOptions::default());
    assert!(!loaded.has_errors(), "{:#?}", loaded.diagnostics);
    let c = compile(&loaded.resources, &CompileOptions::default());
    let notes = loaded
        .diagnostics
        .iter()
        .chain(&c.diagnostics)
        .map(ToString::to_string)
        .collect();
    (c.table.authz, notes)
}

struct Req {
    peer: Identity,
    principal: String,
    source_ip: IpAddr,
    method: &'static str,
    host: &'static str,
    path: &'static str,
    headers: HeaderMap,
    port: u16,
    http: bool,
    auth: Option<crate::policy::jwt::Claims>,
}

fn req(sa: &str, method: &'static str, path: &'static str) -> Req {
    let peer = Identity::new("cluster.local", "default", sa).expect("identity");
    Req {
        principal: peer.principal(),
        peer,
        source_ip: "10.0.0.5".parse().expect("ip"),
        method,
        host: "productpage:9080",
        path,
        headers: HeaderMap::new(),
        port: 9080,
        http: true,
        auth: None,
    }
}

impl Req {
    fn in_namespace(mut self, ns: &str) -> Req {
        self.peer = Identity::new("cluster.local", ns, self.peer.service_account()).expect("id");
        self.principal = self.peer.principal();
        self
    }
    fn header(mut self, name: &'static str, value: &'static str) -> Req {
        self.headers
            .append(name, http::HeaderValue::from_static(value));
        self
    }
    /// With a verified token of `iss`/`sub` whose payload is `payload`.
    fn token(mut self, iss: &str, sub: &str, payload: serde_json::Value) -> Req {
        let payload = match payload {
            serde_json::Value::Object(m) => m,
            _ => serde_json::Map::new(),
        };
        let s = |k: &str| payload.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        self.auth = Some(crate::policy::jwt::Claims {
            principal: format!("{iss}/{sub}"),
            audiences: s("aud").into_iter().collect(),
            presenter: s("azp"),
            payload,
        });
        self
    }
    fn bytes_only(mut self) -> Req {
        self.http = false;
        self
    }
    fn decide(&self, authz: &Authz, service: &str) -> Verdict {
        let a = Attributes {
            peer: &self.peer,
            principal: &self.principal,
            source_ip: self.source_ip,
            destination_ip: "198.18.100.1".parse().expect("ip"),
            destination_port: self.port,
            auth: self.auth.as_ref(),
            http: self.http.then_some(HttpAttributes {
                method: self.method,
                host: self.host,
                path: self.path,
                headers: &self.headers,
            }),
        };
        let target = Target::Service {
            namespace: "default",
            name: service,
        };
        authz.decide(target, &a)
    }
}

fn denied_by(v: &Verdict) -> Option<(&str, DenyReason)> {
    match v {
        Verdict::Allow => None,
        Verdict::Deny { policy, reason } => Some((policy.as_deref().unwrap_or("-"), *reason)),
    }
}

/// Istio's ambient Bookinfo tutorial: productpage's waypoint allows GET from sleep only.
const BOOKINFO: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: productpage-viewer
  namespace: default
spec:
  targetRefs:
  - kind: Service
    group: ""
    name: productpage
  action: ALLOW
  rules:
  - from:
    - source:
        principals:
        - cluster.local/ns/default/sa/sleep
    to:
    - operation:
        methods: ["GET"]
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: no-admin
spec:
  targetRefs:
  - {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/admin*", "*.secret"]
"#;

#[test]
fn bookinfo_tutorial_allow_and_deny() {
    let (a, _) = authz(BOOKINFO);
    assert_eq!(a.keys(), ["default/no-admin", "default/productpage-viewer"]);
    assert!(
        req("sleep", "GET", "/productpage")
            .decide(&a, "productpage")
            .is_allow()
    );
    assert_eq!(
        denied_by(&req("sleep", "POST", "/productpage").decide(&a, "productpage")),
        Some(("-", DenyReason::NoAllowMatched))
    );
    assert_eq!(
        denied_by(&req("notsleep", "GET", "/productpage").decide(&a, "productpage")),
        Some(("-", DenyReason::NoAllowMatched))
    );
    // DENY comes first, and the Gateway-wide policy covers every service.
    for (service, path) in [("productpage", "/admin/x"), ("reviews", "/a/b.secret")] {
        assert_eq!(
            denied_by(&req("sleep", "GET", path).decide(&a, service)),
            Some(("default/no-admin", DenyReason::DenyMatched)),
            "{service} {path}"
        );
    }
    // Another service has no ALLOW policy: allowed unless denied.
    assert!(req("anyone", "POST", "/x").decide(&a, "reviews").is_allow());
}

#[test]
fn what_does_not_apply_here_is_reported() {
    let (a, notes) = authz(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: by-selector}
spec:
  selector: {matchLabels: {app: productpage}}
  action: DENY
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: namespace-wide}
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: other-waypoint}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: other}]
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: AUDIT
  rules: [{}]
"#,
    );
    assert!(a.is_empty(), "{a:?}");
    let want = [
        (
            "by-selector",
            "spec.selector",
            "does not apply at a waypoint",
        ),
        ("namespace-wide", "spec", "enforced by ztunnel"),
        ("other-waypoint", "spec.targetRefs[0]", "not this waypoint"),
        ("audit", "spec.action", "AUDIT"),
    ];
    for (name, path, text) in want {
        assert!(
            notes
                .iter()
                .any(|n| n.contains(&format!("default/{name}, {path}:")) && n.contains(text)),
            "{name}: {notes:#?}"
        );
    }
}

#[test]
fn custom_fails_closed_for_what_it_selects() {
    let (a, notes) = authz(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-authz}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: CUSTOM
  provider: {name: oauth2-proxy}
  rules: [{to: [{operation: {paths: ["/private/*"]}}]}]
"#,
    );
    assert!(notes.iter().any(|n| n.contains("CUSTOM")), "{notes:#?}");
    assert_eq!(
        denied_by(&req("sleep", "GET", "/private/x").decide(&a, "productpage")),
        Some(("default/ext-authz", DenyReason::CustomNotImplemented))
    );
    assert!(
        req("sleep", "GET", "/public")
            .decide(&a, "productpage")
            .is_allow()
    );
    // Relayed bytes: the path is unseen, so the CUSTOM policy selects the tunnel.
    assert!(
        !req("sleep", "GET", "/public")
            .bytes_only()
            .decide(&a, "productpage")
            .is_allow()
    );
}

const FIELDS: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow}
spec:
  targetRefs: [{kind: Service, name: productpage}]
  rules:
  - from: [{source: {namespaces: ["default"], notPrincipals: ["*/sa/blocked"], ipBlocks: ["10.0.0.0/24"]}}]
    to: [{operation: {hosts: ["PRODUCTPAGE:9080"], ports: ["9080"], notMethods: ["DELETE"], notPaths: ["/internal*"]}}]
    when:
    - {key: "request.headers[x-team]", values: ["blue", "gr*"]}
    - {key: "request.headers[x-debug]", notValues: ["*"]}
    - {key: source.ip, values: ["10.0.0.5"]}
    - {key: destination.port, values: ["9080"]}
  - from: [{source: {requestPrincipals: ["*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-jwt}
spec:
  targetRefs: [{kind: Service, name: reviews}]
  action: DENY
  rules:
  - when: [{key: "request.auth.claims[groups]", values: ["admin"]}]
"#;

#[test]
fn every_field_of_a_rule_must_hold() {
    let (a, notes) = authz(FIELDS);
    let ok = || req("sleep", "GET", "/p").header("x-team", "green");
    assert!(ok().decide(&a, "productpage").is_allow());
    let denied = [
        ("no header", req("sleep", "GET", "/p")),
        (
            "header value",
            req("sleep", "GET", "/p").header("x-team", "red"),
        ),
        ("notValues", ok().header("x-debug", "1")),
        (
            "notPrincipals",
            req("blocked", "GET", "/p").header("x-team", "blue"),
        ),
        ("namespaces", ok().in_namespace("other")),
        (
            "notMethods",
            Req {
                method: "DELETE",
                ..ok()
            },
        ),
        (
            "notPaths",
            Req {
                path: "/internal/x",
                ..ok()
            },
        ),
        (
            "hosts",
            Req {
                host: "productpage",
                ..ok()
            },
        ),
        ("ports", Req { port: 9081, ..ok() }),
        (
            "ipBlocks",
            Req {
                source_ip: "10.0.1.5".parse().expect("ip"),
                ..ok()
            },
        ),
        // A tunnel of bytes shows no method, host, path, header or token.
        ("bytes", ok().bytes_only()),
        (
            "bytes with a token",
            req("x", "GET", "/p")
                .token("iss", "me", json!({}))
                .bytes_only(),
        ),
    ];
    for (what, r) in denied {
        assert_eq!(
            denied_by(&r.decide(&a, "productpage")),
            Some(("-", DenyReason::NoAllowMatched)),
            "{what}"
        );
    }
    // Hosts compare without case; the header condition's prefix matches.
    assert!(
        Req {
            host: "ProductPage:9080",
            ..ok()
        }
        .decide(&a, "productpage")
        .is_allow()
    );
    // requestPrincipals ["*"]: any verified token, from anyone, is allowed; none is not.
    let jwt = req("blocked", "POST", "/x").in_namespace("other");
    assert!(
        !jwt.decide(&a, "productpage").is_allow(),
        "no token, no principal"
    );
    let jwt = jwt.token("https://issuer", "alice", json!({}));
    assert!(jwt.decide(&a, "productpage").is_allow());
    // The claims condition of the DENY policy: only a token with group admin is denied.
    assert!(req("sleep", "GET", "/").decide(&a, "reviews").is_allow());
    let groups =
        |g: serde_json::Value| req("sleep", "GET", "/").token("iss", "bob", json!({"groups": g}));
    assert!(groups(json!(["dev"])).decide(&a, "reviews").is_allow());
    assert!(groups(json!("dev")).decide(&a, "reviews").is_allow());
    for admin in [json!(["dev", "admin"]), json!("admin")] {
        assert_eq!(
            denied_by(&groups(admin).decide(&a, "reviews")),
            Some(("default/deny-jwt", DenyReason::DenyMatched))
        );
    }
    // Relayed bytes cannot show a claim: the DENY holds (fail closed).
    assert!(
        !req("sleep", "GET", "/")
            .bytes_only()
            .decide(&a, "reviews")
            .is_allow()
    );
    // Nothing about JWT fields is reported as not implemented any more.
    assert!(
        !notes
            .iter()
            .any(|n| n.contains("request.auth") || n.contains("requestPrincipals")),
        "{notes:#?}"
    );
}

const JWT_KEYS: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: jwt}
spec:
  targetRefs: [{kind: Service, name: productpage}]
  rules:
  - from: [{source: {requestPrincipals: ["https://accounts.example.com/*"], notRequestPrincipals: ["*/mallory"]}}]
    when:
    - {key: request.auth.audiences, values: ["bookinfo"]}
    - {key: request.auth.presenter, values: ["web-*"]}
    - {key: request.auth.principal, notValues: ["*/eve"]}
    - {key: "request.auth.claims[org][team]", values: ["books"]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-anonymous}
spec:
  targetRefs: [{kind: Service, name: reviews}]
  action: DENY
  rules:
  - from: [{source: {notRequestPrincipals: ["*"]}}]
"#;

#[test]
fn jwt_keys_read_the_verified_token() {
    let (a, _) = authz(JWT_KEYS);
    let iss = "https://accounts.example.com";
    let claims =
        |sub: &str, payload: serde_json::Value| req("sleep", "GET", "/").token(iss, sub, payload);
    let good = json!({"aud": "bookinfo", "azp": "web-app", "org": {"team": "books"}});
    assert!(
        claims("alice", good.clone())
            .decide(&a, "productpage")
            .is_allow()
    );
    let refused = [
        ("no token", req("sleep", "GET", "/")),
        (
            "other issuer",
            req("sleep", "GET", "/").token("https://other", "alice", good.clone()),
        ),
        ("notRequestPrincipals", claims("mallory", good.clone())),
        ("principal notValues", claims("eve", good.clone())),
        (
            "audience",
            claims(
                "alice",
                json!({"aud": "other", "azp": "web-app", "org": {"team": "books"}}),
            ),
        ),
        (
            "presenter",
            claims(
                "alice",
                json!({"aud": "bookinfo", "azp": "cli", "org": {"team": "books"}}),
            ),
        ),
        (
            "nested claim",
            claims(
                "alice",
                json!({"aud": "bookinfo", "azp": "web-app", "org": {"team": "toys"}}),
            ),
        ),
        (
            "nested claim absent",
            claims(
                "alice",
                json!({"aud": "bookinfo", "azp": "web-app", "team": "books"}),
            ),
        ),
    ];
    for (what, r) in refused {
        assert!(!r.decide(&a, "productpage").is_allow(), "{what}");
    }
    // DENY notRequestPrincipals ["*"]: requests without a verified token are denied.
    assert!(!req("sleep", "GET", "/").decide(&a, "reviews").is_allow());
    assert!(claims("alice", json!({})).decide(&a, "reviews").is_allow());
}

#[test]
fn bad_policies_name_the_field_and_fail_closed() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bad, namespace: shop}
spec:
  targetRefs: [{kind: Service, name: cart}]
  rules:
  - from: [{source: {ipBlocks: ["10.0.0.0/8", "10.0.0.300"]}}]
    to: [{operation: {paths: ["/a/*/b"], ports: ["http"]}}]
    when: [{key: "request.header[x]", values: [a]}, {key: source.ip}]
  - from: []
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bad-target, namespace: shop}
spec:
  targetRefs: [{kind: Deployment, group: apps, name: cart}]
"#;
    let loaded = load_str("p.yaml", yaml, &LoadOptions::default());
    let errors: Vec<&str> = loaded.errors().map(|d| d.path.as_str()).collect();
    assert_eq!(
        errors,
        [
            "spec.rules[0].from[0].source.ipBlocks[1]",
            "spec.rules[0].to[0].operation.paths[0]",
            "spec.rules[0].to[0].operation.ports[0]",
            "spec.rules[0].when[0].key",
            "spec.rules[0].when[1].values",
            "spec.rules[1].from",
        ]
    );
    assert!(
        loaded
            .errors()
            .next()
            .is_some_and(|d| d.to_string().starts_with("p.yaml:8:"))
    );
    let opts = CompileOptions::default();
    let mut c = compile(&loaded.resources, &opts);
    assert!(
        c.diagnostics
            .iter()
            .any(|d| d.path == "spec.targetRefs[0]" && matches!(d.problem, Problem::Invalid(_))),
        "{:#?}",
        c.diagnostics
    );
    c.table.authz.reject_all(&loaded.rejected, &opts);
    let cart = |r: Req, ns: &str| {
        let a = Attributes {
            peer: &r.peer,
            principal: &r.principal,
            source_ip: r.source_ip,
            destination_ip: "198.18.0.1".parse().expect("ip"),
            destination_port: 80,
            http: None,
            auth: None,
        };
        c.table.authz.decide(
            Target::Service {
                namespace: ns,
                name: "cart",
            },
            &a,
        )
    };
    // Both rejected policies close their namespace's services, and nothing else.
    assert_eq!(
        denied_by(&cart(req("sleep", "GET", "/"), "shop")),
        Some(("shop/bad-target", DenyReason::PolicyRejected))
    );
    assert!(cart(req("sleep", "GET", "/"), "default").is_allow());
    assert_eq!(c.table.authz.keys(), ["shop/bad", "shop/bad-target"]);
    // In the waypoint's own namespace a rejected policy closes everything.
    let mut own = Authz::default();
    own.reject("default", "x", &opts);
    let r = req("sleep", "GET", "/");
    assert!(!r.decide(&own, "anything").is_allow());
}

/// The reference for Istio's path forms, written independently: a regex per form.
fn reference(pattern: &str, path: &str) -> bool {
    let re = if pattern == "*" {
        ".+".to_owned()
    } else if let Some(s) = pattern.strip_prefix('*') {
        format!(".*{}", regex::escape(s))
    } else if let Some(p) = pattern.strip_suffix('*') {
        format!("{}.*", regex::escape(p))
    } else {
        regex::escape(pattern)
    };
    regex::Regex::new(&format!("^(?s:{re})$"))
        .expect("regex")
        .is_match(path)
}

#[test]
fn path_matching_agrees_with_the_reference_on_random_paths() {
    use rand::{Rng, SeedableRng};
    // Short strings over a small alphabet, so that prefixes and suffixes often coincide.
    const ALPHABET: &[u8] = b"/ab.*";
    let seed = rand::random::<u64>();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let word = |rng: &mut rand::rngs::StdRng, max: usize| -> String {
        let n = rng.random_range(0..=max);
        (0..n)
            .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
            .collect()
    };
    let mut checked = 0;
    for _ in 0..20_000 {
        let core = word(&mut rng, 4).replace('*', "");
        let pattern = match rng.random_range(0..4) {
            0 => core,
            1 => format!("{core}*"),
            2 => format!("*{core}"),
            _ => "*".to_owned(),
        };
        let path = word(&mut rng, 6).replace('*', "");
        let m = ztunnel::state::policy::StringMatch::from_istio(&pattern);
        assert_eq!(
            m.matches(&path),
            reference(&pattern, &path),
            "pattern {pattern:?} path {path:?} (seed {seed})"
        );
        checked += 1;
    }
    assert_eq!(checked, 20_000);
}
