//! `cargo xtask bench prog [--quick]`: ns per packet of the real program under
//! BPF_PROG_TEST_RUN, against a bare XDP_PASS program measured in the same run, at 10
//! and 1,000,000 rules, from a hot source and from 65,536 /24s.
//!
//! `cargo xtask bench flood [--quick]`: a SYN flood's cost on the receiving CPU through
//! shaper, nftables, iptables and a bare XDP drop (`shaper_tests::floodbench`).
//!
//! `cargo xtask bench scale [--quick]`: apply time and SYN cost at 10, 10,000 and
//! 1,000,000 rules; memory per tracked group and per waiting client.
//!
//! `cargo xtask bench contention [--quick]`: one group from two CPUs against one.
//!
//! `cargo xtask bench scrape [--quick]`: `/metrics` of a real daemon at 10, 1,000 and
//! 10,000 rules, and with its waiters' table full: scrape time and size.
//!
//! `cargo xtask bench storm [--quick]`: the line's sweep (`shaper_tests::sweep`), real
//! kernel clients of four stacks through `drop` and `defer`, with and without a spoofed
//! flood; prints the table and each point's misses, and writes the figures as JSON to
//! `target/bench/storm.json`. Then the same storms side by side with nftables and
//! iptables, with the same quota (`--side-by-side`: only those).
//!
//! `cargo xtask bench all [--quick]`: each in turn (CI runs it with `--quick`).

use std::{net::IpAddr, time::Duration};

use anyhow::{Result, bail};
use shaper::{
    capacity::Capacity,
    policy::{Action, Policy, Prefix, Rate, Rule},
};
use shaper_tests::{
    packets::*,
    progrun::{Harness, run_prog},
};

const REPEAT: u32 = 1_000_000;
const ROUNDS: usize = 11;

fn rule(name: &str, prefix: &str, rate: Rate, burst: u64) -> Result<Rule> {
    rule_with(name, prefix, rate, burst, Action::Drop)
}

fn rule_with(name: &str, prefix: &str, rate: Rate, burst: u64, action: Action) -> Result<Rule> {
    let prefix = Prefix::parse(prefix).map_err(anyhow::Error::msg)?;
    Ok(Rule {
        name: name.into(),
        group: prefix
            .max_len()
            .min(if prefix.addr.is_ipv4() { 24 } else { 64 })
            .max(prefix.len),
        prefix,
        rate,
        burst,
        action,
        ceiling: None,
        max_wait: Duration::from_secs(30),
        max_waiting: 1024,
    })
}

/// A policy with the measured rules plus fillers up to `n` rules.
fn policy(n: usize) -> Result<Policy> {
    // Always within budget: one admission per ns, a burst of 10^12.
    let open = Rate {
        count: 1,
        period_ns: 1,
    };
    let mut rules = vec![
        rule("admit", "198.18.1.0/24", open, 1_000_000_000_000)?,
        rule(
            "drop",
            "198.18.2.0/24",
            Rate {
                count: 1,
                period_ns: 1_000_000_000,
            },
            1,
        )?,
        rule("admit6", "2001:db8:1::/48", open, 1_000_000_000_000)?,
        rule_with(
            "defer-open",
            "198.18.3.0/24",
            open,
            1_000_000_000_000,
            Action::Defer,
        )?,
        rule_with(
            "defer-full",
            "198.18.4.0/24",
            Rate {
                count: 1,
                period_ns: 1_000_000_000,
            },
            1,
            Action::Defer,
        )?,
        // 10/s per /24 over a /8: the cold-source cases' SYNs.
        rule(
            "spread",
            "10.0.0.0/8",
            Rate {
                count: 10,
                period_ns: 1_000_000_000,
            },
            10,
        )?,
    ];
    let mut i = 0u32;
    while rules.len() < n {
        // Filler /24s spread over the IPv4 space (map entries only; no traffic).
        let a = (i.wrapping_mul(2_654_435_761) >> 8) << 8;
        let p = IpAddr::from(a.to_be_bytes());
        i += 1;
        if p.to_string().starts_with("198.18.") || p.to_string().starts_with("10.") {
            continue;
        }
        rules.push(rule(
            &format!("f{i}"),
            &format!("{p}/24"),
            Rate {
                count: 5,
                period_ns: 1_000_000_000,
            },
            5,
        )?);
    }
    Ok(Policy {
        rules,
        protected_prefixes: vec![],
        protected_ports: vec![22],
        fleet: None,
        warnings: vec![],
    })
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() -> Result<()> {
    let which = std::env::args().nth(1).unwrap_or_else(|| "prog".into());
    let quick = std::env::args().skip(2).any(|a| a == "--quick");
    match which.as_str() {
        "prog" => prog(quick),
        "storm" => {
            let args: Vec<String> = std::env::args().skip(2).collect();
            // `--only LOAD:BURST[,…]`: just those points (e.g. `--only 3:5,6:20`).
            let only = args
                .iter()
                .position(|a| a == "--only")
                .and_then(|i| args.get(i + 1))
                .map(|v| {
                    v.split(',')
                        .filter_map(|p| {
                            let (l, b) = p.split_once(':')?;
                            Some((l.parse::<f64>().ok()?, b.parse::<u32>().ok()?))
                        })
                        .collect::<Vec<_>>()
                });
            // `--side-by-side`: only the storms through nftables and iptables too.
            if args.iter().any(|a| a == "--side-by-side") {
                return compare(quick);
            }
            storm(quick, only.clone())?;
            if only.is_none() {
                compare(quick)?;
            }
            Ok(())
        }
        "scrape" => scrape(quick),
        "scale" => scale(quick),
        "contention" => contention(quick),
        "flood" => flood(quick),
        // Every benchmark in turn (with `--quick`: CI's smoke run of each).
        "all" => {
            prog(quick)?;
            scale(quick)?;
            contention(quick)?;
            flood(quick)?;
            scrape(quick)?;
            storm(quick, None)?;
            compare(quick)
        }
        _ => bail!(
            "unknown benchmark `{which}` (available: prog, scale, contention, flood, scrape, storm, all)"
        ),
    }
}

/// `/metrics` of a real daemon in a testbed at 10, 1,000 and 10,000 rules: how long a
/// scrape takes (the collector reads every rule's per-CPU counters then) and how big it
/// is; then 10 rules with the waiters' table full
/// (65,536 clients waiting in a `defer` line: each scrape walks them). `--quick`: 10
/// rules, a few scrapes.
fn scrape(quick: bool) -> Result<()> {
    use shaper_tests::{
        netns::Daemon,
        testbed::{SERVER_DEV, Testbed},
    };
    let cases: &[(usize, bool)] = if quick {
        &[(10, false), (10, true)]
    } else {
        &[(10, false), (1_000, false), (10_000, false), (10, true)]
    };
    let rounds = if quick { 3 } else { 21 };
    println!(
        "| rules | clients waiting | scrape, median of {rounds} | fastest | size | size per rule |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for &(n, line) in cases {
        let bed = Testbed::new(&[])?;
        let mut policy: String = (0..n)
            .map(|i| {
                format!(
                    "[[rule]]\nname = \"r{i}\"\nprefix = \"10.{}.{}.0/24\"\nrate = 1\naction = \"{}\"\n",
                    i / 256,
                    i % 256,
                    if i == 0 { "defer" } else { "drop" },
                )
            })
            .collect();
        policy.push_str("[[rule]]\nname = \"v6\"\nprefix = \"::/0\"\nrate = 100\n");
        // Room for 10,000 rules and their prefixes (the defaults hold 4,096).
        let limits = ["--max-rules", "16384", "--max-prefixes", "32768"];
        let daemon = Daemon::start(&bed.srv, SERVER_DEV, &policy, &limits)?;
        let waiting = if line {
            fill_line(&daemon.pin_dir())?
        } else {
            0
        };
        let mut times = Vec::new();
        let mut size = 0;
        for _ in 0..rounds {
            let t = std::time::Instant::now();
            let (_, body) = shaper_tests::http::get(&bed.srv, 9101, "/metrics", "text/plain")?;
            times.push(t.elapsed());
            size = body.len();
        }
        times.sort();
        let rules = n + 1;
        println!(
            "| {rules} | {waiting} | {:.1} ms | {:.1} ms | {:.0} KiB | {} B |",
            times[times.len() / 2].as_secs_f64() * 1e3,
            times[0].as_secs_f64() * 1e3,
            size as f64 / 1024.0,
            size / rules
        );
    }
    Ok(())
}

/// Fill the pinned waiters' table of a daemon with clients of its first rule (a
/// `defer` rule, id 0), all first seen now; returns how many it holds.
fn fill_line(pins: &std::path::Path) -> Result<usize> {
    use shaper_common::{
        knocks::Knocks,
        maps::{MAP_WAITERS, MAX_WAITERS, WaitKey, Waiter, family},
    };
    let data = aya::maps::MapData::from_pin(pins.join(MAP_WAITERS))?;
    let mut waiters: aya::maps::HashMap<_, WaitKey, Waiter> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data))?;
    let now = shaper::clock::monotonic_ns();
    for i in 0..MAX_WAITERS {
        let [_, _, c, d] = i.to_be_bytes();
        let key = WaitKey {
            src: [10, 0, c, d, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            dst: [198, 18, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            sport: 40_000,
            dport: 443,
            family: family::V4,
            _pad: [0; 3],
        };
        let w = Waiter {
            isn: i,
            rule_id: 0,
            knocks: Knocks::proof(now, now),
        };
        waiters.insert(key, w, 0)?;
    }
    Ok(waiters.keys().count())
}

/// The line's sweep. `--quick`: three points, one storm each, no flood: it runs every
/// part (both actions, four stacks, the report) and judges nothing.
fn storm(quick: bool, only: Option<Vec<(f64, u32)>>) -> Result<()> {
    use shaper_tests::sweep::{self, Point};
    let points = if let Some(only) = only {
        only.into_iter()
            .map(|(overload, burst)| Point { overload, burst })
            .collect()
    } else if quick {
        vec![
            Point {
                overload: 1.5,
                burst: 5,
            },
            Point {
                overload: 3.0,
                burst: 2,
            },
            Point {
                overload: 6.0,
                burst: 20,
            },
        ]
    } else {
        sweep::full()
    };
    let mut results = Vec::new();
    for p in points {
        eprintln!("storm: {:.1}× the budget, burst {} …", p.overload, p.burst);
        let r = sweep::run_point(p, !quick, 1)?;
        eprintln!("{}", sweep::table(std::slice::from_ref(&r)));
        results.push(r);
    }
    println!(
        "Sweep: two /24s, rule {}/s per /24, arrivals over {} s, max_wait 90 s; clients of four stacks (Linux 6.x 40%, older Linux 20%, Windows 20%, macOS 20%).\n",
        sweep::RATE,
        sweep::SPREAD_S
    );
    println!("{}", sweep::table(&results));
    let json: Vec<serde_json::Value> = results.iter().map(sweep::json).collect();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("storm.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
    println!("figures: {}", path.display());
    Ok(())
}

/// The storm side by side with nftables and iptables: at 1.5×, 3× and 6× the budget
/// (burst 5), without and with the flood. `--quick`: 3×, no flood.
fn compare(quick: bool) -> Result<()> {
    use shaper_tests::sweep::{self, Point};
    let loads: &[f64] = if quick { &[3.0] } else { &[1.5, 3.0, 6.0] };
    let mut results = Vec::new();
    for &overload in loads {
        let p = Point { overload, burst: 5 };
        eprintln!("side by side: {overload:.1}× the budget, burst 5 …");
        let c = sweep::compare_point(p, !quick, 1)?;
        eprintln!("{}", sweep::compare_table(std::slice::from_ref(&c)));
        results.push(c);
    }
    println!(
        "\nSide by side: the same storms through shaper `defer` and `drop`, nftables (a meter per /24) and iptables (hashlimit per /24), {}/s with burst 5 per /24.\n",
        sweep::RATE
    );
    println!("{}", sweep::compare_table(&results));
    Ok(())
}

/// A SYN flood's cost on the receiving CPU, per filter and source kind, in
/// alternating rounds (`shaper_tests::floodbench`).
fn flood(quick: bool) -> Result<()> {
    use shaper_tests::floodbench::{Bed, Filter, Round, Sources, dropped};
    let (frames, rounds) = if quick {
        (200_000u64, 1)
    } else {
        (4_000_000, 5)
    };
    let mut bed = Bed::new()?;
    let mut all: Vec<Round> = Vec::new();
    for sources in Sources::ALL {
        for _ in 0..rounds {
            for filter in Filter::ALL {
                let r = bed.round(filter, sources, frames)?;
                eprintln!(
                    "{:>18} | {:<32} | {:>7.0} ns/pkt | received {:>8} dropped {:>8} | generator {:.2} Mpps",
                    sources.name(),
                    filter.name(),
                    r.ns_per_packet,
                    r.received,
                    dropped(&r),
                    r.generated_pps / 1e6
                );
                all.push(r);
            }
        }
    }
    println!(
        "{frames} frames per round, {rounds} rounds of each filter in turn; ns of the receiving CPU per frame (median)\n"
    );
    println!(
        "| sources | filter | ns/pkt | × bare drop | over bare (ns) | shaper cheaper by: per packet / over bare | dropped | generator |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for sources in Sources::ALL {
        let of = |f: Filter| -> Vec<&Round> {
            all.iter()
                .filter(|r| r.filter == f && r.sources == sources)
                .collect()
        };
        let ns = |f: Filter| median(of(f).iter().map(|r| r.ns_per_packet).collect());
        let (bare, shaper) = (ns(Filter::BareDrop), ns(Filter::Shaper));
        for f in Filter::ALL {
            let rs = of(f);
            let (rx, dr): (u64, u64) = rs
                .iter()
                .map(|r| (r.received, dropped(r)))
                .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
            let gen_pps = median(rs.iter().map(|r| r.generated_pps).collect());
            let cheaper = if matches!(f, Filter::Kernel(_)) {
                format!(
                    "{:.1}× / {:.1}×",
                    ns(f) / shaper,
                    (ns(f) - bare) / (shaper - bare)
                )
            } else {
                String::new()
            };
            println!(
                "| {} | {} | {:.0} | {:.2}× | {:+.0} | {cheaper} | {:.1}% | {:.2} Mpps |",
                sources.name(),
                f.name(),
                ns(f),
                ns(f) / bare,
                ns(f) - bare,
                100.0 * dr as f64 / rx.max(1) as f64,
                gen_pps / 1e6
            );
        }
    }
    Ok(())
}

/// The data plane at 10, 10,000 and 1,000,000 rules: how long a policy takes to apply
/// (first on fresh maps, then again with every rule changed), what a SYN costs from a
/// hot source and from 65,536 /24s (cold group table), and the maps' memory per
/// tracked group and per waiting client. `--quick`: 10 and 10,000 rules.
fn scale(quick: bool) -> Result<()> {
    use shaper_common::maps::{GroupSlot, MAP_GROUPS, MAP_WAITERS};
    let sizes: &[usize] = if quick {
        &[10, 10_000]
    } else {
        &[10, 10_000, 1_000_000]
    };
    let (repeat, rounds) = if quick { (10_000, 3) } else { (REPEAT, ROUNDS) };
    println!(
        "| rules | first apply | apply with every rule changed | hot SYN, dropped: ns (over bare) | × at 10 rules | SYN from one of 65,536 /24s: ns (over bare) | groups tracked after |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let mut hot_at_10 = None;
    for &n in sizes {
        let p = policy(n)?;
        let cap = capacity_for(n);
        let mut h = Harness::from_policy(policy(0)?, cap)?;
        // `from_policy` applied a small policy; measure on fresh maps of the same size.
        h = {
            drop(h);
            let dp = shaper::dataplane::Loader::new().capacity(cap).load()?;
            let mut h = Harness {
                dp,
                policy: p.clone(),
                ids: Vec::new(),
            };
            let t = std::time::Instant::now();
            h.apply(&p)?;
            let first = t.elapsed();
            let changed = with_every_rate_changed(&p);
            let t = std::time::Instant::now();
            h.apply(&changed)?;
            let again = t.elapsed();
            print!(
                "| {n} | {:.2} s | {:.2} s ",
                first.as_secs_f64(),
                again.as_secs_f64()
            );
            h
        };
        let syn_drop = syn_v4([198, 18, 2, 5], 443);
        let (mut prog_ns, mut bare_ns) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let (_, _, b) = run_prog(h.baseline()?, &syn_drop, repeat)?;
            bare_ns.push(b);
            prog_ns.push(h.run_repeat(&syn_drop, repeat)?.1);
        }
        let hot = median(prog_ns);
        let hot_over = hot - median(bare_ns);
        let base = *hot_at_10.get_or_insert(hot);
        let (cold_over, cold) = cold_syn_cost(&mut h)?;
        let groups =
            h.dp.fill_levels(Some(0))
                .into_iter()
                .find(|(name, _, _)| *name == MAP_GROUPS)
                .map_or(0, |(_, used, _)| used);
        println!(
            "| {hot:.0} ({hot_over:+.0}) | {:.2}× | {cold:.0} ({cold_over:+.0}) | {groups} |",
            hot / base
        );
    }
    // Memory: what the kernel charges each map, over its entries.
    let h = Harness::from_policy(policy(0)?, Capacity::default())?;
    println!();
    println!("| map | entries | memory | per entry |");
    println!("|---|---:|---:|---:|");
    for name in [MAP_GROUPS, MAP_WAITERS] {
        let (entries, bytes) = map_memory(&h, name)?;
        println!(
            "| {name} | {entries} | {:.1} MiB | {} B |",
            bytes as f64 / f64::from(1 << 20),
            bytes / u64::from(entries.max(1))
        );
    }
    println!(
        "\n(a group's slot is {} bytes; the table has no other per-group memory)",
        size_of::<GroupSlot>()
    );
    Ok(())
}

/// Map sizes for a policy of `n` rules that may change whole (each rule's old id and
/// each trie's old generation serve until the switch).
fn capacity_for(n: usize) -> Capacity {
    Capacity {
        rules: (2 * n + 16) as u32,
        prefixes: (2 * (n + 64)) as u32,
        ..Capacity::default()
    }
}

/// `p` with every rule's rate one higher: every rule a new definition.
fn with_every_rate_changed(p: &Policy) -> Policy {
    let mut p = p.clone();
    for r in &mut p.rules {
        r.rate.count += 1;
    }
    p
}

/// What a SYN costs from 65,536 /24s that the group table has never seen (rule
/// `spread`), one run each: mean ns over the bare program on the same packets. Returns
/// (over bare, shaper's own ns).
fn cold_syn_cost(h: &mut Harness) -> Result<(f64, f64)> {
    let (mut prog, mut bare) = (0.0, 0.0);
    let n = 65_536u32;
    for i in 0..n {
        let [_, _, c, d] = i.to_be_bytes();
        let pkt = syn_v4([10, c, d, 7], 443);
        prog += h.run_repeat(&pkt, 1)?.1;
        bare += run_prog(h.baseline()?, &pkt, 1)?.2;
    }
    let n = f64::from(n);
    Ok(((prog - bare) / n, prog / n))
}

/// Entries and memory of map `name` (`memlock` in its fdinfo: what the kernel charges).
fn map_memory(h: &Harness, name: &str) -> Result<(u32, u64)> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let m =
        h.dp.ebpf
            .map(name)
            .ok_or_else(|| anyhow::anyhow!("map {name} missing"))?;
    let data = match m {
        aya::maps::Map::Array(d) | aya::maps::Map::LruHashMap(d) | aya::maps::Map::HashMap(d) => d,
        _ => bail!("map {name}: unexpected type"),
    };
    let info = data.info()?;
    let fd = data.fd().as_fd().as_raw_fd();
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    let memlock = text
        .lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Ok((info.max_entries(), memlock))
}

/// One group hammered from both CPUs at once against from one: ns per SYN, for a SYN
/// the budget admits (every one a compare-and-swap on the group's word) and one it
/// refuses. `--quick`: shorter runs.
fn contention(quick: bool) -> Result<()> {
    use shaper_tests::progrun::pin_to_cpu;
    let (repeat, rounds) = if quick {
        (10_000u32, 3)
    } else {
        (1_000_000, 11)
    };
    let mut h = Harness::from_policy(policy(0)?, Capacity::default())?;
    // Kept in the dispatcher: both threads' runs overlap instead of waiting for grace
    // periods between them.
    let _ns = h.keep_in_dispatcher()?;
    let cases = [
        (
            "SYN admitted (one group, always within budget)",
            syn_v4([198, 18, 1, 5], 443),
        ),
        (
            "SYN dropped (one group, over budget)",
            syn_v4([198, 18, 2, 5], 443),
        ),
    ];
    println!("| case | one CPU ns/SYN | two CPUs ns/SYN | ratio |");
    println!("|---|---:|---:|---:|");
    let h = &h;
    for (name, pkt) in &cases {
        let run = |cpus: usize| -> Result<f64> {
            let per_thread: Vec<Result<Vec<f64>>> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..cpus)
                    .map(|cpu| {
                        s.spawn(move || -> Result<Vec<f64>> {
                            pin_to_cpu(cpu);
                            let prog = h.xdp()?;
                            (0..rounds)
                                .map(|_| Ok(run_prog(prog, pkt, repeat)?.2))
                                .collect()
                        })
                    })
                    .collect();
                hs.into_iter()
                    .map(|j| j.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                    .collect()
            });
            let mut all = Vec::new();
            for t in per_thread {
                all.extend(t?);
            }
            Ok(median(all))
        };
        let one = run(1)?;
        let two = run(2)?;
        println!("| {name} | {one:.1} | {two:.1} | {:.2} |", two / one);
    }
    Ok(())
}

/// `quick`: a few samples of few runs (a smoke run: the figures mean little).
fn prog(quick: bool) -> Result<()> {
    let (repeat, rounds) = if quick { (10_000, 3) } else { (REPEAT, ROUNDS) };
    // The verifier's side: how much work the program is to check, and how long a load
    // takes (a restarted daemon pays it before it adopts).
    let t = std::time::Instant::now();
    let mut dp = shaper::dataplane::Dataplane::load()?;
    let load = t.elapsed();
    println!(
        "verifier: {} instructions processed; load {:.0} ms (program and maps)",
        dp.verified_instructions()
            .map_or("?".to_string(), |n| n.to_string()),
        load.as_secs_f64() * 1e3
    );
    drop(dp);
    println!();
    let est4 = ether(&[], ETH_IPV4, &ipv4_tcp([198, 18, 1, 5], 443, ACK, &[]));
    let est6 = ether(
        &[],
        ETH_IPV6,
        &ipv6_tcp(
            [0x20, 1, 0xd, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5],
            443,
            ACK,
            &[],
        ),
    );
    let syn_ok = syn_v4([198, 18, 1, 5], 443);
    let syn_ok6 = syn_v6(
        [0x20, 1, 0xd, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5],
        443,
    );
    let syn_drop = syn_v4([198, 18, 2, 5], 443);
    let syn_defer_ok = syn_v4([198, 18, 3, 5], 443);
    // Repeated, the same SYN is a waiting client's knock (after its first and second).
    let syn_deferred = syn_v4([198, 18, 4, 5], 443);
    println!(
        "BPF_PROG_TEST_RUN, {repeat} runs per sample, {rounds} samples of each program interleaved; ns per packet (median; last column: fastest against fastest)"
    );
    println!();
    println!(
        "| rules | case | ns/pkt | bare ns/pkt | ratio to bare | over bare (ns) | over bare, fastest samples (ns) |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|");
    // `cargo xtask bench prog SUBSTRING`: only the cases whose name contains it.
    let only = std::env::args().nth(2).filter(|a| !a.starts_with("--"));
    let sizes: &[usize] = if quick {
        &[10, 10_000]
    } else {
        &[10, 1_000_000]
    };
    for &n in sizes {
        let mut h = Harness::from_policy(policy(n)?, capacity_for(n))?;
        let cases: [(&str, &[u8]); 7] = [
            ("established TCP, IPv4", &est4),
            ("established TCP, IPv6", &est6),
            ("SYN admitted, IPv4", &syn_ok),
            ("SYN admitted, IPv6", &syn_ok6),
            ("SYN dropped, IPv4", &syn_drop),
            ("SYN admitted, defer, quiet group, IPv4", &syn_defer_ok),
            ("SYN deferred (waiting client knocks), IPv4", &syn_deferred),
        ];
        for (name, pkt) in cases {
            if !only.as_deref().is_none_or(|o| name.contains(o)) {
                continue;
            }
            let (mut prog_ns, mut bare_ns) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                // Interleave the two so drift in the machine's state hits both alike.
                let (_, _, b) = run_prog(h.baseline()?, pkt, repeat)?;
                bare_ns.push(b);
                let (_, ns) = h.run_repeat(pkt, repeat)?;
                prog_ns.push(ns);
            }
            let (pmin, bmin) = (min(&prog_ns), min(&bare_ns));
            let (p, b) = (median(prog_ns), median(bare_ns));
            println!(
                "| {n} | {name} | {p:.0} | {b:.0} | {:.2}× | {:+.0} | {:+.0} |",
                p / b,
                p - b,
                pmin - bmin
            );
        }
        if only.as_deref().is_none_or(|o| "65,536".contains(o)) {
            // One run per packet: the kernel times each, without the loop's warm cache.
            let (over, own) = cold_syn_cost(&mut h)?;
            println!(
                "| {n} | SYN from one of 65,536 /24s never seen (cold group table), IPv4 | {own:.0} | {:.0} | {:.2}× | {over:+.0} | |",
                own - over,
                own / (own - over)
            );
        }
    }
    Ok(())
}
