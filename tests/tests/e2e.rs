//! End to end: `shaper run` on a server veth in a network namespace, real kernel TCP
//! clients from four IPv4 /24s and two IPv6 /64s storming faster than their quota.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use shaper_tests::{
    netns::Daemon,
    progrun::require_bpf,
    tcp::{Bulk, Server, storm},
    testbed::{SERVER_DEV, SERVER_V4, SERVER_V6, Testbed, addr},
};

const RATE: f64 = 20.0;
const BURST: f64 = 10.0;
const STORM: Duration = Duration::from_secs(5);
/// Attempts per second per group: five times the quota.
const ATTEMPTS: u32 = 100;

const POLICY: &str = r#"
[[rule]]
name = "clients"
prefix = "198.18.0.0/16"
group = 24
rate = 20
burst = 10
action = "drop"

[[rule]]
name = "clients6"
prefix = "2001:db8::/32"
group = 64
rate = 20
burst = 10
action = "drop"

[[rule]]
name = "nobody"
prefix = "198.18.9.0/24"
rate = 0
action = "drop"

[protect]
prefixes = ["198.18.9.9/32"]
"#;

#[test]
fn storm_is_held_to_quota_per_group() {
    require_bpf();
    let v4_groups = ["198.18.1.10", "198.18.2.10", "198.18.3.10", "198.18.4.10"];
    let v6_groups = ["2001:db8:1::10", "2001:db8:2::10"];
    let all: Vec<IpAddr> = v4_groups
        .iter()
        .chain(v6_groups.iter())
        .chain(["198.18.5.10", "198.18.9.9", "198.18.9.10"].iter())
        .map(|a| addr(a))
        .collect();
    let bed = Testbed::new(&all).expect("testbed");
    let (srv, cli) = (&bed.srv, &bed.cli);
    let mut daemon = Daemon::start(srv, SERVER_DEV, POLICY, &[]).expect("shaper run");
    let dst4 = Testbed::dst_for(addr(SERVER_V4));
    let dst6 = Testbed::dst_for(addr(SERVER_V6));
    let mut server = Server::start(srv, &[dst4, dst6]).expect("server");
    // The long-lived connection opens before the storm, from its own /24.
    let bulk = Bulk::start(cli, addr("198.18.5.10"), addr(SERVER_V4)).expect("bulk");

    let t0 = Instant::now();
    let storms: Vec<_> = std::thread::scope(|s| {
        let mut hs = Vec::new();
        for a in v4_groups.iter().chain(v6_groups.iter()) {
            let src = addr(a);
            let dst = if src.is_ipv4() { dst4 } else { dst6 };
            hs.push(s.spawn(move || (src, storm(cli, src, dst, ATTEMPTS, STORM))));
        }
        // The protected host (under a rate-0 rule) and its unprotected neighbour.
        hs.push(s.spawn(move || {
            let a = addr("198.18.9.9");
            (a, storm(cli, a, dst4, 10, STORM))
        }));
        hs.push(s.spawn(move || {
            let a = addr("198.18.9.10");
            (a, storm(cli, a, dst4, 10, STORM))
        }));
        hs.into_iter()
            .map(|h| h.join().expect("storm thread"))
            .collect()
    });
    // Let the last admitted handshakes complete, then stop all retransmissions.
    std::thread::sleep(Duration::from_millis(300));
    let mut spans = BTreeMap::new();
    let mut held = Vec::new();
    for (src, st) in storms {
        let st = st.expect("storm");
        spans.insert(src, st.first);
        held.push(st.sockets);
    }
    drop(held);
    let closed = Instant::now();
    let netstat = cli
        .run_in(|| std::fs::read_to_string("/proc/thread-self/net/netstat").unwrap_or_default())
        .unwrap_or_default();
    let ext = tcp_ext(&netstat);
    let dsack = ext.get("TCPDSACKRecv").copied().unwrap_or(0);
    let probes = ext.get("TCPLossProbes").copied().unwrap_or(0);
    let accepted = server.accepted();
    let bulk_result = bulk.finish().expect("bulk");
    server.stop().expect("server");
    let bulk_seen = server.bulk();
    let status = daemon.stop().expect("daemon stop");
    let elapsed = t0.elapsed();
    assert!(
        status.success(),
        "shaper run exited with {status}: {}",
        daemon.log_text()
    );
    assert!(
        srv.has_xdp(SERVER_DEV),
        "SIGTERM stops the daemon and leaves the program attached"
    );
    let detach = std::process::Command::new(shaper_tests::netns::shaper_bin().expect("shaper"))
        .args(["detach", "s0", "--pin-root"])
        .arg(&daemon.pin_root)
        .output()
        .expect("shaper detach");
    assert!(detach.status.success(), "{detach:?}");
    assert!(
        !srv.has_xdp(SERVER_DEV),
        "`shaper detach` removes the program"
    );

    let mut per_src: BTreeMap<IpAddr, usize> = BTreeMap::new();
    for a in &accepted {
        *per_src.entry(a.peer.ip()).or_default() += 1;
    }
    println!("storm of {elapsed:?}; accepted per source: {per_src:?}");
    for a in v4_groups.iter().chain(v6_groups.iter()) {
        let src = addr(a);
        // Admissions run from the first SYN until the sockets close (their SYN
        // retransmissions keep knocking until then).
        let t = closed.duration_since(spans[&src]).as_secs_f64();
        let want = RATE * t + BURST;
        let got = per_src.get(&src).copied().unwrap_or(0) as f64;
        let err = (got - want) / want;
        println!(
            "group of {src}: accepted {got}, rate·t + burst = {want:.1} (t = {t:.2} s), error {:+.1}%",
            err * 100.0
        );
        assert!(
            err.abs() <= 0.10,
            "group of {src}: accepted {got}, expected {want:.1} ±10%"
        );
    }
    let prot = per_src.get(&addr("198.18.9.9")).copied().unwrap_or(0);
    assert_eq!(prot, 50, "the protected host must get every connection");
    assert_eq!(
        per_src.get(&addr("198.18.9.10")).copied().unwrap_or(0),
        0,
        "rate 0 admits nothing"
    );

    println!(
        "bulk: sent {} B, {} retransmits, max write stall {:?}; server read {} B, max gap {:?}",
        bulk_result.bytes,
        bulk_result.retransmits,
        bulk_result.max_stall,
        bulk_seen.bytes,
        bulk_seen.max_gap
    );
    assert!(
        !bulk_seen.corrupt,
        "the established connection's data arrived corrupted"
    );
    // Tail-loss probes may fire on a busy 2-CPU machine; a retransmission the receiver
    // reports as a duplicate (DSACK) was not lost. The bulk connection is the only one
    // in the client namespace that carries data, so these counters are its own.
    println!("bulk: loss probes {probes}, DSACKs received {dsack}");
    assert!(
        u64::from(bulk_result.retransmits) <= dsack,
        "the established connection lost packets: {} retransmissions, {dsack} of them duplicates",
        bulk_result.retransmits
    );
    assert!(
        bulk_seen.bytes + 64 * 1024 >= bulk_result.bytes,
        "the server fell behind: {bulk_seen:?}"
    );
    assert!(
        bulk_seen.bytes >= 5 * 1024 * 1024,
        "too little data moved: {bulk_seen:?}"
    );
    assert!(
        bulk_seen.max_gap < Duration::from_millis(250),
        "the established connection stalled: {bulk_seen:?}"
    );
    assert!(
        bulk_result.max_stall < Duration::from_millis(250),
        "writes stalled: {bulk_result:?}"
    );
}

/// The TcpExt counters of a /proc/net/netstat text, by name.
fn tcp_ext(netstat: &str) -> BTreeMap<String, u64> {
    let lines: Vec<&str> = netstat
        .lines()
        .filter(|l| l.starts_with("TcpExt:"))
        .collect();
    let (Some(names), Some(values)) = (lines.first(), lines.get(1)) else {
        return BTreeMap::new();
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}
