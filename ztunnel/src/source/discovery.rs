//! Kubernetes pod discovery through `/proc`: which network namespace is a local workload's.
//!
//! In a cluster nothing hands ztunnel a namespace path: it finds it. Every process of a pod
//! runs in the pod's cgroup, whose path names the pod UID (`.../kubepods-besteffort-pod<uid>
//! .slice/...` with the systemd driver, where the UID's `-` are `_`; `/kubepods/besteffort/
//! pod<uid>/...` with the cgroupfs driver), and every container of a pod shares one network
//! namespace, `/proc/<pid>/ns/net`. A scan groups processes by pod UID into sandboxes.
//!
//! Matching a sandbox to a workload: Istio's workload API has no pod UID (a workload's `uid`
//! is `<cluster>//v1/Pod/<namespace>/<name>`); Istio's in-pod ztunnel gets the UID, name and
//! namespace from its CNI node agent, which we do not have. What both sides do carry is the
//! pod IP: istiod sends it in `addresses`, and the sandbox's namespace holds it, readable
//! without entering the namespace from `/proc/<pid>/net/fib_trie` (IPv4, the `/32 host
//! LOCAL` entries) and `/proc/<pid>/net/if_inet6`. So a workload of this node is the sandbox
//! whose addresses contain one of the workload's. The UID keeps the scan to pod processes
//! (host daemons are never candidates), and a sandbox sharing the host's namespace
//! (a `hostNetwork` pod, whose IP is the node's) is never matched: its traffic is the node's.
//!
//! Pure parsing (`pod_uid`, `local_addresses`, `assign`) is separated from the directory walk
//! (`scan`), which takes the proc root as a parameter so tests run against a fixture tree.
//! What this must never do: give a workload a namespace that is not its pod's.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use crate::state::Workload;

/// A Kubernetes pod UID, normalised to the API's form (lowercase, `-` separators).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodUid(String);

impl PodUid {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PodUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The pod UID a `/proc/<pid>/cgroup` file names, if the process belongs to a pod: the
/// deepest path segment with `pod<uid>` (the segment starts with it or has it after a `-`,
/// and the UID, hex digits with `-` or `_`, runs to the segment's end or to `.slice`).
pub fn pod_uid(cgroup: &str) -> Option<PodUid> {
    let mut found = None;
    for line in cgroup.lines() {
        // `hierarchy-id:controllers:path`; the path may itself contain ':'.
        let Some(path) = line.splitn(3, ':').nth(2) else {
            continue;
        };
        for segment in path.split('/') {
            if let Some(uid) = segment_uid(segment) {
                found = Some(uid);
            }
        }
    }
    found
}

fn segment_uid(segment: &str) -> Option<PodUid> {
    let segment = segment.strip_suffix(".slice").unwrap_or(segment);
    let start = if let Some(rest) = segment.strip_prefix("pod") {
        rest
    } else {
        let at = segment.rfind("-pod")?;
        &segment[at + 4..]
    };
    let valid = !start.is_empty()
        && start
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b'-' || b == b'_')
        && start.bytes().any(|b| b.is_ascii_hexdigit());
    valid.then(|| PodUid(start.replace('_', "-").to_ascii_lowercase()))
}

/// The local (non-loopback, non-link-local) addresses of a network namespace, from its
/// `net/fib_trie` and `net/if_inet6` files (either may be empty).
pub fn local_addresses(fib_trie: &str, if_inet6: &str) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    let mut last: Option<Ipv4Addr> = None;
    for line in fib_trie.lines() {
        let line = line.trim();
        if let Some(ip) = line.strip_prefix("|-- ") {
            last = ip.trim().parse().ok();
        } else if line.starts_with("/32 host LOCAL")
            && let Some(ip) = last
            && !ip.is_loopback()
            && !out.contains(&IpAddr::V4(ip))
        {
            out.push(IpAddr::V4(ip));
        }
    }
    for line in if_inet6.lines() {
        let Some(hex) = line.split_whitespace().next() else {
            continue;
        };
        let Ok(bits) = u128::from_str_radix(hex, 16) else {
            continue;
        };
        let ip = Ipv6Addr::from(bits);
        if hex.len() == 32 && !ip.is_loopback() && !ip.is_unicast_link_local() {
            out.push(IpAddr::V6(ip));
        }
    }
    out
}

/// One pod's network namespace, as found under the proc root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    pub uid: PodUid,
    /// The lowest pid of the pod whose namespace could be read (usually the pause process).
    pub pid: u32,
    /// `<proc>/<pid>/ns/net`: valid as long as that process lives.
    pub netns: PathBuf,
    /// Inode of the namespace (what `stat` on the namespace file gives): identifies it.
    pub netns_inode: u64,
    pub addresses: Vec<IpAddr>,
}

/// Finds every pod sandbox under `proc_root` (`/proc`, or a fixture tree of the same shape).
/// Processes that vanish during the scan, or that cannot be read, are skipped.
pub fn scan(proc_root: &Path) -> io::Result<Vec<Sandbox>> {
    let mut pids: Vec<u32> = std::fs::read_dir(proc_root)?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    let mut by_uid: BTreeMap<PodUid, Sandbox> = BTreeMap::new();
    for pid in pids {
        let dir = proc_root.join(pid.to_string());
        let Ok(cgroup) = std::fs::read_to_string(dir.join("cgroup")) else {
            continue;
        };
        let Some(uid) = pod_uid(&cgroup) else {
            continue;
        };
        if by_uid.contains_key(&uid) {
            continue;
        }
        let netns = dir.join("ns").join("net");
        let Ok(meta) = std::fs::metadata(&netns) else {
            continue;
        };
        let read = |f: &str| std::fs::read_to_string(dir.join("net").join(f)).unwrap_or_default();
        let addresses = local_addresses(&read("fib_trie"), &read("if_inet6"));
        by_uid.insert(
            uid.clone(),
            Sandbox {
                uid,
                pid,
                netns,
                netns_inode: meta.ino(),
                addresses,
            },
        );
    }
    Ok(by_uid.into_values().collect())
}

/// The namespace inode of the host (the proc root's pid 1), whose sandboxes are never
/// matched (`hostNetwork` pods).
pub fn host_netns_inode(proc_root: &Path) -> Option<u64> {
    std::fs::metadata(proc_root.join("1").join("ns").join("net"))
        .ok()
        .map(|m| m.ino())
}

/// The namespace of each workload of `node` that has a sandbox: by workload uid. A sandbox
/// is given to at most one workload, and never when it is the host's namespace.
pub fn assign<'a>(
    node: &str,
    workloads: impl IntoIterator<Item = &'a Workload>,
    sandboxes: &[Sandbox],
    host_inode: Option<u64>,
) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut taken = HashSet::new();
    for w in workloads {
        if w.node != node {
            continue;
        }
        let found = sandboxes.iter().find(|s| {
            Some(s.netns_inode) != host_inode
                && !taken.contains(&s.netns_inode)
                && s.addresses.iter().any(|a| w.workload_ips.contains(a))
        });
        if let Some(s) = found {
            taken.insert(s.netns_inode);
            out.insert(w.uid.clone(), s.netns.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests;

/// What the discovery task needs.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    /// This node (`--node`): only its workloads are looked for.
    pub node: String,
    /// `/proc` (a fixture tree in tests).
    pub proc_root: PathBuf,
    /// How often to rescan when nothing else happens (pods start and stop without the
    /// control plane saying so at the same moment).
    pub rescan: std::time::Duration,
}

/// Republishes each state of `input` on `output` with this node's workloads given the
/// namespaces found under the proc root; rescans on every input change and every
/// `rescan`, publishing again when what was found changes. An incomplete input gives an
/// incomplete output ([`State::incomplete`]), so the output is complete only once the input
/// is and a scan has placed its workloads. Ends when either side closes.
///
/// [`State::incomplete`]: crate::state::State::incomplete
pub fn spawn(
    config: DiscoveryConfig,
    mut input: tokio::sync::watch::Receiver<std::sync::Arc<crate::state::State>>,
    output: tokio::sync::watch::Sender<std::sync::Arc<crate::state::State>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(config.rescan);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last: Option<BTreeMap<String, PathBuf>> = None;
        let mut input_changed = true;
        loop {
            let state = input.borrow_and_update().clone();
            let root = config.proc_root.clone();
            let scanned = tokio::task::spawn_blocking(move || {
                let host = host_netns_inode(&root);
                scan(&root).map(|s| (s, host))
            })
            .await;
            match scanned {
                Ok(Ok((sandboxes, host))) => {
                    let found = assign(
                        &config.node,
                        state.workloads().map(|w| &**w),
                        &sandboxes,
                        host,
                    );
                    if input_changed || last.as_ref() != Some(&found) {
                        if last.as_ref() != Some(&found) {
                            tracing::info!(
                                pods = found.len(),
                                sandboxes = sandboxes.len(),
                                "pod discovery: namespaces found: {:?}",
                                found.keys().collect::<Vec<_>>()
                            );
                        }
                        output.send_replace(std::sync::Arc::new(state.with_netns(&found)));
                        last = Some(found);
                    }
                }
                Ok(Err(e)) => tracing::warn!(
                    proc = %config.proc_root.display(),
                    "pod discovery: cannot scan: {e}"
                ),
                Err(e) => tracing::warn!("pod discovery: scan task failed: {e}"),
            }
            tokio::select! {
                changed = input.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    input_changed = true;
                }
                _ = tick.tick() => input_changed = false,
                _ = output.closed() => return,
            }
        }
    })
}
