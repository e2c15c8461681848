//! What an operator sees of a node's ztunnel: its metrics, admin endpoint and debug CLI,
//! read from inside the node's namespace as a node-local tool would.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use crate::mesh::{Mesh, http_get};
use crate::netns::{enter_before_exec, in_netns};
use crate::process::binary;

pub const ADMIN: &str = "127.0.0.1:15000";
pub const METRICS: &str = "127.0.0.1:15020";

fn node_ns(mesh: &Mesh, node: &str) -> String {
    mesh.topo.node(node).netns.clone()
}

/// The Prometheus text of `node`'s ztunnel.
pub fn scrape(mesh: &Mesh, node: &str) -> String {
    let (status, body) = http_get(
        &node_ns(mesh, node),
        METRICS.parse().unwrap(),
        "/stats/prometheus",
    )
    .unwrap_or_else(|e| panic!("scrape {node}: {e}"));
    assert_eq!(status, 200, "scrape {node}: {body}");
    body
}

/// The sum of the samples of `name` whose labels include every `(label, value)` of `want`.
pub fn sample(metrics: &str, name: &str, want: &[(&str, &str)]) -> u64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(r) => r.rsplit_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            let has = |k: &str, v: &str| labels.contains(&format!("{k}=\"{v}\""));
            want.iter()
                .all(|(k, v)| has(k, v))
                .then(|| value.trim().parse::<f64>().ok())
                .flatten()
        })
        .map(|v| v as u64)
        .sum()
}

/// GET on `node`'s admin endpoint, as JSON.
pub fn admin_json(mesh: &Mesh, node: &str, path: &str) -> serde_json::Value {
    let (status, body) = http_get(&node_ns(mesh, node), ADMIN.parse().unwrap(), path)
        .unwrap_or_else(|e| panic!("admin {node}{path}: {e}"));
    assert_eq!(status, 200, "admin {node}{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("admin {node}{path}: {e}: {body}"))
}

/// A request with any method from inside `node`'s namespace: (status, body).
pub fn admin_request(
    mesh: &Mesh,
    node: &str,
    method: &str,
    path: &str,
) -> io::Result<(u16, String)> {
    let addr: SocketAddr = ADMIN.parse().unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    in_netns(
        &node_ns(mesh, node),
        move || -> io::Result<(u16, String)> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(request.as_bytes())?;
            let mut resp = String::new();
            s.read_to_string(&mut resp)?;
            let status = resp
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| io::Error::other(format!("not an HTTP response: {resp:?}")))?;
            let body = resp.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
            Ok((status, body))
        },
    )?
}

/// `ztunnel admin <args>` run in `node`'s namespace: (success, stdout + stderr).
pub fn cli(mesh: &Mesh, node: &str, args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(binary("ztunnel"));
    cmd.arg("admin").args(args);
    enter_before_exec(&mut cmd, &node_ns(mesh, node)).unwrap();
    let out = cmd.output().unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// The connections (live, then history) of `node` that satisfy `pred`.
pub fn connections(
    mesh: &Mesh,
    node: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Vec<serde_json::Value> {
    let all = admin_json(mesh, node, "/connections");
    ["live", "history"]
        .iter()
        .flat_map(|k| all[*k].as_array().cloned().unwrap_or_default())
        .filter(|c| pred(c))
        .collect()
}
