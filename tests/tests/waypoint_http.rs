//! What real HTTP clients see of a waypoint, on the whole path (curl in an enrolled pod, its
//! ztunnel, the waypoint, the routed pod): redirects, rewrites, CORS and normalized paths; and malformed or
//! smuggling requests refused with 400 before anything reaches a backend. The reviews port is
//! declared HTTP here, so bytes that are not HTTP are answered 400 rather than relayed.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use mesh_tests::waypoint::{
    REVIEWS_VIP, apps, mesh_with, routes_path, start_waypoint, write_atomic,
};

const ROUTES: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /old}}]
    redirect:
      uri: /new
      redirectCode: 301
  - match: [{uri: {prefix: /admin}}]
    directResponse:
      status: 403
      body: {string: admin is closed}
  - match: [{uri: {prefix: /api/v1}}]
    rewrite:
      uri: /v2
    route: [{destination: {host: reviews, subset: v1}}]
  - corsPolicy:
      allowOrigins:
      - exact: https://shop.example
      allowMethods: [GET, POST]
      allowHeaders: [x-custom]
      exposeHeaders: [x-exposed]
      maxAge: 24h
    route: [{destination: {host: reviews, subset: v1}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
"#;

/// `curl -i` from the `sleep` pod with extra arguments: (exit code, head and body, in
/// lowercase).
fn curl(mesh: &mesh_tests::mesh::Mesh, args: &[&str]) -> (i32, String) {
    let (code, out) = mesh_tests::waypoint::curl_i(mesh, "sleep", args);
    (code, out.to_ascii_lowercase())
}

fn labelled_mesh() -> mesh_tests::mesh::Mesh {
    mesh_with(|m| {
        m.service_labels.push((
            "reviews".to_owned(),
            "istio.io/use-waypoint".to_owned(),
            "waypoint".to_owned(),
        ));
        m.service_protocols
            .push(("reviews".to_owned(), 9080, "http".to_owned()));
    })
}

#[test]
fn curl_sees_redirects_rewrites_and_cors() {
    let mesh = labelled_mesh();
    let apps = apps(&mesh);
    let routes = routes_path(&mesh);
    write_atomic(&routes, ROUTES);
    let wp = start_waypoint(&mesh, &routes);
    let base = format!("http://{REVIEWS_VIP}:9080");

    // Redirect: answered by the waypoint, the Location keeps the request's authority.
    let (code, out) = curl(&mesh, &[&format!("{base}/old/page?q=1")]);
    assert_eq!(code, 0, "{out}\n{}", wp.log());
    assert!(out.starts_with("http/1.1 301"), "{out}");
    assert!(
        out.contains(&format!("location: http://{REVIEWS_VIP}:9080/new?q=1")),
        "{out}"
    );

    // Rewrite: the application sees the rewritten path.
    let (_, out) = curl(&mesh, &[&format!("{base}/api/v1/items")]);
    assert!(out.starts_with("http/1.1 200"), "{out}");
    assert!(out.contains("\npath /v2/items\n"), "{out}");

    // Paths are routed normalized, as Envoy does under Istio's default: dot segments (also
    // percent-encoded) cannot take the /old route to reach /admin, and the application gets
    // the normalized path.
    for path in ["/old/../admin", "/old/%2e%2e/admin/x"] {
        let (_, out) = curl(&mesh, &["--path-as-is", &format!("{base}{path}")]);
        assert!(out.starts_with("http/1.1 403"), "{path}: {out}");
        assert!(out.ends_with("admin is closed"), "{path}: {out}");
    }
    let (_, out) = curl(
        &mesh,
        &["--path-as-is", &format!("{base}/old/./../cart?q=1")],
    );
    assert!(out.starts_with("http/1.1 200"), "{out}");
    assert!(out.contains("\npath /cart?q=1\n"), "{out}");

    // CORS preflight from an allowed origin: answered by the waypoint, never forwarded.
    let before = apps[0].requests();
    let (_, out) = curl(
        &mesh,
        &[
            "-X",
            "OPTIONS",
            "-H",
            "origin: https://shop.example",
            "-H",
            "access-control-request-method: POST",
            &format!("{base}/cart"),
        ],
    );
    assert!(out.starts_with("http/1.1 200"), "{out}");
    assert!(
        out.contains("access-control-allow-origin: https://shop.example"),
        "{out}"
    );
    assert!(
        out.contains("access-control-allow-methods: get,post"),
        "{out}"
    );
    assert!(
        out.contains("access-control-allow-headers: x-custom"),
        "{out}"
    );
    assert!(out.contains("access-control-max-age: 86400"), "{out}");
    assert_eq!(
        apps[0].requests(),
        before,
        "the preflight reached the application"
    );

    // The actual request from that origin: forwarded, its answer carries the CORS headers;
    // another origin's gets none.
    let (_, out) = curl(
        &mesh,
        &[
            "-H",
            "origin: https://shop.example",
            &format!("{base}/cart"),
        ],
    );
    assert!(out.contains("server reviews-v1"), "{out}");
    assert!(
        out.contains("access-control-allow-origin: https://shop.example"),
        "{out}"
    );
    assert!(
        out.contains("access-control-expose-headers: x-exposed"),
        "{out}"
    );
    let (_, out) = curl(
        &mesh,
        &[
            "-H",
            "origin: https://evil.example",
            &format!("{base}/cart"),
        ],
    );
    assert!(out.contains("server reviews-v1"), "{out}");
    assert!(!out.contains("access-control-allow-origin"), "{out}");
}

/// Sends raw bytes from the `sleep` pod to the reviews VIP (captured, carried to the
/// waypoint) and returns what came back before the connection closed.
fn raw(mesh: &mesh_tests::mesh::Mesh, request: &'static [u8]) -> String {
    let addr = SocketAddr::from((REVIEWS_VIP, 9080));
    mesh_tests::netns::in_netns(&mesh.netns("sleep"), move || {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(request)?;
        let mut out = Vec::new();
        // The waypoint answers and closes; a reset after the answer is fine.
        let _ = s.read_to_end(&mut out);
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&out).into_owned())
    })
    .expect("netns")
    .expect("connect")
}

#[test]
fn malformed_requests_get_400_and_smuggling_reaches_no_backend() {
    let mesh = labelled_mesh();
    let apps = apps(&mesh);
    let routes = routes_path(&mesh);
    write_atomic(&routes, ROUTES);
    let _wp = start_waypoint(&mesh, &routes);
    let served = || apps.iter().map(|a| a.requests()).sum::<u64>();

    // Content-Length and Transfer-Encoding together (the classic smuggling vector): refused
    // with 400 before the HTTP parser reads the request, as Envoy refuses it, and the
    // connection closes, so neither it nor the request hidden behind it is forwarded. A
    // good request before it on the same connection is answered first.
    let got = raw(
        &mesh,
        b"GET /cart HTTP/1.1\r\nHost: reviews\r\n\r\nPOST /cart HTTP/1.1\r\nHost: reviews\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: reviews\r\n\r\n",
    );
    let statuses: Vec<&str> = got.lines().filter(|l| l.starts_with("HTTP/1.1 ")).collect();
    assert_eq!(statuses.len(), 2, "{got:?}");
    assert!(statuses[0].starts_with("HTTP/1.1 200"), "{got:?}");
    assert!(statuses[1].starts_with("HTTP/1.1 400"), "{got:?}");
    assert!(!got.contains("/smuggled"), "{got:?}");
    assert_eq!(served(), 1, "only the good request reached a backend");
    let refused = |reason: &str| {
        mesh_tests::waypoint::metric(
            &mesh,
            "waypoint_refused_requests_total",
            &[&format!("reason=\"{reason}\"")],
        )
    };
    assert_eq!(refused("content_length_and_transfer_encoding"), 1.0);
    let served_before = served();
    let served = || served() - served_before;

    let cases: [(&str, &'static [u8]); 5] = [
        (
            "two different Content-Lengths",
            b"POST /cart HTTP/1.1\r\nHost: reviews\r\nContent-Length: 4\r\nContent-Length: 6\r\n\r\nabcdef",
        ),
        (
            "a header line without a colon",
            b"GET /cart HTTP/1.1\r\nHost: reviews\r\nthis is not a header\r\n\r\n",
        ),
        ("not HTTP at all", b"\x16\x03\x01\x02\x00 hello\r\n\r\n"),
        (
            "an invalid chunk size",
            b"POST /cart HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        ),
        (
            "Transfer-Encoding not ending in chunked",
            b"POST /cart HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked, gzip\r\n\r\nabc",
        ),
    ];
    for (what, bytes) in cases {
        let got = raw(&mesh, bytes);
        assert!(got.starts_with("HTTP/1.1 400"), "{what}: {got:?}");
        assert_eq!(served(), 0, "{what}: a backend saw a request");
    }
    // The invalid chunk size arrived with its head, so the guard refused it (counted); the
    // other cases were refused by the HTTP parser itself.
    assert_eq!(refused("bad_chunk_size"), 1.0);
    assert_eq!(refused("content_length_and_transfer_encoding"), 1.0);
    // A head past the waypoint's limit of 60 KiB (Envoy's default).
    let head = |value_len: usize| -> &'static [u8] {
        Box::leak(
            format!(
                "GET /cart HTTP/1.1\r\nHost: reviews\r\nx-big: {}\r\nConnection: close\r\n\r\n",
                "a".repeat(value_len)
            )
            .into_bytes()
            .into_boxed_slice(),
        )
    };
    let got = raw(&mesh, head(80 * 1024));
    assert!(
        got.starts_with("HTTP/1.1 431"),
        "oversized headers: {got:?}"
    );
    assert_eq!(served(), 0);
    // And a well-formed request on a new connection still works, with a large head too.
    let got = raw(
        &mesh,
        b"GET /cart HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n\r\n",
    );
    assert!(got.starts_with("HTTP/1.1 200"), "{got:?}");
    assert_eq!(served(), 1);
    let got = raw(&mesh, head(48 * 1024));
    assert!(got.starts_with("HTTP/1.1 200"), "a 48 KiB head: {got:?}");
    assert_eq!(served(), 2);
}
