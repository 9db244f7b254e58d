//! The policer: look up the most specific rule, honour protection, then take from the
//! group's (and the rule's ceiling) budget with the shared admission logic.

use core::intrinsics::{AtomicOrdering, atomic_cxchg};

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns, maps::lpm_trie::Key};
use shaper_common::{
    Budget, Outcome, Reason, TatCell, Verdict, admit, group_v4, group_v6,
    maps::{GroupKey, GroupState, RuleEntry, action, rule_flags},
};

use crate::{
    maps::{GROUPS, PROTECTED_PORTS, RULE_BUDGETS, RULES_V4, RULES_V6},
    parse::{Attempt, Source},
    stats::count_rule,
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

/// Decide what happens to one attempt.
#[inline(always)]
pub fn police(attempt: &Attempt) -> Reason {
    let (rule, addr) = match attempt.source {
        Source::V4(a) => match RULES_V4.get(Key::new(32, a)) {
            Some(r) => (*r, v4_key(group_v4(a, r.group_len))),
            None => return Reason::NoRule,
        },
        Source::V6(a) => match RULES_V6.get(Key::new(128, a)) {
            Some(r) => (*r, group_v6(a, r.group_len)),
            None => return Reason::NoRule,
        },
    };
    if rule.flags & rule_flags::PROTECTED != 0 || port_protected(attempt.dport) {
        count_rule(rule.rule_id, Outcome::Protected);
        return Reason::Protected;
    }
    if rule.action == action::ALLOW {
        count_rule(rule.rule_id, Outcome::Admitted);
        return Reason::Admitted;
    }
    let verdict = budget_verdict(&rule, addr);
    match (verdict, rule.action) {
        (Verdict::Admit, _) => {
            count_rule(rule.rule_id, Outcome::Admitted);
            Reason::Admitted
        }
        (_, action::MONITOR) => {
            count_rule(rule.rule_id, Outcome::WouldDrop);
            Reason::WouldDrop
        }
        (Verdict::Contended, _) => {
            count_rule(rule.rule_id, Outcome::Dropped);
            Reason::Contended
        }
        _ => {
            count_rule(rule.rule_id, Outcome::Dropped);
            Reason::Dropped
        }
    }
}

#[inline(always)]
fn v4_key(a: [u8; 4]) -> [u8; 16] {
    let [a0, a1, a2, a3] = a;
    [a0, a1, a2, a3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

#[inline(always)]
fn port_protected(port: u16) -> bool {
    matches!(PROTECTED_PORTS.get(u32::from(port)), Some(&v) if v != 0)
}

/// Take from the group's budget and the rule's ceiling.
#[inline(always)]
fn budget_verdict(rule: &RuleEntry, addr: [u8; 16]) -> Verdict {
    let group_budget = Budget {
        interval_ns: rule.interval_ns,
        tolerance_ns: rule.tolerance_ns,
    };
    if group_budget.interval_ns == 0 {
        // Rate 0: nothing is admitted; no state to touch.
        return Verdict::OverGroup;
    }
    let key = GroupKey {
        rule_id: rule.rule_id,
        addr,
    };
    let Some(group) = group_cell(&key) else {
        return Verdict::Contended;
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if rule.ceiling_interval_ns == 0 {
        return admit::<_, MapCell>(&group, &group_budget, None, now);
    }
    let ceiling_budget = Budget {
        interval_ns: rule.ceiling_interval_ns,
        tolerance_ns: rule.ceiling_tolerance_ns,
    };
    match RULE_BUDGETS.get_ptr_mut(rule.rule_id) {
        Some(p) => {
            let ceiling = MapCell(p.cast());
            admit(
                &group,
                &group_budget,
                Some((&ceiling, &ceiling_budget)),
                now,
            )
        }
        // A rule id past the array: refuse rather than admit without the ceiling.
        None => Verdict::Contended,
    }
}

/// The group's budget word, created (full budget) on its first attempt.
#[inline(always)]
fn group_cell(key: &GroupKey) -> Option<MapCell> {
    if let Some(p) = GROUPS.get_ptr_mut(key) {
        return Some(MapCell(p.cast()));
    }
    // Another CPU may insert the same group first: NOEXIST keeps its state, and the
    // second lookup finds whichever won.
    let _ = GROUPS.insert(key, GroupState { tat_ns: 0 }, u64::from(BPF_NOEXIST));
    GROUPS.get_ptr_mut(key).map(|p| MapCell(p.cast()))
}
