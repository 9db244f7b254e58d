use std::{collections::HashSet, vec::Vec};

use proptest::prelude::*;

use super::*;

fn v4_words(a: [u8; 4], len: u8) -> [u32; 5] {
    [
        u32::from_ne_bytes([4, len, 0, 0]),
        u32::from_ne_bytes(a),
        0,
        0,
        0,
    ]
}

/// [`Choice`] over a whole window, as the program offers it slot by slot.
fn victim(window: &[Seen; WINDOW as usize], now: u64) -> Option<usize> {
    let mut c = Choice::new(now);
    for (i, s) in window.iter().enumerate() {
        if c.offer(i as u32, *s) {
            break;
        }
    }
    c.victim().map(|(i, _)| i as usize)
}

fn busy(tag: u64, tat_ns: u64) -> Seen {
    Seen {
        tag,
        tat_ns,
        congested_until_ns: 0,
    }
}

#[test]
fn consecutive_blocks_spread_over_the_slots() {
    // 65,536 /24s in a row (the worst case for a weak hash: one byte moves) into a
    // table of 2^17 slots: no home slot should take more than a handful.
    let seed = 0x0123_4567_89ab_cdef;
    let mask = (1u64 << 17) - 1;
    let mut load = std::vec![0u32; 1 << 17];
    for i in 0..65_536u32 {
        let [_, _, b, c] = i.to_be_bytes();
        let h = hash(v4_words([198, b, c, 0], 24), seed);
        load[(h & mask) as usize] += 1;
    }
    let max = load.iter().copied().max().unwrap_or(0);
    assert!(max <= 8, "a home slot took {max} of 65,536 blocks");
    // About e^-0.5 of the slots stay empty at half load.
    let empty = load.iter().filter(|&&n| n == 0).count() as f64 / load.len() as f64;
    assert!((0.58..0.63).contains(&empty), "{empty}");
}

#[test]
fn the_seed_moves_every_key() {
    let a = v4_words([198, 18, 5, 0], 24);
    let homes: HashSet<u64> = (0..64u64)
        .map(|s| hash(a, s.wrapping_mul(0x9e37_79b9_7f4a_7c15)) & 0xffff)
        .collect();
    assert!(homes.len() > 60, "{}", homes.len());
}

#[test]
fn tags_claim_publish_and_hold() {
    let fp = fingerprint(0xdead_beef_0000_0000);
    assert_eq!(fp & 1, 1);
    assert!(!holds(0, fp));
    let c = claim(0, fp);
    assert!(
        !ready(c) && !holds(c, fp),
        "a slot being written is not read"
    );
    let p = publish(c);
    assert!(ready(p) && holds(p, fp));
    // Reclaimed for the same fingerprint: a new version, so a reader notices.
    let p2 = publish(claim(p, fp));
    assert!(holds(p2, fp) && p2 != p);
    assert!(!holds(p, fingerprint(0x1234_0000_0000)));
}

#[test]
fn the_empty_slot_comes_first_then_the_idle_then_the_oldest() {
    let now = 100 * IDLE_NS;
    let w = [busy(9, now), busy(0, 0), busy(11, 0), busy(13, 0)];
    assert_eq!(victim(&w, now), Some(1));
    let w = [busy(9, now), busy(11, now + 5), busy(13, 0), busy(15, now)];
    assert_eq!(victim(&w, now), Some(2), "idle");
    let w = [
        busy(9, now),
        busy(11, now - 5),
        busy(13, now + 9),
        busy(15, now - 1),
    ];
    assert_eq!(victim(&w, now), Some(1), "closest to idle");
    let writing = busy(WRITING | 9, 0);
    assert_eq!(victim(&[writing; 4], now), None, "never one being written");
}

#[test]
fn a_congested_line_keeps_its_slot() {
    let now = 100 * IDLE_NS;
    let w = Seen {
        tag: 9,
        tat_ns: 0,
        congested_until_ns: now,
    };
    assert!(!reclaimable(w.tat_ns, w.congested_until_ns, now));
    assert!(reclaimable(0, now - IDLE_NS, now));
    assert!(!reclaimable(u64::MAX, 0, u64::MAX), "no overflow");
}

#[test]
fn locks_go_stale_after_four_ticks() {
    let held = lock_value(1000);
    assert_ne!(held, 0);
    assert!(!lock_stale(held, 1000));
    assert!(!lock_stale(held, 1004));
    assert!(lock_stale(held, 1006));
    // Across the wrap of jiffies.
    let held = lock_value(u64::MAX - 1);
    assert!(!lock_stale(held, 2));
    assert!(lock_stale(held, 5));
}

proptest! {
    /// Whatever the window, the choice is a slot nobody is writing, and an empty or
    /// idle one whenever there is one.
    #[test]
    fn the_victim_is_never_busy_when_an_idle_slot_exists(
        tags in prop::array::uniform4(prop_oneof![Just(0u64), Just(WRITING | 7), 1u64..1000]),
        tats in prop::array::uniform4(0u64..10 * IDLE_NS),
        cong in prop::array::uniform4(0u64..10 * IDLE_NS),
        now in 0u64..12 * IDLE_NS,
    ) {
        let w: Vec<Seen> = (0..4)
            .map(|i| Seen { tag: tags[i], tat_ns: tats[i], congested_until_ns: cong[i] })
            .collect();
        let w: [Seen; 4] = [w[0], w[1], w[2], w[3]];
        let free = |s: &Seen| s.tag == 0 || (s.tag & WRITING == 0
            && reclaimable(s.tat_ns, s.congested_until_ns, now));
        match victim(&w, now) {
            None => prop_assert!(w.iter().all(|s| s.tag & WRITING != 0)),
            Some(i) => {
                prop_assert!(w[i].tag & WRITING == 0);
                if w.iter().any(free) {
                    prop_assert!(free(&w[i]));
                } else {
                    // The earliest budget state among the slots nobody is writing.
                    let min = w.iter().filter(|s| s.tag & WRITING == 0).map(|s| s.tat_ns).min();
                    prop_assert_eq!(Some(w[i].tat_ns), min);
                }
            }
        }
    }
}
