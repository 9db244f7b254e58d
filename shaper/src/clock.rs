//! The kernel's clocks as the program sees them: `CLOCK_MONOTONIC` is its exact clock
//! (`bpf_ktime_get_ns`), jiffies its coarse one, moving once per tick.

/// The kernel's tick in ns: the resolution of its coarse clock, which moves once per
/// tick, as jiffies do (`None` if the kernel does not say).
pub fn tick_ns() -> Option<u64> {
    let res = rustix::time::clock_getres(rustix::time::ClockId::MonotonicCoarse);
    let tick = u64::try_from(res.tv_sec)
        .ok()
        .zip(u64::try_from(res.tv_nsec).ok())
        .map(|(s, ns)| s.saturating_mul(1_000_000_000).saturating_add(ns));
    tick.filter(|&t| t > 0)
}

/// `CLOCK_MONOTONIC` in ns: the program's exact clock (`bpf_ktime_get_ns`).
pub fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    u64::try_from(t.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(t.tv_nsec).unwrap_or(0))
}

/// How far the program's coarse clock (jiffies) may read behind the exact one: two
/// ticks (one it is always up to behind, one for a late tick). The program refuses
/// attempts surely over budget on the coarse clock only when they are that far from
/// conforming.
pub fn coarse_clock_lag_ns() -> u64 {
    // HZ=100 is the slowest tick Linux has: 10 ms.
    tick_ns().map_or(20_000_000, |t| t.saturating_mul(2))
}
