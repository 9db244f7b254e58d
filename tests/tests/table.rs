//! The group table, in the real program (BPF_PROG_TEST_RUN), made so small (one window
//! of four slots) that every group competes for the same slots: groups keep budgets of
//! their own, a busy group keeps its slot while an idle one can be reclaimed, and a
//! full window still gives a new group a budget.

use std::{
    collections::HashSet,
    sync::atomic::{AtomicU32, Ordering},
    thread::sleep,
    time::Duration,
};

use shaper::capacity::Capacity;
use shaper_common::{
    Outcome,
    maps::{GroupKey, family},
    table::{IDLE_NS, WINDOW},
};
use shaper_tests::{
    packets::syn_v4,
    progrun::{Harness, XDP_DROP, XDP_PASS, pin_to_cpu, run_prog},
};

/// Slow /24s (one attempt a minute) and fast ones (idle a millisecond after an attempt).
const POLICY: &str = r#"
[[rule]]
name = "slow"
prefix = "198.18.0.0/16"
rate = "1/min"
burst = 1
action = "drop"

[[rule]]
name = "fast"
prefix = "198.19.0.0/16"
rate = "1000/s"
burst = 1
action = "drop"
"#;

fn verdict(h: &mut Harness, src: [u8; 4]) -> u32 {
    h.run(&syn_v4(src, 443)).expect("test run").0
}

/// Host `host` of each /24 198.`b`.`c`.0 in `nets`, in order, gets `want`.
fn each(h: &mut Harness, nets: &[(u8, u8)], host: u8, want: u32) {
    for &(b, c) in nets {
        let src = [198, b, c, host];
        assert_eq!(verdict(h, src), want, "{src:?}");
    }
}

fn blocks(h: &Harness) -> Vec<[u8; 3]> {
    let mut v: Vec<[u8; 3]> =
        h.dp.groups()
            .into_iter()
            .map(|(k, _)| {
                assert_eq!((k.family, k.len), (family::V4, 24), "{k:?}");
                [k.addr[0], k.addr[1], k.addr[2]]
            })
            .collect();
    v.sort();
    v
}

fn one_window() -> Harness {
    let h = Harness::with_capacity(
        POLICY,
        Capacity {
            groups: WINDOW,
            ..Capacity::default()
        },
    )
    .expect("load");
    assert_eq!(h.dp.capacity.groups, WINDOW);
    h
}

#[test]
fn groups_in_one_window_keep_budgets_of_their_own() {
    let mut h = one_window();
    let slow = [(18, 0), (18, 1), (18, 2), (18, 3)];
    each(&mut h, &slow, 1, XDP_PASS);
    each(&mut h, &slow, 1, XDP_DROP);
    assert_eq!(
        blocks(&h),
        vec![[198, 18, 0], [198, 18, 1], [198, 18, 2], [198, 18, 3]]
    );
    let dropped = h.rule("slow").expect("counters").counts[Outcome::Dropped as usize];
    assert_eq!(dropped, 4);
}

#[test]
fn a_busy_group_keeps_its_slot_and_an_idle_one_gives_it_up() {
    let mut h = one_window();
    // Two busy groups (their budget spent for a minute), two that go idle.
    each(&mut h, &[(18, 1), (18, 2), (19, 1), (19, 2)], 1, XDP_PASS);
    sleep(Duration::from_nanos(IDLE_NS) + Duration::from_millis(200));
    // Two new busy groups: they take the idle groups' slots.
    each(&mut h, &[(18, 3), (18, 4)], 1, XDP_PASS);
    assert_eq!(
        blocks(&h),
        vec![[198, 18, 1], [198, 18, 2], [198, 18, 3], [198, 18, 4]]
    );
    // The older busy groups kept their state: still nothing for them.
    each(&mut h, &[(18, 1), (18, 2), (18, 3), (18, 4)], 2, XDP_DROP);
}

#[test]
fn a_full_window_evicts_the_group_closest_to_idle() {
    let mut h = one_window();
    // Four busy groups, the fast one closest to idle (its state a millisecond ahead).
    each(&mut h, &[(18, 1), (19, 9), (18, 2), (18, 3)], 1, XDP_PASS);
    // A fifth still gets its budget.
    assert_eq!(verdict(&mut h, [198, 18, 5, 1]), XDP_PASS);
    assert_eq!(
        blocks(&h),
        vec![[198, 18, 1], [198, 18, 2], [198, 18, 3], [198, 18, 5]],
        "the fast group went"
    );
    each(&mut h, &[(18, 1), (18, 2), (18, 3), (18, 5)], 2, XDP_DROP);
}

#[test]
fn the_daemon_reads_each_group_s_whole_key() {
    let mut h = one_window();
    assert_eq!(verdict(&mut h, [198, 18, 7, 1]), XDP_PASS);
    let g = h.dp.groups();
    assert_eq!(g.len(), 1);
    assert_eq!(
        g[0].0,
        GroupKey {
            family: family::V4,
            len: 24,
            _pad: [0; 2],
            addr: [198, 18, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        }
    );
}

/// Burst 3 per host, then nothing for a minute: a group placed twice would admit more.
const THREE: &str = r#"
[[rule]]
name = "three"
prefix = "198.18.0.0/16"
group = 32
rate = "1/min"
burst = 3
action = "drop"
"#;

/// Wait until both threads have arrived at `round` (a spinning barrier: both leave
/// within a fraction of a microsecond, where a sleeping one wakes them microseconds
/// apart).
fn both_at(arrived: &AtomicU32, round: u32) {
    arrived.fetch_add(1, Ordering::SeqCst);
    let mut spins = 0u64;
    while arrived.load(Ordering::SeqCst) < 2 * (round + 1) {
        std::hint::spin_loop();
        spins += 1;
        assert!(spins < 10_000_000_000, "the other thread never arrived");
    }
}

#[test]
fn two_cpus_placing_the_same_new_groups_make_one_each() {
    const GROUPS: u32 = 3000;
    // Room enough that no window fills (3,000 groups in 65,536 slots).
    let mut h = Harness::with_capacity(
        THREE,
        Capacity {
            groups: 65_536,
            ..Capacity::default()
        },
    )
    .expect("load");
    let _ns = h.keep_in_dispatcher().expect("a namespace to attach in");
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(ncpu >= 2, "this test needs two CPUs");
    let prog = h.xdp().expect("program");
    let arrived = AtomicU32::new(0);
    std::thread::scope(|s| {
        for cpu in 0..2 {
            let (arrived, prog) = (&arrived, prog);
            s.spawn(move || {
                pin_to_cpu(cpu);
                for i in 0..GROUPS {
                    // Both CPUs send the first SYNs of the same new host at once.
                    both_at(arrived, i);
                    let [_, _, a, b] = i.to_be_bytes();
                    run_prog(prog, &syn_v4([198, 18, a, b], 443), 4).expect("test run");
                }
            });
        }
    });
    let groups = h.dp.groups();
    let hosts: HashSet<[u8; 16]> = groups.iter().map(|(k, _)| k.addr).collect();
    assert_eq!(groups.len(), GROUPS as usize, "one slot per group");
    assert_eq!(hosts.len(), GROUPS as usize);
    let s = h.rule("three").expect("counters");
    assert_eq!(
        s.get(Outcome::Admitted),
        3 * u64::from(GROUPS),
        "each group's burst, once"
    );
    assert_eq!(
        s.get(Outcome::Admitted) + s.get(Outcome::Dropped),
        2 * 4 * u64::from(GROUPS)
    );
}
