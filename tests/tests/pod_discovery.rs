//! Kubernetes pod discovery through `/proc` on a real kernel: a process in a cgroup whose
//! path names a pod UID, running in a pod's network namespace, is found, and its namespace
//! is the pod's (same inode as `/var/run/netns/<pod>`); when it stops, it is gone.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mesh_tests::netns::netns_path;
use mesh_tests::{Proc, Topology, wait_until};
use ztunnel::identity::Identity;
use ztunnel::source::discovery::{assign, host_netns_inode, scan};
use ztunnel::state::Workload;

/// The first cgroup2 mount.
fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .expect("no cgroup2 mount")
}

/// A cgroup directory removed on drop (after its processes are gone).
struct Cgroup(PathBuf);

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = wait_until(Duration::from_secs(5), || {
            std::fs::remove_dir(&self.0).is_ok() || !self.0.exists()
        });
    }
}

fn inode(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().ino()
}

#[test]
fn finds_a_real_pod_namespace_through_proc() {
    mesh_tests::require_root();
    let mut topo = Topology::new().unwrap();
    topo.add_node("node1").unwrap();
    let pod = topo.add_pod("node1", "echo").unwrap();

    // The kubelet's layout (systemd driver): the UID's '-' written as '_'.
    let uid = format!("{:08x}-1111-2222-3333-444455556666", std::process::id());
    let cgroup = Cgroup(cgroup2_root().join(format!(
        "{}-kubepods-besteffort-pod{}.slice",
        topo.prefix(),
        uid.replace('-', "_")
    )));
    std::fs::create_dir(&cgroup.0).unwrap();

    // The pod's process: `Proc` enters the namespace before exec (setns, no remount of
    // /sys), then it joins the cgroup (its pid written to cgroup.procs).
    let logs = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("sleep");
    cmd.arg("600");
    let mut app = Proc::spawn("app", &pod.netns, cmd, logs.path()).unwrap();
    std::fs::write(cgroup.0.join("cgroup.procs"), app.pid().to_string()).unwrap();

    let mut w = Workload::new(
        "Kubernetes//v1/Pod/default/echo",
        "echo",
        Identity::new("cluster.local", "default", "echo").unwrap(),
    );
    w.node = "node1".into();
    w.workload_ips = vec![pod.ip.into()];

    let proc_root = Path::new("/proc");
    let sandboxes = scan(proc_root).unwrap();
    let found = sandboxes
        .iter()
        .find(|s| s.uid.as_str() == uid)
        .unwrap_or_else(|| panic!("pod {uid} not found in {sandboxes:?}"));
    assert_eq!(found.pid, app.pid());
    assert_eq!(found.netns_inode, inode(&netns_path(&pod.netns)));
    assert!(found.addresses.contains(&pod.ip.into()), "{found:?}");

    let assigned = assign("node1", [&w], &sandboxes, host_netns_inode(proc_root));
    let netns = assigned.get(&w.uid).expect("workload not matched");
    assert_eq!(inode(netns), inode(&netns_path(&pod.netns)));
    // Not for another node's workload.
    w.node = "node2".into();
    assert!(assign("node1", [&w], &sandboxes, host_netns_inode(proc_root)).is_empty());

    // The pod stops: the next scan no longer finds it.
    app.kill();
    let gone = scan(proc_root)
        .unwrap()
        .iter()
        .all(|s| s.uid.as_str() != uid);
    assert!(gone, "stopped pod still found");
}
