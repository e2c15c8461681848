//! A delta ADS server that hands each stream to the test.

use std::net::SocketAddr;
use std::pin::Pin;

use futures::Stream;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

use ztunnel::proto::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use ztunnel::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};

use super::next;

/// One client stream, as the server sees it.
pub(crate) struct Stream_ {
    pub metadata: MetadataMap,
    pub requests: mpsc::UnboundedReceiver<DeltaDiscoveryRequest>,
    pub responses: mpsc::UnboundedSender<Result<DeltaDiscoveryResponse, Status>>,
}

impl Stream_ {
    pub(crate) async fn request(&mut self) -> DeltaDiscoveryRequest {
        next(&mut self.requests, "xDS request").await
    }

    pub(crate) fn send(&self, resp: DeltaDiscoveryResponse) {
        self.responses.send(Ok(resp)).expect("client stream gone");
    }
}

struct Service {
    streams: mpsc::UnboundedSender<Stream_>,
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
        let metadata = request.metadata().clone();
        let mut inbound = request.into_inner();
        let (req_tx, req_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(req)) = inbound.message().await {
                if req_tx.send(req).is_err() {
                    return;
                }
            }
        });
        let (resp_tx, resp_rx) = mpsc::unbounded_channel();
        let _ = self.streams.send(Stream_ {
            metadata,
            requests: req_rx,
            responses: resp_tx,
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(
            resp_rx,
        ))))
    }
}

/// A running server; `stop` ends it.
pub(crate) struct XdsServer {
    pub addr: SocketAddr,
    pub streams: mpsc::UnboundedReceiver<Stream_>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl XdsServer {
    /// Serves on `addr` (port 0 for any).
    pub(crate) async fn start(addr: SocketAddr) -> XdsServer {
        let listener = TcpListener::bind(addr).await.expect("bind xDS server");
        let addr = listener.local_addr().unwrap();
        let (streams_tx, streams) = mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let svc = AggregatedDiscoveryServiceServer::new(Service {
            streams: streams_tx,
        });
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stop_rx.await;
                })
                .await
                .expect("xDS server");
        });
        XdsServer {
            addr,
            streams,
            stop: Some(stop_tx),
            task,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) async fn stream(&mut self) -> Stream_ {
        next(&mut self.streams, "xDS stream").await
    }

    /// Stops accepting, ends the open streams (`open` are dropped) and waits until the server
    /// has closed every connection.
    pub(crate) async fn stop(mut self, open: Vec<Stream_>) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        drop(open);
        tokio::time::timeout(super::DEADLINE, self.task)
            .await
            .expect("xDS server did not stop")
            .expect("xDS server task");
    }
}
