//! What the daemon reports: `status`, `stats`, `top`, and the counters in its log.

use std::{collections::HashMap, net::IpAddr};

use shaper_common::{
    Outcome, Reason,
    maps::{WAIT_BOUNDS_S, WAIT_BUCKETS},
};

use super::state::State;
use crate::{
    attach,
    dataplane::{Line, Waiting},
    protocol::{self, IfaceStatus, MapFill, RuleStatsView, Stats, Status, TopGroup},
};

pub fn status(s: &State) -> Status {
    Status {
        version: env!("CARGO_PKG_VERSION").to_string(),
        protocol: protocol::PROTOCOL,
        pid: std::process::id(),
        uptime_s: s.started.elapsed().as_secs(),
        config: s.config.display().to_string(),
        generation: s.generation,
        policy_hash: s.hash.clone(),
        fleet_share: s.share.to_string(),
        interfaces: s
            .ifaces
            .iter()
            .map(|i| IfaceStatus {
                iface: i.att.iface.clone(),
                mode: i.att.mode_name(|| attach::kernel_mode(&i.att.iface)),
                prog_id: i.att.prog_id,
                link_id: i.att.link_id,
                adopted: i.att.adopted,
                pin_dir: i.dir.display().to_string(),
                maps: i
                    .dp
                    .fill_levels(None)
                    .into_iter()
                    .map(|(name, entries, capacity)| MapFill {
                        name: name.to_string(),
                        entries,
                        capacity,
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// The clients waiting in each interface's lines now (in the order of `s.ifaces`);
/// places past their rule's `max_wait` are released on the way
/// ([`crate::dataplane::Dataplane::line`]).
pub fn line(s: &mut State) -> Vec<Line> {
    let now = crate::clock::monotonic_ns();
    let max_wait: HashMap<u32, u64> = s
        .ids
        .iter()
        .zip(&s.policy.rules)
        .filter(|(_, r)| r.action == crate::policy::Action::Defer)
        .map(|(id, r)| {
            (
                *id,
                u64::try_from(r.max_wait.as_nanos()).unwrap_or(u64::MAX),
            )
        })
        .collect();
    s.ifaces
        .iter_mut()
        .map(|i| i.dp.line(now, |id| max_wait.get(&id).copied()))
        .collect()
}

/// Clients waiting in some lines, and the first-seen time of the oldest.
#[derive(Clone, Copy, Debug)]
pub struct Tally {
    pub waiting: u64,
    oldest_first_seen_ns: u64,
}

impl Tally {
    const NONE: Tally = Tally {
        waiting: 0,
        oldest_first_seen_ns: u64::MAX,
    };

    /// How long the oldest has waited at `now`, in seconds (0: nobody waits).
    pub fn oldest_wait_s(&self, now: u64) -> f64 {
        if self.waiting == 0 {
            0.0
        } else {
            now.saturating_sub(self.oldest_first_seen_ns) as f64 / 1e9
        }
    }
}

/// The waiting clients tallied by `key` (those it gives `None` are left out).
fn tally_by<K: std::hash::Hash + Eq>(
    waiting: &[Waiting],
    key: impl Fn(&Waiting) -> Option<K>,
) -> HashMap<K, Tally> {
    let mut out: HashMap<K, Tally> = HashMap::new();
    for w in waiting {
        let Some(k) = key(w) else { continue };
        let t = out.entry(k).or_insert(Tally::NONE);
        t.waiting += 1;
        t.oldest_first_seen_ns = t.oldest_first_seen_ns.min(w.first_seen_ns);
    }
    out
}

/// The waiting clients tallied by rule id.
pub fn line_by_rule(waiting: &[Waiting]) -> HashMap<u32, Tally> {
    tally_by(waiting, |w| Some(w.rule_id))
}

/// A rule's (or group's) tally, none if nobody waits there.
pub fn tally_of<K: std::hash::Hash + Eq>(by: &HashMap<K, Tally>, key: &K) -> Tally {
    by.get(key).copied().unwrap_or(Tally::NONE)
}

/// The groups nearest to (or over) their budget, the most limited first, with their
/// line.
pub fn top(s: &mut State, n: usize, only: Option<&str>) -> Vec<TopGroup> {
    let lines = line(s);
    let now = crate::clock::monotonic_ns();
    let rules: HashMap<u32, &crate::policy::Rule> =
        s.ids.iter().copied().zip(&s.policy.rules).collect();
    let mut out = Vec::new();
    for (i, line) in s.ifaces.iter().zip(&lines) {
        // Per group: the client's address masked to its rule's group length.
        let groups = tally_by(&line.waiting, |w| {
            let rule = rules.get(&w.rule_id)?;
            let addr = if w.key.family == shaper_common::maps::family::V4 {
                let [a, b, c, d, ..] = w.key.src;
                let mut k = [0u8; 16];
                k[..4].copy_from_slice(&shaper_common::group_v4([a, b, c, d], rule.group));
                k
            } else {
                shaper_common::group_v6(w.key.src, rule.group)
            };
            Some((w.rule_id, addr))
        });
        for (key, st) in i.dp.groups() {
            let Some(rule) = rules.get(&st.rule_id) else {
                continue;
            };
            if only.is_some_and(|name| name != rule.name) {
                continue;
            }
            if key.len != rule.group {
                // A probe entry only (the rule groups by another length).
                continue;
            }
            let budget =
                shaper_common::Budget::new(rule.rate.count, rule.rate.period_ns, rule.burst);
            let used = if budget.interval_ns == 0 {
                rule.burst as f64
            } else {
                st.tat_ns.saturating_sub(now) as f64 / budget.interval_ns as f64
            };
            let addr: IpAddr = if rule.prefix.addr.is_ipv4() {
                let [a, b, c, d, ..] = key.addr;
                IpAddr::from([a, b, c, d])
            } else {
                IpAddr::from(key.addr)
            };
            let line = tally_of(&groups, &(st.rule_id, key.addr));
            out.push(TopGroup {
                iface: i.att.iface.clone(),
                rule: rule.name.clone(),
                group: format!("{addr}/{}", rule.group),
                burst_used: used.min(rule.burst as f64),
                burst: rule.burst,
                congested: now < st.line.congested_until_ns,
                joined_line: st.line.q_cur.saturating_add(st.line.q_prev),
                waiting: u32::try_from(line.waiting).unwrap_or(u32::MAX),
                oldest_wait_s: line.oldest_wait_s(now),
                admitted: st.counts.admitted,
                dropped: st.counts.dropped,
                deferred: st.counts.deferred,
            });
        }
    }
    // Most limited first: a line now, then the SYNs refused (dropped or deferred),
    // then how much of the burst is in use.
    let limited = |g: &TopGroup| u64::from(g.dropped) + u64::from(g.deferred);
    out.sort_by(|a, b| {
        b.congested
            .cmp(&a.congested)
            .then(b.waiting.cmp(&a.waiting))
            .then(limited(b).cmp(&limited(a)))
            .then(b.burst_used.total_cmp(&a.burst_used))
            .then(b.joined_line.cmp(&a.joined_line))
    });
    out.truncate(n);
    out
}

pub fn stats(s: &mut State) -> Stats {
    let lines = line(s);
    let waiting: Vec<HashMap<u32, Tally>> =
        lines.iter().map(|l| line_by_rule(&l.waiting)).collect();
    let mut out = Stats::default();
    for (pos, rule) in s.policy.rules.iter().enumerate() {
        let Some(&id) = s.ids.get(pos) else { continue };
        let mut v = RuleStatsView {
            name: rule.name.clone(),
            prefix: rule.prefix.to_string(),
            action: rule.action.name().to_string(),
            ..RuleStatsView::default()
        };
        let mut wait = [0u64; WAIT_BUCKETS];
        let mut sum_ns = 0u64;
        for (i, w) in s.ifaces.iter().zip(&waiting) {
            let Ok(c) = i.dp.rule_counters(id) else {
                continue;
            };
            for o in Outcome::ALL {
                *v.outcomes.entry(o.name().to_string()).or_default() += c.get(o);
            }
            v.released += c.released;
            v.waiting += tally_of(w, &id).waiting;
            for (w, x) in wait.iter_mut().zip(c.wait.iter()) {
                *w += x;
            }
            sum_ns = sum_ns.wrapping_add(c.wait_sum_ns);
        }
        v.wait_buckets = protocol::cumulative_waits(&WAIT_BOUNDS_S, &wait);
        v.wait_sum_s = sum_ns as f64 / 1e9;
        out.rules.push(v);
    }
    for i in &s.ifaces {
        if let Ok(g) = i.dp.global_counters() {
            for (r, n) in Reason::ALL.iter().zip(g) {
                *out.global.entry(r.name().to_string()).or_default() += n;
            }
        }
    }
    out
}

pub fn log_counters(s: &mut State) {
    let st = stats(s);
    let line: Vec<String> = st
        .global
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    tracing::info!(counters = %line.join(" "), "global");
    for r in &st.rules {
        let counts: Vec<String> = Outcome::ALL
            .iter()
            .map(|o| format!("{}={}", o.name(), r.get(*o)))
            .collect();
        tracing::info!(rule = %r.name, counters = %counts.join(" "), "rule");
    }
}
