//! The cgroup v2 hierarchy the outbound programs attach to, at its root, so that every
//! socket of the machine passes through them.
//!
//! Normally that is the host's mount. Started under `ip netns exec` (how a node is tried by
//! hand), ztunnel finds none: that command gives the process a mount namespace of its own
//! with a fresh `/sys`, and the cgroup mounts under it are gone. Then ztunnel mounts the
//! hierarchy itself in a directory of its own. cgroup v2 has one hierarchy per cgroup
//! namespace, so that mount is the same tree as the host's, and programs attached at its
//! root see the same sockets. Under `ip netns exec` the mount lives and dies with the
//! process's mount namespace; on a host with no cgroup v2 mount at all it stays, and the
//! next start finds it.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};

use tracing::info;

use super::CaptureError;

/// The first cgroup2 mount point in /proc/mounts.
pub fn find_cgroup2() -> Result<PathBuf, CaptureError> {
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(|_| CaptureError::NoCgroup2)?;
    mounts
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            let _source = fields.next()?;
            let target = fields.next()?;
            let fstype = fields.next()?;
            (fstype == "cgroup2").then(|| PathBuf::from(target))
        })
        .ok_or(CaptureError::NoCgroup2)
}

/// Where to attach: `explicit` when given, else the first cgroup2 mount, else a cgroup2
/// hierarchy mounted at `private` (created if needed), said in one log line.
pub fn root(explicit: Option<&Path>, private: &Path) -> Result<PathBuf, CaptureError> {
    if let Some(path) = explicit {
        return Ok(path.to_owned());
    }
    if let Ok(found) = find_cgroup2() {
        return Ok(found);
    }
    mount_cgroup2(private).map_err(|source| CaptureError::MountCgroup2 {
        path: private.to_owned(),
        source,
    })?;
    info!(path = %private.display(),
        "no cgroup v2 mount found (a private /sys, as under `ip netns exec`?): mounted the cgroup2 hierarchy here");
    Ok(private.to_owned())
}

fn mount_cgroup2(at: &Path) -> io::Result<()> {
    std::fs::create_dir_all(at)?;
    let target = CString::new(at.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let fstype = CString::new("cgroup2").map_err(io::Error::other)?;
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call; no data
    // argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
