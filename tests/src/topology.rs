//! A simulated cluster: nodes and pods as network namespaces on this machine.
//!
//! ```text
//!   fabric ns: bridge br0 ─┬─ node1 eth0 198.18.0.1 ── cbr0 198.19.1.1 ── pods 198.19.1.10+
//!                          ├─ node2 eth0 198.18.0.2 ── cbr0 198.19.2.1 ── pods 198.19.2.10+
//!                          └─ outside hosts 198.18.0.200+ (not in the mesh)
//!
//! Every host is dual-stack: IPv6 fd00:198:18::<n> on the fabric, fd00:198:19:<node>::<n> for
//! pods (unique local addresses, inside the test's namespaces only).
//! ```
//! Nodes route each other's pod subnets. Every name carries a prefix with this process's pid,
//! so parallel tests never collide, and namespaces left by a killed run (whose pid is gone)
//! are removed by the next run. Dropping the topology deletes every namespace, which takes
//! the veths and bridges with it.

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::netns::{NETNS_DIR, ip, run};

/// Prefix of every namespace the tests create.
pub const PREFIX: &str = "ztt";

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

#[derive(Debug, Clone)]
pub struct Pod {
    /// Namespace name (also the pod's identity for the harness).
    pub netns: String,
    pub name: String,
    pub node: String,
    pub ip: Ipv4Addr,
    /// Every host also has an IPv6 address (unique local, fd00:198:...).
    pub ip6: Ipv6Addr,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub netns: String,
    pub index: u8,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
}

#[derive(Debug)]
pub struct Topology {
    prefix: String,
    fabric: String,
    nodes: BTreeMap<String, Node>,
    pods: BTreeMap<String, Pod>,
    outside: BTreeMap<String, Pod>,
    namespaces: Vec<String>,
}

impl Topology {
    /// An empty fabric (a bridge in its own namespace).
    pub fn new() -> io::Result<Topology> {
        remove_stale();
        let prefix = format!(
            "{PREFIX}{}x{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        );
        let fabric = format!("{prefix}-fab");
        let mut topo = Topology {
            prefix,
            fabric: fabric.clone(),
            nodes: BTreeMap::new(),
            pods: BTreeMap::new(),
            outside: BTreeMap::new(),
            namespaces: Vec::new(),
        };
        topo.add_netns(&fabric)?;
        ip(&fabric, &["link", "add", "br0", "type", "bridge"])?;
        ip(&fabric, &["link", "set", "br0", "up"])?;
        Ok(topo)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The namespace of the fabric (where a capture of inter-node traffic can run).
    pub fn fabric(&self) -> &str {
        &self.fabric
    }

    fn add_netns(&mut self, name: &str) -> io::Result<()> {
        run("ip", &["netns", "add", name])?;
        self.namespaces.push(name.to_owned());
        // No duplicate address detection on the interfaces to come: a link-local address
        // stays tentative for about two seconds, and until then a router cannot solicit its
        // neighbours, so the first IPv6 packets through each node would wait that long.
        sysctl(name, "net.ipv6.conf.default.accept_dad", "0")?;
        ip(name, &["link", "set", "lo", "up"])
    }

    /// Adds node `name` (index from 1) with its pod bridge, routed to every other node.
    pub fn add_node(&mut self, name: &str) -> io::Result<Node> {
        let index = u8::try_from(self.nodes.len() + 1).map_err(io::Error::other)?;
        let netns = format!("{}-{name}", self.prefix);
        self.add_netns(&netns)?;
        let node_ip = Ipv4Addr::new(198, 18, 0, index);
        let node_ip6: Ipv6Addr = format!("fd00:198:18::{index}")
            .parse()
            .map_err(io::Error::other)?;
        plug(
            &netns,
            &format!("{node_ip}/24"),
            &self.fabric,
            &format!("n{index}"),
            "br0",
        )?;
        addr6(&netns, &format!("{node_ip6}/64"), "eth0")?;
        ip(&netns, &["link", "add", "cbr0", "type", "bridge"])?;
        ip(
            &netns,
            &[
                "addr",
                "add",
                &format!("198.19.{index}.1/24"),
                "dev",
                "cbr0",
            ],
        )?;
        ip(&netns, &["link", "set", "cbr0", "up"])?;
        addr6(&netns, &format!("fd00:198:19:{index}::1/64"), "cbr0")?;
        sysctl(&netns, "net.ipv4.ip_forward", "1")?;
        sysctl(&netns, "net.ipv6.conf.all.forwarding", "1")?;
        let node = Node {
            name: name.to_owned(),
            netns: netns.clone(),
            index,
            ip: node_ip,
            ip6: node_ip6,
        };
        for other in self.nodes.values() {
            route_pods(&netns, other)?;
            route_pods(&other.netns, &node)?;
        }
        for host in self.outside.values() {
            route_pods(&host.netns, &node)?;
        }
        self.nodes.insert(name.to_owned(), node.clone());
        Ok(node)
    }

    /// Adds pod `name` on `node`; its address is 198.19.<node>.<10 + n>.
    pub fn add_pod(&mut self, node: &str, name: &str) -> io::Result<Pod> {
        let node = self
            .nodes
            .get(node)
            .cloned()
            .ok_or_else(|| io::Error::other(format!("no node {node}")))?;
        let n = self.pods.values().filter(|p| p.node == node.name).count();
        let host = u8::try_from(10 + n).map_err(io::Error::other)?;
        let pod_ip = Ipv4Addr::new(198, 19, node.index, host);
        let pod_ip6: Ipv6Addr = format!("fd00:198:19:{}::{host}", node.index)
            .parse()
            .map_err(io::Error::other)?;
        let netns = format!("{}-{name}", self.prefix);
        self.add_netns(&netns)?;
        plug(
            &netns,
            &format!("{pod_ip}/24"),
            &node.netns,
            &format!("p{host}"),
            "cbr0",
        )?;
        ip(
            &netns,
            &[
                "route",
                "add",
                "default",
                "via",
                &format!("198.19.{}.1", node.index),
            ],
        )?;
        addr6(&netns, &format!("{pod_ip6}/64"), "eth0")?;
        ip(
            &netns,
            &[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("fd00:198:19:{}::1", node.index),
            ],
        )?;
        let pod = Pod {
            netns,
            name: name.to_owned(),
            node: node.name.clone(),
            ip: pod_ip,
            ip6: pod_ip6,
        };
        self.pods.insert(name.to_owned(), pod.clone());
        Ok(pod)
    }

    /// Adds a host outside the mesh, on the fabric (198.18.0.200 + n).
    pub fn add_outside_host(&mut self, name: &str) -> io::Result<Pod> {
        let n = u8::try_from(200 + self.outside.len()).map_err(io::Error::other)?;
        let host_ip = Ipv4Addr::new(198, 18, 0, n);
        let host_ip6: Ipv6Addr = format!("fd00:198:18::{n}")
            .parse()
            .map_err(io::Error::other)?;
        let netns = format!("{}-{name}", self.prefix);
        self.add_netns(&netns)?;
        plug(
            &netns,
            &format!("{host_ip}/24"),
            &self.fabric,
            &format!("o{n}"),
            "br0",
        )?;
        addr6(&netns, &format!("{host_ip6}/64"), "eth0")?;
        for node in self.nodes.values() {
            route_pods(&netns, node)?;
        }
        let host = Pod {
            netns,
            name: name.to_owned(),
            node: String::new(),
            ip: host_ip,
            ip6: host_ip6,
        };
        self.outside.insert(name.to_owned(), host.clone());
        Ok(host)
    }

    /// Routes from the fabric's own namespace to every node's pods, so a pod can reach a
    /// service listening on the fabric (the in-process control plane) and get its answers.
    pub fn route_fabric_to_pods(&self) -> io::Result<()> {
        // IPv4 only: the fabric namespace has no IPv6 address of its own.
        for node in self.nodes.values() {
            ip(
                &self.fabric,
                &[
                    "route",
                    "add",
                    &format!("198.19.{}.0/24", node.index),
                    "via",
                    &node.ip.to_string(),
                ],
            )?;
        }
        Ok(())
    }

    pub fn node(&self, name: &str) -> &Node {
        &self.nodes[name]
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .get(name)
            .or_else(|| self.outside.get(name))
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.pods.values()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            let _ = run("ip", &["netns", "del", ns]);
        }
    }
}

/// Gives namespace `ns` an `eth0` with address `cidr`, wired by a veth to `peer_if` in
/// `peer_ns`, where it joins `bridge`.
fn plug(ns: &str, cidr: &str, peer_ns: &str, peer_if: &str, bridge: &str) -> io::Result<()> {
    ip(
        ns,
        &[
            "link", "add", "eth0", "type", "veth", "peer", "name", peer_if, "netns", peer_ns,
        ],
    )?;
    ip(peer_ns, &["link", "set", peer_if, "master", bridge, "up"])?;
    ip(ns, &["addr", "add", cidr, "dev", "eth0"])?;
    ip(ns, &["link", "set", "eth0", "up"])
}

fn route_pods(from_ns: &str, to: &Node) -> io::Result<()> {
    ip(
        from_ns,
        &[
            "route",
            "add",
            &format!("198.19.{}.0/24", to.index),
            "via",
            &to.ip.to_string(),
        ],
    )?;
    ip(
        from_ns,
        &[
            "-6",
            "route",
            "add",
            &format!("fd00:198:19:{}::/64", to.index),
            "via",
            &to.ip6.to_string(),
        ],
    )
}

/// Adds an IPv6 address without duplicate address detection, so it is usable at once.
fn addr6(ns: &str, cidr: &str, dev: &str) -> io::Result<()> {
    ip(ns, &["-6", "addr", "add", cidr, "dev", dev, "nodad"])
}

fn sysctl(ns: &str, key: &str, value: &str) -> io::Result<()> {
    run(
        "ip",
        &[
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            &format!("{key}={value}"),
        ],
    )
    .map(|_| ())
}

/// Deletes namespaces and pinned BPF maps left behind by test processes that no longer run.
pub fn remove_stale() {
    for (dir, remove) in [
        (NETNS_DIR, remove_netns as fn(&str)),
        ("/sys/fs/bpf", remove_pins as fn(&str)),
    ] {
        remove_stale_in(dir, remove);
    }
}

fn remove_netns(name: &str) {
    let _ = run("ip", &["netns", "del", name]);
}

fn remove_pins(name: &str) {
    let _ = std::fs::remove_dir_all(std::path::Path::new("/sys/fs/bpf").join(name));
}

fn remove_stale_in(dir: &str, remove: fn(&str)) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            remove(&name);
        }
    }
}
