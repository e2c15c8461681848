//! A container of a rendered pod template, run as the kubelet runs it, as a process of the
//! test: its args and environment only (downward-API fields filled in for the test's node
//! and pod), its volumes bound at their mount paths in a mount namespace and root of the
//! process's own, and only the capabilities it adds. The root is a tmpfs mirroring the
//! machine's (each entry bound in), with the directories a mount path needs made in the
//! tmpfs, so nothing is created or mounted on the machine itself.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::chart::container_env;
use crate::netns::{MountStep, private_mounts_before_exec};
use crate::process::Proc;

/// `PATH` as container images commonly set it (the image's config gives it, not the pod).
const IMAGE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Kubernetes' default `terminationGracePeriodSeconds`.
const DEFAULT_GRACE_SECS: u64 = 30;

/// What a pod template says about one of its containers.
#[derive(Debug, Clone)]
pub struct Container {
    pub args: Vec<String>,
    /// `NAME=value` in order, downward-API fields filled in, `$(NAME)` expanded.
    pub env: Vec<(String, String)>,
    pub mounts: Vec<VolumeMount>,
    /// `securityContext.capabilities.add`, in setpriv's spelling (`bpf`, `net_admin`).
    pub capabilities: Vec<String>,
    /// The pod's `terminationGracePeriodSeconds`: how long the kubelet waits after SIGTERM.
    pub termination_grace: Duration,
}

/// A `volumeMounts` entry and the volume behind it.
#[derive(Debug, Clone)]
pub struct VolumeMount {
    pub volume: String,
    pub mount_path: PathBuf,
    pub read_only: bool,
    /// The volume's `hostPath.path`; `None` for other kinds of volume.
    pub host_path: Option<PathBuf>,
}

impl Container {
    /// Container `name` of `pod` (a pod template's `spec`), with the downward-API `fields`
    /// (field path, value) the kubelet would fill in.
    pub fn from_pod_spec(pod: &Value, name: &str, fields: &[(&str, &str)]) -> Container {
        let container = pod["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("the pod has no container {name}"));
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .map(|s| s.as_str().expect("a list of strings").to_owned())
                .collect()
        };
        let mounts = container["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|mount| {
                let volume = mount["name"].as_str().expect("a mount names its volume");
                let source = pod["volumes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|v| v["name"] == volume)
                    .unwrap_or_else(|| panic!("mount {volume} has no volume"));
                VolumeMount {
                    volume: volume.to_owned(),
                    mount_path: mount["mountPath"].as_str().expect("mountPath").into(),
                    read_only: mount["readOnly"].as_bool().unwrap_or(false),
                    host_path: source["hostPath"]["path"].as_str().map(PathBuf::from),
                }
            })
            .collect();
        let capabilities = strings(&container["securityContext"]["capabilities"]["add"])
            .into_iter()
            .map(|c| c.to_lowercase())
            .collect();
        let grace = pod["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap_or(DEFAULT_GRACE_SECS);
        Container {
            args: strings(&container["args"]),
            env: container_env(container, fields),
            mounts,
            capabilities,
            termination_grace: Duration::from_secs(grace),
        }
    }

    /// Removes variable `name`, which must be set (so a rename in the chart is noticed).
    pub fn remove_env(&mut self, name: &str) {
        let before = self.env.len();
        self.env.retain(|(n, _)| n != name);
        assert!(
            self.env.len() < before,
            "the container sets no {name}: {:?}",
            self.env
        );
    }

    /// The value of variable `name`, if set.
    pub fn env(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A directory or file of the machine (`source`) seen at `target` in the container.
#[derive(Debug, Clone)]
pub struct Bind {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

/// Starts `program` as `container` in network namespace `netns`: its args, its environment
/// and nothing of the test's, `binds` in a root of its own built on `root` (an empty
/// directory of the test), bounded to the container's capabilities. The pid is `program`'s.
pub fn spawn(
    name: &str,
    netns: &str,
    program: &Path,
    container: &Container,
    binds: &[Bind],
    root: &Path,
    log_dir: &Path,
) -> io::Result<Proc> {
    std::fs::create_dir_all(root)?;
    let mut cmd = if container.capabilities.is_empty() {
        Command::new(program)
    } else {
        // setpriv execs the program: only these capabilities survive (drop ALL, add ...).
        let keep: Vec<String> = container
            .capabilities
            .iter()
            .map(|c| format!("+{c}"))
            .collect();
        let mut cmd = Command::new("setpriv");
        cmd.arg(format!("--bounding-set=-all,{}", keep.join(",")))
            .arg("--")
            .arg(program);
        cmd
    };
    cmd.args(&container.args)
        .env_clear()
        .env("PATH", IMAGE_PATH)
        .envs(container.env.iter().map(|(k, v)| (k, v)));
    private_mounts_before_exec(&mut cmd, plan(root, binds)?);
    Proc::spawn(name, netns, cmd, log_dir)
}

/// The steps that build the root: a tmpfs on `root`; every entry of `/` bound in, except
/// that a directory of the machine that must receive a new mount point (and its parents) is
/// mirrored entry by entry instead, so the mount point is made in the tmpfs; then the binds.
fn plan(root: &Path, binds: &[Bind]) -> io::Result<Vec<MountStep>> {
    let targets: Vec<PathBuf> = binds
        .iter()
        .map(|b| resolve(&b.target))
        .collect::<io::Result<_>>()?;
    let mut mirrored = BTreeSet::from([PathBuf::from("/")]);
    for target in &targets {
        if let Some(existing) = target.ancestors().find(|a| a.exists())
            && existing != target
        {
            mirrored.extend(existing.ancestors().map(Path::to_path_buf));
        }
    }
    let inside = |path: &Path| -> io::Result<CString> {
        c_path(&root.join(path.strip_prefix("/").unwrap_or(path)))
    };
    let mut steps = vec![MountStep::Tmpfs(c_path(root)?)];
    // Parents before children: the set is ordered, and a parent is a prefix of its children.
    for dir in &mirrored {
        if dir != Path::new("/") {
            steps.push(MountStep::Dir(inside(dir)?));
        }
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if mirrored.contains(&path) {
                continue;
            }
            let kind = std::fs::symlink_metadata(&path)?.file_type();
            let at = inside(&path)?;
            if kind.is_symlink() {
                let target = c_path(&std::fs::read_link(&path)?)?;
                steps.push(MountStep::Link { target, path: at });
            } else if kind.is_dir() || kind.is_file() {
                steps.push(if kind.is_dir() {
                    MountStep::Dir(at.clone())
                } else {
                    MountStep::File(at.clone())
                });
                let source = c_path(&path)?;
                steps.push(MountStep::Bind { source, target: at });
            }
            // Sockets, pipes and devices directly in a mirrored directory are left out.
        }
    }
    let mut made = BTreeSet::new();
    for (bind, target) in binds.iter().zip(&targets) {
        let missing: Vec<&Path> = target.ancestors().take_while(|a| !a.exists()).collect();
        for dir in missing.into_iter().rev() {
            if made.insert(dir.to_path_buf()) {
                steps.push(MountStep::Dir(inside(dir)?));
            }
        }
        steps.push(MountStep::Bind {
            source: c_path(&bind.source)?,
            target: inside(target)?,
        });
        if bind.read_only {
            steps.push(MountStep::ReadOnly(inside(target)?));
        }
    }
    steps.push(MountStep::Chroot(c_path(root)?));
    Ok(steps)
}

/// `path` with the symbolic links of its existing part followed (`/var/run/x` is `/run/x`
/// where `/var/run` links to `/run`): the root mirrors the machine's, so links resolve the
/// same inside, and a mount point must be made where they lead.
fn resolve(path: &Path) -> io::Result<PathBuf> {
    let existing = path
        .ancestors()
        .find(|a| a.exists())
        .unwrap_or(Path::new("/"));
    let rest = path.strip_prefix(existing).map_err(io::Error::other)?;
    Ok(std::fs::canonicalize(existing)?.join(rest))
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)
}
