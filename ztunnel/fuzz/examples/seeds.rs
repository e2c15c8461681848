//! Writes the seed corpus of every fuzz target under `corpus/<target>/` from real inputs:
//! CONNECT requests as ztunnel's client sends them (recorded HTTP/2 bytes), the example
//! local config and variants, encoded workload API resources, and certificates from `LocalCa`.
//!
//! `cargo run --example seeds` in `ztunnel/fuzz` (no sanitizer needed); the fuzzers add
//! what they discover, and `cargo fuzz cmin` keeps the corpus small.

use std::collections::HashMap;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use ztunnel::hbone::request::{ConnectHeaders, build_connect};
use ztunnel::identity::{Identity, LocalCa};
use ztunnel::proto::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
use ztunnel::proto::istio::security as pbs;
use ztunnel::proto::istio::workload as pbw;
use ztunnel::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

fn main() -> io::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    hbone_request(&root.join("hbone_request"))?;
    local_config(&root.join("local_config"))?;
    xds_resource(&root.join("xds_resource"))?;
    cert_san(&root.join("cert_san"))?;
    Ok(())
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::File::create(dir.join(format!("seed-{name}")))?.write_all(bytes)
}

fn with_mode(mode: u8, bytes: &[u8]) -> Vec<u8> {
    let mut v = vec![mode];
    v.extend_from_slice(bytes);
    v
}

// ---- hbone_request ----

fn hbone_request(dir: &Path) -> io::Result<()> {
    // Mode 0: `<method>\n<authority>\n<forwarded>`.
    let rules: &[(&str, &str)] = &[
        ("connect-v4", "CONNECT\n10.0.0.1:80\nfor=\"10.1.1.1:5000\""),
        (
            "connect-v6",
            "CONNECT\n[2001:db8::1]:9080\nfor=\"[2001:db8::2]:4711\";host=reviews.default.svc.cluster.local",
        ),
        (
            "connect-max-port",
            "CONNECT\n127.0.0.1:65535\nproto=https;For=10.0.0.9:1234, for=1.1.1.1:1",
        ),
        ("connect-no-port", "CONNECT\n10.0.0.1\nfor=unknown"),
        (
            "connect-hostname",
            "CONNECT\nexample.com:80\nhost=\"echo.default.svc.cluster.local\"",
        ),
        ("connect-scoped", "CONNECT\n[fe80::1%25eth0]:80\n"),
        ("get", "GET\n/path\n"),
    ];
    for (name, text) in rules {
        write(dir, name, &with_mode(0, text.as_bytes()))?;
    }
    // Mode 1 (reject) and 3 (accept): HTTP/2 frames after the preface, as ztunnel's client
    // writes them.
    let dst = |s: &str| s.parse::<SocketAddr>().expect("a socket address");
    let full = ConnectHeaders {
        baggage: Some("k8s.namespace.name=default,k8s.pod.name=sleep".into()),
        forwarded_for: Some(dst("10.1.1.1:5000")),
        forwarded_host: Some("echo.default.svc.cluster.local".into()),
        traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
    };
    let connect = |to: &str, h: &ConnectHeaders| build_connect(dst(to), h).expect("a request");
    let get = http::Request::get("http://10.0.0.1/x")
        .body(())
        .expect("a request");
    let flows: Vec<(&str, Vec<http::Request<()>>)> = vec![
        (
            "h2-connect",
            vec![connect("10.0.0.1:80", &ConnectHeaders::default())],
        ),
        (
            "h2-connect-headers",
            vec![connect("[2001:db8::1]:9080", &full)],
        ),
        (
            "h2-two-streams",
            vec![
                connect("10.0.0.1:80", &full),
                connect("10.0.0.2:8080", &full),
            ],
        ),
        (
            "h2-bad-authority",
            vec![connect("0.0.0.0:80", &ConnectHeaders::default())],
        ),
        ("h2-get", vec![get]),
    ];
    for (name, requests) in flows {
        let frames = record_h2_client(requests);
        write(dir, &format!("{name}-reject"), &with_mode(1, &frames))?;
        write(dir, &format!("{name}-accept"), &with_mode(3, &frames))?;
    }
    Ok(())
}

/// An I/O that records what is written and never has anything to read.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<u8>>>);

impl AsyncRead for Recorder {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Pending
    }
}

impl AsyncWrite for Recorder {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.0.lock().expect("not poisoned").extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The bytes an h2 client writes (after the preface) for `requests`, each followed by a
/// little data and the end of its stream.
fn record_h2_client(requests: Vec<http::Request<()>>) -> Vec<u8> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime");
    let recorder = Recorder::default();
    let bytes = recorder.0.clone();
    runtime.block_on(async move {
        let (mut client, connection) = h2::client::handshake(recorder).await.expect("handshake");
        let driver = tokio::spawn(connection);
        for request in requests {
            client = client.ready().await.expect("ready");
            let (_response, mut send) = client.send_request(request, false).expect("send");
            send.send_data(Bytes::from_static(b"hello"), true)
                .expect("data");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        driver.abort();
    });
    let all = bytes.lock().expect("not poisoned").clone();
    all.strip_prefix(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".as_slice())
        .expect("the client preface first")
        .to_vec()
}

// ---- local_config ----

fn local_config(dir: &Path) -> io::Result<()> {
    let example = include_str!("../../../deploy/examples/local-mesh.yaml");
    write(dir, "local-mesh.yaml", example.as_bytes())?;
    let variants: &[(&str, &str)] = &[
        ("empty.yaml", ""),
        (
            "istio-style.yaml",
            "workloads:\n- uid: cluster1//v1/Pod/default/local\n  name: local\n  namespace: default\n  serviceAccount: default\n  workloadIps: [\"127.0.0.1\"]\n  protocol: HBONE\n  node: local\n  services:\n    \"default/example.com\":\n      80: 8080\nservices:\n- name: example\n  namespace: default\n  hostname: example.com\n  vips: [\"/127.10.0.1\"]\n  ports:\n    80: 8080\n",
        ),
        (
            "ipv6.yaml",
            "workloads:\n- uid: Kubernetes//v1/Pod/default/v6\n  name: v6\n  namespace: default\n  workloadIps: [\"fd00::10\", \"10.0.0.10\"]\n  protocol: TCP\n  node: node-a\n  waypoint:\n    destination: \"/10.0.0.99\"\n    hboneMtlsPort: 15008\n",
        ),
        (
            "policy-only.yaml",
            "policies:\n- name: allow-ns\n  namespace: default\n  scope: Global\n  action: Allow\n  rules:\n  - - - namespaces: [{Prefix: prod-}]\n        notPrincipals: [{Suffix: /sa/evil}]\n        sourceIps: [\"10.0.0.0/8\", \"fd00::/8\"]\n        notDestinationPorts: [22]\n",
        ),
        ("unknown-field.yaml", "workloads:\n- uid: x\n  nmae: typo\n"),
        (
            "anchors.yaml",
            "namespaces:\n- &ns {name: default, labels: {istio.io/dataplane-mode: ambient}}\n- *ns\n",
        ),
        (
            "bad-ip.yaml",
            "workloads:\n- uid: a\n  name: a\n  namespace: default\n  workloadIps: [\"10.0.0.300\"]\n  node: n\n",
        ),
    ];
    for (name, text) in variants {
        write(dir, name, text.as_bytes())?;
    }
    Ok(())
}

// ---- xds_resource ----

fn xds_resource(dir: &Path) -> io::Result<()> {
    let workload = pbw::Workload {
        uid: "Kubernetes//Pod/default/echo-1".into(),
        name: "echo-1".into(),
        namespace: "default".into(),
        addresses: vec![
            vec![10, 0, 0, 5],
            "fd00::5"
                .parse::<std::net::Ipv6Addr>()
                .expect("ip")
                .octets()
                .to_vec(),
        ],
        tunnel_protocol: pbw::TunnelProtocol::Hbone as i32,
        node: "node-a".into(),
        service_account: "echo".into(),
        canonical_name: "echo".into(),
        canonical_revision: "v1".into(),
        cluster_id: "Kubernetes".into(),
        authorization_policies: vec!["default/allow".into()],
        services: HashMap::from([(
            "default/echo.default.svc.cluster.local".into(),
            pbw::PortList {
                ports: vec![pbw::Port {
                    service_port: 80,
                    target_port: 8080,
                    ..Default::default()
                }],
            },
        )]),
        waypoint: Some(pbw::GatewayAddress {
            destination: Some(pbw::gateway_address::Destination::Address(
                pbw::NetworkAddress {
                    network: String::new(),
                    address: vec![10, 0, 0, 9],
                    length: None,
                },
            )),
            hbone_mtls_port: 15008,
        }),
        ..Default::default()
    };
    let service = pbw::Service {
        name: "echo".into(),
        namespace: "default".into(),
        hostname: "echo.default.svc.cluster.local".into(),
        addresses: vec![pbw::NetworkAddress {
            network: "net1".into(),
            address: vec![10, 96, 0, 10],
            length: None,
        }],
        ports: vec![
            pbw::Port {
                service_port: 80,
                target_port: 8080,
                ..Default::default()
            },
            pbw::Port {
                service_port: 90,
                target_port: 0,
                ..Default::default()
            },
        ],
        subject_alt_names: vec!["spiffe://cluster.local/ns/default/sa/echo".into()],
        app_protocols: Default::default(),
        waypoint: Some(pbw::GatewayAddress {
            destination: Some(pbw::gateway_address::Destination::Hostname(
                pbw::NamespacedHostname {
                    namespace: "default".into(),
                    hostname: "waypoint.default.svc.cluster.local".into(),
                },
            )),
            hbone_mtls_port: 15008,
        }),
        ..Default::default()
    };
    let exact = |s: &str| pbs::StringMatch {
        match_type: Some(pbs::string_match::MatchType::Exact(s.into())),
    };
    let policy = pbs::Authorization {
        name: "deny-sleep".into(),
        namespace: "default".into(),
        scope: pbs::Scope::WorkloadSelector as i32,
        action: pbs::Action::Deny as i32,
        rules: vec![pbs::Rule {
            clauses: vec![pbs::Clause {
                matches: vec![pbs::Match {
                    namespaces: vec![exact("default")],
                    principals: vec![pbs::StringMatch {
                        match_type: Some(pbs::string_match::MatchType::Prefix(
                            "cluster.local/ns/".into(),
                        )),
                    }],
                    not_principals: vec![pbs::StringMatch {
                        match_type: Some(pbs::string_match::MatchType::Presence(())),
                    }],
                    service_accounts: vec![pbs::ServiceAccountMatch {
                        namespace: "default".into(),
                        service_account: "sleep".into(),
                    }],
                    source_ips: vec![pbs::Address {
                        address: vec![10, 0, 0, 0],
                        length: 8,
                    }],
                    destination_ips: vec![pbs::Address {
                        address: vec![0xfd; 16],
                        length: 64,
                    }],
                    destination_ports: vec![80],
                    not_destination_ports: vec![22],
                    ..Default::default()
                }],
            }],
        }],
        dry_run: true,
        ..Default::default()
    };
    let global = pbs::Authorization {
        name: "allow-all".into(),
        namespace: "istio-system".into(),
        scope: pbs::Scope::Global as i32,
        action: pbs::Action::Allow as i32,
        ..Default::default()
    };
    let address = |t| pbw::Address { r#type: Some(t) }.encode_to_vec();
    let w = address(pbw::address::Type::Workload(workload));
    let s = address(pbw::address::Type::Service(service));
    let p = policy.encode_to_vec();
    let g = global.encode_to_vec();
    write(dir, "address-workload", &with_mode(0, &w))?;
    write(dir, "address-service", &with_mode(0, &s))?;
    write(dir, "authorization-deny", &with_mode(1, &p))?;
    write(dir, "authorization-global", &with_mode(1, &g))?;
    let any = |type_url: &str, value: &[u8]| prost_types_any(type_url, value);
    let resource = |name: &str, type_url: &str, value: &[u8]| Resource {
        version: "1".into(),
        name: name.into(),
        resource: Some(any(type_url, value)),
        ..Default::default()
    };
    let addresses = DeltaDiscoveryResponse {
        type_url: ADDRESS_TYPE_URL.into(),
        nonce: "n1".into(),
        resources: vec![
            resource("Kubernetes//Pod/default/echo-1", ADDRESS_TYPE_URL, &w),
            resource(
                "default/echo.default.svc.cluster.local",
                ADDRESS_TYPE_URL,
                &s,
            ),
        ],
        removed_resources: vec!["Kubernetes//Pod/default/gone".into()],
        ..Default::default()
    };
    let policies = DeltaDiscoveryResponse {
        type_url: AUTHORIZATION_TYPE_URL.into(),
        nonce: "n2".into(),
        resources: vec![
            resource("default/deny-sleep", AUTHORIZATION_TYPE_URL, &p),
            resource("istio-system/allow-all", AUTHORIZATION_TYPE_URL, &g),
        ],
        ..Default::default()
    };
    write(
        dir,
        "delta-addresses",
        &with_mode(2, &addresses.encode_to_vec()),
    )?;
    write(
        dir,
        "delta-policies",
        &with_mode(2, &policies.encode_to_vec()),
    )?;
    Ok(())
}

fn prost_types_any(type_url: &str, value: &[u8]) -> prost_types::Any {
    prost_types::Any {
        type_url: type_url.into(),
        value: value.to_vec(),
    }
}

// ---- cert_san ----

fn cert_san(dir: &Path) -> io::Result<()> {
    let ca_dir = std::env::temp_dir().join(format!("ztunnel-fuzz-seeds-{}", std::process::id()));
    let ca = LocalCa::load_or_create(&ca_dir, "cluster.local").map_err(io::Error::other)?;
    let id = Identity::new("cluster.local", "default", "sleep").map_err(io::Error::other)?;
    let cert = ca
        .sign(&id, Duration::from_secs(3600))
        .map_err(io::Error::other)?;
    let leaf = cert.leaf().expect("a leaf certificate");
    write(dir, "leaf.der", leaf.as_ref())?;
    write(dir, "root.pem", ca.root_pem().as_bytes())?;
    let roots = ca.roots();
    write(dir, "root.der", roots.certificates()[0].as_ref())?;
    write(
        dir,
        "identity",
        b"spiffe://cluster.local/ns/default/sa/sleep",
    )?;
    write(
        dir,
        "identity-bad",
        b"spiffe://cluster.local/ns/default/sa/sleep/extra",
    )?;
    std::fs::remove_dir_all(&ca_dir)
}
