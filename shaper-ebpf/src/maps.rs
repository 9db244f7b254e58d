//! The program's maps. Names and layouts are in `shaper_common::maps`, which the daemon
//! uses too; sizes here are defaults the loader may raise before load.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, LpmTrie, LruHashMap, PerCpuArray},
};
use shaper_common::{
    Reason,
    knocks::Knocks,
    line::Calendar,
    maps::{
        Config, GroupSlot, LineKey, MAX_GROUPS, MAX_LINES, MAX_PREFIXES, MAX_RULES, MAX_WAITERS,
        PORTS, PROBE_SLOTS, PrefixV4, PrefixV6, ProbeSlot, RuleBudget, RuleEntry, RuleStats,
        WaitKey, Waiter,
    },
};

/// Source IPv4 prefix → rule (protected prefixes are entries with the PROTECTED flag).
/// Written by the daemon; sized for rules plus protected prefixes.
#[map]
pub static RULES_V4: LpmTrie<PrefixV4, RuleEntry> = LpmTrie::with_max_entries(MAX_PREFIXES, 0);

/// Source IPv6 prefix → rule. Written by the daemon.
#[map]
pub static RULES_V6: LpmTrie<PrefixV6, RuleEntry> = LpmTrie::with_max_entries(MAX_PREFIXES, 0);

/// TCP destination port → bit G set if protected in policy generation G. Written by the daemon; one entry per port so
/// the lookup is a constant-time (inlined) array access.
#[map]
pub static PROTECTED_PORTS: Array<u32> = Array::with_max_entries(PORTS, 0);

/// The group table (`shaper_common::table`): slots of (masked source, length) → the
/// group's state, budget word updated by compare-and-swap from every CPU. The loader
/// sizes it (a power of two) and sets the program's mask to match; mmap-able, so the
/// daemon scans it through memory.
#[map]
pub static GROUPS: Array<GroupSlot> = Array::with_max_entries(MAX_GROUPS, BPF_F_MMAPABLE);

/// Rule id → the rule's ceiling budget word. Written by the program (compare-and-swap).
#[map]
pub static RULE_BUDGETS: Array<RuleBudget> = Array::with_max_entries(MAX_RULES, 0);

/// Rule id → that rule's counters on this CPU. Written by the program, read by the daemon.
#[map]
pub static RULE_STATS: PerCpuArray<RuleStats> = PerCpuArray::with_max_entries(MAX_RULES, 0);

/// Reason → packets on this CPU. Written by the program, read by the daemon.
#[map]
pub static GLOBAL_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Reason::COUNT, 0);

/// Clients waiting in line (`defer`), proven by a retransmission. Written by the program.
#[map]
pub static WAITERS: LruHashMap<WaitKey, Waiter> = LruHashMap::with_max_entries(MAX_WAITERS, 0);

/// The calendars of congested `defer` groups (`shaper_common::line::Calendar`): when
/// their waiting clients are expected to knock. Made by the program on a group's first
/// refusal of a proven client (LRU: the least used calendar goes first when full).
#[map]
pub static LINES: LruHashMap<LineKey, Calendar> = LruHashMap::with_max_entries(MAX_LINES, 0);

/// A waiting client's key, its knocks and its group's calendar key while one SYN is
/// decided: `defer`'s temporaries, kept here rather than on the stack (the verifier
/// bounds what a chain of calls may use, and the policer's frame takes half).
#[repr(C)]
pub struct Scratch {
    pub wait_key: WaitKey,
    pub knocks: Knocks,
    pub line_key: LineKey,
    pub isn: u32,
    /// What the line knows of the SYN (`police::found`).
    pub known: u32,
    pub probe_slot: u32,
    pub probe_tag: u32,
}

/// This CPU's [`Scratch`] (XDP runs a packet to its end on one CPU).
#[map]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// First SYNs of congested `defer` groups, direct-mapped by identity hash. Its size is
/// fixed (the program masks with it). Written by the program.
#[map]
pub static PROBES: Array<ProbeSlot> = Array::with_max_entries(PROBE_SLOTS, 0);

/// The policy epoch and its probe lengths, one word (`shaper_common::maps::config`),
/// and the group table's seed. Written by the daemon with atomic stores through the
/// map's memory (hence mmap-able).
#[map]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Rule id → the rule: what a probe entry's cached rule id stands for. Written by the
/// daemon.
#[map]
pub static RULES: Array<RuleEntry> = Array::with_max_entries(MAX_RULES, 0);

/// Rule id → hash of its definition. The daemon's bookkeeping (pinned with the rest);
/// the program never reads it.
#[map]
pub static RULE_IDS: Array<u64> = Array::with_max_entries(MAX_RULES, 0);
