//! A mesh fed by xDS instead of the local YAML file: the mesh's declared pods and services
//! become `istio.workload.Address` resources served by the in-process [`XdsServer`], which
//! listens on the fabric (198.18.0.254:15010, istiod's plaintext xDS port), reachable from
//! every node namespace. Pods' network namespaces are given to ztunnel through
//! `--netns-dir` (links to `/var/run/netns/<pod>`), the stand-in for Kubernetes discovery.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ztunnel::proto::istio::workload as pbw;

use crate::mesh::{Mesh, PodSpec, ServiceSpec};
use crate::netns::netns_path;
use crate::xds::{XdsServer, octets};

/// Where the control plane listens, on the fabric's bridge.
pub const XDS_ADDR: &str = "198.18.0.254:15010";

/// How long the ztunnels may take to receive and apply a push.
const SYNC: Duration = Duration::from_secs(30);

impl Mesh {
    /// Like [`Mesh::start`], with the ztunnels fed by an in-process xDS server serving the
    /// declared pods and services. Returns once every node has applied them and is ready.
    pub fn start_xds(&mut self) -> io::Result<()> {
        let addr: SocketAddr = XDS_ADDR.parse().map_err(io::Error::other)?;
        crate::ca::add_control_plane_address(self.topo.fabric(), addr)?;
        let mut server = XdsServer::new(self.topo.fabric(), addr)?;
        server.start()?;
        self.xds = Some(server);
        self.sync_xds()?;
        let nodes = self.nodes();
        for node in &nodes {
            self.start_ztunnel(node)?;
        }
        let names: Vec<&str> = nodes.iter().map(String::as_str).collect();
        self.xds()
            .wait_caught_up(&names, SYNC)
            .map_err(|e| io::Error::other(format!("ztunnels did not apply the xDS push: {e}")))?;
        for node in &nodes {
            self.wait_ready(node, SYNC)?;
        }
        Ok(())
    }

    /// The running control plane (panics when the mesh is not in xDS mode).
    pub fn xds(&self) -> &XdsServer {
        self.xds.as_ref().expect("mesh not started with start_xds")
    }

    pub fn xds_mut(&mut self) -> &mut XdsServer {
        self.xds.as_mut().expect("mesh not started with start_xds")
    }

    /// Pushes the current declaration (`pods`, `services`): what changed is sent, what is
    /// no longer declared is removed. The xDS counterpart of [`Mesh::write_config`].
    pub fn sync_xds(&self) -> io::Result<()> {
        self.link_netns()?;
        let mut want = BTreeMap::new();
        for pod in &self.pods {
            let w = self.workload_resource(pod);
            want.insert(
                w.uid.clone(),
                pbw::Address {
                    r#type: Some(pbw::address::Type::Workload(w)),
                },
            );
        }
        for svc in &self.services {
            want.insert(
                format!("{}/{}", svc.namespace, hostname(svc)),
                pbw::Address {
                    r#type: Some(pbw::address::Type::Service(service_resource(svc))),
                },
            );
        }
        self.xds().set_addresses(want);
        Ok(())
    }

    /// Waits until every node running a ztunnel has applied the last push.
    pub fn wait_xds_applied(&self) -> io::Result<()> {
        let nodes: Vec<&str> = self.ztunnels.iter().map(|(n, _)| n.as_str()).collect();
        self.xds()
            .wait_caught_up(&nodes, SYNC)
            .map_err(|e| io::Error::other(format!("xDS push not applied: {e}")))
    }

    /// `--netns-dir` of the ztunnels in xDS mode.
    pub fn netns_links(&self) -> PathBuf {
        self.dir.path().join("netns")
    }

    /// `<netns-dir>/<namespace>.<name>` -> `/var/run/netns/<pod netns>` for every pod of the
    /// topology (namespace `default` unless declared otherwise), so a test may also push
    /// workloads by hand.
    fn link_netns(&self) -> io::Result<()> {
        let dir = self.netns_links();
        std::fs::create_dir_all(&dir)?;
        for host in self.topo.pods() {
            let ns = self
                .pods
                .iter()
                .find(|p| p.name == host.name)
                .map_or("default", |p| p.namespace.as_str());
            let link = dir.join(format!("{ns}.{}", host.name));
            if link.symlink_metadata().is_err() {
                std::os::unix::fs::symlink(netns_path(&host.netns), link)?;
            }
        }
        Ok(())
    }

    /// The nodes with at least one declared pod, in declaration order.
    fn nodes(&self) -> Vec<String> {
        let mut nodes: Vec<String> = Vec::new();
        for pod in &self.pods {
            if !nodes.contains(&pod.node) {
                nodes.push(pod.node.clone());
            }
        }
        nodes
    }

    /// The workload resource istiod would send for `pod`.
    pub fn workload_resource(&self, pod: &PodSpec) -> pbw::Workload {
        let host = self.topo.pod(&pod.name);
        let label = |key: &str| {
            pod.labels
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        let mut addresses = vec![octets(host.ip.into())];
        if self.dual_stack {
            addresses.push(octets(host.ip6.into()));
        }
        let protocol = if pod.protocol.eq_ignore_ascii_case("HBONE") {
            pbw::TunnelProtocol::Hbone
        } else {
            pbw::TunnelProtocol::None
        };
        let services = pod.services.iter().fold(
            BTreeMap::<String, pbw::PortList>::new(),
            |mut m, (svc, port, target)| {
                let key = format!("{ns}/{svc}.{ns}.svc.cluster.local", ns = pod.namespace);
                m.entry(key).or_default().ports.push(pbw::Port {
                    service_port: u32::from(*port),
                    target_port: u32::from(*target),
                    ..Default::default()
                });
                m
            },
        );
        pbw::Workload {
            uid: format!("cluster1//v1/Pod/{}/{}", pod.namespace, pod.name),
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            addresses,
            tunnel_protocol: protocol as i32,
            service_account: pod.service_account.clone(),
            node: pod.node.clone(),
            // istiod derives these from the pod's `app` and `version` labels (the workload API
            // carries no other labels): what DestinationRule subsets select on.
            canonical_name: label("app").unwrap_or_else(|| pod.name.clone()),
            canonical_revision: label("version").unwrap_or_default(),
            services: services.into_iter().collect(),
            cluster_id: "cluster1".to_owned(),
            ..Default::default()
        }
    }
}

fn hostname(svc: &ServiceSpec) -> String {
    format!("{}.{}.svc.cluster.local", svc.name, svc.namespace)
}

/// The service resource istiod would send for `svc`.
pub fn service_resource(svc: &ServiceSpec) -> pbw::Service {
    let mut addresses = vec![pbw::NetworkAddress {
        network: String::new(),
        address: octets(svc.vip.into()),
        length: None,
    }];
    if let Some(v6) = svc.vip6 {
        addresses.push(pbw::NetworkAddress {
            network: String::new(),
            address: octets(v6.into()),
            length: None,
        });
    }
    pbw::Service {
        name: svc.name.clone(),
        namespace: svc.namespace.clone(),
        hostname: hostname(svc),
        addresses,
        ports: svc
            .ports
            .iter()
            .map(|(port, target)| pbw::Port {
                service_port: u32::from(*port),
                target_port: u32::from(*target),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}
