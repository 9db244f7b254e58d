//! Map names, sizes and the `#[repr(C)]` layouts of their keys and values.
//!
//! Layout rules: no `bool`, `Option` or enums in map values (a `u8`/`u32` instead), every
//! padding byte spelled out as `_pad`, and a size assertion for every type, so that the
//! kernel and the daemon can never disagree on a layout silently.

use core::mem::{align_of, size_of};

/// The XDP program's name in the object file.
pub const PROGRAM_NAME: &str = "shaper";
/// A bare `XDP_PASS` program shipped in the same object: the baseline of `xtask bench`.
pub const BASELINE_PROGRAM_NAME: &str = "shaper_baseline";

/// LPM trie: source IPv4 prefix → [`RuleEntry`]. Written by the daemon.
pub const MAP_RULES_V4: &str = "RULES_V4";
/// LPM trie: source IPv6 prefix → [`RuleEntry`]. Written by the daemon.
pub const MAP_RULES_V6: &str = "RULES_V6";
/// Array indexed by TCP destination port → `u32`, bit G set if the port is protected in
/// policy generation G. Written by the daemon.
pub const MAP_PROTECTED_PORTS: &str = "PROTECTED_PORTS";
/// Array of [`GroupSlot`]: the group table (`crate::table`), a power of two of slots,
/// mmap-able so the daemon scans it through memory. Written by the program.
pub const MAP_GROUPS: &str = "GROUPS";
/// Array indexed by rule id → [`RuleBudget`] (the rule's ceiling). Written by the program,
/// reset by the daemon when a rule id is (re)assigned.
pub const MAP_RULE_BUDGETS: &str = "RULE_BUDGETS";
/// Per-CPU array indexed by rule id → [`RuleStats`]. Written by the program.
pub const MAP_RULE_STATS: &str = "RULE_STATS";
/// Per-CPU array indexed by [`crate::Reason`] → `u64`. Written by the program.
pub const MAP_GLOBAL_STATS: &str = "GLOBAL_STATS";
/// LRU hash: [`WaitKey`] → [`Waiter`], the clients waiting in line. Written by the program.
pub const MAP_WAITERS: &str = "WAITERS";
/// Array of [`ProbeSlot`]: first SYNs of congested groups, waiting for a retransmission
/// to prove them. Written by the program.
pub const MAP_PROBES: &str = "PROBES";
/// LRU hash: [`LineKey`] → [`crate::line::Calendar`], the expected knocks of each
/// congested `defer` group's waiting clients. Written by the program.
pub const MAP_LINES: &str = "LINES";

/// Default number of rules (rule ids). The loader may raise it before load.
pub const MAX_RULES: u32 = 4096;
/// Default capacity of the rule tries (rules plus protected prefixes).
pub const MAX_PREFIXES: u32 = 8192;
/// Default number of group table slots (a power of two; the loader rounds a capacity
/// up to one). Idle groups give their slots up; a group evicted from a full window
/// starts again with a full burst, and the rule's `ceiling` bounds what that can add.
pub const MAX_GROUPS: u32 = 131_072;
/// Default number of clients waiting in line, all groups together (LRU).
pub const MAX_WAITERS: u32 = 65_536;
/// Default number of congested `defer` groups with a calendar at once (LRU, 4.5 KiB
/// each; only a group that refused a proven client gets one, so a spoofed flood makes
/// none). A group without one still admits in turn as the budget allows; it only
/// cannot hold a token for an older client.
pub const MAX_LINES: u32 = 4_096;
/// Default number of probe slots (a power of two). A spoofed flood of F SYN/s overwrites
/// a given probe within one second with probability ≈ F / PROBE_SLOTS; the client then
/// proves itself at its next retransmission instead.
pub const PROBE_SLOTS: u32 = 1 << 20;
/// Number of TCP ports (size of `PROTECTED_PORTS`).
pub const PORTS: u32 = 65_536;

/// What a rule does with attempts over its budget.
pub mod action {
    /// Never limit; count as admitted.
    pub const ALLOW: u8 = 1;
    /// Count what would be limited, never drop.
    pub const MONITOR: u8 = 2;
    /// Drop over budget.
    pub const DROP: u8 = 3;
    /// Over budget, keep the client in the waiting line (see [`crate::line`]).
    pub const DEFER: u8 = 4;
}

/// [`RuleEntry::flags`] bits.
pub mod rule_flags {
    /// The prefix is protected: attempts always pass (lock-out guard).
    pub const PROTECTED: u8 = 1;
    /// The sources of this entry's probe block are not all under this entry: a more
    /// specific prefix lies inside the block (or the entry is inside it). The program
    /// must not cache the rule for the block.
    pub const NO_CACHE: u8 = 2;
}

/// The data of an IPv4 LPM key (`aya` adds the prefix length in front): the policy
/// generation as a big-endian 32-bit word, then the address. Entries of both
/// generations live in one trie; a key's prefix length counts the generation word
/// ([`GEN_BITS`]) too. A whole word keeps the address 4-aligned, so the trie compares
/// it in one step and the program writes it with one store.
pub type PrefixV4 = [u8; 8];
/// The data of an IPv6 LPM key: generation word, address.
pub type PrefixV6 = [u8; 20];
/// Bits of the generation in front of an LPM key's address.
pub const GEN_BITS: u32 = 32;

/// The LPM key data of `addr` in policy generation `g`.
pub fn gen_key<const N: usize, const M: usize>(g: u8, addr: &[u8; N]) -> [u8; M] {
    let mut k = [0u8; M];
    let w = u32::from(g).to_be_bytes();
    let mut i = 0;
    while i < M {
        k[i] = if i < 4 {
            w[i]
        } else if i - 4 < N {
            addr[i - 4]
        } else {
            0
        };
        i += 1;
    }
    k
}

/// The policy generation of an LPM key's data.
pub fn key_generation(data: &[u8]) -> Option<u8> {
    match data {
        [0, 0, 0, g, ..] => Some(*g),
        _ => None,
    }
}

/// Array of one [`Config`]: the policy epoch and its probe lengths, one word the daemon
/// stores atomically (through the map's memory) and a packet reads once, and the group
/// table's hash seed.
/// The daemon writes a new policy under the other generation (the epoch's parity),
/// then stores the next epoch: a packet sees one whole policy, never a mix.
pub const MAP_CONFIG: &str = "CONFIG";
/// Array indexed by rule id → [`RuleEntry`]: what a group's cached rule id stands for.
/// Written by the daemon before the epoch that uses it begins.
pub const MAP_RULES: &str = "RULES";

/// The value of `CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// The [`config`] word.
    pub word: u64,
    /// The group table's hash seed: random, written once when the map is made (before
    /// the program runs on it), kept with the pinned table it hashes.
    pub seed: u64,
}
const _: () = assert!(size_of::<Config>() == 16);

/// The `CONFIG` word.
pub mod config {
    /// The word: the epoch (bumped by every apply; its parity is the generation of the
    /// rule tries' keys; 0 before the first policy) in the low 32 bits, then the IPv4
    /// and IPv6 probe lengths, a byte each.
    #[inline(always)]
    pub const fn word(epoch: u32, probe_v4: u8, probe_v6: u8) -> u64 {
        epoch as u64 | (probe_v4 as u64) << 32 | (probe_v6 as u64) << 40
    }

    /// `(epoch, probe_v4, probe_v6)` of a word.
    #[inline(always)]
    pub const fn parts(word: u64) -> (u32, u8, u8) {
        (word as u32, (word >> 32) as u8, (word >> 40) as u8)
    }
}
/// Array indexed by rule id → `u64` hash of the rule's definition (0: free). Written and
/// read by the daemon only; pinned, so a restarted daemon keeps each rule's id (and its
/// counters and group state).
pub const MAP_RULE_IDS: &str = "RULE_IDS";

/// One compiled rule, the value of the rule tries.
///
/// The budget parameters are inline so that one LPM lookup gives everything the policer
/// needs. Protected prefixes are entries of the same tries with
/// [`rule_flags::PROTECTED`] (the daemon makes a protected prefix win over any rule,
/// more or less specific), so protection costs no second lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleEntry {
    /// Index into `RULE_STATS` and `RULE_BUDGETS`.
    pub rule_id: u32,
    /// One of [`action`].
    pub action: u8,
    /// Sources are grouped by this many leading bits (32/128 = per host).
    pub group_len: u8,
    /// [`rule_flags`] bits.
    pub flags: u8,
    pub _pad0: u8,
    /// Per-group budget: ns between admissions (0 = no budget at all).
    pub interval_ns: u64,
    /// Per-group budget: burst tolerance in ns, `(burst - 1) * interval_ns`.
    pub tolerance_ns: u64,
    /// Whole-rule ceiling: ns between admissions (0 = no ceiling).
    pub ceiling_interval_ns: u64,
    /// Whole-rule ceiling: burst tolerance in ns.
    pub ceiling_tolerance_ns: u64,
    /// `defer`: clients waiting longer than this are forgotten.
    pub max_wait_ns: u64,
    pub _pad1: u32,
    /// `defer`: most clients one group keeps waiting.
    pub queue_cap: u32,
}
const _: () = assert!(size_of::<RuleEntry>() == 56);

impl RuleEntry {
    /// The waiting line's parameters.
    #[inline(always)]
    pub const fn line_rule(&self) -> crate::line::LineRule {
        crate::line::LineRule {
            queue_cap: self.queue_cap,
            max_wait_ns: self.max_wait_ns,
        }
    }
}

/// Key of the group table: the source address masked to `len` bits. IPv4 addresses use
/// the first four bytes; the rest stays zero. Within one policy a key belongs to one
/// rule at most (a block of `len` bits that held sources of two rules would contain a
/// more specific prefix, whose groups are longer).
///
/// The table holds two kinds of entries under such keys: groups (`len` is their rule's
/// group length) and probe entries (`len` is the family's probe length, see
/// [`config`]), which cache the rule of every source in their block so that a known
/// block's attempts skip the rule tries. When a rule's group length is the probe length,
/// one entry is both.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GroupKey {
    /// [`family`].
    pub family: u8,
    /// Leading bits of `addr` kept.
    pub len: u8,
    pub _pad: [u8; 2],
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<GroupKey>() == 20);

/// [`GroupState::rule_id`] of an entry no rule has used yet.
pub const UNOWNED: u32 = u32::MAX;

/// A group's shared state: the GCRA theoretical arrival time, updated by
/// compare-and-swap from every CPU, the rule it belongs to, and the waiting line of
/// `defer` rules.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupState {
    pub tat_ns: u64,
    /// The rule whose group (or probe entry) this is; [`UNOWNED`] when new. A key that
    /// passes to another rule (a new policy) starts again with a full budget.
    pub rule_id: u32,
    /// The policy epoch in which every source of this entry's block was found under
    /// `rule_id`: a probe hit in that epoch needs no rule lookup. 0: never.
    pub epoch: u32,
    pub line: crate::line::LineState,
    /// The group's SYNs by what became of them, for `shaper top`'s rates. Shared by all
    /// CPUs and counted without atomics: two CPUs counting at once can lose one.
    pub counts: GroupCounts,
}
const _: () = assert!(size_of::<GroupState>() == 56);

/// A group's SYNs so far (wrapping): admitted (with or without waiting), dropped
/// (or would have been, in `monitor`), deferred (a `defer` line's drops).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupCounts {
    pub admitted: u32,
    pub dropped: u32,
    pub deferred: u32,
    pub _pad: u32,
}

impl GroupCounts {
    /// The counter an outcome goes to (none for `protected`, which has no group).
    #[inline(always)]
    pub fn of(&mut self, outcome: crate::Outcome) -> Option<&mut u32> {
        use crate::Outcome as O;
        match outcome {
            O::Admitted | O::AdmittedAfterWait => Some(&mut self.admitted),
            O::Dropped | O::WouldDrop => Some(&mut self.dropped),
            O::Deferred | O::QueueFull => Some(&mut self.deferred),
            O::Protected => None,
        }
    }
}

/// One slot of the group table (`crate::table`): its tag (what it holds), the key, the
/// insert lock of the window starting here, and the group's state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupSlot {
    /// 0: empty; else the key's fingerprint, whether it is being written, and the
    /// slot's version (`crate::table`).
    pub tag: u64,
    /// 0: free; else the jiffies (`| 1`) of the CPU inserting a key whose home this is.
    pub lock: u64,
    pub key: GroupKey,
    pub _pad: u32,
    pub state: GroupState,
}
const _: () = assert!(size_of::<GroupSlot>() == 96 && align_of::<GroupSlot>() == 8);

/// Address family of a [`WaitKey`].
pub mod family {
    pub const V4: u8 = 4;
    pub const V6: u8 = 6;
}

/// A waiting client: its connection's addresses and ports. IPv4 addresses use the first
/// four bytes. Aligned to 8 so the program clears it with five word stores.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct WaitKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// One of [`family`].
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<WaitKey>() == 40 && align_of::<WaitKey>() == 8);

impl WaitKey {
    /// The words [`crate::line::probe_hash`] takes, with the SYN's sequence number.
    #[inline(always)]
    pub fn probe_words(&self, isn: u32) -> [u32; 10] {
        let w = |a: &[u8; 16], i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
        [
            w(&self.src, 0),
            w(&self.src, 4),
            w(&self.src, 8),
            w(&self.src, 12),
            w(&self.dst, 0),
            w(&self.dst, 4),
            w(&self.dst, 8),
            w(&self.dst, 12),
            (u32::from(self.sport) << 16) | u32::from(self.dport),
            isn ^ u32::from(self.family),
        ]
    }
}

/// A client in line: the ISN of its SYN (a new ISN on the same ports is a new attempt),
/// its rule, and its knocks so far (from its first-seen time, its place in line).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Waiter {
    pub isn: u32,
    pub rule_id: u32,
    pub knocks: crate::knocks::Knocks,
}
const _: () = assert!(size_of::<Waiter>() == 24);

/// Key of a group's calendar ([`crate::line::Calendar`], map [`MAP_LINES`]): the
/// group's key words, its rule, and the tag of its slot in the group table (which
/// changes when the slot goes to another group), so a calendar outlives neither.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LineKey {
    pub group: [u32; 5],
    pub rule_id: u32,
    pub slot_tag: u64,
}
const _: () = assert!(size_of::<LineKey>() == 32);

/// A first SYN waiting to be proven by its retransmission: a tag of its identity hash
/// (0 = empty) and when it was seen.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeSlot {
    pub tag: u32,
    pub _pad: u32,
    pub first_seen_ns: u64,
}
const _: () = assert!(size_of::<ProbeSlot>() == 16);

/// A rule's ceiling state (same GCRA word as a group).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleBudget {
    pub tat_ns: u64,
}
const _: () = assert!(size_of::<RuleBudget>() == 8);

/// Upper bounds (seconds, inclusive) of the wait-time histogram's buckets; the last
/// bucket is everything above.
pub const WAIT_BOUNDS_S: [u64; WAIT_BUCKETS - 1] = [1, 2, 4, 8, 16, 32, 64];
/// Buckets of the wait-time histogram.
pub const WAIT_BUCKETS: usize = 8;

/// The wait-time bucket of `wait_ns` (first SYN → admission).
#[inline(always)]
pub const fn wait_bucket(wait_ns: u64) -> usize {
    let mut i = 0;
    while i < WAIT_BOUNDS_S.len() {
        if wait_ns <= WAIT_BOUNDS_S[i] * 1_000_000_000 {
            return i;
        }
        i += 1;
    }
    WAIT_BUCKETS - 1
}

/// A rule's counters on one CPU, indexed by [`crate::Outcome`], and its histogram of
/// waits (first SYN → admission) of clients admitted after waiting.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleStats {
    pub counts: [u64; crate::Outcome::COUNT],
    /// Places in the line released after `max_wait`, counted by the program when the
    /// client knocks after it (a client that gave up never does; the daemon counts
    /// those when it clears their places, see `shaper::daemon`).
    pub released: u64,
    /// Admissions after waiting, by [`wait_bucket`] (not cumulative).
    pub wait: [u64; WAIT_BUCKETS],
    /// Sum of those waits in ns.
    pub wait_sum_ns: u64,
}
// The layout of the pinned map is the same as when `counts` had a spare eighth word.
const _: () = assert!(size_of::<RuleStats>() == 136 && crate::Outcome::COUNT == 7);

impl RuleStats {
    /// The counter of one outcome.
    pub const fn get(&self, outcome: crate::Outcome) -> u64 {
        // The index is an enum discriminant below the array length.
        let i = outcome as usize;
        if i < crate::Outcome::COUNT {
            self.counts[i]
        } else {
            0
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, made of integers only, with every
    // padding byte spelled out as a field (their sizes are asserted above).
    unsafe impl aya::Pod for super::RuleEntry {}
    unsafe impl aya::Pod for super::GroupKey {}
    unsafe impl aya::Pod for super::GroupState {}
    unsafe impl aya::Pod for super::GroupSlot {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::RuleBudget {}
    unsafe impl aya::Pod for super::RuleStats {}
    unsafe impl aya::Pod for super::WaitKey {}
    unsafe impl aya::Pod for super::Waiter {}
    unsafe impl aya::Pod for super::LineKey {}
    unsafe impl aya::Pod for crate::line::Calendar {}
    unsafe impl aya::Pod for super::ProbeSlot {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_word_holds_epoch_and_probe_lengths() {
        for (e, p4, p6) in [(0, 0, 0), (1, 24, 64), (u32::MAX, 32, 128), (7, 255, 255)] {
            assert_eq!(config::parts(config::word(e, p4, p6)), (e, p4, p6));
        }
    }

    #[test]
    fn lpm_keys_carry_the_generation_word_then_the_address() {
        let k: PrefixV4 = gen_key(1, &[198, 18, 1, 5]);
        assert_eq!(k, [0, 0, 0, 1, 198, 18, 1, 5]);
        assert_eq!(key_generation(&k), Some(1));
        let a6 = [0x20, 1, 0xd, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
        let k6: PrefixV6 = gen_key(0, &a6);
        assert_eq!(k6[..4], [0, 0, 0, 0]);
        assert_eq!(k6[4..], a6);
        assert_eq!(key_generation(&k6), Some(0));
        // Not a key this build writes: no generation.
        assert_eq!(key_generation(&[1, 0, 0, 0, 9]), None);
        assert_eq!(key_generation(&[0, 0]), None);
    }
}
