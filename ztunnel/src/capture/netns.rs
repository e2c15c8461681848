//! Network namespaces of pods: opening them, naming them by cookie, and creating sockets
//! inside them.
//!
//! A socket belongs to the namespace that was current when it was created, and stays there
//! whatever thread uses it later. So each pod namespace gets one small worker thread that
//! enters the namespace once (`setns`) and creates sockets on request; tokio then drives the
//! sockets from its own threads. This is the only file that switches namespaces.

use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
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
    /// A delivery to the application at `dst` from `src`, which need not be an address of
    /// this namespace (a client's own address), with a port the kernel picks at connect.
    /// `avoid_port` is a port the kernel must not pick: the client's, when its own
    /// connection to `dst` already lives in this namespace (steered plaintext), where a
    /// delivery from the same address and port would be the same 4-tuple.
    Delivery {
        dst: SocketAddr,
        src: IpAddr,
        avoid_port: Option<u16>,
    },
}

/// Work for a namespace's worker thread: run there, in the pod's namespace.
type Request = Box<dyn FnOnce() + Send>;

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
            .send(Box::new(move || {
                let _ = tx.send(make_socket(kind));
            }))
            .map_err(|_| io::Error::other(NetnsError::WorkerGone(self.path.clone())))?;
        rx.await
            .map_err(|_| io::Error::other(NetnsError::WorkerGone(self.path.clone())))?
    }

    /// Runs `job` inside this namespace (on its worker thread) and waits for its result.
    /// Blocks the calling thread: for short configuration work, not for the data path.
    pub fn run_blocking<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, NetnsError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.requests
            .send(Box::new(move || {
                let _ = tx.send(job());
            }))
            .map_err(|_| NetnsError::WorkerGone(self.path.clone()))?;
        rx.recv()
            .map_err(|_| NetnsError::WorkerGone(self.path.clone()))
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

    /// Connects to the application at `dst` from `src` (see [`SocketKind::Delivery`]).
    pub async fn deliver(
        &self,
        dst: SocketAddr,
        src: IpAddr,
        avoid_port: Option<u16>,
    ) -> io::Result<tokio::net::TcpStream> {
        let socket = self
            .socket(SocketKind::Delivery {
                dst,
                src,
                avoid_port,
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
    while let Ok(job) = requests.recv() {
        job();
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
            &raw mut len,
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
            let socket = outgoing(family_of)?;
            if let Some(src) = bind {
                bind_source(&socket, src, None)?;
            }
            Ok(socket)
        }
        SocketKind::Delivery {
            dst,
            src,
            avoid_port,
        } => {
            let socket = outgoing(dst)?;
            bind_source(&socket, SocketAddr::new(src, 0), avoid_port)?;
            Ok(socket)
        }
    }
}

/// A TCP socket of ztunnel's for connecting out: marked so the capture programs leave it
/// alone.
fn outgoing(family_of: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(family_of),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_nonblocking(true)?;
    socket.set_mark(ZTUNNEL_MARK)?;
    socket.set_tcp_nodelay(true)?;
    Ok(socket)
}

/// Binds an outgoing socket to its source address before it connects. An address that is
/// not local to the namespace (a client's, or another pod's) takes a transparent bind. With
/// port 0 the port is picked at connect, for the whole 4-tuple
/// (`IP_BIND_ADDRESS_NO_PORT`): a bind alone would reserve a port of the address whatever
/// the destination. `avoid_port` keeps that pick off one port (see
/// [`SocketKind::Delivery`]).
fn bind_source(socket: &Socket, src: SocketAddr, avoid_port: Option<u16>) -> io::Result<()> {
    if !src.ip().is_loopback() {
        if src.is_ipv6() {
            socket.set_ip_transparent_v6(true)?;
        } else {
            socket.set_ip_transparent_v4(true)?;
        }
    }
    if src.port() == 0 {
        // The address only: `connect` picks a port free for the whole 4-tuple
        // (`IP_BIND_ADDRESS_NO_PORT`, also honoured by IPv6 sockets). Without it bind reserves
        // a port of the address whatever the destination, held in TIME_WAIT after each close.
        set_int_option(socket, libc::SOL_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)?;
        if let Some(port) = avoid_port {
            let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")?;
            if let Some((low, high)) = range_without(port, parse_port_range(&range)?) {
                let packed = u32::from(low) | (u32::from(high) << 16);
                set_int_option(
                    socket,
                    libc::SOL_IP,
                    IP_LOCAL_PORT_RANGE,
                    packed as libc::c_int,
                )?;
            }
        }
    }
    socket.bind(&src.into())
}

/// `IP_LOCAL_PORT_RANGE` (include/uapi/linux/in.h), Linux 6.3+: the ephemeral ports one
/// socket may take, a subrange of the namespace's `ip_local_port_range`.
const IP_LOCAL_PORT_RANGE: libc::c_int = 51;

fn set_int_option(
    socket: &Socket,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` is a valid c_int for the duration of the call and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The namespace's ephemeral port range, as `ip_local_port_range` reads ("32768\t60999").
fn parse_port_range(text: &str) -> io::Result<(u16, u16)> {
    let mut ports = text.split_whitespace().map(str::parse::<u16>);
    match (ports.next(), ports.next()) {
        (Some(Ok(low)), Some(Ok(high))) if low <= high => Ok((low, high)),
        _ => Err(io::Error::other(format!(
            "ip_local_port_range: unexpected {text:?}"
        ))),
    }
}

/// The larger part of `range` on either side of `port`, as a per-socket port range; `None`
/// when `port` is outside `range` (no pick can hit it) or when nothing else is left.
///
/// The kernel takes a per-socket bound only if it lies inside the namespace's range, so
/// each bound here does.
fn range_without(port: u16, (low, high): (u16, u16)) -> Option<(u16, u16)> {
    if port < low || port > high {
        return None;
    }
    let below = (port > low).then(|| (low, port - 1));
    let above = (port < high).then(|| (port + 1, high));
    match (below, above) {
        (Some(b), Some(a)) => Some(if b.1 - b.0 >= a.1 - a.0 { b } else { a }),
        (one, other) => one.or(other),
    }
}

/// The cookie of the namespace the calling thread is in (ztunnel's own, usually).
pub fn own_cookie() -> io::Result<NetnsCookie> {
    current_cookie()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_port_is_kept_out_of_the_range() {
        let range = (32768, 60999);
        assert_eq!(range_without(40000, range), Some((40001, 60999)));
        assert_eq!(range_without(50000, range), Some((32768, 49999)));
        assert_eq!(range_without(32768, range), Some((32769, 60999)));
        assert_eq!(range_without(60999, range), Some((32768, 60998)));
        // Outside the range: nothing to avoid.
        assert_eq!(range_without(8080, range), None);
        assert_eq!(range_without(61000, range), None);
        // A one-port range that is the client's port leaves nothing.
        assert_eq!(range_without(5000, (5000, 5000)), None);
    }

    #[test]
    fn port_ranges_parse_as_the_kernel_writes_them() {
        assert_eq!(parse_port_range("32768\t60999\n").unwrap(), (32768, 60999));
        assert!(parse_port_range("60999 32768").is_err());
        assert!(parse_port_range("").is_err());
        assert!(parse_port_range("1 x").is_err());
    }
}
