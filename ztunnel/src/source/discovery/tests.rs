use std::os::unix::fs::symlink;

use super::*;
use crate::identity::Identity;

const FIB_TRIE: &str = "\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.244.1.0/24 2 0 2
        |-- 10.244.1.7
           /32 host LOCAL
     +-- 127.0.0.0/8 2 0 2
        |-- 127.0.0.1
           /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
     |-- 10.244.1.7
        /32 host LOCAL
";

const IF_INET6: &str = "\
00000000000000000000000000000001 01 80 10 80       lo
fd00001000000000000000000000000a 02 40 00 80     eth0
fe80000000000000d4a1b2fffec3d4e5 02 40 20 80     eth0
";

#[test]
fn pod_uid_from_systemd_and_cgroupfs_paths() {
    let systemd = "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1b4e28ba_2fa1_11d2_883f_0016d3cca427.slice/cri-containerd-0123abcd.scope\n";
    assert_eq!(
        pod_uid(systemd).unwrap().as_str(),
        "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
    );
    let cgroupfs = "12:memory:/kubepods/besteffort/pod1234-5678/0123456789abcdef\n11:cpu:/kubepods/besteffort/pod1234-5678/0123456789abcdef\n";
    assert_eq!(pod_uid(cgroupfs).unwrap().as_str(), "1234-5678");
    assert_eq!(
        pod_uid("0::/kubepods-burstable-pod1234_5678.slice\n")
            .unwrap()
            .as_str(),
        "1234-5678"
    );
    for not_a_pod in [
        "0::/system.slice/containerd.service\n",
        "0::/kubepods.slice/kubepods-besteffort.slice\n",
        "0::/user.slice/user-0.slice/session-1.scope\n",
        "0::/kubepods/podxyz/abc\n",
        "",
    ] {
        assert_eq!(pod_uid(not_a_pod), None, "{not_a_pod:?}");
    }
}

#[test]
fn local_addresses_skip_loopback_and_link_local() {
    assert_eq!(
        local_addresses(FIB_TRIE, IF_INET6),
        vec![
            "10.244.1.7".parse::<IpAddr>().unwrap(),
            "fd00:10::a".parse().unwrap()
        ]
    );
    assert!(local_addresses("", "").is_empty());
}

/// A `/proc`-shaped tree: `<root>/<pid>/{cgroup, ns/net, net/fib_trie}`; `ns/net` links to
/// a per-pod file standing in for the namespace (its inode identifies it).
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let f = Fixture {
            dir: tempfile::tempdir().unwrap(),
        };
        // The host: pid 1, not a pod.
        f.process(1, "0::/init.scope\n", "host", "10.0.0.1");
        f
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn process(&self, pid: u32, cgroup: &str, netns: &str, ip: &str) {
        let dir = self.root().join(pid.to_string());
        std::fs::create_dir_all(dir.join("ns")).unwrap();
        std::fs::create_dir_all(dir.join("net")).unwrap();
        std::fs::write(dir.join("cgroup"), cgroup).unwrap();
        let ns = self.root().join(format!("netns-{netns}"));
        if !ns.exists() {
            std::fs::write(&ns, "").unwrap();
        }
        symlink(&ns, dir.join("ns").join("net")).unwrap();
        let fib = format!("Local:\n  +-- 0.0.0.0/0\n     |-- {ip}\n        /32 host LOCAL\n");
        std::fs::write(dir.join("net").join("fib_trie"), fib).unwrap();
    }

    fn remove(&self, pid: u32) {
        std::fs::remove_dir_all(self.root().join(pid.to_string())).unwrap();
    }

    fn inode(&self, netns: &str) -> u64 {
        std::fs::metadata(self.root().join(format!("netns-{netns}")))
            .unwrap()
            .ino()
    }
}

fn pod_cgroup(uid: &str) -> String {
    format!(
        "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-ab12.scope\n",
        uid.replace('-', "_")
    )
}

fn workload(name: &str, node: &str, ip: &str) -> Workload {
    let id = Identity::new("cluster.local", "default", name).unwrap();
    let mut w = Workload::new(format!("Kubernetes//v1/Pod/default/{name}"), name, id);
    w.node = node.to_owned();
    w.workload_ips = vec![ip.parse().unwrap()];
    w
}

#[test]
fn scan_groups_a_pods_processes_and_finds_its_namespace() {
    let f = Fixture::new();
    // echo: pause (pid 100) and the app (pid 105) in one namespace.
    f.process(100, &pod_cgroup("aaaa-1111"), "echo", "10.244.1.7");
    f.process(105, &pod_cgroup("aaaa-1111"), "echo", "10.244.1.7");
    f.process(200, &pod_cgroup("bbbb-2222"), "sleep", "10.244.1.8");
    // A host daemon with a pod-looking IP is not a pod.
    f.process(
        300,
        "0::/system.slice/kubelet.service\n",
        "host",
        "10.244.1.9",
    );
    // A hostNetwork pod shares the host's namespace.
    f.process(400, &pod_cgroup("cccc-3333"), "host", "10.0.0.1");

    let sandboxes = scan(f.root()).unwrap();
    let uids: Vec<(&str, u32)> = sandboxes.iter().map(|s| (s.uid.as_str(), s.pid)).collect();
    assert_eq!(
        uids,
        [("aaaa-1111", 100), ("bbbb-2222", 200), ("cccc-3333", 400)]
    );
    assert_eq!(sandboxes[0].netns, f.root().join("100/ns/net"));
    assert_eq!(sandboxes[0].netns_inode, f.inode("echo"));

    let workloads = [
        workload("echo", "node1", "10.244.1.7"),
        workload("sleep", "node1", "10.244.1.8"),
        workload("elsewhere", "node2", "10.244.1.8"),
        workload("daemon", "node1", "10.244.1.9"),
        workload("hostnet", "node1", "10.0.0.1"),
        workload("not-started", "node1", "10.244.1.10"),
    ];
    let host = host_netns_inode(f.root());
    let found = assign("node1", &workloads, &sandboxes, host);
    let names: Vec<(&str, PathBuf)> = found
        .iter()
        .map(|(uid, p)| (uid.rsplit('/').next().unwrap(), p.clone()))
        .collect();
    assert_eq!(
        names,
        [
            ("echo", f.root().join("100/ns/net")),
            ("sleep", f.root().join("200/ns/net")),
        ]
    );

    // The pod stops, another starts: the next scan sees it.
    f.remove(100);
    f.remove(105);
    f.process(500, &pod_cgroup("dddd-4444"), "echo-2", "10.244.1.10");
    let sandboxes = scan(f.root()).unwrap();
    let found = assign("node1", &workloads, &sandboxes, host);
    let names: Vec<&str> = found
        .keys()
        .map(|uid| uid.rsplit('/').next().unwrap())
        .collect();
    assert_eq!(names, ["not-started", "sleep"]);
}

/// What discovery publishes for an incomplete input stays incomplete; once the input is
/// complete, so is the output, with the namespaces found.
#[tokio::test]
async fn the_output_is_incomplete_while_the_input_is() {
    use std::sync::Arc;
    use std::time::Duration;

    use crate::state::State;

    let f = Fixture::new();
    f.process(100, &pod_cgroup("aaaa-1111"), "echo", "10.244.1.7");
    let state = |complete: bool| {
        let mut b = State::builder();
        b.workload(workload("echo", "node1", "10.244.1.7")).unwrap();
        if !complete {
            b.incomplete("waiting for the first xDS sync (test)");
        }
        Arc::new(b.build())
    };
    let mut placeholder = State::builder();
    placeholder.incomplete("nothing yet");
    let (in_tx, in_rx) = tokio::sync::watch::channel(state(false));
    let (out_tx, mut out_rx) = tokio::sync::watch::channel(Arc::new(placeholder.build()));
    let config = DiscoveryConfig {
        node: "node1".into(),
        proc_root: f.root().to_owned(),
        rescan: Duration::from_secs(3600),
    };
    let task = spawn(config, in_rx, out_tx);
    let deadline = Duration::from_secs(10);
    let netns = Some(f.root().join("100/ns/net"));
    let uid = "Kubernetes//v1/Pod/default/echo";

    let placed = |s: &State| s.workload_by_uid(uid).is_some_and(|w| w.netns == netns);
    let out = tokio::time::timeout(deadline, out_rx.wait_for(|s| placed(s)))
        .await
        .expect("no output with the namespace placed")
        .unwrap()
        .clone();
    assert_eq!(
        out.incomplete(),
        Some("waiting for the first xDS sync (test)")
    );

    in_tx.send_replace(state(true));
    let out = tokio::time::timeout(deadline, out_rx.wait_for(|s| s.incomplete().is_none()))
        .await
        .expect("the complete input never made a complete output")
        .unwrap()
        .clone();
    assert!(placed(&out), "complete output without the namespace");
    task.abort();
}
