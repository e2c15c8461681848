//! Network namespaces of pods: opening them, naming them by cookie, and creating sockets
//! inside them.
//!
//! A socket belongs to the namespace that was current when it was created, and stays there
//! whatever thread uses it later. So each pod namespace gets one small worker thread that
//! enters the namespace once (`setns`) and creates sockets on request; tokio then drives the
//! sockets from its own threads. This is the only file that switches namespaces.

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::oneshot;

use ztunnel_ebpf_common::ZTUNNEL_MARK;

/// `SO_NETNS_COOKIE` (include/uapi/asm-generic/socket.h), Linux 5.14+.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie the kernel gives a network namespace; what the eBPF programs key pods by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetnsCookie(pub u64);

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot enter network namespace {path}: {source}")]
    Enter { path: PathBuf, source: io::Error },
    #[error("cannot read the cookie of network namespace {path}: {source}")]
    Cookie { path: PathBuf, source: io::Error },
    #[error("the worker thread of network namespace {0} is gone")]
    WorkerGone(PathBuf),
}

/// What a socket is for; decides its options.
#[derive(Clone, Copy, Debug)]
pub enum SocketKind {
    /// A listener bound to the address (reuse-address set).
    Listener(SocketAddr),
    /// An outgoing connection from ztunnel, optionally bound to a source address first.
    /// Always marked so the capture programs leave it alone.
    Outgoing {
        family_of: SocketAddr,
        bind: Option<SocketAddr>,
    },
}

type Request = (SocketKind, oneshot::Sender<io::Result<Socket>>);

/// An open pod network namespace with its socket-creating worker.
#[derive(Debug)]
pub struct Netns {
    path: PathBuf,
    file: File,
    cookie: NetnsCookie,
    requests: mpsc::Sender<Request>,
}

impl Netns {
    /// Opens the namespace at `path` (e.g. `/var/run/netns/pod1` or `/proc/<pid>/ns/net`)
    /// and starts its worker thread.
    pub fn open(path: &Path) -> Result<Netns, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_owned(),
            source,
        })?;
        let worker_fd: OwnedFd =
            file.as_fd()
                .try_clone_to_owned()
                .map_err(|source| NetnsError::Open {
                    path: path.to_owned(),
                    source,
                })?;
        let (requests, rx) = mpsc::channel::<Request>();
        let (ready_tx, ready_rx) = mpsc::channel::<io::Result<NetnsCookie>>();
        let name = format!(
            "netns-{}",
            path.file_name().unwrap_or_default().to_string_lossy()
        );
        thread::Builder::new()
            .name(name.chars().take(15).collect())
            .spawn(move || worker(worker_fd, rx, ready_tx))
            .map_err(|source| NetnsError::Enter {
                path: path.to_owned(),
                source,
            })?;
        let cookie = match ready_rx.recv() {
            Ok(Ok(cookie)) => cookie,
            Ok(Err(source)) => {
                return Err(NetnsError::Enter {
                    path: path.to_owned(),
                    source,
                });
            }
            Err(_) => return Err(NetnsError::WorkerGone(path.to_owned())),
        };
        Ok(Netns {
            path: path.to_owned(),
            file,
            cookie,
            requests,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn cookie(&self) -> NetnsCookie {
        self.cookie
    }

    /// Creates a socket inside this namespace.
    pub async fn socket(&self, kind: SocketKind) -> io::Result<Socket> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send((kind, tx))
            .map_err(|_| io::Error::other(NetnsError::WorkerGone(self.path.clone())))?;
        rx.await
            .map_err(|_| io::Error::other(NetnsError::WorkerGone(self.path.clone())))?
    }

    /// A listening tokio socket inside this namespace.
    pub async fn listen(&self, addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
        let socket = self.socket(SocketKind::Listener(addr)).await?;
        tokio::net::TcpListener::from_std(socket.into())
    }

    /// Connects from inside this namespace, with ztunnel's mark, optionally from `bind`.
    pub async fn connect(
        &self,
        dst: SocketAddr,
        bind: Option<SocketAddr>,
    ) -> io::Result<tokio::net::TcpStream> {
        let socket = self
            .socket(SocketKind::Outgoing {
                family_of: dst,
                bind,
            })
            .await?;
        let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
        socket.connect(dst).await
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

fn worker(
    netns: OwnedFd,
    requests: mpsc::Receiver<Request>,
    ready: mpsc::Sender<io::Result<NetnsCookie>>,
) {
    // SAFETY: `netns` is an open namespace file descriptor we own; setns only changes this
    // thread's network namespace, and this thread does nothing else for its whole life.
    let rc = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        let _ = ready.send(Err(io::Error::last_os_error()));
        return;
    }
    drop(netns);
    let _ = ready.send(current_cookie());
    while let Ok((kind, reply)) = requests.recv() {
        let _ = reply.send(make_socket(kind));
    }
}

/// The cookie of the namespace this thread is in.
fn current_cookie() -> io::Result<NetnsCookie> {
    let probe = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` is a valid writable u64 and `len` holds its size.
    let rc = unsafe {
        libc::getsockopt(
            probe.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(NetnsCookie(cookie))
}

fn make_socket(kind: SocketKind) -> io::Result<Socket> {
    match kind {
        SocketKind::Listener(addr) => {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            socket.set_reuse_address(true)?;
            if addr.is_ipv6() {
                // IPv4 has its own listener; `[::]` must not take IPv4 connections too.
                socket.set_only_v6(true)?;
            }
            socket.set_nonblocking(true)?;
            socket.set_mark(ZTUNNEL_MARK)?;
            socket.bind(&addr.into())?;
            socket.listen(1024)?;
            Ok(socket)
        }
        SocketKind::Outgoing { family_of, bind } => {
            let socket = Socket::new(
                Domain::for_address(family_of),
                Type::STREAM,
                Some(Protocol::TCP),
            )?;
            socket.set_nonblocking(true)?;
            socket.set_mark(ZTUNNEL_MARK)?;
            socket.set_tcp_nodelay(true)?;
            if let Some(src) = bind {
                if !src.ip().is_loopback() {
                    // Binding to a pod address that is not local to this namespace.
                    if src.is_ipv6() {
                        socket.set_ip_transparent_v6(true)?;
                    } else {
                        socket.set_ip_transparent_v4(true)?;
                    }
                }
                if src.port() == 0 {
                    bind_address_no_port(&socket)?;
                }
                socket.bind(&src.into())?;
            }
            Ok(socket)
        }
    }
}

/// Lets `bind` to port 0 take the address only, leaving the port to `connect`, which picks
/// one free for the whole 4-tuple (`IP_BIND_ADDRESS_NO_PORT`, Linux 4.2+, also honoured by
/// IPv6 sockets). Without it, bind reserves a port of the address for this socket whatever
/// its destination, and every delivery from the one source address (127.0.0.6) then shares
/// one ephemeral range, held in TIME_WAIT for a minute after each close.
fn bind_address_no_port(socket: &Socket) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: `socket` is an open socket; `on` is a valid c_int for the length given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The cookie of the namespace the calling thread is in (ztunnel's own, usually).
pub fn own_cookie() -> io::Result<NetnsCookie> {
    current_cookie()
}
