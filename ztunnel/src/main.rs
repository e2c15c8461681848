//! The ztunnel binary: reads its configuration, loads the capture programs and serves the
//! enrolled pods of this node until SIGTERM or SIGINT.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tracing::{error, info, warn};

use ztunnel::admin::{self, LogControl, SourceInfo};
use ztunnel::capture::Capture;
use ztunnel::config::Config;
use ztunnel::grpc::GrpcTarget;
use ztunnel::identity::{
    CertManager, CertificateSource, IstioCa, LocalCa, ManagerConfig, SystemClock,
};
use ztunnel::proxy::Proxy;
use ztunnel::tls::TrustBundle;
use ztunnel::{handoff, readiness, source};

fn main() -> ExitCode {
    // `ztunnel admin ...` is the debug CLI; anything else runs the agent.
    if std::env::args().nth(1).as_deref() == Some("admin") {
        return ztunnel::admin::cli::main(std::env::args().skip(1));
    }
    let config = Config::parse();
    let logging = init_logging(&config);
    sys::raise_open_files_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(config.worker_threads))
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
    match runtime.block_on(run(config, logging)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Installs the log subscriber; the returned control changes its filter at runtime.
fn init_logging(config: &Config) -> LogControl {
    use tracing_subscriber::EnvFilter;
    // RUST_LOG wins over --log; an invalid filter falls back to the next one.
    let initial = std::env::var("RUST_LOG")
        .ok()
        .filter(|f| EnvFilter::try_new(f).is_ok())
        .or_else(|| {
            EnvFilter::try_new(&config.log)
                .is_ok()
                .then(|| config.log.clone())
        })
        .unwrap_or_else(|| "info".to_owned());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(&initial))
        .with_target(true)
        .with_ansi(ansi);
    macro_rules! install {
        ($builder:expr) => {{
            let builder = $builder.with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            LogControl::new(
                &initial,
                Box::new(move |f: &str| {
                    let filter = EnvFilter::try_new(f).map_err(|e| format!("{f:?}: {e}"))?;
                    handle.reload(filter).map_err(|e| e.to_string())
                }),
            )
        }};
    }
    if config.log_json {
        install!(builder.json())
    } else {
        install!(builder)
    }
}

async fn run(config: Config, logging: LogControl) -> anyhow::Result<()> {
    let (rx, running) = source::start(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (ca, roots) = certificate_source(&config)?;
    let certs = CertManager::new(ca, Arc::new(SystemClock), ManagerConfig::default());

    let state_dir = config.state_dir();
    // With no cgroup v2 mount (`ip netns exec` remounts /sys), one of ztunnel's own.
    let cgroup_root =
        ztunnel::capture::cgroup::root(config.cgroup_root.as_deref(), &state_dir.join("cgroup2"))?;
    // Another ztunnel of this node that offers no hand-over here (its state directory is
    // not ours): attaching a second set of programs to its maps and then failing to take
    // its pods' ports would break the pods' traffic. Refuse; it keeps serving.
    let pin_dir = config.bpf_pin_dir();
    let sharing = Capture::programs_sharing(&pin_dir);
    if !sharing.is_empty() && !handoff::offered(&state_dir, std::time::Duration::from_secs(5)).await
    {
        anyhow::bail!(
            "another ztunnel serves node {} (programs {sharing:?} use the capture maps pinned in \
             {}) but offers no hand-over at {}: an upgrade needs both processes to share the \
             state directory (--state-dir; the chart's /var/run/ztunnel hostPath); not starting, \
             the running one keeps serving",
            config.node,
            pin_dir.display(),
            handoff::socket_path(&state_dir).display()
        );
    }
    let capture = Arc::new(Capture::load(Some(&cgroup_root), &pin_dir)?);
    let proxy = Proxy::new(
        config.node.clone(),
        rx,
        capture,
        certs,
        roots,
        ztunnel::proxy::ProxyOptions {
            handshake_timeout: std::time::Duration::from_secs(config.handshake_timeout_secs),
            connect_timeout: std::time::Duration::from_secs(config.connect_timeout_secs),
            hbone_keepalive: std::time::Duration::from_secs(config.hbone_keepalive_secs),
            hbone_stall_timeout: config.hbone_stall_timeout(),
            test_fail_first_capture: config.test_fail_first_capture,
            inbound_source: config.inbound_source,
        },
    );
    let ready = readiness::serve(config.ready_addr, proxy.clone()).await?;
    let source = match &running {
        source::Running::File(watch) => SourceInfo::new(
            "file",
            &config
                .config
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            watch.stats(),
        ),
        source::Running::Xds(client) => SourceInfo::xds(
            config.xds_address.as_deref().unwrap_or_default(),
            client.stats(),
        ),
    };
    let _versions = source.follow(proxy.state.clone());
    let (agent, operator) = admin::start(
        proxy.clone(),
        source,
        logging,
        config.admin_addr,
        config.metrics_addr,
    )
    .await?;
    // Nothing changes before the configuration is complete (in xDS mode: istiod has answered
    // every type once). In an upgrade the predecessor keeps accepting meanwhile: the sockets
    // are taken over only once this process can serve them.
    let mut state = proxy.state.clone();
    let complete = tokio::select! {
        complete = state.wait_for(|s| s.incomplete().is_none()) => complete.is_ok(),
        _ = shutdown_signal() => false,
        _ = agent.shutdown.notified() => false,
    };
    drop(state);
    if !complete {
        // Capture, the pins and any predecessor are as they were: nothing was touched.
        info!("ztunnel stopped before its first complete configuration; nothing changed");
        return Ok(());
    }
    // A predecessor for this node hands over its listening sockets (upgrade).
    match handoff::take_over(&state_dir) {
        Ok(Some(inherited)) => proxy.inherit(inherited),
        Ok(None) => {}
        Err(err) => warn!("could not take over from the previous ztunnel, starting afresh: {err}"),
    }
    let serving = tokio::spawn(proxy.clone().run());
    let mut synced = proxy.synced.subscribe();
    let _ = synced.wait_for(|s| *s).await;
    match &config.xds_address {
        Some(xds) => info!(node = %config.node, %xds, "ztunnel started (xDS)"),
        None => info!(node = %config.node, config = ?config.config, "ztunnel started"),
    }
    sys::release_startup_memory();

    let successor = {
        let proxy = proxy.clone();
        handoff::serve_once(&state_dir, move || proxy.pods.handoff_sockets())
    };
    let replaced = tokio::select! {
        _ = shutdown_signal() => false,
        _ = agent.shutdown.notified() => false,
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
    operator.abort();
    drop(running);
    proxy.draining.send_replace(true);
    if replaced {
        // The successor accepts from now on, with the same capture maps: stop accepting,
        // keep capture on, and let established connections finish.
        info!("replaced by a new ztunnel: draining established connections");
        // The pods' namespaces stay set up for the successor, whatever this process drops.
        proxy.capture.source_routing().keep_in_place();
        serving.abort();
        proxy.pods.stop_accepting().await;
    } else {
        info!("shutting down: releasing captured pods");
        serving.abort();
        proxy.pods.stop_accepting().await;
        proxy.pods.clear(&proxy.capture);
    }
    // A signal during the drain ends it, except the first one after a hand-over: Kubernetes
    // sends SIGTERM to the old pod as soon as its successor is ready, and the old pod's
    // connections must still finish (within the pod's grace period, which the chart keeps
    // longer than the drain deadline).
    let signals_to_stop = if replaced { 2 } else { 1 };
    let open = tokio::select! {
        open = proxy.drain(config.drain_deadline()) => open,
        _ = shutdown_signals(signals_to_stop) => proxy.active_connections(),
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
    shutdown_signals(1).await;
}

/// Returns at the `n`th SIGTERM or SIGINT; the ones before are logged.
async fn shutdown_signals(n: usize) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot install signal handlers; waiting forever");
        return std::future::pending().await;
    };
    for seen in 1..=n {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        if seen < n {
            info!(
                "signal while draining after a hand-over: the drain goes on (another signal ends it)"
            );
        }
    }
}

/// The binary's two libc calls, fenced here so the rest of the binary stays free of `unsafe`.
mod sys {
    // malloc_trim and getrlimit/setrlimit have no safe wrapper in std.
    #![allow(unsafe_code)]

    use tracing::warn;

    /// Gives the heap freed since startup back to the system: loading the eBPF programs parses
    /// the kernel's BTF (megabytes, all freed), which the allocator would otherwise keep.
    pub(crate) fn release_startup_memory() {
        #[cfg(target_env = "gnu")]
        // SAFETY: malloc_trim only returns free heap pages to the kernel; any thread may call it.
        unsafe {
            libc::malloc_trim(0);
        }
    }

    /// Every proxied connection holds two or three sockets: take the whole hard limit of open
    /// files (the soft limit is often 1024).
    pub(crate) fn raise_open_files_limit() {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the valid rlimit struct it is given.
        let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) };
        if got != 0 || limit.rlim_cur >= limit.rlim_max {
            return;
        }
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads the valid, initialised rlimit struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) } != 0 {
            warn!(
                "cannot raise the open files limit: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}
