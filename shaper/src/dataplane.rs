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
    Config, GEN_BITS, MAP_CONFIG, MAP_PROTECTED_PORTS, MAP_RULE_BUDGETS, MAP_RULE_IDS,
    MAP_RULE_STATS, MAP_RULES, MAP_RULES_V4, MAP_RULES_V6, MAX_GROUPS, MAX_PREFIXES, MAX_RULES,
    MAX_WAITERS, PROGRAM_NAME, PrefixV4, PrefixV6, RuleBudget, RuleEntry, RuleStats, config,
    gen_key, key_generation,
};

use crate::{mapmem::MapMemory, policy::Compiled};

/// Byte offset of the seed in the `CONFIG` value.
const SEED_OFFSET: usize = std::mem::offset_of!(Config, seed);

/// Map sizes fixed at load time.
#[derive(Clone, Copy, Debug)]
pub struct Capacity {
    /// Rule ids (counters and ceilings).
    pub rules: u32,
    /// Entries of each rule trie (rules plus protected prefixes).
    pub prefixes: u32,
    /// Group table slots (rounded up to a power of two at load).
    pub groups: u32,
    /// Clients waiting in line, all `defer` groups together (LRU).
    pub waiters: u32,
    /// Calendars of congested `defer` groups at once (LRU).
    pub lines: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            rules: MAX_RULES,
            prefixes: MAX_PREFIXES,
            groups: MAX_GROUPS,
            waiters: MAX_WAITERS,
            lines: shaper_common::maps::MAX_LINES,
        }
    }
}

impl Capacity {
    /// Does `compiled` fit? Each rule trie holds two generations (the active policy
    /// and the one being written), so a policy may use half of its entries. The error
    /// names the limit that is short.
    pub fn check(&self, compiled: &Compiled) -> Result<(), String> {
        let per_family = self.prefixes as usize / 2;
        let short = [
            ("rules", compiled.rule_count(), self.rules as usize),
            (
                "IPv4 trie entries (rule and protected prefixes, and the blocks cached \
                 around more specific ones)",
                compiled.v4.len(),
                per_family,
            ),
            (
                "IPv6 trie entries (likewise)",
                compiled.v6.len(),
                per_family,
            ),
        ]
        .into_iter()
        .filter(|(_, need, have)| need > have)
        .map(|(what, need, have)| format!("{need} {what}, the data plane holds {have}"))
        .collect::<Vec<_>>();
        if short.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "the policy does not fit: it needs {} (the limits are built in: \
                 shaper_common::maps::MAX_RULES and MAX_PREFIXES; split the policy \
                 or merge rules)",
                short.join("; ")
            ))
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
        Self::load_build(object, capacity, dir, None)
    }

    /// [`Dataplane::load_object_pinned`], with the program's build number set (another
    /// build of the same code, for upgrade tests).
    pub fn load_build(
        object: &[u8],
        capacity: Capacity,
        dir: Option<&Path>,
        build: Option<u32>,
    ) -> Result<Dataplane> {
        raise_memlock();
        // The group table's slots: a power of two (the program masks its hash), at
        // least a window.
        let capacity = Capacity {
            groups: capacity
                .groups
                .max(shaper_common::table::WINDOW)
                .checked_next_power_of_two()
                .ok_or_else(|| anyhow!("group capacity {} is too large", capacity.groups))?,
            ..capacity
        };
        let mut loader = EbpfLoader::new();
        let build_value = build.unwrap_or(1);
        if build.is_some() {
            loader.override_global("SHAPER_BUILD", &build_value, true);
        }
        // The program's own log records below this level are skipped in the kernel.
        let level = bpf_log_level();
        loader.override_global(aya_log::LEVEL, &level, false);
        let lag = coarse_clock_lag_ns();
        loader.override_global("SHAPER_COARSE_LAG_NS", &lag, true);
        // Without it the program never decides on the coarse clock.
        let tick = tick_ns().unwrap_or(0);
        loader.override_global("SHAPER_TICK_NS", &tick, true);
        let mask = capacity.groups - 1;
        loader.override_global("SHAPER_GROUP_MASK", &mask, true);
        loader
            .map_max_entries(MAP_RULE_STATS, capacity.rules)
            .map_max_entries(MAP_RULE_BUDGETS, capacity.rules)
            .map_max_entries(MAP_RULES, capacity.rules)
            .map_max_entries(MAP_RULES_V4, capacity.prefixes)
            .map_max_entries(MAP_RULES_V6, capacity.prefixes)
            .map_max_entries(shaper_common::maps::MAP_GROUPS, capacity.groups)
            .map_max_entries(shaper_common::maps::MAP_WAITERS, capacity.waiters)
            .map_max_entries(shaper_common::maps::MAP_LINES, capacity.lines);
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
        let dp = Dataplane { ebpf, capacity };
        dp.seed_groups()?;
        Ok(dp)
    }

    /// Give the group table its hash seed when the table is new (adopted pins keep
    /// theirs: their groups are placed by it). Before the program runs on the maps.
    fn seed_groups(&self) -> Result<()> {
        let config = MapMemory::new(&self.ebpf, MAP_CONFIG)?;
        let seed = config
            .word(0, SEED_OFFSET)
            .ok_or_else(|| anyhow!("map {MAP_CONFIG} has no seed"))?;
        if seed.load(std::sync::atomic::Ordering::Acquire) == 0 {
            let mut b = [0u8; 8];
            // SAFETY: `b` is valid for 8 bytes of output.
            let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
            if n != 8 {
                return Err(std::io::Error::last_os_error()).context("getrandom");
            }
            seed.store(
                u64::from_ne_bytes(b) | 1,
                std::sync::atomic::Ordering::Release,
            );
        }
        Ok(())
    }

    /// Instructions the verifier processed to accept the program (its complexity: it
    /// grows with every branch, and the kernel's limit is 1,000,000).
    pub fn verified_instructions(&mut self) -> Option<u32> {
        self.program()
            .ok()
            .and_then(|p| p.info().ok())
            .and_then(|i| i.verified_instruction_count())
    }

    /// The main XDP program.
    pub fn program(&mut self) -> Result<&mut Xdp> {
        program_mut(&mut self.ebpf, PROGRAM_NAME)
    }

    /// Write `policy` into the maps as a new generation, atomically: its entries go in
    /// under the inactive generation, then the active-generation word flips, then the
    /// old generation's entries are removed. A packet reads the word once, so it sees
    /// the old policy or the new one, never a mix.
    pub fn apply(&mut self, policy: &Compiled) -> Result<()> {
        if policy.rule_count() > self.capacity.rules as usize {
            return Err(anyhow!(
                "the policy has {} rules but the data plane holds {}",
                policy.rule_count(),
                self.capacity.rules
            ));
        }
        let epoch = self.epoch()?;
        let active = (epoch & 1) as u8;
        let next = 1 - active;
        // The epoch after this one: its parity is `next`; 0 means "no policy" and is
        // skipped when the counter wraps.
        let next_epoch = match epoch.wrapping_add(1) {
            0 => 2,
            e => e,
        };
        let v4: Vec<(PrefixV4, u32, RuleEntry)> = policy
            .v4
            .iter()
            .map(|(a, len, e)| (gen_key(next, a), len + GEN_BITS, *e))
            .collect();
        let v6: Vec<(PrefixV6, u32, RuleEntry)> = policy
            .v6
            .iter()
            .map(|(a, len, e)| (gen_key(next, a), len + GEN_BITS, *e))
            .collect();
        // Rule ids the new policy uses are either unchanged rules (the same entry: a
        // rule's definition is all it holds) or ids the active policy does not use:
        // writing them disturbs no packet.
        {
            let mut rules: Array<&mut MapData, RuleEntry> = Array::try_from(
                self.ebpf
                    .map_mut(MAP_RULES)
                    .ok_or_else(|| anyhow!("map {MAP_RULES} missing"))?,
            )?;
            for e in policy.by_id() {
                rules.set(e.rule_id, e, 0)?;
            }
        }
        write_generation::<PrefixV4>(&mut self.ebpf, MAP_RULES_V4, next, &v4)?;
        write_generation::<PrefixV6>(&mut self.ebpf, MAP_RULES_V6, next, &v6)?;
        let protected: HashSet<u16> = policy.protected_ports.iter().copied().collect();
        self.port_bits(|port, v| {
            if protected.contains(&port) {
                v | (1 << next)
            } else {
                v & !(1 << next)
            }
        })?;
        self.config_set(config::word(next_epoch, policy.probe_v4, policy.probe_v6))?;
        // Packets that read the old generation finish within microseconds; give them a
        // wide margin before its entries go.
        std::thread::sleep(std::time::Duration::from_millis(20));
        write_generation::<PrefixV4>(&mut self.ebpf, MAP_RULES_V4, active, &[])?;
        write_generation::<PrefixV6>(&mut self.ebpf, MAP_RULES_V6, active, &[])?;
        self.port_bits(|_, v| v & !(1 << active))?;
        Ok(())
    }

    /// Apply a validated policy with stable rule ids: a rule defined exactly as before
    /// keeps its id (and so its counters and group state, also across daemon restarts:
    /// the ids are pinned); other rules get free ids, whose old state is cleared first.
    /// Returns each rule's id.
    pub fn apply_policy(&mut self, policy: &crate::policy::Policy) -> Result<Vec<u32>> {
        let cap = self.capacity.rules;
        let hashes: Vec<u64> = policy.rules.iter().map(rule_hash).collect();
        let current: Vec<u64> = {
            let ids: Array<&MapData, u64> = Array::try_from(
                self.ebpf
                    .map(MAP_RULE_IDS)
                    .ok_or_else(|| anyhow!("map {MAP_RULE_IDS} missing"))?,
            )?;
            (0..cap).map(|i| ids.get(&i, 0).unwrap_or(0)).collect()
        };
        let mut ids: Vec<Option<u32>> = vec![None; hashes.len()];
        let mut taken: HashSet<u32> = HashSet::new();
        for (i, h) in hashes.iter().enumerate() {
            if let Some(id) = (0..cap).find(|id| current[*id as usize] == *h && !taken.contains(id))
            {
                ids[i] = Some(id);
                taken.insert(id);
            }
        }
        let mut fresh = Vec::new();
        for slot in ids.iter_mut().filter(|s| s.is_none()) {
            // Only ids the active generation does not use.
            let id = (0..cap)
                .find(|id| current[*id as usize] == 0 && !taken.contains(id))
                .ok_or_else(|| anyhow!("no free rule id: the data plane holds {cap} rules"))?;
            *slot = Some(id);
            taken.insert(id);
            fresh.push(id);
        }
        let ids: Vec<u32> = ids.into_iter().flatten().collect();
        self.forget_rules(&fresh)?;
        self.apply(&policy.compile_with_ids(&ids))?;
        let mut table: Array<&mut MapData, u64> = Array::try_from(
            self.ebpf
                .map_mut(MAP_RULE_IDS)
                .ok_or_else(|| anyhow!("map {MAP_RULE_IDS} missing"))?,
        )?;
        for id in 0..cap {
            let want = ids
                .iter()
                .position(|x| *x == id)
                .map_or(0, |pos| hashes[pos]);
            if current[id as usize] != want {
                table.set(id, want, 0)?;
            }
        }
        Ok(ids)
    }

    /// Clear everything kept under rule ids about to be given to new rules: counters,
    /// ceiling, groups, waiting clients.
    fn forget_rules(&mut self, ids: &[u32]) -> Result<()> {
        use shaper_common::maps::{GroupSlot, MAP_GROUPS, MAP_WAITERS, WaitKey, Waiter};
        use shaper_common::table;
        use std::sync::atomic::Ordering;
        if ids.is_empty() {
            return Ok(());
        }
        self.reset_rules(ids.iter().copied())?;
        let set: HashSet<u32> = ids.iter().copied().collect();
        // Emptied by compare-and-swap of the tag seen: a slot the program placed
        // another key in meanwhile stays.
        let groups = MapMemory::new(&self.ebpf, MAP_GROUPS)?;
        for i in 0..groups.entries() {
            let (Some(slot), Some(tag)) = (groups.read::<GroupSlot>(i), groups.word(i, 0)) else {
                continue;
            };
            if table::ready(slot.tag) && set.contains(&slot.state.rule_id) {
                let _ = tag.compare_exchange(slot.tag, 0, Ordering::AcqRel, Ordering::Relaxed);
            }
        }
        if let Some(m) = self.ebpf.map_mut(MAP_WAITERS) {
            let mut waiters = aya::maps::HashMap::<_, WaitKey, Waiter>::try_from(m)?;
            let stale: Vec<WaitKey> = waiters
                .iter()
                .filter_map(|kv| kv.ok())
                .filter(|(_, w)| set.contains(&w.rule_id))
                .map(|(k, _)| k)
                .collect();
            for k in stale {
                let _ = waiters.remove(&k);
            }
        }
        Ok(())
    }

    /// Every group (and probe entry) in the table, with its state.
    pub fn groups(
        &self,
    ) -> Vec<(
        shaper_common::maps::GroupKey,
        shaper_common::maps::GroupState,
    )> {
        use shaper_common::maps::{GroupSlot, MAP_GROUPS};
        let Ok(groups) = MapMemory::new(&self.ebpf, MAP_GROUPS) else {
            return Vec::new();
        };
        (0..groups.entries())
            .filter_map(|i| groups.read::<GroupSlot>(i))
            .filter(|s| shaper_common::table::ready(s.tag))
            .map(|s| (s.key, s.state))
            .collect()
    }

    /// The active policy generation (0 or 1): the epoch's parity.
    pub fn generation(&self) -> Result<u8> {
        Ok((self.epoch()? & 1) as u8)
    }

    /// The policy epoch (0 before the first policy).
    pub fn epoch(&self) -> Result<u32> {
        let config: Array<&MapData, Config> = Array::try_from(
            self.ebpf
                .map(MAP_CONFIG)
                .ok_or_else(|| anyhow!("map {MAP_CONFIG} missing"))?,
        )?;
        Ok(config::parts(config.get(&0, 0)?.word).0)
    }

    /// Store the `CONFIG` word with one atomic store through the map's memory (the map
    /// is mmap-able): a map update is a `memcpy`, which a packet reading the word at
    /// that moment could see half done.
    fn config_set(&mut self, word: u64) -> Result<()> {
        MapMemory::new(&self.ebpf, MAP_CONFIG)?.store(0, 0, word)
    }

    /// Rewrite each port's generation bits with `f(port, bits)`, writing only changes.
    fn port_bits(&mut self, f: impl Fn(u16, u32) -> u32) -> Result<()> {
        let mut ports: Array<&mut MapData, u32> = Array::try_from(
            self.ebpf
                .map_mut(MAP_PROTECTED_PORTS)
                .ok_or_else(|| anyhow!("map {MAP_PROTECTED_PORTS} missing"))?,
        )?;
        for port in 0..=u16::MAX {
            let v = ports.get(&u32::from(port), 0)?;
            let want = f(port, v);
            if want != v {
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
        use shaper_common::maps::{LineKey, MAP_GROUPS, MAP_LINES, MAP_WAITERS, WaitKey, Waiter};
        // Slots holding a group (or probe entry): their tags, one word each.
        let groups = MapMemory::new(&self.ebpf, MAP_GROUPS).map_or(0, |m| {
            (0..m.entries())
                .filter_map(|i| m.word(i, 0))
                .filter(|t| {
                    shaper_common::table::ready(t.load(std::sync::atomic::Ordering::Relaxed))
                })
                .count() as u64
        });
        let waiters = self.ebpf.map(MAP_WAITERS).and_then(|m| {
            aya::maps::HashMap::<_, WaitKey, Waiter>::try_from(m)
                .ok()
                .map(|h| h.keys().count() as u64)
        });
        let lines = self.ebpf.map(MAP_LINES).and_then(|m| {
            aya::maps::HashMap::<_, LineKey, shaper_common::line::Calendar>::try_from(m)
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
            (MAP_GROUPS, groups, u64::from(c.groups)),
            (MAP_WAITERS, waiters.unwrap_or(0), u64::from(c.waiters)),
            (MAP_LINES, lines.unwrap_or(0), u64::from(c.lines)),
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

/// `SHAPER_BPF_LOG` (error, warn, info, debug, trace; default info): the most verbose
/// level of the XDP program's log records (`aya-log`), which the daemon forwards to its
/// own log.
fn bpf_log_level() -> u8 {
    use aya_log::Level;
    let level = match std::env::var("SHAPER_BPF_LOG").as_deref() {
        Ok("error") => Level::Error,
        Ok("warn") => Level::Warn,
        Ok("debug") => Level::Debug,
        Ok("trace") => Level::Trace,
        _ => Level::Info,
    };
    level as u8
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

/// Make generation `g` of the trie hold exactly `entries` (keys already carry `g`);
/// the other generation's entries are left alone.
fn write_generation<K: aya::Pod + Eq + std::hash::Hash + AsRef<[u8]>>(
    ebpf: &mut Ebpf,
    name: &str,
    g: u8,
    entries: &[(K, u32, RuleEntry)],
) -> Result<()> {
    let mut trie: LpmTrie<&mut MapData, K, RuleEntry> = LpmTrie::try_from(
        ebpf.map_mut(name)
            .ok_or_else(|| anyhow!("map {name} missing"))?,
    )?;
    let want: HashSet<(u32, K)> = entries.iter().map(|(d, l, _)| (*l, *d)).collect();
    let stale: Vec<Key<K>> = trie
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| key_generation(k.data().as_ref()) == Some(g))
        .filter(|k| !want.contains(&(k.prefix_len(), k.data())))
        .collect();
    for k in stale {
        trie.remove(&k)?;
    }
    for (data, len, entry) in entries {
        trie.insert(&Key::new(*len, *data), entry, 0)
            .with_context(|| format!("writing {name} (is the trie full?)"))?;
    }
    Ok(())
}

/// A nonzero hash of a rule's whole definition (FNV-1a over its JSON form).
fn rule_hash(r: &crate::policy::Rule) -> u64 {
    let text = serde_json::to_string(r).unwrap_or_default();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h | 1
}

/// The kernel's tick in ns: the resolution of its coarse clock, which moves once per
/// tick, as jiffies do (`None` if the kernel does not say).
pub fn tick_ns() -> Option<u64> {
    let mut res = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_getres writes the timespec we pass.
    let ok = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut res) } == 0;
    let tick = u64::try_from(res.tv_sec)
        .ok()
        .zip(u64::try_from(res.tv_nsec).ok())
        .map(|(s, ns)| s.saturating_mul(1_000_000_000).saturating_add(ns));
    match tick {
        Some(t) if ok && t > 0 => Some(t),
        _ => None,
    }
}

/// How far the program's coarse clock (jiffies) may read behind the exact one: two
/// ticks (one it is always up to behind, one for a late tick). The program refuses
/// attempts surely over budget on the coarse clock only when they are that far from
/// conforming.
pub fn coarse_clock_lag_ns() -> u64 {
    // HZ=100 is the slowest tick Linux has: 10 ms.
    tick_ns().map_or(20_000_000, |t| t.saturating_mul(2))
}

#[cfg(test)]
mod tests {
    use super::Capacity;

    fn rules(n: usize, protect: bool) -> String {
        let mut t: String = (0..n)
            .map(|i| {
                format!(
                    "[[rule]]\nname = \"r{i}\"\nprefix = \"10.{}.{}.0/24\"\nrate = 1\n",
                    i / 256,
                    i % 256
                )
            })
            .collect();
        if protect {
            t.push_str("[protect]\nprefixes = [\"192.0.2.10/32\"]\n");
        }
        t
    }

    #[test]
    fn a_policy_that_needs_more_trie_entries_than_the_data_plane_holds_is_refused() {
        let cap = Capacity::default();
        let fits = crate::policy::parse("p.toml", &rules(4096, false)).expect("valid");
        assert_eq!(cap.check(&fits.compile()), Ok(()));
        // One protected prefix more: 4,097 IPv4 entries for 4,096 per generation.
        let over = crate::policy::parse("p.toml", &rules(4096, true)).expect("valid");
        let e = cap.check(&over.compile()).expect_err("over capacity");
        assert!(
            e.contains("needs 4097 IPv4 trie entries") && e.contains("holds 4096"),
            "{e}"
        );
    }
}
