use super::*;
use crate::{Budget, admit, budget::tests::Plain, fairness::spearman};
use core::cell::Cell;
use proptest::prelude::*;
use std::{collections::HashMap, vec, vec::Vec};

const S: u64 = NS_PER_SEC;

fn rule(rate: u32) -> LineRule {
    LineRule {
        rate_per_s: rate,
        queue_cap: 100_000,
        max_wait_ns: 60 * S,
    }
}

/// SYN send offsets (s) and give-up time of real TCP stacks (Linux 6.18 defaults, Linux
/// with `tcp_syn_linear_timeouts = 0`, Windows).
const LINUX: (&[u64], u64) = (&[0, 1, 2, 3, 4, 5, 7, 11, 19, 35, 67], 131);
const LINUX_OLD: (&[u64], u64) = (&[0, 1, 3, 7, 15, 31, 63], 127);
const WINDOWS: (&[u64], u64) = (&[0, 3, 9], 21);

/// One group's data plane on the host: the budget word, the line state, a probe table
/// and the waiter table, driven exactly as the XDP program drives them.
struct Group {
    tat: Plain,
    budget: Budget,
    line: LineState,
    rule: LineRule,
    probes: Vec<(u32, u64)>,
    waiters: HashMap<u64, u64>,
    defer: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum Out {
    Admit,
    AfterWait,
    Deferred,
    Full,
    Dropped,
}

impl Group {
    fn new(rate: u32, burst: u64, defer: bool) -> Group {
        Group {
            tat: Plain(Cell::new(0)),
            budget: Budget::per_second(u64::from(rate), burst),
            line: LineState::default(),
            rule: rule(rate),
            probes: vec![(0, 0); 1 << 20],
            waiters: HashMap::new(),
            defer,
        }
    }

    /// One SYN of client `id` (its identity hash) at `now`.
    fn syn(&mut self, id: u64, now: u64) -> Out {
        let (tat, budget) = (&self.tat, &self.budget);
        let take = |reserve: u64| admit::<_, Plain>(tat, &budget.reserving(reserve), None, now);
        if !self.defer {
            return if take(0) == Verdict::Admit {
                Out::Admit
            } else {
                Out::Dropped
            };
        }
        let h = probe_hash(&[id as u32, (id >> 32) as u32, 0, 0, 0, 0, 0, 0, 0, 0]);
        let slot = (h as usize) & (self.probes.len() - 1);
        let tag = probe_tag(h);
        let known = if self.line.quiet(now) {
            Known::Unknown
        } else if let Some(&first_seen_ns) = self.waiters.get(&id) {
            Known::Waiting { first_seen_ns }
        } else if self.probes[slot].0 == tag {
            Known::Probed {
                first_seen_ns: self.probes[slot].1,
            }
        } else {
            Known::Unknown
        };
        match knock(&mut self.line, &self.rule, known, now, take) {
            Decision::Admit => {
                self.waiters.remove(&id);
                Out::Admit
            }
            Decision::AdmitAfterWait { .. } => {
                self.waiters.remove(&id);
                Out::AfterWait
            }
            Decision::Defer { remember } => {
                match remember {
                    Remember::Nothing => {}
                    Remember::Probe => {
                        self.waiters.remove(&id);
                        self.probes[slot] = (tag, now);
                    }
                    Remember::Waiter { first_seen_ns } => {
                        self.waiters.insert(id, first_seen_ns);
                    }
                }
                Out::Deferred
            }
            Decision::QueueFull => Out::Full,
        }
    }
}

/// A deterministic pseudo-random sequence (xorshift), so storms replay exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Replay {
    connected: usize,
    rho: f64,
    spoofs_admitted: usize,
    admissions: Vec<u64>,
}

/// `n` real clients arriving over `spread_s`, a mix of stacks, plus `spoof_per_s`
/// spoofed first SYNs, against one group.
fn replay(
    n: usize,
    spread_s: u64,
    rate: u32,
    burst: u64,
    defer: bool,
    spoof_per_s: u64,
    seed: u64,
) -> Replay {
    let mut rng = Rng(seed * 2 + 1);
    let mut events: Vec<(u64, u64)> = Vec::new();
    let mut arrival = Vec::with_capacity(n);
    let mut give_up = Vec::with_capacity(n);
    for i in 0..n {
        let at = rng.below(spread_s * S);
        let (sched, limit) = match rng.below(10) {
            0..=3 => LINUX,
            4..=7 => LINUX_OLD,
            _ => WINDOWS,
        };
        arrival.push(at);
        give_up.push(at + limit * S);
        for off in sched {
            events.push((at + off * S, i as u64));
        }
    }
    if let Some(step) = S.checked_div(spoof_per_s) {
        let mut t = 0;
        let mut id = 1u64 << 40;
        while t < (spread_s + 40) * S {
            events.push((t, id));
            id += 1;
            t += step;
        }
    }
    events.sort_unstable();
    let mut g = Group::new(rate, burst, defer);
    let mut admitted: HashMap<u64, u64> = HashMap::new();
    let mut spoofs_admitted = 0;
    let mut admissions = Vec::new();
    for (t, id) in events {
        if admitted.contains_key(&id) {
            continue;
        }
        if let Some(&limit) = give_up.get(id as usize)
            && t >= limit
        {
            continue;
        }
        if matches!(g.syn(id, t), Out::Admit | Out::AfterWait) {
            admissions.push(t);
            if id >= 1 << 40 {
                spoofs_admitted += 1;
            } else {
                admitted.insert(id, t);
            }
        }
    }
    let ids: Vec<u64> = admitted.keys().copied().collect();
    let xs: Vec<f64> = ids.iter().map(|&i| arrival[i as usize] as f64).collect();
    let ys: Vec<f64> = ids.iter().map(|&i| admitted[&i] as f64).collect();
    Replay {
        connected: admitted.len(),
        rho: spearman(&xs, &ys),
        spoofs_admitted,
        admissions,
    }
}

/// Most admissions in any window of `w` ns.
fn max_in_window(times: &[u64], w: u64) -> usize {
    let mut t = times.to_vec();
    t.sort_unstable();
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..t.len() {
        while t[hi] - t[lo] >= w {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

#[test]
fn buckets_follow_the_bounds() {
    let cases = [
        (0, 0),
        (S - 1, 0),
        (S, 1),
        (2 * S - 1, 1),
        (5 * S, 5),
        (7 * S, 6),
        (8 * S, 7),
        (14 * S, 9),
        (15 * S, 10),
        (47 * S, 14),
        (48 * S, 15),
        (u64::MAX, 15),
    ];
    for (age, b) in cases {
        assert_eq!(age_bucket(age), b, "age {age}");
    }
}

#[test]
fn quiet_group_admits_within_budget_without_lookups() {
    let mut g = Group::new(10, 2, true);
    assert_eq!(g.syn(1, S), Out::Admit);
    assert_eq!(g.syn(2, S), Out::Admit);
    // Over budget: the third must prove itself; the group is congested now.
    assert_eq!(g.syn(3, S), Out::Deferred);
    assert!(!g.line.quiet(S));
    // Its retransmission a second later is proven and admitted (budget refilled).
    assert_eq!(g.syn(3, 2 * S), Out::AfterWait);
}

#[test]
fn forgotten_after_max_wait() {
    let mut g = Group::new(1, 1, true);
    g.rule.max_wait_ns = 5 * S;
    assert_eq!(g.syn(1, 0), Out::Admit);
    assert_eq!(g.syn(2, 0), Out::Deferred);
    // Keep the group congested and the budget spent by others.
    assert_eq!(g.syn(2, S / 2), Out::Deferred, "joins the line");
    assert!(g.waiters.contains_key(&2));
    // After max_wait its knock is a first SYN again: probe rewritten, waiter forgotten.
    let t = 6 * S;
    g.line.congested_until_ns = t + S;
    g.tat.0.set(t + 10 * S);
    assert_eq!(g.syn(2, t), Out::Deferred);
    assert!(!g.waiters.contains_key(&2));
    // Proven again, past max_wait again: with budget at that moment it gets in at once,
    // whatever the threshold (it is older than anyone in line).
    assert_eq!(g.syn(2, t + S), Out::Deferred, "proven again, joins");
    let t = t + 7 * S;
    g.tat.0.set(0);
    g.line.thr = AGE_BUCKETS as u32;
    assert_eq!(g.syn(2, t), Out::AfterWait);
}

#[test]
fn full_line_refuses_to_remember_and_never_admits_extra() {
    let mut g = Group::new(1, 1, true);
    g.rule.queue_cap = 3;
    g.tat.0.set(1000 * S);
    g.line.congested_until_ns = 1000 * S;
    for id in 0..10 {
        assert_eq!(g.syn(id, S), Out::Deferred, "probe {id}");
    }
    let outs: Vec<Out> = (0..10).map(|id| g.syn(id, 2 * S)).collect();
    assert_eq!(outs.iter().filter(|o| **o == Out::Deferred).count(), 3);
    assert_eq!(outs.iter().filter(|o| **o == Out::Full).count(), 7);
    assert_eq!(g.waiters.len(), 3);
}

#[test]
fn replayed_storm_is_ordered_and_work_conserving() {
    // The end-to-end storm's shape: 1,000 clients over 30 s against 25/s, burst 5.
    for seed in [1, 2, 3] {
        let drop = replay(1000, 30, 25, 5, false, 0, seed);
        let defer = replay(1000, 30, 25, 5, true, 0, seed);
        std::eprintln!(
            "seed {seed}: drop {} rho {:.3}; defer {} rho {:.3}",
            drop.connected,
            drop.rho,
            defer.connected,
            defer.rho
        );
        assert!(
            defer.connected * 100 >= drop.connected * 98,
            "work conservation"
        );
        assert!(defer.rho >= 0.8, "defer rho {}", defer.rho);
        assert!(
            defer.rho >= drop.rho + 0.1,
            "defer {} drop {}",
            defer.rho,
            drop.rho
        );
        for r in [&drop, &defer] {
            assert!(max_in_window(&r.admissions, S) <= 30);
        }
    }
}

#[test]
fn replayed_flood_cannot_take_the_line() {
    for seed in [1, 2] {
        let calm = replay(1000, 30, 25, 5, true, 0, seed);
        let flood = replay(1000, 30, 25, 5, true, 20_000, seed);
        let drop = replay(1000, 30, 25, 5, false, 20_000, seed);
        std::eprintln!(
            "seed {seed}: defer calm {} flood {} (spoofs in {}); drop under flood {} (spoofs in {})",
            calm.connected,
            flood.connected,
            flood.spoofs_admitted,
            drop.connected,
            drop.spoofs_admitted
        );
        assert!(flood.connected * 100 >= calm.connected * 95);
        assert!(drop.connected < flood.connected);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the knocks, admissions never exceed rate·W + burst on any window W.
    #[test]
    fn budget_holds_on_every_window(
        rate in 1u32..50,
        burst in 1u64..20,
        knocks in proptest::collection::vec((0u64..400, 0u64..20_000), 1..600),
    ) {
        let mut g = Group::new(rate, burst, true);
        let mut knocks = knocks;
        knocks.sort_unstable_by_key(|k| k.1);
        let mut times = Vec::new();
        for (id, ms) in knocks {
            let now = ms * 1_000_000;
            if matches!(g.syn(id, now), Out::Admit | Out::AfterWait) {
                times.push(now);
            }
        }
        for w_s in [1u64, 2, 5, 20] {
            let w = w_s * S;
            let bound = u64::from(rate) * w_s + burst;
            prop_assert!(max_in_window(&times, w) as u64 <= bound);
        }
    }

    /// While congested, a SYN never seen before is never admitted: the budget is not
    /// even asked.
    #[test]
    fn unproven_syn_never_admitted_while_congested(
        now in 0u64..1_000 * S,
        hold in 1u64..CONGESTION_HOLD_NS,
    ) {
        let mut line = LineState { congested_until_ns: now + hold, ..LineState::default() };
        let d = knock(&mut line, &rule(10), Known::Unknown, now, |_| {
            panic!("budget asked for an unproven SYN")
        });
        prop_assert_eq!(d, Decision::Defer { remember: Remember::Probe });
    }

    /// The threshold is the oldest bucket holding (with the older ones) one second of
    /// budget: a younger knock only gets budget when fewer than `rate` older ones knocked.
    #[test]
    fn threshold_serves_the_oldest(
        hist in proptest::array::uniform16(0u32..40),
        rate in 1u32..60,
    ) {
        let t = threshold(&hist, rate) as usize;
        let older = |b: usize| hist[b..].iter().sum::<u32>();
        if t > 0 {
            prop_assert!(older(t) >= rate);
        }
        if t + 1 < AGE_BUCKETS {
            prop_assert!(older(t + 1) < rate);
        }
    }

    /// The line's joins stay under the group's cap, whatever the knocks.
    #[test]
    fn line_memory_is_bounded(
        cap in 1u32..50,
        knocks in proptest::collection::vec((0u64..300, 0u64..120_000), 1..800),
    ) {
        let mut g = Group::new(5, 1, true);
        g.rule.queue_cap = cap;
        g.rule.max_wait_ns = 10 * S;
        let mut knocks = knocks;
        knocks.sort_unstable_by_key(|k| k.1);
        let mut joined: Vec<u64> = Vec::new();
        for (id, ms) in knocks {
            let now = ms * 1_000_000;
            let before = g.waiters.contains_key(&id);
            g.syn(id, now);
            if !before && g.waiters.contains_key(&id) {
                joined.push(now);
            }
            // Live waiters (younger than max_wait) never exceed the cap.
            let live = g.waiters.values().filter(|&&f| now.saturating_sub(f) <= g.rule.max_wait_ns).count();
            prop_assert!(live as u32 <= cap, "live {} cap {}", live, cap);
        }
        // Joins in any max_wait window are within the cap as well.
        prop_assert!(max_in_window(&joined, g.rule.max_wait_ns) as u32 <= cap);
    }
}
