//! A stand-in Kubernetes API server for the tests (no cluster runs here): it serves the
//! kinds the waypoint watches with the real list/watch protocol (see `server`), objects
//! that look like a real server's (see `objects`) built from the YAML users apply, and
//! lets a test change objects, force a compaction (`410 Gone`), stop and restart it, and
//! read what clients asked and patched. It listens inside a network namespace (the
//! waypoint's pod: the waypoint reaches it as `http://127.0.0.1:<port>`), on the runtime of
//! the test that starts it.

pub mod harness;
pub mod objects;
mod server;

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use serde_json::Value as Json;
use tokio::sync::watch;

use crate::mesh::{Mesh, http_get};
use crate::netns::in_netns;
use crate::process::{Proc, binary, wait_until};
use objects::{Key, Written, kind_by_name};
pub use server::Seen;
use server::{Change, Db, Shared};

/// The bearer token the kubeconfig gives the waypoint; the server records what it got.
pub const TOKEN: &str = "waypoint-token-for-tests";

struct Running {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// The server; objects persist across [`stop`](ApiServer::stop) and
/// [`start`](ApiServer::start), as etcd does.
pub struct ApiServer {
    shared: Arc<Shared>,
    netns: String,
    addr: SocketAddr,
    running: Option<Running>,
}

impl ApiServer {
    /// A server for `addr` in namespace `netns`, sending a bookmark on each watch every
    /// `bookmark_every`; it does not listen until started.
    pub fn new(netns: &str, addr: SocketAddr, bookmark_every: Duration) -> io::Result<ApiServer> {
        let (news, _) = watch::channel((0, 0));
        Ok(ApiServer {
            shared: Arc::new(Shared {
                db: Mutex::new(Db::default()),
                news,
                bookmark_every,
            }),
            netns: netns.to_owned(),
            addr,
            running: None,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Listens (again); every connection is served until [`stop`](ApiServer::stop). Call it
    /// on a tokio runtime: the server runs there.
    pub fn start(&mut self) -> io::Result<()> {
        if self.running.is_some() {
            return Ok(());
        }
        let addr = self.addr;
        let std = in_netns(&self.netns, move || std::net::TcpListener::bind(addr))??;
        std.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(std)?;
        let (stop, stopped) = watch::channel(false);
        let shared = self.shared.clone();
        let task = tokio::spawn(async move {
            let mut shutdown = stopped.clone();
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = shutdown.changed() => return,
                };
                let Ok((stream, _)) = accepted else { continue };
                let shared = shared.clone();
                let mut conn_shutdown = stopped.clone();
                let watch_shutdown = stopped.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        server::handle(shared.clone(), req, watch_shutdown.clone())
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc);
                    // Stopping drops the connection mid-stream, as a killed server does.
                    tokio::select! {
                        _ = conn => {}
                        _ = conn_shutdown.changed() => {}
                    }
                });
            }
        });
        self.running = Some(Running { stop, task });
        Ok(())
    }

    /// Stops listening and cuts every connection (open watches end without a word); returns
    /// once the listening socket is closed.
    pub async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            let _ = running.stop.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(5), running.task).await;
        }
    }

    /// Applies the objects of a multi-document YAML text as `kubectl apply` would: created,
    /// or changed (a `MODIFIED` event) when they differ from the stored ones.
    pub fn apply_yaml(&self, text: &str) -> Result<(), String> {
        let docs: Vec<Json> =
            serde_saphyr::from_multiple(text).map_err(|e| format!("not valid YAML: {e}"))?;
        let mut db = self.shared.db();
        for doc in docs.into_iter().filter(|d| !d.is_null()) {
            let now = clock(db.objects.revision);
            let (key, written) = db.objects.apply(doc, &now)?;
            let event = match written {
                Written::Added => "ADDED",
                Written::Modified => "MODIFIED",
                Written::Unchanged => continue,
            };
            let revision = db.objects.revision;
            let object = db.objects.by_key[&key].clone();
            db.changes.push(Change {
                revision,
                plural: key.0,
                kind: event,
                object,
            });
        }
        self.announce(&db);
        Ok(())
    }

    /// Deletes an object (a `DELETED` event); false if there was none.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> bool {
        let Some(k) = kind_by_name(kind) else {
            return false;
        };
        let mut db = self.shared.db();
        let key: Key = (k.plural, namespace.to_owned(), name.to_owned());
        let Some(object) = db.objects.delete(&key) else {
            return false;
        };
        let revision = db.objects.revision;
        db.changes.push(Change {
            revision,
            plural: k.plural,
            kind: "DELETED",
            object,
        });
        self.announce(&db);
        true
    }

    /// etcd compacts its history: every open watch ends with `410 Gone`, and a watch
    /// resumed from any earlier resourceVersion gets it too, so clients must list again.
    pub fn compact(&self) {
        let mut db = self.shared.db();
        db.objects.revision += 1;
        db.compacted = db.objects.revision;
        db.changes.clear();
        let revision = db.objects.revision;
        let compactions = self.shared.news.borrow().1 + 1;
        drop(db);
        self.shared.news.send_replace((revision, compactions));
    }

    /// The stored object (with its status), if any.
    pub fn object(&self, kind: &str, namespace: &str, name: &str) -> Option<Json> {
        let k = kind_by_name(kind)?;
        let key: Key = (k.plural, namespace.to_owned(), name.to_owned());
        self.shared.db().objects.by_key.get(&key).cloned()
    }

    /// How many status patches were applied (not those refused).
    pub fn status_patches(&self) -> usize {
        self.shared.db().status_patches
    }

    /// Answers every status patch 500 while `refuse` holds.
    pub fn refuse_status_patches(&self, refuse: bool) {
        self.shared.db().refuse_status = refuse;
    }

    /// Answers 404 for `kind` from now on, as a server without its CRD does.
    pub fn unserve(&self, kind: &str) {
        if let Some(k) = kind_by_name(kind) {
            self.shared.db().unserved.push(k.plural);
        }
    }

    /// The last resourceVersion handed out.
    pub fn revision(&self) -> u64 {
        self.shared.db().objects.revision
    }

    /// The highest resourceVersion a bookmark of `plural` has carried.
    pub fn bookmarked(&self, plural: &str) -> Option<u64> {
        let db = self.shared.db();
        db.bookmarks
            .iter()
            .filter(|(p, _)| *p == plural)
            .map(|(_, r)| *r)
            .max()
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.db().seen.clone()
    }

    /// Writes a kubeconfig pointing at this server (plain HTTP, a bearer token).
    pub fn write_kubeconfig(&self, path: &Path) -> io::Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: {}\n\
             contexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    user: waypoint\n    \
             namespace: default\ncurrent-context: stand-in\nusers:\n- name: waypoint\n  user:\n    \
             token: {TOKEN}\n",
            self.url()
        );
        std::fs::write(path, text)
    }

    fn announce(&self, db: &Db) {
        let compactions = self.shared.news.borrow().1;
        self.shared
            .news
            .send_replace((db.objects.revision, compactions));
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            let _ = running.stop.send(true);
        }
    }
}

/// The server's clock: a fixed day, one second per revision (tests need order, not time).
pub(crate) fn clock(revision: u64) -> String {
    format!(
        "2026-12-01T10:{:02}:{:02}Z",
        (revision / 60) % 60,
        revision % 60
    )
}

/// Starts the waypoint in its pod reading its routes from the API server at `kubeconfig`
/// (`--kube`), its mesh from the mesh's file and its certificate from the local CA, and
/// waits until it is ready (which it is once every kind has been listed).
pub fn start_waypoint_kube(mesh: &Mesh, kubeconfig: &Path, extra: &[&str]) -> Proc {
    let mut cmd = Command::new(binary("waypoint"));
    cmd.arg("--mesh-config")
        .arg(mesh.config_path())
        .arg("--ca-dir")
        .arg(mesh.dir.path().join("ca"))
        .arg("--kube")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--service-account")
        .arg("waypoint")
        .args(extra)
        .env("RUST_LOG", "info,waypoint=debug");
    let netns = mesh.netns("wp");
    let mut wp = Proc::spawn("waypoint", &netns, cmd, mesh.dir.path()).expect("waypoint");
    let ready = wait_until(Duration::from_secs(30), || {
        wp.exited().is_some()
            || http_get(&netns, "127.0.0.1:15021".parse().unwrap(), "/healthz/ready")
                .is_ok_and(|(status, _)| status == 200)
    });
    assert!(
        ready.is_ok() && wp.exited().is_none(),
        "waypoint not ready; log:\n{}",
        wp.log()
    );
    wp
}

/// Where a test writes its kubeconfig.
pub fn kubeconfig_path(mesh: &Mesh) -> PathBuf {
    mesh.dir.path().join("kubeconfig")
}
