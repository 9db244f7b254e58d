//! Taking from a group's budget and its rule's ceiling: the shared admission logic
//! (`shaper_common::admit_two_clocks`) on budget words in map values.

use core::intrinsics::{AtomicOrdering, atomic_cxchg};

use shaper_common::{
    Budget, TatCell, Verdict, admit_two_clocks,
    maps::{GroupState, RuleEntry},
};

use crate::{
    clock::{coarse_clock, exact_clock},
    maps::RULE_BUDGETS,
};

/// A budget word in a map value, shared by all CPUs.
struct MapCell(*mut u64);

impl TatCell for MapCell {
    #[inline(always)]
    fn load(&self) -> u64 {
        // SAFETY: points into a live map value (the verifier checked the lookup).
        unsafe { core::ptr::read_volatile(self.0) }
    }

    #[inline(always)]
    fn compare_exchange(&self, current: u64, new: u64) -> Result<(), u64> {
        // SAFETY: as above; lowers to BPF_CMPXCHG, atomic across CPUs.
        let (found, ok) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                self.0, current, new,
            )
        };
        if ok { Ok(()) } else { Err(found) }
    }
}

/// Take from the group's budget and the rule's ceiling. An attempt surely over the
/// group's budget is refused on the coarse clock (a few ns) without reading the exact
/// one (tens of ns): the same verdicts, cheaper under a flood.
#[inline(always)]
pub(crate) fn budget_verdict(rule: &RuleEntry, group: Option<*mut GroupState>) -> Verdict {
    if rule.interval_ns == 0 {
        // Rate 0: nothing is admitted; no state to touch.
        return Verdict::OverGroup;
    }
    let Some(group) = group else {
        return Verdict::Contended;
    };
    let (coarse, lag, jiffies) = coarse_clock();
    admit_budget(rule, group, coarse, lag, || exact_clock(jiffies))
}

/// Admit against the group's budget word and, if the rule has one, its ceiling, on
/// the exact clock. A function of its own: `defer` calls it from several places, and
/// the verifier then checks one body instead of one copy per place.
#[inline(never)]
pub(crate) fn take_budget(rule: &RuleEntry, group: *mut GroupState, now: u64) -> Verdict {
    // No coarse reading can be sure (its lag covers all time): the exact clock decides.
    admit_budget(rule, group, 0, u64::MAX, || now)
}

/// [`take_budget`] with two clocks (see `shaper_common::admit_two_clocks`), inlined
/// into the `drop` path.
#[inline(always)]
fn admit_budget(
    rule: &RuleEntry,
    group: *mut GroupState,
    coarse: u64,
    lag: u64,
    exact: impl FnOnce() -> u64,
) -> Verdict {
    let group_budget = Budget {
        interval_ns: rule.interval_ns,
        tolerance_ns: rule.tolerance_ns,
    };
    // SAFETY: `group` points into a live GROUPS value (checked lookup).
    let group = MapCell(unsafe { &raw mut (*group).tat_ns });
    if rule.ceiling_interval_ns == 0 {
        return admit_two_clocks::<_, MapCell>(&group, &group_budget, None, coarse, lag, exact);
    }
    let ceiling_budget = Budget {
        interval_ns: rule.ceiling_interval_ns,
        tolerance_ns: rule.ceiling_tolerance_ns,
    };
    match RULE_BUDGETS.get_ptr_mut(rule.rule_id) {
        Some(p) => {
            let ceiling = MapCell(p.cast());
            admit_two_clocks(
                &group,
                &group_budget,
                Some((&ceiling, &ceiling_budget)),
                coarse,
                lag,
                exact,
            )
        }
        // A rule id past the array: refuse rather than admit without the ceiling.
        None => Verdict::Contended,
    }
}
