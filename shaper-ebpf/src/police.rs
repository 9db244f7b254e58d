//! The policer: find the most specific rule (from the source block's cached entry, or
//! the rule tries), honour protection, then take from the group's (and the rule's
//! ceiling) budget with the shared admission logic: refusals surely over budget on the
//! tick clock, everything else on the exact clock.

use core::{
    intrinsics::{AtomicOrdering, atomic_cxchg},
    mem::MaybeUninit,
};

use aya_ebpf::{
    cty::c_void,
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_jiffies64, bpf_loop},
    },
    maps::lpm_trie::Key,
    programs::XdpContext,
};
use aya_log_ebpf::debug;
use shaper_common::{
    Budget, Outcome, Reason, TatCell, Verdict, admit_two_clocks, group_v4, group_v6, jiffies,
    line::{
        Calendar, Decision, Known, LineBudget, LineState, Remember, Repeat, Round, knock,
        probe_hash, probe_tag,
    },
    maps::{
        GEN_BITS, GroupSlot, GroupState, PROBE_SLOTS, PrefixV4, PrefixV6, ProbeSlot, RuleEntry,
        UNOWNED, WaitKey, Waiter, action, config, family, rule_flags,
    },
};

use crate::{
    maps::{
        CONFIG, LINES, PROBES, PROTECTED_PORTS, RULE_BUDGETS, RULES, RULES_V4, RULES_V6, SCRATCH,
        Scratch, WAITERS,
    },
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
    if rule.action == action::DEFER && rule.interval_ns != 0 {
        // Null when the group table had no room (five arguments at most on BPF).
        let d = defer(ctx, attempt, rule, group.slot());
        if d.became_congested {
            log_congested(ctx, rule.rule_id);
        }
        return d.reason;
    }
    let verdict = budget_verdict(rule, group.state());
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
#[inline(never)]
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
#[inline(never)]
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
    admit_budget(rule, group, coarse, lag, || exact_clock(jiffies))
}

/// Admit against the group's budget word and, if the rule has one, its ceiling, on
/// the exact clock. A function of its own: `defer` calls it from several places, and
/// the verifier then checks one body instead of one copy per place.
#[inline(never)]
fn take_budget(rule: &RuleEntry, group: *mut GroupState, now: u64) -> Verdict {
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

/// A new group's state: full budget, empty line. In global data, not on the stack.
pub(crate) static NEW_GROUP: GroupState = GroupState {
    tat_ns: 0,
    rule_id: UNOWNED,
    epoch: 0,
    line: LineState {
        congested_until_ns: 0,
        q_epoch: 0,
        q_cur: 0,
        q_prev: 0,
        _pad: 0,
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
fn defer(ctx: &XdpContext, attempt: &Attempt, rule: &RuleEntry, slot: *mut GroupSlot) -> Deferral {
    let scratch = SCRATCH.get_ptr_mut(0).unwrap_or(core::ptr::null_mut());
    // SAFETY: this CPU's scratch value, when there is one.
    let key_ptr = unsafe { &raw mut (*scratch).wait_key };
    let (false, false, Ok(isn)) = (
        slot.is_null(),
        scratch.is_null(),
        attempt.wait_key(ctx, key_ptr),
    ) else {
        count_rule(rule.rule_id, Outcome::Dropped);
        return Deferral {
            reason: Reason::Contended,
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
    let decision = knock::<BpfLoop>(line, cal, &rule.line_rule(), known, now, &budget, knocks);
    let became_congested = !was_congested && now < line.congested_until_ns;
    let (reason, keep) = match decision {
        Decision::Admit => {
            count_rule(rule.rule_id, Outcome::Admitted);
            (Reason::Admitted, KEEP_FORGET)
        }
        Decision::AdmitAfterWait { wait_ns } => {
            count_rule(rule.rule_id, Outcome::AdmittedAfterWait);
            count_wait(rule.rule_id, wait_ns);
            (Reason::AdmittedAfterWait, KEEP_FORGET)
        }
        Decision::Defer { remember } => {
            count_rule(rule.rule_id, Outcome::Deferred);
            let keep = match remember {
                Remember::Nothing => KEEP_NOTHING,
                Remember::Probe => KEEP_PROBE,
                Remember::Knocks => KEEP_KNOCKS,
                Remember::Waiter => KEEP_WAITER,
            };
            (Reason::Deferred, keep)
        }
        Decision::QueueFull => {
            count_rule(rule.rule_id, Outcome::QueueFull);
            (Reason::QueueFull, KEEP_NOTHING)
        }
    };
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
fn log_congested(ctx: &XdpContext, rule_id: u32) {
    debug!(
        ctx,
        "defer: a group of rule {} is congested; new clients wait in line", rule_id
    );
}
