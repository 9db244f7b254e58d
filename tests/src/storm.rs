//! An 8 a.m. storm, end to end: a LAN testbed with one client namespace per client TCP
//! stack ([`crate::stacks`]), the real daemon on the server's veth, crowds of real
//! kernel TCP clients from some /24s (each client of a stack drawn from the storm's
//! mix), and optionally a spoofed flood into those /24s. Shared by the end-to-end
//! tests, `cargo xtask bench storm` and `cargo xtask demo`.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow};

use crate::{
    crowd::{Arrival, Attempt, Crowd},
    flood::{Flood, FloodSpec},
    netfilter::Limiter,
    netns::Daemon,
    prometheus::{Prometheus, unix_now},
    stacks::Stack,
    tcp::Server,
    testbed::{PORT, SERVER_DEV, SERVER_V4, Testbed},
};

/// One storm.
#[derive(Clone, Debug)]
pub struct StormSpec {
    /// shaper's `drop` or `defer`, or `nftables` or `iptables` (no daemon: the same
    /// quota per /24 in the kernel's own filters, [`crate::netfilter`]).
    pub action: &'static str,
    /// The rule's budget per /24.
    pub rate: u32,
    pub burst: u32,
    /// The rule's `max_wait`.
    pub max_wait: Duration,
    /// The /24s (first three bytes) and how many clients each.
    pub groups: Vec<([u8; 3], usize)>,
    /// The client stacks and their weights; each client draws one.
    pub mix: Vec<(Stack, u32)>,
    /// Arrivals are spread uniformly over this long.
    pub spread: Duration,
    /// Clients still trying this long after the start are given up on (set it past the
    /// last stack's own give-up to let every client run its course).
    pub deadline: Duration,
    /// Spoofed SYNs per second (0: none), spread over the first `flooded` /24s.
    pub flood_per_s: u32,
    pub flooded: usize,
    pub seed: u64,
    /// Scrape the daemon with a real Prometheus and keep the dashboard's panels.
    pub dashboard: bool,
}

impl StormSpec {
    /// Clients over the spread against the budget (1.0: exactly the budget).
    pub fn overload(&self) -> f64 {
        let per_group =
            self.groups.iter().map(|g| g.1).sum::<usize>() as f64 / self.groups.len().max(1) as f64;
        per_group / (self.spread.as_secs_f64() * f64::from(self.rate))
    }
}

/// One client's story.
#[derive(Clone, Copy, Debug)]
pub struct Client {
    pub net: [u8; 3],
    pub stack: Stack,
    /// Seconds since the start: first SYN, connected, ended (connected or gave up).
    pub started: f64,
    pub connected: Option<f64>,
    pub ended: Option<f64>,
    pub syns: u32,
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
    /// The same over the clients of stacks that knock more than three times (all but
    /// Windows): the line's order among clients it can order.
    pub rho_knockers: f64,
    /// Connections the server accepted from the group, per second since the start.
    pub accepted_per_s: Vec<usize>,
    /// Most the server accepted from the group in any 1-s window.
    pub max_1s: usize,
    /// Seconds in which the group's line was not empty (a refused client had neither
    /// connected nor given up), and what the server accepted from the group in them.
    pub busy_s: usize,
    pub accepted_busy: usize,
}

impl GroupReport {
    pub fn wait_quantile(&self, q: f64) -> f64 {
        quantile(&self.waits, q)
    }

    /// Accepted per second while clients waited.
    pub fn busy_rate(&self) -> f64 {
        self.accepted_busy as f64 / self.busy_s.max(1) as f64
    }
}

/// What a storm did.
#[derive(Clone, Debug)]
pub struct StormReport {
    pub spec: StormSpec,
    pub groups: Vec<GroupReport>,
    pub clients: Vec<Client>,
    pub flood_sent: u64,
    /// The daemon's last per-rule counter line (its log).
    pub counters: String,
    /// The rule's figures from `shaper stats -o json` once every client was done.
    pub stats: serde_json::Value,
    /// The dashboard's panels over the storm, if the spec asked for them.
    pub dashboard: Option<Vec<crate::dashboard::Panel>>,
    pub elapsed: Duration,
}

impl StormReport {
    pub fn connected(&self) -> usize {
        self.groups.iter().map(|g| g.connected).sum()
    }

    pub fn total(&self) -> usize {
        self.groups.iter().map(|g| g.clients).sum()
    }

    /// (connected, clients) of one stack.
    pub fn stack(&self, s: Stack) -> (usize, usize) {
        let mine = self.clients.iter().filter(|c| c.stack == s);
        let n = mine.clone().count();
        (mine.filter(|c| c.connected.is_some()).count(), n)
    }

    /// All groups' waits, sorted.
    pub fn waits(&self) -> Vec<f64> {
        let mut w: Vec<f64> = self.groups.iter().flat_map(|g| g.waits.clone()).collect();
        w.sort_by(f64::total_cmp);
        w
    }

    /// Mean over groups of the rank correlation of clients knocking more than three
    /// times.
    pub fn rho_knockers(&self) -> f64 {
        mean(self.groups.iter().map(|g| g.rho_knockers))
    }

    pub fn rho(&self) -> f64 {
        mean(self.groups.iter().map(|g| g.rho))
    }

    /// Mean over groups of what the server accepted per second while clients waited.
    pub fn busy_rate(&self) -> f64 {
        mean(self.groups.iter().map(GroupReport::busy_rate))
    }

    pub fn max_1s(&self) -> usize {
        self.groups.iter().map(|g| g.max_1s).max().unwrap_or(0)
    }
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 { f64::NAN } else { s / n as f64 }
}

/// Hosts of one group in the namespace of the `k`-th stack: 20 addresses each.
fn hosts(net: [u8; 3], k: usize) -> Vec<IpAddr> {
    let base = 10 + 40 * k as u8;
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
max_wait = "{}s"
"#,
        spec.rate,
        spec.burst,
        spec.action,
        spec.max_wait.as_secs()
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

/// A small deterministic generator (xorshift), so a storm's plan replays exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Each client's stack and arrival, per stack (in the order of the spec's mix).
fn plan(spec: &StormSpec) -> Vec<(Stack, Vec<Arrival>)> {
    let mut rng = Rng(spec.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let weights: u64 = spec.mix.iter().map(|m| u64::from(m.1)).sum::<u64>().max(1);
    let mut per: Vec<(Stack, Vec<Arrival>)> = spec.mix.iter().map(|m| (m.0, Vec::new())).collect();
    for (net, n) in &spec.groups {
        let mut used = vec![0usize; per.len()];
        for _ in 0..*n {
            let at = Duration::from_nanos(rng.next() % spec.spread.as_nanos().max(1) as u64);
            let mut pick = rng.next() % weights;
            let mut k = 0;
            while let Some(m) = spec.mix.get(k)
                && pick >= u64::from(m.1)
            {
                pick -= u64::from(m.1);
                k += 1;
            }
            let k = k.min(per.len().saturating_sub(1));
            let h = hosts(*net, k);
            let src = h[used[k] % h.len()];
            used[k] += 1;
            if let Some(p) = per.get_mut(k) {
                p.1.push(Arrival { at, src });
            }
        }
    }
    per
}

/// Run one storm; `tick` is called about once a second.
pub fn run(spec: &StormSpec, mut tick: impl FnMut(&Live)) -> Result<StormReport> {
    let sets: Vec<Vec<IpAddr>> = (0..spec.mix.len())
        .map(|k| {
            spec.groups
                .iter()
                .flat_map(|(net, _)| hosts(*net, k))
                .collect()
        })
        .collect();
    let set_refs: Vec<&[IpAddr]> = sets.iter().map(Vec::as_slice).collect();
    let bed = Testbed::lan(&set_refs)?;
    let namespaces = bed.clients();
    let mut emulations = Vec::new();
    for ((stack, _), ns) in spec.mix.iter().zip(&namespaces) {
        emulations.push(stack.emulate(ns)?);
    }
    let limiter = limiter(spec.action);
    let mut daemon = match limiter {
        Some(l) => {
            l.install(&bed.srv, SERVER_DEV, spec.rate, spec.burst)?;
            None
        }
        None => Some(Daemon::start(
            &bed.srv,
            SERVER_DEV,
            &policy(spec),
            &["--stats-interval", "1"],
        )?),
    };
    let dst = Testbed::dst_for(IpAddr::V4(SERVER_V4.parse()?));
    let server = Server::start(&bed.srv, &[dst])?;
    let prometheus = if spec.dashboard {
        let p = Prometheus::start(&bed.srv, None)?;
        // Scraped before the storm, so that its rates see it begin.
        p.wait_scrapes(2, Duration::from_secs(30))?;
        Some(p)
    } else {
        None
    };

    let plan = plan(spec);
    let t0 = Instant::now() + Duration::from_millis(300);
    let deadline = t0 + spec.deadline;
    let flood = if spec.flood_per_s == 0 || spec.groups.is_empty() || spec.flooded == 0 {
        None
    } else {
        Some(Flood::start(
            &bed.cli,
            "c0",
            FloodSpec {
                nets: spec.groups.iter().take(spec.flooded).map(|g| g.0).collect(),
                dst: SERVER_V4.parse()?,
                dport: PORT,
                dst_mac: bed.server_mac()?,
                per_second: spec.flood_per_s,
                max: spec.deadline + Duration::from_secs(5),
            },
        )?)
    };
    let mut crowds: Vec<(Stack, Crowd)> = Vec::new();
    for (((stack, arrivals), ns), emu) in plan.iter().zip(&namespaces).zip(&emulations) {
        let cg = emu.as_ref().map(|e| e.cgroup.as_path());
        crowds.push((*stack, Crowd::start(ns, arrivals, dst, t0, deadline, cg)?));
    }
    let mut shown = 0;
    while crowds.iter().any(|c| !c.1.is_finished()) {
        std::thread::sleep(Duration::from_millis(100));
        let sec = t0.elapsed().as_secs();
        if sec > shown {
            shown = sec;
            tick(&Live {
                sec,
                connected: crowds.iter().map(|c| c.1.connected()).sum(),
                clients: spec.groups.iter().map(|g| g.1).sum(),
                flood_sent: flood.as_ref().map_or(0, Flood::sent),
                counters: daemon
                    .as_ref()
                    .map(|d| parse_counters(&last_rule_line(d)))
                    .unwrap_or_default(),
            });
        }
    }
    let elapsed = t0.elapsed();
    let mut attempts: Vec<(Stack, Attempt)> = Vec::new();
    for (stack, c) in crowds {
        attempts.extend(c.finish()?.into_iter().map(|a| (stack, a)));
    }
    let flood_sent = match flood {
        Some(f) => f.finish()?,
        None => 0,
    };
    let stats = match &daemon {
        Some(d) => rule_stats(d)?,
        None => serde_json::Value::Null,
    };
    let dashboard = match &prometheus {
        Some(p) => {
            // One more scrape after the last client, then the storm from its start.
            std::thread::sleep(Duration::from_secs(2));
            let now = unix_now();
            let start = now - t0.elapsed().as_secs_f64();
            Some(crate::dashboard::collect(p, start, now)?)
        }
        None => None,
    };
    drop(prometheus);
    // One more counter line after the storm, then stop the daemon.
    std::thread::sleep(Duration::from_millis(1100));
    let counters = match (&mut daemon, limiter) {
        (Some(d), _) => {
            d.stop()?;
            last_rule_line(d)
        }
        (None, Some(l)) => format!("dropped={}", l.dropped(&bed.srv)),
        (None, None) => String::new(),
    };
    drop(emulations);
    let since = |i: Instant| i.saturating_duration_since(t0).as_secs_f64();
    let clients: Vec<Client> = attempts
        .iter()
        .filter_map(|(stack, a)| {
            let IpAddr::V4(ip) = a.src else { return None };
            let o = ip.octets();
            Some(Client {
                net: [o[0], o[1], o[2]],
                stack: *stack,
                started: since(a.started),
                connected: a.connected.map(since),
                ended: a.ended.map(since),
                syns: a.syns,
            })
        })
        .collect();
    let accepted: Vec<(IpAddr, f64)> = server
        .accepted()
        .iter()
        .map(|x| (x.peer.ip(), since(x.at)))
        .collect();
    let end = since(deadline);
    let groups = spec
        .groups
        .iter()
        .map(|(net, n)| group_report(*net, *n, &clients, &accepted, end))
        .collect();
    Ok(StormReport {
        spec: spec.clone(),
        groups,
        clients,
        flood_sent,
        counters,
        stats,
        dashboard,
        elapsed,
    })
}

/// The kernel filter an action names, if it is not one of shaper's.
pub fn limiter(action: &str) -> Option<Limiter> {
    match action {
        "nftables" => Some(Limiter::Nftables),
        "iptables" => Some(Limiter::Iptables),
        _ => None,
    }
}

/// The storm's rule as `shaper stats -o json` gives it.
fn rule_stats(daemon: &Daemon) -> Result<serde_json::Value> {
    let out = std::process::Command::new(crate::netns::shaper_bin()?)
        .args(["stats", "-o", "json", "--socket"])
        .arg(&daemon.socket)
        .output()?;
    if !out.status.success() {
        return Err(anyhow!(
            "shaper stats: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(v["rules"][0].clone())
}

impl StormReport {
    /// The rule's wait histogram: how many waited (its `+Inf` bucket) and their sum.
    pub fn wait_histogram(&self) -> (u64, f64) {
        let count = self.stats["wait_buckets"]
            .as_array()
            .and_then(|b| b.last())
            .and_then(|b| b["count"].as_u64())
            .unwrap_or(0);
        (count, self.stats["wait_sum_s"].as_f64().unwrap_or(f64::NAN))
    }

    /// Clients that connected after their first SYN was refused, and the sum of their
    /// waits (first SYN to connected), seconds.
    pub fn waited(&self) -> (u64, f64) {
        let w: Vec<f64> = self
            .clients
            .iter()
            .filter(|c| c.syns > 1)
            .filter_map(|c| c.connected.map(|t| t - c.started))
            .collect();
        (w.len() as u64, w.iter().sum())
    }
}

fn group_report(
    net: [u8; 3],
    n: usize,
    clients: &[Client],
    accepted: &[(IpAddr, f64)],
    end: f64,
) -> GroupReport {
    let mine = |ip: IpAddr| matches!(ip, IpAddr::V4(a) if a.octets()[..3] == net[..]);
    let ours: Vec<&Client> = clients.iter().filter(|c| c.net == net).collect();
    let ok: Vec<&&Client> = ours.iter().filter(|c| c.connected.is_some()).collect();
    let mut waits: Vec<f64> = ok
        .iter()
        .filter_map(|c| c.connected.map(|t| t - c.started))
        .collect();
    waits.sort_by(f64::total_cmp);
    let order = |pick: &dyn Fn(&Client) -> bool| {
        let sel: Vec<&&&Client> = ok.iter().filter(|c| pick(c)).collect();
        let xs: Vec<f64> = sel.iter().map(|c| c.started).collect();
        let ys: Vec<f64> = sel.iter().filter_map(|c| c.connected).collect();
        spearman(&xs, &ys)
    };
    let times: Vec<f64> = accepted
        .iter()
        .filter(|(ip, _)| mine(*ip))
        .map(|x| x.1)
        .collect();
    let per_s = per_second(&times);
    // A second counts while the group's line is not empty: some client has been
    // refused (it sent its second SYN: its stack's first retransmission after its
    // first, timers running a few % late) and has neither connected nor given up.
    // What the server accepted from the group in those seconds, first SYNs included,
    // is the budget used while clients waited. (Counting only the seconds in which a
    // waiting client retransmits would charge the line for a token it keeps for an
    // older client's knock a second later, which is not a token lost.)
    let mut busy = vec![false; end.ceil() as usize + 1];
    for c in ours.iter().filter(|c| c.connected.is_none() || c.syns > 1) {
        let Some(&second) = c.stack.schedule().0.get(1) else {
            continue;
        };
        let from = c.started + second as f64 * 1.03;
        let to = c.ended.unwrap_or(end).min(end);
        let mut s = from as usize;
        while (s as f64) <= to {
            if let Some(b) = busy.get_mut(s) {
                *b = true;
            }
            s += 1;
        }
    }
    let busy_s = busy.iter().filter(|k| **k).count();
    let accepted_busy = busy
        .iter()
        .enumerate()
        .filter(|(_, k)| **k)
        .map(|(s, _)| per_s.get(s).copied().unwrap_or(0))
        .sum();
    GroupReport {
        net,
        clients: n,
        connected: ok.len(),
        waits,
        rho: order(&|_| true),
        rho_knockers: order(&|c| c.stack.syns() > 3),
        accepted_per_s: per_s,
        max_1s: max_in_window(&times, 1.0),
        busy_s,
        accepted_busy,
    }
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

fn secs(v: f64) -> String {
    if v.is_nan() {
        "—".to_string()
    } else {
        format!("{v:.1} s")
    }
}

/// A plain side-by-side table of storms (one row per storm and group).
pub fn table(reports: &[StormReport]) -> String {
    let mut s = String::from(
        "| action | flood SYN/s | group | connected | p50 wait | p99 wait | max wait | rank corr. | most accepted in 1 s (budget) |\n|---|---:|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in reports {
        for g in &r.groups {
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
                secs(g.wait_quantile(0.5)),
                secs(g.wait_quantile(0.99)),
                secs(g.wait_quantile(1.0)),
                g.max_1s,
                r.spec.rate + r.spec.burst,
            ));
        }
    }
    s
}

/// One row per storm: the sweep's figures (all groups together).
pub fn sweep_table(reports: &[StormReport]) -> String {
    let stacks: BTreeMap<Stack, ()> = reports
        .iter()
        .flat_map(|r| r.spec.mix.iter().map(|m| (m.0, ())))
        .collect();
    let mut s = String::from(
        "| load | burst | action | flood SYN/s | connected | p50 wait | p99 wait | max wait | rank corr. (all / >3 SYNs) | accepted/s while waiting (budget) | most in 1 s |",
    );
    for st in stacks.keys() {
        s.push_str(&format!(" {} |", st.name()));
    }
    s.push_str("\n|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for _ in stacks.keys() {
        s.push_str("---:|");
    }
    s.push('\n');
    for r in reports {
        let w = r.waits();
        s.push_str(&format!(
            "| {:.1}× | {} | {} | {} | {}/{} | {} | {} | {} | {:.2} / {:.2} | {:.2} ({}) | {} ({}) |",
            r.spec.overload(),
            r.spec.burst,
            r.spec.action,
            r.spec.flood_per_s,
            r.connected(),
            r.total(),
            secs(quantile(&w, 0.5)),
            secs(quantile(&w, 0.99)),
            secs(quantile(&w, 1.0)),
            r.rho(),
            r.rho_knockers(),
            r.busy_rate(),
            r.spec.rate,
            r.max_1s(),
            r.spec.rate + r.spec.burst,
        ));
        for st in stacks.keys() {
            let (c, n) = r.stack(*st);
            s.push_str(&format!(" {c}/{n} |"));
        }
        s.push('\n');
    }
    s
}

/// The storm's counters from the daemon, for error messages.
pub fn describe(r: &StormReport) -> String {
    format!(
        "{} at {:.1}× burst {}: {}",
        r.spec.action,
        r.spec.overload(),
        r.spec.burst,
        r.counters
    )
}

/// An error if `r` has no groups (a spec mistake), so callers can index group 0.
pub fn first_group(r: &StormReport) -> Result<&GroupReport> {
    r.groups
        .first()
        .ok_or_else(|| anyhow!("a storm without groups"))
}
