//! Types shared by HTTPRoute and GRPCRoute (`gateway.networking.k8s.io`): parent and backend
//! references, header modifiers. Names follow kubernetes-sigs/gateway-api `apis/v1`.

use super::super::decode::{Cx, Decode, Fields, Path};
use super::super::yaml::Node;

pub const GROUP: &str = "gateway.networking.k8s.io";

/// `ParentReference`. In mesh mode (GAMMA) the parent is a `Service` (group `""`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentReference {
    /// Default `gateway.networking.k8s.io`; `""` is the core group.
    pub group: String,
    /// Default `Gateway`.
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
    pub section_name: Option<String>,
    pub port: Option<u16>,
}

impl ParentReference {
    /// Whether this names a core `Service` (a mesh route).
    pub fn is_service(&self) -> bool {
        self.group.is_empty() && self.kind == "Service"
    }
}

impl Decode for ParentReference {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let group = f.opt::<String>("group", cx).unwrap_or_else(|| GROUP.into());
        let kind = f
            .opt::<String>("kind", cx)
            .unwrap_or_else(|| "Gateway".into());
        let namespace = f.opt::<String>("namespace", cx);
        let name = f.req::<String>("name", cx);
        let section_name = f.opt::<String>("sectionName", cx);
        let port = f.opt_with("port", cx, super::super::istio::common::port_number);
        let ok = f.finish(cx);
        Some(ParentReference {
            group,
            kind,
            namespace,
            name: name?,
            section_name,
            port,
        })
        .filter(|_| ok)
    }
}

/// `BackendObjectReference` (without weight and filters): where traffic or a mirror goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendObjectReference {
    /// Default `""` (core).
    pub group: String,
    /// Default `Service`.
    pub kind: String,
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<u16>,
}

impl BackendObjectReference {
    pub fn is_service(&self) -> bool {
        self.group.is_empty() && self.kind == "Service"
    }
}

/// Reads the fields of a backend reference from `f` (shared by `backendRefs` items, which
/// add `weight` and `filters`, and mirror targets).
pub fn backend_object(f: &mut Fields<'_, '_>, cx: &mut Cx) -> Option<BackendObjectReference> {
    let group = f.opt::<String>("group", cx).unwrap_or_default();
    let kind = f
        .opt::<String>("kind", cx)
        .unwrap_or_else(|| "Service".into());
    let name = f.req::<String>("name", cx);
    let namespace = f.opt::<String>("namespace", cx);
    let port = f.opt_with("port", cx, super::super::istio::common::port_number);
    let r = BackendObjectReference {
        group,
        kind,
        name: name?,
        namespace,
        port,
    };
    if r.is_service() && r.port.is_none() {
        f.invalid("port", cx, "a Service backend needs a port");
        return None;
    }
    Some(r)
}

impl Decode for BackendObjectReference {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let r = backend_object(&mut f, cx);
        let ok = f.finish(cx);
        r.filter(|_| ok)
    }
}

/// `HTTPHeader`: a header name (case-insensitive, kept lowercase) and value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpHeader {
    pub name: String,
    pub value: String,
}

impl Decode for HttpHeader {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let name = f.req_with("name", cx, header_name);
        let value = f.req::<String>("value", cx);
        let mut ok = f.finish(cx);
        if let Some(v) = &value
            && http::HeaderValue::from_str(v).is_err()
        {
            cx.invalid(&at.field("value"), node, "not a valid header value");
            ok = false;
        }
        Some(HttpHeader {
            name: name?,
            value: value?,
        })
        .filter(|_| ok)
    }
}

/// A header name, checked and lowercased (Gateway API names are case-insensitive).
pub fn header_name(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<String> {
    let s = String::decode(node, at, cx)?;
    match http::HeaderName::from_bytes(s.as_bytes()) {
        Ok(h) => Some(h.as_str().to_owned()),
        Err(_) => {
            cx.invalid(at, node, format!("{s:?} is not a valid header name"));
            None
        }
    }
}

/// `HTTPHeaderFilter`: set, add, remove.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderModifier {
    pub set: Vec<HttpHeader>,
    pub add: Vec<HttpHeader>,
    pub remove: Vec<String>,
}

impl Decode for HeaderModifier {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        let mut f = Fields::new(node, at, cx)?;
        let set = f.list::<HttpHeader>("set", cx);
        let add = f.list::<HttpHeader>("add", cx);
        let remove = f
            .opt_with("remove", cx, |n, at, cx| {
                super::super::decode::list_of(n, at, cx, header_name)
            })
            .unwrap_or_default();
        let ok = f.finish(cx);
        ok.then_some(HeaderModifier { set, add, remove })
    }
}
