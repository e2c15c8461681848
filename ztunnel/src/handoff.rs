//! Upgrades without loss: a new ztunnel takes the listening sockets of the one it replaces.
//!
//! The old process keeps a unix socket in its state directory. A new process for the same
//! node connects to it before opening any listener and receives, pod by pod, the very
//! listening sockets of 15001/15006/15008 (file descriptors passed with `SCM_RIGHTS`). The
//! sockets never close, so no connection is refused: connections that arrive while the two
//! processes swap wait in the same accept queue. The old process then stops accepting and
//! keeps serving its established connections until they end or a deadline passes. The
//! capture maps are pinned and shared, so either process's programs serve both.
//!
//! The exchange is lock-step (one request, one answer), which keeps each answer and its file
//! descriptors in one message on the stream socket.

// Received file descriptors become `OwnedFd`s, which only `unsafe` can assert.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use sendfd::{RecvWithFd, SendWithFd};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// What a pod listener is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerKind {
    Outbound,
    Plaintext,
    Hbone,
}

/// A listening socket, described for the successor.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ListenerDesc {
    kind: ListenerKind,
    addr: SocketAddr,
}

#[derive(Debug, Serialize, Deserialize)]
struct PodListeners {
    uid: String,
    listeners: Vec<ListenerDesc>,
}

/// A listening socket with what it is for and where it listens.
pub type Socket = (ListenerKind, SocketAddr, OwnedFd);

/// The listening sockets of one pod, as the serving process owns them (duplicates of the
/// accept loops' sockets).
#[derive(Debug)]
pub struct PodSockets {
    pub uid: String,
    pub sockets: Vec<Socket>,
}

/// Listening sockets received from a predecessor, used pod by pod as pods are enrolled.
///
/// An enrolment works on duplicates ([`Inherited::get`]) and the sockets stay here until it
/// has succeeded ([`Inherited::enrolled`]): an attempt that fails half-way only drops its
/// duplicates, so the sockets stay open, with the connections queued in their accept queues,
/// for the next attempt. (Closing a listening socket resets what waits in its queue.)
#[derive(Debug, Default)]
pub struct Inherited {
    by_pod: Mutex<HashMap<String, Vec<Socket>>>,
}

impl Inherited {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Socket>>> {
        self.by_pod.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A duplicate of the inherited socket for `uid`'s listener of `kind` on `addr`, if there
    /// is one (`Err` when it cannot be duplicated: out of file descriptors).
    pub fn get(
        &self,
        uid: &str,
        kind: ListenerKind,
        addr: SocketAddr,
    ) -> io::Result<Option<OwnedFd>> {
        let by_pod = self.lock();
        let Some(sockets) = by_pod.get(uid) else {
            return Ok(None);
        };
        sockets
            .iter()
            .find(|(k, a, _)| *k == kind && *a == addr)
            .map(|(_, _, fd)| fd.try_clone())
            .transpose()
    }

    /// Whether sockets of `uid` are still held (its enrolment has not succeeded yet).
    pub fn holds(&self, uid: &str) -> bool {
        self.lock().contains_key(uid)
    }

    /// `uid` is enrolled on duplicates of its sockets: the originals are no longer needed.
    pub fn enrolled(&self, uid: &str) {
        self.lock().remove(uid);
    }

    pub fn len(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

const MAX_MESSAGE: usize = 64 * 1024;
const MAX_FDS: usize = 16;
const TIMEOUT: Duration = Duration::from_secs(10);

/// The handoff socket in `state_dir`.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("handoff.sock")
}

/// Whether a predecessor offers its listeners in `state_dir` within `wait` (its socket is
/// there: it binds it just after it is ready; looked at without connecting, which would use
/// up its one hand-over).
pub async fn offered(state_dir: &Path, wait: Duration) -> bool {
    use std::os::unix::fs::FileTypeExt as _;
    let path = socket_path(state_dir);
    let until = tokio::time::Instant::now() + wait;
    loop {
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket()) {
            return true;
        }
        if tokio::time::Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asks a running predecessor for its listeners. `None` when there is none (no socket, or
/// nobody listening on it: a predecessor that crashed).
pub fn take_over(state_dir: &Path) -> io::Result<Option<Inherited>> {
    let path = socket_path(state_dir);
    let mut conn = match UnixStream::connect(&path) {
        Ok(conn) => conn,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    conn.set_read_timeout(Some(TIMEOUT))?;
    conn.set_write_timeout(Some(TIMEOUT))?;
    conn.write_all(b"TAKEOVER\n")?;
    let mut count = [0u8; 4];
    conn.read_exact(&mut count)?;
    let pods = u32::from_be_bytes(count);
    let inherited = Inherited::default();
    for _ in 0..pods {
        conn.write_all(b"NEXT\n")?;
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut fds: [RawFd; MAX_FDS] = [-1; MAX_FDS];
        let (n, nfds) = conn.recv_with_fd(&mut buf, &mut fds)?;
        // SAFETY: the kernel just installed these descriptors in this process for us; each
        // is owned exactly once from here on.
        let owned: Vec<OwnedFd> = fds[..nfds]
            .iter()
            .map(|fd| unsafe { OwnedFd::from_raw_fd(*fd) })
            .collect();
        let desc: PodListeners = serde_json::from_slice(&buf[..n])
            .map_err(|e| io::Error::other(format!("handoff message: {e}")))?;
        if desc.listeners.len() != owned.len() {
            return Err(io::Error::other(format!(
                "handoff for {}: {} listeners described, {} sockets received",
                desc.uid,
                desc.listeners.len(),
                owned.len()
            )));
        }
        let sockets = desc
            .listeners
            .into_iter()
            .zip(owned)
            .map(|(d, fd)| (d.kind, d.addr, fd))
            .collect();
        inherited.lock().insert(desc.uid, sockets);
    }
    conn.write_all(b"DONE\n")?;
    let mut ok = [0u8; 2];
    conn.read_exact(&mut ok)?;
    info!(
        pods,
        sockets = inherited.len(),
        "took over listening sockets from the previous ztunnel"
    );
    Ok(Some(inherited))
}

/// Serves the handoff socket until a successor has taken the listeners; then returns, and
/// the caller stops accepting and drains. `sockets` is called once, when a successor asks.
pub async fn serve_once<F>(state_dir: &Path, sockets: F) -> io::Result<()>
where
    F: FnOnce() -> Vec<PodSockets> + Send + 'static,
{
    std::fs::create_dir_all(state_dir)?;
    let path = socket_path(state_dir);
    // A stale socket from a crashed or handed-over predecessor: nobody answers on it.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    // A plain thread, not a blocking task: it may wait forever, and must not hold up the
    // runtime's shutdown.
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("handoff".into())
        .spawn(move || {
            let outcome = match listener.incoming().next() {
                Some(Ok(conn)) => hand_over(conn, sockets()),
                Some(Err(e)) => Err(e),
                None => Err(io::Error::other("handoff socket closed")),
            };
            if let Err(e) = &outcome {
                warn!(error = %e, "handoff to a successor failed");
            }
            let _ = done.send(outcome);
        })?;
    result
        .await
        .map_err(|_| io::Error::other("handoff thread ended"))?
}

fn hand_over(mut conn: UnixStream, pods: Vec<PodSockets>) -> io::Result<()> {
    conn.set_read_timeout(Some(TIMEOUT))?;
    conn.set_write_timeout(Some(TIMEOUT))?;
    expect(&mut conn, b"TAKEOVER\n")?;
    let count = u32::try_from(pods.len()).map_err(io::Error::other)?;
    conn.write_all(&count.to_be_bytes())?;
    for pod in &pods {
        expect(&mut conn, b"NEXT\n")?;
        let desc = PodListeners {
            uid: pod.uid.clone(),
            listeners: pod
                .sockets
                .iter()
                .map(|(kind, addr, _)| ListenerDesc {
                    kind: *kind,
                    addr: *addr,
                })
                .collect(),
        };
        let bytes = serde_json::to_vec(&desc).map_err(io::Error::other)?;
        let fds: Vec<RawFd> = pod
            .sockets
            .iter()
            .map(|(_, _, fd)| fd.as_raw_fd())
            .collect();
        conn.send_with_fd(&bytes, &fds)?;
    }
    expect(&mut conn, b"DONE\n")?;
    conn.write_all(b"OK")?;
    info!(
        pods = pods.len(),
        "listening sockets handed to the successor"
    );
    Ok(())
}

fn expect(conn: &mut UnixStream, want: &[u8]) -> io::Result<()> {
    let mut got = vec![0u8; want.len()];
    conn.read_exact(&mut got)?;
    if got != want {
        return Err(io::Error::other(format!(
            "handoff protocol: expected {:?}, got {:?}",
            String::from_utf8_lossy(want),
            String::from_utf8_lossy(&got)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    use super::*;

    /// An enrolment attempt that fails after getting its sockets drops only duplicates: the
    /// connection waiting in the accept queue is still there for the next attempt.
    #[test]
    fn a_failed_attempt_keeps_the_socket_and_its_queue() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let inherited = Inherited::default();
        inherited.lock().insert(
            "pod".to_owned(),
            vec![(ListenerKind::Outbound, addr, OwnedFd::from(listener))],
        );
        let mut queued = TcpStream::connect(addr).unwrap();
        queued.write_all(b"waiting").unwrap();

        let first = inherited.get("pod", ListenerKind::Outbound, addr).unwrap();
        drop(first.expect("the inherited socket"));
        assert!(inherited.holds("pod"));
        assert!(
            inherited
                .get("pod", ListenerKind::Hbone, addr)
                .unwrap()
                .is_none()
        );

        let second = inherited
            .get("pod", ListenerKind::Outbound, addr)
            .unwrap()
            .expect("still inherited after the failed attempt");
        inherited.enrolled("pod");
        assert!(!inherited.holds("pod"));
        assert!(
            inherited
                .get("pod", ListenerKind::Outbound, addr)
                .unwrap()
                .is_none()
        );
        // The duplicate alone keeps the socket: the queued connection is accepted from it.
        let (mut conn, _) = TcpListener::from(second).accept().unwrap();
        let mut got = [0u8; 7];
        conn.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"waiting");
    }
}
