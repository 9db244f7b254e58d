//! Pinned state under `--pin-root` (default `/sys/fs/bpf/shaper`), one directory per
//! interface: the XDP link (`link`) and every map by name. Pins outlive the daemon: the
//! program keeps enforcing the last policy if the daemon dies, and a restarted (or
//! newer) daemon adopts them.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::maps::MapData;
use shaper_common::{
    Reason,
    maps::{
        Config, GroupSlot, LineKey, MAP_CONFIG, MAP_GLOBAL_STATS, MAP_GROUPS, MAP_LINES,
        MAP_PROBES, MAP_PROTECTED_PORTS, MAP_RULE_BUDGETS, MAP_RULE_IDS, MAP_RULE_STATS, MAP_RULES,
        MAP_RULES_V4, MAP_RULES_V6, MAP_WAITERS, PORTS, PROBE_SLOTS, PrefixV4, PrefixV6, ProbeSlot,
        RuleBudget, RuleEntry, RuleStats, WaitKey, Waiter,
    },
};

use crate::capacity::Capacity;

/// `BPF_F_MMAPABLE` (linux/bpf.h).
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// The default pin root.
pub const DEFAULT_ROOT: &str = "/sys/fs/bpf/shaper";
/// Where bpffs is mounted when the host has not mounted it.
const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: rustix::fs::FsWord = 0xcafe_4a11;
/// The link's pin in an interface's directory.
pub const LINK: &str = "link";

/// The maps that are pinned (the program's global data is not).
pub const PINNED_MAPS: [&str; 13] = [
    MAP_RULES_V4,
    MAP_RULES_V6,
    MAP_PROTECTED_PORTS,
    MAP_GROUPS,
    MAP_RULE_BUDGETS,
    MAP_RULE_STATS,
    MAP_GLOBAL_STATS,
    MAP_WAITERS,
    MAP_PROBES,
    MAP_LINES,
    MAP_CONFIG,
    MAP_RULE_IDS,
    MAP_RULES,
];

/// One interface's pin directory.
pub fn iface_dir(root: &Path, iface: &str) -> PathBuf {
    root.join(iface)
}

fn is_bpffs(path: &Path) -> bool {
    rustix::fs::statfs(path).is_ok_and(|st| st.f_type == BPF_FS_MAGIC)
}

/// Make sure `root` is on a bpffs (mounting one at /sys/fs/bpf if the host has not) and
/// exists.
pub fn ensure_root(root: &Path) -> Result<()> {
    let bpffs = Path::new(BPFFS);
    if root.starts_with(bpffs) && !is_bpffs(bpffs) {
        fs::create_dir_all(bpffs).with_context(|| format!("creating {BPFFS}"))?;
        rustix::mount::mount(
            "bpf",
            BPFFS,
            "bpf",
            rustix::mount::MountFlags::empty(),
            None,
        )
        .map_err(std::io::Error::from)
        .with_context(|| format!("mounting bpffs at {BPFFS} (are you root?)"))?;
        tracing::info!(path = BPFFS, "mounted bpffs");
    }
    fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    if !is_bpffs(root) {
        bail!(
            "--pin-root {} is not on a bpffs; mount one there (mount -t bpf bpf DIR) or pick a \
             directory under {BPFFS}",
            root.display()
        );
    }
    Ok(())
}

/// (key size, value size, max entries) each pinned map must have for this build.
fn expected(name: &str, cap: &Capacity) -> Option<(u32, u32, u32)> {
    let s = |n: usize| n as u32;
    Some(match name {
        MAP_RULES_V4 => (
            4 + s(size_of::<PrefixV4>()),
            s(size_of::<RuleEntry>()),
            cap.prefixes,
        ),
        MAP_RULES_V6 => (
            4 + s(size_of::<PrefixV6>()),
            s(size_of::<RuleEntry>()),
            cap.prefixes,
        ),
        MAP_CONFIG => (4, s(size_of::<Config>()), 1),
        MAP_RULES => (4, s(size_of::<RuleEntry>()), cap.rules),
        MAP_RULE_IDS => (4, 8, cap.rules),
        MAP_PROTECTED_PORTS => (4, 4, PORTS),
        MAP_GROUPS => (4, s(size_of::<GroupSlot>()), cap.groups),
        MAP_RULE_BUDGETS => (4, s(size_of::<RuleBudget>()), cap.rules),
        MAP_RULE_STATS => (4, s(size_of::<RuleStats>()), cap.rules),
        MAP_GLOBAL_STATS => (4, 8, Reason::COUNT),
        MAP_WAITERS => (s(size_of::<WaitKey>()), s(size_of::<Waiter>()), cap.waiters),
        MAP_PROBES => (4, s(size_of::<ProbeSlot>()), PROBE_SLOTS),
        MAP_LINES => (
            s(size_of::<LineKey>()),
            s(size_of::<shaper_common::line::Calendar>()),
            cap.lines,
        ),
        _ => return None,
    })
}

/// The `shaper run` flag that sizes the pinned map `name`, if one does.
fn limit_flag(name: &str) -> Option<&'static str> {
    Some(match name {
        MAP_RULES_V4 | MAP_RULES_V6 => "--max-prefixes",
        MAP_RULES | MAP_RULE_IDS | MAP_RULE_BUDGETS | MAP_RULE_STATS => "--max-rules",
        MAP_GROUPS => "--max-groups, rounded up to a power of two",
        MAP_WAITERS => "--max-waiters",
        _ => return None,
    })
}

/// Refuse pinned maps whose layout or size differs from this build's: reusing them
/// would make the program and the daemon read each other's bytes wrongly.
pub fn check_layout(dir: &Path, cap: &Capacity) -> Result<()> {
    for name in PINNED_MAPS {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapData::from_pin(&path)
            .and_then(|m| m.info())
            .with_context(|| format!("opening pinned map {}", path.display()))?;
        let (k, v, n) = expected(name, cap).ok_or_else(|| anyhow!("unknown map {name}"))?;
        let found = (info.key_size(), info.value_size(), info.max_entries());
        if (found.0, found.1) == (k, v)
            && found.2 != n
            && let Some(flag) = limit_flag(name)
        {
            bail!(
                "pinned map {} holds {} entries where this start asks {n} ({flag}): the \
                 maps are sized when they are first made, and kept across restarts. Start \
                 with the limits the maps were made with to keep their state, or run \
                 `shaper detach` first to make them again at the new size (counters and \
                 waiting lines start again).",
                path.display(),
                found.2
            );
        }
        if found != (k, v, n) {
            bail!(
                "pinned map {} does not match this shaper build (key/value/entries {}/{}/{}, \
                 this build needs {k}/{v}/{n}): it was made by another version or capacity. \
                 Refusing to reuse it. `shaper detach` removes the old program and its state \
                 (counters and waiting lines start again).",
                path.display(),
                found.0,
                found.1,
                found.2
            );
        }
        // CONFIG and GROUPS are used through their memory: they must be mmap-able.
        if (name == MAP_CONFIG || name == MAP_GROUPS) && info.map_flags() & BPF_F_MMAPABLE == 0 {
            bail!(
                "pinned map {} does not match this shaper build (not mmap-able): it was \
                 made by another version. Refusing to reuse it. `shaper detach` removes the \
                 old program and its state (counters and waiting lines start again).",
                path.display()
            );
        }
    }
    Ok(())
}

/// Remove an interface's pins: the link (which detaches the program once nothing else
/// holds it) and the maps. Returns whether there was anything to remove.
pub fn remove(dir: &Path) -> Result<bool> {
    if !dir.exists() {
        return Ok(false);
    }
    let link = dir.join(LINK);
    if link.exists() {
        fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
    }
    for name in PINNED_MAPS {
        let p = dir.join(name);
        if p.exists() {
            fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(true)
}
