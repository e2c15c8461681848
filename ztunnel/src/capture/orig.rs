//! The original destinations of redirected connections (`ORIG_BY_CLIENT`), read on every
//! outbound accept, concurrently and without a lock.
//!
//! Nothing here needs mutual exclusion: each accepted connection reads and deletes its own
//! entry, and the kernel makes every map operation atomic. aya's `HashMap::remove` takes
//! `&mut self` only as an API convention, so the entry is taken with one
//! `BPF_MAP_LOOKUP_AND_DELETE_ELEM` system call on the map's descriptor, which also makes
//! "each entry is read once" hold between concurrent readers.

use std::io;
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd};

use aya::maps::{HashMap, IterableMap as _, MapData};
use ztunnel_ebpf_common::{ClientKey, OrigDst};

use super::{AF_INET, AF_INET6, from_words6, words6};

/// `enum bpf_cmd` values (include/uapi/linux/bpf.h).
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
/// `ENOTSUPP` (kernel-internal, 524): a kernel before 5.14 for hash maps.
const ENOTSUPP: i32 = 524;

/// The `BPF_MAP_*_ELEM` member of `union bpf_attr`.
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `ORIG_BY_CLIENT`, shared by every accept loop.
pub(super) struct OrigMap {
    map: HashMap<MapData, ClientKey, OrigDst>,
}

impl OrigMap {
    pub(super) fn new(map: HashMap<MapData, ClientKey, OrigDst>) -> Self {
        OrigMap { map }
    }

    /// Takes the destination recorded for the client `peer` in the namespace `netns`: the
    /// entry is gone afterwards. `None` when there is none (or it is not an address).
    pub(super) fn take(&self, netns: u64, peer: SocketAddr) -> Option<SocketAddr> {
        let key = client_key(netns, peer);
        let fd = self.map.map().fd().as_fd();
        let orig = match elem_cmd(BPF_MAP_LOOKUP_AND_DELETE_ELEM, fd, &key) {
            Ok(orig) => orig,
            // Older kernels: read, then delete (a concurrent reader of the same client key
            // cannot exist: the key is one accepted socket's address).
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | ENOTSUPP)) => {
                let orig = elem_cmd(BPF_MAP_LOOKUP_ELEM, fd, &key).ok()?;
                let _ = elem_cmd(BPF_MAP_DELETE_ELEM, fd, &key);
                orig
            }
            Err(_) => return None,
        };
        to_addr(&orig)
    }

    /// How many entries the map holds (one system call per entry: not for the hot path).
    pub(super) fn len(&self) -> usize {
        self.map.keys().filter(Result::is_ok).count()
    }
}

/// Runs one `BPF_MAP_*_ELEM` command on `key`, with a value buffer for the lookups.
fn elem_cmd(cmd: libc::c_long, fd: BorrowedFd<'_>, key: &ClientKey) -> io::Result<OrigDst> {
    let mut value = MaybeUninit::<OrigDst>::zeroed();
    let attr = MapElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: if cmd == BPF_MAP_DELETE_ELEM {
            0
        } else {
            value.as_mut_ptr() as u64
        },
        flags: 0,
    };
    // SAFETY: `attr` is a valid `bpf_attr` prefix of the size given; the kernel reads the
    // key (a `repr(C)` ClientKey, the map's key type) and writes at most the map's value
    // size into `value`, an `OrigDst` (aya checked both sizes when the map was opened).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_ref(&attr),
            std::mem::size_of::<MapElemAttr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised (then written by the kernel for lookups), and every bit
    // pattern is a valid `OrigDst` (u32s only).
    Ok(unsafe { value.assume_init() })
}

/// The map key of a redirected client socket, as `zt_sockops` writes it.
fn client_key(netns: u64, peer: SocketAddr) -> ClientKey {
    match peer {
        SocketAddr::V4(peer) => ClientKey {
            netns_cookie: netns,
            addr: [u32::from_ne_bytes(peer.ip().octets()), 0, 0, 0],
            port: u32::from(peer.port()),
            family: AF_INET,
        },
        SocketAddr::V6(peer) => ClientKey {
            netns_cookie: netns,
            addr: words6(peer.ip()),
            port: u32::from(peer.port()),
            family: AF_INET6,
        },
    }
}

fn to_addr(orig: &OrigDst) -> Option<SocketAddr> {
    let port = u16::from_be(orig.port as u16);
    match orig.family {
        AF_INET => {
            let ip = Ipv4Addr::from(orig.addr[0].to_ne_bytes());
            Some(SocketAddr::V4(SocketAddrV4::new(ip, port)))
        }
        AF_INET6 => {
            let ip: Ipv6Addr = from_words6(orig.addr);
            Some(SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0)))
        }
        _ => None,
    }
}
