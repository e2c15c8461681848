//! A TCP echo server for load tests: `tcp-echo <addr>`, one task per connection. Run as its
//! own process (inside a pod's namespace) so the test process's file descriptors are left for
//! the clients.

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .ok_or_else(|| std::io::Error::other("usage: tcp-echo <addr>"))?;
    // Best effort: the load test reports what it could open.
    let _ = mesh_tests::sys::raise_open_files_limit();
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
