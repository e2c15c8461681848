//! Upgrading ztunnel under load: the new process takes the listening sockets over, the old
//! one keeps serving its established connections and exits when they end. Counted: refused
//! or reset connections (the goal, and the assertion, is zero) and leaked kernel programs.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use mesh_tests::mesh::{Mesh, PodSpec};
use mesh_tests::traffic::{AppServer, connect, echo_roundtrip};
use mesh_tests::wait_until;

#[derive(Default)]
struct Load {
    ok: AtomicU64,
    failed: AtomicU64,
    stop: AtomicBool,
}

fn exchange(conn: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    conn.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    conn.read_exact(&mut back)?;
    if back != msg {
        return Err(std::io::Error::other("echo mismatch"));
    }
    Ok(())
}

fn program_ids(log: &str) -> Vec<u32> {
    log.lines()
        .filter_map(|l| l.split("program_ids=").nth(1))
        .next_back()
        .map(|ids| {
            ids.split(',')
                .filter_map(|id| id.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn loaded(id: u32) -> bool {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .any(|p| p.id() == id)
}

#[test]
fn upgrading_both_nodes_under_load_refuses_and_resets_nothing() {
    let pods = vec![
        PodSpec::new("sleep", "node1", "sleep"),
        PodSpec::new("local", "node1", "echo"),
        PodSpec::new("echo", "node2", "echo"),
    ];
    let mut mesh = Mesh::new(&["node1", "node2"], pods, Vec::new()).unwrap();
    let remote = SocketAddr::new(mesh.ip("echo").into(), 8080);
    let local = SocketAddr::new(mesh.ip("local").into(), 8080);
    let _echo = AppServer::start(&mesh.netns("echo"), "echo", remote).unwrap();
    let _local = AppServer::start(&mesh.netns("local"), "local", local).unwrap();
    mesh.start().unwrap();
    let sleep = mesh.netns("sleep");

    // Long-lived connections, across nodes and on the same node.
    let mut long_lived: Vec<TcpStream> = [remote, remote, local]
        .into_iter()
        .map(|dst| connect(&sleep, dst).unwrap())
        .collect();
    for conn in &mut long_lived {
        exchange(conn, b"before").unwrap();
    }

    // New connections all the time, from two clients.
    let load = Arc::new(Load::default());
    let clients: Vec<_> = [remote, local]
        .into_iter()
        .map(|dst| {
            let (load, sleep) = (load.clone(), sleep.clone());
            std::thread::spawn(move || {
                while !load.stop.load(Ordering::Relaxed) {
                    match echo_roundtrip(&sleep, dst, b"ping".to_vec()) {
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
    let served = |n: u64| {
        let target = load.ok.load(Ordering::Relaxed) + n;
        wait_until(Duration::from_secs(30), || {
            load.ok.load(Ordering::Relaxed) >= target
        })
        .expect("load stalled");
    };
    served(50);

    let mut old = Vec::new();
    for node in ["node1", "node2"] {
        let previous = mesh.upgrade_ztunnel(node, 1).unwrap();
        let log = mesh.ztunnel(node).log();
        assert!(
            log.contains("took over listening sockets"),
            "{node}: no takeover:\n{log}"
        );
        served(50);
        old.push(previous);
    }

    // The old processes still serve the long-lived connections.
    for conn in &mut long_lived {
        exchange(conn, b"during").unwrap();
    }
    for proc in &mut old {
        assert!(
            proc.exited().is_none(),
            "{} left before its connections ended",
            proc.name
        );
    }
    let old_programs: Vec<u32> = old.iter().flat_map(|p| program_ids(&p.log())).collect();
    assert_eq!(old_programs.len(), 8, "program ids not logged");

    // Once those connections end, the old processes exit on their own, cleanly.
    long_lived.clear();
    for proc in &mut old {
        wait_until(Duration::from_secs(20), || proc.exited().is_some()).unwrap_or_else(|_| {
            panic!("{} did not exit after draining:\n{}", proc.name, proc.log())
        });
    }
    served(50);
    load.stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().unwrap();
    }
    let (ok, failed) = (
        load.ok.load(Ordering::Relaxed),
        load.failed.load(Ordering::Relaxed),
    );
    eprintln!("upgrade under load: {ok} connections served, {failed} refused or reset");
    assert_eq!(failed, 0, "connections refused or reset during the upgrade");
    assert!(
        !old_programs.iter().any(|id| loaded(*id)),
        "old programs still loaded"
    );
    for proc in &mut old {
        assert!(proc.log().contains("ztunnel stopped"), "{}", proc.log());
    }
}
