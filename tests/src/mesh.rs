//! A running mesh: a topology, a local-mode config file describing its pods, and one
//! ztunnel per node. The config can be rewritten while the mesh runs.

use std::fmt::Write as _;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::netns::{in_netns, netns_path};
use crate::process::{Proc, binary, wait_until};
use crate::topology::Topology;

/// A workload as the test declares it.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub name: String,
    pub node: String,
    pub namespace: String,
    pub service_account: String,
    /// `HBONE` (in the mesh) or `TCP`.
    pub protocol: String,
    /// (service name, service port, target port)
    pub services: Vec<(String, u16, u16)>,
    pub labels: Vec<(String, String)>,
}

impl PodSpec {
    pub fn new(name: &str, node: &str, sa: &str) -> PodSpec {
        PodSpec {
            name: name.to_owned(),
            node: node.to_owned(),
            namespace: "default".to_owned(),
            service_account: sa.to_owned(),
            protocol: "HBONE".to_owned(),
            services: Vec::new(),
            labels: Vec::new(),
        }
    }

    pub fn service(mut self, name: &str, port: u16, target: u16) -> PodSpec {
        self.services.push((name.to_owned(), port, target));
        self
    }
}

/// A service as the test declares it; VIPs are 198.18.100.<n>.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub name: String,
    pub namespace: String,
    pub vip: Ipv4Addr,
    /// An IPv6 VIP as well (dual-stack meshes).
    pub vip6: Option<std::net::Ipv6Addr>,
    pub ports: Vec<(u16, u16)>,
}

pub struct Mesh {
    /// First field: the processes stop (and print their logs on failure) before the
    /// directory holding the logs and the namespaces they run in go away.
    pub ztunnels: Vec<(String, Proc)>,
    /// The in-process control plane when the mesh runs in xDS mode (`start_xds`); stops
    /// after the ztunnels, before the namespaces it listens in go away.
    pub xds: Option<crate::xds::XdsServer>,
    /// The in-process Istio CA when the ztunnels take their certificates from one
    /// (`use_istio_ca`); stops after the ztunnels, before the namespaces go away.
    pub istio_ca: Option<crate::ca::CaServer>,
    pub topo: Topology,
    pub dir: tempfile::TempDir,
    pub pods: Vec<PodSpec>,
    pub services: Vec<ServiceSpec>,
    /// Namespace name -> dataplane-mode label value (absent: not enrolled).
    pub namespaces: Vec<(String, Option<String>)>,
    /// More namespace labels: (namespace, key, value), e.g. `istio.io/use-waypoint`.
    pub namespace_labels: Vec<(String, String, String)>,
    /// Service labels: (service name, key, value), e.g. `istio.io/use-waypoint`.
    pub service_labels: Vec<(String, String, String)>,
    /// (service name, service port, protocol): the local config's `appProtocols`.
    pub service_protocols: Vec<(String, u16, String)>,
    /// Extra YAML appended under `policies:`.
    pub policies: String,
    /// Extra command-line flags for every ztunnel started from now on.
    pub ztunnel_args: Vec<String>,
    /// Declare pods with their IPv6 address as well (every host has one).
    pub dual_stack: bool,
    /// Run ztunnel with only these capabilities (e.g. `net_admin`), instead of all of root's.
    pub capabilities: Option<Vec<String>>,
    /// Start ztunnel the way a person tries a node by hand, `ip netns exec NODE ztunnel ...`:
    /// a mount namespace of its own with a fresh `/sys`, so no cgroup v2 mount.
    pub ip_netns_exec: bool,
    /// `RUST_LOG` for the ztunnels: debug by default (tests read the logs), quieter for
    /// benchmarks, where a log line per connection would be measured too.
    pub log_filter: String,
}

impl Mesh {
    /// Builds nodes and pods; nothing runs yet.
    pub fn new(nodes: &[&str], pods: Vec<PodSpec>, services: Vec<ServiceSpec>) -> io::Result<Mesh> {
        crate::require_root();
        let mut topo = Topology::new()?;
        for node in nodes {
            topo.add_node(node)?;
        }
        for pod in &pods {
            topo.add_pod(&pod.node, &pod.name)?;
        }
        let dir = tempfile::Builder::new().prefix("ztunnel-test-").tempdir()?;
        // One CA for the whole mesh, created before any ztunnel starts.
        ztunnel::identity::LocalCa::load_or_create(&dir.path().join("ca"), "cluster.local")
            .map_err(io::Error::other)?;
        Ok(Mesh {
            topo,
            dir,
            pods,
            services,
            namespaces: vec![("default".to_owned(), Some("ambient".to_owned()))],
            namespace_labels: Vec::new(),
            service_labels: Vec::new(),
            service_protocols: Vec::new(),
            policies: String::new(),
            ztunnel_args: Vec::new(),
            dual_stack: false,
            capabilities: None,
            ip_netns_exec: false,
            log_filter: "info,ztunnel=debug".to_owned(),
            ztunnels: Vec::new(),
            xds: None,
            istio_ca: None,
        })
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("mesh.yaml")
    }

    /// The local-mode YAML for the current declaration.
    pub fn config_yaml(&self) -> String {
        let mut y = String::from("namespaces:\n");
        for (ns, mode) in &self.namespaces {
            let _ = writeln!(y, "  - name: {ns}");
            let mut labels: Vec<(&str, &str)> = mode
                .iter()
                .map(|m| ("istio.io/dataplane-mode", m.as_str()))
                .collect();
            labels.extend(
                self.namespace_labels
                    .iter()
                    .filter(|(n, _, _)| n == ns)
                    .map(|(_, k, v)| (k.as_str(), v.as_str())),
            );
            if labels.is_empty() {
                let _ = writeln!(y, "    labels: {{}}");
            } else {
                y.push_str("    labels:\n");
                for (k, v) in labels {
                    let _ = writeln!(y, "      {k}: {v}");
                }
            }
        }
        y.push_str("workloads:\n");
        for pod in &self.pods {
            let host = self.topo.pod(&pod.name);
            let ip = if self.dual_stack {
                format!("{}\", \"{}", host.ip, host.ip6)
            } else {
                host.ip.to_string()
            };
            let netns = netns_path(&self.topo.pod(&pod.name).netns);
            let _ = write!(
                y,
                "  - uid: cluster1//v1/Pod/{ns}/{name}\n    name: {name}\n    namespace: {ns}\n    serviceAccount: {sa}\n    workloadIps: [\"{ip}\"]\n    protocol: {proto}\n    node: {node}\n    netns: {netns}\n    canonicalName: {name}\n",
                ns = pod.namespace,
                name = pod.name,
                sa = pod.service_account,
                proto = pod.protocol,
                node = pod.node,
                netns = netns.display(),
            );
            if !pod.labels.is_empty() {
                y.push_str("    labels:\n");
                for (k, v) in &pod.labels {
                    let _ = writeln!(y, "      {k}: {v}");
                }
            }
            if !pod.services.is_empty() {
                y.push_str("    services:\n");
                for (svc, port, target) in &pod.services {
                    let _ = writeln!(
                        y,
                        "      \"{ns}/{svc}.{ns}.svc.cluster.local\":\n        {port}: {target}",
                        ns = pod.namespace
                    );
                }
            }
        }
        y.push_str("services:\n");
        for svc in &self.services {
            let _ = write!(
                y,
                "  - name: {name}\n    namespace: {ns}\n    hostname: {name}.{ns}.svc.cluster.local\n    vips: [\"/{vip}\"]\n    ports:\n",
                name = svc.name,
                ns = svc.namespace,
                vip = match svc.vip6 {
                    Some(v6) => format!("{}\", \"/{v6}", svc.vip),
                    None => svc.vip.to_string(),
                }
            );
            for (port, target) in &svc.ports {
                let _ = writeln!(y, "      {port}: {target}");
            }
            let labels: Vec<_> = self
                .service_labels
                .iter()
                .filter(|(name, _, _)| *name == svc.name)
                .collect();
            if !labels.is_empty() {
                y.push_str("    labels:\n");
                for (_, k, v) in labels {
                    let _ = writeln!(y, "      {k}: {v}");
                }
            }
            let protocols: Vec<_> = self
                .service_protocols
                .iter()
                .filter(|(name, _, _)| *name == svc.name)
                .collect();
            if !protocols.is_empty() {
                y.push_str("    appProtocols:\n");
                for (_, port, proto) in protocols {
                    let _ = writeln!(y, "      {port}: {proto}");
                }
            }
        }
        if self.services.is_empty() {
            y = y.replace("services:\n", "services: []\n");
        }
        y.push_str("policies:\n");
        y.push_str(&self.policies);
        if self.policies.trim().is_empty() {
            y = y.replace("policies:\n", "policies: []\n");
        }
        y
    }

    /// Writes the config atomically (rename), so a watcher never reads half a file.
    pub fn write_config(&self) -> io::Result<()> {
        let tmp = self.dir.path().join("mesh.yaml.tmp");
        std::fs::write(&tmp, self.config_yaml())?;
        std::fs::rename(tmp, self.config_path())
    }

    /// Writes the config and starts a ztunnel on every node, waiting until each is ready.
    pub fn start(&mut self) -> io::Result<()> {
        self.write_config()?;
        let nodes: Vec<String> = self.pods.iter().map(|p| p.node.clone()).collect();
        let mut unique: Vec<String> = Vec::new();
        for n in nodes {
            if !unique.contains(&n) {
                unique.push(n);
            }
        }
        for node in unique {
            self.start_ztunnel(&node)?;
        }
        Ok(())
    }

    pub fn start_ztunnel(&mut self, node: &str) -> io::Result<()> {
        let proc = self.spawn_ztunnel(node, "", &[])?;
        self.ztunnels.retain(|(n, _)| n != node);
        self.ztunnels.push((node.to_owned(), proc));
        self.wait_ready(node, Duration::from_secs(30))
    }

    /// Starts a second ztunnel for `node` that takes over from the running one (upgrade),
    /// waits until it is ready, and returns the old process, which drains and exits.
    pub fn upgrade_ztunnel(&mut self, node: &str, generation: u32) -> io::Result<Proc> {
        let old = self.start_successor(node, generation, &[])?;
        // Both processes answer on the readiness port for a while: wait for the new one.
        self.ztunnel(node)
            .wait_for_log("ztunnel started", Duration::from_secs(30))?;
        self.wait_ready(node, Duration::from_secs(30))?;
        Ok(old)
    }

    /// Starts a second ztunnel for `node` (with `extra` flags besides the mesh's) that will
    /// take over from the running one, without waiting for anything; it becomes
    /// [`Mesh::ztunnel`] and the old process is returned.
    pub fn start_successor(
        &mut self,
        node: &str,
        generation: u32,
        extra: &[&str],
    ) -> io::Result<Proc> {
        if !self.ztunnels.iter().any(|(n, _)| n == node) {
            return Err(io::Error::other(format!("no ztunnel on {node}")));
        }
        let proc = self.spawn_ztunnel(node, &format!("-{generation}"), extra)?;
        Ok(self.set_ztunnel(node, proc).expect("checked above"))
    }

    /// Makes `proc`, started by the test itself (e.g. as the chart's pod), the ztunnel of
    /// `node`; returns the one it replaces.
    pub fn set_ztunnel(&mut self, node: &str, proc: Proc) -> Option<Proc> {
        match self.ztunnels.iter_mut().find(|(n, _)| n == node) {
            Some((_, old)) => Some(std::mem::replace(old, proc)),
            None => {
                self.ztunnels.push((node.to_owned(), proc));
                None
            }
        }
    }

    /// Where `node`'s ztunnels pin their capture maps (unique per test run).
    pub fn pin_dir(&self, node: &str) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/{}-{node}", self.topo.prefix()))
    }

    fn spawn_ztunnel(&self, node: &str, suffix: &str, extra: &[&str]) -> io::Result<Proc> {
        let netns = self.topo.node(node).netns.clone();
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        if self.ip_netns_exec {
            argv.extend(["ip", "netns", "exec", &netns].map(Into::into));
        }
        if let Some(caps) = &self.capabilities {
            // Only these capabilities survive exec (util-linux setpriv).
            let keep: Vec<String> = caps.iter().map(|c| format!("+{c}")).collect();
            argv.push("setpriv".into());
            argv.push(format!("--bounding-set=-all,{}", keep.join(",")).into());
            argv.push("--".into());
        }
        argv.push(binary("ztunnel").into());
        // Both `ip netns exec` and setpriv exec the next program: the pid is ztunnel's.
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        match &self.xds {
            Some(xds) => cmd
                .arg("--xds-address")
                .arg(xds.url())
                .arg("--netns-dir")
                .arg(self.netns_links()),
            None => cmd.arg("--config").arg(self.config_path()),
        };
        cmd.arg("--node")
            .arg(node)
            .arg("--ca-dir")
            .arg(self.dir.path().join("ca"))
            .arg("--bpf-pin-dir")
            .arg(self.pin_dir(node));
        // The node's state directory (the hand-over socket), unless `extra` names another.
        if !extra.contains(&"--state-dir") {
            cmd.arg("--state-dir")
                .arg(self.dir.path().join(format!("{node}-state")));
        }
        cmd.args(&self.ztunnel_args)
            .args(extra)
            .env("RUST_LOG", &self.log_filter);
        Proc::spawn(
            &format!("ztunnel-{node}{suffix}"),
            &netns,
            cmd,
            self.dir.path(),
        )
    }

    pub fn ztunnel(&mut self, node: &str) -> &mut Proc {
        &mut self
            .ztunnels
            .iter_mut()
            .find(|(n, _)| n == node)
            .unwrap_or_else(|| panic!("no ztunnel on {node}"))
            .1
    }

    /// Waits until `node`'s ztunnel answers 200 on /healthz/ready.
    pub fn wait_ready(&mut self, node: &str, timeout: Duration) -> io::Result<()> {
        let netns = self.topo.node(node).netns.clone();
        let mut exited = None;
        let ready = wait_until(timeout, || {
            exited = self.ztunnel(node).exited();
            exited.is_some()
                || http_get(&netns, "127.0.0.1:15021".parse().unwrap(), "/healthz/ready")
                    .map(|(status, _)| status == 200)
                    .unwrap_or(false)
        });
        if let Some(status) = exited {
            let log = self.ztunnel(node).log();
            return Err(io::Error::other(format!(
                "ztunnel on {node} exited ({status}); log:\n{log}"
            )));
        }
        ready.map_err(|_| {
            let log = self.ztunnel(node).log();
            io::Error::other(format!(
                "ztunnel on {node} not ready in {timeout:?}; log:\n{log}"
            ))
        })
    }

    /// The mesh's CA, to issue certificates in tests.
    pub fn ca(&self) -> ztunnel::identity::LocalCa {
        ztunnel::identity::LocalCa::load_or_create(&self.dir.path().join("ca"), "cluster.local")
            .unwrap_or_else(|e| panic!("mesh CA: {e}"))
    }

    /// The pod's address.
    pub fn ip(&self, pod: &str) -> Ipv4Addr {
        self.topo.pod(pod).ip
    }

    pub fn netns(&self, pod: &str) -> String {
        self.topo.pod(pod).netns.clone()
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        // Processes first (they may hold the pins), then the pinned maps they leave.
        let nodes: Vec<String> = self.ztunnels.iter().map(|(n, _)| n.clone()).collect();
        self.ztunnels.clear();
        for node in nodes {
            let _ = std::fs::remove_dir_all(self.pin_dir(&node));
        }
    }
}

/// A minimal HTTP/1.0 GET from inside a namespace: (status, body).
pub fn http_get(netns: &str, addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let path = path.to_owned();
    in_netns(netns, move || -> io::Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let status = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| io::Error::other(format!("not an HTTP response: {resp:?}")))?;
        let body = resp.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
        Ok((status, body))
    })?
}

/// An mTLS connection (ALPN `h2`) from namespace `from` with `cert` to `peer` (an
/// `ip:15008`), which must prove `server`: what lies under HBONE, for tests that speak
/// HTTP/2 over it themselves.
pub async fn mtls_connect(
    mesh: &Mesh,
    from: &str,
    cert: &ztunnel::identity::WorkloadCert,
    server: ztunnel::identity::Identity,
    peer: SocketAddr,
) -> io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tls =
        ztunnel::tls::client_config(cert, &mesh.ca().roots(), server).map_err(io::Error::other)?;
    let netns = mesh.topo.pod(from).netns.clone();
    let std = in_netns(&netns, move || {
        TcpStream::connect_timeout(&peer, Duration::from_secs(5))
    })??;
    std.set_nonblocking(true)?;
    let tcp = tokio::net::TcpStream::from_std(std)?;
    let name = rustls::pki_types::ServerName::IpAddress(peer.ip().into());
    tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
}

/// Sends one CONNECT for `authority` with extra request `headers`, over mTLS with `cert`
/// from namespace `from` to `peer`, and returns the status the peer answered.
pub async fn connect_status_with_headers(
    mesh: &Mesh,
    from: &str,
    cert: &ztunnel::identity::WorkloadCert,
    server: ztunnel::identity::Identity,
    peer: SocketAddr,
    authority: SocketAddr,
    headers: &[(&str, &str)],
) -> io::Result<http::StatusCode> {
    let tls = mtls_connect(mesh, from, cert, server, peer).await?;
    let (send, connection) = h2::client::handshake(tls).await.map_err(io::Error::other)?;
    tokio::spawn(connection);
    let mut send = send.ready().await.map_err(io::Error::other)?;
    let mut req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(authority.to_string());
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req.body(()).map_err(io::Error::other)?;
    let (response, _stream) = send.send_request(req, false).map_err(io::Error::other)?;
    let response = response.await.map_err(io::Error::other)?;
    Ok(response.status())
}

/// Opens an HBONE tunnel (real mTLS) from namespace `from` with `cert`, to `peer` (an
/// `ip:15008`) that must prove `server`, asking for `authority`: what a peer ztunnel does.
pub async fn tunnel(
    mesh: &Mesh,
    from: &str,
    cert: &ztunnel::identity::WorkloadCert,
    server: ztunnel::identity::Identity,
    peer: SocketAddr,
    authority: SocketAddr,
) -> Result<ztunnel::hbone::H2Stream, ztunnel::hbone::HboneError> {
    use ztunnel::hbone::{ConnectHeaders, Pool, PoolConfig, PoolKey};
    let tls =
        ztunnel::hbone::ClientTls::new(cert, &mesh.ca().roots(), server.clone()).map_err(|e| {
            ztunnel::hbone::HboneError::Tls {
                addr: peer,
                source: e,
            }
        })?;
    let pool = Pool::new(PoolConfig::default());
    let key = PoolKey {
        src: cert.identity.clone(),
        src_addr: None,
        dst: peer,
        dst_identity: server,
    };
    let netns = mesh.topo.pod(from).netns.clone();
    let connect = || {
        let netns = netns.clone();
        async move {
            let std = in_netns(&netns, move || {
                TcpStream::connect_timeout(&peer, Duration::from_secs(5))
            })??;
            std.set_nonblocking(true)?;
            tokio::net::TcpStream::from_std(std)
        }
    };
    pool.connect(key, authority, &ConnectHeaders::default(), connect, tls)
        .await
}

/// Writes a certificate chain and key as PEM files (`<name>.crt`, `<name>.key` in `dir`), for
/// clients such as curl.
pub fn write_pem(
    dir: &std::path::Path,
    name: &str,
    cert: &ztunnel::identity::WorkloadCert,
) -> io::Result<(PathBuf, PathBuf)> {
    let chain: String = cert
        .chain
        .iter()
        .map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.as_ref().to_vec())))
        .collect();
    let key = pem::encode(&pem::Pem::new(
        "PRIVATE KEY",
        cert.key().secret_der().to_vec(),
    ));
    let (c, k) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, chain)?;
    std::fs::write(&k, key)?;
    Ok((c, k))
}
