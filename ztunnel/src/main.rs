//! The ztunnel binary: reads its configuration, loads the capture programs and serves the
//! enrolled pods of this node until SIGTERM or SIGINT.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tokio::sync::watch;
use tracing::{error, info, warn};

use ztunnel::capture::Capture;
use ztunnel::config::Config;
use ztunnel::identity::{CertManager, LocalCa, ManagerConfig, SystemClock};
use ztunnel::proxy::Proxy;
use ztunnel::{handoff, readiness, source};

fn main() -> ExitCode {
    let config = Config::parse();
    init_logging(&config);
    raise_open_files_limit();
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

/// Every proxied connection holds two or three sockets: take the whole hard limit of open
/// files (the soft limit is often 1024).
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid, writable rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                warn!(
                    "cannot raise the open files limit: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.log))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    // Colours only for a person at a terminal; files and collectors get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true)
        .with_ansi(std::io::stdout().is_terminal());
    if config.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let initial = source::local::load(&config.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (tx, rx) = watch::channel(Arc::new(initial));
    let watch = source::watch::spawn_file_watch(config.config.clone(), tx, |err| {
        warn!("configuration not applied, keeping the last good one: {err}");
    });

    let ca = LocalCa::load_or_create(&config.ca_dir, &config.trust_domain)
        .with_context(|| format!("local CA in {}", config.ca_dir.display()))?
        .with_workload_ttl(config.cert_ttl());
    let roots = ca.roots();
    let certs = CertManager::new(
        Arc::new(ca),
        Arc::new(SystemClock),
        ManagerConfig::default(),
    );

    // A predecessor for this node hands over its listening sockets first (upgrade).
    let state_dir = config.state_dir();
    let inherited = match handoff::take_over(&state_dir) {
        Ok(found) => found.map(Arc::new),
        Err(err) => {
            warn!("could not take over from the previous ztunnel, starting afresh: {err}");
            None
        }
    };
    let capture = Arc::new(Capture::load(
        config.cgroup_root.as_deref(),
        &config.bpf_pin_dir(),
    )?);
    let proxy = Proxy::new(
        config.node.clone(),
        rx,
        capture,
        certs,
        roots,
        inherited,
        std::time::Duration::from_secs(config.handshake_timeout_secs),
    );
    let ready = readiness::serve(config.ready_addr, proxy.clone()).await?;
    let serving = tokio::spawn(proxy.clone().run());
    let mut synced = proxy.synced.subscribe();
    let _ = synced.wait_for(|s| *s).await;
    info!(node = %config.node, config = %config.config.display(), "ztunnel started");

    let successor = {
        let proxy = proxy.clone();
        handoff::serve_once(&state_dir, move || proxy.pods.handoff_sockets())
    };
    let replaced = tokio::select! {
        _ = shutdown_signal() => false,
        result = successor => match result {
            Ok(()) => true,
            Err(err) => {
                warn!("handoff socket: {err}; an upgrade will start afresh");
                shutdown_signal().await;
                false
            }
        },
    };
    ready.abort();
    drop(watch);
    proxy.draining.send_replace(true);
    if replaced {
        // The successor accepts from now on, with the same capture maps: stop accepting,
        // keep capture on, and let established connections finish.
        info!("replaced by a new ztunnel: draining established connections");
        serving.abort();
        proxy.pods.stop_accepting().await;
    } else {
        info!("shutting down: releasing captured pods");
        serving.abort();
        proxy.pods.stop_accepting().await;
        proxy.pods.clear(&proxy.capture);
    }
    let open = tokio::select! {
        open = proxy.drain(config.drain_deadline()) => open,
        _ = shutdown_signal() => proxy.active_connections(),
    };
    if open > 0 {
        warn!(open, "exiting with connections still open");
    }
    if !replaced {
        proxy.capture.unpin();
    }
    info!("ztunnel stopped");
    Ok(())
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
