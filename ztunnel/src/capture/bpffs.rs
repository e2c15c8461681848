//! The BPF filesystem, where the capture maps are pinned so that an upgrading ztunnel and
//! its successor share them. Mounted here when the host has not mounted it (a Kubernetes
//! DaemonSet mounts the host's `/sys/fs/bpf`; a bare machine may have none).

use std::ffi::CString;
use std::io;
use std::path::Path;

/// `BPF_FS_MAGIC` (include/uapi/linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Whether `path` is on a BPF filesystem.
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statfs buffer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::statfs(c.as_ptr(), &raw mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

/// Makes sure a BPF filesystem is mounted at `root` (e.g. `/sys/fs/bpf`).
pub fn ensure_mounted(root: &Path) -> io::Result<()> {
    if is_bpffs(root) {
        return Ok(());
    }
    std::fs::create_dir_all(root)?;
    let target = CString::new(root.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let fstype = CString::new("bpf").map_err(io::Error::other)?;
    // SAFETY: all pointers are valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
