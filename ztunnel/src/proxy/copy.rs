//! Moving bytes both ways between two streams until both directions are done, with counts.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncRead, AsyncWrite};

/// Node-wide connection counters (the metrics module reads them).
#[derive(Debug, Default)]
pub struct Stats {
    pub opened: AtomicU64,
    pub closed: AtomicU64,
    pub denied: AtomicU64,
    pub failed: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    /// Inputs rejected before any policy: bad tunnels, failed handshakes, wrong identities.
    pub rejected_inputs: AtomicU64,
}

impl Stats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub(super) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Copies `client` <-> `upstream` until both sides have closed; a half-close on one side is
/// passed on to the other (copy_bidirectional shuts down the write side on EOF).
/// Returns (bytes client -> upstream, bytes upstream -> client).
pub(super) async fn relay<A, B>(
    stats: &Stats,
    client: &mut A,
    upstream: &mut B,
) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    Stats::add(&stats.opened, 1);
    let result =
        tokio::io::copy_bidirectional_with_sizes(client, upstream, 64 * 1024, 64 * 1024).await;
    Stats::add(&stats.closed, 1);
    if let Ok((sent, received)) = result {
        Stats::add(&stats.bytes_sent, sent);
        Stats::add(&stats.bytes_received, received);
    }
    result
}

/// Ending a connection abruptly, so that a reset on one side of a relay reaches the other
/// side as a reset (not as a clean end of stream).
pub(super) trait Reset {
    fn reset(&mut self);
}

impl Reset for tokio::net::TcpStream {
    fn reset(&mut self) {
        // Closing with a zero linger sends RST instead of FIN.
        let _ = self.set_zero_linger();
    }
}

impl Reset for crate::hbone::H2Stream {
    fn reset(&mut self) {
        self.abort();
    }
}
