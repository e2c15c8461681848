//! `ztunnel admin ...`: the debug CLI. It reads a node's admin endpoint (run it in the node's
//! network namespace, or point `--admin` at a forwarded port) and prints tables, or JSON or
//! YAML with `-o`: what `istioctl ztunnel-config` shows, for this agent.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::Value;

/// Inspect a running ztunnel through its admin endpoint.
#[derive(Debug, Parser)]
#[command(name = "ztunnel admin")]
pub struct AdminCli {
    /// Admin endpoint of the ztunnel to inspect.
    #[arg(
        long,
        env = "ZTUNNEL_ADMIN",
        default_value = "127.0.0.1:15000",
        global = true
    )]
    pub admin: SocketAddr,

    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table, global = true)]
    pub output: Format,

    #[command(subcommand)]
    pub what: What,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Subcommand)]
pub enum What {
    /// Workloads known to this node (the whole mesh).
    Workloads,
    /// Services and their endpoints.
    Services,
    /// L4 authorization policies.
    Policies,
    /// Workload certificates held by this node.
    Certificates,
    /// Pods enrolled on this node and their capture state.
    Pods,
    /// Live connections, then the recent history with the reason each ended.
    Connections {
        /// Only the live connections.
        #[arg(long)]
        live: bool,
    },
    /// The whole configuration dump.
    All,
    /// Shows the log filter, or sets it (`debug`, `info,ztunnel::proxy=debug`).
    Log { filter: Option<String> },
}

/// Runs the CLI with `args` (the first is the program name).
pub fn main(args: impl IntoIterator<Item = String>) -> ExitCode {
    let cli = AdminCli::parse_from(args);
    match run(&cli) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ztunnel admin: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &AdminCli) -> Result<String, String> {
    if let What::Log { filter } = &cli.what {
        return match filter {
            None => get(cli.admin, "GET", "/logging"),
            Some(f) => get(cli.admin, "POST", &format!("/logging?level={}", encode(f))),
        };
    }
    let (path, key) = match &cli.what {
        What::Connections { .. } => ("/connections", None),
        What::Workloads => ("/config_dump", Some("workloads")),
        What::Services => ("/config_dump", Some("services")),
        What::Policies => ("/config_dump", Some("policies")),
        What::Certificates => ("/config_dump", Some("certificates")),
        What::Pods => ("/config_dump", Some("pods")),
        What::All | What::Log { .. } => ("/config_dump", None),
    };
    let body = get(cli.admin, "GET", path)?;
    let mut value: Value =
        serde_json::from_str(&body).map_err(|e| format!("{path} is not JSON: {e}"))?;
    if let Some(key) = key {
        value = value.get(key).cloned().unwrap_or(Value::Null);
    }
    if let What::Connections { live: true } = cli.what {
        value = serde_json::json!({ "live": value["live"].clone() });
    }
    match cli.output {
        Format::Json => Ok(format!(
            "{}\n",
            serde_json::to_string_pretty(&value).map_err(|e| e.to_string())?
        )),
        Format::Yaml => serde_saphyr::to_string(&value).map_err(|e| e.to_string()),
        Format::Table => Ok(table(&cli.what, &value)),
    }
}

/// One HTTP/1.1 request to the admin endpoint; the body of a 2xx answer, else an error.
fn get(addr: SocketAddr, method: &str, path: &str) -> Result<String, String> {
    let fail = |e: std::io::Error| format!("admin endpoint {addr}: {e}");
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(fail)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(fail)?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(fail)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).map_err(fail)?;
    let resp = String::from_utf8_lossy(&resp);
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("admin endpoint {addr}: not an HTTP answer"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("admin endpoint {addr}: no status in {head:?}"))?;
    if (200..300).contains(&status) {
        Ok(body.to_owned())
    } else {
        Err(format!("{method} {path}: {status}: {}", body.trim()))
    }
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(s).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

fn table(what: &What, v: &Value) -> String {
    let rows = |v: &Value| v.as_array().cloned().unwrap_or_default();
    match what {
        What::Workloads => render(
            &[
                "NAMESPACE",
                "NAME",
                "IP",
                "NODE",
                "PROTOCOL",
                "CAPTURED",
                "IDENTITY",
            ],
            rows(v).iter().map(|w| {
                vec![
                    s(&w["namespace"]),
                    s(&w["name"]),
                    s(&w["ips"]),
                    s(&w["node"]),
                    s(&w["protocol"]),
                    s(&w["captured"]),
                    s(&w["identity"]),
                ]
            }),
        ),
        What::Services => render(
            &["NAMESPACE", "NAME", "VIPS", "PORTS", "ENDPOINTS"],
            rows(v).iter().map(|x| {
                let ports = x["ports"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| format!("{k}->{v}"))
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_default();
                let endpoints = rows(&x["endpoints"])
                    .iter()
                    .map(|e| format!("{}@{}", s(&e["workload"]), s(&e["address"])))
                    .collect::<Vec<_>>()
                    .join(",");
                vec![
                    s(&x["namespace"]),
                    s(&x["name"]),
                    s(&x["vips"]),
                    ports,
                    endpoints,
                ]
            }),
        ),
        What::Policies => render(
            &["NAMESPACE", "NAME", "SCOPE", "ACTION", "DRY-RUN"],
            rows(v).iter().map(|p| {
                vec![
                    s(&p["namespace"]),
                    s(&p["name"]),
                    s(&p["scope"]),
                    s(&p["action"]),
                    s(&p["dry_run"]),
                ]
            }),
        ),
        What::Certificates => render(
            &[
                "IDENTITY",
                "SERIAL",
                "NOT-BEFORE",
                "NOT-AFTER",
                "EXPIRES-IN",
            ],
            rows(v).iter().map(|c| {
                vec![
                    s(&c["identity"]),
                    s(&c["serial"]),
                    s(&c["not_before"]),
                    s(&c["not_after"]),
                    format!("{}s", s(&c["expires_in_secs"])),
                ]
            }),
        ),
        What::Pods => render(
            &["NAMESPACE", "NAME", "IP", "CAPTURED", "NETNS"],
            rows(v).iter().map(|p| {
                vec![
                    s(&p["namespace"]),
                    s(&p["name"]),
                    s(&p["ips"]),
                    s(&p["capture"]["outbound"]),
                    s(&p["netns"]),
                ]
            }),
        ),
        What::Connections { .. } => {
            let mut all = rows(&v["live"]);
            all.extend(rows(&v["history"]));
            render(
                &[
                    "ID",
                    "STATE",
                    "PATH",
                    "SOURCE",
                    "DESTINATION",
                    "SRC-IDENTITY",
                    "DST-IDENTITY",
                    "SERVICE",
                    "RECV",
                    "SENT",
                    "DURATION",
                    "POLICY",
                    "REASON",
                ],
                all.iter().map(|c| {
                    let src = match c["src_workload"].as_str() {
                        Some(w) => format!("{} ({w})", s(&c["src"])),
                        None => s(&c["src"]),
                    };
                    let dst = match c["dst_workload"].as_str() {
                        Some(w) => format!("{} ({w})", s(&c["dst"])),
                        None => s(&c["dst"]),
                    };
                    vec![
                        s(&c["id"]),
                        s(&c["state"]),
                        s(&c["path"]),
                        src,
                        dst,
                        short_identity(&c["src_identity"]),
                        short_identity(&c["dst_identity"]),
                        s(&c["dst_service"]),
                        s(&c["bytes_received"]),
                        s(&c["bytes_sent"]),
                        format!("{}ms", s(&c["duration_ms"])),
                        s(&c["policy"]),
                        s(&c["reason"]),
                    ]
                }),
            )
        }
        What::All | What::Log { .. } => serde_json::to_string_pretty(v).unwrap_or_default() + "\n",
    }
}

/// `spiffe://td/ns/x/sa/y` is shown without the scheme, as policies name it.
fn short_identity(v: &Value) -> String {
    let full = s(v);
    full.strip_prefix("spiffe://")
        .map(str::to_owned)
        .unwrap_or(full)
}

fn render(header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = rows.collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push_str(&line(row));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_show_missing_values_as_dash() {
        let v = serde_json::json!([
            {"namespace": "default", "name": "deny-sleep", "scope": "Namespace", "action": "Deny", "dry_run": false},
            {"namespace": "other", "name": "x", "scope": null, "action": "Allow", "dry_run": true},
        ]);
        let out = table(&What::Policies, &v);
        assert_eq!(
            out,
            "NAMESPACE  NAME        SCOPE      ACTION  DRY-RUN\n\
             default    deny-sleep  Namespace  Deny    false\n\
             other      x           -          Allow   true\n"
        );
    }

    #[test]
    fn log_filters_are_query_encoded() {
        assert_eq!(
            encode("info,ztunnel::proxy=debug"),
            "info%2Cztunnel::proxy%3Ddebug"
        );
    }
}
