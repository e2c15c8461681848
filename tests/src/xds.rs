//! An in-process istiod stand-in for the end-to-end tests: a delta ADS server (tonic, real
//! gRPC) for `istio.workload.Address` and `istio.security.Authorization` that holds the
//! current resources, pushes every change to the ztunnels subscribed, and records their
//! ACKs and NACKs, so a test can wait for "applied" instead of sleeping.
//!
//! It runs on its own tokio runtime (the tests are synchronous) and listens inside a network
//! namespace (the fabric, where every node can reach it): the nodes are namespaces, so the
//! test process's loopback is not reachable from them. It can be stopped and started again
//! on the same address, as istiod going away and coming back.
//!
//! Protocol as istiod speaks it (Envoy delta xDS): the first request of a type on a stream
//! subscribes (wildcard) and carries `initial_resource_versions`; the server answers with
//! what differs, then pushes each change; the client answers every response with the
//! response's nonce, and `error_detail` set when it rejected something (a NACK).
//!
//! A slow istiod: [`XdsServer::hold_new_streams`] makes the server take the subscriptions of
//! streams opened from then on without answering them, until the test calls
//! [`XdsServer::release_held`] (having seen them arrive, [`XdsServer::held`]).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::Stream;
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use ztunnel::proto::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use ztunnel::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use ztunnel::proto::istio::security as pbs;
use ztunnel::proto::istio::workload as pbw;
pub use ztunnel::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

use crate::netns::in_netns;
use crate::process::{TimedOut, wait_until};

/// A client's answer to one response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The client's `NODE_NAME`.
    pub node: String,
    pub type_url: String,
    pub nonce: String,
    /// `error_detail.message` of a NACK; `None` for an ACK.
    pub error: Option<String>,
}

type ResponseTx = mpsc::UnboundedSender<Result<DeltaDiscoveryResponse, Status>>;

/// One open client stream.
#[derive(Debug)]
struct Client {
    id: u64,
    node: String,
    tx: ResponseTx,
    /// Subscribed types, with the nonce of the last response sent and the last nonce
    /// answered (ACK or NACK).
    sent: HashMap<String, String>,
    answered: HashMap<String, String>,
    /// Opened while new streams are held: its subscriptions wait in `Inner::held`.
    held: bool,
}

#[derive(Debug, Default)]
struct Inner {
    /// Resources by type URL, then name: (version, encoded body).
    resources: HashMap<String, BTreeMap<String, (String, Vec<u8>)>>,
    version: u64,
    nonce: u64,
    next_client: u64,
    clients: Vec<Client>,
    replies: Vec<Reply>,
    streams_opened: u64,
    /// New streams are held (see [`XdsServer::hold_new_streams`]).
    hold: bool,
    /// Subscriptions not answered yet, by client id, in arrival order.
    held: Vec<(u64, DeltaDiscoveryRequest)>,
}

impl Inner {
    fn nonce(&mut self) -> String {
        self.nonce += 1;
        format!("n{}", self.nonce)
    }

    /// Sends `resp` (nonce filled in) to every client subscribed to its type.
    fn broadcast(&mut self, mut resp: DeltaDiscoveryResponse) {
        let type_url = resp.type_url.clone();
        let ids: Vec<u64> = self
            .clients
            .iter()
            .filter(|c| c.sent.contains_key(&type_url))
            .map(|c| c.id)
            .collect();
        for id in ids {
            resp.nonce = self.nonce();
            self.send(id, resp.clone());
        }
    }

    fn send(&mut self, id: u64, resp: DeltaDiscoveryResponse) {
        let Some(i) = self.clients.iter().position(|c| c.id == id) else {
            return;
        };
        let client = &mut self.clients[i];
        client
            .sent
            .insert(resp.type_url.clone(), resp.nonce.clone());
        if client.tx.send(Ok(resp)).is_err() {
            self.clients.remove(i);
        }
    }

    /// Handles one request of client `id`.
    fn on_request(&mut self, id: u64, req: DeltaDiscoveryRequest) {
        let Some(client) = self.clients.iter_mut().find(|c| c.id == id) else {
            return;
        };
        if let Some(node) = req.node.as_ref().and_then(node_name) {
            client.node = node;
        }
        if req.response_nonce.is_empty() && client.held {
            self.held.push((id, req));
            return;
        }
        if req.response_nonce.is_empty() {
            // A subscription: everything that differs from what the client holds.
            let held = req.initial_resource_versions;
            let current = self
                .resources
                .get(&req.type_url)
                .cloned()
                .unwrap_or_default();
            let resources = current
                .iter()
                .filter(|(name, (version, _))| held.get(*name) != Some(version))
                .map(|(name, (version, body))| resource(&req.type_url, name, version, body))
                .collect();
            let removed_resources = held
                .keys()
                .filter(|name| !current.contains_key(*name))
                .cloned()
                .collect();
            let nonce = self.nonce();
            self.send(
                id,
                DeltaDiscoveryResponse {
                    type_url: req.type_url,
                    nonce,
                    resources,
                    removed_resources,
                    ..Default::default()
                },
            );
            return;
        }
        client
            .answered
            .insert(req.type_url.clone(), req.response_nonce.clone());
        let reply = Reply {
            node: client.node.clone(),
            type_url: req.type_url,
            nonce: req.response_nonce,
            error: req.error_detail.map(|s| s.message),
        };
        self.replies.push(reply);
    }
}

fn node_name(node: &ztunnel::proto::envoy::config::core::v3::Node) -> Option<String> {
    let fields = &node.metadata.as_ref()?.fields;
    match fields.get("NODE_NAME")?.kind.as_ref()? {
        prost_types::value::Kind::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn resource(type_url: &str, name: &str, version: &str, body: &[u8]) -> Resource {
    Resource {
        name: name.to_owned(),
        version: version.to_owned(),
        resource: Some(prost_types::Any {
            type_url: type_url.to_owned(),
            value: body.to_vec(),
        }),
        ..Default::default()
    }
}

#[derive(Clone)]
struct Service {
    inner: Arc<Mutex<Inner>>,
}

type ResponseStream =
    Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Service {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::unbounded_channel();
        let id = {
            let mut inner = lock(&self.inner);
            inner.next_client += 1;
            inner.streams_opened += 1;
            let id = inner.next_client;
            let held = inner.hold;
            inner.clients.push(Client {
                id,
                node: String::new(),
                tx,
                sent: HashMap::new(),
                answered: HashMap::new(),
                held,
            });
            id
        };
        let inner = self.inner.clone();
        tokio::spawn(async move {
            while let Ok(Some(req)) = requests.message().await {
                lock(&inner).on_request(id, req);
            }
            lock(&inner).clients.retain(|c| c.id != id);
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Running {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

/// The server. Resources persist across [`stop`](XdsServer::stop) and
/// [`start`](XdsServer::start), as istiod's view of the cluster does.
pub struct XdsServer {
    rt: tokio::runtime::Runtime,
    inner: Arc<Mutex<Inner>>,
    netns: String,
    addr: SocketAddr,
    running: Option<Running>,
}

impl XdsServer {
    /// A server for `addr` inside namespace `netns`; it does not listen until started.
    pub fn new(netns: &str, addr: SocketAddr) -> io::Result<XdsServer> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        Ok(XdsServer {
            rt,
            inner: Arc::default(),
            netns: netns.to_owned(),
            addr,
            running: None,
        })
    }

    /// `http://<addr>`, what ztunnel's `--xds-address` takes.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Listens (again) on the server's address.
    pub fn start(&mut self) -> io::Result<()> {
        if self.running.is_some() {
            return Ok(());
        }
        let addr = self.addr;
        let std = in_netns(&self.netns, move || std::net::TcpListener::bind(addr))??;
        std.set_nonblocking(true)?;
        let _guard = self.rt.enter();
        let listener = tokio::net::TcpListener::from_std(std)?;
        let (stop, stopped) = oneshot::channel::<()>();
        let svc = AggregatedDiscoveryServiceServer::new(Service {
            inner: self.inner.clone(),
        })
        .max_encoding_message_size(usize::MAX);
        let task = self.rt.spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                }),
        );
        self.running = Some(Running { stop, task });
        Ok(())
    }

    /// Stops listening and ends every stream (the clients see istiod go away), waiting until
    /// the server has closed its connections.
    pub fn stop(&mut self) -> io::Result<()> {
        let Some(running) = self.running.take() else {
            return Ok(());
        };
        let _ = running.stop.send(());
        // Ending the response streams lets the graceful shutdown finish.
        for client in lock(&self.inner).clients.drain(..) {
            let _ = client.tx.send(Err(Status::unavailable("server stopping")));
        }
        self.rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(10), running.task).await })
            .map_err(|_| io::Error::other("xDS server did not stop within 10s"))?
            .map_err(io::Error::other)?
            .map_err(io::Error::other)
    }

    /// Streams opened since the server was created (reconnections included).
    pub fn streams_opened(&self) -> u64 {
        lock(&self.inner).streams_opened
    }

    /// From now on, streams that open get no answer to their subscriptions (istiod slow to
    /// answer a new client) until [`release_held`](XdsServer::release_held). Streams already
    /// open are served as before.
    pub fn hold_new_streams(&self) {
        lock(&self.inner).hold = true;
    }

    /// The subscriptions of `node` waiting for an answer (one per type its stream asked for).
    pub fn held(&self, node: &str) -> usize {
        let inner = lock(&self.inner);
        inner
            .held
            .iter()
            .filter(|(id, _)| inner.clients.iter().any(|c| c.id == *id && c.node == node))
            .count()
    }

    /// Answers the held subscriptions with the resources as they are now, and holds no new
    /// stream any more.
    pub fn release_held(&self) {
        let mut inner = lock(&self.inner);
        inner.hold = false;
        for client in &mut inner.clients {
            client.held = false;
        }
        for (id, req) in std::mem::take(&mut inner.held) {
            inner.on_request(id, req);
        }
    }

    /// Every ACK and NACK received so far, in order.
    pub fn replies(&self) -> Vec<Reply> {
        lock(&self.inner).replies.clone()
    }

    /// The NACK messages received so far.
    pub fn nacks(&self) -> Vec<Reply> {
        self.replies()
            .into_iter()
            .filter(|r| r.error.is_some())
            .collect()
    }

    /// True when `node` has a stream subscribed to both types and has answered the last
    /// response sent on it for each: it holds (and has published) the current resources.
    pub fn caught_up(&self, node: &str) -> bool {
        lock(&self.inner).clients.iter().any(|c| {
            c.node == node
                && [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL].iter().all(|t| {
                    c.sent
                        .get(*t)
                        .is_some_and(|sent| c.answered.get(*t) == Some(sent))
                })
        })
    }

    /// Waits until every one of `nodes` is [`caught_up`](XdsServer::caught_up).
    pub fn wait_caught_up(&self, nodes: &[&str], timeout: Duration) -> Result<(), TimedOut> {
        wait_until(timeout, || nodes.iter().all(|n| self.caught_up(n)))
    }

    /// Sets and removes resources of `type_url` in one response to every subscribed client.
    /// Bodies are sent as given, so a test can send one that does not decode.
    pub fn push(&self, type_url: &str, set: Vec<(String, Vec<u8>)>, removed: Vec<String>) {
        let mut inner = lock(&self.inner);
        inner.version += 1;
        let version = inner.version.to_string();
        let table = inner.resources.entry(type_url.to_owned()).or_default();
        let mut resources = Vec::new();
        for (name, body) in set {
            resources.push(resource(type_url, &name, &version, &body));
            table.insert(name, (version.clone(), body));
        }
        let removed: Vec<String> = removed
            .into_iter()
            .filter(|name| table.remove(name).is_some())
            .collect();
        if resources.is_empty() && removed.is_empty() {
            return;
        }
        inner.broadcast(DeltaDiscoveryResponse {
            type_url: type_url.to_owned(),
            resources,
            removed_resources: removed,
            ..Default::default()
        });
    }

    /// Makes the `Address` resources exactly `want` (by name), pushing only the differences.
    pub fn set_addresses(&self, want: BTreeMap<String, pbw::Address>) {
        self.replace(ADDRESS_TYPE_URL, want);
    }

    fn replace<M: prost::Message>(&self, type_url: &str, want: BTreeMap<String, M>) {
        let current = lock(&self.inner)
            .resources
            .get(type_url)
            .cloned()
            .unwrap_or_default();
        let set = want
            .iter()
            .map(|(name, m)| (name.clone(), m.encode_to_vec()))
            .filter(|(name, body)| current.get(name).is_none_or(|(_, b)| b != body))
            .collect();
        let removed = current
            .keys()
            .filter(|name| !want.contains_key(*name))
            .cloned()
            .collect();
        self.push(type_url, set, removed);
    }

    /// Adds or replaces a policy (named `<namespace>/<name>`, as istiod names them).
    pub fn set_policy(&self, policy: &pbs::Authorization) {
        let name = format!("{}/{}", policy.namespace, policy.name);
        self.push(
            AUTHORIZATION_TYPE_URL,
            vec![(name, policy.encode_to_vec())],
            Vec::new(),
        );
    }

    /// Removes a policy by `<namespace>/<name>`.
    pub fn remove_policy(&self, name: &str) {
        self.push(AUTHORIZATION_TYPE_URL, Vec::new(), vec![name.to_owned()]);
    }
}

impl Drop for XdsServer {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The bytes of an IP address, as the workload API carries them.
pub fn octets(ip: std::net::IpAddr) -> Vec<u8> {
    match ip {
        std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
        std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// A DENY policy for every workload of `namespace` against connections from the service
/// account `namespace/sa`.
pub fn deny_from_service_account(name: &str, namespace: &str, sa: &str) -> pbs::Authorization {
    pbs::Authorization {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        scope: pbs::Scope::Namespace as i32,
        action: pbs::Action::Deny as i32,
        rules: vec![pbs::Rule {
            clauses: vec![pbs::Clause {
                matches: vec![pbs::Match {
                    service_accounts: vec![pbs::ServiceAccountMatch {
                        namespace: namespace.to_owned(),
                        service_account: sa.to_owned(),
                    }],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    }
}
