//! The waiting line of `action = "defer"`: over quota, clients wait their turn, oldest
//! first, a spoofed flood cannot take their places, and no budget is left unused while
//! a proven client knocks.
//!
//! The line never sends anything: its poll is the client's own SYN retransmission (same
//! 4-tuple, same ISN, on its stack's schedule, [`crate::knocks`]). While a group is
//! **congested** (it refused an attempt in the last [`CONGESTION_HOLD_NS`]):
//!
//! 1. A first SYN is dropped and remembered in a *probe* (a slot of a direct-mapped
//!    table, cheap to overwrite): the client must prove a real TCP stack by knocking
//!    again. A spoofed flood fills probes, never the line.
//! 2. A knock that matches its probe is *proven*: the client joins the line (a bounded
//!    table of waiters with its first-seen time and its knocks so far), subject to the
//!    group's cap.
//! 3. A proven client's knock takes from the budget unless an **older** waiting client
//!    is expected to knock before the budget would overflow its burst. The group's
//!    [`Calendar`] holds, for the coming seconds, the oldest client expected to knock
//!    in each slot of time (every refused client's next knock is predicted from its
//!    stack's schedule and written there), and the budget's state says when it will
//!    be full (`tat`). So a younger knock leaves a token to an older client only when
//!    that client will come for it in time; otherwise it takes it, and no budget is
//!    lost while anyone knocks. An older client expected a moment ago
//!    ([`STILL_EXPECTED_NS`]) and not come yet still counts: timers that fire in one
//!    tick send their SYNs microseconds apart. A knock that is its client's last
//!    (Windows' third SYN, Linux's after 32 s) takes a token whenever the budget has
//!    room for one more besides, whoever is expected: that client will not come back,
//!    and the older ones still find one (with a burst of 2, only a full budget has).
//!
//! Every admission goes through the group's budget ([`crate::admit`]): the line orders
//! who gets the budget, it never adds to it.
//!
//! The line's fields and the calendar are shared by all CPUs and updated without
//! atomics (the budget word is the only exact one): two CPUs can lose a join count or
//! a prediction between them, which shifts the order slightly and never the budget; a
//! lost prediction only makes the line admit a younger client where it would have
//! waited.

use crate::{Verdict, knocks::Knocks};

const NS_PER_SEC: u64 = 1_000_000_000;

/// How long a group stays congested after it last refused an attempt.
pub const CONGESTION_HOLD_NS: u64 = 3 * NS_PER_SEC;

/// The line's state inside every group's entry (shared by all CPUs): whether it is
/// congested, and how many clients joined its line lately (the cap's count).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LineState {
    /// The group is congested until this time (monotonic ns).
    pub congested_until_ns: u64,
    /// The `max_wait`-long epoch that `q_cur` counts.
    pub q_epoch: u32,
    /// Clients that joined the line in this epoch and the previous one.
    pub q_cur: u32,
    pub q_prev: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<LineState>() == 24);

/// A rule's line parameters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LineRule {
    /// Most clients a group keeps in the line (joins over the last `max_wait`..2·`max_wait`).
    pub queue_cap: u32,
    /// A client's place is released after this long: its next knock is admitted if the
    /// budget allows at that moment (as under `drop`), else it starts again.
    pub max_wait_ns: u64,
}

/// Slots of the calendar's near ring, of 2^[`NEAR_SHIFT`] ns (33.6 ms) each: the next
/// 4.3 s, where knocks come a second apart and a timer is late by a few ms.
pub const NEAR_SLOTS: usize = 128;
pub const NEAR_SHIFT: u32 = 25;
/// Slots of the far ring, of 2^[`FAR_SHIFT`] ns (67 ms) each: the next 68 s, enough
/// for the longest gap any stack leaves (32 s). A slot keeps one client, so the ring
/// is finer than the timers of those gaps are late (up to 256 ms after a 4- to 16-s
/// gap): with a small burst the budget overflows within a fraction of a second, and a
/// slot as wide as that would hide every older client but its oldest (268-ms slots
/// ordered a burst of 2 at six times the budget at 0.61 in the host replay, 67-ms
/// slots at 0.69).
pub const FAR_SLOTS: usize = 1024;
pub const FAR_SHIFT: u32 = 26;
/// A knock expected this long ago that has not come yet is still expected: timers of
/// one tick fire together, and a prediction is good to a millisecond.
pub const STILL_EXPECTED_NS: u64 = 8_000_000;
/// A first-seen time in an entry: 2^[`AGE_SHIFT`] ns units (16.8 ms), 24 bits (ages
/// up to 39 hours compare right).
const AGE_SHIFT: u32 = 24;
const AGE_MASK: u32 = 0x00ff_ffff;

/// The expected knocks of a congested group's waiting clients: per slot of time, the
/// oldest client expected to knock in it (its first-seen time) and when in the slot.
/// One per congested `defer` group, in its own map (`LINES`), made when the group
/// first refuses a proven client.
///
/// Each ring covers the slots from its `base` (the slot of the latest operation) on;
/// an operation first clears the slots that time has left behind, so a slot never
/// holds a knock of a lap before. An entry is `first_seen << 8 | when`, 0 when empty:
/// 24 bits of first-seen time ([`AGE_SHIFT`] units) and the knock's place in its slot
/// in 256ths.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Calendar {
    pub near_base: u64,
    pub far_base: u64,
    pub near: [u32; NEAR_SLOTS],
    pub far: [u32; FAR_SLOTS],
}
const _: () = assert!(size_of::<Calendar>() == 16 + 4 * (NEAR_SLOTS + FAR_SLOTS));

impl Calendar {
    /// An empty calendar.
    pub const EMPTY: Calendar = Calendar {
        near_base: 0,
        far_base: 0,
        near: [0; NEAR_SLOTS],
        far: [0; FAR_SLOTS],
    };
}

impl Default for Calendar {
    fn default() -> Calendar {
        Calendar::EMPTY
    }
}

/// The entry for a client first seen at `first_seen_ns` knocking at `at` (in a slot of
/// 2^`shift` ns).
#[inline(always)]
const fn entry(first_seen_ns: u64, at: u64, shift: u32) -> u32 {
    let fs = ((first_seen_ns >> AGE_SHIFT) as u32) & AGE_MASK;
    let when = ((at >> (shift - 8)) & 0xff) as u32;
    let e = fs << 8 | when;
    if e == 0 { 1 } else { e }
}

/// How old, in [`AGE_SHIFT`] units, a client first seen at `fs` (24 bits) is at `now`.
#[inline(always)]
const fn age_units(fs: u32, now: u64) -> u32 {
    (((now >> AGE_SHIFT) as u32).wrapping_sub(fs)) & AGE_MASK
}

/// Is the client of entry `e` older than one first seen at `first_seen_ns`, at `now`?
/// (Within one unit counts as the same age: not older.)
#[inline(always)]
const fn older(e: u32, first_seen_ns: u64, now: u64) -> bool {
    let mine = ((first_seen_ns >> AGE_SHIFT) as u32) & AGE_MASK;
    age_units(e >> 8, now) > age_units(mine, now)
}

/// One round of a loop over calendar slots (a struct, not a closure: the XDP program
/// hands it to the `bpf_loop` helper by pointer, and a struct of values is smaller on
/// its stack than a closure's references).
pub trait Round {
    /// Round `i`; `false` stops the loop.
    fn round(&mut self, i: u32) -> bool;
}

/// Runs loops over calendar slots: on the host a plain loop; in the XDP program the
/// `bpf_loop` helper, whose body the verifier checks once instead of once per round
/// (a plain loop over the calendar's 384 slots is past what it accepts).
pub trait Repeat {
    /// Call `body.round(i)` for `i` in `0..n`, until it returns `false`.
    fn repeat<B: Round>(n: u32, body: &mut B);
}

/// A plain loop.
pub struct Plain;

impl Repeat for Plain {
    #[inline(always)]
    fn repeat<B: Round>(n: u32, body: &mut B) {
        let mut i = 0;
        while i < n {
            if !body.round(i) {
                return;
            }
            i += 1;
        }
    }
}

/// Clears the slots from `base` on.
struct Clear<'a, const N: usize> {
    slots: &'a mut [u32; N],
    base: u64,
}

impl<const N: usize> Round for Clear<'_, N> {
    #[inline(always)]
    fn round(&mut self, i: u32) -> bool {
        let pos = ((self.base + u64::from(i)) as usize) & (N - 1);
        if let Some(s) = self.slots.get_mut(pos) {
            *s = 0;
        }
        true
    }
}

/// Counts down `left` for each client older than `first_seen_ns` expected in (`now`,
/// `until`], from the slot of `now` on, and stops at 0. (As few fields as it needs:
/// the XDP program's calendar call keeps two on its frame.)
struct Find<'a, const N: usize> {
    slots: &'a [u32; N],
    now: u64,
    until: u64,
    first_seen_ns: u64,
    shift: u32,
    left: u32,
}

impl<const N: usize> Round for Find<'_, N> {
    #[inline(always)]
    fn round(&mut self, i: u32) -> bool {
        let slot = (self.now >> self.shift) + u64::from(i);
        if let Some(&e) = self.slots.get((slot as usize) & (N - 1))
            && e != 0
        {
            let at = (slot << self.shift) | (u64::from(e & 0xff) << (self.shift - 8));
            if at > self.now && at <= self.until && older(e, self.first_seen_ns, self.now) {
                self.left = self.left.saturating_sub(1);
                return self.left != 0;
            }
        }
        true
    }
}

/// One ring of the calendar: its slots, their width and its base.
struct Ring<'a, const N: usize> {
    slots: &'a mut [u32; N],
    base: &'a mut u64,
    shift: u32,
}

impl<const N: usize> Ring<'_, N> {
    /// Clear the slots time has left behind (at most the whole ring).
    #[inline(always)]
    fn advance<R: Repeat>(&mut self, now: u64) {
        let cur = now >> self.shift;
        let base = *self.base;
        if cur <= base {
            return;
        }
        let behind = if cur - base < N as u64 {
            (cur - base) as u32
        } else {
            N as u32
        };
        R::repeat(
            behind,
            &mut Clear {
                slots: &mut *self.slots,
                base,
            },
        );
        *self.base = cur;
    }

    /// Put a knock expected at `at` of a client first seen at `first_seen_ns`, if the
    /// ring reaches that far; keep the older of it and what the slot holds.
    #[inline(always)]
    fn record(&mut self, now: u64, at: u64, first_seen_ns: u64) -> bool {
        let slot = at >> self.shift;
        if slot < *self.base || slot - *self.base >= N as u64 {
            return false;
        }
        let e = entry(first_seen_ns, at, self.shift);
        if let Some(s) = self.slots.get_mut((slot as usize) & (N - 1))
            && (*s == 0 || older_entry(e, *s, now))
        {
            *s = e;
        }
        true
    }

    /// Empty the slot of a knock expected at `at` of a client first seen at
    /// `first_seen_ns` if it holds just that.
    #[inline(always)]
    fn forget(&mut self, at: u64, first_seen_ns: u64) {
        let slot = at >> self.shift;
        if slot < *self.base || slot - *self.base >= N as u64 {
            return;
        }
        let e = entry(first_seen_ns, at, self.shift);
        if let Some(s) = self.slots.get_mut((slot as usize) & (N - 1))
            && *s == e
        {
            *s = 0;
        }
    }

    /// `left` less the clients older than `first_seen_ns` expected to knock in (`now`,
    /// `until`], down to 0.
    #[inline(always)]
    fn older_expected<R: Repeat>(
        &self,
        now: u64,
        until: u64,
        first_seen_ns: u64,
        left: u32,
    ) -> u32 {
        let first = now >> self.shift;
        let last = until >> self.shift;
        let n = if last - first < N as u64 {
            (last - first + 1) as u32
        } else {
            N as u32
        };
        let mut find = Find {
            slots: &*self.slots,
            now,
            until,
            first_seen_ns,
            shift: self.shift,
            left,
        };
        R::repeat(n, &mut find);
        find.left
    }
}

/// Is entry `a`'s client older than entry `b`'s, at `now`?
#[inline(always)]
const fn older_entry(a: u32, b: u32, now: u64) -> bool {
    age_units(a >> 8, now) > age_units(b >> 8, now)
}

impl Calendar {
    #[inline(always)]
    fn rings(&mut self) -> (Ring<'_, NEAR_SLOTS>, Ring<'_, FAR_SLOTS>) {
        (
            Ring {
                slots: &mut self.near,
                base: &mut self.near_base,
                shift: NEAR_SHIFT,
            },
            Ring {
                slots: &mut self.far,
                base: &mut self.far_base,
                shift: FAR_SHIFT,
            },
        )
    }

    /// Expect a knock at `at` from a client first seen at `first_seen_ns`. Knocks
    /// beyond the far ring (68 s) are not kept. (A call of its own in the XDP program:
    /// its frame then stacks on the line's only while it runs.)
    #[cfg_attr(target_arch = "bpf", inline(never))]
    #[cfg_attr(not(target_arch = "bpf"), inline(always))]
    pub fn record<R: Repeat>(&mut self, now: u64, at: u64, first_seen_ns: u64) {
        if at <= now {
            return;
        }
        let (mut near, mut far) = self.rings();
        near.advance::<R>(now);
        far.advance::<R>(now);
        if !near.record(now, at, first_seen_ns) {
            far.record(now, at, first_seen_ns);
        }
    }

    /// Take back the knock expected at `at` from a client first seen at
    /// `first_seen_ns`, if its slot still holds it (a call of its own in the XDP
    /// program). Both rings are looked at: a knock expected far ahead went into the
    /// far ring, and a client often knocks before its typical time, when the near
    /// ring reaches that time too.
    #[cfg_attr(target_arch = "bpf", inline(never))]
    #[cfg_attr(not(target_arch = "bpf"), inline(always))]
    pub fn forget<R: Repeat>(&mut self, now: u64, at: u64, first_seen_ns: u64) {
        let (mut near, mut far) = self.rings();
        near.advance::<R>(now);
        far.advance::<R>(now);
        near.forget(at, first_seen_ns);
        far.forget(at, first_seen_ns);
    }

    /// Are at least `n` clients older than one first seen at `first_seen_ns` (at
    /// least one) expected to knock after `now` and no later than `until`? (A call of
    /// its own in the XDP program.)
    #[cfg_attr(target_arch = "bpf", inline(never))]
    #[cfg_attr(not(target_arch = "bpf"), inline(always))]
    pub fn older_expected<R: Repeat>(
        &mut self,
        now: u64,
        until: u64,
        first_seen_ns: u64,
        n: u32,
    ) -> bool {
        if until <= now {
            return false;
        }
        let (mut near, mut far) = self.rings();
        near.advance::<R>(now);
        far.advance::<R>(now);
        let left = near.older_expected::<R>(now, until, first_seen_ns, if n == 0 { 1 } else { n });
        left == 0 || far.older_expected::<R>(now, until, first_seen_ns, left) == 0
    }
}

/// The budget as the line sees it.
pub trait LineBudget {
    /// When the group's budget will be full if nobody takes from it (its GCRA state);
    /// at or before now: it is full, and a refused admission is lost.
    fn full_at(&self) -> u64;
    /// The group's budget (its rate and burst).
    fn budget(&self) -> crate::Budget;
    /// Take one admission (the group's budget, and the rule's ceiling).
    fn take(&self) -> Verdict;
}

/// What the data plane found about the SYN before asking the line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Known {
    /// Not seen (or not looked up because the group is quiet).
    Unknown,
    /// Its probe matches: this is a retransmission of a SYN first seen then.
    Probed { first_seen_ns: u64 },
    /// It is in the line, with its knocks so far.
    Waiting { knocks: Knocks },
}

/// What the data plane must remember after a refused SYN. The client's knocks are in
/// [`knock`]'s `knocks` argument (not carried here: the verifier refuses to copy an
/// enum whose payload is undefined on some paths).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Remember {
    /// Nothing new.
    Nothing,
    /// Write the probe with first-seen = now (and forget a stale waiter, if any).
    Probe,
    /// Add the client to the line with its knocks.
    Waiter,
    /// Keep the waiting client's knocks, this one included.
    Knocks,
}

/// The line's decision for one SYN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Admitted without waiting (the group was not congested).
    Admit,
    /// Admitted after waiting `wait_ns` since its first SYN (forget the waiter).
    AdmitAfterWait { wait_ns: u64 },
    /// Dropped; the client keeps (or takes) its place.
    Defer { remember: Remember },
    /// Dropped; a proven client could not join: the group's line is full.
    QueueFull,
}

impl LineState {
    /// Nothing to look up: not congested and nobody joined the line recently.
    #[inline(always)]
    pub fn quiet(&self, now: u64) -> bool {
        now >= self.congested_until_ns && self.q_cur == 0 && self.q_prev == 0
    }

    /// Count a client joining the line, if the group's cap allows.
    #[inline(always)]
    fn join(&mut self, now: u64, rule: &LineRule) -> bool {
        let epoch_len = if rule.max_wait_ns == 0 {
            NS_PER_SEC
        } else {
            rule.max_wait_ns
        };
        let epoch = (now / epoch_len) as u32;
        if epoch != self.q_epoch {
            self.q_prev = if epoch == self.q_epoch.wrapping_add(1) {
                self.q_cur
            } else {
                0
            };
            self.q_cur = 0;
            self.q_epoch = epoch;
        }
        if self.q_cur.saturating_add(self.q_prev) >= rule.queue_cap {
            return false;
        }
        self.q_cur = self.q_cur.saturating_add(1);
        true
    }

    #[inline(always)]
    fn congest(&mut self, now: u64) {
        self.congested_until_ns = now.saturating_add(CONGESTION_HOLD_NS);
    }
}

/// Decide one SYN of a `defer` rule's group. `calendar` is the group's (none: the line
/// cannot predict, and admits whoever knocks while the budget allows). For a proven
/// client, `knocks_out` receives its knocks with this one (what
/// [`Remember::Waiter`] and [`Remember::Knocks`] keep).
#[inline(always)]
pub fn knock<R: Repeat>(
    line: &mut LineState,
    calendar: Option<&mut Calendar>,
    rule: &LineRule,
    known: Known,
    now: u64,
    budget: &impl LineBudget,
    knocks_out: &mut Knocks,
) -> Decision {
    let congested = now < line.congested_until_ns;
    let (knocks, proven_now, before) = match known {
        Known::Unknown => return first_syn(line, congested, now, budget),
        Known::Probed { first_seen_ns } => {
            (Knocks::proof(first_seen_ns, now), true, Knocks::default())
        }
        Known::Waiting { knocks } => {
            let mut k = knocks;
            k.observe(now);
            (k, false, knocks)
        }
    };
    *knocks_out = knocks;
    let first_seen_ns = knocks.first_seen_ns;
    if first_seen_ns > now {
        return first_syn(line, congested, now, budget);
    }
    let age = now - first_seen_ns;
    if age > rule.max_wait_ns {
        // Its place is released. It is still a proven client (older than anyone in
        // line), so this knock gets what `drop` would give it; if the budget is spent
        // it starts again.
        if budget.take() == Verdict::Admit {
            return Decision::AdmitAfterWait { wait_ns: age };
        }
        line.congest(now);
        return Decision::Defer {
            remember: Remember::Probe,
        };
    }
    let mut calendar = calendar;
    // This knock was expected (from the previous one): take that back, so the
    // calendar holds only knocks still to come. A stack not known yet was expected two
    // seconds on, past this knock: taken back as well, and put again if it waits.
    if !proven_now && let Some(c) = calendar.as_mut() {
        c.forget::<R>(now, before.next().at, first_seen_ns);
    }
    let ask = if congested {
        let full = budget.full_at();
        // Admissions the budget has room for now: older clients expected in time keep
        // a token only if they would need every one of them.
        let room = u32::try_from(budget.budget().room(full, now)).unwrap_or(u32::MAX);
        // Full now: a refused token is lost. Its last knock, and room for one more:
        // it will not come back. Else only older clients expected before the budget
        // overflows, as many as it has room for, wait it out.
        full <= now
            || (knocks.is_last() && room >= 2)
            || !calendar.as_mut().is_some_and(|c| {
                c.older_expected::<R>(
                    now.saturating_sub(STILL_EXPECTED_NS),
                    full,
                    first_seen_ns,
                    room,
                )
            })
    } else {
        true
    };
    if ask && budget.take() == Verdict::Admit {
        return Decision::AdmitAfterWait { wait_ns: age };
    }
    line.congest(now);
    let remember = if proven_now {
        if !line.join(now, rule) {
            return Decision::QueueFull;
        }
        Remember::Waiter
    } else {
        Remember::Knocks
    };
    if let Some(c) = calendar {
        let at = knocks.next().at;
        // A knock after its `max_wait` has no place to keep.
        if at != 0 && at - first_seen_ns <= rule.max_wait_ns {
            c.record::<R>(now, at, first_seen_ns);
        }
    }
    Decision::Defer { remember }
}

/// A SYN the line does not know: admitted if the group is not congested and the budget
/// allows, else it must prove itself.
#[inline(always)]
fn first_syn(
    line: &mut LineState,
    congested: bool,
    now: u64,
    budget: &impl LineBudget,
) -> Decision {
    if !congested && budget.take() == Verdict::Admit {
        return Decision::Admit;
    }
    line.congest(now);
    Decision::Defer {
        remember: Remember::Probe,
    }
}

/// Hash of a SYN's identity (addresses, ports, ISN) as 32-bit words: the probe slot is
/// `hash & (slots − 1)`, the tag `(hash >> 32) | 1` (never 0, the empty slot).
#[inline(always)]
pub fn probe_hash(words: &[u32; 10]) -> u64 {
    let mut h: u64 = 0x243f_6a88_85a3_08d3;
    let mut i = 0;
    while i < words.len() {
        h = (h ^ u64::from(words[i])).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h ^= h >> 29;
        i += 1;
    }
    h
}

/// The tag stored in a probe slot for `hash`.
#[inline(always)]
pub const fn probe_tag(hash: u64) -> u32 {
    ((hash >> 32) as u32) | 1
}

#[cfg(test)]
#[path = "line/tests.rs"]
mod tests;
