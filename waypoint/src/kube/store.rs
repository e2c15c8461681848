//! What the watches have delivered, per kind, each object decoded once when it arrives (by
//! the files' decoder). Pure: the source feeds it watch events and asks it for the accepted
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

/// The objects of every watched kind.
#[derive(Debug)]
pub struct Store {
    kinds: Vec<KindStore>,
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
    pub fn new(opts: LoadOptions) -> Store {
        Store {
            kinds: WATCHED.iter().map(|_| KindStore::default()).collect(),
            opts,
        }
    }

    /// Every kind has been listed once: the routes are complete.
    pub fn synced(&self) -> bool {
        self.kinds.iter().all(|k| k.synced)
    }

    /// A (re-)list starts.
    pub fn init(&mut self, kind: usize) {
        self.kinds[kind].relist = Some(BTreeMap::new());
    }

    /// An object of a list under way.
    pub fn init_apply(&mut self, kind: usize, entry: Entry) {
        let Some(key) = key_of(&entry.raw) else {
            return;
        };
        self.kinds[kind]
            .relist
            .get_or_insert_with(BTreeMap::new)
            .insert(key, entry);
    }

    /// The list is complete: it replaces what was known of the kind.
    pub fn init_done(&mut self, kind: usize) -> Change {
        let store = &mut self.kinds[kind];
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

    /// The kind is not served (its CRD is not installed): it has no objects, and counts as
    /// listed. True when that changed something.
    pub fn absent(&mut self, kind: usize) -> bool {
        let store = &mut self.kinds[kind];
        store.relist = None;
        let changed = !store.synced || !store.objects.is_empty();
        store.objects.clear();
        store.synced = true;
        changed
    }

    /// An object added or changed.
    pub fn apply(&mut self, kind: usize, entry: Entry) -> Change {
        let Some(key) = key_of(&entry.raw) else {
            return Change::None;
        };
        let store = &mut self.kinds[kind];
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
    pub fn known(&self, kind: usize, object: &Json) -> Option<&Entry> {
        let version = resource_version(object);
        let entry = self.kinds[kind].objects.get(&key_of(object)?)?;
        (!version.is_empty() && entry.resource_version == version).then_some(entry)
    }

    /// An object deleted.
    pub fn delete(&mut self, kind: usize, object: &Json) -> Change {
        let Some(key) = key_of(object) else {
            return Change::None;
        };
        match self.kinds[kind].objects.remove(&key) {
            Some(_) => Change::Updated { rejected: false },
            None => Change::None,
        }
    }

    /// Every object in force, with its kind.
    pub fn entries(&self) -> impl Iterator<Item = (Kind, &Entry)> {
        WATCHED
            .iter()
            .zip(&self.kinds)
            .flat_map(|(kind, store)| store.objects.values().map(move |e| (*kind, e)))
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

    /// Decodes an object of `kind` as the route files are decoded.
    pub fn decode(&self, kind: usize, mut object: Json) -> Entry {
        let k = WATCHED[kind];
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
