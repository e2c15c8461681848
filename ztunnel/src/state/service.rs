//! A service: a hostname and virtual IPs in front of a set of workloads (Istio's
//! `istio.workload.Service`). Endpoints are not stored here; the `State` indexes them from
//! the workloads that name the service.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::workload::{GatewayAddress, NamespacedHostname};

/// The application protocol declared for a service port (Istio's `AppProtocol`, from the
/// port's name or `appProtocol`): how a waypoint reads the port's traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppProtocol {
    Http11,
    Http2,
    Grpc,
    /// Not HTTP (TCP, TLS, databases...): a waypoint relays the bytes as they are.
    Tcp,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// e.g. `echo.default.svc.cluster.local`.
    pub hostname: String,
    /// Virtual IPs. Istio writes them `network/ip`; the network part is not kept (one network).
    pub vips: Vec<IpAddr>,
    /// Service port -> target port. A target port of 0 means "the endpoint says".
    pub ports: BTreeMap<u16, u16>,
    /// Identities the endpoints may present besides their own (Istio's `subjectAltNames`).
    pub subject_alt_names: Vec<String>,
    pub waypoint: Option<GatewayAddress>,
    /// Declared application protocols, by service port; a port absent here declared none.
    pub app_protocols: BTreeMap<u16, AppProtocol>,
}

impl Service {
    /// The key workloads use to name this service.
    pub fn key(&self) -> NamespacedHostname {
        NamespacedHostname {
            namespace: self.namespace.clone(),
            hostname: self.hostname.clone(),
        }
    }

    /// The port an endpoint should be dialled on for `service_port`: the endpoint's own mapping
    /// first, then the service's target port; `None` when neither gives a usable port or the
    /// service does not declare `service_port`.
    pub fn target_port(
        &self,
        service_port: u16,
        endpoint_ports: Option<&BTreeMap<u16, u16>>,
    ) -> Option<u16> {
        let declared = *self.ports.get(&service_port)?;
        let from_endpoint = endpoint_ports
            .and_then(|p| p.get(&service_port))
            .copied()
            .filter(|p| *p != 0);
        from_endpoint.or(Some(declared).filter(|p| *p != 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_port_prefers_the_endpoint_then_the_service() {
        let svc = Service {
            name: "echo".into(),
            namespace: "default".into(),
            hostname: "echo.default.svc.cluster.local".into(),
            vips: vec![],
            ports: BTreeMap::from([(80, 8080), (90, 0)]),
            subject_alt_names: vec![],
            waypoint: None,
            app_protocols: BTreeMap::new(),
        };
        let ep = BTreeMap::from([(80, 9090), (90, 9000)]);
        let ep_zero = BTreeMap::from([(80, 0)]);
        type Case<'a> = (u16, Option<&'a BTreeMap<u16, u16>>, Option<u16>);
        let cases: &[Case] = &[
            (80, None, Some(8080)),
            (80, Some(&ep), Some(9090)),
            (80, Some(&ep_zero), Some(8080)),
            (90, Some(&ep), Some(9000)),
            (90, None, None),
            (91, Some(&ep), None),
        ];
        for (port, endpoint, want) in cases {
            assert_eq!(svc.target_port(*port, *endpoint), *want, "port {port}");
        }
    }
}
