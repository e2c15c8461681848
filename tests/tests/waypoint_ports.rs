//! The waypoint's ports by protocol: a port declared as not HTTP is relayed as bytes; a port
//! that declares nothing is read as HTTP when the client's first bytes are HTTP, and relayed
//! as bytes otherwise (Istio's protocol detection), with a detection timeout for protocols
//! where the server speaks first.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use mesh_tests::netns::in_netns;
use mesh_tests::traffic::AppServer;
use mesh_tests::waypoint::{
    DETAILS_VIP, mesh, mesh_with, routes_path, start_waypoint, start_waypoint_args,
    tunnel_to_waypoint, write_atomic,
};

/// A route for details that marks its answers, so a test can tell L7 handling from a relay.
const DETAILS_ROUTE: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: details
spec:
  hosts:
  - details
  http:
  - route:
    - destination:
        host: details
    headers:
      response:
        set:
          x-routed-by: waypoint
"#;

/// Writes `sent`, half-closes, and reads everything that comes back.
async fn exchange(stream: &mut ztunnel::hbone::H2Stream, sent: &[u8]) -> Vec<u8> {
    stream.write_all(sent).await.expect("write");
    stream.shutdown().await.expect("half-close");
    let mut got = Vec::new();
    stream.read_to_end(&mut got).await.expect("read to the end");
    got
}

/// A service port declared as TCP (`appProtocols`, Istio's `appProtocol: tcp` or a `tcp-`
/// port name) is relayed as bytes: no HTTP parsing, the client's half-close reaches the
/// application, and its answer comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_ports_are_relayed_as_bytes() {
    let mesh = mesh_with(|m| {
        m.service_protocols
            .push(("details".to_owned(), 9080, "tcp".to_owned()));
    });
    let details = AppServer::start(
        &mesh.netns("details"),
        "details",
        std::net::SocketAddr::from((mesh.ip("details"), 8080)),
    )
    .expect("echo server");
    let routes = routes_path(&mesh);
    write_atomic(&routes, DETAILS_ROUTE);
    let wp = start_waypoint(&mesh, &routes);
    let mut stream = mesh_tests::waypoint::tunnel_to_waypoint(&mesh, DETAILS_VIP).await;
    // Not HTTP: an HTTP parser would answer 400 and close.
    stream
        .write_all(b"\x00\x01 not http\n")
        .await
        .expect("write");
    let mut echoed = [0u8; 12];
    stream.read_exact(&mut echoed).await.expect("echo");
    assert_eq!(&echoed, b"\x00\x01 not http\n");
    stream.shutdown().await.expect("half-close");
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .await
        .expect("read to the end");
    assert_eq!(rest, b"bye", "{}", wp.log());
    // The application's peer is the waypoint.
    assert_eq!(details.peers().len(), 1);
    assert_eq!(
        details.peers()[0].ip(),
        std::net::IpAddr::from(mesh.ip("wp"))
    );
}

/// On a port that declares nothing, HTTP is routed (the route's response header is there)
/// and anything else is relayed as bytes, from its first byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undeclared_ports_are_read_as_http_only_when_the_client_speaks_http() {
    let mesh = mesh();
    let details = AppServer::start(
        &mesh.netns("details"),
        "details",
        SocketAddr::from((mesh.ip("details"), 8080)),
    )
    .expect("echo server");
    let routes = routes_path(&mesh);
    write_atomic(&routes, DETAILS_ROUTE);
    let wp = start_waypoint(&mesh, &routes);

    // Empty lines before the request line are skipped, as HTTP servers skip them.
    let mut http = tunnel_to_waypoint(&mesh, DETAILS_VIP).await;
    let answer = exchange(
        &mut http,
        b"\r\nGET /details/0 HTTP/1.1\r\nHost: details\r\nConnection: close\r\n\r\n",
    )
    .await;
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    assert!(answer.starts_with("http/1.1 200"), "{answer}\n{}", wp.log());
    assert!(answer.contains("x-routed-by: waypoint"), "{answer}");
    assert!(answer.contains("hello from details"), "{answer}");

    // A TLS ClientHello's first bytes, then more: relayed whole, nothing answered by HTTP.
    let mut opaque = tunnel_to_waypoint(&mesh, DETAILS_VIP).await;
    let hello = b"\x16\x03\x01\x00\x05hello";
    let echoed = exchange(&mut opaque, hello).await;
    assert_eq!(echoed, [&hello[..], b"bye"].concat(), "{}", wp.log());
    assert_eq!(details.peers().len(), 2, "{:?}", details.peers());
}

/// A server that speaks first (`220 ready`, as SMTP or MySQL do) on a port that declares
/// nothing: with a detection timeout, the client's silence makes it a relay and the
/// greeting arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detection_timeout_lets_servers_speak_first() {
    let mesh = mesh();
    let addr = SocketAddr::from((mesh.ip("details"), 8080));
    let listener = in_netns(&mesh.netns("details"), move || TcpListener::bind(addr))
        .expect("netns")
        .expect("bind");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { break };
            std::thread::spawn(move || {
                let _ = conn.write_all(b"220 details ready\r\n");
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = conn.read(&mut buf) {
                    if conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let routes = routes_path(&mesh);
    write_atomic(&routes, DETAILS_ROUTE);
    let wp = start_waypoint_args(&mesh, &routes, &["--protocol-detection-timeout-ms", "200"]);
    let mut stream = tunnel_to_waypoint(&mesh, DETAILS_VIP).await;
    let mut greeting = [0u8; 19];
    stream
        .read_exact(&mut greeting)
        .await
        .unwrap_or_else(|e| panic!("greeting: {e}\n{}", wp.log()));
    assert_eq!(&greeting, b"220 details ready\r\n");
    stream.write_all(b"QUIT\r\n").await.expect("write");
    let mut echoed = [0u8; 6];
    stream.read_exact(&mut echoed).await.expect("echo");
    assert_eq!(&echoed, b"QUIT\r\n");
}

/// A tunnel addressed to the waypoint's own pod: it is never dialled (it would dial itself
/// again and again), whether the bytes are HTTP (answered 503) or not (the tunnel is reset),
/// and the waypoint goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_waypoint_never_sends_traffic_to_itself() {
    let mesh = mesh();
    let _details = AppServer::start(
        &mesh.netns("details"),
        "details",
        SocketAddr::from((mesh.ip("details"), 8080)),
    )
    .expect("app server");
    let routes = routes_path(&mesh);
    write_atomic(&routes, DETAILS_ROUTE);
    let wp = start_waypoint(&mesh, &routes);
    let itself = mesh.ip("wp");

    let mut http = tunnel_to_waypoint(&mesh, itself).await;
    let answer = exchange(
        &mut http,
        b"GET / HTTP/1.1\r\nHost: waypoint\r\nConnection: close\r\n\r\n",
    )
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}\n{}", wp.log());

    let mut opaque = tunnel_to_waypoint(&mesh, itself).await;
    opaque
        .write_all(b"\x16\x03\x01 not http")
        .await
        .expect("write");
    let mut rest = Vec::new();
    let ended = opaque.read_to_end(&mut rest).await;
    assert!(ended.is_err() && rest.is_empty(), "{ended:?} {rest:?}");
    assert!(
        wp.log().contains("a waypoint is never a destination"),
        "{}",
        wp.log()
    );

    // Still serving.
    let mut ok = tunnel_to_waypoint(&mesh, DETAILS_VIP).await;
    let answer = exchange(
        &mut ok,
        b"GET /details/0 HTTP/1.1\r\nHost: details\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
}
