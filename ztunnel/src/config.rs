//! ztunnel's configuration: one typed struct from flags and environment, validated once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// The node agent of the ambient mesh.
#[derive(Debug, Clone, Parser)]
#[command(name = "ztunnel", version, about)]
pub struct Config {
    /// Local-mode configuration file (workloads, services, policies, namespaces), watched for
    /// changes. Required unless `--xds-address` is given.
    #[arg(long, env = "ZTUNNEL_CONFIG", required_unless_present = "xds_address")]
    pub config: Option<PathBuf>,

    /// xDS mode: istiod's address (`https://istiod.istio-system.svc:15012`, or `http://...`
    /// for a plaintext control plane); workloads, services and policies come from there
    /// instead of `--config`.
    #[arg(long, env = "XDS_ADDRESS", conflicts_with = "config")]
    pub xds_address: Option<String>,

    /// Root certificate (PEM) istiod's xDS serving certificate must chain to (default: the
    /// `--ca-root-cert`).
    #[arg(long, env = "XDS_ROOT_CA")]
    pub xds_root_cert: Option<PathBuf>,

    /// Istio CA address (`https://istiod.istio-system.svc:15012`): workload certificates come
    /// from `IstioCertificateService/CreateCertificate` instead of the local CA in `--ca-dir`.
    #[arg(long, env = "CA_ADDRESS", requires = "ca_root_cert")]
    pub ca_address: Option<String>,

    /// The mesh root certificate (PEM): the Istio CA's TLS is verified against it, and so are
    /// peers' workload certificates when certificates come from `--ca-address`.
    #[arg(long, env = "CA_ROOT_CA")]
    pub ca_root_cert: Option<PathBuf>,

    /// Bearer token file sent to istiod (xDS and CA), re-read for every request, e.g. the
    /// projected token `/var/run/secrets/tokens/istio-token`.
    #[arg(long, env = "AUTH_TOKEN")]
    pub token_file: Option<PathBuf>,

    /// Cluster this agent runs in; sent to istiod (`clusterid` header, `CLUSTER_ID` node
    /// metadata).
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,

    /// This agent's own pod, namespace and IP, which make its xDS node id
    /// (`ztunnel~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`).
    #[arg(long, env = "POD_NAME", default_value = "ztunnel")]
    pub pod_name: String,

    /// This agent's own namespace (part of its xDS node id).
    #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
    pub pod_namespace: String,

    /// This agent's own IP (part of its xDS node id).
    #[arg(long, env = "INSTANCE_IP", default_value = "127.0.0.1")]
    pub instance_ip: String,

    /// xDS mode without Kubernetes pod discovery: the network namespace of this node's pod
    /// `<namespace>/<name>` is `<dir>/<namespace>.<name>` (a link or bind mount, e.g. to
    /// `/var/run/netns/<pod>`). Without it, xDS workloads have no namespace and are not
    /// enrolled.
    #[arg(long, env = "ZTUNNEL_NETNS_DIR", conflicts_with = "config")]
    pub netns_dir: Option<PathBuf>,

    /// xDS mode in Kubernetes: find this node's pods' network namespaces under this proc
    /// root (normally `/proc`): processes whose cgroup names a pod UID, matched to workloads
    /// by pod IP; rescanned on every xDS change and every 2 seconds.
    #[arg(long, env = "ZTUNNEL_PROC_ROOT", conflicts_with_all = ["config", "netns_dir"])]
    pub proc_root: Option<PathBuf>,

    /// Name of this node: ztunnel acts for the workloads whose `node` is this name.
    #[arg(long, env = "NODE_NAME")]
    pub node: String,

    /// Directory of the local CA (`ca-key.pem`, `root-cert.pem`); created if both are absent.
    #[arg(long, env = "ZTUNNEL_CA_DIR", default_value = "/var/lib/ztunnel/ca")]
    pub ca_dir: PathBuf,

    /// SPIFFE trust domain of this mesh.
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// Lifetime of workload certificates, in seconds; they are renewed at half-life.
    #[arg(long, env = "ZTUNNEL_CERT_TTL_SECS", default_value_t = 86400, value_parser = clap::value_parser!(u64).range(2..))]
    pub cert_ttl_secs: u64,

    /// cgroup v2 directory the outbound capture programs attach to (default: the first
    /// cgroup2 mount; with none, as under `ip netns exec`, one mounted at
    /// <state-dir>/cgroup2).
    #[arg(long, env = "ZTUNNEL_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,

    /// Directory for the pinned capture maps, on a BPF filesystem (mounted at /sys/fs/bpf if
    /// needed). Default: /sys/fs/bpf/ztunnel/<node>.
    #[arg(long, env = "ZTUNNEL_BPF_PIN_DIR")]
    pub bpf_pin_dir: Option<PathBuf>,

    /// Directory for the upgrade handoff socket. Default: /var/run/ztunnel/<node>.
    #[arg(long, env = "ZTUNNEL_STATE_DIR")]
    pub state_dir: Option<PathBuf>,

    /// How long a stopping or replaced ztunnel keeps serving its established connections
    /// before it exits anyway, in seconds.
    #[arg(long, env = "ZTUNNEL_DRAIN_DEADLINE_SECS", default_value_t = 600)]
    pub drain_deadline_secs: u64,

    /// Seconds a peer may take to complete the TLS handshake on a pod's HBONE port before
    /// its connection is closed (slow or stalled clients).
    #[arg(long, env = "ZTUNNEL_HANDSHAKE_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub handshake_timeout_secs: u64,

    /// Seconds to wait for a connection to open (to a peer's HBONE port, an application, a
    /// passthrough destination) and for a tunnel to be answered.
    #[arg(long, env = "ZTUNNEL_CONNECT_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub connect_timeout_secs: u64,

    /// Threads carrying traffic (Istio's name and default). One thread hands work between a
    /// tunnel's tasks without waking another thread, which is cheaper per request on small
    /// nodes; more threads carry more parallel bulk traffic.
    #[arg(long, env = "ZTUNNEL_WORKER_THREADS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
    pub worker_threads: u16,

    /// Seconds between HTTP/2 PINGs on HBONE connections, inbound and pooled outbound; a peer
    /// that leaves one unanswered for twice that (gone, or no longer reading) has its
    /// connection closed, with the tunnels it carried.
    #[arg(long, env = "ZTUNNEL_HBONE_KEEPALIVE_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub hbone_keepalive_secs: u64,

    /// Seconds an HBONE tunnel (inbound or outbound) may have bytes waiting to be sent
    /// without the peer opening any flow-control window before it is reset, with the
    /// application's connection behind it (a peer that answers PINGs but never reads would
    /// hold both forever). Any window granted restarts the clock. 0: never.
    #[arg(long, alias = "hbone-stall-timeout", env = "ZTUNNEL_HBONE_STALL_TIMEOUT_SECS",
        default_value_t = crate::hbone::DEFAULT_STALL_TIMEOUT.as_secs())]
    pub hbone_stall_timeout_secs: u64,

    /// Where inbound connections reach the application from: `client`, the client's own
    /// address (the TCP peer policy saw: the client pod for mesh traffic, the peer for
    /// plaintext), as Istio's in-pod ztunnel does; or `loopback`, 127.0.0.6 (::1 over IPv6),
    /// as Istio's sidecars do, with no change to the pod's routing.
    #[arg(long, env = "ZTUNNEL_INBOUND_SOURCE", value_enum, default_value_t = InboundSource::Client)]
    pub inbound_source: InboundSource,

    /// Readiness endpoint (`/healthz/ready`).
    #[arg(long, env = "ZTUNNEL_READY_ADDR", default_value = "0.0.0.0:15021")]
    pub ready_addr: SocketAddr,

    /// Admin endpoint (`/config_dump`, `/connections`, `/logging`, `/quitquitquit`). Keep it
    /// on the node's loopback: it is never opened in a pod's namespace.
    #[arg(long, env = "ZTUNNEL_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,

    /// Prometheus endpoint (`/metrics`, `/stats/prometheus`).
    #[arg(long, env = "ZTUNNEL_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,

    /// Log filter (tracing `EnvFilter` syntax, e.g. `info,ztunnel::proxy=debug`); `RUST_LOG`
    /// overrides it.
    #[arg(long, env = "ZTUNNEL_LOG", default_value = "info")]
    pub log: String,

    /// Log lines as JSON objects instead of text.
    #[arg(long, env = "ZTUNNEL_LOG_JSON")]
    pub log_json: bool,

    /// Test only, never in a deployment: the first enrolment attempt of each pod fails at its
    /// outbound capture step (after its listeners are open or taken over), to test the
    /// retry, e.g. during an upgrade.
    #[arg(long, env = "ZTUNNEL_TEST_FAIL_FIRST_CAPTURE")]
    pub test_fail_first_capture: bool,
}

/// Source address of ztunnel's connections to applications (`--inbound-source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum InboundSource {
    /// The client's own address, in the family of the destination (falling back to the
    /// loopback address when the client has none in that family).
    #[default]
    Client,
    /// 127.0.0.6, or ::1 over IPv6.
    Loopback,
}

impl Config {
    pub fn cert_ttl(&self) -> Duration {
        Duration::from_secs(self.cert_ttl_secs)
    }

    pub fn bpf_pin_dir(&self) -> PathBuf {
        self.bpf_pin_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/sys/fs/bpf/ztunnel").join(&self.node))
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/var/run/ztunnel").join(&self.node))
    }

    pub fn drain_deadline(&self) -> Duration {
        Duration::from_secs(self.drain_deadline_secs)
    }

    /// `--hbone-stall-timeout-secs`, `None` when 0 (never).
    pub fn hbone_stall_timeout(&self) -> Option<Duration> {
        Some(Duration::from_secs(self.hbone_stall_timeout_secs)).filter(|d| !d.is_zero())
    }
}
