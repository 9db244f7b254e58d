//! `cargo xtask demo`: an 8 a.m. storm in a network-namespace testbed, played twice, with
//! `drop` and then with `defer`. The real daemon (`shaper run`) guards the server's veth;
//! pupils of three schools (/24s) connect with real kernel TCP clients (Linux 6.x, older
//! Linux, Windows and macOS retransmission schedules mixed) faster than their quota, while a spoofed
//! flood of first SYNs hits the first school's /24. Nothing touches the machine's own
//! interfaces; the testbed is removed at the end.

use std::time::Duration;

use anyhow::{Result, bail};
use shaper_tests::storm::{self, Live, StormReport, StormSpec, counter};

const RATE: u32 = 10;
const BURST: u32 = 5;
const FLOOD: u32 = 20_000;

fn spec(action: &'static str) -> StormSpec {
    StormSpec {
        action,
        rate: RATE,
        burst: BURST,
        groups: vec![
            ([198, 18, 1], 300),
            ([198, 18, 2], 300),
            ([198, 18, 3], 300),
        ],
        max_wait: Duration::from_secs(90),
        mix: shaper_tests::sweep::mix(),
        spread: Duration::from_secs(20),
        deadline: Duration::from_secs(42),
        flood_per_s: FLOOD,
        flooded: 1,
        seed: 1,
        // The `defer` run is scraped by a real Prometheus for the dashboard's picture.
        dashboard: action == "defer",
    }
}

fn live(l: &Live) {
    let c = &l.counters;
    println!(
        "  t={:>2}s  connected {:>3}/{}  flood SYNs sent {:>7}  │ shaper: admitted {:>4}  after wait {:>4}  deferred {:>7}  dropped {:>7}",
        l.sec,
        l.connected,
        l.clients,
        l.flood_sent,
        counter(c, "admitted"),
        counter(c, "admitted_after_wait"),
        counter(c, "deferred"),
        counter(c, "dropped"),
    );
}

fn main() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo builds network namespaces and loads BPF: run it as root");
    }
    println!(
        "An 8 a.m. storm: 3 schools × 300 pupils connecting within 20 s, quota {RATE}/s per /24 \
         (burst {BURST}),\nplus a spoofed flood of {FLOOD} SYN/s from random addresses of the \
         first school's /24.\nEach run: a fresh testbed of network namespaces, the real daemon \
         on the server's veth, real kernel TCP clients.\n"
    );
    let mut reports: Vec<StormReport> = Vec::new();
    for action in ["drop", "defer"] {
        println!("action = \"{action}\"");
        reports.push(storm::run(&spec(action), live)?);
        println!();
    }
    summary(&reports);
    if let Some(panels) = reports.iter().find_map(|r| r.dashboard.as_ref()) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/demo");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("dashboard.png");
        shaper_tests::dashboard::draw(
            panels,
            &format!(
                "shaper, action = \"defer\": 3 schools × 300 pupils within 20 s, {RATE}/s (burst {BURST}) \
                 per /24, {FLOOD} spoofed SYN/s into the first school's /24 (cargo xtask demo).\n\
                 The dashboard's queries over the storm, asked of a real Prometheus that scraped \
                 the daemon every second."
            ),
            &path,
        )?;
        println!(
            "\nthe dashboard's main panels over the defer storm: {}",
            path.display()
        );
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/demo");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("storm.png");
    shaper_tests::dashboard::draw(
        &shaper_tests::dashboard::compare(&reports),
        &format!(
            "The same storm under drop and under defer: 3 schools × 300 pupils within 20 s, \
             {RATE}/s (burst {BURST}) per /24, {FLOOD} spoofed SYN/s into the first school's \
             /24 (cargo xtask demo).\nFrom the real clients' own records: when each sent its \
             first SYN, connected, or gave up."
        ),
        &path,
    )?;
    println!("drop and defer side by side: {}", path.display());
    println!("\nthe testbed is removed.");
    Ok(())
}

fn summary(reports: &[StormReport]) {
    println!(
        "summary (wait = first SYN → connected; rank corr. = Spearman of arrival order vs connect order):\n"
    );
    print!("{}", storm::table(reports));
    println!();
    for r in reports {
        let c = storm::parse_counters(&r.counters);
        let connected: usize = r.groups.iter().map(|g| g.connected).sum();
        let admitted = counter(&c, "admitted") + counter(&c, "admitted_after_wait");
        let spoofs_in = admitted.saturating_sub(connected as u64);
        println!(
            "{:>5}: flood SYNs sent {}, dropped {} ({} let through, each taking a pupil's place)",
            r.spec.action,
            r.flood_sent,
            r.flood_sent.saturating_sub(spoofs_in),
            spoofs_in
        );
    }
    println!("\naccepted per second from the flooded school (budget {RATE}/s, burst {BURST}):");
    for r in reports {
        if let Some(g) = r.groups.first() {
            let per_s: Vec<String> = g.accepted_per_s.iter().map(|n| n.to_string()).collect();
            println!("{:>5}: {}", r.spec.action, per_s.join(" "));
        }
    }
}
