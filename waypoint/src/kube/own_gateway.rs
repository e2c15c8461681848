//! The waypoint's own Gateway (`--gateway-name` in its namespace), watched for its
//! GatewayClass: a root-namespace AuthorizationPolicy or RequestAuthentication targeting that
//! class applies to this waypoint as one targeting `istio-waypoint` does. Until the Gateway has
//! been listed the routes are not published, so such a policy is never missing from the first
//! table; while the API server is away the class last read stays.

use kube::api::DynamicObject;
use kube::runtime::watcher;

#[derive(Debug)]
pub(crate) struct OwnGateway {
    name: String,
    /// Listed at least once (or its kind is not served).
    listed: bool,
    class: Option<String>,
    /// A list under way: the class seen so far in it.
    relist: Option<Option<String>>,
}

impl OwnGateway {
    pub(crate) fn new(name: &str) -> OwnGateway {
        OwnGateway {
            name: name.to_owned(),
            listed: false,
            class: None,
            relist: None,
        }
    }

    pub(crate) fn listed(&self) -> bool {
        self.listed
    }

    pub(crate) fn class(&self) -> Option<&String> {
        self.class.as_ref()
    }

    /// Takes one event of the watch in; true when the class changed (the policies are to be
    /// compiled again).
    pub(crate) fn handle(
        &mut self,
        event: Result<watcher::Event<DynamicObject>, watcher::Error>,
    ) -> bool {
        let before = self.class.clone();
        match event {
            Ok(watcher::Event::Init) => self.relist = Some(None),
            Ok(watcher::Event::InitApply(g)) => {
                if let Some(class) = self.class_of(&g)
                    && let Some(relist) = &mut self.relist
                {
                    *relist = Some(class);
                }
            }
            Ok(watcher::Event::InitDone) => {
                self.class = self.relist.take().flatten();
                self.listed = true;
                match &self.class {
                    Some(class) => tracing::info!(
                        gateway = %self.name, %class,
                        "the waypoint's Gateway listed: policies targeting its GatewayClass apply"
                    ),
                    None => tracing::warn!(
                        gateway = %self.name,
                        "the waypoint's Gateway is not in the API: only policies targeting \
                         istio-waypoint, the Gateway by name, or a Service apply"
                    ),
                }
            }
            Ok(watcher::Event::Apply(g)) => {
                if let Some(class) = self.class_of(&g) {
                    self.class = Some(class);
                }
            }
            Ok(watcher::Event::Delete(g)) => {
                if self.class_of(&g).is_some() {
                    tracing::warn!(gateway = %self.name, "the waypoint's Gateway was deleted");
                    self.class = None;
                }
            }
            Err(watcher::Error::InitialListFailed(kube::Error::Api(status)))
                if status.is_not_found() =>
            {
                // No Gateway API CRDs: no Gateway to read, which must not keep the waypoint
                // unready. The watcher keeps looking, with backoff.
                self.listed = true;
                self.class = None;
            }
            // An outage: the route watches say so; the class last read stays.
            Err(e) => tracing::debug!("the waypoint's Gateway watch: {e}"),
        }
        self.class != before
    }

    /// The GatewayClass of `g` when it is this waypoint's Gateway (the API server may not
    /// apply the watch's field selector: the name is checked here too).
    fn class_of(&self, g: &DynamicObject) -> Option<String> {
        if g.metadata.name.as_deref() != Some(self.name.as_str()) {
            return None;
        }
        Some(
            g.data
                .pointer("/spec/gatewayClassName")
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default()
                .to_owned(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway(name: &str, class: &str) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"gatewayClassName": class},
        }))
        .unwrap()
    }

    #[test]
    fn the_class_follows_the_gateway_of_this_name_through_lists_changes_and_deletion() {
        let mut own = OwnGateway::new("waypoint");
        assert!(!own.handle(Ok(watcher::Event::Init)));
        own.handle(Ok(watcher::Event::InitApply(gateway("other", "x"))));
        own.handle(Ok(watcher::Event::InitApply(gateway("waypoint", "mesh"))));
        assert!(!own.listed(), "listed before InitDone");
        assert_eq!(own.class(), None);
        assert!(own.handle(Ok(watcher::Event::InitDone)));
        assert!(own.listed());
        assert_eq!(own.class().map(String::as_str), Some("mesh"));
        // Another Gateway changes nothing; this one's new class does.
        assert!(!own.handle(Ok(watcher::Event::Apply(gateway("other", "y")))));
        assert!(own.handle(Ok(watcher::Event::Apply(gateway("waypoint", "new")))));
        assert_eq!(own.class().map(String::as_str), Some("new"));
        // A re-list without it: gone.
        own.handle(Ok(watcher::Event::Init));
        assert!(own.handle(Ok(watcher::Event::InitDone)));
        assert_eq!(own.class(), None);
        assert!(own.handle(Ok(watcher::Event::Apply(gateway("waypoint", "mesh")))));
        assert!(own.handle(Ok(watcher::Event::Delete(gateway("waypoint", "mesh")))));
        assert_eq!(own.class(), None);
    }
}
