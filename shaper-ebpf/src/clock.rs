//! The program's two clocks: the exact one (`bpf_ktime_get_ns`, tens of ns) and a
//! coarse one (jiffies plus a learnt offset, a few ns) that is enough to refuse an
//! attempt surely over budget (see `shaper_common::jiffies`).

use aya_ebpf::helpers::{bpf_ktime_get_ns, generated::bpf_jiffies64};
use shaper_common::jiffies;

/// How far the kernel's coarse clock may read behind the exact one, in ns. The loader
/// sets it to two ticks of the running kernel (`clock_getres(CLOCK_MONOTONIC_COARSE)`);
/// the default is two ticks at the slowest tick rate (HZ=100).
#[unsafe(no_mangle)]
static SHAPER_COARSE_LAG_NS: u64 = 20_000_000;

/// The kernel's tick in ns (jiffies move once per tick), set by the loader; 0: unknown,
/// and the coarse clock is never used.
#[unsafe(no_mangle)]
static SHAPER_TICK_NS: u64 = 0;

/// The coarse clock's offset (`shaper_common::jiffies`): jiffies (an inlined load,
/// where `bpf_ktime_get_coarse_ns` is a helper call) plus this are the exact clock's
/// time of the last tick. Learnt from the program's exact readings; CPUs race on it,
/// and any value they store is valid.
static mut JIFFY_OFFSET: u64 = 0;

/// The coarse clock's reading and how far behind real time it may be (`u64::MAX`:
/// unknown, decide on the exact clock), and jiffies as read.
#[inline(always)]
pub(crate) fn coarse_clock() -> (u64, u64, u64) {
    // SAFETY: an inlined helper without arguments; reads of the program's globals.
    let (j, tick, lag, off) = unsafe {
        (
            bpf_jiffies64(),
            core::ptr::read_volatile(&raw const SHAPER_TICK_NS),
            core::ptr::read_volatile(&raw const SHAPER_COARSE_LAG_NS),
            core::ptr::read_volatile(&raw const JIFFY_OFFSET),
        )
    };
    let (c, lag) = jiffies::coarse(off, j, tick, lag);
    (c, lag, j)
}

/// The exact clock, read after jiffies read `jiffies`: the reading also tightens the
/// coarse clock's offset.
#[inline(always)]
pub(crate) fn exact_clock(jiffies: u64) -> u64 {
    // SAFETY: helper without arguments; reads and a write of the program's globals
    // (racing CPUs each store a valid offset).
    unsafe {
        let now = bpf_ktime_get_ns();
        let tick = core::ptr::read_volatile(&raw const SHAPER_TICK_NS);
        let off = core::ptr::read_volatile(&raw const JIFFY_OFFSET);
        if let Some(o) = jiffies::tighter(off, jiffies::observe(now, jiffies, tick)) {
            core::ptr::write_volatile(&raw mut JIFFY_OFFSET, o);
        }
        now
    }
}
