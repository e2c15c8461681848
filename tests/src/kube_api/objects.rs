//! The stand-in API server's objects: what it stores for each kind and the fields a real
//! API server adds to what a user applies (uid, resourceVersion, generation,
//! creationTimestamp, managedFields), the changes that bump each, and JSON merge patch
//! (RFC 7386) for the status subresource. Pure: the clock's value is passed in.

use std::collections::BTreeMap;

use serde_json::{Value as Json, json};

/// A kind the server serves: `/apis/<group>/<version>/<plural>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kind {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    /// False for a cluster-scoped kind (GatewayClass): no namespace in its path or key.
    pub namespaced: bool,
}

impl Kind {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// The kinds the waypoint watches, in the versions it asks for, then those the Gateway
/// controller reads and writes.
pub const KINDS: [Kind; 15] = [
    Kind {
        group: "networking.istio.io",
        version: "v1",
        kind: "VirtualService",
        plural: "virtualservices",
        namespaced: true,
    },
    Kind {
        group: "networking.istio.io",
        version: "v1",
        kind: "DestinationRule",
        plural: "destinationrules",
        namespaced: true,
    },
    Kind {
        group: "gateway.networking.k8s.io",
        version: "v1",
        kind: "HTTPRoute",
        plural: "httproutes",
        namespaced: true,
    },
    Kind {
        group: "gateway.networking.k8s.io",
        version: "v1",
        kind: "GRPCRoute",
        plural: "grpcroutes",
        namespaced: true,
    },
    Kind {
        group: "security.istio.io",
        version: "v1",
        kind: "AuthorizationPolicy",
        plural: "authorizationpolicies",
        namespaced: true,
    },
    Kind {
        group: "security.istio.io",
        version: "v1",
        kind: "RequestAuthentication",
        plural: "requestauthentications",
        namespaced: true,
    },
    Kind {
        group: "gateway.networking.k8s.io",
        version: "v1",
        kind: "Gateway",
        plural: "gateways",
        namespaced: true,
    },
    Kind {
        group: "",
        version: "v1",
        kind: "Service",
        plural: "services",
        namespaced: true,
    },
    Kind {
        group: "",
        version: "v1",
        kind: "ServiceAccount",
        plural: "serviceaccounts",
        namespaced: true,
    },
    Kind {
        group: "apps",
        version: "v1",
        kind: "Deployment",
        plural: "deployments",
        namespaced: true,
    },
    Kind {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        kind: "RoleBinding",
        plural: "rolebindings",
        namespaced: true,
    },
    Kind {
        group: "policy",
        version: "v1",
        kind: "PodDisruptionBudget",
        plural: "poddisruptionbudgets",
        namespaced: true,
    },
    Kind {
        group: "autoscaling",
        version: "v2",
        kind: "HorizontalPodAutoscaler",
        plural: "horizontalpodautoscalers",
        namespaced: true,
    },
    Kind {
        group: "gateway.networking.k8s.io",
        version: "v1",
        kind: "GatewayClass",
        plural: "gatewayclasses",
        namespaced: false,
    },
    Kind {
        group: "apiextensions.k8s.io",
        version: "v1",
        kind: "CustomResourceDefinition",
        plural: "customresourcedefinitions",
        namespaced: false,
    },
];

pub fn kind_by_name(kind: &str) -> Option<Kind> {
    KINDS.iter().copied().find(|k| k.kind == kind)
}

pub fn kind_by_plural(group: &str, version: &str, plural: &str) -> Option<Kind> {
    KINDS
        .iter()
        .copied()
        .find(|k| k.group == group && k.version == version && k.plural == plural)
}

/// Where an object is filed: plural, namespace, name.
pub type Key = (&'static str, String, String);

/// The objects and the revision counter, as etcd holds them.
#[derive(Debug, Default)]
pub struct Objects {
    /// The last resourceVersion handed out.
    pub revision: u64,
    pub by_key: BTreeMap<Key, Json>,
    uids: u64,
}

/// What a write did, for the watch event it causes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    Added,
    Modified,
    /// The same content again: no new revision, no event.
    Unchanged,
}

impl Objects {
    /// Stores an object as a user applies it (the fields the server owns are replaced).
    /// `now` is RFC 3339. The spec's change bumps `generation`, as for CRDs with a status
    /// subresource; the status of the stored object is kept.
    pub fn apply(&mut self, mut object: Json, now: &str) -> Result<(Key, Written), String> {
        let kind_name = object["kind"].as_str().unwrap_or_default().to_owned();
        let kind = kind_by_name(&kind_name).ok_or(format!("kind {kind_name:?} is not served"))?;
        let name = object
            .pointer("/metadata/name")
            .and_then(Json::as_str)
            .ok_or("metadata.name is required")?
            .to_owned();
        let namespace = if kind.namespaced {
            object
                .pointer("/metadata/namespace")
                .and_then(Json::as_str)
                .unwrap_or("default")
                .to_owned()
        } else {
            String::new()
        };
        // The API server stores the version it serves, whatever version was applied.
        object["apiVersion"] = json!(kind.api_version());
        let key: Key = (kind.plural, namespace.clone(), name);
        let old = self.by_key.get(&key).cloned();
        // The content: everything but metadata and status (a RoleBinding has no spec).
        let content = |o: &Json| -> Json {
            let mut o = o.clone();
            if let Json::Object(map) = &mut o {
                map.remove("metadata");
                map.remove("status");
            }
            o
        };
        if let Some(old) = &old
            && content(old) == content(&object)
            && old.pointer("/metadata/labels") == object.pointer("/metadata/labels")
            && old.pointer("/metadata/annotations") == object.pointer("/metadata/annotations")
        {
            return Ok((key, Written::Unchanged));
        }
        self.revision += 1;
        let meta = object["metadata"]
            .as_object_mut()
            .ok_or("metadata must be a mapping")?;
        if kind.namespaced {
            meta.insert("namespace".into(), json!(namespace));
        }
        meta.insert("resourceVersion".into(), json!(self.revision.to_string()));
        let written = match &old {
            Some(old) => {
                for k in ["uid", "creationTimestamp"] {
                    meta.insert(k.into(), old["metadata"][k].clone());
                }
                let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
                let bumped = old.get("spec") != object.get("spec");
                let meta = object["metadata"].as_object_mut().ok_or("metadata")?;
                meta.insert(
                    "generation".into(),
                    json!(if bumped { generation + 1 } else { generation }),
                );
                if let Some(status) = old.get("status") {
                    object["status"] = status.clone();
                }
                Written::Modified
            }
            None => {
                self.uids += 1;
                meta.insert(
                    "uid".into(),
                    json!(format!("6f1c0d2e-8a4b-4c1d-9e2f-{:012x}", self.uids)),
                );
                meta.insert("creationTimestamp".into(), json!(now));
                meta.insert("generation".into(), json!(1));
                Written::Added
            }
        };
        object["metadata"]["managedFields"] = json!([{
            "apiVersion": kind.api_version(),
            "fieldsType": "FieldsV1",
            "fieldsV1": {"f:spec": {}},
            "manager": "kubectl-client-side-apply",
            "operation": "Update",
            "time": now,
        }]);
        self.by_key.insert(key.clone(), object);
        Ok((key, written))
    }

    /// Server-side apply, as far as the tests need it: the applied fields are merged into
    /// the stored object (created if absent); `status` is not the applier's to set. A new
    /// Service gets a cluster IP, as the API server allocates one.
    pub fn server_side_apply(
        &mut self,
        key: &Key,
        mut body: Json,
        now: &str,
    ) -> Result<(Json, Written), String> {
        if let Json::Object(map) = &mut body {
            map.remove("status");
        }
        let merged = match self.by_key.get(key) {
            Some(old) => {
                let mut m = old.clone();
                merge(&mut m, &body);
                m
            }
            None => {
                if key.0 == "services" && body.pointer("/spec/clusterIP").is_none() {
                    self.uids += 1;
                    body["spec"]["clusterIP"] =
                        json!(format!("198.18.200.{}", self.uids % 250 + 1));
                }
                body
            }
        };
        let (key, written) = self.apply(merged, now)?;
        Ok((self.by_key[&key].clone(), written))
    }

    /// Applies a merge patch to the status of an object (the status subresource: only
    /// `status` of the patch is used); a new revision, the generation unchanged.
    pub fn patch_status(&mut self, key: &Key, patch: &Json) -> Option<Json> {
        let object = self.by_key.get_mut(key)?;
        let status = object
            .as_object_mut()?
            .entry("status")
            .or_insert_with(|| json!({}));
        if let Some(p) = patch.get("status") {
            merge(status, p);
        }
        self.revision += 1;
        object["metadata"]["resourceVersion"] = json!(self.revision.to_string());
        Some(object.clone())
    }

    /// Removes an object; the deleted object carries a new resourceVersion.
    pub fn delete(&mut self, key: &Key) -> Option<Json> {
        let mut object = self.by_key.remove(key)?;
        self.revision += 1;
        object["metadata"]["resourceVersion"] = json!(self.revision.to_string());
        Some(object)
    }
}

/// RFC 7386: objects merge key by key, `null` removes, anything else replaces.
pub fn merge(target: &mut Json, patch: &Json) {
    let Json::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Json::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge(t.entry(k.clone()).or_insert(Json::Null), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: &str = "2026-12-07T18:00:00Z";

    fn vs(subset: &str) -> Json {
        json!({"apiVersion": "networking.istio.io/v1alpha3", "kind": "VirtualService",
               "metadata": {"name": "reviews"},
               "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews", "subset": subset}}]}]}})
    }

    #[test]
    fn server_fields_are_added_and_bumped_as_a_real_server_does() {
        let mut o = Objects::default();
        let (key, w) = o.apply(vs("v1"), NOW).unwrap();
        assert_eq!(w, Written::Added);
        let stored = &o.by_key[&key];
        assert_eq!(stored["apiVersion"], "networking.istio.io/v1");
        assert_eq!(stored["metadata"]["namespace"], "default");
        assert_eq!(stored["metadata"]["resourceVersion"], "1");
        assert_eq!(stored["metadata"]["generation"], 1);
        let uid = stored["metadata"]["uid"].clone();
        assert_eq!(o.apply(vs("v1"), NOW).unwrap().1, Written::Unchanged);
        let (_, w) = o.apply(vs("v2"), "2026-12-07T19:00:00Z").unwrap();
        assert_eq!(w, Written::Modified);
        let stored = &o.by_key[&key];
        assert_eq!(stored["metadata"]["generation"], 2);
        assert_eq!(stored["metadata"]["uid"], uid);
        assert_eq!(stored["metadata"]["creationTimestamp"], NOW);
        let patched = o
            .patch_status(&key, &json!({"status": {"parents": [1]}, "spec": {"x": 1}}))
            .unwrap();
        assert_eq!(patched["status"]["parents"], json!([1]));
        assert_eq!(
            patched["metadata"]["generation"], 2,
            "status does not bump it"
        );
        assert!(patched["spec"].get("x").is_none(), "only status is patched");
    }

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut t = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge(&mut t, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(t, json!({"a": "z", "c": {"d": "e"}}));
        let mut t = json!({"a": [1, 2]});
        merge(&mut t, &json!({"a": [3]}));
        assert_eq!(t, json!({"a": [3]}), "lists are replaced whole");
    }
}
