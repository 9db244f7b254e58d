//! Budget accuracy in the kernel: BPF_PROG_TEST_RUN with `repeat` drives one group's
//! SYNs as fast as the CPU allows; admissions must track rate·t + burst, and two CPUs
//! hammering the same group together must get no more than one would.

use std::time::{Duration, Instant};

use shaper_common::Outcome;
use shaper_tests::{
    packets::syn_v4,
    progrun::{Harness, pin_to_cpu, run_prog},
};

const POLICY: &str = r#"
[[rule]]
name = "g"
prefix = "198.18.1.0/24"
rate = 2000
burst = 100
action = "drop"
"#;
const RATE: f64 = 2000.0;
const BURST: f64 = 100.0;

fn prog(h: &Harness) -> &aya::programs::Xdp {
    h.xdp().expect("program")
}

/// The first BPF_PROG_TEST_RUN of a process sets up the test-run machinery (slow); do it
/// on a source no rule covers, before the clock starts.
fn warm_up(h: &Harness) {
    run_prog(prog(h), &syn_v4([198, 18, 99, 5], 443), 2_000).expect("test run");
}

/// Run the group's SYN until `dur` has passed; returns the runs made and the window
/// in which they ran (admissions can only happen inside it).
fn hammer(h: &Harness, dur: Duration) -> (u64, Instant, Instant) {
    let prog = prog(h);
    let pkt = syn_v4([198, 18, 1, 5], 443);
    let start = Instant::now();
    let mut runs = 0u64;
    while start.elapsed() < dur {
        run_prog(prog, &pkt, 2_000).expect("test run");
        runs += 2_000;
    }
    (runs, start, Instant::now())
}

#[test]
fn admissions_track_rate_times_t_plus_burst() {
    let mut h = Harness::new(POLICY).expect("BPF is required");
    // Without it, the test runs' own grace periods would read as −1% (see the helper).
    let _ns = h.keep_in_dispatcher().expect("a namespace to attach in");
    warm_up(&h);
    let (runs, start, end) = hammer(&h, Duration::from_millis(1500));
    let t = (end - start).as_secs_f64();
    let s = h.rule("g").expect("counters");
    let got = s.get(Outcome::Admitted) as f64;
    let want = RATE * t + BURST;
    let err = (got - want) / want;
    println!(
        "{runs} SYNs in {t:.3} s: admitted {got}, rate·t + burst = {want:.1}, error {:+.2}%",
        err * 100.0
    );
    assert_eq!(s.get(Outcome::Admitted) + s.get(Outcome::Dropped), runs);
    assert!(got <= want, "admitted more than rate·t + burst");
    assert!(err.abs() <= 0.02, "admissions off by more than 2%");
}

#[test]
fn two_cpus_share_one_budget() {
    let mut h = Harness::new(POLICY).expect("BPF is required");
    // Without it, the test runs' own grace periods would read as −1% (see the helper).
    let _ns = h.keep_in_dispatcher().expect("a namespace to attach in");
    let ncpu = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    assert!(ncpu >= 2, "this test needs two CPUs");
    warm_up(&h);
    let h = &h;
    let ran: Vec<(u64, Instant, Instant)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|cpu| {
                s.spawn(move || {
                    pin_to_cpu(cpu);
                    hammer(h, Duration::from_millis(1500))
                })
            })
            .collect();
        hs.into_iter().map(|j| j.join().expect("thread")).collect()
    });
    let runs: Vec<u64> = ran.iter().map(|r| r.0).collect();
    // From the first SYN of either thread to the last of either.
    let first = ran.iter().map(|r| r.1).min().expect("two threads");
    let last = ran.iter().map(|r| r.2).max().expect("two threads");
    let t = (last - first).as_secs_f64();
    let s = h.rule("g").expect("counters");
    let got = s.get(Outcome::Admitted) as f64;
    let want = RATE * t + BURST;
    println!(
        "two CPUs, {runs:?} SYNs in {t:.3} s: admitted {got}, one group's rate·t + burst = {want:.1}, contended {}",
        h.global().expect("global")[shaper_common::Reason::Contended as usize]
    );
    assert!(
        runs.iter().all(|&r| r > 100_000),
        "both CPUs must really hammer"
    );
    assert!(
        got <= want,
        "two CPUs admitted more than one group's budget"
    );
    assert!(
        got >= want * 0.98,
        "the shared budget went unused: {got} of {want:.1}"
    );
}
