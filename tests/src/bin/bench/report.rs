//! The figures of a benchmark run, and their three outputs: the terminal table (also written
//! as Markdown for the README), the JSON file, and the verdict on each target of issues 13
//! and 23.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::procfs::Machine;

/// The paths compared, in display order.
pub(crate) const PATHS: [&str; 3] = ["direct", "mesh", "same-node"];

/// A measured quantity: key, unit, what it is, and whether more is better.
pub(crate) struct Metric {
    pub key: &'static str,
    pub unit: &'static str,
    pub what: &'static str,
    pub higher_is_better: bool,
}

pub(crate) const METRICS: &[Metric] = &[
    m("tput_1", "Gbit/s", "throughput, iperf3 1 stream", true),
    m("tput_8", "Gbit/s", "throughput, iperf3 8 streams", true),
    m("rtt_p50", "us", "1 KiB round trip p50 (sockperf)", false),
    m("rtt_p99", "us", "1 KiB round trip p99", false),
    m("rtt_p999", "us", "1 KiB round trip p99.9", false),
    m(
        "rate_p50",
        "us",
        "HTTP 1 KiB round trip at a fixed rate, p50",
        false,
    ),
    m(
        "rate_p99",
        "us",
        "HTTP round trip at a fixed rate, p99",
        false,
    ),
    m(
        "rate_p999",
        "us",
        "HTTP round trip at a fixed rate, p99.9",
        false,
    ),
    m(
        "conn_rate",
        "conn/s",
        "new connections/s (wrk, Connection: close)",
        true,
    ),
    m("ka_rps", "req/s", "keep-alive 1 KiB requests/s (wrk)", true),
    m("ka_p50", "ms", "keep-alive latency p50", false),
    m("ka_p99", "ms", "keep-alive latency p99", false),
    m(
        "cpu_per_gb_1",
        "s/GB",
        "ztunnel CPU per GB, 1 stream",
        false,
    ),
    m(
        "cpu_per_gb_8",
        "s/GB",
        "ztunnel CPU per GB, 8 streams",
        false,
    ),
    m(
        "endpoints_cpu_per_gb_1",
        "s/GB",
        "iperf3 client + server CPU per GB, 1 stream",
        false,
    ),
    m(
        "cpu_per_1k_req",
        "s",
        "ztunnel CPU per 1,000 keep-alive requests",
        false,
    ),
    m(
        "cpu_per_1k_conn",
        "s",
        "ztunnel CPU per 1,000 new connections",
        false,
    ),
    m(
        "cpu_per_1k_rt",
        "s",
        "ztunnel CPU per 1,000 ping-pong round trips",
        false,
    ),
];

/// Kernel events of the ztunnels (both nodes added in the main table; each node in
/// [`events_table`]), per round trip or per MB moved.
pub(crate) const EVENTS: &[Metric] = &[
    m(
        "sys_per_rt",
        "1",
        "ztunnels' system calls per round trip, ping-pong",
        false,
    ),
    m(
        "cs_per_rt",
        "1",
        "ztunnels' wake-ups (voluntary switches) per round trip, ping-pong",
        false,
    ),
    m(
        "inv_per_rt",
        "1",
        "ztunnels' preemptions (involuntary switches) per round trip, ping-pong",
        false,
    ),
    m(
        "sys_per_rt_rate",
        "1",
        "ztunnels' system calls per round trip, fixed rate",
        false,
    ),
    m(
        "cs_per_rt_rate",
        "1",
        "ztunnels' wake-ups per round trip, fixed rate",
        false,
    ),
    m(
        "inv_per_rt_rate",
        "1",
        "ztunnels' preemptions per round trip, fixed rate",
        false,
    ),
    m(
        "sys_per_mb_1",
        "1",
        "ztunnels' system calls per MB, 1 stream",
        false,
    ),
    m(
        "cs_per_mb_1",
        "1",
        "ztunnels' wake-ups per MB, 1 stream",
        false,
    ),
    m(
        "inv_per_mb_1",
        "1",
        "ztunnels' preemptions per MB, 1 stream",
        false,
    ),
    m(
        "sys_per_mb_8",
        "1",
        "ztunnels' system calls per MB, 8 streams",
        false,
    ),
    m(
        "cs_per_mb_8",
        "1",
        "ztunnels' wake-ups per MB, 8 streams",
        false,
    ),
    m(
        "inv_per_mb_8",
        "1",
        "ztunnels' preemptions per MB, 8 streams",
        false,
    ),
];

/// perf's own context-switch counts (wake-ups and preemptions together), in the JSON only:
/// a check of the `/proc` figures.
pub(crate) const PERF_SWITCHES: &[Metric] = &[
    m(
        "perfcs_per_rt",
        "1",
        "perf context-switches per round trip, ping-pong",
        false,
    ),
    m(
        "perfcs_per_rt_rate",
        "1",
        "perf context-switches per round trip, fixed rate",
        false,
    ),
    m(
        "perfcs_per_mb_1",
        "1",
        "perf context-switches per MB, 1 stream",
        false,
    ),
    m(
        "perfcs_per_mb_8",
        "1",
        "perf context-switches per MB, 8 streams",
        false,
    ),
];

/// Every figure of the main table: [`METRICS`], then the events of both ztunnels together.
fn all_metrics() -> impl Iterator<Item = &'static Metric> {
    METRICS.iter().chain(EVENTS)
}

const fn m(key: &'static str, unit: &'static str, what: &'static str, higher: bool) -> Metric {
    Metric {
        key,
        unit,
        what,
        higher_is_better: higher,
    }
}

/// Every sample of every figure, by path and metric; memory figures by ztunnel.
#[derive(Default)]
pub(crate) struct Figures {
    samples: BTreeMap<(String, String), Vec<f64>>,
    /// `<node>` -> figure name -> MiB.
    pub memory: BTreeMap<String, BTreeMap<String, f64>>,
    /// Per-ztunnel CPU samples: (path, metric, node) -> samples.
    pub by_node: BTreeMap<(String, String, String), Vec<f64>>,
    /// Anything that went wrong but did not stop the run (errors reported by a tool).
    pub warnings: Vec<String>,
}

impl Figures {
    pub(crate) fn record(&mut self, path: &str, metric: &str, value: f64) {
        self.samples
            .entry((path.to_owned(), metric.to_owned()))
            .or_default()
            .push(value);
    }

    pub(crate) fn samples(&self, path: &str, metric: &str) -> &[f64] {
        self.samples
            .get(&(path.to_owned(), metric.to_owned()))
            .map_or(&[], Vec::as_slice)
    }

    pub(crate) fn median(&self, path: &str, metric: &str) -> Option<f64> {
        median(self.samples(path, metric))
    }

    pub(crate) fn min(&self, path: &str, metric: &str) -> Option<f64> {
        self.samples(path, metric).iter().copied().reduce(f64::min)
    }
}

/// The worst sample: the lowest of a higher-is-better figure, else the highest. Printed as
/// "min" for throughputs, where it is the minimum the issue asks for.
pub(crate) fn worst(samples: &[f64], higher_is_better: bool) -> Option<f64> {
    let fold = if higher_is_better { f64::min } else { f64::max };
    samples.iter().copied().reduce(fold)
}

pub(crate) fn median(samples: &[f64]) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let mid = s.len() / 2;
    Some(if s.len() % 2 == 1 {
        s[mid]
    } else {
        (s[mid - 1] + s[mid]) / 2.0
    })
}

/// One target of the issue and how this run did against it.
pub(crate) struct Verdict {
    pub target: String,
    pub measured: Option<f64>,
    pub limit: f64,
    /// `x` for a ratio to direct, else the unit.
    pub unit: &'static str,
    pub at_least: bool,
}

impl Verdict {
    pub(crate) fn met(&self) -> Option<bool> {
        let m = self.measured?;
        Some(if self.at_least {
            m >= self.limit
        } else {
            m <= self.limit
        })
    }
}

/// The targets of issue 23 (round trips, bulk) and those of issue 13 it leaves as they
/// were (keep-alive CPU, memory), from the medians of this run.
pub(crate) fn verdicts(f: &Figures) -> Vec<Verdict> {
    let ratio = |path: &str, metric: &str| -> Option<f64> {
        Some(f.median(path, metric)? / f.median("direct", metric)?)
    };
    let added = |path: &str, metric: &str| -> Option<f64> {
        Some(f.median(path, metric)? - f.median("direct", metric)?)
    };
    let v = |target: String, measured, limit, unit, at_least| Verdict {
        target,
        measured,
        limit,
        unit,
        at_least,
    };
    let mut out = Vec::new();
    for path in ["mesh", "same-node"] {
        out.push(v(
            format!("{path}: throughput 1 stream >= 0.5x direct"),
            ratio(path, "tput_1"),
            0.5,
            "x",
            true,
        ));
        out.push(v(
            format!("{path}: throughput 8 streams >= 0.4x direct"),
            ratio(path, "tput_8"),
            0.4,
            "x",
            true,
        ));
        out.push(v(
            format!("{path}: round trip p50 added <= 10 us"),
            added(path, "rtt_p50"),
            10.0,
            "us",
            false,
        ));
        out.push(v(
            format!("{path}: round trip p99 added <= 40 us"),
            added(path, "rtt_p99"),
            40.0,
            "us",
            false,
        ));
        out.push(v(
            format!("{path}: ztunnel CPU <= 0.06 s per 1,000 round trips"),
            f.median(path, "cpu_per_1k_rt"),
            0.06,
            "s",
            false,
        ));
        out.push(v(
            format!("{path}: new connections/s >= 0.3x direct"),
            ratio(path, "conn_rate"),
            0.3,
            "x",
            true,
        ));
        out.push(v(
            format!("{path}: keep-alive requests/s >= 0.5x direct"),
            ratio(path, "ka_rps"),
            0.5,
            "x",
            true,
        ));
        let per_gb = match (
            f.median(path, "cpu_per_gb_1"),
            f.median(path, "cpu_per_gb_8"),
        ) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        out.push(v(
            format!("{path}: ztunnel CPU <= 1.2 s per GB (worse of 1 and 8 streams)"),
            per_gb,
            1.2,
            "s",
            false,
        ));
        out.push(v(
            format!("{path}: ztunnel CPU <= 0.035 s per 1,000 keep-alive requests"),
            f.median(path, "cpu_per_1k_req"),
            0.035,
            "s",
            false,
        ));
    }
    // The targets are in MB (10^6 bytes); the figures in MiB.
    let ten_mb_in_mib = 10e6 / f64::from(1u32 << 20);
    let worst = |key: &str| -> Option<f64> {
        f.memory
            .values()
            .filter_map(|m| m.get(key).copied())
            .reduce(f64::max)
    };
    out.push(v(
        "ztunnel idle RSS <= 10 MB (worst node)".into(),
        worst("idle_rss_mib"),
        ten_mb_in_mib,
        "MiB",
        false,
    ));
    out.push(v(
        "ztunnel RSS <= 10 MB more per 1,000 held connections (worst node)".into(),
        worst("per_1k_held_mib"),
        ten_mb_in_mib,
        "MiB",
        false,
    ));
    out
}

pub(crate) fn fmt_value(v: Option<f64>) -> String {
    match v {
        None => "-".to_owned(),
        Some(v) if v.abs() >= 1000.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.1}"),
        Some(v) if v.abs() >= 0.1 => format!("{v:.2}"),
        Some(v) => format!("{v:.4}"),
    }
}

/// The header of a "median (worst)" table: `first`, the unit, then a column per path.
pub(crate) fn median_header(first: &str, paths: &[&str]) -> Vec<String> {
    let mut h = vec![first.to_owned(), "unit".to_owned()];
    h.extend(paths.iter().map(|p| format!("{p} median (worst)")));
    h
}

/// "median (worst)" of `samples`; `-` when there are none.
pub(crate) fn median_cell(samples: &[f64], higher_is_better: bool) -> String {
    match median(samples) {
        None => "-".to_owned(),
        med => format!(
            "{} ({})",
            fmt_value(med),
            fmt_value(worst(samples, higher_is_better))
        ),
    }
}

/// One row per metric: what it is, its unit, "median (worst)" per path.
pub(crate) fn median_rows<'m>(
    f: &Figures,
    paths: &[&str],
    metrics: impl IntoIterator<Item = &'m Metric>,
) -> Vec<Vec<String>> {
    let mut rows = vec![median_header("figure", paths)];
    for metric in metrics {
        let mut row = vec![metric.what.to_owned(), metric.unit.to_owned()];
        row.extend(
            paths
                .iter()
                .map(|p| median_cell(f.samples(p, metric.key), metric.higher_is_better)),
        );
        rows.push(row);
    }
    rows
}

/// Memory figures by process (in `order`, those that have any): a column per
/// (figure key, title).
pub(crate) fn memory_table<'a>(
    f: &Figures,
    first: &str,
    columns: &[(&str, &str)],
    order: impl IntoIterator<Item = &'a str>,
    markdown: bool,
) -> String {
    let mut head = vec![first.to_owned()];
    head.extend(columns.iter().map(|(_, t)| (*t).to_owned()));
    let mut rows = vec![head];
    for process in order {
        let Some(m) = f.memory.get(process) else {
            continue;
        };
        let mut row = vec![process.to_owned()];
        row.extend(columns.iter().map(|(k, _)| fmt_value(m.get(*k).copied())));
        rows.push(row);
    }
    render(&rows, markdown)
}

/// The figures as a table: one row per metric, "median (worst)" per path. `markdown`
/// writes pipes for the README.
pub(crate) fn table(f: &Figures, markdown: bool) -> String {
    let mut out = render(&median_rows(f, &PATHS, all_metrics()), markdown);
    out.push('\n');
    let columns = [
        ("idle_rss_mib", "idle RSS"),
        ("idle_anon_mib", "idle private"),
        ("idle_file_mib", "idle file pages"),
        ("peak_rss_mib", "peak RSS (under load)"),
        ("held_1k_rss_mib", "RSS, 1,000 held"),
        ("held_10k_rss_mib", "RSS, 10,000 held"),
        ("before_held_rss_mib", "before holding"),
        ("per_1k_held_mib", "per 1,000 held"),
    ];
    let nodes = f.memory.keys().map(String::as_str);
    out.push_str(&memory_table(
        f,
        "ztunnel memory (MiB)",
        &columns,
        nodes,
        markdown,
    ));
    out
}

/// Each ztunnel's system calls and context switches (medians), a row per meshed path and
/// node: where a round trip's or a megabyte's wake-ups happen.
pub(crate) fn events_table(f: &Figures, markdown: bool) -> String {
    // Preemptions depend on the machine's other load: the main table and the JSON have them.
    let shown: Vec<&Metric> = EVENTS
        .iter()
        .filter(|m| !m.key.starts_with("inv_"))
        .collect();
    let header = [
        "ztunnel events (median)",
        "syscalls/RT ping-pong",
        "wake-ups/RT ping-pong",
        "syscalls/RT at rate",
        "wake-ups/RT at rate",
        "syscalls/MB 1 stream",
        "wake-ups/MB 1 stream",
        "syscalls/MB 8 streams",
        "wake-ups/MB 8 streams",
    ];
    let mut rows = vec![header.map(str::to_owned).to_vec()];
    let nodes: std::collections::BTreeSet<&str> =
        f.by_node.keys().map(|(_, _, n)| n.as_str()).collect();
    for path in PATHS.iter().filter(|p| **p != "direct") {
        for node in &nodes {
            let mut row = vec![format!("{path}, {node}")];
            for m in &shown {
                let key = ((*path).to_owned(), m.key.to_owned(), (*node).to_owned());
                row.push(fmt_value(f.by_node.get(&key).and_then(|s| median(s))));
            }
            if row[1..].iter().any(|c| c != "-") {
                rows.push(row);
            }
        }
    }
    if rows.len() == 1 {
        return String::new();
    }
    render(&rows, markdown)
}

pub(crate) fn verdict_lines(verdicts: &[Verdict]) -> String {
    let mut out = String::new();
    for v in verdicts {
        let status = match v.met() {
            Some(true) => "met    ",
            Some(false) => "NOT MET",
            None => "no data",
        };
        let _ = writeln!(
            out,
            "  {status}  {:<80} measured {} {}",
            v.target,
            fmt_value(v.measured),
            v.unit
        );
    }
    out
}

pub(crate) fn render(rows: &[Vec<String>], markdown: bool) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(s, w)| format!("{s:<w$}"))
            .collect();
        if markdown {
            let _ = writeln!(out, "| {} |", cells.join(" | "));
            if i == 0 {
                let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
                let _ = writeln!(out, "|-{}-|", rule.join("-|-"));
            }
        } else {
            let _ = writeln!(out, "  {}", cells.join("  "));
            if i == 0 {
                let total = widths.iter().sum::<usize>() + 2 * widths.len().saturating_sub(1);
                let _ = writeln!(out, "  {}", "-".repeat(total));
            }
        }
    }
    out
}

/// Everything, for `results.json`.
pub(crate) fn json(f: &Figures, machine: &Machine, settings: Value, verdicts: &[Verdict]) -> Value {
    let mut paths = serde_json::Map::new();
    for path in PATHS {
        let mut metrics = serde_json::Map::new();
        for metric in all_metrics().chain(PERF_SWITCHES) {
            let samples = f.samples(path, metric.key);
            if samples.is_empty() {
                continue;
            }
            let by_node: serde_json::Map<String, Value> = f
                .by_node
                .iter()
                .filter(|((p, m, _), _)| p == path && m == metric.key)
                .map(|((_, _, node), s)| (node.clone(), json!({ "runs": s, "median": median(s) })))
                .collect();
            let mut entry = json!({
                "what": metric.what,
                "unit": metric.unit,
                "runs": samples,
                "min": f.min(path, metric.key),
                "median": f.median(path, metric.key),
            });
            if !by_node.is_empty() {
                entry["by_ztunnel"] = Value::Object(by_node);
            }
            metrics.insert(metric.key.to_owned(), entry);
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
        "machine": {
            "cpu_model": machine.cpu_model,
            "cores": machine.cores,
            "kernel": machine.kernel,
            "memory_mib": machine.memory_mib,
            "load_average_at_start": machine.load_average,
        },
        "settings": settings,
        "paths": paths,
        "ztunnel_memory_mib": f.memory,
        "targets": targets,
        "warnings": f.warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn verdicts_compare_medians_with_direct() {
        let mut f = Figures::default();
        for v in [10.0, 9.0, 11.0] {
            f.record("direct", "tput_1", v);
        }
        for v in [4.0, 6.0, 5.0] {
            f.record("mesh", "tput_1", v);
        }
        f.record("direct", "rtt_p50", 20.0);
        f.record("mesh", "rtt_p50", 60.0);
        let all = verdicts(&f);
        let find = |name: &str| all.iter().find(|v| v.target.starts_with(name)).unwrap();
        let tput = find("mesh: throughput 1 stream");
        assert_eq!(tput.measured, Some(0.5));
        assert_eq!(tput.met(), Some(true));
        let rtt = find("mesh: round trip p50");
        assert_eq!(rtt.measured, Some(40.0));
        assert_eq!(rtt.met(), Some(false));
        assert_eq!(find("same-node: throughput 1").met(), None);
    }

    #[test]
    fn events_table_has_a_row_per_meshed_path_and_node() {
        let mut f = Figures::default();
        assert_eq!(events_table(&f, false), "");
        for (node, v) in [("node1", 6.0), ("node2", 5.0)] {
            f.by_node
                .entry(("mesh".into(), "sys_per_rt".into(), node.into()))
                .or_default()
                .extend([v, v + 2.0, v + 1.0]);
        }
        let table = events_table(&f, true);
        let rows: Vec<&str> = table.lines().collect();
        assert_eq!(rows.len(), 4, "{table}");
        let cells =
            |row: &str| -> Vec<String> { row.split('|').map(|c| c.trim().to_owned()).collect() };
        assert_eq!(
            cells(rows[2])[1..4],
            ["mesh, node1", "7.00", "-"],
            "{table}"
        );
        assert_eq!(
            cells(rows[3])[1..4],
            ["mesh, node2", "6.00", "-"],
            "{table}"
        );
        assert!(!table.contains("same-node"), "{table}");
    }

    #[test]
    fn worst_depends_on_direction() {
        let mut f = Figures::default();
        for v in [1.0, 3.0, 2.0] {
            f.record("mesh", "tput_1", v);
            f.record("mesh", "rtt_p50", v);
        }
        let worst_of = |m: &Metric| worst(f.samples("mesh", m.key), m.higher_is_better);
        assert_eq!(worst_of(&METRICS[0]), Some(1.0));
        assert_eq!(worst_of(&METRICS[2]), Some(3.0));
        assert_eq!(
            median_cell(f.samples("mesh", "tput_1"), true),
            "2.00 (1.00)"
        );
        assert_eq!(median_cell(&[], true), "-");
    }
}
