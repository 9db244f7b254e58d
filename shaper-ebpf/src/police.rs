//! The policer: find the most specific rule (from the source block's cached entry, or
//! the rule tries), honour protection, then take from the group's (and the rule's
//! ceiling) budget with the shared admission logic: refusals surely over budget on the
//! tick clock, everything else on the exact clock.

use core::{
    intrinsics::{AtomicOrdering, atomic_cxchg},
    mem::MaybeUninit,
};

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, generated::bpf_jiffies64},
    maps::lpm_trie::Key,
    programs::XdpContext,
};
use aya_log_ebpf::debug;
use shaper_common::{
    Budget, Outcome, Reason, TatCell, Verdict, admit_two_clocks, group_v4, group_v6, jiffies,
    line::{AGE_BUCKETS, Decision, Known, LineState, Remember, knock, probe_hash, probe_tag},
    maps::{
        GEN_BITS, GroupState, PROBE_SLOTS, PrefixV4, PrefixV6, ProbeSlot, RuleEntry, UNOWNED,
        WaitKey, Waiter, action, config, family, rule_flags,
    },
};

use crate::{
    maps::{CONFIG, PROBES, PROTECTED_PORTS, RULE_BUDGETS, RULES, RULES_V4, RULES_V6, WAITERS},
    parse::{Addr, Attempt, Source},
    stats::{count_rule, count_wait},
    table::{self, Found, Gk},
};

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
fn coarse_clock() -> (u64, u64, u64) {
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
fn exact_clock(jiffies: u64) -> u64 {
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

/// The policy a packet sees, read once: its epoch (whose parity is the generation of
/// the rule tries' keys), that generation's probe lengths, and the group table's seed.
struct View {
    epoch: u32,
    pgen: u8,
    probe_v4: u8,
    probe_v6: u8,
    seed: u64,
}

#[inline(always)]
fn view() -> View {
    let (word, seed) = match CONFIG.get_ptr(0) {
        // SAFETY: a live map value, 8-aligned; the daemon stores the word with one
        // store, and the seed once, before the program runs on the map.
        Some(c) => unsafe {
            (
                core::ptr::read_volatile(&raw const (*c).word),
                core::ptr::read_volatile(&raw const (*c).seed),
            )
        },
        None => (0, 0),
    };
    let (epoch, probe_v4, probe_v6) = config::parts(word);
    View {
        epoch,
        pgen: (epoch & 1) as u8,
        probe_v4,
        probe_v6,
        seed,
    }
}

/// Decide what happens to one attempt.
///
/// The source's probe entry (its address masked to the family's probe length) names
/// the rule of every source in its block once one attempt there has looked it up in
/// this epoch: a known block's attempts skip the rule tries. A probe entry is its
/// rule's group too when the rule groups by the probe length.
#[inline(always)]
pub fn police(ctx: &XdpContext, attempt: &Attempt) -> Reason {
    let v = view();
    let (family, addr, probe_len) = match attempt.source {
        Source::V4(Addr(a)) => (family::V4, v4_key(a), v.probe_v4),
        Source::V6(Addr(a)) => (family::V6, a, v.probe_v6),
    };
    let mut key = group_key(family, addr, probe_len, v.seed);
    let mut probe = table::find(&key);
    let rule_id = match cached_rule(probe, v.epoch) {
        UNOWNED => {
            let found = match attempt.source {
                Source::V4(Addr(a)) => rule_v4(v.pgen, a),
                Source::V6(Addr(a)) => rule_v6(v.pgen, a),
            };
            let Some(rule) = found else {
                return Reason::NoRule;
            };
            if rule.flags & rule_flags::PROTECTED != 0 {
                count_rule(rule.rule_id, Outcome::Protected);
                return Reason::Protected;
            }
            // Only rules that keep group state cache: a rule without (allow, rate 0)
            // never puts entries in the group table, so a flood of new sources under it
            // cannot push other groups out.
            let stateful = rule.action != action::ALLOW && rule.interval_ns != 0;
            if stateful && rule.flags & rule_flags::NO_CACHE == 0 {
                probe = cache(probe, &key, rule.rule_id, v.epoch);
            }
            rule.rule_id
        }
        id => id,
    };
    // The rule-id table holds the trie's entry too (written before the epoch that uses
    // it): both paths go on with a pointer into the same map, and the verifier checks
    // what follows once for both.
    let Some(rule) = RULES.get(rule_id) else {
        return Reason::NoRule;
    };
    if port_protected(attempt.dport, v.pgen) {
        count_rule(rule.rule_id, Outcome::Protected);
        return Reason::Protected;
    }
    if rule.action == action::ALLOW {
        count_rule(rule.rule_id, Outcome::Admitted);
        return Reason::Admitted;
    }
    // The group's state, unless the rule has no budget at all (rate 0).
    let group = if rule.interval_ns == 0 {
        Found::NONE
    } else if rule.group_len == probe_len {
        group_state(probe, &key, rule.rule_id)
    } else {
        // The probe key is done with: its stack slot takes the group's key, and the
        // seed is read again rather than kept across the rule lookup (a spill). The
        // frame must stay within what the call to `defer` leaves of the stack.
        key = group_key(family, addr, rule.group_len, view().seed);
        group_state(Found::NONE, &key, rule.rule_id)
    };
    let group = group.state();
    if rule.action == action::DEFER && rule.interval_ns != 0 {
        // Null when the group table had no room (five arguments at most on BPF).
        let d = defer(ctx, attempt, rule, group.unwrap_or(core::ptr::null_mut()));
        if d.became_congested {
            log_congested(ctx, rule.rule_id);
        }
        return d.reason;
    }
    let verdict = budget_verdict(rule, group);
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

/// The rule a probe entry names for its block in `epoch`, if it was stamped in it;
/// else [`UNOWNED`] (a word, not an `Option`: the verifier refuses the undefined
/// payload of a `None` the compiler would keep in a register).
#[inline(always)]
fn cached_rule(f: Found, epoch: u32) -> u32 {
    let Some(p) = f.state() else {
        return UNOWNED;
    };
    // SAFETY: a live GROUPS value; the epoch and rule id words are written whole.
    let (stamp, rule_id) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*p).epoch),
            core::ptr::read_volatile(&raw const (*p).rule_id),
        )
    };
    // The tag again: the slot still holds the block (not reclaimed while read).
    if epoch != 0 && stamp == epoch && f.still() {
        rule_id
    } else {
        UNOWNED
    }
}

/// The group table key for `addr` masked to `len` bits, as words, with its hash.
#[inline(always)]
fn group_key(family: u8, addr: [u8; 16], len: u8, seed: u64) -> Gk {
    let masked = if family == family::V4 {
        let [a0, a1, a2, a3, ..] = addr;
        v4_key(group_v4([a0, a1, a2, a3], len))
    } else {
        group_v6(addr, len)
    };
    let [w1, w2, w3, w4] = words(masked);
    let w = [u32::from_ne_bytes([family, len, 0, 0]), w1, w2, w3, w4];
    Gk {
        w,
        hash: shaper_common::table::hash(w, seed),
    }
}

/// Remember that every source of the probe block is under `rule_id` in `epoch`: the
/// block's probe entry (placed if need be) is claimed for the rule, then stamped.
/// Returns the entry.
#[inline(always)]
fn cache(probe: Found, key: &Gk, rule_id: u32, epoch: u32) -> Found {
    let f = group_state(probe, key, rule_id);
    let Some(p) = f.state() else {
        return Found::NONE;
    };
    // SAFETY: a live GROUPS value. Written after the rule id: a CPU that reads this
    // epoch reads the rule id it stands for.
    unsafe { core::ptr::write_volatile(&raw mut (*p).epoch, epoch) };
    // SAFETY: as above.
    let owner = unsafe { core::ptr::read_volatile(&raw const (*p).rule_id) };
    if owner != rule_id || !f.still() {
        // The slot went to another key meanwhile (or a CPU that found it before that
        // wrote its own rule into it): take the stamp back, or a block would be read as
        // under another rule for the whole epoch.
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(&raw mut (*p).epoch, 0) };
        return Found::NONE;
    }
    f
}

#[inline(always)]
fn v4_key(a: [u8; 4]) -> [u8; 16] {
    let [a0, a1, a2, a3] = a;
    [a0, a1, a2, a3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

#[inline(always)]
fn port_protected(port: u16, pgen: u8) -> bool {
    matches!(PROTECTED_PORTS.get(u32::from(port)), Some(&v) if v & (1 << pgen) != 0)
}

/// 16 address bytes as four native-endian words, in memory order.
#[inline(always)]
fn words(a: [u8; 16]) -> [u32; 4] {
    match a.as_chunks::<4>().0 {
        [c0, c1, c2, c3] => [
            u32::from_ne_bytes(*c0),
            u32::from_ne_bytes(*c1),
            u32::from_ne_bytes(*c2),
            u32::from_ne_bytes(*c3),
        ],
        // Unreachable: sixteen bytes are four chunks of four.
        _ => [0; 4],
    }
}

/// An LPM key on the stack, 8-aligned and written with volatile word stores: the build
/// allows misaligned stores, which the verifier refuses on the stack, and the compiler
/// would otherwise merge the generation word and the address into one.
#[repr(C, align(8))]
struct LpmKey<K>(Key<K>);

/// The rule for an IPv4 source in policy generation `pgen`.
#[inline(always)]
fn rule_v4(pgen: u8, a: [u8; 4]) -> Option<&'static RuleEntry> {
    let mut key = MaybeUninit::<LpmKey<PrefixV4>>::uninit();
    let w = key.as_mut_ptr().cast::<u32>();
    // SAFETY: three aligned words cover the key (prefix length, generation, address).
    unsafe {
        w.write_volatile(GEN_BITS + 32);
        w.add(1).write_volatile(u32::from(pgen).to_be());
        w.add(2).write_volatile(u32::from_ne_bytes(a));
        RULES_V4.get(&key.assume_init_ref().0)
    }
}

/// The rule for an IPv6 source in policy generation `pgen`.
#[inline(always)]
fn rule_v6(pgen: u8, a: [u8; 16]) -> Option<&'static RuleEntry> {
    let mut key = MaybeUninit::<LpmKey<PrefixV6>>::uninit();
    let w = key.as_mut_ptr().cast::<u32>();
    let [w0, w1, w2, w3] = words(a);
    // SAFETY: six aligned words cover the key.
    unsafe {
        w.write_volatile(GEN_BITS + 128);
        w.add(1).write_volatile(u32::from(pgen).to_be());
        w.add(2).write_volatile(w0);
        w.add(3).write_volatile(w1);
        w.add(4).write_volatile(w2);
        w.add(5).write_volatile(w3);
        RULES_V6.get(&key.assume_init_ref().0)
    }
}

/// Take from the group's budget and the rule's ceiling. An attempt surely over the
/// group's budget is refused on the coarse clock (a few ns) without reading the exact
/// one (tens of ns): the same verdicts, cheaper under a flood.
#[inline(always)]
fn budget_verdict(rule: &RuleEntry, group: Option<*mut GroupState>) -> Verdict {
    if rule.interval_ns == 0 {
        // Rate 0: nothing is admitted; no state to touch.
        return Verdict::OverGroup;
    }
    let Some(group) = group else {
        return Verdict::Contended;
    };
    let (coarse, lag, jiffies) = coarse_clock();
    admit_budget(rule, group, 0, coarse, lag, || exact_clock(jiffies))
}

/// Admit against the group's budget word and, if the rule has one, its ceiling, on
/// the exact clock. A function of its own: `defer` calls it from several places, and
/// the verifier then checks one body instead of one copy per place.
#[inline(never)]
fn take_budget(rule: &RuleEntry, group: *mut GroupState, now: u64, reserve: u64) -> Verdict {
    // No coarse reading can be sure (its lag covers all time): the exact clock decides.
    admit_budget(rule, group, reserve, 0, u64::MAX, || now)
}

/// [`take_budget`] with two clocks (see `shaper_common::admit_two_clocks`), inlined
/// into the `drop` path.
#[inline(always)]
fn admit_budget(
    rule: &RuleEntry,
    group: *mut GroupState,
    reserve: u64,
    coarse: u64,
    lag: u64,
    exact: impl FnOnce() -> u64,
) -> Verdict {
    let group_budget = Budget {
        interval_ns: rule.interval_ns,
        tolerance_ns: rule.tolerance_ns,
    }
    .reserving(reserve);
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

/// A new group's state: full budget, empty line. In global data, not on the stack.
pub(crate) static NEW_GROUP: GroupState = GroupState {
    tat_ns: 0,
    rule_id: UNOWNED,
    epoch: 0,
    line: LineState {
        congested_until_ns: 0,
        sec: 0,
        hist: [0; AGE_BUCKETS],
        thr: 0,
        q_epoch: 0,
        q_cur: 0,
        q_prev: 0,
    },
};

/// The slot of `key` (`known` if the caller found it already), placed on its first
/// attempt, owned by `rule_id`: an entry another rule owned (under an older policy)
/// starts again with a full budget and an empty line.
#[inline(always)]
fn group_state(known: Found, key: &Gk, rule_id: u32) -> Found {
    let f = if known.state().is_some() {
        known
    } else {
        table::find_or_insert(key)
    };
    let Some(p) = f.state() else {
        return Found::NONE;
    };
    // SAFETY: a live GROUPS value.
    let owner = unsafe { core::ptr::read_volatile(&raw const (*p).rule_id) };
    if owner != rule_id {
        if owner != UNOWNED {
            // Only when a new policy gives the key to another rule. CPUs racing here
            // write the same values.
            reset(p);
        }
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(&raw mut (*p).rule_id, rule_id) };
    }
    f
}

/// Give a group its new state back (a function of its own: rare, and its copy is long).
#[inline(never)]
fn reset(p: *mut GroupState) {
    // SAFETY: a live GROUPS value; the copy is of a whole, aligned GroupState.
    unsafe {
        core::ptr::write_volatile(&raw mut (*p).tat_ns, 0);
        core::ptr::write_volatile(&raw mut (*p).epoch, 0);
        (&raw mut (*p).line).write(NEW_GROUP.line);
    }
}

/// What [`defer`] decided, and whether the group just became congested: the caller
/// writes that log record, so the logger's frame never stacks on `defer`'s.
struct Deferral {
    reason: Reason,
    became_congested: bool,
}

/// `defer`: the group's waiting line decides (see `shaper_common::line`). A function
/// of its own (a BPF-to-BPF call) so its stack does not add to the drop path's.
#[inline(never)]
fn defer(
    ctx: &XdpContext,
    attempt: &Attempt,
    rule: &RuleEntry,
    group: *mut GroupState,
) -> Deferral {
    let mut key = MaybeUninit::<WaitKey>::uninit();
    let (false, Ok(isn)) = (group.is_null(), attempt.wait_key(ctx, key.as_mut_ptr())) else {
        count_rule(rule.rule_id, Outcome::Dropped);
        return Deferral {
            reason: Reason::Contended,
            became_congested: false,
        };
    };
    // SAFETY: `wait_key` returned `Ok`: it wrote the whole key.
    let key: &WaitKey = unsafe { key.assume_init_ref() };
    // SAFETY: an inlined helper without arguments.
    let now = exact_clock(unsafe { bpf_jiffies64() });
    // SAFETY: points into the live GROUPS value; CPUs may race on these fields, which
    // only shifts the order (the budget word is updated by compare-and-swap).
    let line: &mut LineState = unsafe { &mut (*group).line };
    // The probe slot and tag of this SYN: not needed for a quiet group's SYN unless it
    // is deferred (then it has to prove itself).
    let probe = || {
        let hash = probe_hash(&key.probe_words(isn));
        ((hash as u32) & (PROBE_SLOTS - 1), probe_tag(hash))
    };
    let mut waiting = false;
    let known = if line.quiet(now) {
        Known::Unknown
    } else {
        let (slot, tag) = probe();
        // SAFETY: the value is copied out right away.
        match unsafe { WAITERS.get(key) }.copied() {
            Some(w) if w.isn == isn => {
                waiting = true;
                Known::Waiting {
                    first_seen_ns: w.first_seen_ns,
                }
            }
            _ => match PROBES.get(slot) {
                Some(p) if p.tag == tag => Known::Probed {
                    first_seen_ns: p.first_seen_ns,
                },
                _ => Known::Unknown,
            },
        }
    };
    let was_congested = now < line.congested_until_ns;
    let decision = knock(line, &rule.line_rule(), known, now, |reserve| {
        take_budget(rule, group, now, reserve)
    });
    let became_congested = !was_congested && now < line.congested_until_ns;
    let reason = match decision {
        Decision::Admit => {
            if waiting {
                let _ = WAITERS.remove(key);
            }
            count_rule(rule.rule_id, Outcome::Admitted);
            Reason::Admitted
        }
        Decision::AdmitAfterWait { wait_ns } => {
            if waiting {
                let _ = WAITERS.remove(key);
            }
            count_rule(rule.rule_id, Outcome::AdmittedAfterWait);
            count_wait(rule.rule_id, wait_ns);
            Reason::AdmittedAfterWait
        }
        Decision::Defer { remember } => {
            match remember {
                Remember::Nothing => {}
                Remember::Probe => {
                    if waiting {
                        let _ = WAITERS.remove(key);
                    }
                    let (slot, tag) = probe();
                    if let Some(p) = PROBES.get_ptr_mut(slot) {
                        let probe = ProbeSlot {
                            tag,
                            _pad: 0,
                            first_seen_ns: now,
                        };
                        // SAFETY: a checked slot of the array; a racing CPU's write
                        // to the same slot only replaces one probe with another.
                        unsafe { p.write_volatile(probe) };
                    }
                }
                Remember::Waiter { first_seen_ns } => {
                    let w = Waiter {
                        isn,
                        rule_id: rule.rule_id,
                        first_seen_ns,
                    };
                    let _ = WAITERS.insert(key, w, 0);
                }
            }
            count_rule(rule.rule_id, Outcome::Deferred);
            Reason::Deferred
        }
        Decision::QueueFull => {
            count_rule(rule.rule_id, Outcome::QueueFull);
            Reason::QueueFull
        }
    };
    Deferral {
        reason,
        became_congested,
    }
}

/// A `defer` group just became congested (a debug record, off by default in the kernel).
#[inline(never)]
fn log_congested(ctx: &XdpContext, rule_id: u32) {
    debug!(
        ctx,
        "defer: a group of rule {} is congested; new clients wait in line", rule_id
    );
}
