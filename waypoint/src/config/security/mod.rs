//! `security.istio.io` resources the waypoint reads.

pub mod authorization_policy;
pub mod condition;
pub mod request_authentication;

pub use authorization_policy::AuthorizationPolicy;
pub use request_authentication::RequestAuthentication;

pub const GROUP: &str = "security.istio.io";
/// The versions the CRD serves; both have the same schema.
pub const VERSIONS: [&str; 2] = ["v1", "v1beta1"];
