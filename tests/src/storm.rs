//! An 8 a.m. storm, end to end: a LAN testbed (two client namespaces, one with the
//! default SYN retransmission schedule, one with `tcp_syn_linear_timeouts = 0` as older
//! Linux), the real daemon on the server's veth, crowds of real kernel TCP clients from
//! some /24s, and optionally a spoofed flood into one of them. Shared by the end-to-end
//! tests and `cargo xtask demo`.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow};

use crate::{
    crowd::{Arrival, Attempt, Crowd},
    flood::{Flood, FloodSpec},
    netns::Daemon,
    tcp::Server,
    testbed::{PORT, SERVER_DEV, SERVER_V4, Testbed},
};

/// One storm.
#[derive(Clone, Debug)]
pub struct StormSpec {
    /// `drop` or `defer`.
    pub action: &'static str,
    pub rate: u32,
    pub burst: u32,
    /// The /24s (first three bytes) and how many clients each.
    pub groups: Vec<([u8; 3], usize)>,
    /// Arrivals are spread uniformly over this long.
    pub spread: Duration,
    /// Clients still waiting this long after the start are given up on.
    pub deadline: Duration,
    /// Spoofed SYNs per second into the first group (0: none).
    pub flood_per_s: u32,
    pub seed: u64,
}

/// What one group saw.
#[derive(Clone, Debug)]
pub struct GroupReport {
    pub net: [u8; 3],
    pub clients: usize,
    pub connected: usize,
    /// Connect times (first SYN → established), seconds, sorted.
    pub waits: Vec<f64>,
    /// Spearman rank correlation between first-SYN time and connect time.
    pub rho: f64,
    /// Connections the server accepted from the group, per second since the start.
    pub accepted_per_s: Vec<usize>,
    /// Most the server accepted from the group in any 1-s window.
    pub max_1s: usize,
}

/// What a storm did.
#[derive(Clone, Debug)]
pub struct StormReport {
    pub spec: StormSpec,
    pub groups: Vec<GroupReport>,
    pub flood_sent: u64,
    /// The daemon's last per-rule counter line (its log).
    pub counters: String,
    pub elapsed: Duration,
}

impl GroupReport {
    pub fn wait_quantile(&self, q: f64) -> f64 {
        quantile(&self.waits, q)
    }
}

/// Addresses the clients of a group use: 20 hosts in each client namespace.
fn hosts(net: [u8; 3], ns: usize) -> Vec<IpAddr> {
    let base = if ns == 0 { 10 } else { 130 };
    (0..20)
        .map(|i| IpAddr::V4(Ipv4Addr::new(net[0], net[1], net[2], base + i)))
        .collect()
}

fn policy(spec: &StormSpec) -> String {
    format!(
        r#"[[rule]]
name = "pupils"
prefix = "198.18.0.0/16"
group = 24
rate = {}
burst = {}
action = "{}"
"#,
        spec.rate, spec.burst, spec.action
    )
}

/// The view once a second while a storm runs.
#[derive(Clone, Debug, Default)]
pub struct Live {
    /// Seconds since the start.
    pub sec: u64,
    pub connected: usize,
    pub clients: usize,
    pub flood_sent: u64,
    /// The daemon's latest per-rule counters (`name=value`, from its log).
    pub counters: Vec<(String, u64)>,
}

/// The `key=value` counters of a daemon log line.
pub fn parse_counters(line: &str) -> Vec<(String, u64)> {
    line.split_whitespace()
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// One counter of a parsed line (0 if absent).
pub fn counter(counters: &[(String, u64)], name: &str) -> u64 {
    counters
        .iter()
        .find(|(k, _)| k == name)
        .map_or(0, |(_, v)| *v)
}

fn last_rule_line(daemon: &Daemon) -> String {
    daemon
        .log_text()
        .lines()
        .rev()
        .find(|l| l.contains("rule=pupils"))
        .map(str::to_string)
        .unwrap_or_default()
}

/// Run one storm; `tick` is called about once a second.
pub fn run(spec: &StormSpec, mut tick: impl FnMut(&Live)) -> Result<StormReport> {
    let sets: Vec<Vec<IpAddr>> = (0..2)
        .map(|ns| {
            spec.groups
                .iter()
                .flat_map(|(net, _)| hosts(*net, ns))
                .collect()
        })
        .collect();
    let set_refs: Vec<&[IpAddr]> = sets.iter().map(Vec::as_slice).collect();
    let bed = Testbed::lan(&set_refs)?;
    let old = bed
        .more
        .first()
        .ok_or_else(|| anyhow!("the LAN has one client namespace"))?;
    old.sysctl("net.ipv4.tcp_syn_linear_timeouts", "0")?;
    let mut daemon = Daemon::start(
        &bed.srv,
        SERVER_DEV,
        &policy(spec),
        &["--stats-interval", "1"],
    )?;
    let dst = Testbed::dst_for(IpAddr::V4(SERVER_V4.parse()?));
    let server = Server::start(&bed.srv, &[dst])?;

    // Arrivals: uniform over the spread, alternating between the two namespaces.
    let mut rng = spec.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut per_ns: Vec<Vec<Arrival>> = vec![Vec::new(), Vec::new()];
    for (net, n) in &spec.groups {
        for i in 0..*n {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let at = Duration::from_nanos(rng % spec.spread.as_nanos().max(1) as u64);
            let ns = i % 2;
            let h = hosts(*net, ns);
            let src = h[i / 2 % h.len()];
            per_ns[ns].push(Arrival { at, src });
        }
    }
    let t0 = Instant::now() + Duration::from_millis(200);
    let deadline = t0 + spec.deadline;
    let flood = match (spec.flood_per_s, spec.groups.first()) {
        (0, _) | (_, None) => None,
        (pps, Some((net, _))) => Some(Flood::start(
            &bed.cli,
            "c0",
            FloodSpec {
                net: *net,
                dst: SERVER_V4.parse()?,
                dport: PORT,
                dst_mac: bed.server_mac()?,
                per_second: pps,
                max: spec.deadline + Duration::from_secs(5),
            },
        )?),
    };
    let crowds: Vec<Crowd> = bed
        .clients()
        .into_iter()
        .zip(per_ns)
        .map(|(ns, arrivals)| Crowd::start(ns, arrivals, dst, t0, deadline))
        .collect();
    let mut shown = 0;
    while crowds.iter().any(|c| !c.is_finished()) {
        std::thread::sleep(Duration::from_millis(100));
        let sec = t0.elapsed().as_secs();
        if sec > shown {
            shown = sec;
            tick(&Live {
                sec,
                connected: crowds.iter().map(Crowd::connected).sum(),
                clients: spec.groups.iter().map(|g| g.1).sum(),
                flood_sent: flood.as_ref().map_or(0, Flood::sent),
                counters: parse_counters(&last_rule_line(&daemon)),
            });
        }
    }
    let elapsed = t0.elapsed();
    let attempts: Vec<Attempt> = crowds
        .into_iter()
        .map(Crowd::finish)
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect();
    let flood_sent = match flood {
        Some(f) => f.finish()?,
        None => 0,
    };
    // One more counter line after the storm, then stop the daemon.
    std::thread::sleep(Duration::from_millis(1100));
    daemon.stop()?;
    let counters = last_rule_line(&daemon);
    let accepted = server.accepted();
    let groups = spec
        .groups
        .iter()
        .map(|(net, n)| {
            let mine = |ip: IpAddr| matches!(ip, IpAddr::V4(a) if a.octets()[..3] == net[..]);
            let ours: Vec<&Attempt> = attempts.iter().filter(|a| mine(a.src)).collect();
            let ok: Vec<&&Attempt> = ours.iter().filter(|a| a.connected.is_some()).collect();
            let mut waits: Vec<f64> = ok
                .iter()
                .filter_map(|a| a.connected.map(|c| (c - a.started).as_secs_f64()))
                .collect();
            waits.sort_by(f64::total_cmp);
            let xs: Vec<f64> = ok
                .iter()
                .map(|a| a.started.duration_since(t0).as_secs_f64())
                .collect();
            let ys: Vec<f64> = ok
                .iter()
                .filter_map(|a| a.connected.map(|c| c.duration_since(t0).as_secs_f64()))
                .collect();
            let times: Vec<f64> = accepted
                .iter()
                .filter(|x| mine(x.peer.ip()))
                .map(|x| x.at.saturating_duration_since(t0).as_secs_f64())
                .collect();
            GroupReport {
                net: *net,
                clients: *n,
                connected: ok.len(),
                waits,
                rho: spearman(&xs, &ys),
                accepted_per_s: per_second(&times),
                max_1s: max_in_window(&times, 1.0),
            }
        })
        .collect();
    Ok(StormReport {
        spec: spec.clone(),
        groups,
        flood_sent,
        counters,
        elapsed,
    })
}

/// The value at quantile `q` of sorted `v` (NaN if empty).
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i.min(v.len() - 1)]
}

pub use shaper_common::fairness::spearman;

/// Counts per whole second.
pub fn per_second(times: &[f64]) -> Vec<usize> {
    let last = times.iter().fold(0.0f64, |m, &t| m.max(t));
    let mut v = vec![0; last as usize + 1];
    for &t in times {
        if let Some(c) = v.get_mut(t as usize) {
            *c += 1;
        }
    }
    v
}

/// Most events in any window of `w` seconds.
pub fn max_in_window(times: &[f64], w: f64) -> usize {
    let mut t = times.to_vec();
    t.sort_by(f64::total_cmp);
    let (mut best, mut lo) = (0, 0);
    for hi in 0..t.len() {
        while t[hi] - t[lo] >= w {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

/// A plain side-by-side table of storms (one row per storm and group).
pub fn table(reports: &[StormReport]) -> String {
    let mut s = String::from(
        "| action | flood SYN/s | group | connected | p50 wait | p99 wait | max wait | rank corr. | most accepted in 1 s (budget) |\n|---|---:|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in reports {
        for g in &r.groups {
            let secs = |q: f64| {
                let v = g.wait_quantile(q);
                if v.is_nan() {
                    "—".to_string()
                } else {
                    format!("{v:.1} s")
                }
            };
            let rho = if g.connected < 3 {
                "—".to_string()
            } else {
                format!("{:.3}", g.rho)
            };
            s.push_str(&format!(
                "| {} | {} | {}.{}.{}.0/24 | {}/{} | {} | {} | {} | {rho} | {} ({}) |\n",
                r.spec.action,
                r.spec.flood_per_s,
                g.net[0],
                g.net[1],
                g.net[2],
                g.connected,
                g.clients,
                secs(0.5),
                secs(0.99),
                secs(1.0),
                g.max_1s,
                r.spec.rate + r.spec.burst,
            ));
        }
    }
    s
}
