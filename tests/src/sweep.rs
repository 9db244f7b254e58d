//! The line's sweep: the same real-client storm through `drop` and `defer` (and `defer`
//! under a spoofed flood), at several overloads and bursts, judged against the line's
//! goals (docs/defer.md). `cargo xtask bench storm` runs the whole sweep; the
//! end-to-end test runs a short one. The storms of one point run side by side, each
//! in a testbed of its own.

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
    let mut out: Vec<StormReport> = std::thread::scope(|s| {
        let hs: Vec<_> = specs
            .iter()
            .map(|sp| s.spawn(move || storm::run(sp, |_| {})))
            .collect();
        hs.into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("a storm panicked"))?)
            .collect::<Result<Vec<_>>>()
    })?;
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
