//! The group table (`shaper_common::table`): a key's home slot is checked inline in the
//! policer; the rest of its window and inserts are global functions. The verifier
//! checks a global function once, on its own (its arguments are plain words), where a
//! static one is checked again on every path of its callers that reaches it: 542,000
//! instructions processed with them static, 207,000 global. They take the key as
//! words ([`Gk::args`]), which need no proof of what they point at.

use core::intrinsics::{AtomicOrdering, atomic_cxchg};

use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_ns};
use shaper_common::{
    maps::{GroupSlot, GroupState},
    table::{self, Seen, WINDOW},
};

use crate::maps::GROUPS;

/// Slots in the group table minus one (a power of two minus one), set by the loader.
#[unsafe(no_mangle)]
static SHAPER_GROUP_MASK: u32 = shaper_common::maps::MAX_GROUPS - 1;

/// No slot (what [`shaper_group_insert`] returns when it could not place the key).
const NO_SLOT: u32 = u32::MAX;

/// A group key as five words (the family and length word, then the address), and its
/// hash under the table's seed.
#[derive(Clone, Copy)]
pub struct Gk {
    pub w: [u32; 5],
    pub hash: u64,
}

impl Gk {
    /// The key as four arguments of a call to a global function (in registers; the
    /// caller's frame is near the stack limit too): words 0–1, 2–3, 4, and the hash.
    #[inline(always)]
    fn args(&self) -> (u64, u64, u64, u64) {
        let [w0, w1, w2, w3, w4] = self.w;
        (
            u64::from(w0) | u64::from(w1) << 32,
            u64::from(w2) | u64::from(w3) << 32,
            u64::from(w4),
            self.hash,
        )
    }

    /// The key from [`Gk::args`].
    #[inline(always)]
    fn from_args(a: u64, b: u64, c: u64, hash: u64) -> Gk {
        Gk {
            w: [
                a as u32,
                (a >> 32) as u32,
                b as u32,
                (b >> 32) as u32,
                c as u32,
            ],
            hash,
        }
    }
}

/// A slot found holding a key (null: none), and the tag it had: a caller that wrote
/// into the slot checks the tag again ([`Found::still`]) to learn whether it was
/// reclaimed meanwhile. Not an `Option`: the verifier refuses the undefined tag of a
/// `None` that the compiler keeps in a register.
#[derive(Clone, Copy)]
pub struct Found {
    slot: *mut GroupSlot,
    tag: u64,
}

impl Found {
    /// No slot.
    pub const NONE: Found = Found {
        slot: core::ptr::null_mut(),
        tag: 0,
    };

    /// The group's state, if a slot was found.
    #[inline(always)]
    pub fn state(&self) -> Option<*mut GroupState> {
        if self.slot.is_null() {
            return None;
        }
        // SAFETY: a live GROUPS value (non-null: from a checked lookup).
        Some(unsafe { &raw mut (*self.slot).state })
    }

    /// The slot (null: none).
    #[inline(always)]
    pub fn slot(&self) -> *mut GroupSlot {
        self.slot
    }

    /// Does the slot still hold the key it held when found?
    #[inline(always)]
    pub fn still(&self) -> bool {
        // SAFETY: as above; the tag is written whole.
        !self.slot.is_null()
            && unsafe { core::ptr::read_volatile(&raw const (*self.slot).tag) == self.tag }
    }
}

#[inline(always)]
fn mask() -> u32 {
    // SAFETY: a read of the program's own read-only global.
    unsafe { core::ptr::read_volatile(&raw const SHAPER_GROUP_MASK) }
}

/// Does `slot` hold `gk` (ready)? Returns its tag if so.
#[inline(always)]
fn holds(slot: *mut GroupSlot, gk: &Gk, fp: u64) -> Option<u64> {
    // SAFETY: a live GROUPS value; the tag is read before the key, and a key being
    // written is never matched (its tag says so).
    unsafe {
        let tag = core::ptr::read_volatile(&raw const (*slot).tag);
        if !table::holds(tag, fp) {
            return None;
        }
        let k = (&raw const (*slot).key).cast::<u32>();
        let [w0, w1, w2, w3, w4] = gk.w;
        if k.read_volatile() == w0
            && k.add(1).read_volatile() == w1
            && k.add(2).read_volatile() == w2
            && k.add(3).read_volatile() == w3
            && k.add(4).read_volatile() == w4
        {
            Some(tag)
        } else {
            None
        }
    }
}

/// The slot holding `gk`, if any. Its home slot is checked here (inlined: nearly
/// every lookup ends there), the rest of the window in a function of its own.
#[inline(always)]
pub fn find(gk: &Gk) -> Found {
    let fp = table::fingerprint(gk.hash);
    if let Some(slot) = GROUPS.get_ptr_mut(gk.hash as u32 & mask())
        && let Some(tag) = holds(slot, gk, fp)
    {
        return Found { slot, tag };
    }
    let (a, b, c, h) = gk.args();
    at(shaper_group_find_far(a, b, c, h), gk)
}

/// The slot `idx`, if it holds `gk`.
#[inline(always)]
fn at(idx: u32, gk: &Gk) -> Found {
    match GROUPS.get_ptr_mut(idx) {
        Some(slot) => match holds(slot, gk, table::fingerprint(gk.hash)) {
            Some(tag) => Found { slot, tag },
            None => Found::NONE,
        },
        None => Found::NONE,
    }
}

/// The slot of the key ([`Gk::args`]) past its home in its window, or [`NO_SLOT`].
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn shaper_group_find_far(a: u64, b: u64, c: u64, hash: u64) -> u32 {
    let gk = &Gk::from_args(a, b, c, hash);
    let fp = table::fingerprint(gk.hash);
    let mask = mask();
    let home = gk.hash as u32;
    let mut i = 1;
    while i < WINDOW {
        let idx = home.wrapping_add(i) & mask;
        if let Some(slot) = GROUPS.get_ptr_mut(idx)
            && holds(slot, gk, fp).is_some()
        {
            return idx;
        }
        i += 1;
    }
    NO_SLOT
}

/// The slot holding `gk`, placed there now if it was in none (see
/// `shaper_common::table`); none when the key could not be placed (another CPU was
/// placing a key of the same home, or writing every slot of the window).
#[inline(always)]
pub fn find_or_insert(gk: &Gk) -> Found {
    let f = find(gk);
    if !f.slot.is_null() {
        return f;
    }
    let (a, b, c, h) = gk.args();
    at(shaper_group_insert(a, b, c, h), gk)
}

/// Place the key ([`Gk::args`]) in its window under its home slot's lock; its slot, or
/// [`NO_SLOT`].
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn shaper_group_insert(a: u64, b: u64, c: u64, hash: u64) -> u32 {
    let gk = &Gk::from_args(a, b, c, hash);
    let home = gk.hash as u32 & mask();
    let Some(h) = GROUPS.get_ptr_mut(home) else {
        return NO_SLOT;
    };
    // SAFETY: an inlined helper without arguments.
    let j = unsafe { bpf_jiffies64() };
    let mine = table::lock_value(j);
    // SAFETY: a live GROUPS value; the lock word is only ever changed by
    // compare-and-swap (or the releasing store of its holder).
    let lock = unsafe { &raw mut (*h).lock };
    let (held, ok) = unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(lock, 0, mine)
    };
    if !ok {
        // SAFETY: as above.
        let taken = table::lock_stale(held, j)
            && unsafe {
                atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                    lock, held, mine,
                )
            }
            .1;
        if !taken {
            return NO_SLOT;
        }
    }
    let idx = insert_locked(gk, home);
    // SAFETY: as above: this CPU holds the lock.
    unsafe { core::ptr::write_volatile(lock, 0) };
    idx
}

/// [`shaper_group_insert`] with the home's lock held: a CPU that placed the same key
/// since this one looked is found; otherwise the slot the window's [`table::Choice`]
/// picks is claimed by compare-and-swap of its tag, written and published.
#[inline(always)]
fn insert_locked(gk: &Gk, home: u32) -> u32 {
    let fp = table::fingerprint(gk.hash);
    let mask = mask();
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let mut choice = table::Choice::new(now);
    let mut i = 0;
    while i < WINDOW {
        let idx = home.wrapping_add(i) & mask;
        let Some(slot) = GROUPS.get_ptr_mut(idx) else {
            return NO_SLOT;
        };
        if holds(slot, gk, fp).is_some() {
            return idx;
        }
        // SAFETY: a live GROUPS value; racy reads only pick the victim.
        let seen = unsafe {
            Seen {
                tag: core::ptr::read_volatile(&raw const (*slot).tag),
                tat_ns: core::ptr::read_volatile(&raw const (*slot).state.tat_ns),
                congested_until_ns: core::ptr::read_volatile(
                    &raw const (*slot).state.line.congested_until_ns,
                ),
            }
        };
        if choice.offer(i, seen) {
            break;
        }
        i += 1;
    }
    let Some((v, old)) = choice.victim() else {
        return NO_SLOT;
    };
    let idx = home.wrapping_add(v) & mask;
    let Some(slot) = GROUPS.get_ptr_mut(idx) else {
        return NO_SLOT;
    };
    let claimed = table::claim(old, fp);
    // SAFETY: a live GROUPS value. The claim is a compare-and-swap on the tag as seen:
    // a CPU placing a key of another home into the same slot loses or wins whole.
    unsafe {
        let tag = &raw mut (*slot).tag;
        let (_, ok) = atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            tag, old, claimed,
        );
        if !ok {
            return NO_SLOT;
        }
        let k = (&raw mut (*slot).key).cast::<u32>();
        let [w0, w1, w2, w3, w4] = gk.w;
        k.write_volatile(w0);
        k.add(1).write_volatile(w1);
        k.add(2).write_volatile(w2);
        k.add(3).write_volatile(w3);
        k.add(4).write_volatile(w4);
        (&raw mut (*slot).state).write(crate::police::NEW_GROUP);
        core::ptr::write_volatile(tag, table::publish(claimed));
    }
    idx
}
