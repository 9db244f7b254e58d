//! Budgets: GCRA (generic cell rate algorithm) on one 64-bit word.
//!
//! A budget admits at most `rate·W + burst` attempts on any window of length W. Its whole
//! state is the theoretical arrival time `tat`; an attempt at `now` conforms when
//! `now ≥ tat − tolerance`, and then moves `tat` to `max(tat, now) + interval`. Because the
//! state is one word, every CPU updates the same budget with compare-and-swap: there is no
//! per-CPU share and no `rate × CPUs`.

const NS_PER_SEC: u64 = 1_000_000_000;

/// How many times a contended compare-and-swap is retried before the attempt is refused.
/// Refusing keeps the budget exact; with two CPUs on one group a retry is rare.
pub const CAS_ATTEMPTS: u32 = 8;

/// A rate and a burst, in the units the data plane uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Budget {
    /// ns between admissions; 0 means no budget at all (rate 0).
    pub interval_ns: u64,
    /// `(burst − 1) · interval_ns`: how far ahead of `now` the state may run.
    pub tolerance_ns: u64,
}

impl Budget {
    /// A budget that admits nothing.
    pub const NONE: Budget = Budget {
        interval_ns: 0,
        tolerance_ns: 0,
    };

    /// `count` admissions per `period_ns`, with up to `burst` at once.
    ///
    /// The interval is rounded up, so the rate is never above the one asked for. A
    /// `count` or `burst` of 0 gives [`Budget::NONE`].
    pub const fn new(count: u64, period_ns: u64, burst: u64) -> Budget {
        if count == 0 || burst == 0 || period_ns == 0 {
            return Budget::NONE;
        }
        let interval_ns = period_ns.div_ceil(count);
        let interval_ns = if interval_ns == 0 { 1 } else { interval_ns };
        Budget {
            interval_ns,
            tolerance_ns: (burst - 1).saturating_mul(interval_ns),
        }
    }

    /// `rate` admissions per second with up to `burst` at once.
    pub const fn per_second(rate: u64, burst: u64) -> Budget {
        Budget::new(rate, NS_PER_SEC, burst)
    }

    /// Is an attempt surely over this budget, judged on a clock that reads up to
    /// `lag_ns` behind real time (the kernel's coarse clock, which moves once per tick)?
    ///
    /// `true` only when even `coarse + lag_ns`, the latest real time the reading allows,
    /// is before the earliest conforming time: then [`Budget::conform`] on the exact
    /// clock refuses too, and the exact clock need not be read. A refusal changes no
    /// state, so a concurrent admission (which only moves `tat` later) cannot make it
    /// wrong. `false` means "unsure": ask the exact clock.
    #[inline(always)]
    pub fn surely_over(&self, tat: u64, coarse: u64, lag_ns: u64) -> bool {
        if self.interval_ns == 0 {
            return true;
        }
        match (
            tat.checked_sub(self.tolerance_ns),
            coarse.checked_add(lag_ns),
        ) {
            (Some(earliest), Some(latest)) => latest < earliest,
            _ => false,
        }
    }

    /// How many admissions the budget has room for at `now`, given the state `tat`:
    /// the whole burst once it is full (`tat` at or before `now`), none while an
    /// attempt would not conform.
    #[inline(always)]
    pub const fn room(&self, tat: u64, now: u64) -> u64 {
        let depth = self.tolerance_ns.saturating_add(self.interval_ns);
        match depth
            .saturating_sub(tat.saturating_sub(now))
            .checked_div(self.interval_ns)
        {
            Some(n) => n,
            None => 0,
        }
    }

    /// Does an attempt at `now` conform, given the state `tat`? If so, the new state.
    ///
    /// Any overflow refuses: at the edges of u64 the budget errs towards admitting less.
    #[inline(always)]
    pub fn conform(&self, tat: u64, now: u64) -> Option<u64> {
        if self.interval_ns == 0 {
            return None;
        }
        // now ≥ tat − tolerance, without underflow.
        if let Some(earliest) = tat.checked_sub(self.tolerance_ns)
            && now < earliest
        {
            return None;
        }
        let base = if tat > now { tat } else { now };
        base.checked_add(self.interval_ns)
    }
}

/// One shared budget word. The kernel implements it with an atomic compare-and-swap on a
/// map value; the host tests with `AtomicU64` or a plain cell.
pub trait TatCell {
    /// The current state.
    fn load(&self) -> u64;
    /// Store `new` if the state is still `current`; otherwise return the state found.
    fn compare_exchange(&self, current: u64, new: u64) -> Result<(), u64>;
}

/// What taking from one budget did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    /// Admitted; the state went from `prev` to `next`.
    Taken { prev: u64, next: u64 },
    /// Over budget.
    Over,
    /// Every compare-and-swap lost a race; nothing was taken.
    Contended,
}

/// Take one admission from `cell` at `now`, if the budget allows.
#[inline(always)]
pub fn take(cell: &impl TatCell, budget: &Budget, now: u64) -> Take {
    let mut tat = cell.load();
    let mut tries = 0;
    while tries < CAS_ATTEMPTS {
        let Some(next) = budget.conform(tat, now) else {
            return Take::Over;
        };
        match cell.compare_exchange(tat, next) {
            Ok(()) => return Take::Taken { prev: tat, next },
            Err(found) => tat = found,
        }
        tries += 1;
    }
    Take::Contended
}

/// Give back an admission taken as `prev → next`, if nobody took one since.
#[inline(always)]
pub fn give_back(cell: &impl TatCell, prev: u64, next: u64) {
    // If another CPU moved the state since, keep it: the budget then errs towards less.
    let _ = cell.compare_exchange(next, prev);
}

/// The policer's decision for one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Within the group's budget and the rule's ceiling.
    Admit,
    /// Over the group's budget.
    OverGroup,
    /// Within the group's budget but over the rule's ceiling.
    OverCeiling,
    /// The shared state stayed contended; refused to keep the budget exact.
    Contended,
}

/// Admit one attempt against its group's budget and, if the rule has one, its ceiling.
///
/// The group is taken first; if the ceiling then refuses, the group's admission is given
/// back, so a group is not charged for attempts the ceiling turned away.
/// (Generic, not `dyn`: BPF has no indirect calls.)
#[inline(always)]
pub fn admit<G: TatCell, C: TatCell>(
    group: &G,
    group_budget: &Budget,
    ceiling: Option<(&C, &Budget)>,
    now: u64,
) -> Verdict {
    let (prev, next) = match take(group, group_budget, now) {
        Take::Taken { prev, next } => (prev, next),
        Take::Over => return Verdict::OverGroup,
        Take::Contended => return Verdict::Contended,
    };
    let Some((cell, budget)) = ceiling else {
        return Verdict::Admit;
    };
    match take(cell, budget, now) {
        Take::Taken { .. } => Verdict::Admit,
        Take::Over => {
            give_back(group, prev, next);
            Verdict::OverCeiling
        }
        Take::Contended => {
            give_back(group, prev, next);
            Verdict::Contended
        }
    }
}

/// [`admit`] with two clocks: a cheap one that reads up to `lag_ns` behind real time
/// (`coarse`), and the exact one, read only when the cheap one cannot decide. An
/// attempt surely over its group's budget is refused on the cheap clock alone (a flood
/// is mostly such attempts); anything else is decided on the exact clock. The verdicts
/// and states are those of [`admit`] on the exact clock, always.
#[inline(always)]
pub fn admit_two_clocks<G: TatCell, C: TatCell>(
    group: &G,
    group_budget: &Budget,
    ceiling: Option<(&C, &Budget)>,
    coarse: u64,
    lag_ns: u64,
    exact: impl FnOnce() -> u64,
) -> Verdict {
    if group_budget.surely_over(group.load(), coarse, lag_ns) {
        return Verdict::OverGroup;
    }
    admit(group, group_budget, ceiling, exact())
}

#[cfg(test)]
#[path = "budget/tests.rs"]
pub(crate) mod tests;
