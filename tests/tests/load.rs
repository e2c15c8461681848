//! Load through one pair of ztunnels: many concurrent tunnelled connections with bounded
//! memory, and a storm of short connections, none refused. The long versions run with
//! `cargo xtask soak` (ZTUNNEL_SOAK=1): 10,000 held connections and 50,000 short ones.

use std::net::SocketAddr;
use std::time::Duration;

use mesh_tests::mesh::{Mesh, PodSpec};
use mesh_tests::netns::in_netns;
use mesh_tests::traffic::echo_roundtrip;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn soak() -> bool {
    std::env::var_os("ZTUNNEL_SOAK").is_some()
}

/// Room for the client end of every test connection in this process: the soft limit up
/// to the hard one. Returns the limit.
fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    limit.rlim_cur
}

fn rss_kib(pid: u32) -> u64 {
    mesh_tests::process::status_kib(pid, "VmRSS:")
}

/// An echo server process on `addr` inside `netns`.
fn echo_process(mesh: &Mesh, netns: &str, addr: SocketAddr) -> mesh_tests::Proc {
    let mut cmd = std::process::Command::new(mesh_tests::process::binary("tcp-echo"));
    cmd.arg(addr.to_string());
    let proc = mesh_tests::Proc::spawn("tcp-echo", netns, cmd, mesh.dir.path()).unwrap();
    proc.wait_for_log("listening", Duration::from_secs(10))
        .unwrap();
    proc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_concurrent_tunnels_with_bounded_memory() {
    let wanted: usize = if soak() { 10_000 } else { 2_000 };
    let limit = raise_fd_limit();
    let n = wanted.min(limit.saturating_sub(512) as usize);
    if n < wanted {
        eprintln!("open files limit {limit}: holding {n} connections instead of {wanted}");
    }
    let pods = vec![
        PodSpec::new("sleep", "node1", "sleep"),
        PodSpec::new("echo", "node2", "echo"),
    ];
    let mut mesh = Mesh::new(&["node1", "node2"], pods, Vec::new()).unwrap();
    let dst = SocketAddr::new(mesh.ip("echo").into(), 9000);
    let _server = echo_process(&mesh, &mesh.netns("echo"), dst);
    mesh.start().unwrap();
    let pids: Vec<u32> = ["node1", "node2"]
        .iter()
        .map(|n| mesh.ztunnel(n).pid())
        .collect();
    let idle: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();

    // Sockets made inside the client pod, connected from tokio.
    let sockets = in_netns(&mesh.netns("sleep"), move || {
        (0..n)
            .map(|_| {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                s.set_nonblocking(true)?;
                Ok(std::net::TcpStream::from(s))
            })
            .collect::<std::io::Result<Vec<_>>>()
    })
    .unwrap()
    .unwrap();
    let mut conns = Vec::with_capacity(n);
    let mut sockets = sockets.into_iter();
    loop {
        let chunk: Vec<std::net::TcpStream> = sockets.by_ref().take(500).collect();
        if chunk.is_empty() {
            break;
        }
        let attempts = chunk.into_iter().map(|s| async move {
            let mut c = tokio::net::TcpSocket::from_std_stream(s)
                .connect(dst)
                .await?;
            c.write_all(b"x").await?;
            let mut b = [0u8; 1];
            c.read_exact(&mut b).await?;
            Ok::<_, std::io::Error>(c)
        });
        for result in futures::future::join_all(attempts).await {
            conns.push(result.expect("tunnelled connection failed"));
        }
    }
    assert_eq!(conns.len(), n);

    let held: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();
    for (i, node) in ["node1", "node2"].iter().enumerate() {
        let per_conn = (held[i].saturating_sub(idle[i])) * 1024 / n as u64;
        eprintln!(
            "{node}: idle RSS {} KiB, with {n} connections {} KiB: {per_conn} bytes per connection",
            idle[i], held[i]
        );
        // Generous bound: buffers are allocated per connection, not per byte in flight.
        assert!(
            per_conn < 96 * 1024,
            "{node}: {per_conn} bytes per held connection"
        );
    }

    // Every held connection still works.
    for c in conns.iter_mut().step_by(97) {
        c.write_all(b"y").await.unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"y");
    }
}

#[test]
fn a_storm_of_short_connections_is_served_without_refusal() {
    let total: usize = if soak() { 50_000 } else { 4_000 };
    let pods = vec![
        PodSpec::new("sleep", "node1", "sleep"),
        PodSpec::new("echo", "node2", "echo"),
    ];
    let mut mesh = Mesh::new(&["node1", "node2"], pods, Vec::new()).unwrap();
    let dst = SocketAddr::new(mesh.ip("echo").into(), 8080);
    let _echo = mesh_tests::traffic::AppServer::start(&mesh.netns("echo"), "echo", dst).unwrap();
    mesh.start().unwrap();
    let threads = 4;
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let sleep = mesh.netns("sleep");
            std::thread::spawn(move || {
                let mut failed = 0usize;
                for _ in 0..total / threads {
                    match echo_roundtrip(&sleep, dst, b"s".to_vec()) {
                        Ok(got) if got == b"sbye" => {}
                        _ => failed += 1,
                    }
                }
                failed
            })
        })
        .collect();
    let failed: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
    eprintln!("storm: {total} short connections, {failed} failed");
    assert_eq!(failed, 0);
}
