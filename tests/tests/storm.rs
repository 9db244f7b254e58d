//! The defer storm, end to end: 1,000 real kernel TCP clients from one /24 arrive over
//! 30 s against a rule of 25/s burst 5, half of them with the default SYN retransmission
//! schedule and half with older Linux's (`tcp_syn_linear_timeouts = 0`). Run with
//! `drop` and with `defer`, then again under a spoofed flood of 20,000 SYN/s from the
//! same /24; the side-by-side table is printed (see `--nocapture`).

use std::time::Duration;

use shaper_tests::{
    stacks::Stack,
    storm::{self, StormReport, StormSpec},
};

const RATE: u32 = 25;
const BURST: u32 = 5;

fn spec(action: &'static str, flood_per_s: u32) -> StormSpec {
    StormSpec {
        action,
        rate: RATE,
        burst: BURST,
        groups: vec![([198, 18, 5], 1000)],
        max_wait: Duration::from_secs(60),
        mix: vec![(Stack::Linux, 1), (Stack::OldLinux, 1)],
        spread: Duration::from_secs(30),
        deadline: Duration::from_secs(60),
        flood_per_s,
        flooded: 1,
        seed: 8,
    }
}

fn run(action: &'static str, flood: u32) -> StormReport {
    shaper_tests::progrun::require_bpf();
    let r = storm::run(&spec(action, flood), |_| {}).expect("storm");
    println!("{}", storm::table(std::slice::from_ref(&r)));
    println!("daemon: {}\nflood SYNs sent: {}", r.counters, r.flood_sent);
    r
}

#[test]
fn defer_orders_the_storm_and_survives_a_spoofed_flood() {
    let drop = run("drop", 0);
    let defer = run("defer", 0);
    let defer_flood = run("defer", 20_000);
    let drop_flood = run("drop", 20_000);
    println!(
        "\n{}",
        storm::table(&[
            drop.clone(),
            defer.clone(),
            drop_flood.clone(),
            defer_flood.clone()
        ])
    );
    let g = |r: &StormReport| r.groups[0].clone();
    let (dr, de, def, drf) = (g(&drop), g(&defer), g(&defer_flood), g(&drop_flood));

    // The budget holds in every run: never more than rate + burst in any 1-s window.
    for (name, x) in [
        ("drop", &dr),
        ("defer", &de),
        ("defer+flood", &def),
        ("drop+flood", &drf),
    ] {
        assert!(
            x.max_1s <= (RATE + BURST) as usize,
            "{name}: {} accepted in one second",
            x.max_1s
        );
    }
    // Work conservation: defer connects at least 98% of what drop connects.
    assert!(
        de.connected * 100 >= dr.connected * 98,
        "defer connected {} vs drop {}",
        de.connected,
        dr.connected
    );
    // Order: clients get in by arrival.
    assert!(de.rho >= 0.8, "defer rank correlation {:.3}", de.rho);
    assert!(
        de.rho >= dr.rho + 0.1,
        "defer {:.3} vs drop {:.3}",
        de.rho,
        dr.rho
    );
    // A spoofed flood in the same /24 cannot take the line's places.
    assert!(
        defer_flood.flood_sent >= 20_000 * 30,
        "the flood must really run"
    );
    assert!(
        def.connected * 100 >= de.connected * 95,
        "defer under flood connected {} vs {} without",
        def.connected,
        de.connected
    );
}
