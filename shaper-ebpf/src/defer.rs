//! `defer`: a congested group's waiting line in the data plane. The decision is
//! `shaper_common::line::knock`; this module finds what the line knows of a SYN (its
//! probe, its waiter entry, the group's calendar), keeps what the line decided to
//! remember, and counts the outcome.

use aya_ebpf::{
    cty::c_void,
    helpers::generated::{bpf_jiffies64, bpf_loop},
    programs::XdpContext,
};
use aya_log_ebpf::debug;
use shaper_common::{
    Budget, Outcome, Reason, Verdict,
    line::{
        Calendar, Decision, Known, LineBudget, LineState, Remember, Repeat, Round, knock,
        probe_hash, probe_tag,
    },
    maps::{GroupSlot, GroupState, PROBE_SLOTS, ProbeSlot, RuleEntry, WaitKey, Waiter},
};

use crate::{
    budget::take_budget,
    clock::exact_clock,
    maps::{LINES, PROBES, SCRATCH, Scratch, WAITERS},
    parse::Attempt,
    police::{count_group, exit},
    stats::{count_released, count_wait},
};

/// What [`defer`] decided, and whether the group just became congested: the caller
/// writes that log record, so the logger's frame never stacks on `defer`'s.
pub(crate) struct Deferral {
    pub reason: Reason,
    pub became_congested: bool,
}

/// Loops of the line's calendar through the `bpf_loop` helper: the verifier checks the
/// body once (a plain loop over the calendar's slots is checked once per round, and
/// that is past its limit).
struct BpfLoop;

impl Repeat for BpfLoop {
    #[inline(always)]
    fn repeat<B: Round>(n: u32, body: &mut B) {
        /// One round: 0 goes on, 1 stops (the helper's contract).
        unsafe extern "C" fn round<B: Round>(i: u64, ctx: *mut c_void) -> i64 {
            // SAFETY: `ctx` is the `body` passed below, alive for the whole loop.
            let body = unsafe { &mut *ctx.cast::<B>() };
            if body.round(i as u32) { 0 } else { 1 }
        }
        // SAFETY: a static callback of the helper's signature and a context pointer to
        // the caller's body; the helper runs at most `n` rounds.
        unsafe { bpf_loop(n, round::<B> as *mut c_void, (body as *mut B).cast(), 0) };
    }
}

/// An empty calendar, in global data (4.5 KiB: far over the stack): what a group's
/// first refusal of a proven client puts in `LINES`.
static EMPTY_CALENDAR: Calendar = Calendar::EMPTY;

/// The group's budget as its line sees it, on the exact clock read once.
struct GroupBudget<'a> {
    rule: &'a RuleEntry,
    group: *mut GroupState,
    now: u64,
}

impl LineBudget for GroupBudget<'_> {
    #[inline(always)]
    fn full_at(&self) -> u64 {
        // SAFETY: a live GROUPS value; the word is written whole (compare-and-swap).
        unsafe { core::ptr::read_volatile(&raw const (*self.group).tat_ns) }
    }

    #[inline(always)]
    fn budget(&self) -> Budget {
        Budget {
            interval_ns: self.rule.interval_ns,
            tolerance_ns: self.rule.tolerance_ns,
        }
    }

    #[inline(always)]
    fn take(&self) -> Verdict {
        take_budget(self.rule, self.group, self.now)
    }
}

/// The calendar of the group in `slot` (made if it has none yet), or none if `LINES`
/// could not give one (the line then admits in turn as the budget allows).
#[inline(never)]
fn calendar(slot: *mut GroupSlot, rule_id: u32, scratch: *mut Scratch) -> *mut Calendar {
    // SAFETY: this CPU's scratch value (checked lookup).
    let key = unsafe { &raw mut (*scratch).line_key };
    let w = key.cast::<u32>();
    // SAFETY: a live GROUPS value (read racily: a slot reclaimed meanwhile only keys a
    // calendar nobody finds again); eight aligned words cover the key.
    let key = unsafe {
        let k = (&raw const (*slot).key).cast::<u32>();
        let mut i = 0;
        while i < 5 {
            w.add(i).write_volatile(k.add(i).read_volatile());
            i += 1;
        }
        w.add(5).write_volatile(rule_id);
        let tag = core::ptr::read_volatile(&raw const (*slot).tag);
        w.add(6).write_volatile(tag as u32);
        w.add(7).write_volatile((tag >> 32) as u32);
        &*key
    };
    if let Some(c) = LINES.get_ptr_mut(key) {
        return c;
    }
    // Another CPU may make it at the same time: whichever insert lands, both use it.
    // By reference (a copy would not fit the stack).
    let empty: &Calendar = &EMPTY_CALENDAR;
    let _ = LINES.insert(key, empty, 0);
    LINES.get_ptr_mut(key).unwrap_or(core::ptr::null_mut())
}

/// What [`defer_lookup`] found ([`Scratch::known`]).
mod found {
    pub const NOTHING: u32 = 0;
    pub const PROBED: u32 = 1;
    pub const WAITING: u32 = 2;
}

/// The SYN's probe slot and tag, into the scratch value (a call of its own: the hash's
/// ten words stay off `defer`'s frame).
#[inline(never)]
fn defer_probe(scratch: *mut Scratch) {
    // SAFETY: this CPU's scratch value, its wait key and ISN written by `defer`.
    unsafe {
        let hash = probe_hash(&(*scratch).wait_key.probe_words((*scratch).isn));
        (*scratch).probe_slot = (hash as u32) & (PROBE_SLOTS - 1);
        (*scratch).probe_tag = probe_tag(hash);
    }
}

/// Look the SYN up in the line (a waiter with the same ISN) and the probes; what is
/// found goes into the scratch value (`known`, `knocks`). Returns the waiter's entry
/// (null: none), which `defer` writes in place at each of its knocks.
#[inline(never)]
fn defer_lookup(scratch: *mut Scratch) -> *mut Waiter {
    defer_probe(scratch);
    // SAFETY: this CPU's scratch value; map values copied out right away.
    unsafe {
        let s = &mut *scratch;
        // The key by reference, in the scratch value (a copy would land on the stack).
        let key: &WaitKey = &s.wait_key;
        if let Some(w) = WAITERS.get_ptr_mut(key)
            && (*w).isn == s.isn
        {
            s.knocks = (*w).knocks;
            s.known = found::WAITING;
            return w;
        }
        s.known = match PROBES.get(s.probe_slot) {
            Some(p) if p.tag == s.probe_tag => {
                s.knocks.first_seen_ns = p.first_seen_ns;
                found::PROBED
            }
            _ => found::NOTHING,
        };
    }
    core::ptr::null_mut()
}

/// Keep what the line decided to remember: the probe, a new waiter or a waiter's
/// knocks; forget the waiter of an admitted client.
#[inline(never)]
fn defer_keep(scratch: *mut Scratch, waiter: *mut Waiter, what: u32, rule_id: u32, now: u64) {
    // SAFETY: this CPU's scratch value; `waiter` null or the live WAITERS value found.
    unsafe {
        let s = &mut *scratch;
        let key: &WaitKey = &(*scratch).wait_key;
        match what {
            KEEP_FORGET => {
                if !waiter.is_null() {
                    let _ = WAITERS.remove(key);
                }
            }
            KEEP_PROBE => {
                if !waiter.is_null() {
                    let _ = WAITERS.remove(key);
                }
                defer_probe(scratch);
                if let Some(p) = PROBES.get_ptr_mut(s.probe_slot) {
                    let probe = ProbeSlot {
                        tag: s.probe_tag,
                        _pad: 0,
                        first_seen_ns: now,
                    };
                    // A racing CPU's write to the same slot only replaces one probe
                    // with another.
                    p.write_volatile(probe);
                }
            }
            KEEP_KNOCKS => {
                if !waiter.is_null() {
                    (&raw mut (*waiter).knocks).write_volatile(s.knocks);
                }
            }
            KEEP_WAITER => {
                let w = Waiter {
                    isn: s.isn,
                    rule_id,
                    knocks: s.knocks,
                };
                let _ = WAITERS.insert(key, w, 0);
            }
            _ => {}
        }
    }
}

const KEEP_NOTHING: u32 = 0;
const KEEP_FORGET: u32 = 1;
const KEEP_PROBE: u32 = 2;
const KEEP_KNOCKS: u32 = 3;
const KEEP_WAITER: u32 = 4;

/// `defer`: the group's waiting line decides (see `shaper_common::line`). A function
/// of its own (a BPF-to-BPF call) so its stack does not add to the drop path's; the
/// lookups and the writes are calls of their own too, and the big temporaries live in
/// this CPU's scratch value: the verifier bounds the stack of a whole chain of calls,
/// and the policer's frame takes half of it.
#[inline(never)]
pub(crate) fn defer(
    ctx: &XdpContext,
    attempt: &Attempt,
    rule: &RuleEntry,
    slot: *mut GroupSlot,
) -> Deferral {
    let scratch = SCRATCH.get_ptr_mut(0).unwrap_or(core::ptr::null_mut());
    // SAFETY: this CPU's scratch value, when there is one.
    let key_ptr = unsafe { &raw mut (*scratch).wait_key };
    let (false, false, Ok(isn)) = (
        slot.is_null(),
        scratch.is_null(),
        attempt.wait_key(ctx, key_ptr),
    ) else {
        return Deferral {
            reason: exit(rule.rule_id, Outcome::Dropped, Reason::Contended),
            became_congested: false,
        };
    };
    // SAFETY: this CPU's scratch value.
    unsafe { (*scratch).isn = isn };
    // SAFETY: a live GROUPS value.
    let group = unsafe { &raw mut (*slot).state };
    // SAFETY: an inlined helper without arguments.
    let now = exact_clock(unsafe { bpf_jiffies64() });
    // SAFETY: points into the live GROUPS value; CPUs may race on these fields, which
    // only shifts the order (the budget word is updated by compare-and-swap).
    let line: &mut LineState = unsafe { &mut (*group).line };
    // A quiet group's SYN needs no lookup (nor its probe hash, unless it is deferred).
    let waiter = if line.quiet(now) {
        // SAFETY: this CPU's scratch value.
        unsafe { (*scratch).known = found::NOTHING };
        core::ptr::null_mut()
    } else {
        defer_lookup(scratch)
    };
    // SAFETY: as above.
    let known = unsafe {
        match (*scratch).known {
            found::WAITING => Known::Waiting {
                knocks: (*scratch).knocks,
            },
            found::PROBED => Known::Probed {
                first_seen_ns: (*scratch).knocks.first_seen_ns,
            },
            _ => Known::Unknown,
        }
    };
    // Only a proven client's knock in a busy group asks the calendar.
    let cal = if matches!(known, Known::Unknown) {
        core::ptr::null_mut()
    } else {
        calendar(slot, rule.rule_id, scratch)
    };
    // SAFETY: null or a live LINES value; CPUs race on its slots, which only loses a
    // prediction (see `shaper_common::line`).
    let cal = unsafe { cal.as_mut() };
    let was_congested = now < line.congested_until_ns;
    let budget = GroupBudget { rule, group, now };
    // SAFETY: this CPU's scratch value.
    let knocks = unsafe { &mut (*scratch).knocks };
    // A waiting client knocking after its `max_wait`: its place is released (whether
    // or not this knock gets in, as under `drop`).
    if let Known::Waiting { knocks: k } = known
        && now.saturating_sub(k.first_seen_ns) > rule.max_wait_ns
    {
        count_released(rule.rule_id);
    }
    let decision = knock::<BpfLoop>(line, cal, &rule.line_rule(), known, now, &budget, knocks);
    let became_congested = !was_congested && now < line.congested_until_ns;
    let (outcome, reason, keep) = match decision {
        Decision::Admit => (Outcome::Admitted, Reason::Admitted, KEEP_FORGET),
        Decision::AdmitAfterWait { wait_ns } => {
            count_wait(rule.rule_id, wait_ns);
            (
                Outcome::AdmittedAfterWait,
                Reason::AdmittedAfterWait,
                KEEP_FORGET,
            )
        }
        Decision::Defer { remember } => {
            let keep = match remember {
                Remember::Nothing => KEEP_NOTHING,
                Remember::Probe => KEEP_PROBE,
                Remember::Knocks => KEEP_KNOCKS,
                Remember::Waiter => KEEP_WAITER,
            };
            (Outcome::Deferred, Reason::Deferred, keep)
        }
        Decision::QueueFull => (Outcome::QueueFull, Reason::QueueFull, KEEP_NOTHING),
    };
    count_group(group, outcome);
    let reason = exit(rule.rule_id, outcome, reason);
    if keep != KEEP_NOTHING {
        defer_keep(scratch, waiter, keep, rule.rule_id, now);
    }
    Deferral {
        reason,
        became_congested,
    }
}

/// A `defer` group just became congested (a debug record, off by default in the kernel).
#[inline(never)]
pub(crate) fn log_congested(ctx: &XdpContext, rule_id: u32) {
    debug!(
        ctx,
        "defer: a group of rule {} is congested; new clients wait in line", rule_id
    );
}
