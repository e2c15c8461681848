//! The waypoint L7 proxy. The HBONE/HTTP server is not built yet; today the binary checks
//! route config files the way the proxy will read them:
//!
//! `waypoint --check FILE|DIR...` reads each file (or every `.yaml`/`.yml`/`.json` file of a
//! directory), compiles the route table, prints every error and warning with file, line,
//! document, resource and field path, and exits 1 if any resource was rejected.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use waypoint::config::{self, LoadOptions, Severity};
use waypoint::route::{self, CompileOptions};

/// Shared L7 proxy of the ambient mesh.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Check these route config files or directories (VirtualService, DestinationRule,
    /// HTTPRoute; other kinds are skipped) and exit: 0 if all load, 1 if any is rejected.
    #[arg(long, value_name = "PATH", num_args = 1.., required = true)]
    check: Vec<PathBuf>,
    /// Namespace of resources that do not name one (kubectl's current namespace).
    #[arg(long, default_value = "default")]
    namespace: String,
    /// The cluster's DNS domain, for short host names.
    #[arg(long, default_value = "cluster.local")]
    domain: String,
    /// Istio's root namespace, whose DestinationRules apply mesh-wide.
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let load = LoadOptions {
        default_namespace: args.namespace.clone(),
    };
    let mut loaded = config::Loaded::default();
    for p in &args.check {
        let l = config::load_path(p, &load);
        loaded.resources.extend(l.resources);
        loaded.diagnostics.extend(l.diagnostics);
        loaded.rejected.extend(l.rejected);
        loaded.skipped += l.skipped;
    }
    let compiled = route::compile(
        &loaded.resources,
        &CompileOptions {
            domain_suffix: args.domain,
            root_namespace: args.root_namespace,
        },
    );
    let all = loaded.diagnostics.iter().chain(&compiled.diagnostics);
    let mut errors = 0;
    let mut warnings = 0;
    for d in all {
        match d.severity() {
            Severity::Error => errors += 1,
            Severity::Warning => warnings += 1,
        }
        println!("{d}");
    }
    let rejected = loaded.rejected.len() + compiled.rejected.len();
    println!(
        "{} resources accepted, {rejected} rejected, {} of other kinds skipped; {errors} errors, {warnings} warnings; routes for {} hosts",
        loaded.resources.len() - compiled.rejected.len(),
        loaded.skipped,
        compiled.table.hosts().len(),
    );
    if errors > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
