//! The line's storms, end to end, in CI: two points of `cargo xtask bench storm`'s
//! sweep (`shaper_tests::sweep`), each the same storm of real kernel TCP clients of
//! four stacks (Linux 6.x, older Linux, Windows, macOS, each in a namespace of its own)
//! through `drop`, `defer`, and `defer` under a spoofed flood of 25,000 SYN/s into the
//! same /24s, side by side. Every goal of docs/defer.md is checked at both points:
//! connected and accepted per second while clients wait (against `drop`), rank
//! correlation, every stack's share, the budget in every second, and the flood. The
//! whole sweep (three loads, three bursts) is in BENCHMARKS.md, with the points that
//! miss a goal and why.

use shaper_tests::sweep::{self, Point};

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
    let m = sweep::misses(&r);
    assert!(m.is_empty(), "{:.1}×, burst {}: {m:?}", p.overload, p.burst);
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
