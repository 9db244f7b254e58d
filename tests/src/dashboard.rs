//! The Grafana dashboard's main panels (deploy/grafana/shaper.json), drawn from a real
//! storm: a real Prometheus scrapes the daemon every second while the storm runs, the
//! panels' PromQL is asked over the storm as range queries, and the series are drawn
//! into a PNG with the plotters crate. `cargo xtask demo` draws the `defer` storm's.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use crate::prometheus::Prometheus;

/// One panel: its title, what its x axis is, the unit of its values, whether its
/// scale is logarithmic, and its lines.
#[derive(Clone, Debug)]
pub struct Panel {
    pub title: &'static str,
    pub x: &'static str,
    pub unit: &'static str,
    pub log: bool,
    pub lines: Vec<Line>,
}

/// The x axis of panels over time.
pub const SINCE_START: &str = "seconds since the storm began";

/// One line of a panel: its legend and its points (seconds since the storm began,
/// value).
#[derive(Clone, Debug)]
pub struct Line {
    pub legend: String,
    pub points: Vec<(f64, f64)>,
    /// Its colour, where lines of several panels must match (else by its place).
    pub color: Option<RGBColor>,
}

/// The colour of an action's lines (and of the offered load and the budget).
fn action_color(action: &str) -> RGBColor {
    match action {
        "drop" => RGBColor(214, 39, 40),
        "defer" => RGBColor(31, 119, 180),
        "budget" => RGBColor(44, 160, 44),
        _ => RGBColor(90, 90, 90),
    }
}

/// What a panel shows: (legend, PromQL) per line; `{map}` in a legend is replaced by
/// the series' `map` label. The same expressions as the dashboard's panels, over all
/// rules, with a 5-s rate window (Prometheus scrapes every second here).
struct Spec {
    title: &'static str,
    unit: &'static str,
    log: bool,
    queries: &'static [(&'static str, &'static str)],
}

const PANELS: [Spec; 4] = [
    Spec {
        title: "Admitted vs limited (SYNs per second, log scale)",
        unit: "SYN/s",
        log: true,
        queries: &[
            (
                "admitted",
                r#"sum(rate(shaper_syns_total{outcome=~"admitted|admitted_after_wait"}[5s]))"#,
            ),
            (
                "deferred (the flood's SYNs too)",
                r#"sum(rate(shaper_syns_total{outcome="deferred"}[5s]))"#,
            ),
            (
                "dropped",
                r#"sum(rate(shaper_syns_total{outcome=~"dropped|queue_full"}[5s]))"#,
            ),
        ],
    },
    Spec {
        title: "Line length (clients waiting now)",
        unit: "clients",
        log: false,
        queries: &[("waiting", "sum(shaper_line_waiting)")],
    },
    Spec {
        title: "Wait in line, first SYN to admission",
        unit: "seconds",
        log: false,
        queries: &[
            (
                "p50",
                "histogram_quantile(0.5, sum by (le) (rate(shaper_wait_seconds_bucket[10s])))",
            ),
            (
                "p99",
                "histogram_quantile(0.99, sum by (le) (rate(shaper_wait_seconds_bucket[10s])))",
            ),
            ("oldest waiting now", "max(shaper_line_oldest_wait_seconds)"),
        ],
    },
    Spec {
        title: "Map pressure (entries / capacity)",
        unit: "fill ratio",
        log: false,
        queries: &[(
            "{map}",
            "max by (map) (shaper_map_entries / shaper_map_capacity)",
        )],
    },
];

/// Ask Prometheus for every panel's series from `start` to `end` (Unix seconds), each
/// second; times in the panels are seconds since `start`.
pub fn collect(prom: &Prometheus, start: f64, end: f64) -> Result<Vec<Panel>> {
    PANELS
        .iter()
        .map(|spec| {
            let mut lines = Vec::new();
            for (legend, q) in spec.queries {
                for s in prom.query_range(q, start, end, 1.0)? {
                    let map = s.labels["map"].as_str().unwrap_or_default();
                    lines.push(Line {
                        color: None,
                        legend: legend.replace("{map}", map),
                        points: s
                            .points
                            .iter()
                            .filter(|p| p.1.is_finite() && (!spec.log || p.1 > 0.0))
                            .map(|&(t, v)| (t - start, v))
                            .collect(),
                    });
                }
            }
            Ok(Panel {
                title: spec.title,
                x: SINCE_START,
                unit: spec.unit,
                log: spec.log,
                lines,
            })
        })
        .collect()
}

/// The font the picture's text is set in (Debian's fonts-dejavu-core, which `cargo
/// xtask setup` installs).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Draw `panels` two by two under `caption` (one line of text per line) into a PNG at
/// `path`.
pub fn draw(panels: &[Panel], caption: &str, path: &Path) -> Result<()> {
    let font = std::fs::read(FONT).map_err(|e| anyhow!("{FONT}: {e} (cargo xtask setup)"))?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(font.into()))
        .map_err(|_| anyhow!("{FONT} is not a font"))?;
    let err = |e: DrawingAreaErrorKind<_>| anyhow!("drawing {}: {e}", path.display());
    let root = BitMapBackend::new(path, (1600, 1000)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let lines: Vec<&str> = caption.lines().collect();
    let (top, body) = root.split_vertically(20 + 28 * lines.len() as u32);
    for (i, line) in lines.iter().enumerate() {
        top.draw(&Text::new(
            line.to_string(),
            (20, 12 + 28 * i as i32),
            ("sans-serif", 20).into_font(),
        ))
        .map_err(err)?;
    }
    for (panel, area) in panels.iter().zip(body.split_evenly((2, 2))) {
        let end = panel
            .lines
            .iter()
            .flat_map(|l| l.points.last())
            .map(|p| p.0)
            .fold(1.0, f64::max);
        let values = || {
            panel
                .lines
                .iter()
                .flat_map(|l| l.points.iter().map(|p| p.1))
        };
        let top = values().fold(0.0, f64::max).max(1e-3) * 1.15;
        let mut builder = ChartBuilder::on(&area);
        builder
            .caption(panel.title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70);
        // The same drawing on a linear or a logarithmic value axis (plotters gives the
        // two different types).
        macro_rules! plot {
            ($y:expr) => {{
                let mut chart = builder.build_cartesian_2d(0.0..end, $y).map_err(err)?;
                chart
                    .configure_mesh()
                    .x_desc(panel.x)
                    .y_desc(panel.unit)
                    .label_style(("sans-serif", 15))
                    .light_line_style(WHITE)
                    .draw()
                    .map_err(err)?;
                for (i, line) in panel.lines.iter().enumerate() {
                    let color = line
                        .color
                        .map_or_else(|| Palette99::pick(i).to_rgba(), |c| c.to_rgba());
                    chart
                        .draw_series(LineSeries::new(
                            line.points.iter().copied(),
                            color.stroke_width(2),
                        ))
                        .map_err(err)?
                        .label(line.legend.clone())
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                        });
                }
                chart
                    .configure_series_labels()
                    .label_font(("sans-serif", 15))
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .draw()
                    .map_err(err)?;
            }};
        }
        if panel.log {
            let bottom = values().fold(f64::MAX, f64::min).clamp(0.1, 1.0);
            plot!((bottom..top).log_scale());
        } else {
            plot!(0.0..top);
        }
    }
    root.present().map_err(err)?;
    Ok(())
}

/// The storm under each action side by side (`cargo xtask demo`'s chart): pupils
/// offered (first SYNs) against pupils connected per second, with the budget; pupils
/// waiting (started, not yet connected or given up); the wait-time distribution; and
/// pupils connected so far. From the clients' own records, one line per action.
pub fn compare(reports: &[crate::storm::StormReport]) -> Vec<Panel> {
    let end = reports
        .iter()
        .map(|r| r.spec.deadline.as_secs_f64())
        .fold(1.0, f64::max);
    let seconds = (0..=end.ceil() as u32).map(f64::from);
    let per_second = |times: &mut dyn Iterator<Item = f64>| -> Vec<(f64, f64)> {
        let mut n = vec![0.0; end.ceil() as usize + 1];
        for t in times {
            if let Some(slot) = n.get_mut(t.max(0.0) as usize) {
                *slot += 1.0;
            }
        }
        n.into_iter()
            .enumerate()
            .map(|(i, v)| (i as f64, v))
            .collect()
    };
    let mut offered = Vec::new();
    let mut waiting = Vec::new();
    let mut within = Vec::new();
    let mut so_far = Vec::new();
    if let Some(r) = reports.first() {
        offered.push(Line {
            color: Some(action_color("offered")),
            legend: "offered (pupils' first SYNs)".into(),
            points: per_second(&mut r.clients.iter().map(|c| c.started)),
        });
        let budget = f64::from(r.spec.rate) * r.spec.groups.len() as f64;
        offered.push(Line {
            color: Some(action_color("budget")),
            legend: format!("budget ({} /24s × {}/s)", r.spec.groups.len(), r.spec.rate),
            points: vec![(0.0, budget), (end, budget)],
        });
        so_far.push(Line {
            color: Some(action_color("pupils")),
            legend: "pupils".into(),
            points: vec![(0.0, r.clients.len() as f64), (end, r.clients.len() as f64)],
        });
    }
    for r in reports {
        let a = r.spec.action;
        offered.push(Line {
            color: Some(action_color(a)),
            legend: format!("{a}: connected"),
            points: per_second(&mut r.clients.iter().filter_map(|c| c.connected)),
        });
        waiting.push(Line {
            color: Some(action_color(a)),
            legend: format!("{a}: waiting"),
            points: seconds
                .clone()
                .map(|t| {
                    let n = r
                        .clients
                        .iter()
                        .filter(|c| c.started <= t && c.ended.is_none_or(|e| e > t))
                        .count();
                    (t, n as f64)
                })
                .collect(),
        });
        let waits = r.waits();
        let n = r.clients.len().max(1) as f64;
        within.push(Line {
            color: Some(action_color(a)),
            legend: format!("{a}: connected within"),
            points: seconds
                .clone()
                .map(|t| {
                    let k = waits.partition_point(|&w| w <= t);
                    (t, 100.0 * k as f64 / n)
                })
                .collect(),
        });
        so_far.push(Line {
            color: Some(action_color(a)),
            legend: format!("{a}: connected"),
            points: seconds
                .clone()
                .map(|t| {
                    let k = r
                        .clients
                        .iter()
                        .filter(|c| c.connected.is_some_and(|at| at <= t))
                        .count();
                    (t, k as f64)
                })
                .collect(),
        });
    }
    vec![
        Panel {
            title: "Offered vs connected (pupils per second)",
            x: SINCE_START,
            unit: "pupils/s",
            log: false,
            lines: offered,
        },
        Panel {
            title: "Pupils waiting (started, not connected, not given up)",
            x: SINCE_START,
            unit: "pupils",
            log: false,
            lines: waiting,
        },
        Panel {
            title: "Wait-time distribution (first SYN to connected)",
            x: "seconds of wait",
            unit: "% of pupils",
            log: false,
            lines: within,
        },
        Panel {
            title: "Pupils connected so far",
            x: SINCE_START,
            unit: "pupils",
            log: false,
            lines: so_far,
        },
    ]
}
