//! Enrolled pods on this node: for each, its namespace, listeners and capture state, kept in
//! line with the configuration. Adding a pod never restarts it; removing one releases its
//! capture at once while its established connections run to their end.
//!
//! Enrolment never waits for the CA. A pod is captured as soon as its listeners are open,
//! and its certificate is fetched in the background: until the CA issues it, the pod's
//! connections are refused with the reason (fail closed), never let out in plaintext
//! around the mesh. A pod that could not be enrolled is reported to the caller, which
//! tries again (see `retry`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::pod_index::{Addressed, PodIndex};
use super::retry::{Backoff, CERT_RETRY_FIRST, CERT_RETRY_MAX};
use super::{
    HBONE_PORT, INBOUND_PLAINTEXT_PORT, InboundSource, OUTBOUND_PORT, Proxy, inbound, outbound,
};
use crate::capture::{Capture, Netns, NetnsCookie, PodRouting};
use crate::handoff::{ListenerKind as Kind, PodSockets};
use crate::identity::Identity;
use crate::state::State;
use crate::state::workload::{Protocol, Workload};

/// An enrolled pod.
#[derive(Debug)]
pub struct Pod {
    pub workload: Arc<Workload>,
    pub netns: Arc<Netns>,
    listeners: Arc<Listeners>,
    /// The namespace's set-up for deliveries from client addresses (`--inbound-source
    /// client`). Every connection delivered into the pod holds the pod, and so this, until it
    /// ends: the set-up outlives a release for as long as their replies need it.
    routing: Option<Arc<PodRouting>>,
}

impl Addressed for Pod {
    fn uid(&self) -> &str {
        &self.workload.uid
    }

    fn ips(&self) -> &[IpAddr] {
        &self.workload.workload_ips
    }
}

impl Pod {
    /// Whether deliveries into this pod may come from client addresses.
    pub fn keeps_client_source(&self) -> bool {
        self.routing.is_some()
    }
}

/// The accept loops of a pod, and duplicates of their listening sockets (what a successor
/// receives on upgrade). Only the loops stop on release: connection tasks are separate and
/// run to their end.
#[derive(Debug)]
struct Listeners {
    tasks: Mutex<Vec<JoinHandle<()>>>,
    sockets: Mutex<Vec<(Kind, SocketAddr, OwnedFd)>>,
}

impl Listeners {
    /// Stops the accept loops and waits until their listening sockets are closed, so the
    /// ports can be bound again at once (re-enrolment).
    async fn close(&self) {
        let tasks: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for task in tasks {
            task.abort();
            let _ = task.await;
        }
        self.sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Starts the accept loops of a registered pod.
    fn start(&self, proxy: &Arc<Proxy>, pod: &Pod, listeners: Vec<(Kind, TcpListener)>) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        for (kind, l) in listeners {
            let (p, uid, ns) = (proxy.clone(), pod.workload.uid.clone(), pod.netns.clone());
            tasks.push(match kind {
                Kind::Outbound => tokio::spawn(outbound::accept_loop(p, uid, ns, l)),
                Kind::Plaintext => tokio::spawn(inbound::plaintext_loop(p, uid, ns, l)),
                Kind::Hbone => tokio::spawn(inbound::hbone_loop(p, uid, ns, l)),
            });
        }
    }

    fn duplicate(&self) -> Vec<(Kind, SocketAddr, OwnedFd)> {
        let sockets = self.sockets.lock().unwrap_or_else(|p| p.into_inner());
        sockets
            .iter()
            .filter_map(|(k, a, fd)| Some((*k, *a, fd.try_clone().ok()?)))
            .collect()
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        for task in self.tasks.get_mut().map(std::mem::take).unwrap_or_default() {
            task.abort();
        }
    }
}

/// The pods this ztunnel captures, by workload uid and by address. Looked up on every
/// connection (readers share the lock); changed only by enrolment and release.
#[derive(Debug, Default)]
pub struct PodRegistry {
    pods: RwLock<PodIndex<Pod>>,
}

impl PodRegistry {
    fn lock(&self) -> RwLockReadGuard<'_, PodIndex<Pod>> {
        self.pods.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, PodIndex<Pod>> {
        self.pods.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The enrolled pod that owns `ip`, if it is on this node.
    pub fn by_ip(&self, ip: IpAddr) -> Option<Arc<Pod>> {
        self.lock().by_ip(&ip).cloned()
    }

    pub fn get(&self, uid: &str) -> Option<Arc<Pod>> {
        self.lock().get(uid).cloned()
    }

    /// Whether some enrolled pod runs as `id`.
    pub fn holds_identity(&self, id: &Identity) -> bool {
        self.lock()
            .values()
            .any(|p| p.workload.identity_ref() == id)
    }

    pub fn uids(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Duplicates of every pod's listening sockets, for a successor.
    pub fn handoff_sockets(&self) -> Vec<PodSockets> {
        self.lock()
            .values()
            .map(|pod| PodSockets {
                uid: pod.workload.uid.clone(),
                sockets: pod.listeners.duplicate(),
            })
            .collect()
    }

    /// Stops accepting on every pod (a successor accepts now) but leaves capture on and
    /// established connections running.
    pub async fn stop_accepting(&self) {
        let pods: Vec<Arc<Pod>> = self.lock().values().cloned().collect();
        for pod in pods {
            pod.listeners.close().await;
        }
    }

    /// The namespaces of the enrolled pods.
    pub fn cookies(&self) -> Vec<crate::capture::NetnsCookie> {
        self.lock().values().map(|p| p.netns.cookie()).collect()
    }

    pub fn clear(&self, capture: &Capture) {
        for pod in self.write().drain() {
            capture.unenroll(pod.netns.cookie());
        }
    }
}

/// Test only (`--test-fail-first-capture`): the first enrolment attempt of each pod fails at
/// its outbound capture step, after its listeners are open or inherited and its inbound
/// capture is on, as a transient map error would. The end-to-end tests use it to fail an
/// enrolment half-way during an upgrade; a deployment never sets it.
#[derive(Debug, Default)]
pub(super) struct FailFirstCapture {
    enabled: bool,
    struck: Mutex<std::collections::HashSet<String>>,
}

impl FailFirstCapture {
    const REASON: &'static str =
        "outbound capture: injected failure (--test-fail-first-capture, test only)";

    pub(super) fn new(enabled: bool) -> Self {
        FailFirstCapture {
            enabled,
            ..FailFirstCapture::default()
        }
    }

    /// True the first time it is asked for `uid`, when enabled.
    fn strikes(&self, uid: &str) -> bool {
        self.enabled
            && self
                .struck
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(uid.to_owned())
    }
}

/// Whether this ztunnel should capture `w`.
pub fn wanted(state: &State, node: &str, w: &Workload) -> bool {
    w.node == node && w.netns.is_some() && w.protocol == Protocol::Hbone && state.is_captured(w)
}

/// A pod this node should capture and could not enroll, and why.
#[derive(Debug)]
pub(super) struct NotEnrolled {
    pub(super) workload: Arc<Workload>,
    /// Its namespace, when it could be opened: the capture a predecessor set up there is
    /// still wanted (the next attempt serves it), not stale.
    pub(super) netns: Option<NetnsCookie>,
    pub(super) reason: String,
}

/// Enrolls the pods `state` wants captured on this node and releases the others. Returns
/// the pods that could not be enrolled; the caller tries again later.
pub(super) async fn reconcile(proxy: &Arc<Proxy>, state: &State) -> Vec<NotEnrolled> {
    let wanted: HashMap<String, Arc<Workload>> = state
        .local_workloads(&proxy.node)
        .into_iter()
        .filter(|w| wanted(state, &proxy.node, w))
        .map(|w| (w.uid.clone(), w))
        .collect();

    let stale: Vec<Arc<Pod>> = {
        let mut pods = proxy.pods.write();
        let gone: Vec<String> = pods
            .iter()
            .filter(|(uid, pod)| {
                wanted.get(*uid).is_none_or(|w| {
                    w.netns != pod.workload.netns || w.workload_ips != pod.workload.workload_ips
                })
            })
            .map(|(uid, _)| uid.clone())
            .collect();
        gone.iter().filter_map(|uid| pods.remove(uid)).collect()
    };
    // Identities that may have lost their last pod here: checked once the pods are in line.
    let mut departed: Vec<Identity> = Vec::new();
    for pod in stale {
        proxy.capture.unenroll(pod.netns.cookie());
        pod.listeners.close().await;
        info!(workload = %pod.workload.name, namespace = %pod.workload.namespace(), "pod released from capture");
        departed.push(pod.workload.identity());
    }

    let mut failed = Vec::new();
    for (uid, w) in wanted {
        let known = proxy.pods.lock().get(&uid).map(|p| p.workload.clone());
        match known {
            Some(old) if *old == *w => {}
            Some(old) => {
                // Same namespace and addresses, other details changed (policies, labels):
                // keep the listeners, swap the description.
                {
                    let mut pods = proxy.pods.write();
                    if let Some(pod) = pods.get(&uid).cloned() {
                        let updated = Pod {
                            workload: w.clone(),
                            netns: pod.netns.clone(),
                            listeners: pod.listeners.clone(),
                            routing: pod.routing.clone(),
                        };
                        pods.insert(Arc::new(updated));
                    }
                }
                if old.identity() != w.identity() {
                    departed.push(old.identity());
                    fetch_certificate(proxy, &w);
                }
            }
            None => match enroll(proxy, w.clone()).await {
                Ok((pod, listeners)) => {
                    // Registered before its accept loops start: a connection accepted at once
                    // (one already queued on an inherited socket) must find its pod.
                    let pod = Arc::new(pod);
                    proxy.pods.write().insert(pod.clone());
                    pod.listeners.start(proxy, &pod, listeners);
                    info!(workload = %w.name, namespace = %w.namespace(), identity = %w.identity(), "pod enrolled");
                    fetch_certificate(proxy, &w);
                }
                Err((reason, netns)) => failed.push(NotEnrolled {
                    workload: w.clone(),
                    netns,
                    reason,
                }),
            },
        }
    }
    departed.sort();
    departed.dedup();
    for id in departed {
        if !proxy.pods.holds_identity(&id) {
            proxy.forget_identity(&id);
        }
    }
    failed
}

/// Fetches the certificate of the enrolled pod `w` in the background, asking again with
/// backoff until the CA issues it, the pod leaves, or its identity changes. Meanwhile the
/// pod's connections are refused, each with the certificate manager's reason; a connection
/// also asks the CA itself (at most once a second), so traffic works again as soon as the CA
/// answers. Asking ahead of traffic means the first connection afterwards does not wait for
/// the CA, and the certificate metrics and readiness show the state without traffic.
fn fetch_certificate(proxy: &Arc<Proxy>, w: &Arc<Workload>) {
    let proxy: Weak<Proxy> = Arc::downgrade(proxy);
    let w = w.clone();
    tokio::spawn(async move {
        let id = w.identity();
        let mut backoff = Backoff::new(CERT_RETRY_FIRST, CERT_RETRY_MAX);
        loop {
            let certs = {
                let Some(proxy) = proxy.upgrade() else { return };
                let ours = proxy
                    .pods
                    .get(&w.uid)
                    .is_some_and(|pod| pod.workload.identity() == id);
                if !ours {
                    return;
                }
                proxy.certs.clone()
            };
            let Err(err) = certs.get(&id).await else {
                return;
            };
            let wait = backoff.next_wait();
            warn!(workload = %w.name, namespace = %w.namespace(), identity = %id, retry_in = ?wait,
                "pod captured without a certificate, its connections are refused until the CA issues one: {err}");
            tokio::time::sleep(wait).await;
        }
    });
}

/// On an enrolment's failure (dropped while still holding its set-up), leaves the pod's
/// delivery set-up in place.
struct LeaveInPlace(Option<Arc<PodRouting>>);

impl Drop for LeaveInPlace {
    fn drop(&mut self) {
        if let Some(routing) = &self.0 {
            routing.leave_in_place();
        }
    }
}

/// Opens (or inherits) a pod's listeners and turns capture on; the accept loops start once
/// the caller has registered the pod. A failure says why, and which namespace it was in
/// once that is known.
async fn enroll(
    proxy: &Arc<Proxy>,
    w: Arc<Workload>,
) -> Result<(Pod, Vec<(Kind, TcpListener)>), (String, Option<NetnsCookie>)> {
    let path = w
        .netns
        .clone()
        .ok_or(("no network namespace".to_owned(), None))?;
    let netns = Arc::new(Netns::open(&path).map_err(|e| (e.to_string(), None))?);
    let cookie = netns.cookie();
    enroll_in(proxy, w, netns)
        .await
        .map_err(|reason| (reason, Some(cookie)))
}

async fn enroll_in(
    proxy: &Arc<Proxy>,
    w: Arc<Workload>,
    netns: Arc<Netns>,
) -> Result<(Pod, Vec<(Kind, TcpListener)>), String> {
    // No certificate needed here: capture must not wait for the CA (the pod's traffic would
    // bypass the mesh meanwhile). Its connections fail closed until the certificate comes.

    // Before anything is steered here: the first delivery needs the replies' route.
    let routing = match proxy.inbound_source {
        InboundSource::Client => Some(
            proxy
                .capture
                .source_routing()
                .acquire(&netns, &w.workload_ips)
                .map_err(|e| e.to_string())?,
        ),
        InboundSource::Loopback => None,
    };
    // A pod taken over from a predecessor keeps its delivery set-up if this attempt fails:
    // the predecessor's deliveries into it are still open.
    let taken_over = proxy.inherited.get().is_some_and(|i| i.holds(&w.uid));
    let mut on_failure = LeaveInPlace(routing.clone().filter(|_| taken_over));

    let mut wanted = vec![
        (
            Kind::Outbound,
            SocketAddr::from(([127, 0, 0, 1], OUTBOUND_PORT)),
        ),
        (
            Kind::Plaintext,
            SocketAddr::from(([0, 0, 0, 0], INBOUND_PLAINTEXT_PORT)),
        ),
        (Kind::Hbone, SocketAddr::from(([0, 0, 0, 0], HBONE_PORT))),
    ];
    if w.workload_ips.iter().any(IpAddr::is_ipv6) {
        let any6 = std::net::Ipv6Addr::UNSPECIFIED;
        let lo6 = std::net::Ipv6Addr::LOCALHOST;
        wanted.push((Kind::Outbound, SocketAddr::from((lo6, OUTBOUND_PORT))));
        wanted.push((
            Kind::Plaintext,
            SocketAddr::from((any6, INBOUND_PLAINTEXT_PORT)),
        ));
        wanted.push((Kind::Hbone, SocketAddr::from((any6, HBONE_PORT))));
    }
    let inherited = proxy.inherited.get();
    let mut listeners = Vec::new();
    for (kind, addr) in wanted {
        let fd = inherited
            .map(|i| i.get(&w.uid, kind, addr))
            .transpose()
            .map_err(|e| format!("inherited listener {addr}: {e}"))?
            .flatten();
        let listener = match fd {
            // The predecessor's very socket (a duplicate: the socket stays inherited until
            // this enrolment succeeds, so a failure below cannot close it and reset the
            // connections in its accept queue).
            Some(fd) => {
                let std = std::net::TcpListener::from(fd);
                std.set_nonblocking(true)
                    .and_then(|()| TcpListener::from_std(std))
                    .map_err(|e| format!("inherited listener {addr}: {e}"))?
            }
            None => netns
                .listen(addr)
                .await
                .map_err(|e| format!("listen on {addr} in {}: {e}", netns.path().display()))?,
        };
        let dup = listener
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| format!("listener {addr}: {e}"))?;
        listeners.push((kind, addr, listener, dup));
    }

    let plaintext: Vec<&TcpListener> = listeners
        .iter()
        .filter(|(k, ..)| *k == Kind::Plaintext)
        .map(|(_, _, l, _)| l)
        .collect();
    let listener6 = plaintext.get(1).map(|l| *l as &dyn std::os::fd::AsRawFd);
    proxy
        .capture
        .enroll_inbound(&netns, &w.workload_ips, plaintext[0], listener6)
        .map_err(|e| e.to_string())?;
    let outbound = if proxy.fail_first_capture.strikes(&w.uid) {
        Err(FailFirstCapture::REASON.to_owned())
    } else {
        proxy
            .capture
            .enroll_outbound(netns.cookie(), OUTBOUND_PORT)
            .map_err(|e| e.to_string())
    };
    if let Err(reason) = outbound {
        // A pod taken over from a predecessor keeps the capture the predecessor set up: it
        // steers to the sockets still held, whose queues the next attempt serves. Turning it
        // off would let the pod's traffic out of the mesh until then.
        if !inherited.is_some_and(|i| i.holds(&w.uid)) {
            proxy.capture.unenroll(netns.cookie());
        }
        return Err(reason);
    }
    if let Some(i) = inherited {
        i.enrolled(&w.uid);
    }
    on_failure.0 = None;

    let mut sockets = Vec::new();
    let mut ready = Vec::new();
    for (kind, addr, l, dup) in listeners {
        sockets.push((kind, addr, dup));
        ready.push((kind, l));
    }
    let pod = Pod {
        workload: w,
        netns,
        listeners: Arc::new(Listeners {
            tasks: Mutex::new(Vec::new()),
            sockets: Mutex::new(sockets),
        }),
        routing,
    };
    Ok((pod, ready))
}
