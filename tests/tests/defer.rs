//! The waiting line in the kernel, through BPF_PROG_TEST_RUN: who is admitted, who
//! waits, what is remembered and counted. Real time (the program's clock) drives the
//! budget, so the steps sleep past the budget's interval.

use std::{thread::sleep, time::Duration};

use shaper_common::{Outcome, Reason, maps::wait_bucket};
use shaper_tests::{
    packets::syn_v4_isn,
    progrun::{Harness, XDP_DROP, XDP_PASS},
};

const POLICY: &str = r#"
[[rule]]
name = "line"
prefix = "198.18.0.0/16"
rate = 1
burst = 1
action = "defer"
max_waiting = 2
"#;

const NET: [u8; 4] = [198, 18, 7, 0];

fn host(h: u8) -> [u8; 4] {
    let [a, b, c, _] = NET;
    [a, b, c, h]
}

/// One client's SYN (its retransmissions are the same frame).
fn syn(client: u8, isn: u32) -> Vec<u8> {
    syn_v4_isn(host(client), 40_000 + u16::from(client), 8080, isn)
}

fn verdict(h: &mut Harness, frame: &[u8]) -> u32 {
    h.run(frame).expect("BPF_PROG_TEST_RUN").0
}

#[test]
fn waiting_client_is_admitted_in_its_turn_and_unproven_syns_are_not() {
    let mut h = Harness::new(POLICY).expect("BPF is required");
    // The burst: client 1 is admitted at once.
    assert_eq!(verdict(&mut h, &syn(1, 100)), XDP_PASS);
    // Client 2 is over budget: its first SYN is dropped and remembered (probe).
    assert_eq!(verdict(&mut h, &syn(2, 200)), XDP_DROP);
    // Its retransmission proves it: it joins the line, still over budget.
    assert_eq!(verdict(&mut h, &syn(2, 200)), XDP_DROP);
    // Same ports, new ISN: a new attempt, not a retransmission: it must prove itself.
    assert_eq!(verdict(&mut h, &syn(3, 300)), XDP_DROP);
    sleep(Duration::from_millis(1100));
    // The budget has one admission again. An unproven SYN does not get it while the
    // group is congested (a spoofed flood never retransmits) …
    for spoof in 10..60 {
        assert_eq!(verdict(&mut h, &syn(spoof, 7)), XDP_DROP, "spoof {spoof}");
    }
    // … the waiting client does.
    assert_eq!(verdict(&mut h, &syn(2, 200)), XDP_PASS);
    let s = h.rule("line").expect("counters");
    assert_eq!(s.get(Outcome::Admitted), 1);
    assert_eq!(s.get(Outcome::AdmittedAfterWait), 1);
    assert_eq!(s.get(Outcome::Deferred), 3 + 50);
    assert_eq!(s.get(Outcome::Dropped), 0);
    // It waited 1.1 s from its first SYN: the (1, 2] s bucket, and the sum says so.
    let b = wait_bucket(1_100_000_000);
    assert_eq!(s.wait[b], 1);
    assert_eq!(s.wait.iter().sum::<u64>(), 1);
    assert!(
        (1_100_000_000..2_000_000_000).contains(&s.wait_sum_ns),
        "{}",
        s.wait_sum_ns
    );
    let g = h.global().expect("global");
    assert_eq!(g[Reason::AdmittedAfterWait as usize], 1);
    assert_eq!(g[Reason::Deferred as usize], 53);
}

#[test]
fn new_isn_on_the_same_ports_is_a_new_attempt() {
    let mut h = Harness::new(POLICY).expect("BPF is required");
    assert_eq!(verdict(&mut h, &syn(1, 1)), XDP_PASS);
    assert_eq!(verdict(&mut h, &syn(2, 500)), XDP_DROP);
    // Same client ports, another ISN: not a retransmission of the first.
    assert_eq!(verdict(&mut h, &syn(2, 501)), XDP_DROP);
    sleep(Duration::from_millis(1100));
    // 501 was a first SYN of its own; its retransmission proves it.
    assert_eq!(verdict(&mut h, &syn(2, 501)), XDP_PASS);
    let s = h.rule("line").expect("counters");
    assert_eq!(s.get(Outcome::AdmittedAfterWait), 1);
}

#[test]
fn full_line_counts_queue_full_and_admits_nothing_extra() {
    let mut h = Harness::new(POLICY).expect("BPF is required");
    assert_eq!(verdict(&mut h, &syn(1, 1)), XDP_PASS);
    // Four clients probe, then retransmit: two join (max_waiting = 2), two find it full.
    for c in 2..6 {
        assert_eq!(verdict(&mut h, &syn(c, 9)), XDP_DROP);
    }
    for c in 2..6 {
        assert_eq!(verdict(&mut h, &syn(c, 9)), XDP_DROP);
    }
    let s = h.rule("line").expect("counters");
    assert_eq!(s.get(Outcome::QueueFull), 2);
    assert_eq!(s.get(Outcome::Deferred), 6);
    assert_eq!(s.get(Outcome::Admitted), 1);
    assert_eq!(h.global().expect("global")[Reason::QueueFull as usize], 2);
}

#[test]
fn a_knock_after_max_wait_releases_the_place_and_the_group_counts_its_syns() {
    let policy = POLICY.replace("rate = 1\n", "rate = \"1/h\"\nmax_wait = \"1s\"\n");
    let mut h = Harness::new(&policy).expect("BPF is required");
    assert_eq!(verdict(&mut h, &syn(1, 1)), XDP_PASS);
    // Client 2 probes, proves itself and joins the line: no budget for an hour.
    assert_eq!(verdict(&mut h, &syn(2, 9)), XDP_DROP);
    assert_eq!(verdict(&mut h, &syn(2, 9)), XDP_DROP);
    let now = shaper::clock::monotonic_ns();
    let live = h.dp.line(now, |_| Some(1_000_000_000));
    assert_eq!(live.waiting.len(), 1, "one client waits");
    assert_eq!(live.entries, 1);
    assert_eq!(h.rule("line").expect("counters").released, 0);
    sleep(Duration::from_millis(1200));
    // Its knock after `max_wait`: the place is released (and, with no budget, the
    // client starts again).
    assert_eq!(verdict(&mut h, &syn(2, 9)), XDP_DROP);
    let s = h.rule("line").expect("counters");
    assert_eq!(s.released, 1);
    assert_eq!(s.get(Outcome::Deferred), 3);
    // The group's own counters: one admitted, three deferred.
    let groups = h.dp.groups();
    let counts: Vec<_> = groups
        .iter()
        .filter(|(_, g)| g.counts != Default::default())
        .map(|(_, g)| (g.counts.admitted, g.counts.dropped, g.counts.deferred))
        .collect();
    assert_eq!(counts, vec![(1, 0, 3)]);
}

#[test]
fn the_daemon_releases_places_past_max_wait_once() {
    // Room in line for the three clients below.
    let policy = POLICY
        .replace("rate = 1\n", "rate = \"1/h\"\nmax_wait = \"1s\"\n")
        .replace("max_waiting = 2", "max_waiting = 8");
    let mut h = Harness::new(&policy).expect("BPF is required");
    let id = h.rule_id("line");
    assert_eq!(verdict(&mut h, &syn(1, 1)), XDP_PASS);
    for c in [2, 3] {
        assert_eq!(verdict(&mut h, &syn(c, 9)), XDP_DROP);
        assert_eq!(verdict(&mut h, &syn(c, 9)), XDP_DROP);
    }
    let max_wait = |rule| (rule == id).then_some(1_000_000_000);
    assert_eq!(
        h.dp.line(shaper::clock::monotonic_ns(), max_wait)
            .waiting
            .len(),
        2
    );
    sleep(Duration::from_millis(1200));
    // Both gave up (no knock since): their places are released once, by the walk.
    let now = shaper::clock::monotonic_ns();
    let first = h.dp.line(now, max_wait);
    assert!(first.waiting.is_empty());
    assert_eq!(first.entries, 0, "both places deleted");
    assert!(h.dp.line(now, max_wait).waiting.is_empty());
    assert_eq!(h.rule("line").expect("counters").released, 2);
    // A rule id not in force is left alone.
    assert_eq!(verdict(&mut h, &syn(4, 9)), XDP_DROP);
    assert_eq!(verdict(&mut h, &syn(4, 9)), XDP_DROP);
    sleep(Duration::from_millis(1200));
    let other = h.dp.line(shaper::clock::monotonic_ns(), |_| None);
    assert!(other.waiting.is_empty());
    assert_eq!(other.entries, 1, "its place is kept");
    assert_eq!(h.rule("line").expect("counters").released, 2);
}
