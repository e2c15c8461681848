//! Deliveries from the client's own address: what a pod's namespace needs so that ztunnel
//! can connect to the application from a client's address (not one of the pod's), and the
//! application's replies still come back to ztunnel instead of leaving the pod.
//!
//! ztunnel binds its delivery socket transparently to the client's address, with its usual
//! mark; `zt_sockops` switches it to [`DELIVERY_MARK`] just before its SYN leaves (found by
//! the pod address it connects to, in `DELIVERY_MARKS`). In the pod's namespace:
//! - `net.ipv4.tcp_fwmark_accept = 1` (which IPv6 follows too): the application's accepted
//!   socket, and its SYN-ACK, take the mark of the SYN they answer, so every reply to a
//!   delivery carries the delivery mark;
//! - `net.ipv4.fwmark_reflect` and `net.ipv6.fwmark_reflect = 1`: so do the resets the stack
//!   sends for a socket that is already gone;
//! - for IPv4 and IPv6 a rule `fwmark DELIVERY_MARK lookup DELIVERY_TABLE` and, in that table,
//!   `local default dev lo`: marked packets are delivered inside the pod (to ztunnel's
//!   transparent socket), never routed out.
//!
//! Nothing else in the pod changes: its own traffic carries no such mark, and the sysctls
//! only copy marks that something set. The set-up lives while the pod is enrolled or any
//! connection delivered into it is open (their replies need it), and is undone when the last
//! of them ends. Which sysctls ztunnel turned on is recorded in a pinned map, so that a
//! successor (upgrade) or a restarted ztunnel undoes exactly those; a ztunnel replaced by a
//! successor leaves everything to it.

use std::collections::HashMap as StdHashMap;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use aya::maps::{HashMap, MapData};
use tracing::{debug, info, warn};

use ztunnel_ebpf_common::{DELIVERY_MARK, PodAddr};

use super::netns::{Netns, NetnsCookie, NetnsError};
use super::rtnl::{Family, MarkRule, Op, Rtnl, local_default_message, rule_message};
use super::{AF_INET, AF_INET6, words6};

/// Routing table of the pod's namespace that sends marked packets to its loopback.
pub const DELIVERY_TABLE: u32 = 1337;
/// Priority of the rule that selects it: before the main table (32766).
pub const DELIVERY_RULE_PRIORITY: u32 = 1337;

/// The sysctls ztunnel turns on in a pod namespace, with their bit in `NETNS_CHANGES`.
const SYSCTLS: [(&str, u32); 3] = [
    ("/proc/sys/net/ipv4/tcp_fwmark_accept", 1),
    ("/proc/sys/net/ipv4/fwmark_reflect", 2),
    ("/proc/sys/net/ipv6/fwmark_reflect", 4),
];

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("{what} in network namespace {netns}: {source}")]
    Setup {
        what: String,
        netns: String,
        source: io::Error,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
}

/// The pod namespaces set up for client-address deliveries on this node.
pub struct SourceRouting {
    marks: Mutex<HashMap<MapData, PodAddr, u32>>,
    changes: Mutex<HashMap<MapData, u64, u32>>,
    live: Mutex<StdHashMap<NetnsCookie, Weak<PodRouting>>>,
    /// Set when a successor has taken over: from then on nothing is undone here.
    keep: AtomicBool,
}

impl std::fmt::Debug for SourceRouting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceRouting").finish_non_exhaustive()
    }
}

/// One pod namespace's set-up; undone when the last holder lets go. The enrolled pod holds
/// one, and so, through the pod, does every connection delivered into it.
#[derive(Debug)]
pub struct PodRouting {
    owner: Arc<SourceRouting>,
    netns: Arc<Netns>,
    /// Set when this holder must not undo the set-up (see [`PodRouting::leave_in_place`]).
    keep: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each critical section is a handful of map operations: a panic cannot leave the data
    // half-changed in a way later calls would trip on.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn pod_addr(netns: NetnsCookie, ip: IpAddr) -> PodAddr {
    let (addr, family) = match ip {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], AF_INET),
        IpAddr::V6(v6) => (words6(&v6), AF_INET6),
    };
    PodAddr {
        netns_cookie: netns.0,
        addr,
        family,
        _pad: 0,
    }
}

impl SourceRouting {
    pub(super) fn new(
        marks: HashMap<MapData, PodAddr, u32>,
        changes: HashMap<MapData, u64, u32>,
    ) -> SourceRouting {
        SourceRouting {
            marks: Mutex::new(marks),
            changes: Mutex::new(changes),
            live: Mutex::new(StdHashMap::new()),
            keep: AtomicBool::new(false),
        }
    }

    /// Sets `netns` up for deliveries to `pod_ips` from client addresses (or joins the
    /// set-up already there: a pod enrolled again while connections into it are open).
    pub fn acquire(
        self: &Arc<Self>,
        netns: &Arc<Netns>,
        pod_ips: &[IpAddr],
    ) -> Result<Arc<PodRouting>, RoutingError> {
        let cookie = netns.cookie();
        let mut live = lock(&self.live);
        let routing = match live.get(&cookie).and_then(Weak::upgrade) {
            Some(routing) => routing,
            None => {
                if let Err(err) = self.set_up(netns) {
                    // Leave nothing half-done behind.
                    self.tear_down(netns);
                    return Err(err);
                }
                let routing = Arc::new(PodRouting {
                    owner: self.clone(),
                    netns: netns.clone(),
                    keep: AtomicBool::new(false),
                });
                live.insert(cookie, Arc::downgrade(&routing));
                routing
            }
        };
        let mut marks = lock(&self.marks);
        for ip in pod_ips {
            marks
                .insert(pod_addr(cookie, *ip), DELIVERY_MARK, 0)
                .map_err(|source| RoutingError::Map {
                    name: "DELIVERY_MARKS",
                    source,
                })?;
        }
        Ok(routing)
    }

    /// From now on nothing is undone by this process: a successor serves these pods.
    pub fn keep_in_place(&self) {
        self.keep.store(true, Ordering::Relaxed);
    }

    /// Removes the delivery marks of namespaces not in `keep` (left by a crashed
    /// predecessor); their addresses are not delivered to from here.
    pub fn prune(&self, keep: &[NetnsCookie]) -> usize {
        let mut marks = lock(&self.marks);
        let stale: Vec<PodAddr> = marks
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !keep.contains(&NetnsCookie(k.netns_cookie)))
            .collect();
        for key in &stale {
            let _ = marks.remove(key);
        }
        stale.len()
    }

    fn set_up(&self, netns: &Netns) -> Result<(), RoutingError> {
        let cookie = netns.cookie();
        let setup_err = |what: &str, source| RoutingError::Setup {
            what: what.to_owned(),
            netns: netns.path().display().to_string(),
            source,
        };
        let off = netns
            .run_blocking(sysctls_off)?
            .map_err(|e| setup_err("reading sysctls", e))?;
        // Recorded before they change: a crash in between leaves at worst a record of a
        // change not made, which undoes to the value the pod already has.
        let mut changes = lock(&self.changes);
        let before = changes.get(&cookie.0, 0).unwrap_or(0);
        changes
            .insert(cookie.0, before | off, 0)
            .map_err(|source| RoutingError::Map {
                name: "NETNS_CHANGES",
                source,
            })?;
        drop(changes);
        netns
            .run_blocking(move || write_sysctls(off, "1"))?
            .map_err(|e| setup_err("turning on mark sysctls", e))?;
        netns
            .run_blocking(|| routes(Op::Add))?
            .map_err(|e| setup_err("adding the delivery route", e))?;
        info!(netns = %netns.path().display(), "pod namespace set up for deliveries from client addresses");
        Ok(())
    }

    /// Undoes everything [`Self::set_up`] may have done in `netns`. Errors are logged: there
    /// is no one to hand them to, and the rest is still undone.
    fn tear_down(&self, netns: &Netns) {
        let cookie = netns.cookie();
        let path = netns.path().display().to_string();
        {
            let mut marks = lock(&self.marks);
            let ours: Vec<PodAddr> = marks
                .keys()
                .filter_map(Result::ok)
                .filter(|k| k.netns_cookie == cookie.0)
                .collect();
            for key in &ours {
                let _ = marks.remove(key);
            }
        }
        match netns.run_blocking(|| routes(Op::Delete)) {
            Ok(Ok(())) => {}
            Ok(Err(err)) => warn!(netns = %path, %err, "cannot remove the delivery route"),
            Err(err) => warn!(netns = %path, %err, "cannot remove the delivery route"),
        }
        let mut changes = lock(&self.changes);
        let on = changes.get(&cookie.0, 0).unwrap_or(0);
        match netns.run_blocking(move || write_sysctls(on, "0")) {
            Ok(Ok(())) => {
                let _ = changes.remove(&cookie.0);
            }
            Ok(Err(err)) => warn!(netns = %path, %err, "cannot restore mark sysctls"),
            Err(err) => warn!(netns = %path, %err, "cannot restore mark sysctls"),
        }
        debug!(netns = %path, "delivery set-up removed");
    }
}

impl PodRouting {
    /// Letting go of this holder leaves the set-up as it is: for a pod taken over from a
    /// predecessor whose enrolment failed here, the predecessor still delivers into it and
    /// its replies need the route; the next attempt joins the set-up again.
    pub fn leave_in_place(&self) {
        self.keep.store(true, Ordering::Relaxed);
    }
}

impl Drop for PodRouting {
    fn drop(&mut self) {
        let owner = &self.owner;
        if owner.keep.load(Ordering::Relaxed) || self.keep.load(Ordering::Relaxed) {
            return;
        }
        let cookie = self.netns.cookie();
        let mut live = lock(&owner.live);
        // A newer set-up of the same namespace (the pod enrolled again meanwhile) keeps it.
        if live.get(&cookie).is_some_and(|w| w.strong_count() > 0) {
            return;
        }
        live.remove(&cookie);
        owner.tear_down(&self.netns);
        drop(live);
    }
}

/// The bits of the mark sysctls that are off in this thread's namespace (one that does not
/// exist, such as IPv6's without IPv6, counts as on: there is nothing to turn on).
fn sysctls_off() -> io::Result<u32> {
    let mut off = 0;
    for (path, bit) in SYSCTLS {
        match std::fs::read_to_string(path) {
            Ok(value) if value.trim() == "0" => off |= bit,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io::Error::new(e.kind(), format!("{path}: {e}"))),
        }
    }
    Ok(off)
}

fn write_sysctls(bits: u32, value: &str) -> io::Result<()> {
    for (path, bit) in SYSCTLS {
        if bits & bit != 0 {
            std::fs::write(path, value)
                .map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
        }
    }
    Ok(())
}

/// Adds or removes the rule and the local route, both families, in this thread's
/// namespace. Adding what is there, or removing what is not, is not an error; nor is IPv6
/// being off in the namespace.
fn routes(op: Op) -> io::Result<()> {
    let mut rtnl = Rtnl::open()?;
    for family in [Family::V4, Family::V6] {
        let rule = MarkRule {
            family,
            priority: DELIVERY_RULE_PRIORITY,
            mark: DELIVERY_MARK,
            table: DELIVERY_TABLE,
        };
        let seq = rtnl.next_seq();
        let answer = rtnl.request(&rule_message(op, &rule, seq), seq)?;
        check(op, family, "rule", answer)?;
        let seq = rtnl.next_seq();
        let msg = local_default_message(op, family, DELIVERY_TABLE, seq);
        let answer = rtnl.request(&msg, seq)?;
        check(op, family, "route", answer)?;
    }
    Ok(())
}

fn check(op: Op, family: Family, what: &str, answer: Result<(), i32>) -> io::Result<()> {
    let Err(errno) = answer else { return Ok(()) };
    let fine = match op {
        Op::Add => errno == libc::EEXIST,
        Op::Delete => errno == libc::ENOENT || errno == libc::ESRCH,
    } || (family == Family::V6 && errno == libc::EAFNOSUPPORT);
    if fine {
        return Ok(());
    }
    let err = io::Error::from_raw_os_error(errno);
    Err(io::Error::new(
        err.kind(),
        format!("{op:?} {family:?} {what}: {err}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_and_missing_entries_are_not_errors() {
        assert!(check(Op::Add, Family::V4, "rule", Err(libc::EEXIST)).is_ok());
        assert!(check(Op::Delete, Family::V4, "rule", Err(libc::ENOENT)).is_ok());
        assert!(check(Op::Delete, Family::V4, "route", Err(libc::ESRCH)).is_ok());
        assert!(check(Op::Add, Family::V6, "route", Err(libc::EAFNOSUPPORT)).is_ok());
        // Anything else is.
        assert!(check(Op::Add, Family::V4, "route", Err(libc::EAFNOSUPPORT)).is_err());
        assert!(check(Op::Add, Family::V4, "rule", Err(libc::EPERM)).is_err());
        assert!(check(Op::Delete, Family::V4, "rule", Err(libc::EEXIST)).is_err());
    }

    #[test]
    fn pod_addresses_are_keyed_as_the_program_reads_them() {
        let v4 = pod_addr(NetnsCookie(9), "198.19.1.10".parse().unwrap());
        assert_eq!(v4.netns_cookie, 9);
        assert_eq!(v4.family, AF_INET);
        assert_eq!(v4.addr, [u32::from_ne_bytes([198, 19, 1, 10]), 0, 0, 0]);
        let v6 = pod_addr(NetnsCookie(9), "fd00::1".parse().unwrap());
        assert_eq!(v6.family, AF_INET6);
        assert_eq!(v6.addr[0], u32::from_ne_bytes([0xfd, 0, 0, 0]));
        assert_eq!(v6.addr[3], u32::from_ne_bytes([0, 0, 0, 1]));
    }
}
