//! The waypoint links the node agent's lower layer (identity, TLS, HBONE, state, xDS client,
//! metrics) without its kernel-facing layer: no aya, no eBPF crate. Checked on the real
//! dependency graph cargo resolves for the waypoint alone.

use std::path::Path;
use std::process::Command;

fn normal_dependencies(package: &str) -> String {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let out = Command::new(cargo)
        .current_dir(workspace)
        .args([
            "tree",
            "--offline",
            "-p",
            package,
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .output()
        .expect("running cargo tree");
    assert!(
        out.status.success(),
        "cargo tree -p {package} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("cargo tree prints UTF-8")
}

fn crate_names(tree: &str) -> Vec<&str> {
    tree.lines()
        .filter_map(|line| line.split_whitespace().next())
        .collect()
}

#[test]
fn waypoint_links_ztunnel_without_aya_or_ebpf() {
    let tree = normal_dependencies("waypoint");
    let names = crate_names(&tree);
    assert!(
        names.contains(&"ztunnel"),
        "the waypoint should reuse ztunnel's library:\n{tree}"
    );
    let kernel: Vec<&&str> = names
        .iter()
        .filter(|n| n.starts_with("aya") || n.starts_with("ztunnel-ebpf") || **n == "sendfd")
        .collect();
    assert!(
        kernel.is_empty(),
        "the waypoint pulls in kernel-facing crates {kernel:?}:\n{tree}"
    );
}

#[test]
fn ztunnel_itself_still_links_aya() {
    // The check above would pass vacuously if the crate names were read wrong.
    let tree = normal_dependencies("ztunnel");
    assert!(
        crate_names(&tree).contains(&"aya"),
        "ztunnel's own graph should show aya:\n{tree}"
    );
}

#[test]
fn only_the_waypoint_links_kube_and_its_tls_uses_ring() {
    let node = normal_dependencies("ztunnel");
    let node_names = crate_names(&node);
    let kube: Vec<&&str> = node_names
        .iter()
        .filter(|n| n.starts_with("kube") || n.starts_with("k8s-openapi"))
        .collect();
    assert!(kube.is_empty(), "ztunnel pulls in {kube:?}:\n{node}");
    let waypoint = normal_dependencies("waypoint");
    let names = crate_names(&waypoint);
    assert!(
        names.contains(&"kube-runtime") && names.contains(&"k8s-openapi"),
        "the waypoint's Kubernetes source should show kube:\n{waypoint}"
    );
    assert!(
        !names.iter().any(|n| n.starts_with("aws-lc")),
        "kube's rustls should use ring, not aws-lc:\n{waypoint}"
    );
}
