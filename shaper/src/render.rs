//! Human output of `shaper status`, `stats` and `top`: plain aligned tables.

use std::collections::HashMap;

use shaper::protocol::{Response, RuleStatsView, Stats, TopGroup};
use shaper_common::Outcome;

/// Align `rows` (the first is the header) in columns, numbers right-aligned.
pub fn render(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let w = widths.get(i).copied().unwrap_or(0);
                if is_number(s) {
                    format!("{s:>w$}")
                } else {
                    format!("{s:<w$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out.trim_end().to_string()
}

/// A figure to right-align: digits, with a sign or a decimal point. (Not whatever
/// parses as a float: a rule named `inf` or `nan` is a name.)
fn is_number(s: &str) -> bool {
    let digits = s.strip_prefix('-').unwrap_or(s);
    !digits.is_empty()
        && digits.chars().all(|c| c.is_ascii_digit() || c == '.')
        && digits.chars().filter(|&c| c == '.').count() <= 1
        && digits.chars().any(|c| c.is_ascii_digit())
}

pub fn status(r: &Response) -> String {
    let Response::Status(s) = r else {
        return String::new();
    };
    let mut out = format!(
        "shaper {} (pid {}), up {} s, policy generation {} (hash {}) from {}\n",
        s.version, s.pid, s.uptime_s, s.generation, s.policy_hash, s.config
    );
    if s.fleet_share != "1/1" {
        out.push_str(&format!(
            "fleet share {}: every rule's rate, burst and ceiling times {}\n",
            s.fleet_share, s.fleet_share
        ));
    }
    out.push('\n');
    let mut rows = vec![vec![
        "IFACE".into(),
        "MODE".into(),
        "PROG ID".into(),
        "LINK ID".into(),
        "ADOPTED".into(),
        "PINS".into(),
    ]];
    for i in &s.interfaces {
        rows.push(vec![
            i.iface.clone(),
            i.mode.clone(),
            i.prog_id.to_string(),
            i.link_id.to_string(),
            if i.adopted { "yes" } else { "no" }.into(),
            i.pin_dir.clone(),
        ]);
    }
    out.push_str(&render(&rows));
    out.push_str("\n\n");
    let mut maps = vec![vec![
        "IFACE".into(),
        "MAP".into(),
        "ENTRIES".into(),
        "CAPACITY".into(),
        "FILL %".into(),
    ]];
    for i in &s.interfaces {
        for m in &i.maps {
            let pct = if m.capacity == 0 {
                0.0
            } else {
                m.entries as f64 * 100.0 / m.capacity as f64
            };
            maps.push(vec![
                i.iface.clone(),
                m.name.clone(),
                m.entries.to_string(),
                m.capacity.to_string(),
                format!("{pct:.1}"),
            ]);
        }
    }
    out.push_str(&render(&maps));
    out
}

pub fn stats(r: &Response) -> String {
    let Response::Stats(s) = r else {
        return String::new();
    };
    stats_tables(s, "", |x, o| x.get(o).to_string(), |_, n| n.to_string())
}

/// Per second between two `stats` replies `secs` apart, per rule and outcome, and per
/// global reason.
pub fn stats_rates(prev: &Response, cur: &Response, secs: f64) -> String {
    let (Response::Stats(p), Response::Stats(c)) = (prev, cur) else {
        return String::new();
    };
    let secs = secs.max(1e-3);
    let rate = |now: u64, then: u64| format!("{:.1}", now.saturating_sub(then) as f64 / secs);
    let before: HashMap<&str, &RuleStatsView> =
        p.rules.iter().map(|r| (r.name.as_str(), r)).collect();
    let tables = stats_tables(
        c,
        "/S",
        |x, o| {
            let then = before.get(x.name.as_str()).map_or(0, |b| b.get(o));
            rate(x.get(o), then)
        },
        |reason, n| rate(n, p.global.get(reason).copied().unwrap_or(0)),
    );
    format!("per second over the last {secs:.1} s\n\n{tables}")
}

/// The rules table (a column per outcome) and the reasons table of `stats`, each cell
/// from `rule_cell` or `reason_cell`; `suffix` ends the figures' column headers.
fn stats_tables(
    s: &Stats,
    suffix: &str,
    rule_cell: impl Fn(&RuleStatsView, Outcome) -> String,
    reason_cell: impl Fn(&str, u64) -> String,
) -> String {
    let mut header: Vec<String> = ["RULE", "PREFIX", "ACTION"].map(String::from).to_vec();
    header.extend(
        Outcome::ALL
            .iter()
            .map(|o| format!("{}{suffix}", o.header())),
    );
    let mut rows = vec![header];
    for x in &s.rules {
        let mut row = vec![x.name.clone(), x.prefix.clone(), x.action.clone()];
        row.extend(Outcome::ALL.iter().map(|o| rule_cell(x, *o)));
        rows.push(row);
    }
    let mut out = render(&rows);
    out.push_str("\n\n");
    let mut g = vec![vec!["REASON".to_string(), format!("PACKETS{suffix}")]];
    for (k, v) in &s.global {
        g.push(vec![k.clone(), reason_cell(k, *v)]);
    }
    out.push_str(&render(&g));
    out
}

/// `top`'s column headers.
pub const TOP_HEADER: [&str; 10] = [
    "IFACE",
    "RULE",
    "GROUP",
    "ADMITTED/S",
    "DROPPED/S",
    "DEFERRED/S",
    "WAITING",
    "OLDEST WAIT",
    "BURST USED",
    "CONGESTED",
];

/// `top`'s rows: per group, its SYNs per second since `prev` (taken `dt` seconds
/// before; `-` for a group that was not there or without a previous sample), its line
/// and its budget.
pub fn top_rows(prev: Option<(&[TopGroup], f64)>, cur: &[TopGroup]) -> Vec<Vec<String>> {
    let (then, dt) = prev.unwrap_or((&[], 0.0));
    let then: HashMap<(&str, &str, &str), &TopGroup> = then
        .iter()
        .map(|o| ((o.iface.as_str(), o.rule.as_str(), o.group.as_str()), o))
        .collect();
    cur.iter()
        .map(|g| {
            let before = then
                .get(&(g.iface.as_str(), g.rule.as_str(), g.group.as_str()))
                .map(|o| (*o, dt))
                .filter(|(_, dt)| *dt > 0.0);
            let rate = |now: u32, then: fn(&TopGroup) -> u32| {
                before.map_or("-".to_string(), |(o, dt)| {
                    format!("{:.1}", f64::from(now.wrapping_sub(then(o))) / dt)
                })
            };
            vec![
                g.iface.clone(),
                g.rule.clone(),
                g.group.clone(),
                rate(g.admitted, |o| o.admitted),
                rate(g.dropped, |o| o.dropped),
                rate(g.deferred, |o| o.deferred),
                g.waiting.to_string(),
                if g.waiting == 0 {
                    "-".to_string()
                } else {
                    format!("{:.1}s", g.oldest_wait_s)
                },
                format!("{:.1}/{}", g.burst_used, g.burst),
                if g.congested { "yes" } else { "no" }.to_string(),
            ]
        })
        .collect()
}

/// `top` as plain text: rates since `prev` (see [`top_rows`]).
pub fn top(prev: Option<(&[TopGroup], f64)>, r: &Response) -> String {
    let Response::Top { groups } = r else {
        return String::new();
    };
    if groups.is_empty() {
        return "no group has attempted a new connection recently".to_string();
    }
    let mut rows = vec![TOP_HEADER.iter().map(|s| s.to_string()).collect::<Vec<_>>()];
    rows.extend(top_rows(prev, groups));
    render(&rows)
}

#[cfg(test)]
mod tests {
    use shaper::protocol::{Response, RuleStatsView, Stats};

    use super::{render, stats_rates};

    #[test]
    fn watch_shows_rates_per_second_not_totals() {
        let stats = |admitted: u64, dropped: u64, packets: u64| {
            let mut r = RuleStatsView {
                name: "pupils".into(),
                prefix: "198.18.0.0/16".into(),
                action: "drop".into(),
                ..RuleStatsView::default()
            };
            r.outcomes.insert("admitted".into(), admitted);
            r.outcomes.insert("dropped".into(), dropped);
            let mut s = Stats {
                rules: vec![r],
                ..Stats::default()
            };
            s.global.insert("not_attempt".into(), packets);
            Response::Stats(s)
        };
        let t = stats_rates(&stats(100, 10, 1000), &stats(140, 30, 1500), 2.0);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "per second over the last 2.0 s");
        assert!(
            lines[2].starts_with("RULE") && lines[2].contains("ADMITTED/S"),
            "{t}"
        );
        let row: Vec<&str> = lines[3].split_whitespace().collect();
        assert_eq!(
            &row[..5],
            ["pupils", "198.18.0.0/16", "drop", "20.0", "10.0"],
            "{t}"
        );
        assert!(
            t.lines()
                .any(|l| l.split_whitespace().eq(["not_attempt", "250.0"])),
            "{t}"
        );
    }

    fn rows(cells: &[&[&str]]) -> Vec<Vec<String>> {
        cells
            .iter()
            .map(|r| r.iter().map(|c| c.to_string()).collect())
            .collect()
    }

    #[test]
    fn names_are_left_aligned_even_when_a_float_would_parse_them() {
        let t = render(&rows(&[
            &["RULE", "ADMITTED"],
            &["inf", "7"],
            &["nan", "12"],
            &["everyone", "-3.5"],
        ]));
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[1], "inf              7");
        assert_eq!(lines[2], "nan             12");
        assert_eq!(lines[3], "everyone      -3.5");
    }
}
