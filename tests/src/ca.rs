//! An in-process stand-in for istiod's CA (`istio.v1.auth.IstioCertificateService`,
//! `CreateCertificate` over real gRPC): it signs CSRs with a throw-away root, following a
//! plan the test sets (a given validity, the validity the client asked for, or a failure),
//! and reports every request.
//!
//! It runs on its own tokio runtime, so synchronous end-to-end tests and async integration
//! tests use it alike. It listens on 127.0.0.1, or inside a network namespace (the fabric,
//! where every node reaches it), and can be stopped and started again on the same address,
//! as istiod going away and coming back; certificates issued keep their serial numbering.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, IsCa, Issuer, KeyPair,
    SerialNumber,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use ztunnel::proto::istio::v1::auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use ztunnel::proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};

use crate::mesh::Mesh;
use crate::netns::{in_netns, ip};

/// What the CA does with a request.
#[derive(Debug, Clone, Copy)]
pub enum Plan {
    /// Issue a certificate valid from `now - before` to `now + after`.
    Issue { before: Duration, after: Duration },
    /// Issue a certificate valid from `now - before` for the `validity_duration` the client
    /// asked for, as istiod does (within its maximum).
    AsRequested { before: Duration },
    /// Answer UNAVAILABLE.
    Fail,
}

/// What the CA received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub metadata: MetadataMap,
    pub request: IstioCertificateRequest,
    /// The serial of the certificate issued; `None` when it failed.
    pub serial: Option<u64>,
}

struct Inner {
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
    plans: Mutex<VecDeque<Plan>>,
    /// Used when no plan is queued.
    default: Mutex<Plan>,
    serial: Mutex<u64>,
    seen_tx: mpsc::UnboundedSender<Seen>,
    /// Every request so far, for synchronous tests.
    log: Mutex<Vec<Seen>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Clone)]
struct Service(Arc<Inner>);

impl Service {
    fn sign(&self, request: &IstioCertificateRequest, plan: Plan) -> Result<(String, u64), Status> {
        let (before, after) = match plan {
            Plan::Fail => return Err(Status::unavailable("CA is down (test)")),
            Plan::Issue { before, after } => (before, after),
            Plan::AsRequested { before } => {
                let secs = u64::try_from(request.validity_duration)
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| Status::invalid_argument("no validity_duration"))?;
                (before, Duration::from_secs(secs))
            }
        };
        let mut csr = CertificateSigningRequestParams::from_pem(&request.csr)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let now = time::OffsetDateTime::now_utc();
        csr.params.not_before = now - before;
        csr.params.not_after = now + after;
        let serial = {
            let mut s = lock(&self.0.serial);
            *s += 1;
            *s
        };
        csr.params.serial_number = Some(SerialNumber::from(serial));
        let cert = csr
            .signed_by(&self.0.issuer)
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok((cert.pem(), serial))
    }
}

#[tonic::async_trait]
impl IstioCertificateService for Service {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let metadata = request.metadata().clone();
        let request = request.into_inner();
        let plan = lock(&self.0.plans)
            .pop_front()
            .unwrap_or(*lock(&self.0.default));
        let result = self.sign(&request, plan);
        let seen = Seen {
            metadata,
            request,
            serial: result.as_ref().ok().map(|(_, s)| *s),
        };
        lock(&self.0.log).push(seen.clone());
        let _ = self.0.seen_tx.send(seen);
        let (leaf, _) = result?;
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: vec![leaf, self.0.root_pem.clone()],
        }))
    }
}

struct Running {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

/// The CA server.
pub struct CaServer {
    /// Where it listens (the port is chosen on the first start when it was 0).
    pub addr: SocketAddr,
    /// The root every certificate chains to (PEM).
    pub root_pem: String,
    /// Every request, as it arrives (see [`CaServer::next`]).
    pub seen: mpsc::UnboundedReceiver<Seen>,
    inner: Arc<Inner>,
    /// The serving certificate and key (PEM) when it speaks TLS.
    tls: Option<(String, String)>,
    netns: Option<String>,
    running: Option<Running>,
    /// `Option` only so that `drop` can shut it down from inside another runtime.
    rt: Option<tokio::runtime::Runtime>,
}

impl CaServer {
    /// Plaintext on 127.0.0.1 (a free port), started; issues one-hour certificates unless
    /// told otherwise.
    pub fn start() -> io::Result<CaServer> {
        let mut ca = CaServer::new(None, SocketAddr::from(([127, 0, 0, 1], 0)), false)?;
        ca.listen()?;
        Ok(ca)
    }

    /// Like [`CaServer::start`], over TLS with a serving certificate (IP SAN 127.0.0.1) from
    /// the same root as the workload certificates, as istiod does.
    pub fn start_tls() -> io::Result<CaServer> {
        let mut ca = CaServer::new(None, SocketAddr::from(([127, 0, 0, 1], 0)), true)?;
        ca.listen()?;
        Ok(ca)
    }

    /// A CA for `addr`, inside namespace `netns` (or the test's own), not listening yet.
    pub fn new(netns: Option<&str>, addr: SocketAddr, tls: bool) -> io::Result<CaServer> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let key = KeyPair::generate().map_err(io::Error::other)?;
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test CA");
        let root = params.self_signed(&key).map_err(io::Error::other)?;
        let issuer = Issuer::new(params, key);
        let tls = if tls {
            let key = KeyPair::generate().map_err(io::Error::other)?;
            let mut params = CertificateParams::default();
            params.subject_alt_names = vec![rcgen::SanType::IpAddress(addr.ip())];
            let cert = params.signed_by(&key, &issuer).map_err(io::Error::other)?;
            Some((cert.pem(), key.serialize_pem()))
        } else {
            None
        };
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            issuer,
            root_pem: root.pem(),
            plans: Mutex::new(VecDeque::new()),
            default: Mutex::new(Plan::Issue {
                before: Duration::from_secs(60),
                after: Duration::from_secs(3600),
            }),
            serial: Mutex::new(0),
            seen_tx,
            log: Mutex::new(Vec::new()),
        });
        Ok(CaServer {
            addr,
            root_pem: inner.root_pem.clone(),
            seen,
            inner,
            tls,
            netns: netns.map(str::to_owned),
            running: None,
            rt: Some(rt),
        })
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt
            .as_ref()
            .unwrap_or_else(|| unreachable!("runtime taken before drop"))
    }

    /// Listens (again) on the CA's address.
    pub fn listen(&mut self) -> io::Result<()> {
        if self.running.is_some() {
            return Ok(());
        }
        let addr = self.addr;
        let std = match &self.netns {
            Some(netns) => in_netns(netns, move || std::net::TcpListener::bind(addr))??,
            None => std::net::TcpListener::bind(addr)?,
        };
        self.addr = std.local_addr()?;
        std.set_nonblocking(true)?;
        let _guard = self.rt().enter();
        let listener = tokio::net::TcpListener::from_std(std)?;
        let mut builder = tonic::transport::Server::builder();
        if let Some((cert, key)) = &self.tls {
            let identity = tonic::transport::Identity::from_pem(cert, key);
            builder = builder
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                .map_err(io::Error::other)?;
        }
        let (stop, stopped) = oneshot::channel::<()>();
        let svc = IstioCertificateServiceServer::new(Service(self.inner.clone()));
        let task = self
            .rt()
            .spawn(builder.add_service(svc).serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            ));
        self.running = Some(Running { stop, task });
        Ok(())
    }

    /// Stops listening and closes its connections (clients see the CA go away), waiting until
    /// the server has stopped.
    pub fn stop(&mut self) -> io::Result<()> {
        let Some(running) = self.running.take() else {
            return Ok(());
        };
        let _ = running.stop.send(());
        // Waited for through a std channel: this may be called from inside another runtime.
        let (tx, rx) = std::sync::mpsc::channel();
        self.rt().spawn(async move {
            let _ = tx.send(tokio::time::timeout(Duration::from_secs(10), running.task).await);
        });
        rx.recv()
            .map_err(io::Error::other)?
            .map_err(|_| io::Error::other("CA server did not stop within 10s"))?
            .map_err(io::Error::other)?
            .map_err(io::Error::other)
    }

    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// `http://addr` or `https://addr`, what ztunnel's `--ca-address` takes.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Queues what the next requests get.
    pub fn plan(&self, plans: impl IntoIterator<Item = Plan>) {
        lock(&self.inner.plans).extend(plans);
    }

    /// What requests get when no plan is queued.
    pub fn set_default(&self, plan: Plan) {
        *lock(&self.inner.default) = plan;
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<Seen> {
        lock(&self.inner.log).clone()
    }

    /// The next request (each is seen once here), or a panic after `deadline`.
    pub async fn next_within(&mut self, deadline: Duration) -> Seen {
        match tokio::time::timeout(deadline, self.seen.recv()).await {
            Ok(Some(seen)) => seen,
            Ok(None) => panic!("CA request: channel closed"),
            Err(_) => panic!("CA request: nothing within {deadline:?}"),
        }
    }

    /// The next request, waiting at most 10 s.
    pub async fn next(&mut self) -> Seen {
        self.next_within(Duration::from_secs(10)).await
    }
}

impl Drop for CaServer {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Where the mesh's CA listens: istiod's port, on the fabric's bridge.
pub const CA_ADDR: &str = "198.18.0.254:15012";

impl Mesh {
    /// Makes the ztunnels started from now on take their workload certificates from an
    /// in-process Istio CA on the fabric ([`CA_ADDR`], plaintext), with a bearer token, the
    /// CA's root as the mesh's root, and certificates issued for the lifetime the ztunnels
    /// ask for (`--cert-ttl-secs`, `ttl`). Returns the running CA, also kept in the mesh.
    pub fn use_istio_ca(&mut self, ttl: Duration) -> io::Result<&mut CaServer> {
        let addr: SocketAddr = CA_ADDR.parse().map_err(io::Error::other)?;
        add_control_plane_address(self.topo.fabric(), addr)?;
        let mut ca = CaServer::new(Some(self.topo.fabric()), addr, false)?;
        ca.set_default(Plan::AsRequested {
            before: Duration::ZERO,
        });
        ca.listen()?;
        let root = self.dir.path().join("istio-ca-root.pem");
        std::fs::write(&root, &ca.root_pem)?;
        let token = self.istio_token_path();
        std::fs::write(&token, "istio-token-for-tests\n")?;
        self.ztunnel_args.extend([
            "--ca-address".to_owned(),
            ca.url(),
            "--ca-root-cert".to_owned(),
            root.display().to_string(),
            "--token-file".to_owned(),
            token.display().to_string(),
            "--cert-ttl-secs".to_owned(),
            ttl.as_secs().to_string(),
        ]);
        Ok(self.istio_ca.insert(ca))
    }

    /// The bearer token file the ztunnels send to the CA.
    pub fn istio_token_path(&self) -> PathBuf {
        self.dir.path().join("istio-token")
    }

    /// The Istio CA (panics when the mesh does not use one).
    pub fn istio_ca(&mut self) -> &mut CaServer {
        self.istio_ca
            .as_mut()
            .expect("mesh not set up with use_istio_ca")
    }
}

/// Gives the fabric's bridge the control plane's address, once (xDS and CA share it).
pub(crate) fn add_control_plane_address(fabric: &str, addr: SocketAddr) -> io::Result<()> {
    ip(
        fabric,
        &[
            "addr",
            "replace",
            &format!("{}/24", addr.ip()),
            "dev",
            "br0",
        ],
    )
}
