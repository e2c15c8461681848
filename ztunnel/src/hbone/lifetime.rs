//! How long an HBONE connection may go on, the same rules for the pool and the server:
//!
//! - certificates: a connection vouches for the two identities of its handshake only while
//!   both certificates are valid. From the first expiry on it takes no new tunnel; tunnels
//!   it already carries run to their end (they were authenticated when they opened);
//! - keep-alive: a peer that leaves a PING unanswered for twice the interval is taken for
//!   gone or stalled (it stopped reading): the connection is dropped, tunnels and all.
//!
//! Timers only: what to do when one fires belongs to the client and the server.

use std::time::{Duration, SystemTime};

/// Longest wait on tokio's (monotonic) clock before the wall clock is read again.
/// Certificate validity is wall-clock time, and the two drift apart when the system clock
/// is set or the machine is suspended; rereading bounds how late an expiry can be noticed.
const WALL_CLOCK_RECHECK: Duration = Duration::from_secs(60);

/// Completes once the wall clock reaches `t` (at once if it already has).
pub(crate) async fn wall_clock_reaches(t: SystemTime) {
    while let Ok(left) = t.duration_since(SystemTime::now()) {
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(left.min(WALL_CLOCK_RECHECK)).await;
    }
}

/// Pings the peer every `interval` and completes, with the time waited, when a PING stays
/// unanswered for twice that. Pends forever when disabled or once the connection is closing
/// (the connection's own future reports that).
pub(crate) async fn keepalive(
    ping_pong: Option<h2::PingPong>,
    interval: Option<Duration>,
) -> Duration {
    let (Some(mut ping_pong), Some(interval)) = (ping_pong, interval) else {
        return std::future::pending().await;
    };
    let timeout = interval * 2;
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(_closing)) => return std::future::pending().await,
            Err(_) => return timeout,
        }
    }
}
