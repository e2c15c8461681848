//! The ztunnel DaemonSet's upgrade on one node, reproduced with the chart's own pod template:
//! two ztunnel processes started as the kubelet starts the rendered container (its
//! environment and nothing else, its hostPath volumes at their mount paths in a root of
//! their own, its capabilities), both running at once as a RollingUpdate with maxSurge 1
//! runs them, the old one sent SIGTERM once the new one is ready, while it still carries
//! connections (as the kubelet does, not waiting for the drain). Under load across the
//! hand-over, no connection is refused or reset, and the old one exits within the pod's
//! terminationGracePeriodSeconds. The paths ztunnel reads are the chart's (the hand-over
//! socket under /var/run/ztunnel/$(NODE_NAME), the pins under /sys/fs/bpf/ztunnel/..., the
//! cgroup root at /host/cgroup): that the successor finds its predecessor there is what
//! the chart's values are checked for. Tools: `cargo xtask prereqs` (see `mesh_tests::chart`).

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mesh_tests::chart::{NAMESPACE, Tools, object};
use mesh_tests::container::{self, Bind, Container};
use mesh_tests::mesh::{Mesh, PodSpec};
use mesh_tests::process::binary;
use mesh_tests::traffic::{AppServer, Load, connect, echo_exchange};
use mesh_tests::{Proc, wait_until};

/// The port the test applications listen on.
const APP_PORT: u16 = 8080;

/// The node whose ztunnel is the chart's.
const NODE: &str = "node1";

/// The rendered ztunnel container (default values) as the kubelet would run it as pod
/// `pod` on the test's node, with what cannot exist here replaced. There is no istiod and
/// no API server: XDS_ADDRESS, CA_ADDRESS, AUTH_TOKEN and CA_ROOT_CA (istiod's xDS, its CA,
/// the projected token and the root certificate ConfigMap) give way to the mesh's local
/// config and local CA, as in the other mesh tests; ZTUNNEL_PROC_ROOT (pod discovery, which
/// matches istiod's workloads to the node's pods) is only for xDS mode, so it goes too.
/// Everything else is the chart's.
fn chart_container(objects: &[serde_json::Value], mesh: &Mesh, pod: &str) -> Container {
    let pod_spec = &object(objects, "DaemonSet", "ztunnel")["spec"]["template"]["spec"];
    let pod_ip = mesh.topo.node(NODE).ip.to_string();
    let fields = [
        ("spec.nodeName", NODE),
        ("metadata.name", pod),
        ("metadata.namespace", NAMESPACE),
        // ztunnel runs in the node's network namespace here: its address is the pod's.
        ("status.podIP", pod_ip.as_str()),
    ];
    let mut container = Container::from_pod_spec(pod_spec, "ztunnel", &fields);
    for istiod_only in [
        "XDS_ADDRESS",
        "CA_ADDRESS",
        "AUTH_TOKEN",
        "CA_ROOT_CA",
        "ZTUNNEL_PROC_ROOT",
    ] {
        container.remove_env(istiod_only);
    }
    let local = [
        ("ZTUNNEL_CONFIG", mesh.config_path()),
        ("ZTUNNEL_CA_DIR", mesh.dir.path().join("ca")),
    ];
    for (name, path) in local {
        container
            .env
            .push((name.to_owned(), path.display().to_string()));
    }
    container
}

/// Each hostPath volume on what this machine has for it, at the chart's mount path: the
/// hand-over directory on one of the test's, the BPF filesystem (a directory of the test on
/// the machine's, removed with the mesh), the machine's cgroup v2 root (here a hybrid
/// hierarchy's /sys/fs/cgroup/unified, which values.yaml names for such hosts) and /proc.
/// The token and root-certificate volumes are left out: what reads them was replaced.
fn host_paths(container: &Container, mesh: &Mesh, state: &Path) -> Vec<Bind> {
    container
        .mounts
        .iter()
        .filter_map(|mount| {
            let Some(host) = &mount.host_path else {
                assert!(
                    ["istio-token", "istiod-ca-cert"].contains(&mount.volume.as_str()),
                    "volume {} is not a hostPath: map it",
                    mount.volume
                );
                return None;
            };
            let source = match host.to_str() {
                Some("/var/run/ztunnel") => state.to_owned(),
                Some("/sys/fs/bpf") => mesh.pin_dir(NODE),
                Some("/sys/fs/cgroup") => ztunnel::capture::cgroup::find_cgroup2()
                    .expect("this machine has a cgroup v2 mount"),
                Some("/proc") => PathBuf::from("/proc"),
                _ => panic!("the chart mounts hostPath {}: map it", host.display()),
            };
            Some(Bind {
                source,
                target: mount.mount_path.clone(),
                read_only: mount.read_only,
            })
        })
        .collect()
}

/// Starts pod `pod`'s ztunnel as the chart's container, in the node's network namespace.
fn start(mesh: &Mesh, container: &Container, binds: &[Bind], pod: &str) -> Proc {
    container::spawn(
        pod,
        &mesh.topo.node(NODE).netns,
        &binary("ztunnel"),
        container,
        binds,
        &mesh.dir.path().join(format!("{pod}-root")),
        mesh.dir.path(),
    )
    .unwrap_or_else(|e| panic!("starting {pod}: {e}"))
}

#[test]
fn the_charts_ztunnel_hands_over_to_its_successor_refusing_and_resetting_nothing() {
    let objects = Tools::find()
        .template(&[], &[])
        .unwrap_or_else(|e| panic!("helm template (default values) failed:\n{e}"));
    let pods = vec![
        PodSpec::new("sleep", NODE, "sleep"),
        PodSpec::new("local", NODE, "echo"),
        PodSpec::new("echo", "node2", "echo"),
    ];
    let mut mesh = Mesh::new(&[NODE, "node2"], pods, Vec::new()).unwrap();
    let remote = SocketAddr::new(mesh.ip("echo").into(), APP_PORT);
    let local = SocketAddr::new(mesh.ip("local").into(), APP_PORT);
    let _echo = AppServer::start(&mesh.netns("echo"), "echo", remote).unwrap();
    let _local = AppServer::start(&mesh.netns("local"), "local", local).unwrap();
    mesh.write_config().unwrap();
    mesh.start_ztunnel("node2").unwrap();

    // The node's directories behind the hostPath volumes.
    let state = mesh.dir.path().join("host-var-run-ztunnel");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::create_dir_all(mesh.pin_dir(NODE)).unwrap();

    let old_container = chart_container(&objects, &mesh, "ztunnel-old");
    let binds = host_paths(&old_container, &mesh, &state);
    let old = start(&mesh, &old_container, &binds, "ztunnel-old");
    assert!(mesh.set_ztunnel(NODE, old).is_none());
    mesh.wait_ready(NODE, Duration::from_secs(30)).unwrap();

    // ztunnel read the chart's paths, and they are the node's directories.
    let log = mesh.ztunnel(NODE).log();
    assert!(log.contains("cgroup=/host/cgroup"), "{log}");
    // The hand-over socket is where the chart's ZTUNNEL_STATE_DIR puts it, on the node.
    let state_dir = old_container
        .env("ZTUNNEL_STATE_DIR")
        .expect("ZTUNNEL_STATE_DIR");
    let socket = state
        .join(
            Path::new(state_dir)
                .strip_prefix("/var/run/ztunnel")
                .unwrap(),
        )
        .join("handoff.sock");
    assert!(
        socket.exists(),
        "no hand-over socket at {}",
        socket.display()
    );
    // And the capture maps are pinned where its ZTUNNEL_BPF_PIN_DIR says, on the BPF
    // filesystem behind the chart's /sys/fs/bpf volume.
    let pin_dir = old_container
        .env("ZTUNNEL_BPF_PIN_DIR")
        .expect("ZTUNNEL_BPF_PIN_DIR");
    let pins = mesh
        .pin_dir(NODE)
        .join(Path::new(pin_dir).strip_prefix("/sys/fs/bpf").unwrap());
    let pinned = std::fs::read_dir(&pins)
        .unwrap_or_else(|e| panic!("{}: {e}", pins.display()))
        .count();
    assert!(pinned > 0, "nothing pinned in {}", pins.display());

    // Connections the old process carries through the whole upgrade, across nodes and on
    // the node; and new connections all the time.
    let sleep = mesh.netns("sleep");
    let mut long_lived: Vec<TcpStream> = [remote, local]
        .into_iter()
        .map(|dst| connect(&sleep, dst).unwrap())
        .collect();
    for conn in &mut long_lived {
        echo_exchange(conn, b"before").unwrap();
    }
    let (load, clients) = Load::start(&sleep, &[remote, local]);
    load.served(50);

    // The new pod beside the old one (maxSurge 1), with the same environment and volumes.
    let new_container = chart_container(&objects, &mesh, "ztunnel-new");
    let new = start(&mesh, &new_container, &binds, "ztunnel-new");
    let mut old = mesh.set_ztunnel(NODE, new).expect("the old ztunnel");
    mesh.ztunnel(NODE)
        .wait_for_log(
            "took over listening sockets from the previous ztunnel",
            Duration::from_secs(30),
        )
        .unwrap();
    mesh.ztunnel(NODE)
        .wait_for_log("ztunnel started", Duration::from_secs(30))
        .unwrap();
    mesh.wait_ready(NODE, Duration::from_secs(30)).unwrap();
    load.served(50);
    for conn in &mut long_lived {
        echo_exchange(conn, b"after the hand-over").unwrap();
    }

    // The new pod is ready: the kubelet sends the old one SIGTERM and waits at most the
    // grace period before it kills it. The old one is still draining then; its connections
    // go on after the SIGTERM, and it exits once they end.
    assert!(
        old.exited().is_none(),
        "the old ztunnel left before its connections ended"
    );
    let grace = old_container.termination_grace;
    let sent = Instant::now();
    mesh_tests::sys::terminate(old.pid()).expect("SIGTERM");
    old.wait_for_log("the drain goes on", Duration::from_secs(10))
        .unwrap();
    for conn in &mut long_lived {
        echo_exchange(conn, b"after the SIGTERM").unwrap();
    }
    assert!(
        old.exited().is_none(),
        "the old ztunnel left before its connections ended"
    );
    long_lived.clear();
    let mut status = None;
    wait_until(grace, || {
        status = old.exited();
        status.is_some()
    })
    .unwrap_or_else(|_| panic!("the old ztunnel outlived its {grace:?} grace period"));
    let took = sent.elapsed();
    assert!(
        status.is_some_and(|s| s.success()),
        "the old ztunnel exited with {status:?}:\n{}",
        old.log()
    );
    assert!(old.log().contains("ztunnel stopped"), "{}", old.log());

    load.served(50);
    let (ok, failed) = load.finish(clients);
    eprintln!(
        "chart hand-over under load: {ok} connections served, {failed} refused or reset; \
         the old ztunnel exited {took:?} after SIGTERM, its connections closed (grace {grace:?})"
    );
    assert_eq!(
        failed, 0,
        "connections refused or reset during the hand-over"
    );
}
