//! The line's sweep: the same real-client storm through `drop` and `defer` (and `defer`
//! under a spoofed flood), at several overloads and bursts, judged against the line's
//! goals (docs/defer.md). `cargo xtask bench storm` runs the whole sweep; the
//! end-to-end test runs a short one. The storms of one point run side by side, each
//! in a testbed of its own.
//!
//! Then the same storms through nftables and iptables with the same quota
//! ([`compare_point`]), with and without the flood: what operators run today.

use std::time::Duration;

use anyhow::{Result, anyhow};

use crate::{
    stacks::Stack,
    storm::{self, StormReport, StormSpec},
};

/// The per-/24 budget of every sweep storm.
pub const RATE: u32 = 6;
/// Arrivals spread over this long.
pub const SPREAD_S: u64 = 24;
/// The spoofed flood of the flood runs, SYN/s into both /24s (it must reach 20,000).
pub const FLOOD: u32 = 25_000;

/// The four client stacks, mixed.
pub fn mix() -> Vec<(Stack, u32)> {
    vec![
        (Stack::Linux, 40),
        (Stack::OldLinux, 20),
        (Stack::Windows, 20),
        (Stack::MacOs, 20),
    ]
}

/// One point of the sweep: clients over the spread against the budget, and the burst.
#[derive(Clone, Copy, Debug)]
pub struct Point {
    pub overload: f64,
    pub burst: u32,
}

/// The full sweep.
pub fn full() -> Vec<Point> {
    let mut v = Vec::new();
    for overload in [1.5, 3.0, 6.0] {
        for burst in [2, 5, 20] {
            v.push(Point { overload, burst });
        }
    }
    v
}

/// The storm of `p` under `action`, with or without the flood.
pub fn spec(p: Point, action: &'static str, flood: bool, seed: u64) -> StormSpec {
    let per_group = (p.overload * f64::from(RATE) * SPREAD_S as f64).round() as usize;
    StormSpec {
        action,
        rate: RATE,
        burst: p.burst,
        max_wait: Duration::from_secs(90),
        groups: vec![([198, 18, 11], per_group), ([198, 18, 12], per_group)],
        mix: mix(),
        spread: Duration::from_secs(SPREAD_S),
        // Every stack has sent its last SYN by then (Linux's at ~67 s).
        deadline: Duration::from_secs(SPREAD_S + 72),
        flood_per_s: if flood { FLOOD } else { 0 },
        flooded: 2,
        dashboard: false,
        seed,
    }
}

/// What one point gave.
pub struct PointResult {
    pub point: Point,
    pub drop: StormReport,
    pub defer: StormReport,
    pub defer_flood: Option<StormReport>,
}

/// Run the storms of `p` side by side: `drop`, `defer`, and `defer` under the flood.
pub fn run_point(p: Point, flood: bool, seed: u64) -> Result<PointResult> {
    let specs: Vec<StormSpec> = [("drop", false), ("defer", false), ("defer", true)]
        .into_iter()
        .filter(|&(_, f)| flood || !f)
        .map(|(a, f)| spec(p, a, f, seed))
        .collect();
    let mut out = side_by_side(&specs)?;
    let defer_flood = if flood { out.pop() } else { None };
    let defer = out.pop().ok_or_else(|| anyhow!("no defer storm"))?;
    let drop = out.pop().ok_or_else(|| anyhow!("no drop storm"))?;
    Ok(PointResult {
        point: p,
        drop,
        defer,
        defer_flood,
    })
}

/// The goals at one point; each miss says what and by how much.
pub fn misses(r: &PointResult) -> Vec<String> {
    let (dr, de) = (&r.drop, &r.defer);
    let mut m = Vec::new();
    let (cd, ce) = (dr.connected() as f64, de.connected() as f64);
    if ce < 0.99 * cd {
        m.push(format!("connected {ce} < 99% of drop's {cd}"));
    }
    if de.busy_rate() < 0.98 * dr.busy_rate() {
        m.push(format!(
            "accepted/s while waiting {:.2} < 98% of drop's {:.2}",
            de.busy_rate(),
            dr.busy_rate()
        ));
    }
    let rho = de.rho_knockers();
    let need = if r.point.overload < 2.0 {
        0.9
    } else if r.point.burst >= 20 {
        0.85
    } else {
        dr.rho_knockers() + 0.4
    };
    if rho < need {
        m.push(format!("rank corr. {rho:.2} < {need:.2}"));
    }
    for st in Stack::ALL {
        let ((a, _), (b, _)) = (de.stack(st), dr.stack(st));
        if (a as f64) < 0.95 * b as f64 {
            m.push(format!("{}: {a} < 95% of drop's {b}", st.name()));
        }
    }
    for x in [dr, de].into_iter().chain(r.defer_flood.as_ref()) {
        let most = x.max_1s();
        let cap = (x.spec.rate + x.spec.burst) as usize;
        if most > cap {
            m.push(format!("{}: {most} accepted in 1 s > {cap}", x.spec.action));
        }
    }
    if let Some(f) = &r.defer_flood {
        let rate = f.flood_sent as f64 / f.elapsed.as_secs_f64().max(1.0);
        if rate < 20_000.0 {
            m.push(format!("the flood reached only {rate:.0} SYN/s"));
        }
        if (f.connected() as f64) < 0.95 * ce {
            m.push(format!("under the flood {} < 95% of {ce}", f.connected()));
        }
    }
    m
}

/// The sweep as a Markdown table, with each point's misses.
pub fn table(results: &[PointResult]) -> String {
    let reports: Vec<StormReport> = results
        .iter()
        .flat_map(|r| {
            [r.drop.clone(), r.defer.clone()]
                .into_iter()
                .chain(r.defer_flood.clone())
        })
        .collect();
    let mut s = storm::sweep_table(&reports);
    s.push('\n');
    for r in results {
        let m = misses(r);
        s.push_str(&format!(
            "- {:.1}×, burst {}: {}\n",
            r.point.overload,
            r.point.burst,
            if m.is_empty() {
                "every goal met".to_string()
            } else {
                m.join("; ")
            }
        ));
    }
    s
}

/// One storm's figures for machines.
pub fn storm_json(r: &StormReport) -> serde_json::Value {
    let w = r.waits();
    serde_json::json!({
        "action": r.spec.action,
        "flood_per_s": r.spec.flood_per_s,
        "connected": r.connected(),
        "total": r.total(),
        "p50_wait_s": storm::quantile(&w, 0.5),
        "p99_wait_s": storm::quantile(&w, 0.99),
        "rank_corr": r.rho(),
        "rank_corr_knockers": r.rho_knockers(),
        "accepted_per_s_while_waiting": r.busy_rate(),
        "most_in_1s": r.max_1s(),
        "stacks": Stack::ALL.iter().map(|s| {
            let (c, n) = r.stack(*s);
            (s.name().to_string(), serde_json::json!({"connected": c, "clients": n}))
        }).collect::<serde_json::Map<_, _>>(),
        "counters": r.counters,
        // Per client: its /24, stack, first SYN and connect time (s since the start;
        // null: never), SYNs sent before connecting.
        "clients": r.clients.iter().map(|c| serde_json::json!([
            format!("{}.{}.{}", c.net[0], c.net[1], c.net[2]), c.stack.name(), c.started, c.connected, c.syns
        ])).collect::<Vec<_>>(),
    })
}

/// One point's figures and misses for machines.
pub fn json(r: &PointResult) -> serde_json::Value {
    serde_json::json!({
        "overload": r.point.overload,
        "burst": r.point.burst,
        "drop": storm_json(&r.drop),
        "defer": storm_json(&r.defer),
        "defer_flood": r.defer_flood.as_ref().map(storm_json),
        "misses": misses(r),
    })
}

/// The modes of the side-by-side storms: shaper's two actions and what operators run
/// today, with the same quota per /24.
pub const MODES: [&str; 4] = ["defer", "drop", "nftables", "iptables"];

/// One point's storms through every mode, without and with the spoofed flood.
pub struct Comparison {
    pub point: Point,
    /// In [`MODES`] order.
    pub calm: Vec<StormReport>,
    /// In [`MODES`] order; empty if the flood runs were not asked for.
    pub flooded: Vec<StormReport>,
}

/// Run `specs` at once, each in a testbed of its own.
fn side_by_side(specs: &[StormSpec]) -> Result<Vec<StormReport>> {
    std::thread::scope(|s| {
        let hs: Vec<_> = specs
            .iter()
            .map(|sp| s.spawn(move || storm::run(sp, |_| {})))
            .collect();
        hs.into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("a storm panicked"))?)
            .collect::<Result<Vec<_>>>()
    })
}

/// The storms of `p` through every mode: the four calm ones at once, then (with
/// `flood`) the flooded ones two at a time (four floods at once would take more CPU
/// than this machine has and slow the clients themselves).
pub fn compare_point(p: Point, flood: bool, seed: u64) -> Result<Comparison> {
    let specs = |f: bool| -> Vec<StormSpec> { MODES.iter().map(|m| spec(p, m, f, seed)).collect() };
    let calm = side_by_side(&specs(false))?;
    let mut flooded = Vec::new();
    if flood {
        for pair in specs(true).chunks(2) {
            flooded.extend(side_by_side(pair)?);
        }
    }
    Ok(Comparison {
        point: p,
        calm,
        flooded,
    })
}

/// The side-by-side goals: `defer` connects at least as many as every other mode (less
/// 1%), in arrival order (the highest rank correlation of the clients that knock more
/// than three times), never above budget, and keeps ≥ 95% of its figure under the
/// flood. Each miss says what and by how much.
pub fn compare_misses(c: &Comparison) -> Vec<String> {
    let mut m = Vec::new();
    let Some(defer) = c.calm.first() else {
        return vec!["no storms".into()];
    };
    let cd = defer.connected() as f64;
    for other in c.calm.iter().skip(1) {
        let co = other.connected() as f64;
        if cd < co * 0.99 {
            m.push(format!(
                "defer connected {cd} < {} {co} − 1%",
                other.spec.action
            ));
        }
        if defer.rho_knockers() < other.rho_knockers() {
            m.push(format!(
                "defer's rank correlation {:.2} < {}'s {:.2}",
                defer.rho_knockers(),
                other.spec.action,
                other.rho_knockers()
            ));
        }
    }
    let cap = (defer.spec.rate + defer.spec.burst) as usize;
    for r in std::iter::once(defer).chain(c.flooded.first()) {
        if r.max_1s() > cap {
            m.push(format!("defer accepted {} in 1 s > {cap}", r.max_1s()));
        }
    }
    if let Some(f) = c.flooded.first()
        && (f.connected() as f64) < 0.95 * cd
    {
        m.push(format!(
            "defer under the flood {} < 95% of {cd}",
            f.connected()
        ));
    }
    m
}

/// The side-by-side storms as a Markdown table (one row per storm), each mode's share
/// of its calm figure under the flood, and each point's misses.
pub fn compare_table(results: &[Comparison]) -> String {
    let reports: Vec<StormReport> = results
        .iter()
        .flat_map(|c| c.calm.iter().chain(&c.flooded).cloned())
        .collect();
    let mut s = storm::sweep_table(&reports);
    s.push('\n');
    for c in results {
        let kept: Vec<String> = c
            .calm
            .iter()
            .zip(&c.flooded)
            .map(|(calm, f)| {
                format!(
                    "{} {:.0}%",
                    calm.spec.action,
                    100.0 * f.connected() as f64 / calm.connected().max(1) as f64
                )
            })
            .collect();
        let misses = compare_misses(c);
        s.push_str(&format!(
            "- {:.1}×, burst {}: {}{}\n",
            c.point.overload,
            c.point.burst,
            if kept.is_empty() {
                String::new()
            } else {
                format!(
                    "connected under the flood, of the calm figure: {}; ",
                    kept.join(", ")
                )
            },
            if misses.is_empty() {
                "every goal met".to_string()
            } else {
                misses.join("; ")
            }
        ));
    }
    s
}
