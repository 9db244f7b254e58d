//! Map names, sizes and the `#[repr(C)]` layouts of their keys and values.
//!
//! Layout rules: no `bool`, `Option` or enums in map values (a `u8`/`u32` instead), every
//! padding byte spelled out as `_pad`, and a size assertion for every type, so that the
//! kernel and the daemon can never disagree on a layout silently.

use core::mem::size_of;

/// The XDP program's name in the object file.
pub const PROGRAM_NAME: &str = "shaper";
/// A bare `XDP_PASS` program shipped in the same object: the baseline of `xtask bench`.
pub const BASELINE_PROGRAM_NAME: &str = "shaper_baseline";

/// LPM trie: source IPv4 prefix → [`RuleEntry`]. Written by the daemon.
pub const MAP_RULES_V4: &str = "RULES_V4";
/// LPM trie: source IPv6 prefix → [`RuleEntry`]. Written by the daemon.
pub const MAP_RULES_V6: &str = "RULES_V6";
/// Array indexed by TCP destination port → `u32` (1 = protected). Written by the daemon.
pub const MAP_PROTECTED_PORTS: &str = "PROTECTED_PORTS";
/// LRU hash: [`GroupKey`] → [`GroupState`]. Written by the program.
pub const MAP_GROUPS: &str = "GROUPS";
/// Array indexed by rule id → [`RuleBudget`] (the rule's ceiling). Written by the program,
/// reset by the daemon when a rule id is (re)assigned.
pub const MAP_RULE_BUDGETS: &str = "RULE_BUDGETS";
/// Per-CPU array indexed by rule id → [`RuleStats`]. Written by the program.
pub const MAP_RULE_STATS: &str = "RULE_STATS";
/// Per-CPU array indexed by [`crate::Reason`] → `u64`. Written by the program.
pub const MAP_GLOBAL_STATS: &str = "GLOBAL_STATS";

/// Default number of rules (rule ids). The loader may raise it before load.
pub const MAX_RULES: u32 = 4096;
/// Default capacity of the rule tries (rules plus protected prefixes).
pub const MAX_PREFIXES: u32 = 8192;
/// Default number of groups tracked at once (LRU). An evicted group starts again with a
/// full burst; the rule's `ceiling` bounds what that can add.
pub const MAX_GROUPS: u32 = 131_072;
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
    /// Over budget, keep the client in the waiting line (falls back to drop until the
    /// line exists in the data plane).
    pub const DEFER: u8 = 4;
}

/// [`RuleEntry::flags`] bits.
pub mod rule_flags {
    /// The prefix is protected: attempts always pass (lock-out guard).
    pub const PROTECTED: u8 = 1;
}

/// The data of an IPv4 LPM key (`aya` adds the prefix length in front).
pub type PrefixV4 = [u8; 4];
/// The data of an IPv6 LPM key.
pub type PrefixV6 = [u8; 16];

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
}
const _: () = assert!(size_of::<RuleEntry>() == 40);

/// Key of the group table: the rule and the source address masked to the rule's group
/// length. IPv4 addresses use the first four bytes; the rest stays zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GroupKey {
    pub rule_id: u32,
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<GroupKey>() == 20);

/// A group's shared budget: the GCRA theoretical arrival time, updated by
/// compare-and-swap from every CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupState {
    pub tat_ns: u64,
}
const _: () = assert!(size_of::<GroupState>() == 8);

/// A rule's ceiling state (same GCRA word as a group).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleBudget {
    pub tat_ns: u64,
}
const _: () = assert!(size_of::<RuleBudget>() == 8);

/// A rule's counters on one CPU, indexed by [`crate::Outcome`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleStats {
    pub counts: [u64; 8],
}
const _: () = assert!(size_of::<RuleStats>() == 64);
const _: () = assert!(crate::Outcome::COUNT <= 8);

impl RuleStats {
    /// The counter of one outcome.
    pub const fn get(&self, outcome: crate::Outcome) -> u64 {
        // The index is an enum discriminant below the array length (asserted above).
        let i = outcome as usize;
        if i < 8 { self.counts[i] } else { 0 }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, made of integers only, with every
    // padding byte spelled out as a field (their sizes are asserted above).
    unsafe impl aya::Pod for super::RuleEntry {}
    unsafe impl aya::Pod for super::GroupKey {}
    unsafe impl aya::Pod for super::GroupState {}
    unsafe impl aya::Pod for super::RuleBudget {}
    unsafe impl aya::Pod for super::RuleStats {}
}
