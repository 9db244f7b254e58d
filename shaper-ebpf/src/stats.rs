//! Per-CPU counters: plain increments, no atomics on the hot path.

use shaper_common::{Outcome, Reason, maps::wait_bucket};

use crate::maps::{GLOBAL_STATS, RULE_STATS};

/// Count one packet for `reason`.
#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(p) = GLOBAL_STATS.get_ptr_mut(reason as u32) {
        // SAFETY: a per-CPU array slot; only this CPU writes it, and XDP is not preempted.
        unsafe { *p += 1 };
    }
}

/// Count one attempt for `outcome` under rule `rule_id`.
#[inline(always)]
pub fn count_rule(rule_id: u32, outcome: Outcome) {
    if let Some(p) = RULE_STATS.get_ptr_mut(rule_id) {
        // SAFETY: as above; `get_mut` keeps the index check (no panic path).
        if let Some(c) = unsafe { (*p).counts.get_mut(outcome as usize) } {
            *c += 1;
        }
    }
}

/// Count one client admitted after waiting `wait_ns` under rule `rule_id`.
#[inline(always)]
pub fn count_wait(rule_id: u32, wait_ns: u64) {
    if let Some(p) = RULE_STATS.get_ptr_mut(rule_id) {
        // SAFETY: as above.
        let stats = unsafe { &mut *p };
        if let Some(c) = stats.wait.get_mut(wait_bucket(wait_ns)) {
            *c += 1;
        }
        stats.wait_sum_ns = stats.wait_sum_ns.wrapping_add(wait_ns);
    }
}

/// Count one waiting client's place released after `max_wait` under rule `rule_id`.
#[inline(always)]
pub fn count_released(rule_id: u32) {
    if let Some(p) = RULE_STATS.get_ptr_mut(rule_id) {
        // SAFETY: as above.
        unsafe { (*p).released += 1 };
    }
}
