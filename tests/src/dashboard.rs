//! The Grafana dashboard's main panels (deploy/grafana/shaper.json), drawn from a real
//! storm: a real Prometheus scrapes the daemon every second while the storm runs, the
//! panels' PromQL is asked over the storm as range queries, and the series are drawn
//! into a PNG with the plotters crate. `cargo xtask demo` draws the `defer` storm's.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use crate::prometheus::Prometheus;

/// One panel: its title, the unit of its values, whether its scale is logarithmic, and
/// its lines.
#[derive(Clone, Debug)]
pub struct Panel {
    pub title: &'static str,
    pub unit: &'static str,
    pub log: bool,
    pub lines: Vec<Line>,
}

/// One line of a panel: its legend and its points (seconds since the storm began,
/// value).
#[derive(Clone, Debug)]
pub struct Line {
    pub legend: String,
    pub points: Vec<(f64, f64)>,
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
    let end = panels
        .iter()
        .flat_map(|p| &p.lines)
        .flat_map(|l| l.points.last())
        .map(|p| p.0)
        .fold(1.0, f64::max);
    for (panel, area) in panels.iter().zip(body.split_evenly((2, 2))) {
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
                    .x_desc("seconds since the storm began")
                    .y_desc(panel.unit)
                    .label_style(("sans-serif", 15))
                    .light_line_style(WHITE)
                    .draw()
                    .map_err(err)?;
                for (i, line) in panel.lines.iter().enumerate() {
                    let color = Palette99::pick(i).to_rgba();
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
