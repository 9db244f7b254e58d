//! Loading the XDP program and writing a compiled policy into its maps.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::Xdp,
};
use shaper_common::maps::{
    MAP_PROTECTED_PORTS, MAP_RULE_BUDGETS, MAP_RULE_STATS, MAP_RULES_V4, MAP_RULES_V6, MAX_GROUPS,
    MAX_PREFIXES, MAX_RULES, MAX_WAITERS, PROGRAM_NAME, PrefixV4, PrefixV6, RuleBudget, RuleEntry,
    RuleStats,
};

use crate::policy::Compiled;

/// Map sizes fixed at load time.
#[derive(Clone, Copy, Debug)]
pub struct Capacity {
    /// Rule ids (counters and ceilings).
    pub rules: u32,
    /// Entries of each rule trie (rules plus protected prefixes).
    pub prefixes: u32,
    /// Groups tracked at once (LRU).
    pub groups: u32,
    /// Clients waiting in line, all `defer` groups together (LRU).
    pub waiters: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            rules: MAX_RULES,
            prefixes: MAX_PREFIXES,
            groups: MAX_GROUPS,
            waiters: MAX_WAITERS,
        }
    }
}

/// The loaded program and its maps.
pub struct Dataplane {
    pub ebpf: Ebpf,
    pub capacity: Capacity,
}

impl Dataplane {
    /// Load the embedded object and the `shaper` program into the kernel.
    pub fn load(capacity: Capacity) -> Result<Dataplane> {
        Self::load_object(crate::EBPF_OBJECT, capacity)
    }

    /// Load an object (the embedded one, or another build for upgrade tests).
    pub fn load_object(object: &[u8], capacity: Capacity) -> Result<Dataplane> {
        Self::load_object_pinned(object, capacity, None)
    }

    /// Load the embedded object with its maps pinned in `dir` (reused if pinned there
    /// already, after a layout check).
    pub fn load_pinned(capacity: Capacity, dir: &Path) -> Result<Dataplane> {
        Self::load_object_pinned(crate::EBPF_OBJECT, capacity, Some(dir))
    }

    /// Load `object`; with `dir`, its maps are pinned there (and adopted if present).
    pub fn load_object_pinned(
        object: &[u8],
        capacity: Capacity,
        dir: Option<&Path>,
    ) -> Result<Dataplane> {
        raise_memlock();
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(MAP_RULE_STATS, capacity.rules)
            .map_max_entries(MAP_RULE_BUDGETS, capacity.rules)
            .map_max_entries(MAP_RULES_V4, capacity.prefixes)
            .map_max_entries(MAP_RULES_V6, capacity.prefixes)
            .map_max_entries(shaper_common::maps::MAP_GROUPS, capacity.groups)
            .map_max_entries(shaper_common::maps::MAP_WAITERS, capacity.waiters);
        if let Some(dir) = dir {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            crate::pins::check_layout(dir, &capacity)?;
            for name in crate::pins::PINNED_MAPS {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader.load(object).context(
            "loading the BPF object failed (are you root, with BPF enabled in the kernel?)",
        )?;
        let prog = program_mut(&mut ebpf, PROGRAM_NAME)?;
        prog.load().map_err(|e| {
            anyhow!(
                "the kernel refused the XDP program: {e}{}",
                verifier_hint(&e)
            )
        })?;
        Ok(Dataplane { ebpf, capacity })
    }

    /// The main XDP program.
    pub fn program(&mut self) -> Result<&mut Xdp> {
        program_mut(&mut self.ebpf, PROGRAM_NAME)
    }

    /// Write `policy` into the maps: new and changed entries first, then stale ones
    /// removed, so an attempt never finds no rule where the old and new policy both
    /// have one.
    pub fn apply(&mut self, policy: &Compiled) -> Result<()> {
        if policy.rule_count() > self.capacity.rules as usize {
            return Err(anyhow!(
                "the policy has {} rules but the data plane holds {}",
                policy.rule_count(),
                self.capacity.rules
            ));
        }
        sync_trie::<PrefixV4>(&mut self.ebpf, MAP_RULES_V4, &policy.v4)?;
        sync_trie::<PrefixV6>(&mut self.ebpf, MAP_RULES_V6, &policy.v6)?;
        let mut ports: Array<&mut MapData, u32> = Array::try_from(
            self.ebpf
                .map_mut(MAP_PROTECTED_PORTS)
                .ok_or_else(|| anyhow!("map {MAP_PROTECTED_PORTS} missing"))?,
        )?;
        let protected: HashSet<u16> = policy.protected_ports.iter().copied().collect();
        for port in 0..=u16::MAX {
            let want = u32::from(protected.contains(&port));
            if ports.get(&u32::from(port), 0)? != want {
                ports.set(u32::from(port), want, 0)?;
            }
        }
        Ok(())
    }

    /// Reset the ceiling state and counters of rule ids (when a rule id is reused).
    pub fn reset_rules(&mut self, ids: impl IntoIterator<Item = u32>) -> Result<()> {
        let ncpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let ids: Vec<u32> = ids.into_iter().collect();
        {
            let mut budgets: Array<&mut MapData, RuleBudget> = Array::try_from(
                self.ebpf
                    .map_mut(MAP_RULE_BUDGETS)
                    .ok_or_else(|| anyhow!("map {MAP_RULE_BUDGETS} missing"))?,
            )?;
            for &id in &ids {
                budgets.set(id, RuleBudget::default(), 0)?;
            }
        }
        let mut stats: PerCpuArray<&mut MapData, RuleStats> = PerCpuArray::try_from(
            self.ebpf
                .map_mut(MAP_RULE_STATS)
                .ok_or_else(|| anyhow!("map {MAP_RULE_STATS} missing"))?,
        )?;
        for &id in &ids {
            let zeros = aya::maps::PerCpuValues::try_from(vec![RuleStats::default(); ncpus])?;
            stats.set(id, zeros, 0)?;
        }
        Ok(())
    }

    /// Entries in use and capacity of the maps that fill up: rule tries, groups, waiters.
    pub fn fill_levels(&self) -> Vec<(&'static str, u64, u64)> {
        use shaper_common::maps::{GroupKey, GroupState, MAP_GROUPS, MAP_WAITERS, WaitKey, Waiter};
        let groups = self.ebpf.map(MAP_GROUPS).and_then(|m| {
            aya::maps::HashMap::<_, GroupKey, GroupState>::try_from(m)
                .ok()
                .map(|h| h.keys().count() as u64)
        });
        let waiters = self.ebpf.map(MAP_WAITERS).and_then(|m| {
            aya::maps::HashMap::<_, WaitKey, Waiter>::try_from(m)
                .ok()
                .map(|h| h.keys().count() as u64)
        });
        let trie = |name: &str| -> Option<u64> {
            let m = self.ebpf.map(name)?;
            if name == MAP_RULES_V4 {
                LpmTrie::<&MapData, PrefixV4, RuleEntry>::try_from(m)
                    .ok()
                    .map(|t| t.keys().count() as u64)
            } else {
                LpmTrie::<&MapData, PrefixV6, RuleEntry>::try_from(m)
                    .ok()
                    .map(|t| t.keys().count() as u64)
            }
        };
        let c = &self.capacity;
        vec![
            (
                MAP_RULES_V4,
                trie(MAP_RULES_V4).unwrap_or(0),
                u64::from(c.prefixes),
            ),
            (
                MAP_RULES_V6,
                trie(MAP_RULES_V6).unwrap_or(0),
                u64::from(c.prefixes),
            ),
            (MAP_GROUPS, groups.unwrap_or(0), u64::from(c.groups)),
            (MAP_WAITERS, waiters.unwrap_or(0), u64::from(c.waiters)),
        ]
    }

    /// The global counters, summed over CPUs, indexed by `Reason`.
    pub fn global_counters(&self) -> Result<Vec<u64>> {
        crate::counters::global(&self.ebpf)
    }

    /// One rule's counters, summed over CPUs.
    pub fn rule_counters(&self, rule_id: u32) -> Result<RuleStats> {
        crate::counters::rule(&self.ebpf, rule_id)
    }
}

fn program_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    ebpf.program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the BPF object"))?
        .try_into()
        .map_err(|e| anyhow!("program {name} is not an XDP program: {e}"))
}

fn verifier_hint(e: &aya::programs::ProgramError) -> &'static str {
    match e {
        aya::programs::ProgramError::LoadError { .. } => {
            " (verifier log above; this kernel may be too old for this build)"
        }
        _ => "",
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it where we can.
fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a plain syscall with a valid pointer; failure only matters on old kernels,
    // where the map creation error that follows says so.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
}

/// Make the trie hold exactly `entries`.
fn sync_trie<K: aya::Pod + Eq + std::hash::Hash>(
    ebpf: &mut Ebpf,
    name: &str,
    entries: &[(K, u32, RuleEntry)],
) -> Result<()> {
    let mut trie: LpmTrie<&mut MapData, K, RuleEntry> = LpmTrie::try_from(
        ebpf.map_mut(name)
            .ok_or_else(|| anyhow!("map {name} missing"))?,
    )?;
    let mut want = HashSet::new();
    for (data, len, entry) in entries {
        trie.insert(&Key::new(*len, *data), entry, 0)
            .with_context(|| format!("writing {name} (is the trie full?)"))?;
        want.insert((*len, *data));
    }
    let stale: Vec<Key<K>> = trie
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| !want.contains(&(k.prefix_len(), k.data())))
        .collect();
    for k in stale {
        trie.remove(&k)?;
    }
    Ok(())
}
