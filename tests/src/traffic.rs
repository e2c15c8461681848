//! Test applications: a server that answers HTTP or echoes raw bytes, and clients, each
//! with its sockets inside a pod's namespace.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::netns::in_netns;
use crate::wait_until;

/// A server in a pod: for HTTP requests it answers `200` with a body naming the server and
/// the peer it saw; anything else is echoed back until the client half-closes, after which
/// it sends `bye` and closes. Every accepted peer address is recorded.
#[derive(Debug)]
pub struct AppServer {
    pub addr: SocketAddr,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
}

impl AppServer {
    pub fn start(netns: &str, name: &str, addr: SocketAddr) -> io::Result<AppServer> {
        let listener = in_netns(netns, move || TcpListener::bind(addr))??;
        let peers = Arc::new(Mutex::new(Vec::new()));
        let name = name.to_owned();
        let seen = peers.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { break };
                if let Ok(peer) = conn.peer_addr() {
                    seen.lock().map(|mut p| p.push(peer)).ok();
                }
                let name = name.clone();
                std::thread::spawn(move || serve(conn, &name));
            }
        });
        Ok(AppServer { addr, peers })
    }

    /// Peer addresses of the connections accepted so far.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().map(|p| p.clone()).unwrap_or_default()
    }
}

fn serve(mut conn: TcpStream, name: &str) {
    let peer = conn.peer_addr().map(|p| p.to_string()).unwrap_or_default();
    let mut buf = vec![0u8; 64 * 1024];
    let Ok(n) = conn.read(&mut buf) else { return };
    if n == 0 {
        let _ = conn.write_all(b"bye");
        return;
    }
    let head = &buf[..n];
    if head.starts_with(b"GET ") || head.starts_with(b"POST ") || head.starts_with(b"HEAD ") {
        let body = format!("hello from {name}; peer {peer}\n");
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = conn.write_all(resp.as_bytes());
        return;
    }
    if conn.write_all(head).is_err() {
        return;
    }
    loop {
        match conn.read(&mut buf) {
            Ok(0) => {
                let _ = conn.write_all(b"bye");
                let _ = conn.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// Connects from inside `netns` to `dst`.
pub fn connect(netns: &str, dst: SocketAddr) -> io::Result<TcpStream> {
    let stream = in_netns(netns, move || {
        TcpStream::connect_timeout(&dst, Duration::from_secs(10))
    })??;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(stream)
}

/// Sends `data` through an echo connection, half-closes, and returns everything read back
/// (the echo followed by the server's `bye`). Writing and reading run concurrently so large
/// payloads do not deadlock on full buffers.
pub fn echo_roundtrip(netns: &str, dst: SocketAddr, data: Vec<u8>) -> io::Result<Vec<u8>> {
    let stream = connect(netns, dst)?;
    let mut writer = stream.try_clone()?;
    let sender = std::thread::spawn(move || -> io::Result<()> {
        writer.write_all(&data)?;
        writer.shutdown(Shutdown::Write)
    });
    let mut received = Vec::new();
    let mut reader = stream;
    reader.read_to_end(&mut received)?;
    sender
        .join()
        .map_err(|_| io::Error::other("writer panicked"))??;
    Ok(received)
}

/// Connects from `netns` to `dst` and reads without sending anything first, as the client
/// of a protocol where the server speaks first (SMTP, MySQL) does. Returns what the first
/// read got: bytes, nothing (a clean end of stream), or the error. Such a client tells a
/// reset from a clean close; one that has sent bytes the other side never read is reset by
/// the kernel either way.
pub fn first_read(netns: &str, dst: SocketAddr) -> io::Result<Vec<u8>> {
    let mut stream = connect(netns, dst)?;
    let mut buf = vec![0u8; 1024];
    let n = stream.read(&mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

/// Whether `got` is a reset (ECONNRESET): how a connection ztunnel refused (denied by
/// policy, no route, no certificate) ends for the application, as opposed to a clean end
/// of stream or a timeout. With [`echo_roundtrip`], whichever of the writes or the read
/// hears of the reset first reports it.
pub fn is_reset<T>(got: &io::Result<T>) -> bool {
    matches!(got, Err(e) if e.kind() == io::ErrorKind::ConnectionReset)
}

/// A deterministic, non-repeating-looking payload of `len` bytes.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// `curl` from inside a pod; returns (exit code, stdout).
pub fn curl(netns: &str, url: &str) -> io::Result<(i32, String)> {
    let out = crate::netns::exec(netns, "curl", &["-sS", "--max-time", "10", "-o", "-", url])?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// Sends `msg` on an open connection to an echo server and reads it back; a different answer
/// is an error.
pub fn echo_exchange(conn: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    conn.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    conn.read_exact(&mut back)?;
    if back != msg {
        return Err(io::Error::other("echo mismatch"));
    }
    Ok(())
}

/// Load for upgrade tests: new connections all the time, each an echo exchange, counted as
/// served or failed (refused, reset, or a wrong answer).
#[derive(Debug, Default)]
pub struct Load {
    ok: AtomicU64,
    failed: AtomicU64,
    stop: AtomicBool,
}

impl Load {
    /// New connections all the time from `client`, one thread per destination.
    pub fn start(client: &str, dsts: &[SocketAddr]) -> (Arc<Load>, Vec<JoinHandle<()>>) {
        let load = Arc::new(Load::default());
        let threads = dsts
            .iter()
            .map(|&dst| {
                let (load, client) = (load.clone(), client.to_owned());
                std::thread::spawn(move || {
                    while !load.stop.load(Ordering::Relaxed) {
                        match echo_roundtrip(&client, dst, b"ping".to_vec()) {
                            Ok(got) if got == b"pingbye" => load.ok.fetch_add(1, Ordering::Relaxed),
                            other => {
                                eprintln!("connection to {dst} failed: {other:?}");
                                load.failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                })
            })
            .collect();
        (load, threads)
    }

    /// Waits until `n` more connections have been served.
    pub fn served(&self, n: u64) {
        let target = self.ok.load(Ordering::Relaxed) + n;
        wait_until(Duration::from_secs(30), || {
            self.ok.load(Ordering::Relaxed) >= target
        })
        .expect("load stalled");
    }

    /// Stops the clients; (served, failed).
    pub fn finish(&self, threads: Vec<JoinHandle<()>>) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}
