//! Kernel-side traffic capture for ztunnel.
//!
//! Four programs, all inert unless a pod's network namespace was enrolled by ztunnel:
//! - `zt_connect4` / `zt_connect6` (cgroup/connect4 and connect6, attached once at the
//!   cgroup v2 root): an outbound TCP
//!   connect from an enrolled namespace is rewritten to ztunnel's listener on that pod's
//!   loopback; the destination the application asked for is remembered by socket cookie.
//! - `zt_sockops` (sock_ops, same root): when the redirected socket sends its SYN, its local
//!   port is known; the original destination moves to a map keyed by (netns, local addr, port),
//!   which is what the listener sees as the peer of the accepted socket. And when ztunnel
//!   itself connects to an address of the pod whose namespace it connects from (a delivery to
//!   the application from the client's address), the socket gets the delivery mark before
//!   its SYN leaves.
//! - `zt_inbound` (sk_lookup, attached per pod namespace): plaintext TCP arriving from outside
//!   the pod for one of the pod's own ports is handed to ztunnel's inbound listener (15006).
//!   HBONE (15008) and ztunnel's deliveries to the application (from a loopback source, or
//!   from a client's address: a flow `zt_sockops` recorded) are never steered; ztunnel
//!   refuses its other ports when they arrive.
//!
//! Sockets carrying ztunnel's mark are never redirected, so ztunnel cannot capture itself.
//!
//! The maps are pinned (by name, in a directory ztunnel chooses per node): a new ztunnel
//! taking over from an old one during an upgrade shares them, so a connection redirected by
//! the old process's program is found by the new process's listener, and vice versa.
#![no_std]
#![no_main]
// A kernel-side program: context fields, maps and BPF helpers are reached through raw
// pointers, so this whole crate is unsafe code (each block says why it is sound).
#![allow(unsafe_code)]
// The programs are entry points the loader finds by symbol name, outside this crate: `pub`
// says so, though no Rust code can reach them.
#![allow(unreachable_pub)]

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_TCP_CONNECT_CB, bpf_sock_addr},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_getsockopt, bpf_setsockopt},
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{HashMap, LruHashMap, SockHash},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::{debug, info};
use ztunnel_ebpf_common::{
    CAPTURE_OUTBOUND, ClientKey, DELIVERY_MARK, DeliveryFlow, INBOUND_UNSTEERED_PORT, OrigDst,
    PodAddr, PodCapture, ZTUNNEL_MARK,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const SOL_SOCKET: i32 = 1;
const SO_MARK: i32 = 36;
const LOOPBACK_IFINDEX: u32 = 1;
/// 127.0.0.1 in network byte order.
const LOCALHOST_BE: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// ::1 as the kernel's four network-order words.
const LOCALHOST6_BE: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

/// Enrolled pod namespaces, by netns cookie. Written by ztunnel only.
#[map]
static ENROLLED: HashMap<u64, PodCapture> = HashMap::pinned(65536, 0);

/// Original destinations of redirected sockets between connect() and their SYN.
#[map]
static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::pinned(65536, 0);

/// Original destinations keyed as the listener sees the client; ztunnel deletes on accept.
#[map]
static ORIG_BY_CLIENT: LruHashMap<ClientKey, OrigDst> = LruHashMap::pinned(262144, 0);

/// ztunnel's inbound (15006) listener per pod IPv4 address (network byte order).
#[map]
static INBOUND_LISTENERS: SockHash<u32> = SockHash::pinned(65536, 0);

/// ztunnel's inbound (15006) IPv6 listener per pod IPv6 address (network-order words).
#[map]
static INBOUND_LISTENERS6: SockHash<[u32; 4]> = SockHash::pinned(65536, 0);

/// Pod addresses that ztunnel delivers to from the client's own address, with the mark
/// its delivery sockets get (`DELIVERY_MARK`). Written by ztunnel only.
#[map]
static DELIVERY_MARKS: HashMap<PodAddr, u32> = HashMap::pinned(65536, 0);

/// ztunnel's deliveries from client addresses between their connect and their handshake's
/// end: the SYNs the inbound steering must let through. Pinned and shared, so that during an
/// upgrade each process's steering lets the other's deliveries through.
#[map]
static DELIVERY_FLOWS: LruHashMap<DeliveryFlow, u32> = LruHashMap::pinned(65536, 0);

/// Settings ztunnel changed in a pod's namespace (by netns cookie), to undo when the pod is
/// released. Only ztunnel reads it: pinned with the other maps so that a successor, or a
/// ztunnel restarted after a crash, knows what to undo.
#[map]
static NETNS_CHANGES: HashMap<u64, u32> = HashMap::pinned(65536, 0);

#[cgroup_sock_addr(connect4)]
pub fn zt_connect4(ctx: SockAddrContext) -> i32 {
    // Returning 1 lets connect() proceed; we never refuse a connection here.
    redirect_connect4(&ctx);
    1
}

fn redirect_connect4(ctx: &SockAddrContext) {
    // SAFETY: the kernel hands the program a valid `bpf_sock_addr` for its lifetime.
    let sa: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM || sa.user_family != AF_INET {
        return;
    }
    // SAFETY: the helper only reads the context pointer it is given.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is plain data copied out before the map can change it.
    let Some(pod) = (unsafe { ENROLLED.get(&netns) }).copied() else {
        return;
    };
    if pod.flags & CAPTURE_OUTBOUND == 0 {
        return;
    }
    // Loopback stays inside the pod: never captured.
    if u32::from_be(sa.user_ip4) >> 24 == 127 {
        return;
    }
    if has_ztunnel_mark(ctx) {
        return;
    }
    let orig = OrigDst {
        addr: [sa.user_ip4, 0, 0, 0],
        port: sa.user_port,
        family: AF_INET,
    };
    // SAFETY: the helper only reads the context pointer it is given.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if ORIG_BY_COOKIE.insert(&cookie, &orig, 0).is_err() {
        info!(
            ctx,
            "ztunnel capture: cannot record original destination; not redirecting"
        );
        return;
    }
    sa.user_ip4 = LOCALHOST_BE;
    sa.user_port = u32::from(pod.outbound_port.to_be());
    debug!(
        ctx,
        "ztunnel capture: netns {} connect to {:i}:{} redirected",
        netns,
        u32::from_be(orig.addr[0]),
        u16::from_be(orig.port as u16)
    );
}

#[cgroup_sock_addr(connect6)]
pub fn zt_connect6(ctx: SockAddrContext) -> i32 {
    redirect_connect6(&ctx);
    1
}

fn redirect_connect6(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands the program a valid `bpf_sock_addr`; fields are read one
    // 32-bit word at a time, the only access size the verifier allows for them.
    let (type_, family) = unsafe {
        (
            read(&raw const (*sa).type_),
            read(&raw const (*sa).user_family),
        )
    };
    if type_ != SOCK_STREAM || family != AF_INET6 {
        return;
    }
    // SAFETY: the helper only reads the context pointer it is given.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is plain data copied out before the map can change it.
    let Some(pod) = (unsafe { ENROLLED.get(&netns) }).copied() else {
        return;
    };
    if pod.flags & CAPTURE_OUTBOUND == 0 {
        return;
    }
    // SAFETY: as above, word by word.
    let addr = unsafe {
        [
            read(&raw const (*sa).user_ip6[0]),
            read(&raw const (*sa).user_ip6[1]),
            read(&raw const (*sa).user_ip6[2]),
            read(&raw const (*sa).user_ip6[3]),
        ]
    };
    // ::1 and IPv4-mapped addresses (whose IPv4 connect4 does not see) stay as they are:
    // loopback is inside the pod, and mapped destinations are rare enough to pass through.
    if addr == LOCALHOST6_BE || (addr[0] == 0 && addr[1] == 0 && addr[2] == 0xffff_u32.to_be()) {
        return;
    }
    if has_ztunnel_mark(ctx) {
        return;
    }
    // SAFETY: as above.
    let port = unsafe { read(&raw const (*sa).user_port) };
    let orig = OrigDst {
        addr,
        port,
        family: AF_INET6,
    };
    // SAFETY: the helper only reads the context pointer it is given.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if ORIG_BY_COOKIE.insert(&cookie, &orig, 0).is_err() {
        info!(
            ctx,
            "ztunnel capture: cannot record original destination; not redirecting"
        );
        return;
    }
    // SAFETY: word-sized writes to the context fields connect6 may rewrite.
    unsafe {
        for (i, word) in LOCALHOST6_BE.iter().enumerate() {
            core::ptr::write_volatile(&raw mut (*sa).user_ip6[i], *word);
        }
        core::ptr::write_volatile(
            &raw mut (*sa).user_port,
            u32::from(pod.outbound_port.to_be()),
        );
    }
    debug!(
        ctx,
        "ztunnel capture: netns {} IPv6 connect redirected", netns
    );
}

/// A volatile 32-bit read, so the compiler keeps context accesses word-sized.
///
/// # Safety
/// `ptr` must point into the program's context.
#[inline(always)]
unsafe fn read(ptr: *const u32) -> u32 {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::read_volatile(ptr) }
}

fn has_ztunnel_mark(ctx: &SockAddrContext) -> bool {
    let mut mark: u32 = 0;
    // SAFETY: `mark` is a valid, writable u32 and its size is passed along.
    let ret = unsafe {
        bpf_getsockopt(
            ctx.as_ptr(),
            SOL_SOCKET,
            SO_MARK,
            (&raw mut mark).cast(),
            core::mem::size_of::<u32>() as i32,
        )
    };
    ret == 0 && mark == ZTUNNEL_MARK
}

#[sock_ops]
pub fn zt_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        remember_client(&ctx);
        mark_delivery(&ctx);
    } else if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && sock_mark(&ctx) == Some(DELIVERY_MARK) {
        // Handshake done: no SYN of this delivery is left to let through.
        if let Some(flow) = flow_of(&ctx) {
            let _ = DELIVERY_FLOWS.remove(&flow);
        }
    }
    0
}

fn sock_mark(ctx: &SockOpsContext) -> Option<u32> {
    let mut mark: u32 = 0;
    // SAFETY: `mark` is a valid, writable u32 and its size is passed along.
    let ret = unsafe {
        bpf_getsockopt(
            ctx.as_ptr(),
            SOL_SOCKET,
            SO_MARK,
            (&raw mut mark).cast(),
            core::mem::size_of::<u32>() as i32,
        )
    };
    (ret == 0).then_some(mark)
}

/// The remote address of a sock_ops socket, as four network-order words.
fn remote_addr(ctx: &SockOpsContext) -> Option<[u32; 4]> {
    let family = ctx.family();
    if family == AF_INET6 {
        let ops = ctx.ops;
        // SAFETY: word-sized reads of the context, as the verifier requires.
        Some(unsafe {
            [
                read(&raw const (*ops).remote_ip6[0]),
                read(&raw const (*ops).remote_ip6[1]),
                read(&raw const (*ops).remote_ip6[2]),
                read(&raw const (*ops).remote_ip6[3]),
            ]
        })
    } else if family == AF_INET {
        Some([ctx.remote_ip4(), 0, 0, 0])
    } else {
        None
    }
}

/// A delivery socket's connection as the flow the application's side receives.
fn flow_of(ctx: &SockOpsContext) -> Option<DeliveryFlow> {
    let family = ctx.family();
    let app = remote_addr(ctx)?;
    let client = if family == AF_INET6 {
        let ops = ctx.ops;
        // SAFETY: word-sized reads of the context, as the verifier requires.
        unsafe {
            [
                read(&raw const (*ops).local_ip6[0]),
                read(&raw const (*ops).local_ip6[1]),
                read(&raw const (*ops).local_ip6[2]),
                read(&raw const (*ops).local_ip6[3]),
            ]
        }
    } else {
        [ctx.local_ip4(), 0, 0, 0]
    };
    Some(DeliveryFlow {
        client,
        app,
        client_port: ctx.local_port(),
        // The remote port is the network-order 16 bits, as a network-order word.
        app_port: u32::from_be(ctx.remote_port()),
        family,
        _pad: 0,
    })
}

/// A socket of ztunnel's connecting to an address of the pod it is in is a delivery to the
/// application. Where that pod's deliveries keep the client's address, the socket takes the
/// delivery mark now: connect() has already passed the capture programs (which let ztunnel's
/// own mark through), and the SYN is routed and sent after this callback, with the new mark.
fn mark_delivery(ctx: &SockOpsContext) {
    let Some(addr) = remote_addr(ctx) else {
        return;
    };
    let key = PodAddr {
        // SAFETY: the helper only reads the context pointer it is given.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        addr,
        family: ctx.family(),
        _pad: 0,
    };
    // SAFETY: the value is plain data copied out at once.
    let Some(mut mark) = (unsafe { DELIVERY_MARKS.get(&key) }).copied() else {
        return;
    };
    // Only ztunnel's sockets: anything else connecting to the pod is left as it is.
    if sock_mark(ctx) != Some(ZTUNNEL_MARK) {
        return;
    }
    let Some(flow) = flow_of(ctx) else { return };
    if DELIVERY_FLOWS.insert(&flow, &1, 0).is_err() {
        info!(
            ctx,
            "ztunnel capture: cannot record a delivery; it keeps ztunnel's mark"
        );
        return;
    }
    // SAFETY: `mark` is a valid u32 and its size is passed along; the socket is locked in
    // this callback, as bpf_setsockopt requires.
    let ret = unsafe {
        bpf_setsockopt(
            ctx.as_ptr(),
            SOL_SOCKET,
            SO_MARK,
            (&raw mut mark).cast(),
            core::mem::size_of::<u32>() as i32,
        )
    };
    if ret != 0 {
        let _ = DELIVERY_FLOWS.remove(&flow);
        info!(ctx, "ztunnel capture: cannot mark a delivery ({})", ret);
    }
}

fn remember_client(ctx: &SockOpsContext) {
    // SAFETY: the helper only reads the context pointer it is given.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is plain data copied out at once.
    let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(&cookie) }).copied() else {
        return;
    };
    let _ = ORIG_BY_COOKIE.remove(&cookie);
    // SAFETY: the helper only reads the context pointer it is given.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let addr = if orig.family == AF_INET6 {
        let ops = ctx.ops;
        // SAFETY: word-sized reads of the context, as the verifier requires.
        unsafe {
            [
                read(&raw const (*ops).local_ip6[0]),
                read(&raw const (*ops).local_ip6[1]),
                read(&raw const (*ops).local_ip6[2]),
                read(&raw const (*ops).local_ip6[3]),
            ]
        }
    } else {
        [ctx.local_ip4(), 0, 0, 0]
    };
    let key = ClientKey {
        netns_cookie: netns,
        addr,
        port: ctx.local_port(),
        family: orig.family,
    };
    if ORIG_BY_CLIENT.insert(&key, &orig, 0).is_err() {
        info!(
            ctx,
            "ztunnel capture: cannot record client of redirected socket"
        );
    }
}

#[sk_lookup]
pub fn zt_inbound(ctx: SkLookupContext) -> u32 {
    const SK_PASS: u32 = 1;
    // SAFETY: the kernel hands the program a valid `bpf_sk_lookup` for its lifetime.
    let lookup = unsafe { &*ctx.lookup };
    if lookup.protocol != IPPROTO_TCP || lookup.ingress_ifindex == LOOPBACK_IFINDEX {
        return SK_PASS;
    }
    let port = lookup.local_port as u16;
    if port == INBOUND_UNSTEERED_PORT {
        return SK_PASS;
    }
    // ztunnel delivers to the application from 127.0.0.6 (::1 over IPv6), or from the
    // client's address. Such packets travel over the loopback device, but the kernel reports
    // the pod interface that owns the destination address as their ingress (observed on
    // 6.18), so the loopback source, or a recorded delivery, is the test.
    // SAFETY: a 16-bit read of the 16-bit context field.
    let remote_port =
        u16::from_be(unsafe { core::ptr::read_volatile(&raw const (*ctx.lookup).remote_port) });
    if lookup.family == AF_INET {
        if u32::from_be(lookup.remote_ip4) >> 24 == 127 {
            return SK_PASS;
        }
        let flow = DeliveryFlow {
            client: [lookup.remote_ip4, 0, 0, 0],
            app: [lookup.local_ip4, 0, 0, 0],
            client_port: u32::from(remote_port),
            app_port: lookup.local_port,
            family: AF_INET,
            _pad: 0,
        };
        // SAFETY: only the presence of the entry is read.
        if unsafe { DELIVERY_FLOWS.get(&flow) }.is_some() {
            return SK_PASS;
        }
        // No listener for this address: the pod is not enrolled for inbound capture.
        let _ = INBOUND_LISTENERS.redirect_sk_lookup(&ctx, lookup.local_ip4, 0);
    } else if lookup.family == AF_INET6 {
        let l = ctx.lookup;
        // SAFETY: word-sized reads of the context, as the verifier requires.
        let (remote, local) = unsafe {
            (
                [
                    read(&raw const (*l).remote_ip6[0]),
                    read(&raw const (*l).remote_ip6[1]),
                    read(&raw const (*l).remote_ip6[2]),
                    read(&raw const (*l).remote_ip6[3]),
                ],
                [
                    read(&raw const (*l).local_ip6[0]),
                    read(&raw const (*l).local_ip6[1]),
                    read(&raw const (*l).local_ip6[2]),
                    read(&raw const (*l).local_ip6[3]),
                ],
            )
        };
        if remote == LOCALHOST6_BE {
            return SK_PASS;
        }
        let flow = DeliveryFlow {
            client: remote,
            app: local,
            client_port: u32::from(remote_port),
            app_port: lookup.local_port,
            family: AF_INET6,
            _pad: 0,
        };
        // SAFETY: only the presence of the entry is read.
        if unsafe { DELIVERY_FLOWS.get(&flow) }.is_some() {
            return SK_PASS;
        }
        let _ = INBOUND_LISTENERS6.redirect_sk_lookup(&ctx, local, 0);
    }
    SK_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
