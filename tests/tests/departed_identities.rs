//! A node holds a certificate only for the identities of its pods: when the last pod of an
//! identity leaves, its certificate is dropped (no longer served, renewed or exported), while
//! an identity another pod still runs as keeps its own.

use std::time::Duration;

use mesh_tests::mesh::{Mesh, PodSpec};
use mesh_tests::operator::{admin_json, sample, scrape};
use mesh_tests::wait_until;

const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const KEEP: &str = "spiffe://cluster.local/ns/default/sa/keep";

/// The identities node1 holds a certificate for, per `/config_dump` (admin, 15000).
fn dumped(mesh: &Mesh) -> Vec<String> {
    let dump = admin_json(mesh, "node1", "/config_dump");
    let mut ids: Vec<String> = dump["certificates"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|c| c["identity"].as_str().map(str::to_owned))
        .collect();
    ids.sort();
    ids
}

/// The identities with a certificate expiry series in node1's metrics (15020).
fn exported(mesh: &Mesh) -> Vec<&'static str> {
    let metrics = scrape(mesh, "node1");
    [KEEP, SLEEP]
        .into_iter()
        .filter(|id| {
            sample(
                &metrics,
                "ztunnel_certificate_expiry_timestamp_seconds",
                &[("identity", id)],
            ) > 0
        })
        .collect()
}

fn pods_enrolled(mesh: &Mesh) -> Vec<String> {
    let dump = admin_json(mesh, "node1", "/config_dump");
    let mut names: Vec<String> = dump["pods"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    names
}

#[test]
fn the_certificate_of_an_identity_leaves_with_its_last_pod() {
    let pods = vec![
        PodSpec::new("sleep-a", "node1", "sleep"),
        PodSpec::new("sleep-b", "node1", "sleep"),
        PodSpec::new("keep", "node1", "keep"),
    ];
    let mut mesh = Mesh::new(&["node1"], pods, Vec::new()).unwrap();
    mesh.start().unwrap();
    let both = vec![KEEP.to_owned(), SLEEP.to_owned()];
    wait_until(Duration::from_secs(10), || dumped(&mesh) == both)
        .unwrap_or_else(|_| panic!("certificates not issued: {:?}", dumped(&mesh)));
    assert_eq!(exported(&mesh), [KEEP, SLEEP]);

    // One of the two sleep pods goes: the other still needs the certificate.
    mesh.pods.retain(|p| p.name != "sleep-a");
    mesh.write_config().unwrap();
    wait_until(Duration::from_secs(10), || {
        pods_enrolled(&mesh) == ["keep", "sleep-b"]
    })
    .unwrap_or_else(|_| panic!("sleep-a not released: {:?}", pods_enrolled(&mesh)));
    assert_eq!(dumped(&mesh), both);

    // The last one goes: so does the certificate, from /config_dump and from the metrics.
    mesh.pods.retain(|p| p.name != "sleep-b");
    mesh.write_config().unwrap();
    wait_until(Duration::from_secs(10), || pods_enrolled(&mesh) == ["keep"])
        .unwrap_or_else(|_| panic!("sleep-b not released: {:?}", pods_enrolled(&mesh)));
    wait_until(Duration::from_secs(10), || dumped(&mesh) == [KEEP])
        .unwrap_or_else(|_| panic!("sleep's certificate kept: {:?}", dumped(&mesh)));
    assert_eq!(exported(&mesh), [KEEP]);
    mesh.ztunnel("node1")
        .wait_for_log(
            "no pod of this node has this identity any more",
            Duration::from_secs(5),
        )
        .unwrap();
}
