//! `gateway.networking.k8s.io` routes the waypoint reads (GAMMA: routes attached to a Service).

pub mod common;
pub mod filter;
pub mod grpc_route;
pub mod http_route;

pub use common::GROUP;
pub use grpc_route::GrpcRoute;
pub use http_route::HttpRoute;

/// The versions the HTTPRoute CRD serves.
pub const HTTP_ROUTE_VERSIONS: [&str; 2] = ["v1", "v1beta1"];
