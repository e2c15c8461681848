//! RequestAuthentication at a real waypoint, with curl in enrolled pods and tokens signed
//! by test issuers (`mesh_tests::jwt`): no token passes without a principal, a valid token
//! gives the principal and claims AuthorizationPolicy reads, an invalid one or one of an
//! issuer nobody configured gets Envoy's 401 (gRPC: UNAUTHENTICATED); the token header is removed unless
//! `forwardOriginalToken`, and claims are copied to headers. Keys come inline, or from a
//! `jwksUri` served by a small HTTP server on a host outside the mesh; while that server is
//! not there its issuer's tokens are refused (fail closed), and once it is they pass. The
//! same from the Kubernetes API, where a refused RequestAuthentication fails closed.
//! Harness: `mesh_tests::waypoint`, `mesh_tests::kube_api`.

use std::net::SocketAddr;
use std::time::Duration;

use mesh_tests::http_app::Version;
use mesh_tests::jwt::{Issuer, JwksServer, jwks_url};
use mesh_tests::kube_api::harness::{start_api, until, waypoint_mesh};
use mesh_tests::kube_api::{kubeconfig_path, start_waypoint_kube};
use mesh_tests::process::wait_until;
use mesh_tests::waypoint::{
    RATINGS_VIP, REVIEWS_VIP, apps, curl_status as status, labelled_mesh, metric, routes_path,
    start_waypoint, through_waypoint, write_atomic,
};
use serde_json::json;

const IDP: &str = "https://idp.example.com";
const LATE: &str = "https://late.example.com";
const INLINE: &str = "https://inline.example.com";

/// The Gateway-wide rules (two jwksUri issuers) and ratings' own (an inline key that keeps
/// the token); reviews allows alice, or anyone of IDP in group admins.
fn policies(idp_uri: &str, late_uri: &str, inline: &Issuer) -> String {
    format!(
        r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: idp, namespace: default}}
spec:
  targetRefs:
  - {{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}
  jwtRules:
  - issuer: {IDP}
    jwksUri: {idp_uri}
    audiences: [bookinfo]
    outputClaimToHeaders:
    - {{header: x-jwt-sub, claim: sub}}
  - issuer: {LATE}
    jwksUri: {late_uri}
    timeout: 1s
---
apiVersion: security.istio.io/v1beta1
kind: RequestAuthentication
metadata: {{name: ratings-inline, namespace: default}}
spec:
  targetRefs:
  - {{kind: Service, group: "", name: ratings}}
  jwtRules:
  - issuer: {INLINE}
    jwks: '{jwks}'
    forwardOriginalToken: true
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: reviews-jwt, namespace: default}}
spec:
  targetRefs:
  - {{kind: Service, group: "", name: reviews}}
  rules:
  - from: [{{source: {{requestPrincipals: ["{IDP}/alice"]}}}}]
  - from: [{{source: {{requestPrincipals: ["{IDP}/*"]}}}}]
    when:
    - {{key: "request.auth.claims[groups]", values: ["admins"]}}
"#,
        jwks = inline.jwks()
    )
}

fn bearer(token: &str) -> String {
    format!("authorization: Bearer {token}")
}

#[test]
fn tokens_give_principals_and_invalid_ones_get_401() {
    let mut mesh = labelled_mesh();
    let _apps = apps(&mesh);
    let idp_host = mesh.topo.add_outside_host("idp").expect("IdP host");
    let idp = Issuer::new(IDP, "idp-1");
    let late = Issuer::new(LATE, "late-1");
    let inline = Issuer::new(INLINE, "inline-1");
    let served = JwksServer::start(
        &idp_host.netns,
        SocketAddr::from((idp_host.ip, 8080)),
        idp.jwks(),
    )
    .expect("JWKS server");
    // Nothing listens there yet: LATE's keys cannot be fetched at start.
    let late_addr = SocketAddr::from((idp_host.ip, 8081));
    let routes = routes_path(&mesh);
    write_atomic(
        &routes,
        &policies(&served.url, &jwks_url(late_addr), &inline),
    );
    let wp = start_waypoint(&mesh, &routes);
    wait_until(Duration::from_secs(15), || {
        metric(&mesh, "waypoint_jwks_fetches_total", &["result=\"ok\""]) >= 1.0
    })
    .unwrap_or_else(|_| panic!("the IdP's JWKS was not fetched:\n{}", wp.log()));
    assert!(served.requests() >= 1);
    let reviews = format!("http://{REVIEWS_VIP}:9080/reviews/1");
    let ratings = format!("http://{RATINGS_VIP}:9080/ratings/1");
    let alice = idp.token("alice", json!({"aud": "bookinfo"}));

    // No token: ratings (no ALLOW policy) answers; reviews needs a principal.
    let (s, out) = status(&mesh, "sleep", &[&ratings]);
    assert_eq!(s, 200, "{out}\n{}", wp.log());
    let (s, out) = status(&mesh, "sleep", &[&reviews]);
    assert_eq!(s, 403, "{out}");

    // alice's token: allowed by principal; the token is removed by default and the claim
    // copied to the header the rule names.
    let (s, out) = status(&mesh, "sleep", &["-H", &bearer(&alice), &reviews]);
    assert_eq!(s, 200, "{out}\n{}", wp.log());
    assert!(out.contains("server reviews-v"), "{out}");
    assert!(!out.contains("header authorization:"), "{out}");
    assert!(out.contains("header x-jwt-sub: alice"), "{out}");
    // A client's own x-jwt-sub is dropped: only a verified token sets it.
    let (s, out) = status(&mesh, "sleep", &["-H", "x-jwt-sub: alice", &ratings]);
    assert_eq!(s, 200);
    assert!(!out.contains("header x-jwt-sub:"), "{out}");
    // The same token as the access_token query parameter.
    let (s, _) = status(
        &mesh,
        "sleep",
        &[&format!("{reviews}?access_token={alice}")],
    );
    assert_eq!(s, 200);

    // bob: a valid token, but only the claims condition can allow him.
    let bob = idp.token("bob", json!({"aud": "bookinfo", "groups": ["dev"]}));
    let (s, _) = status(&mesh, "sleep", &["-H", &bearer(&bob), &reviews]);
    assert_eq!(s, 403, "bob is not in admins");
    let bob = idp.token(
        "bob",
        json!({"aud": "bookinfo", "groups": ["dev", "admins"]}),
    );
    let (s, _) = status(&mesh, "sleep", &["-H", &bearer(&bob), &reviews]);
    assert_eq!(s, 200, "bob is in admins");

    // Invalid tokens: Envoy's 401, body and www-authenticate, whatever the service.
    let forged = Issuer::new(IDP, "idp-1").token("alice", json!({"aud": "bookinfo"}));
    let expired = idp.token("alice", json!({"aud": "bookinfo", "exp": 1_000_000_000}));
    let stranger = Issuer::new("https://stranger.example.com", "s").token("alice", json!({}));
    for (token, body, url) in [
        (forged.as_str(), "Jwt verification fails", &reviews),
        (expired.as_str(), "Jwt is expired", &ratings),
        (stranger.as_str(), "Jwt issuer is not configured", &reviews),
        (
            "not-a-jwt",
            "Jwt is not in the form of Header.Payload.Signature",
            &ratings,
        ),
    ] {
        let (s, out) = status(&mesh, "sleep", &["-H", &bearer(token), url]);
        assert_eq!(s, 401, "{body}: {out}");
        assert!(out.ends_with(&format!("\r\n\r\n{body}")), "{out:?}");
        let path = url.split_once(":9080").map_or("", |(_, p)| p);
        let host = url
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or("");
        assert!(
            out.to_ascii_lowercase().contains(&format!(
                "www-authenticate: bearer realm=\"http://{host}{path}\", error=\"invalid_token\"\r\n"
            )),
            "{out}"
        );
    }
    // gRPC is answered as Envoy answers it: HTTP 200, grpc-status 16 UNAUTHENTICATED.
    let (s, out) = status(
        &mesh,
        "sleep",
        &[
            "--http2-prior-knowledge",
            "-X",
            "POST",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "-H",
            &bearer(&forged),
            "--data-binary",
            "",
            &format!("http://{REVIEWS_VIP}:9080/reviews.Reviews/Get"),
        ],
    );
    assert_eq!(s, 200, "{out}");
    let lower = out.to_ascii_lowercase();
    assert!(lower.contains("grpc-status: 16\r\n"), "{out}");
    assert!(
        lower.contains("grpc-message: jwt verification fails"),
        "{out}"
    );

    // The realm is the URI as sent, query included (as Envoy writes it).
    let (s, out) = status(
        &mesh,
        "sleep",
        &["-H", &bearer(&forged), &format!("{ratings}?page=2")],
    );
    assert_eq!(s, 401, "{out}");
    assert!(
        out.to_ascii_lowercase().contains(&format!(
            "www-authenticate: bearer realm=\"{ratings}?page=2\", error=\"invalid_token\"\r\n"
        )),
        "{out}"
    );

    // A wrong audience: Envoy answers 403.
    let other_aud = idp.token("alice", json!({"aud": "other"}));
    let (s, out) = status(&mesh, "sleep", &["-H", &bearer(&other_aud), &ratings]);
    assert_eq!(s, 403, "{out}");
    assert!(out.ends_with("Audiences in Jwt are not allowed"), "{out}");

    // ratings' own rule keeps the token (forwardOriginalToken).
    let t = inline.token("carol", json!({}));
    let (s, out) = status(&mesh, "sleep", &["-H", &bearer(&t), &ratings]);
    assert_eq!(s, 200, "{out}");
    assert!(
        out.contains(&format!("header authorization: Bearer {t}")),
        "{out}"
    );
    // ...and applies to ratings only: on reviews that issuer is not configured.
    let (s, out) = status(&mesh, "sleep", &["-H", &bearer(&t), &reviews]);
    assert_eq!(s, 401, "{out}");

    // LATE's keys could not be fetched: its tokens are refused (fail closed), logged.
    let late_token = late.token("dave", json!({}));
    let (s, out) = status(&mesh, "sleep", &["-H", &bearer(&late_token), &ratings]);
    assert_eq!(s, 401, "{out}");
    assert!(out.ends_with("Jwks remote fetch is failed"), "{out}");
    assert!(
        wp.log().contains("JWKS fetch failed"),
        "the failed fetch is logged:\n{}",
        wp.log()
    );
    assert!(metric(&mesh, "waypoint_jwks_fetches_total", &["result=\"error\""]) >= 1.0);
    // Its server comes up: the next fetch succeeds, and the token passes.
    let _late_server =
        JwksServer::start(&idp_host.netns, late_addr, late.jwks()).expect("late JWKS server");
    wait_until(Duration::from_secs(40), || {
        status(&mesh, "sleep", &["-H", &bearer(&late_token), &ratings]).0 == 200
    })
    .unwrap_or_else(|_| panic!("LATE's keys were never fetched:\n{}", wp.log()));

    // `/config_dump` lists the RequestAuthentications in force.
    let (code, dump) = mesh_tests::mesh::http_get(
        &mesh.netns("wp"),
        "127.0.0.1:15000".parse().expect("addr"),
        "/config_dump",
    )
    .expect("config_dump");
    assert_eq!(code, 200);
    let dump: serde_json::Value = serde_json::from_str(&dump).expect("JSON");
    assert_eq!(
        dump["routes"]["request_authentications"],
        json!(["default/idp", "default/ratings-inline"]),
        "{dump}"
    );

    // Counted by reason, and as 401s in Istio's request metric.
    let refused = |reason: &str| {
        metric(
            &mesh,
            "waypoint_jwt_refused_total",
            &[&format!("reason=\"{reason}\"")],
        )
    };
    assert_eq!(
        refused("bad_signature"),
        3.0,
        "forged: twice over HTTP/1.1, once over gRPC"
    );
    assert_eq!(refused("expired"), 1.0);
    assert_eq!(refused("unknown_issuer"), 2.0);
    assert_eq!(refused("malformed"), 1.0);
    assert_eq!(refused("audience"), 1.0);
    assert!(refused("jwks_unavailable") >= 1.0);
    assert!(
        metric(
            &mesh,
            "istio_requests_total",
            &["response_code=\"401\"", "response_flags=\"-\""]
        ) >= 6.0
    );
}

/// From the Kubernetes API (`--kube`): a RequestAuthentication with an inline key is
/// watched and applied; a refused one (a jwksUri that is not http) fails closed: requests
/// carrying a token are refused, those without still pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_authentication_from_the_kubernetes_api_and_a_refused_one_fails_closed() {
    let mesh = waypoint_mesh();
    let _apps = apps(&mesh);
    let issuer = Issuer::new(IDP, "k1");
    let ra = format!(
        r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: default}}
spec:
  targetRefs: [{{kind: Service, group: "", name: ratings}}]
  jwtRules: [{{issuer: "{IDP}", jwks: '{}'}}]
"#,
        issuer.jwks()
    );
    let api = start_api(&mesh, &ra).await;
    let wp = start_waypoint_kube(&mesh, &kubeconfig_path(&mesh), &[]);
    let conn = through_waypoint(&mesh, RATINGS_VIP, Version::Http2).await;
    let good = format!("Bearer {}", issuer.token("erin", json!({})));
    let forged = format!("Bearer {}", Issuer::new(IDP, "k1").token("erin", json!({})));
    let status = |auth: Option<String>| {
        let conn = &conn;
        async move {
            let headers: Vec<(&str, &str)> = auth
                .as_deref()
                .map(|a| vec![("authorization", a)])
                .unwrap_or_default();
            conn.send("GET", "ratings:9080", "/", &headers, bytes::Bytes::new())
                .await
                .expect("request")
                .status
        }
    };
    assert!(
        until(Duration::from_secs(10), || async {
            status(Some(forged.clone())).await == 401
        })
        .await,
        "the RequestAuthentication was not applied:\n{}",
        wp.log()
    );
    assert_eq!(status(Some(good.clone())).await, 200);
    assert_eq!(status(None).await, 200);

    // Refused: the valid token is refused too now, in the name of the refused policy;
    // a request without a token still passes.
    api.apply_yaml(&ra.replace(
        &format!("jwks: '{}'", issuer.jwks()),
        "jwksUri: \"ftp://keys.example.com/jwks\"",
    ))
    .expect("apply");
    assert!(
        until(Duration::from_secs(10), || async {
            status(Some(good.clone())).await == 401
        })
        .await,
        "the refused RequestAuthentication did not fail closed:\n{}",
        wp.log()
    );
    assert_eq!(status(None).await, 200);
    let log = wp.log();
    assert!(
        log.contains("spec.jwtRules[0].jwksUri") && log.contains("http or https"),
        "{log}"
    );
    assert!(
        metric(
            &mesh,
            "waypoint_jwt_refused_total",
            &["reason=\"policy_rejected\""]
        ) >= 1.0
    );
}
