use super::*;
use core::cell::Cell;
use proptest::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::vec::Vec;

/// A single-threaded cell (the line's tests use it too).
pub(crate) struct Plain(pub(crate) Cell<u64>);

impl TatCell for Plain {
    fn load(&self) -> u64 {
        self.0.get()
    }
    fn compare_exchange(&self, current: u64, new: u64) -> Result<(), u64> {
        let v = self.0.get();
        if v == current {
            self.0.set(new);
            Ok(())
        } else {
            Err(v)
        }
    }
}

/// The same word shared by threads, as the kernel shares a map value between CPUs.
struct Shared(AtomicU64);

impl TatCell for Shared {
    fn load(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
    fn compare_exchange(&self, current: u64, new: u64) -> Result<(), u64> {
        self.0
            .compare_exchange(current, new, Ordering::SeqCst, Ordering::SeqCst)
            .map(|_| ())
    }
}

fn plain(v: u64) -> Plain {
    Plain(Cell::new(v))
}

/// Admission times of a sorted list of attempt times.
fn run(budget: &Budget, times: &[u64]) -> Vec<u64> {
    let cell = plain(0);
    times
        .iter()
        .copied()
        .filter(|&t| matches!(take(&cell, budget, t), Take::Taken { .. }))
        .collect()
}

/// The most admissions in any window of length `w` (windows start at an admission).
fn max_in_window(admitted: &[u64], w: u64) -> usize {
    let mut best = 0;
    let mut j = 0;
    for i in 0..admitted.len() {
        while j < admitted.len() && admitted[j] - admitted[i] <= w {
            j += 1;
        }
        best = best.max(j - i);
    }
    best
}

/// `rate·W + burst` for a window of `w` ns, rounded down.
fn bound(rate: u64, burst: u64, w: u64) -> usize {
    (u128::from(rate) * u128::from(w) / 1_000_000_000 + u128::from(burst)) as usize
}

#[test]
fn burst_then_rate() {
    let b = Budget::per_second(10, 5);
    let cell = plain(0);
    let t0 = 1_000_000_000;
    let got = (0..20)
        .filter(|_| matches!(take(&cell, &b, t0), Take::Taken { .. }))
        .count();
    assert_eq!(
        got, 5,
        "a full budget admits exactly the burst at one instant"
    );
    assert_eq!(take(&cell, &b, t0 + 99_999_999), Take::Over);
    assert!(matches!(
        take(&cell, &b, t0 + 100_000_000),
        Take::Taken { .. }
    ));
}

#[test]
fn zero_rate_or_burst_admits_nothing() {
    for b in [
        Budget::per_second(0, 10),
        Budget::per_second(10, 0),
        Budget::NONE,
    ] {
        let cell = plain(0);
        for t in [0, 1, 1_000_000_000, u64::MAX] {
            assert_eq!(take(&cell, &b, t), Take::Over);
        }
    }
}

#[test]
fn u64_edges_never_admit_extra() {
    let b = Budget::per_second(1000, 3);
    let cell = plain(u64::MAX - 10);
    // Near the end of time: at most `burst` admissions, then refusals, never a panic.
    let got = (0..100)
        .filter(|_| matches!(take(&cell, &b, u64::MAX), Take::Taken { .. }))
        .count();
    assert!(got <= 3, "got {got}");
    let huge = Budget::new(1, u64::MAX, u64::MAX);
    let cell = plain(0);
    let got = (0..10)
        .filter(|_| matches!(take(&cell, &huge, u64::MAX - 1), Take::Taken { .. }))
        .count();
    assert!(got <= 1, "got {got}");
}

#[test]
fn time_going_backwards_admits_nothing_extra() {
    let b = Budget::per_second(10, 2);
    let cell = plain(0);
    let t = 5_000_000_000_000;
    assert!(matches!(take(&cell, &b, t), Take::Taken { .. }));
    assert!(matches!(take(&cell, &b, t), Take::Taken { .. }));
    // The clock jumps back by an hour: the state is ahead, so nothing conforms.
    for back in [1, 1_000, 3_600_000_000_000] {
        assert_eq!(take(&cell, &b, t - back), Take::Over);
    }
    assert_eq!(take(&cell, &b, 0), Take::Over);
}

#[test]
fn ceiling_refusal_gives_the_group_its_admission_back() {
    let group = plain(0);
    let ceiling = plain(0);
    let gb = Budget::per_second(10, 1);
    let cb = Budget::per_second(1, 1);
    let t = 10_000_000_000;
    assert_eq!(admit(&group, &gb, Some((&ceiling, &cb)), t), Verdict::Admit);
    let other = plain(0);
    assert_eq!(
        admit(&other, &gb, Some((&ceiling, &cb)), t),
        Verdict::OverCeiling
    );
    assert_eq!(other.load(), 0, "the refused group is not charged");
}

#[test]
fn two_threads_share_one_budget_exactly() {
    // Both threads hammer the same word; together they get what one would.
    let b = Budget::per_second(1_000, 50);
    let cell = Shared(AtomicU64::new(0));
    let clock = AtomicU64::new(1_000_000_000);
    let admitted = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                for _ in 0..200_000 {
                    let now = clock.fetch_add(5_000, Ordering::SeqCst);
                    if matches!(take(&cell, &b, now), Take::Taken { .. }) {
                        admitted.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    let elapsed = clock.load(Ordering::SeqCst) - 1_000_000_000;
    let got = admitted.load(Ordering::SeqCst) as usize;
    assert!(got <= bound(1_000, 50, elapsed), "{got} > bound");
    // Contention and interleaved clocks may refuse a few, never many.
    assert!(
        got * 100 >= bound(1_000, 50, elapsed) * 98,
        "{got} admitted"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// On any window W a group admits at most rate·W + burst.
    #[test]
    fn never_more_than_rate_w_plus_burst(
        rate in 1u64..5_000,
        burst in 1u64..200,
        mut gaps in proptest::collection::vec(0u64..50_000_000, 1..2_000),
        w in 0u64..5_000_000_000,
    ) {
        let b = Budget::per_second(rate, burst);
        let mut t = 7_000_000_000u64;
        for g in gaps.iter_mut() { t += *g; *g = t; }
        let admitted = run(&b, &gaps);
        prop_assert!(max_in_window(&admitted, w) <= bound(rate, burst, w));
    }

    /// `room` is how many attempts at one instant conform in a row, whatever the state.
    #[test]
    fn room_is_the_attempts_that_conform_in_a_row(
        rate in 1u64..5_000,
        burst in 1u64..200,
        now in 1_000_000_000u64..2_000_000_000_000,
        tat_offset in 0u64..400_000_000_000,
    ) {
        let b = Budget::per_second(rate, burst);
        // From well before `now` (full) to far ahead of it (no room).
        let mut tat = (now - 1_000_000_000) + tat_offset / 100;
        let room = b.room(tat, now);
        let mut in_a_row = 0;
        while let Some(next) = b.conform(tat, now) {
            tat = next;
            in_a_row += 1;
            prop_assert!(in_a_row <= burst);
        }
        prop_assert_eq!(room, in_a_row);
    }

    /// With attempts always waiting, admissions track rate·t + burst (work conserving).
    #[test]
    fn saturated_budget_is_used(rate in 1u64..2_000, burst in 1u64..100, secs in 1u64..20) {
        let b = Budget::per_second(rate, burst);
        let step = 1_000_000_000 / (rate * 4) + 1;
        let end = secs * 1_000_000_000;
        // A crowd at the start (enough to use the burst), then one attempt every step.
        let mut times: Vec<u64> = (0..burst).map(|_| 1).collect();
        times.extend((1..=end / step).map(|i| 1 + i * step));
        let got = run(&b, &times).len() as u64;
        // Attempts come every quarter interval, so each admission waits at most that long
        // past its due time: over `secs` that loses at most a quarter of the rate. The
        // attempts stop at `end`, where the last due admission (at `end` + 1 ns) is cut
        // off: one more may be missing (rate 1, burst 1, 1 s admits 1 of 2).
        let want = rate * secs + burst;
        prop_assert!(got <= want, "got {} want {}", got, want);
        prop_assert!(got * 4 + rate * secs + 4 >= want * 4, "got {} want {}", got, want);
    }

    /// Time going backwards (arbitrary jitter) never beats the bound measured on the
    /// admissions' own clock.
    #[test]
    fn jittery_clock_is_bounded(
        rate in 1u64..1_000,
        burst in 1u64..50,
        times in proptest::collection::vec(1u64..20_000_000_000, 1..1_000),
    ) {
        let b = Budget::per_second(rate, burst);
        let cell = plain(0);
        let mut taken: Vec<u64> = Vec::new();
        for &t in &times {
            if let Take::Taken { next, .. } = take(&cell, &b, t) {
                taken.push(next);
            }
        }
        // Each admission advances the state by one interval: the states are strictly
        // increasing, and no more than burst of them fit ahead of any instant.
        prop_assert!(taken.windows(2).all(|p| p[1] >= p[0] + b.interval_ns));
        let max_t = times.iter().copied().max().unwrap_or(0);
        let ahead = taken.iter().filter(|&&n| n > max_t + b.interval_ns).count() as u64;
        prop_assert!(ahead < burst);
    }

    /// The coarse clock only ever refuses what the exact clock refuses: with readings
    /// anywhere from 0 to the lag behind real time, every verdict and every state is the
    /// exact clock's.
    #[test]
    fn two_clocks_decide_as_the_exact_clock(
        rate in 1u64..3_000,
        burst in 1u64..50,
        ceiling in proptest::option::of((1u64..3_000, 1u64..50)),
        lag in 0u64..30_000_000,
        attempts in proptest::collection::vec((0u64..40_000_000, 0u64..=1_000), 1..2_000),
    ) {
        let gb = Budget::per_second(rate, burst);
        let cb = ceiling.map(|(r, b)| Budget::per_second(r, b));
        let (exact_group, exact_ceiling) = (plain(0), plain(0));
        let (two_group, two_ceiling) = (plain(0), plain(0));
        let mut t = 5_000_000_000u64;
        for (gap, lag_permille) in attempts {
            t += gap;
            // A reading between `lag` behind and exactly now.
            let coarse = t - lag * lag_permille / 1_000;
            let want = admit(&exact_group, &gb, cb.as_ref().map(|b| (&exact_ceiling, b)), t);
            let mut exact_read = false;
            let got = admit_two_clocks(
                &two_group,
                &gb,
                cb.as_ref().map(|b| (&two_ceiling, b)),
                coarse,
                lag,
                || {
                    exact_read = true;
                    t
                },
            );
            prop_assert_eq!(got, want);
            prop_assert_eq!(two_group.load(), exact_group.load());
            prop_assert_eq!(two_ceiling.load(), exact_ceiling.load());
            // The exact clock is skipped only for refusals.
            prop_assert!(exact_read || got == Verdict::OverGroup);
        }
    }

    /// A rule's ceiling holds over all its groups, whatever each group's budget.
    #[test]
    fn ceiling_holds_over_groups(
        ceil_rate in 1u64..500,
        ceil_burst in 1u64..50,
        groups in 1usize..40,
        attempts in proptest::collection::vec((0usize..40, 0u64..5_000_000), 1..3_000),
        w in 0u64..3_000_000_000,
    ) {
        let gb = Budget::per_second(100, 20);
        let cb = Budget::per_second(ceil_rate, ceil_burst);
        let cells: Vec<Plain> = (0..groups).map(|_| plain(0)).collect();
        let ceiling = plain(0);
        let mut t = 3_000_000_000u64;
        let mut admitted = Vec::new();
        let mut per_group: Vec<Vec<u64>> = (0..groups).map(|_| Vec::new()).collect();
        for (g, gap) in attempts {
            t += gap;
            let g = g % groups;
            if admit(&cells[g], &gb, Some((&ceiling, &cb)), t) == Verdict::Admit {
                admitted.push(t);
                per_group[g].push(t);
            }
        }
        prop_assert!(max_in_window(&admitted, w) <= bound(ceil_rate, ceil_burst, w));
        for g in &per_group {
            prop_assert!(max_in_window(g, w) <= bound(100, 20, w));
        }
    }
}

#[test]
fn surely_over_needs_the_whole_lag() {
    // 1/s, burst 1: after an admission at 10 s the next conforms at 11 s.
    let b = Budget::per_second(1, 1);
    let tat = 11_000_000_000;
    let lag = 8_000_000;
    assert!(b.surely_over(tat, 10_500_000_000, lag));
    // A reading within the lag of the conforming time is unsure: real time may be past it.
    assert!(!b.surely_over(tat, 11_000_000_000 - lag, lag));
    assert!(b.surely_over(tat, 11_000_000_000 - lag - 1, lag));
    assert!(!b.surely_over(tat, 11_000_000_000, lag));
    // Edges: no underflow or overflow makes it sure.
    assert!(!b.surely_over(0, u64::MAX, lag));
    assert!(!b.surely_over(u64::MAX, u64::MAX - 1, lag));
    // Rate 0 admits nothing, on any clock.
    assert!(Budget::NONE.surely_over(0, 0, lag));
}

#[test]
fn a_flood_is_refused_on_the_coarse_clock() {
    // 20/s, burst 5, one attempt per ms for 3 s, the coarse clock 4 ms behind, lag 8 ms.
    let b = Budget::per_second(20, 5);
    let cell = plain(0);
    let (mut admitted, mut exact_reads) = (0, 0);
    for ms in 1..=3_000u64 {
        let t = 10_000_000_000 + ms * 1_000_000;
        let v = admit_two_clocks::<_, Plain>(&cell, &b, None, t - 4_000_000, 8_000_000, || {
            exact_reads += 1;
            t
        });
        if v == Verdict::Admit {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 5 + 3 * 20 - 1);
    // Each admission needs the exact clock, and so do the attempts of the last 8 ms
    // before each conforming time: about 8 of every 50.
    assert!(
        exact_reads < 3_000 / 5,
        "exact clock read {exact_reads} times"
    );
}
