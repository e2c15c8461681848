//! What the watches have delivered, per watch (a kind, in all namespaces or in one of the
//! namespaces the waypoint may read), each object decoded once when it arrives (by the
//! files' decoder). Pure: the source feeds it watch events and asks it for the accepted
//! resources and the findings. A re-list (after `410 Gone` or a broken watch) fills a new
//! set beside the one in force and replaces it only once the list is complete, so the
//! routes never lose objects while the list is under way.

use std::collections::BTreeMap;

use serde_json::Value as Json;

use super::json::to_node;
use super::kinds::{Kind, WATCHED};
use crate::config::{self, Diagnostic, LoadOptions, Loaded, Resource, Source};

/// What a message names as the file of objects read from the API server.
pub const SOURCE_NAME: &str = "kubernetes";

/// One object as the API server sent it, and what the decoder made of it.
#[derive(Clone, Debug)]
pub struct Entry {
    pub raw: Json,
    pub resource_version: String,
    pub loaded: Loaded,
}

impl Entry {
    pub fn rejected(&self) -> bool {
        !self.loaded.rejected.is_empty()
    }
}

type Key = (String, String);

#[derive(Debug, Default)]
struct KindStore {
    objects: BTreeMap<Key, Entry>,
    /// A list under way: the objects seen since `Init`.
    relist: Option<BTreeMap<Key, Entry>>,
    /// Listed completely at least once.
    synced: bool,
}

/// The objects of every watch. Watch `slot` is kind `slot / scopes` in namespace
/// `namespaces[slot % scopes]` (or in all namespaces when none are named).
#[derive(Debug)]
pub struct Store {
    kinds: Vec<KindStore>,
    /// The namespaces watched one by one; empty: all namespaces with one watch per kind.
    namespaces: Vec<String>,
    opts: LoadOptions,
}

/// What an event did to the store.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    /// Nothing that routes see (a list under way, or the same version again).
    None,
    /// The set of objects changed; `rejected` when the object that came in was refused.
    Updated { rejected: bool },
}

impl Store {
    /// A store for one watch per kind, in all namespaces.
    pub fn new(opts: LoadOptions) -> Store {
        Store::scoped(opts, Vec::new())
    }

    /// A store for one watch per kind and namespace of `namespaces` (all namespaces if it is
    /// empty).
    pub fn scoped(opts: LoadOptions, mut namespaces: Vec<String>) -> Store {
        namespaces.sort();
        namespaces.dedup();
        let scopes = namespaces.len().max(1);
        Store {
            kinds: (0..WATCHED.len() * scopes)
                .map(|_| KindStore::default())
                .collect(),
            namespaces,
            opts,
        }
    }

    /// Every watch: its slot, the index of its kind in [`WATCHED`] and its namespace
    /// (`None`: all namespaces).
    pub fn watches(&self) -> impl Iterator<Item = (usize, usize, Option<&str>)> {
        (0..self.kinds.len()).map(|slot| {
            let namespace = self
                .namespaces
                .get(slot % self.scopes())
                .map(String::as_str);
            (slot, self.kind_of(slot), namespace)
        })
    }

    /// The slot of the watch that delivers objects of kind `kind` in `namespace`, if any.
    pub fn slot_of(&self, kind: usize, namespace: &str) -> Option<usize> {
        if self.namespaces.is_empty() {
            return Some(kind);
        }
        let scope = self.namespaces.iter().position(|n| n == namespace)?;
        Some(kind * self.scopes() + scope)
    }

    /// The index in [`WATCHED`] of the kind of watch `slot`.
    pub fn kind_of(&self, slot: usize) -> usize {
        slot / self.scopes()
    }

    fn scopes(&self) -> usize {
        self.namespaces.len().max(1)
    }

    /// Every watch has listed once: the routes are complete.
    pub fn synced(&self) -> bool {
        self.kinds.iter().all(|k| k.synced)
    }

    /// A (re-)list starts.
    pub fn init(&mut self, slot: usize) {
        self.kinds[slot].relist = Some(BTreeMap::new());
    }

    /// An object of a list under way.
    pub fn init_apply(&mut self, slot: usize, entry: Entry) {
        let Some(key) = key_of(&entry.raw) else {
            return;
        };
        self.kinds[slot]
            .relist
            .get_or_insert_with(BTreeMap::new)
            .insert(key, entry);
    }

    /// The list is complete: it replaces what the watch knew.
    pub fn init_done(&mut self, slot: usize) -> Change {
        let store = &mut self.kinds[slot];
        let listed = store.relist.take().unwrap_or_default();
        let same = store.synced
            && listed.len() == store.objects.len()
            && listed.iter().all(|(k, e)| {
                store
                    .objects
                    .get(k)
                    .is_some_and(|old| old.resource_version == e.resource_version)
            });
        store.objects = listed;
        let was_synced = std::mem::replace(&mut store.synced, true);
        if same && was_synced {
            Change::None
        } else {
            Change::Updated {
                rejected: store.objects.values().any(Entry::rejected),
            }
        }
    }

    /// The watch's kind is not served (its CRD is not installed): it has no objects, and counts as
    /// listed. True when that changed something.
    pub fn absent(&mut self, slot: usize) -> bool {
        let store = &mut self.kinds[slot];
        store.relist = None;
        let changed = !store.synced || !store.objects.is_empty();
        store.objects.clear();
        store.synced = true;
        changed
    }

    /// An object added or changed.
    pub fn apply(&mut self, slot: usize, entry: Entry) -> Change {
        let Some(key) = key_of(&entry.raw) else {
            return Change::None;
        };
        let store = &mut self.kinds[slot];
        if store.objects.get(&key).is_some_and(|e| {
            !entry.resource_version.is_empty() && e.resource_version == entry.resource_version
        }) {
            return Change::None;
        }
        let rejected = entry.rejected();
        // A new version that reads the same (a status written, a managed field moved) is
        // kept, for the status it carries, but changes no route.
        let same = store.objects.get(&key).is_some_and(|old| {
            old.loaded.resources == entry.loaded.resources
                && old.loaded.diagnostics == entry.loaded.diagnostics
        });
        store.objects.insert(key, entry);
        if same {
            Change::None
        } else {
            Change::Updated { rejected }
        }
    }

    /// The entry in force for this very version of `object` (same resourceVersion), so it
    /// need not be decoded (and its findings reported) again.
    pub fn known(&self, slot: usize, object: &Json) -> Option<&Entry> {
        let version = resource_version(object);
        let entry = self.kinds[slot].objects.get(&key_of(object)?)?;
        (!version.is_empty() && entry.resource_version == version).then_some(entry)
    }

    /// An object deleted.
    pub fn delete(&mut self, slot: usize, object: &Json) -> Change {
        let Some(key) = key_of(object) else {
            return Change::None;
        };
        match self.kinds[slot].objects.remove(&key) {
            Some(_) => Change::Updated { rejected: false },
            None => Change::None,
        }
    }

    /// Every object in force, with its kind.
    pub fn entries(&self) -> impl Iterator<Item = (Kind, &Entry)> {
        self.kinds.iter().enumerate().flat_map(|(slot, store)| {
            let kind = WATCHED[self.kind_of(slot)];
            store.objects.values().map(move |e| (kind, e))
        })
    }

    /// The accepted resources, for the compile step.
    pub fn resources(&self) -> Vec<Resource> {
        self.entries()
            .flat_map(|(_, e)| e.loaded.resources.iter().cloned())
            .collect()
    }

    /// Everything the decoder said about the objects in force.
    pub fn diagnostics(&self) -> impl Iterator<Item = &Diagnostic> {
        self.entries()
            .flat_map(|(_, e)| e.loaded.diagnostics.iter())
    }

    /// The objects in force that the decoder refused.
    pub fn rejected(&self) -> impl Iterator<Item = &config::ResourceName> {
        self.entries().flat_map(|(_, e)| e.loaded.rejected.iter())
    }

    pub fn len(&self) -> usize {
        self.kinds.iter().map(|k| k.objects.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decodes an object of watch `slot` as the route files are decoded.
    pub fn decode(&self, slot: usize, mut object: Json) -> Entry {
        let k = WATCHED[self.kind_of(slot)];
        // Items of a list may come without their type; the watch says what they are.
        if let Json::Object(map) = &mut object {
            map.entry("apiVersion")
                .or_insert_with(|| Json::String(k.api_version()));
            map.entry("kind")
                .or_insert_with(|| Json::String(k.kind.to_owned()));
        }
        let src = Source {
            file: SOURCE_NAME.to_owned(),
            document: 1,
        };
        let mut loaded = config::load_document(&src, &to_node(&object), &self.opts);
        // Positions mean nothing in JSON: the field path says where.
        for d in &mut loaded.diagnostics {
            d.pos = None;
        }
        Entry {
            resource_version: resource_version(&object),
            raw: object,
            loaded,
        }
    }
}

fn key_of(object: &Json) -> Option<Key> {
    let meta = object.get("metadata")?;
    let name = meta.get("name")?.as_str()?;
    let namespace = meta.get("namespace").and_then(Json::as_str).unwrap_or("");
    Some((namespace.to_owned(), name.to_owned()))
}

fn resource_version(object: &Json) -> String {
    object
        .pointer("/metadata/resourceVersion")
        .and_then(Json::as_str)
        .unwrap_or_default()
        .to_owned()
}

#[cfg(test)]
mod tests;
