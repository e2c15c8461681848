//! The few route-netlink requests ztunnel makes in a pod's namespace: add and delete one
//! policy rule and one route per address family. Messages are built as bytes here (pure,
//! unit-tested) and sent on a `NETLINK_ROUTE` socket created by the caller's thread, which
//! must be in the pod's namespace (a netlink socket talks to the namespace it was made in).
//!
//! Layouts are the kernel's uapi: `struct nlmsghdr` (linux/netlink.h), `struct fib_rule_hdr`
//! and `FRA_*` (linux/fib_rules.h), `struct rtmsg` and `RTA_*` (linux/rtnetlink.h).

use std::io::{self, Read as _};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const NLMSG_ERROR: u16 = 2;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;

const FR_ACT_TO_TBL: u8 = 1;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;

const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_HOST: u8 = 254;
const RTN_LOCAL: u8 = 2;

/// The loopback device's index, the same in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// An address family as netlink names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Family {
    V4,
    V6,
}

impl Family {
    fn af(self) -> u8 {
        match self {
            Family::V4 => libc::AF_INET as u8,
            Family::V6 => libc::AF_INET6 as u8,
        }
    }
}

/// "Packets marked `mark` look up `table`", at priority `priority`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct MarkRule {
    pub family: Family,
    pub priority: u32,
    pub mark: u32,
    pub table: u32,
}

/// Add or delete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Op {
    Add,
    Delete,
}

/// The request for `rule`. Adding is exclusive (an identical rule answers `EEXIST`), since
/// rules, unlike routes, would otherwise pile up.
pub(super) fn rule_message(op: Op, rule: &MarkRule, seq: u32) -> Vec<u8> {
    let (kind, flags) = match op {
        Op::Add => (RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL),
        Op::Delete => (RTM_DELRULE, 0),
    };
    let mut msg = header(kind, flags, seq);
    // struct fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action, flags.
    msg.extend_from_slice(&[rule.family.af(), 0, 0, 0, 0, 0, 0, FR_ACT_TO_TBL]);
    msg.extend_from_slice(&0u32.to_ne_bytes());
    attr_u32(&mut msg, FRA_PRIORITY, rule.priority);
    attr_u32(&mut msg, FRA_FWMARK, rule.mark);
    attr_u32(&mut msg, FRA_FWMASK, u32::MAX);
    attr_u32(&mut msg, FRA_TABLE, rule.table);
    finish(msg)
}

/// The request for "every destination is local, through the loopback" (`local default dev
/// lo`) in `table`. Adding replaces an identical route, so it can be repeated.
pub(super) fn local_default_message(op: Op, family: Family, table: u32, seq: u32) -> Vec<u8> {
    let (kind, flags) = match op {
        Op::Add => (RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE),
        Op::Delete => (RTM_DELROUTE, 0),
    };
    let mut msg = header(kind, flags, seq);
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags. The
    // table travels as RTA_TABLE (the u8 field cannot hold every table id).
    msg.extend_from_slice(&[
        family.af(),
        0,
        0,
        0,
        0,
        RTPROT_STATIC,
        RT_SCOPE_HOST,
        RTN_LOCAL,
    ]);
    msg.extend_from_slice(&0u32.to_ne_bytes());
    attr_u32(&mut msg, RTA_TABLE, table);
    attr_u32(&mut msg, RTA_OIF, LOOPBACK_IFINDEX);
    finish(msg)
}

fn header(kind: u16, flags: u16, seq: u32) -> Vec<u8> {
    let mut msg = Vec::with_capacity(64);
    msg.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `finish`
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    msg
}

fn attr_u32(msg: &mut Vec<u8>, kind: u16, value: u32) {
    // struct nlattr: length (header + payload), type; 4-byte payload needs no padding.
    msg.extend_from_slice(&8u16.to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&value.to_ne_bytes());
}

fn finish(mut msg: Vec<u8>) -> Vec<u8> {
    let len = u32::try_from(msg.len()).unwrap_or(u32::MAX);
    msg[..4].copy_from_slice(&len.to_ne_bytes());
    msg
}

/// What the kernel answered to request `seq`: `Ok(())`, or the errno it refused with.
pub(super) fn parse_ack(reply: &[u8], seq: u32) -> io::Result<Result<(), i32>> {
    let bad = |what: &str| io::Error::other(format!("netlink answer: {what}"));
    let mut rest = reply;
    while rest.len() >= 16 {
        let word =
            |at: usize| u32::from_ne_bytes([rest[at], rest[at + 1], rest[at + 2], rest[at + 3]]);
        let len = word(0) as usize;
        if len < 16 || len > rest.len() {
            return Err(bad("truncated message"));
        }
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        if kind == NLMSG_ERROR && word(8) == seq {
            if len < 20 {
                return Err(bad("truncated error"));
            }
            let errno = i32::from_ne_bytes([rest[16], rest[17], rest[18], rest[19]]);
            return Ok(if errno == 0 { Ok(()) } else { Err(-errno) });
        }
        // Messages are 4-byte aligned.
        let next = (len + 3) & !3;
        rest = rest.get(next..).unwrap_or_default();
    }
    Err(bad("no acknowledgement"))
}

/// A route-netlink socket in the calling thread's namespace.
pub(super) struct Rtnl {
    socket: Socket,
    seq: u32,
}

impl Rtnl {
    pub(super) fn open() -> io::Result<Rtnl> {
        let socket = Socket::new(
            Domain::from(libc::AF_NETLINK),
            Type::RAW.cloexec(),
            Some(Protocol::from(libc::NETLINK_ROUTE)),
        )?;
        // The kernel answers at once; a bound keeps a wedged namespace from hanging us.
        socket.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(Rtnl { socket, seq: 0 })
    }

    pub(super) fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends one request (built with `seq`) and returns the kernel's answer to it.
    pub(super) fn request(&mut self, msg: &[u8], seq: u32) -> io::Result<Result<(), i32>> {
        // With no address, a netlink socket sends to the kernel.
        self.socket.send(msg)?;
        let mut buf = [0u8; 4096];
        loop {
            let n = (&self.socket).read(&mut buf)?;
            match parse_ack(&buf[..n], seq) {
                Ok(answer) => return Ok(answer),
                // An answer to an earlier request (timed out before): read on.
                Err(_) if n > 0 => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes([b[at], b[at + 1]])
    }
    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    /// The attributes after the 16-byte header and 12-byte family header, as (type, u32).
    fn attrs(msg: &[u8]) -> Vec<(u16, u32)> {
        msg[28..]
            .chunks(8)
            .map(|a| {
                assert_eq!(u16_at(a, 0), 8);
                (u16_at(a, 2), u32_at(a, 4))
            })
            .collect()
    }

    #[test]
    fn a_mark_rule_is_an_exclusive_new_rule_to_its_table() {
        let rule = MarkRule {
            family: Family::V6,
            priority: 1337,
            mark: 0x53a,
            table: 1337,
        };
        let msg = rule_message(Op::Add, &rule, 7);
        assert_eq!(u32_at(&msg, 0) as usize, msg.len());
        assert_eq!(u16_at(&msg, 4), RTM_NEWRULE);
        assert_eq!(
            u16_at(&msg, 6),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        );
        assert_eq!(u32_at(&msg, 8), 7);
        assert_eq!(msg[16], libc::AF_INET6 as u8);
        assert_eq!(msg[23], FR_ACT_TO_TBL);
        assert_eq!(
            attrs(&msg),
            vec![
                (FRA_PRIORITY, 1337),
                (FRA_FWMARK, 0x53a),
                (FRA_FWMASK, u32::MAX),
                (FRA_TABLE, 1337)
            ]
        );
        let del = rule_message(Op::Delete, &rule, 8);
        assert_eq!(u16_at(&del, 4), RTM_DELRULE);
        assert_eq!(u16_at(&del, 6), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(del[16..], msg[16..], "a delete names the same rule");
    }

    #[test]
    fn the_local_default_route_goes_through_loopback() {
        let msg = local_default_message(Op::Add, Family::V4, 1337, 1);
        assert_eq!(u32_at(&msg, 0) as usize, msg.len());
        assert_eq!(u16_at(&msg, 4), RTM_NEWROUTE);
        assert_eq!(
            u16_at(&msg, 6),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
        );
        // Default destination (dst_len 0), host scope, local type.
        assert_eq!(msg[16], libc::AF_INET as u8);
        assert_eq!(msg[17], 0);
        assert_eq!(msg[22], RT_SCOPE_HOST);
        assert_eq!(msg[23], RTN_LOCAL);
        assert_eq!(attrs(&msg), vec![(RTA_TABLE, 1337), (RTA_OIF, 1)]);
        let del = local_default_message(Op::Delete, Family::V4, 1337, 2);
        assert_eq!(u16_at(&del, 4), RTM_DELROUTE);
    }

    fn error_message(seq: u32, errno: i32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&36u32.to_ne_bytes());
        m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&(-errno).to_ne_bytes());
        m.extend_from_slice(&[0u8; 16]); // the request's header, echoed
        m
    }

    #[test]
    fn acks_are_matched_to_their_request() {
        assert_eq!(parse_ack(&error_message(3, 0), 3).unwrap(), Ok(()));
        assert_eq!(
            parse_ack(&error_message(3, libc::EEXIST), 3).unwrap(),
            Err(libc::EEXIST)
        );
        // An earlier request's answer first, then ours.
        let mut two = error_message(2, libc::ENOENT);
        two.extend(error_message(3, 0));
        assert_eq!(parse_ack(&two, 3).unwrap(), Ok(()));
        assert!(parse_ack(&error_message(2, 0), 3).is_err());
        assert!(parse_ack(&[1, 2, 3], 3).is_err());
        let mut short = error_message(3, 0);
        short[0] = 200; // claims more than there is
        assert!(parse_ack(&short, 3).is_err());
    }
}
