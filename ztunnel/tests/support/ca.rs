//! An Istio CA server that signs CSRs with a throw-away root, following a plan the test
//! sets (issue with a given validity, or fail), and reports every request.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, IsCa, Issuer, KeyPair,
    SerialNumber,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use ztunnel::proto::istio::v1::auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use ztunnel::proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};

/// What the CA does with the next request.
#[derive(Debug, Clone, Copy)]
pub enum Plan {
    /// Issue a certificate valid from `now - before` to `now + after`.
    Issue { before: Duration, after: Duration },
    /// Answer UNAVAILABLE.
    Fail,
}

/// What the CA received.
pub struct Seen {
    pub metadata: MetadataMap,
    pub request: IstioCertificateRequest,
    /// The serial of the certificate issued, lower-case hex; `None` when it failed.
    pub serial: Option<u64>,
}

struct Inner {
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
    plans: Mutex<VecDeque<Plan>>,
    /// Used when no plan is queued.
    default: Mutex<Plan>,
    serial: Mutex<u64>,
    seen: mpsc::UnboundedSender<Seen>,
}

#[derive(Clone)]
struct Service(Arc<Inner>);

#[tonic::async_trait]
impl IstioCertificateService for Service {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let metadata = request.metadata().clone();
        let request = request.into_inner();
        let plan = self
            .0
            .plans
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(*self.0.default.lock().unwrap());
        let result = match plan {
            Plan::Fail => Err(Status::unavailable("CA is down (test)")),
            Plan::Issue { before, after } => {
                let mut csr = CertificateSigningRequestParams::from_pem(&request.csr)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                let now = time::OffsetDateTime::now_utc();
                csr.params.not_before = now - before;
                csr.params.not_after = now + after;
                let serial = {
                    let mut s = self.0.serial.lock().unwrap();
                    *s += 1;
                    *s
                };
                csr.params.serial_number = Some(SerialNumber::from(serial));
                let cert = csr
                    .signed_by(&self.0.issuer)
                    .map_err(|e| Status::internal(e.to_string()))?;
                Ok((cert.pem(), serial))
            }
        };
        let serial = result.as_ref().ok().map(|(_, s)| *s);
        let _ = self.0.seen.send(Seen {
            metadata,
            request,
            serial,
        });
        let (leaf, _) = result?;
        let root = self.0.root_pem.clone();
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: vec![leaf, root],
        }))
    }
}

/// A running CA.
pub struct CaServer {
    pub addr: SocketAddr,
    /// The root every certificate chains to (PEM).
    pub root_pem: String,
    pub seen: mpsc::UnboundedReceiver<Seen>,
    inner: Arc<Inner>,
    tls: bool,
}

impl CaServer {
    /// Serves plaintext on 127.0.0.1; issues one-hour certificates unless told otherwise.
    pub async fn start() -> CaServer {
        Self::start_with(false).await
    }

    /// Serves TLS on 127.0.0.1 with a serving certificate (IP SAN 127.0.0.1) from the same
    /// root as the workload certificates, as istiod does.
    pub async fn start_tls() -> CaServer {
        Self::start_with(true).await
    }

    async fn start_with(tls: bool) -> CaServer {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test CA");
        let root = params.self_signed(&key).unwrap();
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            issuer: Issuer::new(params, key),
            root_pem: root.pem(),
            plans: Mutex::new(VecDeque::new()),
            default: Mutex::new(Plan::Issue {
                before: Duration::from_secs(60),
                after: Duration::from_secs(3600),
            }),
            serial: Mutex::new(0),
            seen: seen_tx,
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = IstioCertificateServiceServer::new(Service(inner.clone()));
        let mut builder = tonic::transport::Server::builder();
        if tls {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.subject_alt_names = vec![rcgen::SanType::IpAddress(addr.ip())];
            let cert = params.signed_by(&key, &inner.issuer).unwrap();
            let identity = tonic::transport::Identity::from_pem(cert.pem(), key.serialize_pem());
            builder = builder
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                .unwrap();
        }
        tokio::spawn(async move {
            builder
                .add_service(svc)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
                .expect("CA server");
        });
        CaServer {
            addr,
            root_pem: inner.root_pem.clone(),
            seen,
            inner,
            tls,
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Queues what the next requests get.
    pub fn plan(&self, plans: impl IntoIterator<Item = Plan>) {
        self.inner.plans.lock().unwrap().extend(plans);
    }

    /// What requests get when no plan is queued.
    pub fn set_default(&self, plan: Plan) {
        *self.inner.default.lock().unwrap() = plan;
    }

    pub async fn next(&mut self) -> Seen {
        super::next(&mut self.seen, "CA request").await
    }
}
