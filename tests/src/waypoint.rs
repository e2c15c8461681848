//! A mesh for the waypoint tests: two nodes, a client `sleep` and the waypoint `wp` (not
//! captured: it terminates HBONE itself) on n1, the Bookinfo-like services on n2, and the
//! waypoint process started with a route file. Clients reach the waypoint as a client's
//! ztunnel does: an HBONE tunnel with the client's certificate to the waypoint's 15008,
//! asking for the service `VIP:port`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ztunnel::identity::Identity;

use crate::http_app::{HttpApp, HttpConn, Version};
use crate::mesh::{Mesh, PodSpec, ServiceSpec, http_get, tunnel};
use crate::process::{Proc, binary, wait_until};

pub const REVIEWS_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
pub const RATINGS_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 2);
pub const DETAILS_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 3);
/// The waypoint's own service (its pod is the endpoint, on 15008): what
/// `istio.io/use-waypoint: waypoint` names.
pub const WAYPOINT_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 9);
/// A gRPC service (the tests run the Istio CA stand-in there).
pub const GRPC_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 4);

pub fn labelled(mut pod: PodSpec, labels: &[(&str, &str)]) -> PodSpec {
    pod.labels = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    pod
}

pub fn service(name: &str, vip: Ipv4Addr) -> ServiceSpec {
    ServiceSpec {
        name: name.to_owned(),
        namespace: "default".to_owned(),
        vip,
        vip6: None,
        ports: vec![(9080, 8080)],
    }
}

/// Two nodes: the client `sleep` and the waypoint `wp` (not captured: it terminates HBONE
/// itself) on n1; reviews v1 and v2, ratings, details and grpc on n2.
pub fn mesh() -> Mesh {
    mesh_with(|_| {})
}

/// Like [`mesh`], with `before_start` changing the declaration (labels, say) before the
/// ztunnels start.
pub fn mesh_with(before_start: impl FnOnce(&mut Mesh)) -> Mesh {
    let mut mesh = declared(before_start);
    mesh.start().expect("ztunnels");
    mesh
}

/// reviews and ratings use the waypoint, both declared HTTP.
pub fn labelled_mesh() -> Mesh {
    mesh_with(|m| {
        for service in ["reviews", "ratings"] {
            m.service_labels.push((
                service.to_owned(),
                "istio.io/use-waypoint".to_owned(),
                "waypoint".to_owned(),
            ));
            m.service_protocols
                .push((service.to_owned(), 9080, "http".to_owned()));
        }
    })
}

/// The topology and its declaration, changed by `before_start`; nothing runs yet.
fn declared(before_start: impl FnOnce(&mut Mesh)) -> Mesh {
    let pods = vec![
        PodSpec::new("sleep", "n1", "sleep"),
        labelled(
            PodSpec::new("wp", "n1", "waypoint").service("waypoint", 15008, 15008),
            &[("istio.io/dataplane-mode", "none")],
        ),
        labelled(
            PodSpec::new("reviews-v1", "n2", "reviews").service("reviews", 9080, 8080),
            &[("app", "reviews"), ("version", "v1")],
        ),
        labelled(
            PodSpec::new("reviews-v2", "n2", "reviews").service("reviews", 9080, 8080),
            &[("app", "reviews"), ("version", "v2")],
        ),
        PodSpec::new("ratings", "n2", "ratings").service("ratings", 9080, 8080),
        PodSpec::new("details", "n2", "details").service("details", 9080, 8080),
        PodSpec::new("grpc", "n2", "grpc").service("grpc", 9080, 8080),
    ];
    let services = vec![
        service("reviews", REVIEWS_VIP),
        service("ratings", RATINGS_VIP),
        service("details", DETAILS_VIP),
        service("grpc", GRPC_VIP),
        ServiceSpec {
            ports: vec![(15008, 15008)],
            ..service("waypoint", WAYPOINT_VIP)
        },
    ];
    let mut mesh = Mesh::new(&["n1", "n2"], pods, services).expect("topology");
    before_start(&mut mesh);
    mesh
}

/// The same mesh fed by the in-process xDS server (istiod's workload API) instead of the
/// local file; the waypoint reads it from there too ([`start_waypoint_xds`]).
pub fn mesh_xds() -> Mesh {
    // istiod publishes a waypoint's own pods without HBONE (they are not captured: the
    // waypoint terminates HBONE itself), as it does for pods labelled dataplane-mode none.
    let mut mesh = declared(|m| {
        for pod in m.pods.iter_mut().filter(|p| p.name == "wp") {
            pod.protocol = "TCP".to_owned();
        }
    });
    mesh.start_xds().expect("xDS server and ztunnels");
    // The waypoint pod reaches the control plane on the fabric, as ztunnels do.
    mesh.topo.route_fabric_to_pods().expect("fabric routes");
    mesh
}

/// The applications, one per server pod, each on its pod's 8080.
pub fn apps(mesh: &Mesh) -> Vec<HttpApp> {
    ["reviews-v1", "reviews-v2", "ratings", "details"]
        .iter()
        .map(|p| {
            let addr = SocketAddr::from((mesh.ip(p), 8080));
            HttpApp::start(&mesh.netns(p), p, addr).expect("app")
        })
        .collect()
}

/// Writes `text` to `path` at once (rename), so the waypoint never reads half a file.
pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write routes");
    std::fs::rename(&tmp, path).expect("rename routes");
}

pub fn waypoint_identity() -> Identity {
    Identity::new("cluster.local", "default", "waypoint").expect("identity")
}

/// Starts the waypoint in its pod with `routes` and waits until it is ready.
pub fn start_waypoint(mesh: &Mesh, routes: &Path) -> Proc {
    start_waypoint_args(mesh, routes, &[])
}

/// `start_waypoint` with more command-line arguments.
pub fn start_waypoint_args(mesh: &Mesh, routes: &Path, args: &[&str]) -> Proc {
    let mut cmd = Command::new(binary("waypoint"));
    cmd.arg("--mesh-config").arg(mesh.config_path()).args(args);
    run_waypoint(mesh, routes, cmd)
}

/// Starts the waypoint with its workloads and services from the mesh's xDS server.
pub fn start_waypoint_xds(mesh: &Mesh, routes: &Path) -> Proc {
    let mut cmd = Command::new(binary("waypoint"));
    let url = mesh.xds.as_ref().expect("a mesh in xDS mode").url();
    cmd.arg("--xds-address").arg(url);
    run_waypoint(mesh, routes, cmd)
}

fn run_waypoint(mesh: &Mesh, routes: &Path, mut cmd: Command) -> Proc {
    // The same CA as the ztunnels: Istio's when the mesh uses one, else the local one.
    match &mesh.istio_ca {
        Some(ca) => cmd
            .arg("--ca-address")
            .arg(ca.url())
            .arg("--ca-root-cert")
            .arg(mesh.dir.path().join("istio-ca-root.pem"))
            .arg("--token-file")
            .arg(mesh.istio_token_path()),
        None => cmd.arg("--ca-dir").arg(mesh.dir.path().join("ca")),
    };
    cmd.arg("--routes")
        .arg(routes)
        .arg("--service-account")
        .arg("waypoint")
        .arg("--poll-ms")
        .arg("100")
        .env("RUST_LOG", "info,waypoint=debug");
    let netns = mesh.netns("wp");
    let mut wp = Proc::spawn("waypoint", &netns, cmd, mesh.dir.path()).expect("waypoint");
    let ready = wait_until(Duration::from_secs(20), || {
        wp.exited().is_some()
            || http_get(&netns, "127.0.0.1:15021".parse().unwrap(), "/healthz/ready")
                .is_ok_and(|(status, _)| status == 200)
    });
    assert!(
        ready.is_ok() && wp.exited().is_none(),
        "waypoint not ready; log:\n{}",
        wp.log()
    );
    wp
}

/// An HTTP connection from `sleep`, through the waypoint, for the service at `vip`.
pub async fn through_waypoint(mesh: &Mesh, vip: Ipv4Addr, version: Version) -> HttpConn {
    let stream = tunnel_to_waypoint(mesh, vip).await;
    HttpConn::handshake(stream, version)
        .await
        .expect("HTTP in the tunnel")
}

/// An HBONE tunnel from `sleep` (its certificate from the mesh's local CA) to the waypoint's
/// 15008, asking for the service at `vip`, port 9080: what `sleep`'s ztunnel opens.
pub async fn tunnel_to_waypoint(mesh: &Mesh, vip: Ipv4Addr) -> ztunnel::hbone::H2Stream {
    let sleep = Identity::new("cluster.local", "default", "sleep").expect("identity");
    let cert = mesh
        .ca()
        .sign(&sleep, Duration::from_secs(3600))
        .expect("cert");
    tunnel(
        mesh,
        "sleep",
        &cert,
        waypoint_identity(),
        SocketAddr::from((mesh.ip("wp"), 15008)),
        SocketAddr::from((vip, 9080)),
    )
    .await
    .expect("tunnel to the waypoint")
}

pub fn routes_path(mesh: &Mesh) -> PathBuf {
    mesh.dir.path().join("routes.yaml")
}

/// `curl -sS -i --max-time 10 <args>` from `pod`: the exit code and what it printed (status
/// line, headers, body).
pub fn curl_i(mesh: &Mesh, pod: &str, args: &[&str]) -> (i32, String) {
    let mut all = vec!["-sS", "-i", "--max-time", "10"];
    all.extend_from_slice(args);
    let out = crate::netns::exec(&mesh.netns(pod), "curl", &all).expect("curl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// [`curl_i`] that must succeed: the status of the answer (`HTTP/1.1 403 Forbidden` →
/// `403`), and the answer.
pub fn curl_status(mesh: &Mesh, pod: &str, args: &[&str]) -> (u16, String) {
    let (code, out) = curl_i(mesh, pod, args);
    assert_eq!(code, 0, "curl {args:?} from {pod} failed:\n{out}");
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, out)
}

/// The value of the metric series named `name` whose labels include every one of `labels`,
/// summed over the series that match, from the waypoint's `/metrics`.
pub fn metric(mesh: &Mesh, name: &str, labels: &[&str]) -> f64 {
    let (status, text) = crate::mesh::http_get(
        &mesh.netns("wp"),
        "127.0.0.1:15020".parse().expect("addr"),
        "/metrics",
    )
    .expect("scrape");
    assert_eq!(status, 200);
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
