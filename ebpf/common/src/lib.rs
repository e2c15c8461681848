//! Map keys and values shared by the capture programs (kernel side) and ztunnel's loader
//! (user side). Every type is `#[repr(C)]` plain data with explicit padding, so both sides
//! agree on the layout byte for byte.
#![no_std]

/// `SO_MARK` carried by every socket ztunnel opens; the programs never redirect those.
pub const ZTUNNEL_MARK: u32 = 0x539;

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

#[cfg(feature = "user")]
mod pod {
    // SAFETY: the types are `#[repr(C)]`, `Copy`, made only of integers, with explicit
    // padding fields, so any bit pattern is valid and there is no uninitialised byte.
    unsafe impl aya::Pod for super::PodCapture {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ClientKey {}
}
