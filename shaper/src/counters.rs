//! Reading the per-CPU counters and summing them.

use anyhow::{Result, anyhow};
use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
};
use shaper_common::{
    Reason,
    maps::{MAP_GLOBAL_STATS, MAP_RULE_STATS, RuleStats},
};

/// Global counters summed over CPUs, indexed by [`Reason`].
pub fn global(ebpf: &Ebpf) -> Result<Vec<u64>> {
    let map: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(
        ebpf.map(MAP_GLOBAL_STATS)
            .ok_or_else(|| anyhow!("map {MAP_GLOBAL_STATS} missing"))?,
    )?;
    (0..Reason::COUNT)
        .map(|i| Ok(map.get(&i, 0)?.iter().sum()))
        .collect()
}

/// One rule's counters summed over CPUs.
pub fn rule(ebpf: &Ebpf, rule_id: u32) -> Result<RuleStats> {
    let map: PerCpuArray<&MapData, RuleStats> = PerCpuArray::try_from(
        ebpf.map(MAP_RULE_STATS)
            .ok_or_else(|| anyhow!("map {MAP_RULE_STATS} missing"))?,
    )?;
    let mut sum = RuleStats::default();
    for cpu in map.get(&rule_id, 0)?.iter() {
        for (s, c) in sum.counts.iter_mut().zip(cpu.counts.iter()) {
            *s = s.wrapping_add(*c);
        }
        for (s, c) in sum.wait.iter_mut().zip(cpu.wait.iter()) {
            *s = s.wrapping_add(*c);
        }
        sum.wait_sum_ns = sum.wait_sum_ns.wrapping_add(cpu.wait_sum_ns);
        sum.released = sum.released.wrapping_add(cpu.released);
    }
    Ok(sum)
}
