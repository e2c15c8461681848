//! The kinds the waypoint watches on the Kubernetes API, with the group, version and plural
//! each is listed under (`/apis/<group>/<version>/<plural>`).

use kube::discovery::ApiResource;

/// One watched kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kind {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
}

impl Kind {
    pub fn api_version(&self) -> String {
        format!("{}/{}", self.group, self.version)
    }

    /// What kube's dynamic API needs to address the kind without discovery.
    pub fn api_resource(&self) -> ApiResource {
        ApiResource {
            group: self.group.to_owned(),
            version: self.version.to_owned(),
            api_version: self.api_version(),
            kind: self.kind.to_owned(),
            plural: self.plural.to_owned(),
        }
    }
}

pub const VIRTUAL_SERVICE: Kind = Kind {
    group: "networking.istio.io",
    version: "v1",
    kind: "VirtualService",
    plural: "virtualservices",
};
pub const DESTINATION_RULE: Kind = Kind {
    group: "networking.istio.io",
    version: "v1",
    kind: "DestinationRule",
    plural: "destinationrules",
};
pub const HTTP_ROUTE: Kind = Kind {
    group: "gateway.networking.k8s.io",
    version: "v1",
    kind: "HTTPRoute",
    plural: "httproutes",
};
pub const GRPC_ROUTE: Kind = Kind {
    group: "gateway.networking.k8s.io",
    version: "v1",
    kind: "GRPCRoute",
    plural: "grpcroutes",
};

pub const AUTHORIZATION_POLICY: Kind = Kind {
    group: "security.istio.io",
    version: "v1",
    kind: "AuthorizationPolicy",
    plural: "authorizationpolicies",
};

pub const REQUEST_AUTHENTICATION: Kind = Kind {
    group: "security.istio.io",
    version: "v1",
    kind: "RequestAuthentication",
    plural: "requestauthentications",
};

/// Every kind the source watches, in the order their watches are started.
pub const WATCHED: [Kind; 6] = [
    VIRTUAL_SERVICE,
    DESTINATION_RULE,
    HTTP_ROUTE,
    GRPC_ROUTE,
    AUTHORIZATION_POLICY,
    REQUEST_AUTHENTICATION,
];

/// The waypoint's own Gateway, watched apart from the route kinds (`own_gateway`).
pub const GATEWAY: Kind = Kind {
    group: "gateway.networking.k8s.io",
    version: "v1",
    kind: "Gateway",
    plural: "gateways",
};
