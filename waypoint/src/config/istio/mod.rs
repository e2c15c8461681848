//! `networking.istio.io` resources the waypoint reads.

pub mod common;
pub mod destination_rule;
pub mod http_policy;
pub mod virtual_service;

pub use destination_rule::DestinationRule;
pub use virtual_service::VirtualService;

pub const GROUP: &str = "networking.istio.io";
/// The versions the CRDs serve; all have the same schema.
pub const VERSIONS: [&str; 3] = ["v1", "v1beta1", "v1alpha3"];
