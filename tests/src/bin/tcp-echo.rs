//! A TCP echo server for load tests: `tcp-echo <addr>`, one task per connection. Run as its
//! own process (inside a pod's namespace) so the test process's file descriptors are left for
//! the clients.

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .ok_or_else(|| std::io::Error::other("usage: tcp-echo <addr>"))?;
    let limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let mut limit = limit;
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on {addr}");
    loop {
        let (mut conn, _) = listener.accept().await?;
        tokio::spawn(async move {
            let (mut r, mut w) = conn.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}
