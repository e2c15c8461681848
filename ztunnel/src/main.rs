//! The ztunnel binary: reads its configuration, loads the capture programs and serves the
//! enrolled pods of this node until SIGTERM or SIGINT.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tracing::{error, info, warn};

use ztunnel::capture::Capture;
use ztunnel::config::Config;
use ztunnel::grpc::GrpcTarget;
use ztunnel::identity::{
    CertManager, CertificateSource, IstioCa, LocalCa, ManagerConfig, SystemClock,
};
use ztunnel::proxy::Proxy;
use ztunnel::tls::TrustBundle;
use ztunnel::{readiness, source};

fn main() -> ExitCode {
    let config = Config::parse();
    init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ztunnel")
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            error!("cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.log))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true);
    if config.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let (rx, source) = source::start(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (ca, roots) = certificate_source(&config)?;
    let certs = CertManager::new(ca, Arc::new(SystemClock), ManagerConfig::default());

    let capture = Arc::new(Capture::load(config.cgroup_root.as_deref())?);
    let proxy = Proxy::new(config.node.clone(), rx, capture, certs, roots);
    let ready = readiness::serve(config.ready_addr, proxy.clone()).await?;
    match &config.xds_address {
        Some(xds) => info!(node = %config.node, %xds, "ztunnel started (xDS)"),
        None => info!(node = %config.node, config = ?config.config, "ztunnel started"),
    }
    let serving = tokio::spawn(proxy.clone().run());

    shutdown_signal().await;
    info!("shutting down: releasing captured pods");
    serving.abort();
    ready.abort();
    drop(source);
    proxy.pods.clear(&proxy.capture);
    Ok(())
}

/// Where workload certificates come from (the Istio CA at `--ca-address`, else the local CA
/// in `--ca-dir`) and the roots peers' certificates are checked against.
fn certificate_source(
    config: &Config,
) -> anyhow::Result<(Arc<dyn CertificateSource>, TrustBundle)> {
    use anyhow::Context as _;
    if let (Some(address), Some(root)) = (&config.ca_address, &config.ca_root_cert) {
        let pem = std::fs::read_to_string(root)
            .with_context(|| format!("CA root certificate {}", root.display()))?;
        let roots = TrustBundle::from_pem(&pem)
            .with_context(|| format!("CA root certificate {}", root.display()))?;
        let target = GrpcTarget {
            address: address.clone(),
            root_cert: Some(root.clone()),
            token_file: config.token_file.clone(),
            cluster_id: config.cluster_id.clone(),
        };
        let ca = IstioCa::new(target, config.cert_ttl()).context("Istio CA")?;
        return Ok((Arc::new(ca), roots));
    }
    let ca = LocalCa::load_or_create(&config.ca_dir, &config.trust_domain)
        .with_context(|| format!("local CA in {}", config.ca_dir.display()))?
        .with_workload_ttl(config.cert_ttl());
    let roots = ca.roots();
    Ok((Arc::new(ca), roots))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot install signal handlers; waiting forever");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
