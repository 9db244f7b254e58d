//! The line's storms, end to end, in CI: two points of `cargo xtask bench storm`'s
//! sweep (`shaper_tests::sweep`), each the same storm of real kernel TCP clients of
//! four stacks (Linux 6.x, older Linux, Windows, macOS, each in a namespace of its own)
//! through `drop`, `defer`, and `defer` under a spoofed flood of 25,000 SYN/s into the
//! same /24s, side by side. Every goal of docs/defer.md is checked at both points:
//! connected and accepted per second while clients wait (against `drop`), rank
//! correlation, every stack's share, the budget in every second, and the flood. The
//! whole sweep (three loads, three bursts) is in BENCHMARKS.md, with the points that
//! miss a goal and why.

use shaper_tests::{
    storm::StormReport,
    sweep::{self, Point},
};

fn check(p: Point) {
    shaper_tests::progrun::require_bpf();
    let r = sweep::run_point(p, true, 1).expect("storms");
    println!("{}", sweep::table(std::slice::from_ref(&r)));
    for s in [&r.drop, &r.defer]
        .into_iter()
        .chain(r.defer_flood.as_ref())
    {
        println!("{}", shaper_tests::storm::describe(s));
    }
    the_histogram_counts_the_clients_that_waited(&r.defer);
    let m = sweep::misses(&r);
    assert!(m.is_empty(), "{:.1}×, burst {}: {m:?}", p.overload, p.burst);
}

/// The rule's wait histogram (what `/metrics` and `stats` show) against the clients:
/// one count per client admitted after waiting, and their waits (no spoofed SYN is
/// admitted here, so every count is a client).
fn the_histogram_counts_the_clients_that_waited(r: &StormReport) {
    let (count, sum) = r.wait_histogram();
    let (clients, client_sum) = r.waited();
    println!(
        "wait histogram: {count} waits, {sum:.1} s in all; clients that connected after a refused first SYN: {clients}, {client_sum:.1} s; admitted_after_wait {}",
        r.stats["admitted_after_wait"]
    );
    assert!(count > 0);
    assert_eq!(Some(count), r.stats["admitted_after_wait"].as_u64());
    // Every client the line let in after a refused first SYN is one count.
    assert_eq!(count, clients);
    // The program times a wait from the first SYN's arrival to the admitted one's; a
    // client from its connect() to the handshake's end, a round trip later (well under
    // 5 ms on a veth).
    let slack = client_sum - sum;
    assert!(
        (0.0..=0.005 * count as f64).contains(&slack),
        "the histogram's sum {sum:.3} s against the clients' {client_sum:.3} s"
    );
}

#[test]
fn the_line_at_one_and_a_half_times_the_budget() {
    check(Point {
        overload: 1.5,
        burst: 20,
    });
}

#[test]
fn the_line_at_three_times_the_budget() {
    check(Point {
        overload: 3.0,
        burst: 20,
    });
}
