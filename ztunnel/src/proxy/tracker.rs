//! Connection tracking: every connection ztunnel relays is registered while it lives (with
//! live byte counts) and, when it ends, leaves a line in the access log, its count in Istio's
//! metrics and an entry in a bounded history of recent connections with the reason it ended.
//! Inputs refused before any connection existed (failed handshakes, bad tunnels) go to the
//! same history as `rejected`, so "why did my connection fail" has one place to look.
//!
//! The tracker observes and never decides: the paths in `outbound`/`inbound` report what they
//! did (`Tracked::set_policy`, `Tracked::finish`).

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

use crate::identity::Identity;
use crate::metrics::traffic::Peer;
use crate::metrics::{Metrics, Reporter, ResponseFlags, SecurityPolicy, TrafficLabels};
use crate::state::{Service, Workload};

/// How many ended connections `/connections` remembers.
pub const HISTORY: usize = 256;

/// The way a connection goes through this ztunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConnPath {
    /// From a local pod, tunnelled to another node's ztunnel.
    HboneOut,
    /// A tunnel from another node, delivered to a local pod.
    HboneIn,
    /// Between two pods of this node, no tunnel.
    SameNode,
    /// From a local pod to a destination outside the mesh, plain TCP.
    Passthrough,
    /// Plain TCP arriving at a local pod (the client is not in the mesh).
    PlaintextIn,
    /// From a local pod to a service with no usable endpoint.
    NoRoute,
}

impl ConnPath {
    /// The Istio reporters this path is counted under.
    pub fn reporters(self) -> &'static [Reporter] {
        match self {
            ConnPath::HboneOut | ConnPath::Passthrough | ConnPath::NoRoute => &[Reporter::Source],
            ConnPath::HboneIn | ConnPath::PlaintextIn => &[Reporter::Destination],
            // Both ends are ours: counted once as each, as two ztunnels would.
            ConnPath::SameNode => &[Reporter::Source, Reporter::Destination],
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ConnPath::HboneOut => "hbone-out",
            ConnPath::HboneIn => "hbone-in",
            ConnPath::SameNode => "same-node",
            ConnPath::Passthrough => "passthrough",
            ConnPath::PlaintextIn => "plaintext-in",
            ConnPath::NoRoute => "no-route",
        }
    }

    /// Both ends proven by certificates: HBONE, or both pods' identities held by this node.
    fn mtls(self) -> bool {
        matches!(
            self,
            ConnPath::HboneOut | ConnPath::HboneIn | ConnPath::SameNode
        )
    }
}

/// What a path knows about a connection when it starts.
#[derive(Clone, Debug)]
pub struct ConnMeta {
    pub path: ConnPath,
    /// The client (its pod address when it is a local pod; for a tunnel, the TCP peer of the
    /// HBONE connection, which is what policy judged).
    pub src: SocketAddr,
    /// The client address a tunnel's `forwarded` header claimed: recorded, never believed
    /// for policy (see `state::authz::policy_source`).
    pub src_claimed: Option<SocketAddr>,
    /// Where the client was going (a pod or a service VIP).
    pub dst: SocketAddr,
    /// What ztunnel connected to: the HBONE peer, the chosen endpoint, the application.
    pub upstream: Option<SocketAddr>,
    pub src_identity: Option<Identity>,
    pub dst_identity: Option<Identity>,
    pub src_workload: Option<Arc<Workload>>,
    pub dst_workload: Option<Arc<Workload>>,
    pub dst_service: Option<Arc<Service>>,
}

impl ConnMeta {
    pub fn new(path: ConnPath, src: SocketAddr, dst: SocketAddr) -> ConnMeta {
        ConnMeta {
            path,
            src,
            src_claimed: None,
            dst,
            upstream: None,
            src_identity: None,
            dst_identity: None,
            src_workload: None,
            dst_workload: None,
            dst_service: None,
        }
    }

    fn labels(&self, reporter: Reporter) -> TrafficLabels {
        let src = Peer {
            workload: self.src_workload.as_deref(),
            identity: self.src_identity.as_ref(),
        };
        let dst = Peer {
            workload: self.dst_workload.as_deref(),
            identity: self.dst_identity.as_ref(),
        };
        let security = if self.path.mtls() {
            SecurityPolicy::MutualTls
        } else {
            SecurityPolicy::Unknown
        };
        TrafficLabels::new(reporter, src, dst, self.dst_service.as_deref(), security)
    }
}

/// The authorization verdict, as far as this ztunnel knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Not applicable (not in the mesh) or not reached yet.
    NotChecked,
    /// Checked by the destination's ztunnel.
    AtDestination,
    Allowed,
    Denied {
        policy: Option<String>,
        reason: String,
    },
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Policy::NotChecked => f.write_str("-"),
            Policy::AtDestination => f.write_str("at destination"),
            Policy::Allowed => f.write_str("allow"),
            Policy::Denied {
                policy: Some(p),
                reason,
            } => write!(f, "deny ({p}: {reason})"),
            Policy::Denied {
                policy: None,
                reason,
            } => write!(f, "deny ({reason})"),
        }
    }
}

/// How a connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Both directions finished cleanly.
    Complete,
    /// Refused by an authorization policy (here, or by the destination's ztunnel).
    Denied(String),
    /// The upstream (application, tunnel, endpoint) could not be reached.
    ConnectFailed(String),
    /// Established, then ended with an I/O error.
    Error(String),
    /// Refused before anything was relayed (bad tunnel, failed handshake, wrong identity).
    Rejected(String),
    /// The task went away without reporting (shutdown).
    Aborted,
}

impl Outcome {
    fn flags(&self) -> ResponseFlags {
        match self {
            Outcome::Denied(_) => ResponseFlags::Deny,
            Outcome::ConnectFailed(_) | Outcome::Rejected(_) => ResponseFlags::Connect,
            Outcome::Complete | Outcome::Error(_) | Outcome::Aborted => ResponseFlags::None,
        }
    }

    fn state(&self) -> &'static str {
        match self {
            Outcome::Complete => "closed",
            Outcome::Denied(_) => "denied",
            Outcome::ConnectFailed(_) | Outcome::Error(_) | Outcome::Aborted => "failed",
            Outcome::Rejected(_) => "rejected",
        }
    }

    fn reason(&self) -> Option<&str> {
        match self {
            Outcome::Complete => None,
            Outcome::Denied(r)
            | Outcome::ConnectFailed(r)
            | Outcome::Error(r)
            | Outcome::Rejected(r) => Some(r),
            Outcome::Aborted => Some("ended without a result (shutdown)"),
        }
    }
}

/// One live connection.
#[derive(Debug)]
pub struct Record {
    pub id: u64,
    meta: ConnMeta,
    started: SystemTime,
    start: Instant,
    /// Client to server.
    received: AtomicU64,
    /// Server to client.
    sent: AtomicU64,
    policy: Mutex<Policy>,
    labels: Vec<TrafficLabels>,
    metric_received: Vec<Counter>,
    metric_sent: Vec<Counter>,
}

impl Record {
    fn add_received(&self, n: u64) {
        self.received.fetch_add(n, Ordering::Relaxed);
        for c in &self.metric_received {
            c.inc_by(n);
        }
    }

    fn add_sent(&self, n: u64) {
        self.sent.fetch_add(n, Ordering::Relaxed);
        for c in &self.metric_sent {
            c.inc_by(n);
        }
    }

    fn policy(&self) -> Policy {
        self.policy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn view(&self, state: &'static str, reason: Option<&str>) -> ConnectionView {
        let m = &self.meta;
        let name =
            |w: &Option<Arc<Workload>>| w.as_ref().map(|w| format!("{}/{}", w.namespace(), w.name));
        ConnectionView {
            id: self.id,
            state: state.to_owned(),
            path: m.path.as_str().to_owned(),
            reporter: m
                .path
                .reporters()
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join("+"),
            src: m.src.to_string(),
            src_claimed: m.src_claimed.map(|a| a.to_string()),
            dst: m.dst.to_string(),
            upstream: m.upstream.map(|a| a.to_string()),
            src_identity: m.src_identity.as_ref().map(ToString::to_string),
            dst_identity: m.dst_identity.as_ref().map(ToString::to_string),
            src_workload: name(&m.src_workload),
            dst_workload: name(&m.dst_workload),
            dst_service: m.dst_service.as_ref().map(|s| s.hostname.clone()),
            started: crate::time::rfc3339(self.started),
            duration_ms: self.start.elapsed().as_millis() as u64,
            bytes_received: self.received.load(Ordering::Relaxed),
            bytes_sent: self.sent.load(Ordering::Relaxed),
            policy: self.policy().to_string(),
            reason: reason.map(str::to_owned),
        }
    }
}

/// A connection as `/connections` and the CLI show it. `bytes_received` is client to
/// server, `bytes_sent` server to client (Istio's metric directions).
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ConnectionView {
    pub id: u64,
    /// `open`, `closed`, `denied`, `failed` or `rejected`.
    pub state: String,
    pub path: String,
    pub reporter: String,
    pub src: String,
    /// What the tunnel's `forwarded` header claimed the client was (not used for policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_claimed: Option<String>,
    pub dst: String,
    pub upstream: Option<String>,
    pub src_identity: Option<String>,
    pub dst_identity: Option<String>,
    pub src_workload: Option<String>,
    pub dst_workload: Option<String>,
    pub dst_service: Option<String>,
    pub started: String,
    pub duration_ms: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub policy: String,
    pub reason: Option<String>,
}

/// The live connections and the recent history of one ztunnel.
#[derive(Debug)]
pub struct Tracker {
    metrics: Arc<Metrics>,
    next_id: AtomicU64,
    live: Mutex<BTreeMap<u64, Arc<Record>>>,
    history: Mutex<VecDeque<ConnectionView>>,
}

impl Tracker {
    pub fn new(metrics: Arc<Metrics>) -> Tracker {
        Tracker {
            metrics,
            next_id: AtomicU64::new(1),
            live: Mutex::new(BTreeMap::new()),
            history: Mutex::new(VecDeque::with_capacity(HISTORY)),
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Registers a new connection and counts it as opened.
    pub fn open(self: &Arc<Self>, meta: ConnMeta) -> Tracked {
        let traffic = &self.metrics.traffic;
        let labels: Vec<TrafficLabels> = meta
            .path
            .reporters()
            .iter()
            .map(|r| meta.labels(*r))
            .collect();
        for l in &labels {
            traffic.opened.get_or_create(l).inc();
        }
        let record = Arc::new(Record {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            policy: Mutex::new(if meta.path == ConnPath::HboneOut {
                Policy::AtDestination
            } else {
                Policy::NotChecked
            }),
            metric_received: labels
                .iter()
                .map(|l| traffic.received_bytes.get_or_create_owned(l))
                .collect(),
            metric_sent: labels
                .iter()
                .map(|l| traffic.sent_bytes.get_or_create_owned(l))
                .collect(),
            labels,
            meta,
            started: SystemTime::now(),
            start: Instant::now(),
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
        });
        // The view (a dozen strings) is built only when the line is written.
        if access_log::opened_enabled() {
            access_log::opened(&record.view("open", None));
        }
        lock(&self.live).insert(record.id, record.clone());
        Tracked {
            tracker: self.clone(),
            record,
            done: false,
        }
    }

    /// Records an input refused before it became a connection: counted under `kind` in
    /// `ztunnel_rejected_inputs_total`, logged, and kept in the history.
    pub fn reject(&self, meta: ConnMeta, kind: &str, reason: &str) {
        self.metrics.reject(kind);
        let record = Record {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            policy: Mutex::new(Policy::NotChecked),
            labels: Vec::new(),
            metric_received: Vec::new(),
            metric_sent: Vec::new(),
            meta,
            started: SystemTime::now(),
            start: Instant::now(),
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
        };
        let view = record.view("rejected", Some(&format!("{kind}: {reason}")));
        access_log::closed(&view);
        self.remember(view);
    }

    /// The connections being relayed now, oldest first.
    pub fn live(&self) -> Vec<ConnectionView> {
        lock(&self.live)
            .values()
            .map(|r| r.view("open", None))
            .collect()
    }

    /// Recently ended connections and rejected inputs, oldest first.
    pub fn history(&self) -> Vec<ConnectionView> {
        lock(&self.history).iter().cloned().collect()
    }

    pub fn open_count(&self) -> usize {
        lock(&self.live).len()
    }

    fn remember(&self, view: ConnectionView) {
        let mut history = lock(&self.history);
        if history.len() == HISTORY {
            history.pop_front();
        }
        history.push_back(view);
    }

    fn close(&self, record: &Record, outcome: &Outcome) {
        lock(&self.live).remove(&record.id);
        for l in &record.labels {
            self.metrics
                .traffic
                .closed
                .get_or_create(&l.with_flags(outcome.flags()))
                .inc();
        }
        let view = record.view(outcome.state(), outcome.reason());
        access_log::closed(&view);
        self.remember(view);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update under these locks is a single insert or remove: a panic cannot leave
    // them half-written.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A registered connection; reports its end when finished or dropped.
#[derive(Debug)]
pub struct Tracked {
    tracker: Arc<Tracker>,
    record: Arc<Record>,
    done: bool,
}

impl Tracked {
    pub fn id(&self) -> u64 {
        self.record.id
    }

    pub fn set_policy(&self, policy: Policy) {
        *self.record.policy.lock().unwrap_or_else(|p| p.into_inner()) = policy;
    }

    /// Wraps the client side of the relay so its bytes are counted as they move.
    /// Client-to-server bytes, as they are read from the client.
    pub(super) fn add_received(&self, n: u64) {
        self.record.add_received(n);
    }

    /// Server-to-client bytes, as they are written to the client.
    pub(super) fn add_sent(&self, n: u64) {
        self.record.add_sent(n);
    }

    /// The relay reset a tunnel that made no progress (`toward_upstream`: the upstream side's,
    /// else the client side's): counted, and logged with the peer that held it.
    pub(super) fn stalled(&self, stall: &crate::hbone::Stalled, toward_upstream: bool) {
        let m = &self.record.meta;
        let peer = if toward_upstream {
            m.upstream.unwrap_or(m.dst)
        } else {
            m.src
        };
        let peer_identity = if toward_upstream {
            m.dst_identity.as_ref()
        } else {
            m.src_identity.as_ref()
        };
        self.tracker.metrics.agent.hbone_stalled_streams.inc();
        tracing::warn!(id = self.record.id, path = m.path.as_str(), %peer,
            peer.identity = peer_identity.map(tracing::field::display), src = %m.src, dst = %m.dst,
            "{stall}: tunnel reset, and the connection relayed with it");
    }

    pub fn finish(mut self, outcome: Outcome) {
        self.done = true;
        self.tracker.close(&self.record, &outcome);
    }

    /// Ends the connection with the result of the relay.
    pub fn finish_relay(self, result: &std::io::Result<(u64, u64)>) {
        match result {
            Ok(_) => self.finish(Outcome::Complete),
            Err(e) => self.finish(Outcome::Error(e.to_string())),
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if !self.done {
            self.tracker.close(&self.record, &Outcome::Aborted);
        }
    }
}

/// Access log lines (target `access`): one at debug level when a connection opens, one when
/// it ends — info when it completed, warn when it was denied, failed or rejected. Field
/// names follow Istio's ztunnel; `bytes_sent`/`bytes_recv` are from the reporting side's
/// point of view (what the client sent on the source side, what the server sent on the
/// destination side), as Istio logs them.
mod access_log {
    use tracing::{Level, event};

    use super::ConnectionView;

    fn direction(v: &ConnectionView) -> &'static str {
        match v.path.as_str() {
            "hbone-in" | "plaintext-in" => "inbound",
            "same-node" => "local",
            _ => "outbound",
        }
    }

    macro_rules! access_event {
        ($level:expr, $v:expr, $msg:literal) => {{
            let v = $v;
            let inbound = direction(v) == "inbound";
            let (bytes_sent, bytes_recv) = if inbound {
                (v.bytes_sent, v.bytes_received)
            } else {
                (v.bytes_received, v.bytes_sent)
            };
            event!(
                target: "access",
                $level,
                id = v.id,
                path = %v.path,
                direction = %direction(v),
                src.addr = %v.src,
                src.claimed = v.src_claimed.as_deref(),
                src.workload = v.src_workload.as_deref(),
                src.identity = v.src_identity.as_deref(),
                dst.addr = %v.dst,
                dst.upstream = v.upstream.as_deref(),
                dst.service = v.dst_service.as_deref(),
                dst.workload = v.dst_workload.as_deref(),
                dst.identity = v.dst_identity.as_deref(),
                policy = %v.policy,
                bytes_sent,
                bytes_recv,
                duration = %format!("{}ms", v.duration_ms),
                state = %v.state,
                error = v.reason.as_deref(),
                $msg
            );
        }};
    }

    /// Whether `opened` lines are written (debug level on target `access`): the caller builds
    /// the view only then.
    pub(super) fn opened_enabled() -> bool {
        tracing::enabled!(target: "access", Level::DEBUG)
    }

    pub(super) fn opened(v: &ConnectionView) {
        access_event!(Level::DEBUG, v, "connection opened");
    }

    pub(super) fn closed(v: &ConnectionView) {
        if v.reason.is_none() {
            access_event!(Level::INFO, v, "connection complete");
        } else {
            access_event!(Level::WARN, v, "connection complete");
        }
    }
}
