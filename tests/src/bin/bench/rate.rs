//! The constant-rate HTTP/1.1 client of the L7 benchmark, wrk2-style: requests are scheduled
//! evenly (request `n` of the run at `start + n / rate`, spread round-robin over keep-alive
//! connections), and each latency is measured from the time the request was *due*, not from
//! when it could be sent, so a stalled response counts against every request queued behind it
//! (no coordinated omission). One thread per connection, with a 1 ns timer slack so that the
//! schedule holds to a few microseconds; h2load's `--rps` fires all its clients on the same
//! tick, which measures bursts, not a rate.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use mesh_tests::netns::in_netns;

use crate::h2load::{Percentiles, percentiles_of};

/// What a constant-rate run did.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Rated {
    pub requests_per_s: f64,
    pub requests: f64,
    /// Answers other than 200, and failed connections' requests.
    pub errors: f64,
    /// From each request's due time, in microseconds.
    pub latency: Option<Percentiles>,
}

/// Sends `request` to `dst` from `netns` at `rate` per second over `connections` keep-alive
/// connections for `time`.
pub(crate) fn run(
    netns: &str,
    dst: SocketAddr,
    request: &str,
    rate: f64,
    connections: usize,
    time: Duration,
) -> io::Result<Rated> {
    let conns = in_netns(netns, move || -> io::Result<Vec<TcpStream>> {
        (0..connections)
            .map(|_| TcpStream::connect_timeout(&dst, Duration::from_secs(10)))
            .collect()
    })??;
    drive(conns, request, rate, time)
}

/// The run itself, on connections already open.
fn drive(mut conns: Vec<TcpStream>, request: &str, rate: f64, time: Duration) -> io::Result<Rated> {
    // One request on each first: connections (and tunnels) are set up before the clock runs.
    for conn in &mut conns {
        conn.set_nodelay(true)?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        conn.write_all(request.as_bytes())?;
        read_response(conn)?;
    }
    let start = Instant::now() + Duration::from_millis(20);
    let total = (rate * time.as_secs_f64()).round() as u64;
    let n = conns.len() as u64;
    let threads: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut conn)| {
            let request = request.to_owned();
            std::thread::spawn(move || {
                set_timer_slack();
                let mut latencies = Vec::new();
                let mut errors = 0u64;
                let mut last = start;
                let mut k = i as u64;
                while k < total {
                    let due = start + Duration::from_secs_f64(k as f64 / rate);
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    let answer = conn
                        .write_all(request.as_bytes())
                        .and_then(|()| read_response(&mut conn));
                    last = Instant::now();
                    match answer {
                        Ok(200) => latencies.push((last - due).as_secs_f64() * 1e6),
                        Ok(_) => errors += 1,
                        Err(_) => {
                            // The connection is gone: its remaining requests all fail.
                            errors += (total - k).div_ceil(n);
                            break;
                        }
                    }
                    k += n;
                }
                (latencies, errors, last)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    let mut end = start;
    for t in threads {
        let (l, e, last) = t
            .join()
            .map_err(|_| io::Error::other("a rate client thread panicked"))?;
        all.extend(l);
        errors += e;
        end = end.max(last);
    }
    let seconds = (end - start).as_secs_f64();
    let requests = all.len() as f64;
    Ok(Rated {
        requests_per_s: if seconds > 0.0 {
            requests / seconds
        } else {
            0.0
        },
        requests,
        errors: errors as f64,
        latency: percentiles_of(all),
    })
}

/// Wake-ups within a nanosecond of the due time, rather than Linux's default 50 µs slack.
fn set_timer_slack() {
    mesh_tests::sys::precise_timer_slack();
}

/// Reads one HTTP/1.1 response with a `content-length` body; returns its status.
pub(crate) fn read_response(conn: &mut impl Read) -> io::Result<u16> {
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((status, len, head)) = parse_head(&buf)
            && buf.len() >= head + len
        {
            return Ok(status);
        }
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::other(format!(
                "connection closed after {} bytes of a response",
                buf.len()
            )));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Status, content length and head length of a response head, once it is complete.
fn parse_head(buf: &[u8]) -> Option<(u16, usize, usize)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    Some((status, len, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_read_to_the_end_of_their_body() {
        let mut r: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(read_response(&mut r).unwrap(), 200);
        let mut short: &[u8] = b"HTTP/1.1 404 Not Found\r\ncontent-length: 9\r\n\r\nnot";
        assert!(read_response(&mut short).is_err());
        assert_eq!(parse_head(b"HTTP/1.1 404 x\r\n\r\n"), Some((404, 0, 18)));
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\n"), None);
    }

    #[test]
    fn a_local_server_is_paced_at_the_rate() {
        use std::net::TcpListener;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut conn = conn;
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0
                            || conn
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                                .is_err()
                        {
                            break;
                        }
                    }
                });
            }
        });
        let conns = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let request = "GET / HTTP/1.1\r\nhost: x\r\n\r\n";
        let out = drive(conns, request, 200.0, Duration::from_millis(500)).unwrap();
        assert_eq!(out.errors, 0.0);
        // 200/s for 0.5 s, after one set-up request per connection.
        assert_eq!(out.requests, 100.0);
        // Paced: 100 requests take about half a second, not a burst.
        assert!(out.requests_per_s < 220.0, "{out:?}");
        assert!(out.latency.is_some());
    }
}
