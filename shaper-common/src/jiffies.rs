//! The coarse clock from jiffies: the kernel advances jiffies by one per tick of the
//! exact (monotonic) clock, so `jiffies * tick` plus a fixed base is the exact time of
//! the last tick. The base is learnt from exact readings: `exact - jiffies * tick`,
//! with jiffies read *before* the exact clock, is never below it, and the smallest such
//! observation is the tightest. All arithmetic wraps (jiffies start near 2^32 and the
//! base is "negative").

/// The observation an exact reading `now` makes, jiffies having read `jiffies` before
/// it.
#[inline(always)]
pub const fn observe(now: u64, jiffies: u64, tick_ns: u64) -> u64 {
    now.wrapping_sub(jiffies.wrapping_mul(tick_ns))
}

/// The offset to keep after observing `seen` when `current` is kept (0: none yet):
/// `Some` if `seen` is tighter. Any observation is valid, so CPUs racing on the stored
/// word can only leave a valid one.
#[inline(always)]
pub const fn tighter(current: u64, seen: u64) -> Option<u64> {
    if seen == 0 {
        return None;
    }
    if current == 0 || (seen.wrapping_sub(current) as i64) < 0 {
        Some(seen)
    } else {
        None
    }
}

/// The coarse reading at `jiffies` with the kept `offset`, and how far behind real time
/// it may be: `lag_ns`, or `u64::MAX` (unknown: decide on the exact clock) before any
/// observation or without a tick length.
#[inline(always)]
pub const fn coarse(offset: u64, jiffies: u64, tick_ns: u64, lag_ns: u64) -> (u64, u64) {
    if tick_ns == 0 || offset == 0 {
        return (0, u64::MAX);
    }
    (offset.wrapping_add(jiffies.wrapping_mul(tick_ns)), lag_ns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A kernel: jiffies count ticks of `tick` ns from `base` (wrapping, from the
    /// kernel's initial jiffies), each tick noticed up to `delay` ns late.
    struct Kernel {
        base: u64,
        tick: u64,
        j0: u64,
    }

    impl Kernel {
        /// Jiffies at exact time `t`, the tick being noticed `late` ns after it.
        fn jiffies(&self, t: u64, late: u64) -> u64 {
            self.j0.wrapping_add(t.saturating_sub(late) / self.tick)
        }
        /// The exact clock's reading at `t`.
        fn exact(&self, t: u64) -> u64 {
            self.base.wrapping_add(t)
        }
    }

    proptest! {
        /// Whatever the readings, the coarse clock is never more than a tick plus the
        /// tick's delay behind the exact clock (what refusing on it needs), and never
        /// ahead by more than that plus the gap between the two reads (ahead only
        /// makes it refuse less).
        #[test]
        fn coarse_stays_within_a_tick_and_its_delay(
            base in any::<u64>(),
            tick in 1_000_000u64..=10_000_000,
            delay_frac in 0u64..=1000,
            start in 0u64..1_000_000_000_000,
            steps in prop::collection::vec((0u64..20_000_000, 0u64..=1000, any::<bool>()), 1..200),
        ) {
            let k = Kernel { base, tick, j0: u64::from(u32::MAX - 75_000) };
            let delay = tick * delay_frac / 1000;
            let mut t = start;
            let mut off = 0u64;
            for (dt, late_frac, exact_read) in steps {
                t += dt;
                let late = delay * late_frac / 1000;
                let j = k.jiffies(t, late);
                let (c, lag) = coarse(off, j, tick, 2 * tick);
                if lag != u64::MAX {
                    let now = k.exact(t);
                    let behind = now.wrapping_sub(c) as i64;
                    prop_assert!(behind <= (tick + delay) as i64, "behind by {behind}");
                    prop_assert!(behind >= -((tick + delay + 100) as i64), "ahead by {}", -behind);
                }
                if exact_read {
                    // Jiffies first, then the exact clock (a little later).
                    let now = k.exact(t + 100);
                    if let Some(o) = tighter(off, observe(now, j, tick)) {
                        off = o;
                    }
                }
            }
        }
    }

    #[test]
    fn nothing_is_known_before_the_first_reading() {
        assert_eq!(coarse(0, 5, 4_000_000, 8_000_000).1, u64::MAX);
        assert_eq!(coarse(7, 5, 0, 8_000_000).1, u64::MAX);
        assert_eq!(tighter(0, 9), Some(9));
        assert_eq!(tighter(9, 10), None);
        assert_eq!(tighter(9, 8), Some(8));
        // Wrapping: just below zero is tighter than just above it.
        assert_eq!(tighter(5, u64::MAX - 5), Some(u64::MAX - 5));
        assert_eq!(tighter(u64::MAX - 5, 5), None);
    }
}
