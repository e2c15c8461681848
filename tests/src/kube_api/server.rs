//! The stand-in API server's HTTP side (hyper 1, plain HTTP/1.1): list with the
//! collection's resourceVersion, watch as a chunked stream of JSON events (`ADDED`,
//! `MODIFIED`, `DELETED`, `BOOKMARK` when `allowWatchBookmarks=true`) resumed from a
//! resourceVersion, an `ERROR` event carrying a `Status` with code 410 for a resourceVersion
//! older than the last compaction (as the real server answers), get, server-side apply,
//! delete, and merge patch on the `/status` subresource. Every request is recorded for the tests to look at.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value as Json, json};
use tokio::sync::{mpsc, watch};

use super::objects::{Key, Kind, Objects, kind_by_plural};

pub(super) type Body = BoxBody<Bytes, Infallible>;

/// A request as the server saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    pub body: Option<Json>,
}

/// One change, as a watch sends it.
#[derive(Clone, Debug)]
pub(super) struct Change {
    pub(super) revision: u64,
    pub(super) plural: &'static str,
    pub(super) kind: &'static str,
    pub(super) object: Json,
}

#[derive(Debug, Default)]
pub(super) struct Db {
    pub(super) objects: Objects,
    /// Changes after the last compaction.
    pub(super) changes: Vec<Change>,
    /// A watch from a resourceVersion below this is answered 410.
    pub(super) compacted: u64,
    pub(super) seen: Vec<Seen>,
    /// Status patches applied.
    pub(super) status_patches: usize,
    /// Status patches answered 500 while set (etcd timing out).
    pub(super) refuse_status: bool,
    /// Kinds answered 404, as when their CRD is not installed.
    pub(super) unserved: Vec<&'static str>,
    /// Bookmarks sent: (plural, resourceVersion).
    pub(super) bookmarks: Vec<(&'static str, u64)>,
}

/// What every connection shares.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) db: Mutex<Db>,
    /// (revision, compactions): watches wake on a change of either.
    pub(super) news: watch::Sender<(u64, u64)>,
    pub(super) bookmark_every: Duration,
}

impl Shared {
    pub(super) fn db(&self) -> MutexGuard<'_, Db> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(super) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    shutdown: watch::Receiver<bool>,
) -> Result<Response<Body>, Infallible> {
    let method = req.method().clone();
    let uri = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_owned(), ToString::to_string);
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let authorization = header("authorization");
    let content_type = header("content-type");
    let path = req.uri().path().to_owned();
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let body_json = serde_json::from_slice::<Json>(&body).ok();
    shared.db().seen.push(Seen {
        method: method.to_string(),
        uri,
        authorization,
        content_type: content_type.clone(),
        body: body_json.clone(),
    });
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => {
            return Ok(status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{path} not found"),
            ));
        }
    };
    let (namespace, plural, name, sub) = match rest {
        [plural] => (None, *plural, None, None),
        ["namespaces", ns, plural] => (Some(*ns), *plural, None, None),
        [plural, name] if *plural != "namespaces" => (None, *plural, Some(*name), None),
        [plural, name, sub] if *plural != "namespaces" => (None, *plural, Some(*name), Some(*sub)),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name), None),
        ["namespaces", ns, plural, name, sub] => (Some(*ns), *plural, Some(*name), Some(*sub)),
        _ => {
            return Ok(status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{path} not found"),
            ));
        }
    };
    let served = kind_by_plural(group, version, plural)
        .filter(|k| !shared.db().unserved.contains(&k.plural));
    let Some(kind) = served else {
        return Ok(status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("the server could not find the requested resource ({group}/{plural})"),
        ));
    };
    let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    Ok(match (method, name, sub) {
        (Method::GET, None, None) if watching => {
            watch_stream(shared, kind, namespace, &query, shutdown)
        }
        (Method::GET, None, None) => list(&shared, kind, namespace),
        (Method::GET, Some(name), None) => {
            let key = key_for(kind, namespace, name);
            match shared.db().objects.by_key.get(&key) {
                Some(object) => json_response(StatusCode::OK, object),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{}.{} \"{name}\" not found", kind.plural, kind.group),
                ),
            }
        }
        (Method::PATCH, Some(name), None)
            if content_type.as_deref() == Some("application/apply-patch+yaml") =>
        {
            let Some(body) = body_json else {
                return Ok(status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "the body is not JSON",
                ));
            };
            if !query.contains_key("fieldManager") {
                return Ok(status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "fieldManager is required for apply requests",
                ));
            }
            apply(&shared, kind, &key_for(kind, namespace, name), body)
        }
        // (Not 503 or 429: kube's client retries those itself.)
        (Method::PATCH, Some(_), Some("status")) if shared.db().refuse_status => status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "etcdserver: request timed out",
        ),
        (Method::PATCH, Some(name), Some("status")) => {
            if content_type.as_deref() != Some("application/merge-patch+json") {
                return Ok(status(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    "this server takes merge patches only",
                ));
            }
            let Some(patch) = body_json else {
                return Ok(status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "the body is not JSON",
                ));
            };
            patch_status(&shared, kind, &key_for(kind, namespace, name), &patch)
        }
        (Method::DELETE, Some(name), None) => {
            delete(&shared, kind, &key_for(kind, namespace, name))
        }
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "not supported here",
        ),
    })
}

/// Where an object of `kind` named in a request is filed.
fn key_for(kind: Kind, namespace: Option<&str>, name: &str) -> Key {
    let namespace = if kind.namespaced {
        namespace.unwrap_or("default")
    } else {
        ""
    };
    (kind.plural, namespace.to_owned(), name.to_owned())
}

fn list(shared: &Shared, kind: Kind, namespace: Option<&str>) -> Response<Body> {
    let db = shared.db();
    let items: Vec<Json> = db
        .objects
        .by_key
        .iter()
        .filter(|((plural, ns, _), _)| *plural == kind.plural && namespace.is_none_or(|n| n == ns))
        .map(|(_, o)| o.clone())
        .collect();
    json_response(
        StatusCode::OK,
        &json!({
            "apiVersion": kind.api_version(),
            "kind": format!("{}List", kind.kind),
            "metadata": {"resourceVersion": db.objects.revision.to_string()},
            "items": items,
        }),
    )
}

fn apply(shared: &Shared, kind: Kind, key: &Key, body: Json) -> Response<Body> {
    let mut db = shared.db();
    let now = super::clock(db.objects.revision);
    let (object, written) = match db.objects.server_side_apply(key, body, &now) {
        Ok(r) => r,
        Err(e) => return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &e),
    };
    let event = match written {
        super::Written::Added => Some("ADDED"),
        super::Written::Modified => Some("MODIFIED"),
        super::Written::Unchanged => None,
    };
    if let Some(event) = event {
        let revision = db.objects.revision;
        db.changes.push(Change {
            revision,
            plural: kind.plural,
            kind: event,
            object: object.clone(),
        });
        let compactions = shared.news.borrow().1;
        shared.news.send_replace((revision, compactions));
    }
    let code = if written == super::Written::Added {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    json_response(code, &object)
}

/// A delete, as the real server answers it for an object without finalizers: gone at once,
/// a `DELETED` event, the object in the answer.
fn delete(shared: &Shared, kind: Kind, key: &Key) -> Response<Body> {
    let mut db = shared.db();
    let Some(object) = db.objects.delete(key) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{}.{} \"{}\" not found", kind.plural, kind.group, key.2),
        );
    };
    let revision = db.objects.revision;
    db.changes.push(Change {
        revision,
        plural: kind.plural,
        kind: "DELETED",
        object: object.clone(),
    });
    let compactions = shared.news.borrow().1;
    shared.news.send_replace((revision, compactions));
    json_response(StatusCode::OK, &object)
}

fn patch_status(shared: &Shared, kind: Kind, key: &Key, patch: &Json) -> Response<Body> {
    let mut db = shared.db();
    let Some(object) = db.objects.patch_status(key, patch) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{}.{} \"{}\" not found", kind.plural, kind.group, key.2),
        );
    };
    let revision = db.objects.revision;
    db.status_patches += 1;
    db.changes.push(Change {
        revision,
        plural: kind.plural,
        kind: "MODIFIED",
        object: object.clone(),
    });
    let compactions = shared.news.borrow().1;
    shared.news.send_replace((revision, compactions));
    json_response(StatusCode::OK, &object)
}

/// The events of one watch, written as they come; ends at `timeoutSeconds`, at a
/// compaction (with the 410 a resumed watch would get) or when the server stops.
fn watch_stream(
    shared: Arc<Shared>,
    kind: Kind,
    namespace: Option<&str>,
    query: &HashMap<String, String>,
    mut shutdown: watch::Receiver<bool>,
) -> Response<Body> {
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let namespace = namespace.map(str::to_owned);
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let mut news = shared.news.subscribe();
    let compactions_at_start = news.borrow_and_update().1;
    tokio::spawn(async move {
        let line = |v: Json| {
            let mut b = serde_json::to_vec(&v).unwrap_or_default();
            b.push(b'\n');
            Bytes::from(b)
        };
        let gone = |from: u64, compacted: u64| {
            json!({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure",
                "message": format!("too old resource version: {from} ({compacted})"),
                "reason": "Expired", "code": 410,
            }})
        };
        let compacted = shared.db().compacted;
        if from < compacted {
            let _ = tx.send(line(gone(from, compacted))).await;
            return;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut sent = from;
        let mut tick = tokio::time::interval(shared.bookmark_every);
        tick.tick().await;
        let mut bookmark_due = false;
        loop {
            // One look at the store: the changes of this kind up to `revision`, all sent
            // before a bookmark at `revision` may say the watch is there.
            let (revision, pending) = {
                let db = shared.db();
                let pending: Vec<Change> = db
                    .changes
                    .iter()
                    .filter(|c| c.revision > sent && c.plural == kind.plural)
                    .filter(|c| {
                        namespace.as_deref().is_none_or(|n| {
                            c.object
                                .pointer("/metadata/namespace")
                                .and_then(Json::as_str)
                                == Some(n)
                        })
                    })
                    .cloned()
                    .collect();
                (db.objects.revision, pending)
            };
            for c in pending {
                sent = c.revision;
                if tx
                    .send(line(json!({"type": c.kind, "object": c.object})))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if std::mem::take(&mut bookmark_due) {
                let bookmark = json!({"type": "BOOKMARK", "object": {
                    "apiVersion": kind.api_version(), "kind": kind.kind,
                    "metadata": {"resourceVersion": revision.to_string()},
                }});
                if tx.send(line(bookmark)).await.is_err() {
                    return;
                }
                shared.db().bookmarks.push((kind.plural, revision));
                sent = revision;
            }
            tokio::select! {
                changed = news.changed() => {
                    if changed.is_err() { return }
                    let (_, compactions) = *news.borrow_and_update();
                    if compactions != compactions_at_start {
                        // etcd compacted past this watch: the real server ends it with 410.
                        let compacted = shared.db().compacted;
                        let _ = tx.send(line(gone(sent, compacted))).await;
                        return;
                    }
                }
                _ = tick.tick(), if bookmarks => bookmark_due = true,
                () = tokio::time::sleep_until(deadline) => return,
                _ = shutdown.changed() => return,
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(|b| Ok(Frame::data(b)));
    let mut resp = Response::new(http_body_util::BodyExt::boxed(StreamBody::new(stream)));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

fn json_response(code: StatusCode, v: &Json) -> Response<Body> {
    let mut resp =
        Response::new(Full::new(Bytes::from(serde_json::to_vec(v).unwrap_or_default())).boxed());
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

/// A `Status` object, as the real server answers an error.
fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(
        code,
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason,
            "code": code.as_u16(),
        }),
    )
}
