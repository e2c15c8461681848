//! Which source address L4 policy judges a tunnelled connection by.
//!
//! An HBONE CONNECT may carry `forwarded: for="<ip:port>"`: the client address as the
//! sending ztunnel *claims* it. Any workload holding a mesh certificate can write that header,
//! so believing it would let it satisfy a `sourceIps` ALLOW or dodge a `sourceIps` DENY. What
//! the network proved is the TCP peer of the HBONE connection, and that is what policy sees.
//!
//! The claim may be believed only from a peer whose proven identity is one the destination
//! trusts to forward the original client: the waypoint of the destination workload, or of a
//! service it belongs to (`State::waypoint_identities`). A tunnel from anyone else is
//! judged by its peer address whatever it claims. The claimed address stays useful for
//! logs, metrics and connection records, labelled as claimed.

use std::net::SocketAddr;

use crate::identity::Identity;

/// No identity is trusted to forward (a destination with no waypoint).
pub const NO_TRUSTED_FORWARDERS: &[Identity] = &[];

/// The address policy sees for a tunnel from `peer` (the TCP peer of the HBONE connection)
/// that proved `peer_identity` and claimed `forwarded`: the claim when the peer is one of
/// `trusted`, else the peer's own address. Policy uses its IP; the port is for records.
pub fn policy_source(
    peer: SocketAddr,
    forwarded: Option<SocketAddr>,
    peer_identity: &Identity,
    trusted: &[Identity],
) -> SocketAddr {
    match forwarded {
        Some(claimed) if trusted.contains(peer_identity) => claimed,
        _ => peer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "default", sa).unwrap()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_untrusted_peer_is_judged_by_its_own_address() {
        let peer = addr("10.0.0.2:40000");
        let claimed = Some(addr("10.0.0.9:1"));
        assert_eq!(
            policy_source(peer, claimed, &id("sleep"), NO_TRUSTED_FORWARDERS),
            peer
        );
        // Trusting someone else changes nothing for this peer.
        assert_eq!(
            policy_source(peer, claimed, &id("sleep"), &[id("waypoint")]),
            peer
        );
    }

    #[test]
    fn no_claim_means_the_peer_address() {
        let peer = addr("[fd00::2]:40000");
        assert_eq!(
            policy_source(peer, None, &id("waypoint"), &[id("waypoint")]),
            peer
        );
    }

    #[test]
    fn a_trusted_forwarder_passes_the_original_client_on() {
        let peer = addr("10.0.0.2:40000");
        let claimed = addr("10.0.5.5:1234");
        assert_eq!(
            policy_source(peer, Some(claimed), &id("waypoint"), &[id("waypoint")]),
            claimed
        );
    }
}
