//! `cargo xtask demo`: an 8 a.m. storm in a network-namespace testbed. The real daemon
//! (`shaper run`) guards the server's veth; pupils from four schools (/24s) and one IPv6
//! network connect five times faster than their quota while a teacher's long-lived
//! session keeps transferring. Nothing touches the machine's own interfaces.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use shaper_tests::{
    netns::Daemon,
    tcp::{Bulk, Server, storm},
    testbed::{SERVER_DEV, SERVER_V4, SERVER_V6, Testbed, addr},
};

const RATE: u32 = 25;
const BURST: u32 = 5;
const STORM: Duration = Duration::from_secs(10);
const ATTEMPTS_PER_S: u32 = 125;

const POLICY: &str = r#"
[[rule]]
name = "pupils"
prefix = "198.18.0.0/16"
group = 24
rate = 25
burst = 5
action = "drop"

[[rule]]
name = "pupils6"
prefix = "2001:db8::/32"
group = 64
rate = 25
burst = 5
action = "drop"

[protect]
prefixes = ["198.18.250.1/32"]
"#;

fn main() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo builds network namespaces and loads BPF: run it as root");
    }
    let schools = [
        "198.18.1.10",
        "198.18.2.10",
        "198.18.3.10",
        "198.18.4.10",
        "2001:db8:5::10",
    ];
    let teacher = "198.18.250.1";
    let mut all: Vec<IpAddr> = schools.iter().map(|a| addr(a)).collect();
    all.push(addr(teacher));
    println!("building the testbed (two network namespaces, one veth pair)…");
    let bed = Testbed::new(&all)?;
    let mut daemon = Daemon::start(&bed.srv, SERVER_DEV, POLICY, &["--stats-interval", "5"])?;
    println!(
        "shaper run attached to {SERVER_DEV}; policy: {RATE}/s per /24 (burst {BURST}), teacher protected\n"
    );
    let dsts = [
        Testbed::dst_for(addr(SERVER_V4)),
        Testbed::dst_for(addr(SERVER_V6)),
    ];
    let server = Server::start(&bed.srv, &dsts)?;
    let bulk = Bulk::start(&bed.cli, addr(teacher), addr(SERVER_V4))?;

    let t0 = Instant::now();
    let storms = std::thread::scope(|s| -> Result<Vec<_>> {
        let hs: Vec<_> = schools
            .iter()
            .map(|a| {
                let (cli, src) = (&bed.cli, addr(a));
                s.spawn(move || storm(cli, src, Testbed::dst_for(src), ATTEMPTS_PER_S, STORM))
            })
            .collect();
        // Live view: connections the server accepted in the last second, per school.
        let mut shown = 0;
        while hs.iter().any(|h| !h.is_finished()) {
            std::thread::sleep(Duration::from_millis(200));
            let sec = t0.elapsed().as_secs();
            if sec > shown {
                shown = sec;
                let acc = server.accepted();
                let line: Vec<String> = schools
                    .iter()
                    .map(|a| {
                        let n = acc
                            .iter()
                            .filter(|x| {
                                x.peer.ip() == addr(a)
                                    && x.at.duration_since(t0).as_secs() + 1 == sec
                            })
                            .count();
                        format!("{a}: {n:>3}/s")
                    })
                    .collect();
                println!("t={sec:>2}s  accepted  {}", line.join("  "));
            }
        }
        hs.into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("storm thread panicked"))?
            })
            .collect()
    })?;
    std::thread::sleep(Duration::from_millis(300));
    let attempts: usize = storms.iter().map(|s| s.sockets.len()).sum();
    drop(storms);
    let t = t0.elapsed().as_secs_f64();
    let bulk = bulk.finish()?;
    let accepted = server.accepted();
    daemon.stop()?;

    println!(
        "\nsummary ({t:.1} s storm, {attempts} client sockets, {ATTEMPTS_PER_S} new connections/s per school):\n"
    );
    println!(
        "| school | connected | budget rate·t + burst | most in any 1 s (limit {}) |",
        RATE + BURST
    );
    println!("|---|---:|---:|---:|");
    for a in schools {
        let times: Vec<f64> = accepted
            .iter()
            .filter(|x| x.peer.ip() == addr(a))
            .map(|x| x.at.duration_since(t0).as_secs_f64())
            .collect();
        let mut per_window = BTreeMap::new();
        for (i, &s) in times.iter().enumerate() {
            per_window.insert(i, times.iter().filter(|&&u| u >= s && u < s + 1.0).count());
        }
        let most = per_window.values().max().copied().unwrap_or(0);
        println!(
            "| {a} | {} | {:.0} | {most} |",
            times.len(),
            f64::from(RATE) * t + f64::from(BURST)
        );
    }
    println!(
        "\nteacher's session during the storm: {} KiB sent, {} retransmissions, longest write {:?}",
        bulk.bytes / 1024,
        bulk.retransmits,
        bulk.max_stall
    );
    println!("\nthe daemon's own counters (its log):");
    for line in daemon
        .log_text()
        .lines()
        .filter(|l| l.contains("rule=") || l.contains("global"))
        .take(4)
    {
        println!("  {line}");
    }
    println!("\nremoving the testbed.");
    Ok(())
}
