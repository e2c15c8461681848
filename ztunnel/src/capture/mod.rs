//! Traffic capture with eBPF: loading the programs, attaching them, and the maps that say
//! which pods are enrolled and where captured connections were going.
//!
//! Owns every kernel-facing detail of capture (programs, links, maps, namespaces); the proxy
//! only asks "enrol this namespace", "where was this accepted connection going". Nothing here
//! decides policy. Links are owned by the loaded object: they go away when `Capture` is
//! dropped or the process dies, so a crashed ztunnel never leaves a pod black-holed.

// Kernel-facing: setns, socket options, bpf(2) and mounts are raw syscalls (this module
// and its children are the node layer's unsafe fence; each block says why it is sound).
#![allow(unsafe_code)]

pub mod bpffs;
pub mod cgroup;
pub mod netns;
mod orig;
pub mod routing;
mod rtnl;

use std::collections::HashMap as StdHashMap;
use std::fs::File;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use aya::Ebpf;
use aya::maps::{HashMap, MapData, SockHash};
use aya::programs::links::CgroupAttachMode;
use aya::programs::{CgroupSockAddr, SkLookup, SockOps};
use tracing::{debug, info, warn};

use ztunnel_ebpf_common::{CAPTURE_OUTBOUND, PodCapture};

pub use cgroup::find_cgroup2;
pub use netns::{Netns, NetnsCookie, NetnsError, SocketKind};
pub use routing::{PodRouting, RoutingError, SourceRouting};

/// The object built from `ebpf/programs` by build.rs (empty without the `ebpf` feature).
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ztunnel-capture"));

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("this ztunnel was built without the eBPF capture programs (feature `ebpf`)")]
    NotBuilt,
    #[error("cannot load the eBPF capture programs (is this root, on a kernel with BPF?): {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("cannot open cgroup v2 root {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no cgroup v2 mount found in /proc/mounts; capture needs cgroup v2")]
    NoCgroup2,
    #[error(
        "no cgroup v2 mount found in /proc/mounts, and mounting one at {path} failed (capture needs cgroup v2; or give --cgroup-root): {source}"
    )]
    MountCgroup2 {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("BPF filesystem for pinned maps at {path}: {source}")]
    Bpffs {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Counters of what the capture layer did, for metrics and `/config_dump`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CaptureStatus {
    pub cgroup_root: PathBuf,
    /// Kernel ids of the loaded programs (as `bpftool prog show id N` names them).
    pub program_ids: Vec<u32>,
    pub programs: Vec<&'static str>,
    pub enrolled_namespaces: usize,
    pub inbound_listeners: usize,
    pub pending_original_destinations: usize,
}

/// The loaded programs and their maps.
///
/// Accepts never wait for a lock here: the original destinations are taken without one (see
/// `orig`). Readers of the outbound map (readiness, metrics) share a read lock that only
/// enrolment changes take exclusively; the inbound steering, changed together with its
/// programs' links, has its own mutex, taken by enrolment and `status` only.
pub struct Capture {
    pin_dir: PathBuf,
    cgroup_root: PathBuf,
    program_ids: Vec<u32>,
    orig: orig::OrigMap,
    enrolled: RwLock<HashMap<MapData, u64, PodCapture>>,
    inner: Mutex<Inner>,
    routing: std::sync::Arc<SourceRouting>,
}

struct Inner {
    ebpf: Ebpf,
    inbound: SockHash<MapData, u32>,
    inbound6: SockHash<MapData, [u32; 4]>,
    inbound_links: StdHashMap<NetnsCookie, aya::programs::sk_lookup::SkLookupLinkId>,
    inbound_keys: StdHashMap<NetnsCookie, Vec<InboundKey>>,
}

#[derive(Debug, Clone, Copy)]
enum InboundKey {
    V4(u32),
    V6([u32; 4]),
}

/// An IPv6 address as the kernel's four network-order words.
fn words6(ip: &Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

fn from_words6(words: [u32; 4]) -> Ipv6Addr {
    let mut octets = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        octets[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    Ipv6Addr::from(octets)
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("cgroup_root", &self.cgroup_root)
            .finish_non_exhaustive()
    }
}

impl Capture {
    /// The loaded programs, of any process, that use the capture maps pinned in `pin_dir`:
    /// while there are any, another ztunnel of this node runs (its programs and their links
    /// go with its process). Empty when nothing is pinned there or it cannot be looked at.
    pub fn programs_sharing(pin_dir: &Path) -> Vec<u32> {
        let Some(id) = MapData::from_pin(pin_dir.join("ENROLLED"))
            .ok()
            .and_then(|m| m.info().ok())
            .map(|i| i.id())
        else {
            return Vec::new();
        };
        aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .filter(|p| {
                p.map_ids()
                    .ok()
                    .flatten()
                    .is_some_and(|ids| ids.contains(&id))
            })
            .map(|p| p.id())
            .collect()
    }

    /// Loads the programs and attaches the outbound ones at the cgroup v2 root
    /// (`cgroup_root`, or the first cgroup2 mount when `None`). The maps are pinned in
    /// `pin_dir` (on a BPF filesystem, mounted if needed) and reused when already there, so
    /// a predecessor's or successor's programs share them. Kernel-side log lines are
    /// forwarded to `tracing`.
    pub fn load(cgroup_root: Option<&Path>, pin_dir: &Path) -> Result<Capture, CaptureError> {
        let cgroup_root = match cgroup_root {
            Some(path) => path.to_owned(),
            None => find_cgroup2()?,
        };
        let bpffs_err = |source| CaptureError::Bpffs {
            path: pin_dir.to_owned(),
            source,
        };
        let root = pin_dir
            .ancestors()
            .find(|a| a.parent() == Some(Path::new("/sys/fs")));
        if let Some(root) = root {
            bpffs::ensure_mounted(root).map_err(bpffs_err)?;
        }
        std::fs::create_dir_all(pin_dir).map_err(bpffs_err)?;
        if !bpffs::is_bpffs(pin_dir) {
            return Err(bpffs_err(std::io::Error::other("not on a BPF filesystem")));
        }
        if PROGRAMS.is_empty() {
            return Err(CaptureError::NotBuilt);
        }
        let mut ebpf = aya::EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(PROGRAMS)?;
        start_kernel_log(&mut ebpf);
        let cgroup = File::open(&cgroup_root).map_err(|source| CaptureError::Cgroup {
            path: cgroup_root.clone(),
            source,
        })?;

        let connect4: &mut CgroupSockAddr = program(&mut ebpf, "zt_connect4")?;
        connect4.load().map_err(prog_err("zt_connect4"))?;
        connect4
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(prog_err("zt_connect4"))?;
        let connect6: &mut CgroupSockAddr = program(&mut ebpf, "zt_connect6")?;
        connect6.load().map_err(prog_err("zt_connect6"))?;
        connect6
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(prog_err("zt_connect6"))?;
        let sockops: &mut SockOps = program(&mut ebpf, "zt_sockops")?;
        sockops.load().map_err(prog_err("zt_sockops"))?;
        sockops
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(prog_err("zt_sockops"))?;
        let inbound_prog: &mut SkLookup = program(&mut ebpf, "zt_inbound")?;
        inbound_prog.load().map_err(prog_err("zt_inbound"))?;

        let enrolled =
            HashMap::try_from(take_map(&mut ebpf, "ENROLLED")?).map_err(map_err("ENROLLED"))?;
        let orig = HashMap::try_from(take_map(&mut ebpf, "ORIG_BY_CLIENT")?)
            .map_err(map_err("ORIG_BY_CLIENT"))?;
        let inbound = SockHash::try_from(take_map(&mut ebpf, "INBOUND_LISTENERS")?)
            .map_err(map_err("INBOUND_LISTENERS"))?;
        let inbound6 = SockHash::try_from(take_map(&mut ebpf, "INBOUND_LISTENERS6")?)
            .map_err(map_err("INBOUND_LISTENERS6"))?;
        let marks = HashMap::try_from(take_map(&mut ebpf, "DELIVERY_MARKS")?)
            .map_err(map_err("DELIVERY_MARKS"))?;
        let changes = HashMap::try_from(take_map(&mut ebpf, "NETNS_CHANGES")?)
            .map_err(map_err("NETNS_CHANGES"))?;
        let ids: Vec<String> = ["zt_connect4", "zt_connect6", "zt_sockops", "zt_inbound"]
            .into_iter()
            .filter_map(|name| ebpf.program(name)?.info().ok())
            .map(|info| info.id().to_string())
            .collect();
        let program_ids = ids.join(",");
        info!(cgroup = %cgroup_root.display(), %program_ids, "eBPF capture programs attached");
        Ok(Capture {
            pin_dir: pin_dir.to_owned(),
            cgroup_root,
            program_ids: ids.iter().filter_map(|id| id.parse().ok()).collect(),
            orig: orig::OrigMap::new(orig),
            enrolled: RwLock::new(enrolled),
            inner: Mutex::new(Inner {
                ebpf,
                inbound,
                inbound6,
                inbound_links: StdHashMap::new(),
                inbound_keys: StdHashMap::new(),
            }),
            routing: std::sync::Arc::new(SourceRouting::new(marks, changes)),
        })
    }

    /// Starts redirecting outbound TCP connections made in `netns` to `outbound_port` on the
    /// namespace's loopback (127.0.0.1 for IPv4, ::1 for IPv6).
    pub fn enroll_outbound(
        &self,
        netns: NetnsCookie,
        outbound_port: u16,
    ) -> Result<(), CaptureError> {
        let value = PodCapture {
            outbound_port,
            flags: CAPTURE_OUTBOUND,
            _pad: 0,
        };
        self.enrolled_mut()
            .insert(netns.0, value, 0)
            .map_err(map_err("ENROLLED"))?;
        debug!(netns = netns.0, "outbound capture on");
        Ok(())
    }

    /// Steers plaintext TCP arriving at the pod's addresses (from outside the pod, to ports
    /// other than ztunnel's) to `listener`, ztunnel's inbound socket in that namespace.
    /// `listener` takes IPv4, `listener6` (when the pod has IPv6 addresses) IPv6.
    pub fn enroll_inbound(
        &self,
        netns: &Netns,
        pod_ips: &[IpAddr],
        listener: &impl AsRawFd,
        listener6: Option<&dyn AsRawFd>,
    ) -> Result<(), CaptureError> {
        let mut inner = self.lock();
        let mut keys = Vec::new();
        for ip in pod_ips {
            match ip {
                IpAddr::V4(v4) => {
                    let key = u32::from_ne_bytes(v4.octets());
                    inner
                        .inbound
                        .insert(key, listener.as_raw_fd(), 0)
                        .map_err(map_err("INBOUND_LISTENERS"))?;
                    keys.push(InboundKey::V4(key));
                }
                IpAddr::V6(v6) => {
                    let Some(listener6) = listener6 else { continue };
                    let key = words6(v6);
                    inner
                        .inbound6
                        .insert(key, listener6.as_raw_fd(), 0)
                        .map_err(map_err("INBOUND_LISTENERS6"))?;
                    keys.push(InboundKey::V6(key));
                }
            }
        }
        if !inner.inbound_links.contains_key(&netns.cookie()) {
            let prog: &mut SkLookup = program(&mut inner.ebpf, "zt_inbound")?;
            let link = prog.attach(netns).map_err(prog_err("zt_inbound"))?;
            inner.inbound_links.insert(netns.cookie(), link);
        }
        inner.inbound_keys.insert(netns.cookie(), keys);
        Ok(())
    }

    /// Stops all capture for `netns`: the pod's plain networking is back at once.
    pub fn unenroll(&self, netns: NetnsCookie) {
        if let Err(err) = self.enrolled_mut().remove(&netns.0) {
            debug!(netns = netns.0, %err, "namespace was not enrolled for outbound capture");
        }
        let mut inner = self.lock();
        for key in inner.inbound_keys.remove(&netns).unwrap_or_default() {
            let _ = match key {
                InboundKey::V4(k) => inner.inbound.remove(&k),
                InboundKey::V6(k) => inner.inbound6.remove(&k),
            };
        }
        if let Some(link) = inner.inbound_links.remove(&netns) {
            match program::<SkLookup>(&mut inner.ebpf, "zt_inbound") {
                Ok(prog) => {
                    if let Err(err) = prog.detach(link) {
                        warn!(netns = netns.0, %err, "cannot detach inbound steering");
                    }
                }
                Err(err) => warn!(netns = netns.0, %err, "cannot detach inbound steering"),
            }
        }
        debug!(netns = netns.0, "capture off");
    }

    /// The destination a redirected connection was meant for, looked up by the accepted
    /// socket's peer address in the namespace it was accepted in. Each entry is read once.
    /// Takes no lock: accepts in every pod run side by side.
    pub fn take_original_destination(
        &self,
        netns: NetnsCookie,
        peer: SocketAddr,
    ) -> Option<SocketAddr> {
        self.orig.take(netns.0, peer)
    }

    pub fn status(&self) -> CaptureStatus {
        CaptureStatus {
            cgroup_root: self.cgroup_root.clone(),
            program_ids: self.program_ids.clone(),
            programs: vec!["zt_connect4", "zt_connect6", "zt_sockops", "zt_inbound"],
            enrolled_namespaces: self.enrolled_namespaces(),
            inbound_listeners: self.lock().inbound_links.len(),
            pending_original_destinations: self.orig.len(),
        }
    }

    /// How many namespaces the outbound map holds (what the metrics scrape reads).
    pub fn enrolled_namespaces(&self) -> usize {
        self.enrolled().keys().filter(Result::is_ok).count()
    }

    /// Pod namespaces set up for deliveries from client addresses.
    pub fn source_routing(&self) -> &std::sync::Arc<SourceRouting> {
        &self.routing
    }

    /// Removes outbound enrolments of namespaces not in `keep`: entries a crashed predecessor
    /// left in the pinned map (and its delivery marks).
    pub fn prune_enrolled(&self, keep: &[NetnsCookie]) -> usize {
        self.routing.prune(keep);
        let mut enrolled = self.enrolled_mut();
        let stale: Vec<u64> = enrolled
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !keep.contains(&NetnsCookie(*k)))
            .collect();
        for key in &stale {
            let _ = enrolled.remove(key);
        }
        stale.len()
    }

    /// Removes the pinned maps: the last ztunnel of this node is going away. (The maps live
    /// on while a program or process still holds them.)
    pub fn unpin(&self) {
        for name in [
            "ENROLLED",
            "ORIG_BY_COOKIE",
            "ORIG_BY_CLIENT",
            "INBOUND_LISTENERS",
            "INBOUND_LISTENERS6",
            "DELIVERY_MARKS",
            "DELIVERY_FLOWS",
            "NETNS_CHANGES",
        ] {
            let _ = std::fs::remove_file(self.pin_dir.join(name));
        }
        let _ = std::fs::remove_dir(&self.pin_dir);
    }

    /// Whether `netns` is in the outbound map (what readiness checks).
    pub fn is_enrolled(&self, netns: NetnsCookie) -> bool {
        self.enrolled().get(&netns.0, 0).is_ok()
    }

    // A panic while holding one of these locks leaves the maps consistent (each call is one
    // map operation), so a poisoned lock is still usable.

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn enrolled(&self) -> std::sync::RwLockReadGuard<'_, HashMap<MapData, u64, PodCapture>> {
        self.enrolled
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn enrolled_mut(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<MapData, u64, PodCapture>> {
        self.enrolled
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, CaptureError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(CaptureError::Program {
        name,
        source: aya::programs::ProgramError::UnexpectedProgramType,
    })?;
    prog.try_into().map_err(prog_err(name))
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, CaptureError> {
    ebpf.take_map(name).ok_or(CaptureError::Map {
        name,
        source: aya::maps::MapError::InvalidName {
            name: name.to_owned(),
        },
    })
}

fn prog_err(name: &'static str) -> impl Fn(aya::programs::ProgramError) -> CaptureError {
    move |source| CaptureError::Program { name, source }
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> CaptureError {
    move |source| CaptureError::Map { name, source }
}

/// Forwards aya-log records from the programs to `log` (and from there to `tracing`).
fn start_kernel_log(ebpf: &mut Ebpf) {
    match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => {
            let Ok(handle) = tokio::runtime::Handle::try_current() else {
                debug!("no tokio runtime: kernel-side capture logs are not forwarded");
                return;
            };
            handle.spawn(async move {
                // SAFETY: the logger owns its ring buffer's fd, which stays open and the same
                // for as long as the logger lives, and the AsyncFd owns the logger.
                let registered = unsafe {
                    tokio::io::unix::AsyncFd::register_with_interest(
                        logger,
                        tokio::io::Interest::READABLE,
                    )
                };
                let Ok(mut fd) = registered else {
                    warn!("cannot poll the eBPF log ring buffer");
                    return;
                };
                loop {
                    let Ok(mut guard) = fd.readable_mut().await else {
                        return;
                    };
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            });
        }
        Err(err) => warn!(%err, "kernel-side capture logs unavailable"),
    }
}
