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
    /// changes.
    #[arg(long, env = "ZTUNNEL_CONFIG")]
    pub config: PathBuf,

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
    /// cgroup2 mount).
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
}
