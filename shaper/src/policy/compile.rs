//! Compile a policy into the entries of the rule tries.
//!
//! Protected prefixes go into the same tries as rules, flagged PROTECTED, so the data
//! plane needs one lookup. For protection to win whatever the rules say, every rule
//! prefix inside a protected prefix is flagged too; the protected prefix itself carries
//! the id of the rule that covers it (for counting).
//!
//! Each family has a probe length: the group length most of its rules use. The data
//! plane caches, per block of that length, the rule all its sources are under, and
//! skips the tries for known blocks. A block with a more specific prefix inside is not
//! all under one entry: the entries of such blocks are flagged NO_CACHE (the block gets
//! an entry of its own, a copy of the entry that covers it, if it has none), and so are
//! entries longer than the probe length.

use std::net::IpAddr;

use shaper_common::{
    Budget,
    maps::{RuleEntry, action, rule_flags},
};

use super::{Action, Policy, Prefix};

/// Rule id of a protected prefix that no rule covers (counted globally only).
pub const NO_RULE: u32 = u32::MAX;

/// Trie entries: (address, prefix length, value). The data plane adds the generation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    pub v4: Vec<([u8; 4], u32, RuleEntry)>,
    pub v6: Vec<([u8; 16], u32, RuleEntry)>,
    pub protected_ports: Vec<u16>,
    /// The probe lengths (see the module doc).
    pub probe_v4: u8,
    pub probe_v6: u8,
    /// Each rule's entry, for the rule-id table (no flags: those are the tries').
    rules_by_id: Vec<RuleEntry>,
    rules: usize,
}

impl Compiled {
    /// Number of rule ids used.
    pub fn rule_count(&self) -> usize {
        self.rules
    }

    /// Each rule's entry (protected prefixes have none of their own).
    pub fn by_id(&self) -> &[RuleEntry] {
        &self.rules_by_id
    }
}

/// The probe length of a family: the group length of most of its rules (the shorter on
/// a tie: fewer probe entries), or the default group length when it has none.
fn probe_len<'a>(groups: impl Iterator<Item = &'a u8>, default: u8) -> u8 {
    let mut counts = std::collections::BTreeMap::<u8, usize>::new();
    for g in groups {
        *counts.entry(*g).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by_key(|(g, n)| (*n, std::cmp::Reverse(*g)))
        .map_or(default, |(g, _)| g)
}

/// `p`'s block of `len` bits.
fn block(p: &Prefix, len: u8) -> Prefix {
    Prefix {
        addr: Prefix { addr: p.addr, len }.network(),
        len,
    }
}

/// Flag the entries of one family (`v4`) whose probe block is not all theirs, adding a
/// block entry where a block has a more specific prefix inside and no entry of its own.
fn split_blocks(entries: &mut Vec<(Prefix, RuleEntry)>, v4: bool, probe: u8) {
    let mut blocks: Vec<Prefix> = Vec::new();
    for (p, e) in entries.iter_mut() {
        if p.addr.is_ipv4() == v4 && p.len > probe {
            e.flags |= rule_flags::NO_CACHE;
            let b = block(p, probe);
            if !blocks.contains(&b) {
                blocks.push(b);
            }
        }
    }
    for b in blocks {
        if let Some((_, e)) = entries.iter_mut().find(|(p, _)| *p == b) {
            e.flags |= rule_flags::NO_CACHE;
            continue;
        }
        let covering = entries
            .iter()
            .filter(|(p, _)| p.covers(&b))
            .max_by_key(|(p, _)| p.len)
            .map(|(_, e)| *e);
        if let Some(mut e) = covering {
            e.flags |= rule_flags::NO_CACHE;
            entries.push((b, e));
        }
    }
}

fn action_code(a: Action) -> u8 {
    match a {
        Action::Allow => action::ALLOW,
        Action::Monitor => action::MONITOR,
        Action::Drop => action::DROP,
        Action::Defer => action::DEFER,
    }
}

impl Policy {
    /// The trie entries for this policy. Rule ids are the rules' positions.
    pub fn compile(&self) -> Compiled {
        let ids: Vec<u32> = (0..self.rules.len() as u32).collect();
        self.compile_with_ids(&ids)
    }

    /// The trie entries, rule `i` under id `ids[i]`.
    pub fn compile_with_ids(&self, ids: &[u32]) -> Compiled {
        let id_of = |i: usize| ids.get(i).copied().unwrap_or(NO_RULE);
        let mut entries: Vec<(Prefix, RuleEntry)> = Vec::new();
        for (pos, r) in self.rules.iter().enumerate() {
            let id = id_of(pos);
            let group = Budget::new(r.rate.count, r.rate.period_ns, r.burst);
            let ceiling = r.ceiling.map_or(Budget::NONE, |c| {
                Budget::new(c.count, c.period_ns, c.per_second_ceil())
            });
            let protected = self.protected_prefixes.iter().any(|p| p.covers(&r.prefix));
            entries.push((
                r.prefix,
                RuleEntry {
                    rule_id: id,
                    action: action_code(r.action),
                    group_len: r.group,
                    flags: if protected { rule_flags::PROTECTED } else { 0 },
                    _pad0: 0,
                    interval_ns: group.interval_ns,
                    tolerance_ns: group.tolerance_ns,
                    ceiling_interval_ns: ceiling.interval_ns,
                    ceiling_tolerance_ns: ceiling.tolerance_ns,
                    max_wait_ns: u64::try_from(r.max_wait.as_nanos()).unwrap_or(u64::MAX),
                    _pad1: 0,
                    queue_cap: r.max_waiting,
                },
            ));
        }
        for p in &self.protected_prefixes {
            if entries.iter().any(|(q, _)| q == p) {
                continue; // the rule with this exact prefix is flagged already
            }
            let covering = self
                .rules
                .iter()
                .enumerate()
                .filter(|(_, r)| r.prefix.covers(p))
                .max_by_key(|(_, r)| r.prefix.len)
                .map_or(NO_RULE, |(pos, _)| id_of(pos));
            entries.push((
                *p,
                RuleEntry {
                    rule_id: covering,
                    action: action::ALLOW,
                    group_len: p.len,
                    flags: rule_flags::PROTECTED,
                    ..RuleEntry::default()
                },
            ));
        }
        // Flags are read from the tries only: without them, a rule defined as before
        // has the same entry in every policy.
        let rules_by_id: Vec<RuleEntry> = entries
            .iter()
            .take(self.rules.len())
            .map(|(_, e)| RuleEntry { flags: 0, ..*e })
            .collect();
        let probe_v4 = probe_len(
            self.rules
                .iter()
                .filter(|r| r.prefix.addr.is_ipv4())
                .map(|r| &r.group),
            24,
        );
        let probe_v6 = probe_len(
            self.rules
                .iter()
                .filter(|r| !r.prefix.addr.is_ipv4())
                .map(|r| &r.group),
            64,
        );
        split_blocks(&mut entries, true, probe_v4);
        split_blocks(&mut entries, false, probe_v6);
        let mut out = Compiled {
            rules: self.rules.len(),
            protected_ports: self.protected_ports.clone(),
            probe_v4,
            probe_v6,
            rules_by_id,
            ..Compiled::default()
        };
        for (p, e) in entries {
            match p.addr {
                IpAddr::V4(a) => out.v4.push((a.octets(), u32::from(p.len), e)),
                IpAddr::V6(a) => out.v6.push((a.octets(), u32::from(p.len), e)),
            }
        }
        out
    }
}
