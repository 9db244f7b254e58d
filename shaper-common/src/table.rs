//! The group table: the program's own open-addressed hash table of groups in an array
//! map ([`crate::maps::GroupSlot`]), in place of a kernel hash map. A lookup is a hash of
//! the key's five words (seeded per table), an inlined array access and a compare,
//! where a kernel hash map costs a helper's `jhash` and bucket walk.
//!
//! A key lives in one of the [`WINDOW`] slots from its home slot (`hash & mask`). Slots
//! are reclaimed only when their group is idle ([`reclaimable`]: a full budget and no
//! line for [`IDLE_NS`]), which a fresh group equals, so reclaiming changes no verdict.
//! Only when a whole window is busy is the group closest to idle evicted (it starts
//! again with a full burst, as an evicted entry of an LRU map would; the rule's
//! `ceiling` bounds what that adds).
//!
//! A slot's `tag` says what it holds: 0 when empty, otherwise the key's fingerprint (the
//! hash's high half, never 0) in the low 32 bits, [`WRITING`] while a CPU writes the key
//! and a fresh state, and a version above, bumped at every claim, so a reader that
//! checks the tag again after using a slot notices it was reclaimed meanwhile. Inserts
//! of keys with the same home take the home slot's lock, so two CPUs never put one key
//! in two slots: a CPU that finds the home locked refuses that one attempt (its client
//! retries) rather than place the key beside the other CPU's.
//!
//! Races, and what they can cost. A CPU that found a slot may still use it while
//! another CPU reclaims it for a new key (the slot's group was idle, and this attempt
//! is its first in seconds): the attempt is then charged to the new key's fresh state,
//! one admission at most, as with an LRU map whose entry is recycled under a reader.
//! A cached rule is never left on the wrong block: the CPU that stamps a probe entry
//! checks the slot's tag and owner after the stamp and takes it back if either moved.

/// Slots a key may occupy, from its home slot on.
pub const WINDOW: u32 = 4;

/// How long a group's budget must have been full and its line quiet before its slot
/// may go to another key.
pub const IDLE_NS: u64 = 2_000_000_000;

/// The fingerprint bits of a tag.
pub const FINGERPRINT: u64 = 0xffff_ffff;
/// Tag bit set while a CPU writes the slot's key and state.
pub const WRITING: u64 = 1 << 32;
/// The version's first bit in a tag.
const VERSION_SHIFT: u32 = 33;

/// The hash of a group key's five 32-bit words (the family and length word, then the
/// address) under the table's `seed`. The slot index comes from the low bits, the
/// fingerprint from the high half.
#[inline(always)]
pub const fn hash(w: [u32; 5], seed: u64) -> u64 {
    let x = (w[0] as u64 | (w[1] as u64) << 32) ^ seed;
    let y = (w[2] as u64 | (w[3] as u64) << 32) ^ seed.rotate_left(21);
    let z = w[4] as u64 ^ seed.rotate_left(43);
    // Three independent products (they run side by side), then a mix of the high bits
    // into the low ones: a product's low bits depend on its inputs' low bits only.
    let mut h = x.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ y.wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
        ^ z.wrapping_mul(0x1656_67b1_9e37_79f9);
    h ^= h >> 32;
    h = h.wrapping_mul(0xd6e8_feb8_6659_fd93);
    h ^ (h >> 29)
}

/// The fingerprint of `hash`: what a ready tag holds in its low bits (never 0).
#[inline(always)]
pub const fn fingerprint(hash: u64) -> u64 {
    (hash >> 32) | 1
}

/// Does a slot tagged `tag` hold a ready key with fingerprint `fp`?
#[inline(always)]
pub const fn holds(tag: u64, fp: u64) -> bool {
    tag & (FINGERPRINT | WRITING) == fp
}

/// Is the slot's key ready to be read (not empty, not being written)?
#[inline(always)]
pub const fn ready(tag: u64) -> bool {
    tag != 0 && tag & WRITING == 0
}

/// The tag a CPU claims a slot tagged `old` with, for a key of fingerprint `fp`.
#[inline(always)]
pub const fn claim(old: u64, fp: u64) -> u64 {
    ((old >> VERSION_SHIFT).wrapping_add(1) << VERSION_SHIFT) | WRITING | fp
}

/// The tag that publishes a claimed slot.
#[inline(always)]
pub const fn publish(claimed: u64) -> u64 {
    claimed & !WRITING
}

/// May a slot whose group has budget state `tat_ns` and line `congested_until_ns` go to
/// another key at `now`? Only when its budget has been full, and its line quiet, for
/// [`IDLE_NS`]: the group is then what a new one would be.
#[inline(always)]
pub const fn reclaimable(tat_ns: u64, congested_until_ns: u64, now: u64) -> bool {
    let busy_until = if tat_ns > congested_until_ns {
        tat_ns
    } else {
        congested_until_ns
    };
    match busy_until.checked_add(IDLE_NS) {
        Some(t) => t <= now,
        None => false,
    }
}

/// One slot of a window as the inserting CPU saw it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    pub tag: u64,
    pub tat_ns: u64,
    pub congested_until_ns: u64,
}

/// Which slot of a window a new key takes, offered one slot at a time: the first
/// empty one, else the first whose group is idle, else the one closest to idle (the
/// earliest budget state). Never a slot another CPU is writing.
#[derive(Clone, Copy, Debug)]
pub struct Choice {
    now: u64,
    /// (index, tag seen) of the idle slot, or of the earliest so far.
    best: Option<(u32, u64)>,
    best_tat: u64,
    idle: bool,
}

impl Choice {
    #[inline(always)]
    pub const fn new(now: u64) -> Choice {
        Choice {
            now,
            best: None,
            best_tat: 0,
            idle: false,
        }
    }

    /// Offer slot `i` of the window, as seen. `true`: it is empty, take it (no need to
    /// look further).
    #[inline(always)]
    pub fn offer(&mut self, i: u32, s: Seen) -> bool {
        if s.tag == 0 {
            self.best = Some((i, 0));
            return true;
        }
        if s.tag & WRITING != 0 || self.idle {
            return false;
        }
        if reclaimable(s.tat_ns, s.congested_until_ns, self.now) {
            self.idle = true;
            self.best = Some((i, s.tag));
        } else if self.best.is_none() || s.tat_ns < self.best_tat {
            self.best = Some((i, s.tag));
            self.best_tat = s.tat_ns;
        }
        false
    }

    /// The slot to take and its tag as seen; `None` if every slot was being written.
    #[inline(always)]
    pub const fn victim(&self) -> Option<(u32, u64)> {
        self.best
    }
}

/// The insert lock's value for a CPU taking it at `jiffies` (never 0, the free lock).
#[inline(always)]
pub const fn lock_value(jiffies: u64) -> u64 {
    jiffies | 1
}

/// May a lock holding `held` be taken over at `jiffies`? A program releases what it
/// takes before it returns, so a lock more than four ticks old was lost (the daemon
/// cleared the slot under it, say); it must not wedge its window.
#[inline(always)]
pub const fn lock_stale(held: u64, jiffies: u64) -> bool {
    lock_value(jiffies).wrapping_sub(held) > 4
}

#[cfg(test)]
#[path = "table/tests.rs"]
mod tests;
