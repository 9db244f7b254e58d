//! The policer: find the most specific rule (from the source block's cached entry, or
//! the rule tries), honour protection, find the group, then take from its budget
//! ([`crate::budget`]) or hand the attempt to its waiting line ([`crate::defer`]).

use core::mem::MaybeUninit;

use aya_ebpf::{maps::lpm_trie::Key, programs::XdpContext};
use shaper_common::{
    Outcome, Reason, Verdict, group_v4, group_v6,
    line::LineState,
    maps::{
        GEN_BITS, GroupCounts, GroupState, PrefixV4, PrefixV6, RuleEntry, UNOWNED, action, config,
        family, rule_flags,
    },
};

use crate::{
    budget::budget_verdict,
    defer::{defer, log_congested},
    maps::{CONFIG, PROTECTED_PORTS, RULES, RULES_V4, RULES_V6},
    parse::{Addr, Attempt, Source},
    stats::count_rule,
    table::{self, Found, Gk},
};

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
                return exit(rule.rule_id, Outcome::Protected, Reason::Protected);
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
        return exit(rule.rule_id, Outcome::Protected, Reason::Protected);
    }
    if rule.action == action::ALLOW {
        return exit(rule.rule_id, Outcome::Admitted, Reason::Admitted);
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
    let state = group.state();
    let verdict = budget_verdict(rule, state);
    let (outcome, reason) = match (verdict, rule.action) {
        (Verdict::Admit, _) => (Outcome::Admitted, Reason::Admitted),
        (_, action::MONITOR) => (Outcome::WouldDrop, Reason::WouldDrop),
        (Verdict::Contended, _) => (Outcome::Dropped, Reason::Contended),
        _ => (Outcome::Dropped, Reason::Dropped),
    };
    if let Some(g) = state {
        count_group(g, outcome);
    }
    exit(rule.rule_id, outcome, reason)
}

/// Count an attempt's outcome in its group's counters (no atomics: see
/// [`GroupCounts`]).
#[inline(always)]
pub(crate) fn count_group(group: *mut GroupState, outcome: Outcome) {
    // SAFETY: a live GROUPS value; the counters are words of their own, and a race
    // between CPUs only loses a count.
    if let Some(c) = unsafe { (*group).counts.of(outcome) } {
        *c = c.wrapping_add(1);
    }
}

/// Count the attempt's outcome under its rule and return the packet's reason: every
/// exit of the policer that found a rule goes through here.
#[inline(always)]
pub(crate) fn exit(rule_id: u32, outcome: Outcome, reason: Reason) -> Reason {
    count_rule(rule_id, outcome);
    reason
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
    counts: GroupCounts {
        admitted: 0,
        dropped: 0,
        deferred: 0,
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
