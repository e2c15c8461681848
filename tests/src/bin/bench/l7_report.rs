//! The L7 benchmark's figures and outputs (issue 21): the table per path, the table of CPU
//! per request by proxy process, the memory table, the JSON file and the verdict on each
//! target. The samples live in the L4 benchmark's `Figures`; per-process CPU under keys
//! `cpu_us.<workload>.<process>`, memory by process name.

use std::path::Path;

use serde_json::{Value, json};

use crate::procfs::Machine;
use crate::report::{
    Figures, Metric, Verdict, fmt_value, median_cell, median_header, median_rows, memory_table,
    render,
};

/// The paths compared, in display order.
pub(crate) const PATHS: [&str; 4] = ["direct", "mesh", "waypoint", "nginx"];

/// Workloads whose CPU per request is recorded per process: key and what it is.
pub(crate) const CPU_WORKLOADS: [(&str, &str); 6] = [
    ("ka", "keep-alive, saturation"),
    ("r1k", "keep-alive, 1,000 req/s"),
    ("r10k", "keep-alive, 10,000 req/s"),
    ("h2c", "h2c multiplexed"),
    ("conn", "new connection per request"),
    ("upload", "1 MiB upload"),
];

/// The proxy processes, in display order; `total` is their sum on a path.
pub(crate) const PROCESSES: [&str; 5] = [
    "waypoint",
    "ztunnel node1",
    "ztunnel node2",
    "nginx",
    "total",
];

const fn m(key: &'static str, unit: &'static str, what: &'static str, higher: bool) -> Metric {
    Metric {
        key,
        unit,
        what,
        higher_is_better: higher,
    }
}

pub(crate) const METRICS: &[Metric] = &[
    m(
        "ka_rps",
        "req/s",
        "HTTP/1.1 keep-alive 1 KiB, saturation (wrk)",
        true,
    ),
    m("ka_p50", "ms", "  latency p50 at saturation", false),
    m("ka_p90", "ms", "  latency p90 at saturation", false),
    m("ka_p99", "ms", "  latency p99 at saturation", false),
    m(
        "r1k_rps",
        "req/s",
        "fixed 1,000 req/s (rate.rs, wrk2-style): achieved",
        true,
    ),
    m("r1k_p50", "us", "  latency p50", false),
    m("r1k_p90", "us", "  latency p90", false),
    m("r1k_p99", "us", "  latency p99", false),
    m("r1k_p999", "us", "  latency p99.9", false),
    m("r1k_vcpu", "vCPU", "  proxies' CPU per 1,000 req/s", false),
    m("r1k_mib", "MiB", "  proxies' RSS per 1,000 req/s", false),
    m("r10k_rps", "req/s", "fixed 10,000 req/s: achieved", true),
    m("r10k_p50", "us", "  latency p50", false),
    m("r10k_p90", "us", "  latency p90", false),
    m("r10k_p99", "us", "  latency p99", false),
    m("r10k_p999", "us", "  latency p99.9", false),
    m("r10k_vcpu", "vCPU", "  proxies' CPU per 1,000 req/s", false),
    m("r10k_mib", "MiB", "  proxies' RSS per 1,000 req/s", false),
    m("h2c_rps", "req/s", "h2c multiplexed 1 KiB (h2load)", true),
    m(
        "conn_rate",
        "conn/s",
        "new connections/s (wrk, Connection: close)",
        true,
    ),
    m("upload_rps", "req/s", "1 MiB uploads/s (h2load)", true),
    m("upload_p50", "ms", "  upload latency p50", false),
    m("upload_p99", "ms", "  upload latency p99", false),
    m(
        "cpu_us.ka.total",
        "us",
        "proxies' CPU per keep-alive request",
        false,
    ),
];

/// The key of a per-process CPU figure.
pub(crate) fn cpu_key(workload: &str, process: &str) -> String {
    format!("cpu_us.{workload}.{process}")
}

/// The main table: one row per metric, "median (worst)" per path.
pub(crate) fn table(f: &Figures, markdown: bool) -> String {
    let mut out = render(&median_rows(f, &PATHS, METRICS), markdown);
    out.push('\n');
    out.push_str(&cpu_table(f, markdown));
    out.push('\n');
    let columns = [
        ("idle_rss_mib", "idle RSS"),
        ("peak_rss_mib", "peak RSS (after the load)"),
        ("r1k_rss_mib", "RSS at 1,000 req/s"),
        ("r10k_rss_mib", "RSS at 10,000 req/s"),
        ("before_held_rss_mib", "before holding"),
        ("held_1k_rss_mib", "1,000 open conns"),
        ("held_10k_rss_mib", "10,000 open conns"),
        ("per_1k_held_mib", "per 1,000 open"),
    ];
    out.push_str(&memory_table(
        f,
        "memory (MiB)",
        &columns,
        PROCESSES,
        markdown,
    ));
    out
}

/// CPU µs per request of each proxy process, per workload; a row only for the processes a
/// path has.
fn cpu_table(f: &Figures, markdown: bool) -> String {
    let mut rows = vec![median_header("CPU per request, by process", &PATHS)];
    for (workload, what) in CPU_WORKLOADS {
        for process in PROCESSES {
            let key = cpu_key(workload, process);
            if PATHS.iter().all(|p| f.samples(p, &key).is_empty()) {
                continue;
            }
            let mut row = vec![format!("{what}: {process}"), "us".to_owned()];
            row.extend(PATHS.iter().map(|p| median_cell(f.samples(p, &key), false)));
            rows.push(row);
        }
    }
    render(&rows, markdown)
}

/// MB (10^6 bytes, as the targets are written) in MiB.
fn mb(mb: f64) -> f64 {
    mb * 1e6 / f64::from(1u32 << 20)
}

/// The targets of issue 21 from the medians of this run; `criterion_ns` is the median of
/// the route-match micro-benchmark over 1,000 routes, when it has been run.
pub(crate) fn verdicts(f: &Figures, criterion_ns: Option<f64>) -> Vec<Verdict> {
    let v = |target: String, measured, limit, unit, at_least| Verdict {
        target,
        measured,
        limit,
        unit,
        at_least,
    };
    let wp = |key: &str| f.memory.get("waypoint").and_then(|m| m.get(key).copied());
    let waypoint_cpu = f.median("waypoint", &cpu_key("ka", "waypoint"));
    let nginx_cpu = f.median("nginx", &cpu_key("ka", "nginx"));
    let added = |key: &str| Some(f.median("waypoint", key)? - f.median("mesh", key)?);
    vec![
        v(
            format!(
                "waypoint CPU per keep-alive request <= nginx's (waypoint {} us, nginx {} us)",
                fmt_value(waypoint_cpu),
                fmt_value(nginx_cpu)
            ),
            waypoint_cpu.zip(nginx_cpu).map(|(w, n)| w / n),
            1.0,
            "x",
            false,
        ),
        v(
            "waypoint idle RSS <= 15 MB".into(),
            wp("idle_rss_mib"),
            mb(15.0),
            "MiB",
            false,
        ),
        v(
            "waypoint RSS at saturation (peak) <= 20 MB".into(),
            wp("peak_rss_mib"),
            mb(20.0),
            "MiB",
            false,
        ),
        v(
            "waypoint RSS <= 10 MB more per 1,000 open connections".into(),
            wp("per_1k_held_mib"),
            mb(10.0),
            "MiB",
            false,
        ),
        v(
            "at 1,000 req/s: waypoint + both ztunnels <= 0.125 vCPU".into(),
            f.median("waypoint", "r1k_vcpu"),
            0.125,
            "vCPU",
            false,
        ),
        v(
            "at 1,000 req/s: waypoint + both ztunnels <= 30 MB".into(),
            f.median("waypoint", "r1k_mib"),
            mb(30.0),
            "MiB",
            false,
        ),
        v(
            "at 1,000 req/s: waypoint hop adds <= 100 us at p50 (over the L4 mesh)".into(),
            added("r1k_p50"),
            100.0,
            "us",
            false,
        ),
        v(
            "at 1,000 req/s: waypoint hop adds <= 250 us at p99 (over the L4 mesh)".into(),
            added("r1k_p99"),
            250.0,
            "us",
            false,
        ),
        v(
            "route match over 1,000 routes <= 1 us median (criterion, match the last)".into(),
            criterion_ns.map(|ns| ns / 1000.0),
            1.0,
            "us",
            false,
        ),
    ]
}

/// The criterion benchmark whose median the route-match target is judged by.
pub(crate) const CRITERION_ROUTE_BENCH: &str = "VirtualService 1,000 prefix routes: match the last";

/// The median, in ns, of criterion benchmark `id` as `cargo bench` last saved it under
/// `criterion_dir` (`<dir>/<sanitised id>/new/{benchmark,estimates}.json`).
pub(crate) fn criterion_median_ns(criterion_dir: &Path, id: &str) -> Option<f64> {
    for entry in std::fs::read_dir(criterion_dir).ok()?.flatten() {
        let new = entry.path().join("new");
        let Ok(bench) = std::fs::read_to_string(new.join("benchmark.json")) else {
            continue;
        };
        let bench: Value = serde_json::from_str(&bench).ok()?;
        if bench["full_id"].as_str() != Some(id) {
            continue;
        }
        let estimates = std::fs::read_to_string(new.join("estimates.json")).ok()?;
        let estimates: Value = serde_json::from_str(&estimates).ok()?;
        return estimates["median"]["point_estimate"].as_f64();
    }
    None
}

/// Everything, for `results.json`.
pub(crate) fn json(f: &Figures, machine: &Machine, settings: Value, verdicts: &[Verdict]) -> Value {
    let mut paths = serde_json::Map::new();
    for path in PATHS {
        let mut metrics = serde_json::Map::new();
        let cpu_keys = CPU_WORKLOADS.iter().flat_map(|(w, _)| {
            PROCESSES
                .iter()
                .map(move |p| (cpu_key(w, p), "us", "CPU per request"))
        });
        let keys = METRICS
            .iter()
            .map(|m| (m.key.to_owned(), m.unit, m.what))
            .chain(cpu_keys);
        for (key, unit, what) in keys {
            let samples = f.samples(path, &key);
            if samples.is_empty() {
                continue;
            }
            metrics.insert(
                key.clone(),
                json!({
                    "what": what.trim(),
                    "unit": unit,
                    "runs": samples,
                    "min": f.min(path, &key),
                    "median": f.median(path, &key),
                }),
            );
        }
        paths.insert(path.to_owned(), Value::Object(metrics));
    }
    let targets: Vec<Value> = verdicts
        .iter()
        .map(|v| {
            json!({
                "target": v.target,
                "measured": v.measured,
                "unit": v.unit,
                "limit": v.limit,
                "met": v.met(),
            })
        })
        .collect();
    json!({
        "benchmark": "L7 (issue 21)",
        "machine": {
            "cpu_model": machine.cpu_model,
            "cores": machine.cores,
            "kernel": machine.kernel,
            "memory_mib": machine.memory_mib,
            "load_average_at_start": machine.load_average,
        },
        "settings": settings,
        "paths": paths,
        "memory_mib": f.memory,
        "targets": targets,
        "warnings": f.warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_take_ratios_and_differences_from_medians() {
        let mut f = Figures::default();
        for (w, n) in [(30.0, 15.0), (40.0, 20.0), (20.0, 10.0)] {
            f.record("waypoint", &cpu_key("ka", "waypoint"), w);
            f.record("nginx", &cpu_key("ka", "nginx"), n);
        }
        f.record("mesh", "r1k_p50", 200.0);
        f.record("waypoint", "r1k_p50", 280.0);
        f.memory
            .entry("waypoint".into())
            .or_default()
            .insert("idle_rss_mib".into(), 16.0);
        let all = verdicts(&f, Some(800.0));
        let find = |s: &str| all.iter().find(|v| v.target.contains(s)).unwrap();
        let cpu = find("CPU per keep-alive");
        assert_eq!(cpu.measured, Some(2.0));
        assert_eq!(cpu.met(), Some(false));
        assert!(cpu.target.contains("waypoint 30.0 us, nginx 15.0 us"));
        assert_eq!(find("adds <= 100 us").measured, Some(80.0));
        assert_eq!(find("adds <= 100 us").met(), Some(true));
        // 15 MB is 14.3 MiB.
        assert_eq!(find("idle RSS").met(), Some(false));
        assert_eq!(find("route match").measured, Some(0.8));
        assert_eq!(find("per 1,000 open").met(), None);
    }

    #[test]
    fn tables_show_only_what_was_measured() {
        let mut f = Figures::default();
        f.record("waypoint", &cpu_key("ka", "waypoint"), 25.0);
        f.record("direct", "ka_rps", 40_000.0);
        let t = table(&f, true);
        assert!(t.contains("keep-alive, saturation: waypoint"));
        assert!(!t.contains("saturation: nginx"));
        assert!(t.contains("| 40000 (40000)"));
    }

    #[test]
    fn criterion_results_are_found_by_id() {
        let dir = tempfile::tempdir().unwrap();
        let new = dir
            .path()
            .join("VirtualService 1,000 prefix routes_ match the last/new");
        std::fs::create_dir_all(&new).unwrap();
        std::fs::write(
            new.join("benchmark.json"),
            format!(r#"{{"full_id":"{CRITERION_ROUTE_BENCH}"}}"#),
        )
        .unwrap();
        std::fs::write(
            new.join("estimates.json"),
            r#"{"median":{"point_estimate":412.5}}"#,
        )
        .unwrap();
        assert_eq!(
            criterion_median_ns(dir.path(), CRITERION_ROUTE_BENCH),
            Some(412.5)
        );
        assert_eq!(criterion_median_ns(dir.path(), "other"), None);
    }
}
