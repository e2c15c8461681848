//! Map keys and values shared by the capture programs (kernel side) and ztunnel's loader
//! (user side). Every type is `#[repr(C)]` plain data with explicit padding, so both sides
//! agree on the layout byte for byte.
#![no_std]

/// `SO_MARK` carried by every socket ztunnel opens; the programs never redirect those.
pub const ZTUNNEL_MARK: u32 = 0x539;

/// `SO_MARK` of ztunnel's deliveries to an application from the client's own address. The
/// delivery socket is created with [`ZTUNNEL_MARK`] (so every capture program leaves it
/// alone) and `zt_sockops` switches it to this mark before its SYN leaves; the pod's
/// namespace routes packets carrying it to its loopback, so the application's replies (which
/// inherit the mark of the SYN they answer) come back to ztunnel instead of leaving the pod.
pub const DELIVERY_MARK: u32 = 0x53a;

/// Per enrolled pod network namespace: what the outbound program redirects to.
/// Keyed by the namespace's cookie (`bpf_get_netns_cookie`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodCapture {
    /// Port of ztunnel's outbound listener on the pod's loopback (15001), host byte order.
    pub outbound_port: u16,
    /// Bit flags, see `CAPTURE_*`.
    pub flags: u16,
    pub _pad: u32,
}

/// Capture outbound IPv4 TCP connections.
pub const CAPTURE_OUTBOUND: u16 = 1;

/// An original destination: where the application meant to connect.
/// Addresses and port in network byte order, as the kernel hands them over.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// IPv4 in `addr[0]`, or the 16 bytes of an IPv6 address.
    pub addr: [u32; 4],
    /// Network byte order, in the low 16 bits.
    pub port: u32,
    /// `AF_INET` (2) or `AF_INET6` (10).
    pub family: u32,
}

/// The redirected socket as the listener sees its peer: which namespace, and the client's
/// local address after the redirect (always loopback, so the port tells connections apart).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientKey {
    pub netns_cookie: u64,
    /// Client's local address, network byte order (IPv4 in `addr[0]`).
    pub addr: [u32; 4],
    /// Client's local port, host byte order.
    pub port: u32,
    pub family: u32,
}

/// The one destination port the inbound steering program never touches: HBONE (15008), which
/// ztunnel's own listener in the pod takes. Every other port of the pod, ztunnel's others
/// included, is steered to the inbound listener, where ztunnel refuses its own ports itself
/// (reset, logged, counted): left alone, 15021 would reach the application around policy.
pub const INBOUND_UNSTEERED_PORT: u16 = 15008;

/// An address of an enrolled pod, in its namespace: the key of the delivery marks.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PodAddr {
    pub netns_cookie: u64,
    /// Network byte order (IPv4 in `addr[0]`, the rest zero).
    pub addr: [u32; 4],
    pub family: u32,
    pub _pad: u32,
}

/// A delivery by ztunnel in progress, as the pod's stack sees its SYN: from the client's
/// address to the application's. The inbound steering lets these through (they come from
/// ztunnel, not from outside the pod). Addresses in network byte order, ports in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DeliveryFlow {
    pub client: [u32; 4],
    pub app: [u32; 4],
    pub client_port: u32,
    pub app_port: u32,
    pub family: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod pod {
    // `aya::Pod` is an unsafe trait: it promises any bit pattern is a valid value.
    #![allow(unsafe_code)]

    // SAFETY: the types are `#[repr(C)]`, `Copy`, made only of integers, with explicit
    // padding fields, so any bit pattern is valid and there is no uninitialised byte.
    unsafe impl aya::Pod for super::PodCapture {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ClientKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PodAddr {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DeliveryFlow {}
}
