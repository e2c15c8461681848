//! Socket helpers shared by every listener of the process (admin, metrics, readiness, the
//! waypoint's ports). Nothing here knows about pods or capture.

use std::net::SocketAddr;

/// A listener a successor can also bind while this process still runs (upgrade).
pub fn reusable_listener(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv6() {
        tokio::net::TcpSocket::new_v6()?
    } else {
        tokio::net::TcpSocket::new_v4()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}
