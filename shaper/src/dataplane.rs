//! Loading the XDP program and writing a compiled policy into its maps.

use std::collections::HashSet;
use std::os::fd::{AsFd as _, BorrowedFd};
use std::path::Path;

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, Map, MapData, MapError, lpm_trie::Key},
    programs::Xdp,
};
use shaper_common::maps::{
    Config, GEN_BITS, MAP_CONFIG, MAP_PROTECTED_PORTS, MAP_RULE_BUDGETS, MAP_RULE_IDS,
    MAP_RULE_STATS, MAP_RULES, MAP_RULES_V4, MAP_RULES_V6, MAP_WAITERS, PROGRAM_NAME, PrefixV4,
    PrefixV6, RuleBudget, RuleEntry, RuleStats, WaitKey, Waiter, config, gen_key, key_generation,
};

use crate::{batch, capacity::Capacity, clock, mapmem::MapMemory, policy::Compiled};

/// Byte offset of the seed in the `CONFIG` value.
const SEED_OFFSET: usize = std::mem::offset_of!(Config, seed);

/// A policy written under the inactive generation, waiting for [`Dataplane::switch`].
pub struct Staged {
    /// The generation in use before the switch.
    active: u8,
    /// The `CONFIG` word that switches to the staged one, and the map's memory it is
    /// stored into (mapped while staging: the switch itself cannot fail half way
    /// through a set of interfaces for want of a mapping).
    word: u64,
    config: MapMemory,
}

/// The loaded program and its maps.
pub struct Dataplane {
    pub ebpf: Ebpf,
    pub capacity: Capacity,
    /// Places in the line released after `max_wait` that [`Dataplane::line`] cleared,
    /// by rule id (the program counts those whose client knocked after it).
    released: std::collections::HashMap<u32, u64>,
    /// The keys each generation of the IPv4 rule trie holds, once known (read once, then
    /// kept as written): spares reading a million entries back at every apply.
    held_v4: Held<PrefixV4>,
    /// Likewise for the IPv6 trie.
    held_v6: Held<PrefixV6>,
    /// Rule ids from this one up have served no rule since the maps were made, so they
    /// hold no counters, groups or waiting clients: nothing to read or clear (a first
    /// policy of a million rules would otherwise zero a million counters).
    used_below: u32,
}

/// The keys of each generation of a rule trie (`None`: not known yet).
type Held<K> = [Option<Vec<Key<K>>>; 2];

/// The `defer` lines of one data plane now: see [`Dataplane::line`].
#[derive(Clone, Debug, Default)]
pub struct Line {
    /// The clients waiting (places within their rule's `max_wait`).
    pub waiting: Vec<Waiting>,
    /// Entries left in the waiters' table (the fill gauge's count).
    pub entries: u64,
}

/// A client waiting in a `defer` line now.
#[derive(Clone, Copy, Debug)]
pub struct Waiting {
    pub key: WaitKey,
    pub rule_id: u32,
    pub first_seen_ns: u64,
}

/// How to load the program: [`Loader::new`] loads the embedded object with the default
/// map sizes and unpinned maps; each setter changes one of those.
#[derive(Clone, Debug)]
pub struct Loader<'a> {
    object: &'a [u8],
    capacity: Capacity,
    pins: Option<&'a Path>,
    build: Option<u32>,
}

impl Default for Loader<'_> {
    fn default() -> Self {
        Loader::new()
    }
}

impl<'a> Loader<'a> {
    pub fn new() -> Loader<'a> {
        Loader {
            object: crate::EBPF_OBJECT,
            capacity: Capacity::default(),
            pins: None,
            build: None,
        }
    }

    /// Map sizes.
    pub fn capacity(mut self, capacity: Capacity) -> Self {
        self.capacity = capacity;
        self
    }

    /// Another object than the embedded one (another build, for upgrade tests).
    pub fn object(mut self, object: &'a [u8]) -> Self {
        self.object = object;
        self
    }

    /// Pin the maps in `dir`, reusing those pinned there already (after a layout
    /// check).
    pub fn pinned(mut self, dir: &'a Path) -> Self {
        self.pins = Some(dir);
        self
    }

    /// Set the program's build number (another build of the same code, for upgrade
    /// tests).
    pub fn build(mut self, build: u32) -> Self {
        self.build = Some(build);
        self
    }

    /// Load the object and the `shaper` program into the kernel.
    pub fn load(self) -> Result<Dataplane> {
        let Loader {
            object,
            capacity,
            pins: dir,
            build,
        } = self;
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
        let lag = clock::coarse_clock_lag_ns();
        loader.override_global("SHAPER_COARSE_LAG_NS", &lag, true);
        // Without it the program never decides on the coarse clock.
        let tick = clock::tick_ns().unwrap_or(0);
        loader.override_global("SHAPER_TICK_NS", &tick, true);
        let mask = capacity.groups - 1;
        loader.override_global("SHAPER_GROUP_MASK", &mask, true);
        loader
            .map_max_entries(MAP_RULE_STATS, capacity.rules)
            .map_max_entries(MAP_RULE_BUDGETS, capacity.rules)
            .map_max_entries(MAP_RULES, capacity.rules)
            .map_max_entries(MAP_RULE_IDS, capacity.rules)
            .map_max_entries(MAP_RULES_V4, capacity.prefixes)
            .map_max_entries(MAP_RULES_V6, capacity.prefixes)
            .map_max_entries(shaper_common::maps::MAP_GROUPS, capacity.groups)
            .map_max_entries(MAP_WAITERS, capacity.waiters)
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
        let mut dp = Dataplane {
            ebpf,
            capacity,
            released: std::collections::HashMap::new(),
            held_v4: Default::default(),
            held_v6: Default::default(),
            used_below: capacity.rules,
        };
        dp.seed_groups()?;
        // Epoch 0: no policy was ever applied to these maps.
        if dp.epoch()? == 0 {
            dp.used_below = 0;
        }
        Ok(dp)
    }
}

impl Dataplane {
    /// Load the embedded object with the default map sizes, unpinned ([`Loader`] for
    /// more).
    pub fn load() -> Result<Dataplane> {
        Loader::new().load()
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
            getrandom::fill(&mut b).map_err(|e| anyhow!("getrandom: {e}"))?;
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

    /// Map `name`, typed (`Array<&MapData, V>`, `PerCpuArray<…>`, …).
    fn map<'a, T>(&'a self, name: &str) -> Result<T>
    where
        T: TryFrom<&'a Map, Error = MapError>,
    {
        let m = self
            .ebpf
            .map(name)
            .ok_or_else(|| anyhow!("map {name} missing"))?;
        T::try_from(m).with_context(|| format!("map {name}"))
    }

    /// The descriptor of map `name`, for batch access ([`crate::batch`]).
    fn fd(&self, name: &str) -> Result<BorrowedFd<'_>> {
        map_fd(&self.ebpf, name)
    }

    /// Each rule id's definition hash as the maps hold it (0: the id is free). Ids are
    /// stable across applies and daemon restarts: the table is pinned.
    pub fn rule_hashes(&self) -> Result<Vec<u64>> {
        if self.used_below == 0 {
            return Ok(vec![0; self.capacity.rules as usize]);
        }
        let (ids, hashes) = batch::read::<u32, u64>(self.fd(MAP_RULE_IDS)?, 1)
            .with_context(|| format!("reading {MAP_RULE_IDS}"))?;
        let mut table = vec![0; self.capacity.rules as usize];
        for (id, h) in ids.into_iter().zip(hashes) {
            if let Some(t) = table.get_mut(id as usize) {
                *t = h;
            }
        }
        Ok(table)
    }

    /// The first step of an apply ([`crate::apply`]): clear what the `fresh` ids kept
    /// from rules they served before (counters, ceiling, groups, waiting clients), then
    /// write the rules under their ids and the policy's prefixes and ports under the
    /// inactive generation. No packet reads any of it until [`Dataplane::switch`]: a
    /// rule id the new policy uses is either an unchanged rule (the same entry) or one
    /// the active generation does not use.
    pub fn stage(&mut self, policy: &Compiled, fresh: &[u32]) -> Result<Staged> {
        if policy.rule_count() > self.capacity.rules as usize {
            return Err(anyhow!(
                "the policy has {} rules but the data plane holds {}",
                policy.rule_count(),
                self.capacity.rules
            ));
        }
        let used: Vec<u32> = fresh
            .iter()
            .copied()
            .filter(|&id| id < self.used_below)
            .collect();
        self.forget_rules(&used)?;
        if let Some(top) = fresh.iter().max() {
            self.used_below = self.used_below.max(top + 1);
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
        let entries = policy.by_id();
        let ids: Vec<u32> = entries.iter().map(|e| e.rule_id).collect();
        batch::write(self.fd(MAP_RULES)?, &ids, entries)
            .with_context(|| format!("writing {MAP_RULES}"))?;
        let fd = map_fd(&self.ebpf, MAP_RULES_V4)?;
        write_generation(fd, MAP_RULES_V4, next, &v4, &mut self.held_v4)?;
        let fd = map_fd(&self.ebpf, MAP_RULES_V6)?;
        write_generation(fd, MAP_RULES_V6, next, &v6, &mut self.held_v6)?;
        let protected: HashSet<u16> = policy.protected_ports.iter().copied().collect();
        self.port_bits(|port, v| {
            if protected.contains(&port) {
                v | (1 << next)
            } else {
                v & !(1 << next)
            }
        })?;
        Ok(Staged {
            active,
            word: config::word(next_epoch, policy.probe_v4, policy.probe_v6),
            config: MapMemory::new(&self.ebpf, MAP_CONFIG)?,
        })
    }

    /// Switch to the staged generation: one atomic store of the `CONFIG` word. A packet
    /// reads the word once, so it sees the old policy or the new one, never a mix.
    /// (Stored through the map's memory, the map being mmap-able: a map update is a
    /// `memcpy`, which a packet reading the word at that moment could see half done.)
    pub fn switch(&mut self, staged: &Staged) -> Result<()> {
        staged.config.store(0, 0, staged.word)
    }

    /// The last step, once packets that read the old generation are done: remove its
    /// entries, and record which rule (by definition hash) each id now serves: `want`,
    /// per id, where the table held `had` (as [`Dataplane::rule_hashes`] read it
    /// before the apply; staging does not change it). Only the ids that change are
    /// written.
    pub fn retire(&mut self, staged: &Staged, had: &[u64], want: &[u64]) -> Result<()> {
        let old = staged.active;
        let fd = map_fd(&self.ebpf, MAP_RULES_V4)?;
        write_generation(fd, MAP_RULES_V4, old, &[], &mut self.held_v4)?;
        let fd = map_fd(&self.ebpf, MAP_RULES_V6)?;
        write_generation(fd, MAP_RULES_V6, old, &[], &mut self.held_v6)?;
        self.port_bits(|_, v| v & !(1 << old))?;
        let (ids, hashes): (Vec<u32>, Vec<u64>) = (0u32..)
            .zip(had.iter().zip(want))
            .filter(|(_, (have, want))| have != want)
            .map(|(id, (_, want))| (id, *want))
            .unzip();
        batch::write(self.fd(MAP_RULE_IDS)?, &ids, &hashes)
            .with_context(|| format!("writing {MAP_RULE_IDS}"))
    }

    /// Clear everything kept under rule ids about to be given to new rules: counters,
    /// ceiling, groups, waiting clients.
    fn forget_rules(&mut self, ids: &[u32]) -> Result<()> {
        use shaper_common::maps::{GroupSlot, MAP_GROUPS};
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
        let stale: Vec<WaitKey> = self
            .waiters()?
            .into_iter()
            .filter(|(_, w)| set.contains(&w.rule_id))
            .map(|(k, _)| k)
            .collect();
        // One by one: a client the program admitted meanwhile is gone already, which
        // a batch would take for an error.
        let mut map = aya::maps::HashMap::<_, WaitKey, Waiter>::try_from(
            self.ebpf
                .map_mut(MAP_WAITERS)
                .ok_or_else(|| anyhow!("map {MAP_WAITERS} missing"))?,
        )?;
        for k in stale {
            let _ = map.remove(&k);
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
        let config: Array<&MapData, Config> = self.map(MAP_CONFIG)?;
        Ok(config::parts(config.get(&0, 0)?.word).0)
    }

    /// Rewrite each port's generation bits with `f(port, bits)`, writing only changes.
    fn port_bits(&mut self, f: impl Fn(u16, u32) -> u32) -> Result<()> {
        let fd = self.fd(MAP_PROTECTED_PORTS)?;
        let (ports, bits) = batch::read::<u32, u32>(fd, 1)
            .with_context(|| format!("reading {MAP_PROTECTED_PORTS}"))?;
        let (ports, bits): (Vec<u32>, Vec<u32>) = ports
            .into_iter()
            .zip(bits)
            .filter_map(|(port, v)| {
                let want = f(u16::try_from(port).ok()?, v);
                (want != v).then_some((port, want))
            })
            .unzip();
        batch::write(fd, &ports, &bits).with_context(|| format!("writing {MAP_PROTECTED_PORTS}"))
    }

    /// Reset the ceiling state and counters of rule ids (when a rule id is reused).
    pub fn reset_rules(&mut self, ids: impl IntoIterator<Item = u32>) -> Result<()> {
        let ncpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let ids: Vec<u32> = ids.into_iter().collect();
        batch::write(
            self.fd(MAP_RULE_BUDGETS)?,
            &ids,
            &vec![RuleBudget::default(); ids.len()],
        )
        .with_context(|| format!("writing {MAP_RULE_BUDGETS}"))?;
        for id in &ids {
            self.released.remove(id);
        }
        batch::write(
            self.fd(MAP_RULE_STATS)?,
            &ids,
            &vec![RuleStats::default(); ids.len() * ncpus],
        )
        .with_context(|| format!("writing {MAP_RULE_STATS}"))
    }

    /// Entries in use and capacity of the maps that fill up: rule tries, groups, waiters
    /// (`waiters`: their count if the caller just read the table, [`Line::entries`]).
    pub fn fill_levels(&self, waiters: Option<u64>) -> Vec<(&'static str, u64, u64)> {
        use shaper_common::maps::{LineKey, MAP_GROUPS, MAP_LINES};
        // Slots holding a group (or probe entry): their tags, one word each.
        let groups = MapMemory::new(&self.ebpf, MAP_GROUPS).map_or(0, |m| {
            (0..m.entries())
                .filter_map(|i| m.word(i, 0))
                .filter(|t| {
                    shaper_common::table::ready(t.load(std::sync::atomic::Ordering::Relaxed))
                })
                .count() as u64
        });
        let waiters = waiters.unwrap_or_else(|| self.waiters().map_or(0, |w| w.len() as u64));
        let lines = self.ebpf.map(MAP_LINES).and_then(|m| {
            aya::maps::HashMap::<_, LineKey, shaper_common::line::Calendar>::try_from(m)
                .ok()
                .map(|h| h.keys().count() as u64)
        });
        // Entries of a trie: as written, once known (a scrape at a million rules would
        // otherwise walk two million keys), else read in batches.
        let trie = |name: &str| -> Option<u64> {
            let held: Option<usize> = if name == MAP_RULES_V4 {
                self.held_v4.iter().map(|g| g.as_ref().map(Vec::len)).sum()
            } else {
                self.held_v6.iter().map(|g| g.as_ref().map(Vec::len)).sum()
            };
            if let Some(n) = held {
                return Some(n as u64);
            }
            let fd = self.fd(name).ok()?;
            let n = if name == MAP_RULES_V4 {
                batch::read::<Key<PrefixV4>, RuleEntry>(fd, 1).ok()?.0.len()
            } else {
                batch::read::<Key<PrefixV6>, RuleEntry>(fd, 1).ok()?.0.len()
            };
            Some(n as u64)
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
            (MAP_WAITERS, waiters, u64::from(c.waiters)),
            (MAP_LINES, lines.unwrap_or(0), u64::from(c.lines)),
        ]
    }

    /// The global counters, summed over CPUs, indexed by `Reason`.
    pub fn global_counters(&self) -> Result<Vec<u64>> {
        crate::counters::global(&self.ebpf)
    }

    /// One rule's counters, summed over CPUs (with the places [`Dataplane::line`]
    /// released).
    pub fn rule_counters(&self, rule_id: u32) -> Result<RuleStats> {
        let mut c = crate::counters::rule(&self.ebpf, rule_id)?;
        c.released = c
            .released
            .wrapping_add(self.released.get(&rule_id).copied().unwrap_or(0));
        Ok(c)
    }

    /// Every entry of the waiters' table, in a few system calls: a scrape reads it
    /// whole, and it holds up to 65,536 clients.
    fn waiters(&self) -> Result<Vec<(WaitKey, Waiter)>> {
        let (keys, values) = batch::read_hash::<WaitKey, Waiter>(self.fd(MAP_WAITERS)?)
            .with_context(|| format!("reading {MAP_WAITERS}"))?;
        Ok(keys.into_iter().zip(values).collect())
    }

    /// The clients waiting in the `defer` lines now. A place whose `max_wait` has
    /// passed (`max_wait_ns` of its rule id; `None`: not a rule in force) is released
    /// here: its entry is deleted and counted under its rule. A client that gave up
    /// never knocks again, so without this its place would stay until the table's LRU
    /// evicts it, and nobody would count it. (A client that does knock after its
    /// `max_wait` finds no place and gets what `drop` would give it, as it would with
    /// its place released at that knock.)
    pub fn line(&mut self, now: u64, max_wait_ns: impl Fn(u32) -> Option<u64>) -> Line {
        let mut live = Vec::new();
        let mut expired = Vec::new();
        let all = self.waiters().unwrap_or_default();
        let mut entries = all.len() as u64;
        for (key, w) in all {
            let Some(max_wait) = max_wait_ns(w.rule_id) else {
                continue;
            };
            let first_seen_ns = w.knocks.first_seen_ns;
            if now.saturating_sub(first_seen_ns) > max_wait {
                expired.push((key, w.rule_id));
            } else {
                live.push(Waiting {
                    key,
                    rule_id: w.rule_id,
                    first_seen_ns,
                });
            }
        }
        if !expired.is_empty()
            && let Some(m) = self.ebpf.map_mut(MAP_WAITERS)
            && let Ok(mut h) = aya::maps::HashMap::<_, WaitKey, Waiter>::try_from(m)
        {
            for (key, rule_id) in expired {
                // Gone already: the client got in or knocked meanwhile.
                if h.remove(&key).is_ok() {
                    *self.released.entry(rule_id).or_default() += 1;
                    entries = entries.saturating_sub(1);
                }
            }
        }
        Line {
            waiting: live,
            entries,
        }
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
    use rustix::process::{Resource, Rlimit, setrlimit};
    // Failure only matters on old kernels, where the map creation error that follows
    // says so.
    let _ = setrlimit(
        Resource::Memlock,
        Rlimit {
            current: None,
            maximum: None,
        },
    );
}

/// Make generation `g` of the trie `name` hold exactly `entries` (keys already carry
/// `g`); the other generation's entries are left alone. `held`: the keys of each
/// generation, read from the trie the first time, kept up to date. Keys are written
/// and deleted in order: neighbours share the trie's path, which stays in cache (this
/// halves the time of a million inserts).
fn write_generation<K: aya::Pod + Ord + std::hash::Hash + AsRef<[u8]>>(
    trie: BorrowedFd<'_>,
    name: &str,
    g: u8,
    entries: &[(K, u32, RuleEntry)],
    held: &mut Held<K>,
) -> Result<()> {
    if held.iter().any(Option::is_none) {
        let (keys, _) =
            batch::read::<Key<K>, RuleEntry>(trie, 1).with_context(|| format!("reading {name}"))?;
        for (gen_, h) in (0u8..).zip(held.iter_mut()) {
            let of_gen = keys
                .iter()
                .filter(|k| key_generation(k.data().as_ref()) == Some(gen_));
            *h = Some(of_gen.copied().collect());
        }
    }
    let slot = &mut held[usize::from(g & 1)];
    let had = slot.take().unwrap_or_default();
    let mut stale: Vec<Key<K>> = if had.is_empty() {
        had
    } else {
        let want: HashSet<(K, u32)> = entries.iter().map(|(d, l, _)| (*d, *l)).collect();
        had.into_iter()
            .filter(|k| !want.contains(&(k.data(), k.prefix_len())))
            .collect()
    };
    stale.sort_unstable_by_key(|k| (k.data(), k.prefix_len()));
    batch::delete(trie, &stale).with_context(|| format!("clearing {name}"))?;
    let mut entries: Vec<&(K, u32, RuleEntry)> = entries.iter().collect();
    entries.sort_unstable_by_key(|(d, l, _)| (*d, *l));
    let keys: Vec<Key<K>> = entries.iter().map(|(d, l, _)| Key::new(*l, *d)).collect();
    let values: Vec<RuleEntry> = entries.iter().map(|(_, _, e)| *e).collect();
    batch::write(trie, &keys, &values)
        .with_context(|| format!("writing {name} (is the trie full?)"))?;
    *slot = Some(keys);
    Ok(())
}

/// The descriptor of map `name` of `ebpf`.
fn map_fd<'a>(ebpf: &'a Ebpf, name: &str) -> Result<BorrowedFd<'a>> {
    match ebpf.map(name) {
        Some(
            Map::Array(m)
            | Map::PerCpuArray(m)
            | Map::LpmTrie(m)
            | Map::HashMap(m)
            | Map::LruHashMap(m),
        ) => Ok(m.fd().as_fd()),
        _ => Err(anyhow!("map {name} missing")),
    }
}
