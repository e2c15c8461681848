//! gRPC through a real waypoint and GRPCRoutes: tonic unary calls with their status in the
//! trailers, a tonic bidirectional stream with server pushes (Envoy's delta xDS API, the
//! test xDS server in a pod), a raw HTTP/2 stream echoed message by message, and the gRPC
//! mapping of the waypoint's own 404. Harness: `mesh_tests::waypoint`.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use mesh_tests::ca::{CaServer, Plan};
use mesh_tests::waypoint::{
    GRPC_VIP, apps, mesh, routes_path, start_waypoint, tunnel_to_waypoint, write_atomic,
};
use mesh_tests::xds::{ADDRESS_TYPE_URL, XdsServer};
use ztunnel::hbone::H2Stream;
use ztunnel::identity::Identity;
use ztunnel::proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use ztunnel::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use ztunnel::proto::istio::v1::auth::IstioCertificateRequest;
use ztunnel::proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;

const ROUTES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata:
  name: grpc
spec:
  parentRefs:
  - {group: "", kind: Service, name: grpc, port: 9080}
  rules:
  - matches:
    - method: {service: istio.v1.auth.IstioCertificateService, method: CreateCertificate}
    - method: {service: envoy.service.discovery.v3.AggregatedDiscoveryService}
    backendRefs:
    - {name: grpc, port: 9080}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata:
  name: chat
spec:
  parentRefs:
  - {group: "", kind: Service, name: details, port: 9080}
  rules:
  - matches:
    - method: {service: demo.Echo, method: Chat}
    backendRefs:
    - {name: details, port: 9080}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings
spec:
  hosts: [ratings]
  http:
  - match: [{uri: {prefix: /demo.Echo/}}]
    fault:
      abort:
        grpcStatus: UNAVAILABLE
        percentage: {value: 100}
    route: [{destination: {host: ratings}}]
"#;

/// A connector that hands tonic one HBONE tunnel (the waypoint's) as its connection.
#[derive(Clone)]
struct OneTunnel(std::sync::Arc<Mutex<Option<H2Stream>>>);

impl tower_service::Service<http::Uri> for OneTunnel {
    type Response = TokioIo<H2Stream>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let taken = self.0.lock().ok().and_then(|mut t| t.take());
        std::future::ready(
            taken
                .map(TokioIo::new)
                .ok_or_else(|| std::io::Error::other("the tunnel was used already")),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_and_their_status_pass_through_a_grpc_route() {
    let mesh = mesh();
    let routes = routes_path(&mesh);
    write_atomic(&routes, ROUTES);
    let _wp = start_waypoint(&mesh, &routes);
    let mut ca = CaServer::new(
        Some(&mesh.netns("grpc")),
        SocketAddr::from((mesh.ip("grpc"), 8080)),
        false,
    )
    .expect("gRPC server");
    ca.listen().expect("listen");

    let stream = tunnel_to_waypoint(&mesh, GRPC_VIP).await;
    let channel = tonic::transport::Endpoint::from_static("http://grpc.default:9080")
        .connect_with_connector(OneTunnel(std::sync::Arc::new(Mutex::new(Some(stream)))))
        .await
        .expect("gRPC channel through the waypoint");
    let mut client = IstioCertificateServiceClient::new(channel);
    let key = rcgen::KeyPair::generate().expect("key");
    let sleep = Identity::new("cluster.local", "default", "sleep").expect("identity");
    let csr = ztunnel::identity::istio_ca::csr_pem(&sleep, &key).expect("csr");
    let request = || IstioCertificateRequest {
        csr: csr.clone(),
        validity_duration: 3600,
        metadata: None,
    };

    // A unary call: the answer (a signed chain) and the trailers' OK status come back.
    let answer = client
        .create_certificate(request())
        .await
        .expect("CreateCertificate through the waypoint");
    assert!(!answer.get_ref().cert_chain.is_empty());
    assert_eq!(ca.requests().len(), 1);

    // The server's error status travels in the trailers and reaches the client.
    ca.plan([Plan::Fail]);
    let status = client
        .create_certificate(request())
        .await
        .expect_err("the CA was told to fail");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(ca.requests().len(), 2);
}

/// A bidirectional gRPC stream through a GRPCRoute: each message comes back before the next
/// is sent (nothing is buffered on the way), and the trailers' status arrives at the end. A
/// method the route does not match gets grpc-status UNIMPLEMENTED (the HTTP 404's mapping).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_streams_flow_both_ways_through_the_waypoint() {
    let mesh = mesh();
    let _apps = apps(&mesh);
    let routes = routes_path(&mesh);
    write_atomic(&routes, ROUTES);
    let wp = start_waypoint(&mesh, &routes);
    let stream = tunnel_to_waypoint(&mesh, mesh_tests::waypoint::DETAILS_VIP).await;
    let (client, connection) = h2::client::handshake(stream)
        .await
        .expect("h2 in the tunnel");
    tokio::spawn(connection);
    let request = |path: &str| {
        http::Request::builder()
            .method("POST")
            .uri(format!("http://details:9080{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("x-app-echo-stream", "1")
            .body(())
            .expect("request")
    };
    let mut client = client.ready().await.expect("ready");
    let (response, mut send) = client
        .send_request(request("/demo.Echo/Chat"), false)
        .expect("send");
    // The first message goes out before the response head can exist: the echo's head and
    // body follow it.
    let message = |i: u8| bytes::Bytes::from(vec![0, 0, 0, 0, 5, b'h', b'e', b'l', b'l', i]);
    send.send_data(message(b'0'), false).expect("first message");
    let response = response.await.expect("response head");
    assert_eq!(response.status(), 200, "{}", wp.log());
    let mut body = response.into_body();
    for i in 0..5u8 {
        if i > 0 {
            send.send_data(message(b'0' + i), false).expect("message");
        }
        let echoed = body.data().await.expect("an echo").expect("data");
        let _ = body.flow_control().release_capacity(echoed.len());
        assert_eq!(
            echoed,
            message(b'0' + i),
            "message {i} came back whole and in order"
        );
    }
    send.send_data(bytes::Bytes::new(), true)
        .expect("end of stream");
    assert!(
        body.data().await.is_none(),
        "no more data after the client's end"
    );
    let trailers = body
        .trailers()
        .await
        .expect("trailers")
        .expect("some trailers");
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..])
    );

    // A method the GRPCRoute does not match: 404 from the waypoint.
    let mut client = client.ready().await.expect("ready");
    let (response, mut send) = client
        .send_request(request("/demo.Echo/Other"), false)
        .expect("send");
    send.send_data(message(b'x'), true).expect("message");
    // gRPC clients read the waypoint's own 404 as the gRPC mapping says: HTTP 200 with
    // grpc-status 12 (UNIMPLEMENTED), a trailers-only response.
    let response = response.await.expect("response");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers().get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"12"[..])
    );
}

async fn next(responses: &mut tonic::Streaming<DeltaDiscoveryResponse>) -> DeltaDiscoveryResponse {
    tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .expect("a response within 10 s")
        .expect("a response")
        .expect("the stream is open")
}

/// A tonic client's bidirectional stream to a tonic server through the waypoint: the
/// subscription goes out, the server's answer comes back, the client's ACK reaches the
/// server, and a later push from the server arrives on the same open stream.
#[test]
fn a_tonic_stream_carries_server_pushes_through_the_waypoint() {
    let mesh = mesh();
    let routes = routes_path(&mesh);
    write_atomic(&routes, ROUTES);
    let wp = start_waypoint(&mesh, &routes);
    let mut xds = XdsServer::new(
        &mesh.netns("grpc"),
        SocketAddr::from((mesh.ip("grpc"), 8080)),
    )
    .expect("xDS server");
    xds.start().expect("listen");
    // An empty body is a valid (empty) Address message.
    xds.push(
        ADDRESS_TYPE_URL,
        vec![("first".into(), Vec::new())],
        Vec::new(),
    );

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let node = "waypoint-grpc-test";
    rt.block_on(async {
        let stream = tunnel_to_waypoint(&mesh, GRPC_VIP).await;
        let channel = tonic::transport::Endpoint::from_static("http://grpc.default:9080")
            .connect_with_connector(OneTunnel(std::sync::Arc::new(Mutex::new(Some(stream)))))
            .await
            .expect("gRPC channel through the waypoint");
        let mut client = AggregatedDiscoveryServiceClient::new(channel);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let subscribe = DeltaDiscoveryRequest {
            type_url: ADDRESS_TYPE_URL.into(),
            node: Some(ztunnel::proto::envoy::config::core::v3::Node {
                id: format!("sidecar~198.18.0.1~{node}.default~default.svc.cluster.local"),
                ..Default::default()
            }),
            ..Default::default()
        };
        tx.send(subscribe).await.expect("queue the subscription");
        let mut responses = client
            .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap_or_else(|e| panic!("stream through the waypoint: {e}\n{}", wp.log()))
            .into_inner();
        let first = next(&mut responses).await;
        let names: Vec<_> = first.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["first"]);
        let ack = DeltaDiscoveryRequest {
            type_url: ADDRESS_TYPE_URL.into(),
            response_nonce: first.nonce.clone(),
            ..Default::default()
        };
        tx.send(ack).await.expect("queue the ACK");
        let acked = mesh_tests::process::wait_until(Duration::from_secs(10), || {
            xds.replies()
                .iter()
                .any(|r| r.nonce == first.nonce && r.error.is_none())
        });
        assert!(
            acked.is_ok(),
            "the ACK reached the server: {:?}",
            xds.replies()
        );
        // A push on the stream that is already open.
        xds.push(
            ADDRESS_TYPE_URL,
            vec![("second".into(), Vec::new())],
            Vec::new(),
        );
        let second = next(&mut responses).await;
        let names: Vec<_> = second.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["second"]);
    });
    drop(rt);
    xds.stop().expect("the server stops");
}

/// A VirtualService's gRPC abort fault: the waypoint answers the call itself, HTTP 200 with
/// `grpc-status: 14` (UNAVAILABLE) and no body, the backend never sees it, and the request
/// metric carries Envoy's `FI` flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_abort_fault_answers_with_its_grpc_status() {
    let mesh = mesh();
    let apps = apps(&mesh);
    let routes = routes_path(&mesh);
    write_atomic(&routes, ROUTES);
    let wp = start_waypoint(&mesh, &routes);
    let stream = tunnel_to_waypoint(&mesh, mesh_tests::waypoint::RATINGS_VIP).await;
    let (client, connection) = h2::client::handshake(stream)
        .await
        .expect("h2 in the tunnel");
    tokio::spawn(connection);
    let request = http::Request::builder()
        .method("POST")
        .uri("http://ratings:9080/demo.Echo/Chat")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let mut client = client.ready().await.expect("ready");
    let (response, mut send) = client.send_request(request, false).expect("send");
    send.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 1, b'x']), true)
        .expect("message");
    let response = response.await.expect("response");
    assert_eq!(response.status(), 200, "{}", wp.log());
    assert_eq!(
        response.headers().get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"14"[..])
    );
    let served: u64 = apps.iter().map(|a| a.requests()).sum();
    assert_eq!(served, 0, "an aborted call reaches no backend");
    let aborted = mesh_tests::waypoint::metric(
        &mesh,
        "istio_requests_total",
        &["response_flags=\"FI\"", "request_protocol=\"grpc\""],
    );
    assert_eq!(aborted, 1.0, "the abort is counted once, with FI");
}
