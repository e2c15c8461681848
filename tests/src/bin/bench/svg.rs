//! The chart the README embeds, written by hand as SVG: one panel per question (throughput,
//! round-trip percentiles, HTTP rates), a group of bars per figure, a bar per path.

use std::fmt::Write as _;

use crate::procfs::Machine;
use crate::report::{Figures, PATHS};

const COLORS: [&str; 4] = ["#8c8c8c", "#1f6feb", "#2da44e", "#d29922"];
const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 400.0;

pub(crate) struct Panel<'a> {
    pub title: &'a str,
    /// (group label, metric key, scale applied to the median for display)
    pub groups: &'a [(&'a str, &'a str, f64)],
}

/// The L4 benchmark's chart.
pub(crate) fn chart(f: &Figures, machine: &Machine) -> String {
    let panels = [
        Panel {
            title: "Throughput, Gbit/s (higher is better)",
            groups: &[("1 stream", "tput_1", 1.0), ("8 streams", "tput_8", 1.0)],
        },
        Panel {
            title: "1 KiB round trip (ping-pong, HTTP at a fixed rate), µs (lower is better)",
            groups: &[
                ("p50", "rtt_p50", 1.0),
                ("p99", "rtt_p99", 1.0),
                ("p99.9", "rtt_p999", 1.0),
                ("p50 at rate", "rate_p50", 1.0),
                ("p99 at rate", "rate_p99", 1.0),
            ],
        },
        Panel {
            title: "HTTP/1.1, thousands/s (higher is better)",
            groups: &[
                ("new conns", "conn_rate", 1e-3),
                ("keep-alive req", "ka_rps", 1e-3),
            ],
        },
    ];
    chart_of(
        f,
        machine,
        "ztunnel L4 overhead: direct vs mesh (medians)",
        &PATHS,
        &panels,
    )
}

/// A chart of `panels` side by side, a bar per path (at most four) in each group.
pub(crate) fn chart_of(
    f: &Figures,
    machine: &Machine,
    title: &str,
    paths: &[&str],
    panels: &[Panel<'_>],
) -> String {
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        svg,
        r##"<rect width="100%" height="100%" fill="#ffffff"/>"##
    );
    let _ = writeln!(
        svg,
        r#"<text x="16" y="22" font-size="15" font-weight="bold">{}</text>"#,
        escape(title)
    );
    let _ = writeln!(
        svg,
        r##"<text x="16" y="40" fill="#555">{}, {} cores, Linux {}; every process shares the same cores</text>"##,
        escape(&machine.cpu_model),
        machine.cores,
        escape(&machine.kernel)
    );
    for (i, path) in paths.iter().enumerate().take(COLORS.len()) {
        let x = WIDTH - 95.0 * paths.len() as f64 - 15.0 + i as f64 * 95.0;
        let _ = writeln!(
            svg,
            r#"<rect x="{x}" y="12" width="12" height="12" fill="{}"/><text x="{}" y="22">{path}</text>"#,
            COLORS[i],
            x + 16.0
        );
    }
    let panel_w = (WIDTH - 32.0) / panels.len() as f64;
    for (i, panel) in panels.iter().enumerate() {
        draw_panel(
            &mut svg,
            f,
            paths,
            panel,
            16.0 + i as f64 * panel_w,
            60.0,
            panel_w - 16.0,
            HEIGHT - 80.0,
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[allow(clippy::too_many_arguments)]
fn draw_panel(
    svg: &mut String,
    f: &Figures,
    paths: &[&str],
    panel: &Panel<'_>,
    x: f64,
    y: f64,
    w: f64,
    h: f64,
) {
    let plot_top = y + 30.0;
    let plot_bottom = y + h - 24.0;
    let plot_h = plot_bottom - plot_top;
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" font-weight="bold" text-anchor="middle">{}</text>"#,
        x + w / 2.0,
        y + 12.0,
        escape(panel.title)
    );
    let values: Vec<Vec<Option<f64>>> = panel
        .groups
        .iter()
        .map(|(_, key, scale)| {
            paths
                .iter()
                .take(COLORS.len())
                .map(|p| f.median(p, key).map(|v| v * scale))
                .collect()
        })
        .collect();
    let max = values
        .iter()
        .flatten()
        .flatten()
        .copied()
        .fold(0.0_f64, f64::max);
    let max = if max > 0.0 { max * 1.15 } else { 1.0 };
    let _ = writeln!(
        svg,
        r##"<line x1="{x}" y1="{plot_bottom}" x2="{}" y2="{plot_bottom}" stroke="#333"/>"##,
        x + w
    );
    let group_w = w / panel.groups.len() as f64;
    let bar_w = (group_w - 20.0) / paths.len().min(COLORS.len()) as f64;
    for (g, ((label, _, _), vals)) in panel.groups.iter().zip(&values).enumerate() {
        let gx = x + g as f64 * group_w + 10.0;
        for (p, v) in vals.iter().enumerate() {
            let bx = gx + p as f64 * bar_w;
            let Some(v) = v else { continue };
            let bh = (v / max * plot_h).max(1.0);
            let _ = writeln!(
                svg,
                r#"<rect x="{bx:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="{}"><title>{}: {}</title></rect>"#,
                plot_bottom - bh,
                bar_w - 2.0,
                COLORS[p],
                paths[p],
                short(*v)
            );
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" font-size="9" text-anchor="middle">{}</text>"#,
                bx + bar_w / 2.0 - 1.0,
                plot_bottom - bh - 3.0,
                short(*v)
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            gx + (group_w - 20.0) / 2.0,
            plot_bottom + 16.0,
            escape(label)
        );
    }
}

fn short(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_has_a_bar_per_recorded_median() {
        let mut f = Figures::default();
        f.record("direct", "tput_1", 10.0);
        f.record("mesh", "tput_1", 4.0);
        f.record("mesh", "rtt_p50", 50.0);
        let machine = Machine {
            cpu_model: "CPU <x> & co".into(),
            cores: 2,
            kernel: "6.18".into(),
            memory_mib: 1024,
            load_average: 0.0,
        };
        let svg = chart(&f, &machine);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<title>").count(), 3);
        assert!(svg.contains("CPU &lt;x&gt; &amp; co"));
    }
}
