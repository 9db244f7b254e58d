//! Table-driven packet fixtures through the real program (BPF_PROG_TEST_RUN): each has
//! a name, a frame, the expected verdict, and the exact counter deltas it must cause.
//! Passed frames must come back byte-identical.

use std::sync::{Mutex, OnceLock};

use libtest_mimic::{Arguments, Failed, Trial};
use shaper_common::{Outcome, Reason};
use shaper_tests::{
    packets::*,
    progrun::{Harness, XDP_DROP, XDP_PASS},
};

const POLICY: &str = r#"
[[rule]]
name = "block"
prefix = "198.18.66.0/24"
rate = 0
action = "drop"

[[rule]]
name = "watch"
prefix = "198.18.77.0/24"
rate = 0
action = "monitor"

[[rule]]
name = "open"
prefix = "198.18.88.0/24"
rate = 0
action = "allow"

[[rule]]
name = "block6"
prefix = "2001:db8:66::/48"
rate = 0
action = "drop"

[protect]
prefixes = ["198.18.66.9/32", "2001:db8:66::9/128"]
ports = [22]
"#;
const RULES: [&str; 4] = ["block", "watch", "open", "block6"];

const BLOCKED: [u8; 4] = [198, 18, 66, 7];
const PROTECTED: [u8; 4] = [198, 18, 66, 9];
const WATCHED: [u8; 4] = [198, 18, 77, 1];
const OPEN: [u8; 4] = [198, 18, 88, 1];
const NO_RULE: [u8; 4] = [198, 18, 99, 1];
const BLOCKED6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0x66, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7,
];
const PROTECTED6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0x66, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9,
];

#[derive(Clone)]
struct Fixture {
    name: String,
    frame: Vec<u8>,
    verdict: u32,
    reason: Reason,
    rule: Option<(&'static str, Outcome)>,
}

fn pass(name: impl Into<String>, frame: Vec<u8>, reason: Reason) -> Fixture {
    Fixture {
        name: name.into(),
        frame,
        verdict: XDP_PASS,
        reason,
        rule: None,
    }
}

fn dropped(name: impl Into<String>, frame: Vec<u8>, rule: &'static str) -> Fixture {
    Fixture {
        name: name.into(),
        frame,
        verdict: XDP_DROP,
        reason: Reason::Dropped,
        rule: Some((rule, Outcome::Dropped)),
    }
}

fn flag_name(flags: u8) -> String {
    let names = ["fin", "syn", "rst", "psh", "ack", "urg", "ece", "cwr"];
    let parts: Vec<&str> = (0..8)
        .filter(|b| flags & (1 << b) != 0)
        .map(|b| names[b])
        .collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join("+")
    }
}

fn is_attempt(flags: u8) -> bool {
    flags & SYN != 0 && flags & ACK == 0
}

fn fixtures() -> Vec<Fixture> {
    let mut f = Vec::new();

    // Every TCP flag combination, IPv4 and IPv6, from a rule with no budget.
    for flags in 0..=255u8 {
        let v4 = ether(&[], ETH_IPV4, &ipv4_tcp(BLOCKED, 443, flags, &[]));
        let v6 = ether(&[], ETH_IPV6, &ipv6_tcp(BLOCKED6, 443, flags, &[]));
        let n = flag_name(flags);
        if is_attempt(flags) {
            f.push(dropped(format!("flags/v4/{n}"), v4, "block"));
            f.push(dropped(format!("flags/v6/{n}"), v6, "block6"));
        } else {
            f.push(pass(format!("flags/v4/{n}"), v4, Reason::NotAttempt));
            f.push(pass(format!("flags/v6/{n}"), v6, Reason::NotAttempt));
        }
    }

    // VLAN and QinQ.
    let tag_sets: [(&str, &[u16]); 4] = [
        ("8021q", &[TPID_8021Q]),
        ("8021ad", &[TPID_8021AD]),
        ("qinq", &[TPID_8021AD, TPID_8021Q]),
        ("double-8021q", &[TPID_8021Q, TPID_8021Q]),
    ];
    for (tn, tags) in tag_sets {
        f.push(dropped(
            format!("vlan/{tn}/v4-syn"),
            ether(tags, ETH_IPV4, &ipv4_tcp(BLOCKED, 443, SYN, &[])),
            "block",
        ));
        f.push(dropped(
            format!("vlan/{tn}/v6-syn"),
            ether(tags, ETH_IPV6, &ipv6_tcp(BLOCKED6, 443, SYN, &[])),
            "block6",
        ));
        f.push(pass(
            format!("vlan/{tn}/v4-ack"),
            ether(tags, ETH_IPV4, &ipv4_tcp(BLOCKED, 443, ACK, &[])),
            Reason::NotAttempt,
        ));
        f.push(pass(
            format!("vlan/{tn}/arp"),
            ether(tags, ETH_ARP, &arp()[14..]),
            Reason::NotIp,
        ));
    }
    f.push(pass(
        "vlan/three-tags-not-walked",
        ether(
            &[TPID_8021AD, TPID_8021Q, TPID_8021Q],
            ETH_IPV4,
            &ipv4_tcp(BLOCKED, 443, SYN, &[]),
        ),
        Reason::NotIp,
    ));

    // IPv4 options of every size, IHL checked.
    for words in 1..=10usize {
        let mut opts = vec![1u8; words * 4]; // NOP
        opts[words * 4 - 1] = 0; // end of options
        f.push(dropped(
            format!("ipv4-options/{}B/syn", words * 4),
            ether(&[], ETH_IPV4, &ipv4_tcp(BLOCKED, 443, SYN, &opts)),
            "block",
        ));
        f.push(pass(
            format!("ipv4-options/{}B/ack", words * 4),
            ether(&[], ETH_IPV4, &ipv4_tcp(BLOCKED, 443, ACK, &opts)),
            Reason::NotAttempt,
        ));
    }
    for ihl in 0..5u8 {
        let mut ip = ipv4_tcp(BLOCKED, 443, SYN, &[]);
        ip[0] = 0x40 | ihl;
        f.push(pass(
            format!("ipv4/ihl-{ihl}"),
            ether(&[], ETH_IPV4, &ip),
            Reason::Malformed,
        ));
    }
    let mut ip = ipv4_tcp(BLOCKED, 443, SYN, &[]);
    ip[0] = 0x65;
    f.push(pass(
        "ipv4/version-6-in-ipv4-frame",
        ether(&[], ETH_IPV4, &ip),
        Reason::Malformed,
    ));
    let mut ip6 = ipv6_tcp(BLOCKED6, 443, SYN, &[]);
    ip6[0] = 0x45;
    f.push(pass(
        "ipv6/version-4-in-ipv6-frame",
        ether(&[], ETH_IPV6, &ip6),
        Reason::Malformed,
    ));

    // IPv4 fragments: the first carries the TCP header, the others do not.
    let mut t = tcp_header(40_000, 443, SYN).to_bytes().to_vec();
    t.extend_from_slice(&[0u8; 8]);
    let first = ipv4_header(BLOCKED, 6, t.len(), &[], 0, true);
    let mut frame = first.to_bytes().to_vec();
    frame.extend_from_slice(&t);
    f.push(dropped(
        "ipv4-fragment/first-syn",
        ether(&[], ETH_IPV4, &frame),
        "block",
    ));
    for off in [1u16, 3, 185, 8191] {
        for more in [false, true] {
            let h = ipv4_header(BLOCKED, 6, t.len(), &[], off, more);
            let mut frame = h.to_bytes().to_vec();
            frame.extend_from_slice(&t); // looks like a SYN, but is not a TCP header
            f.push(pass(
                format!("ipv4-fragment/offset-{off}-mf-{more}"),
                ether(&[], ETH_IPV4, &frame),
                Reason::Fragment,
            ));
        }
    }

    // IPv6 extension headers.
    let exts: [(&str, &[Ext]); 12] = [
        ("hop-by-hop", &[Ext::HopByHop]),
        ("routing", &[Ext::Routing]),
        ("dstopts", &[Ext::DestOpts]),
        ("fragment-atomic", &[Ext::Fragment(0, false)]),
        ("fragment-first", &[Ext::Fragment(0, true)]),
        ("auth", &[Ext::Auth]),
        ("hbh-dstopts", &[Ext::HopByHop, Ext::DestOpts]),
        (
            "hbh-routing-fragment",
            &[Ext::HopByHop, Ext::Routing, Ext::Fragment(0, true)],
        ),
        (
            "hbh-dst-routing-frag-auth-dst",
            &[
                Ext::HopByHop,
                Ext::DestOpts,
                Ext::Routing,
                Ext::Fragment(0, false),
                Ext::Auth,
                Ext::DestOpts,
            ],
        ),
        ("auth-dstopts", &[Ext::Auth, Ext::DestOpts]),
        ("routing-routing", &[Ext::Routing, Ext::Routing]),
        ("dstopts-fragment", &[Ext::DestOpts, Ext::Fragment(0, true)]),
    ];
    for (en, chain) in exts {
        f.push(dropped(
            format!("ipv6-ext/{en}/syn"),
            ether(&[], ETH_IPV6, &ipv6_tcp(BLOCKED6, 443, SYN, chain)),
            "block6",
        ));
        f.push(pass(
            format!("ipv6-ext/{en}/ack"),
            ether(&[], ETH_IPV6, &ipv6_tcp(BLOCKED6, 443, ACK, chain)),
            Reason::NotAttempt,
        ));
        f.push(pass(
            format!("ipv6-ext/{en}/udp"),
            ether(&[], ETH_IPV6, &ipv6(BLOCKED6, chain, 17, &[0u8; 8])),
            Reason::NotTcp,
        ));
    }
    let seven = [
        Ext::HopByHop,
        Ext::DestOpts,
        Ext::Routing,
        Ext::Routing,
        Ext::Routing,
        Ext::Routing,
        Ext::DestOpts,
    ];
    f.push(pass(
        "ipv6-ext/seven-headers-limit",
        ether(&[], ETH_IPV6, &ipv6_tcp(BLOCKED6, 443, SYN, &seven)),
        Reason::ExtHdrLimit,
    ));
    for off in [1u16, 100, 8191] {
        for more in [false, true] {
            f.push(pass(
                format!("ipv6-fragment/offset-{off}-mf-{more}"),
                ether(
                    &[],
                    ETH_IPV6,
                    &ipv6_tcp(BLOCKED6, 443, SYN, &[Ext::Fragment(off, more)]),
                ),
                Reason::Fragment,
            ));
        }
    }
    f.push(pass(
        "ipv6/no-next-header",
        ether(&[], ETH_IPV6, &ipv6(BLOCKED6, &[], 59, &[])),
        Reason::NotTcp,
    ));
    f.push(pass(
        "ipv6/esp",
        ether(&[], ETH_IPV6, &ipv6(BLOCKED6, &[], 50, &[0u8; 16])),
        Reason::NotTcp,
    ));
    f.push(pass(
        "ipv6/icmpv6",
        ether(
            &[],
            ETH_IPV6,
            &ipv6(BLOCKED6, &[], 58, &[128, 0, 0, 0, 0, 0, 0, 0]),
        ),
        Reason::NotTcp,
    ));

    // Not TCP, not IP.
    f.push(pass(
        "ipv4/udp",
        ether(&[], ETH_IPV4, &ipv4_udp(BLOCKED)),
        Reason::NotTcp,
    ));
    f.push(pass(
        "ipv4/icmp",
        ether(&[], ETH_IPV4, &ipv4_icmp(BLOCKED)),
        Reason::NotTcp,
    ));
    f.push(pass("non-ip/arp", arp(), Reason::NotIp));
    f.push(pass(
        "non-ip/lldp",
        ether(&[], 0x88cc, &[0u8; 46]),
        Reason::NotIp,
    ));
    f.push(pass(
        "non-ip/ipx-length-field",
        ether(&[], 0x05dc, &[0u8; 46]),
        Reason::NotIp,
    ));
    let mut bad_doff = ipv4_tcp(BLOCKED, 443, SYN, &[]);
    bad_doff[20 + 12] = 0x40;
    f.push(pass(
        "tcp/data-offset-4",
        ether(&[], ETH_IPV4, &bad_doff),
        Reason::Malformed,
    ));

    // Truncated at every length, from a bare Ethernet header up.
    let frames: [(&str, Vec<u8>); 4] = [
        (
            "v4-options-syn",
            ether(
                &[TPID_8021Q],
                ETH_IPV4,
                &ipv4_tcp(BLOCKED, 443, SYN, &[1, 1, 1, 0]),
            ),
        ),
        (
            "v6-ext-syn",
            ether(
                &[],
                ETH_IPV6,
                &ipv6_tcp(BLOCKED6, 443, SYN, &[Ext::HopByHop, Ext::Fragment(0, true)]),
            ),
        ),
        (
            "qinq-v4-syn",
            ether(
                &[TPID_8021AD, TPID_8021Q],
                ETH_IPV4,
                &ipv4_tcp(BLOCKED, 443, SYN, &[]),
            ),
        ),
        (
            "v6-auth-syn",
            ether(&[], ETH_IPV6, &ipv6_tcp(BLOCKED6, 443, SYN, &[Ext::Auth])),
        ),
    ];
    for (fname, full) in frames {
        for len in 14..full.len() {
            f.push(pass(
                format!("truncated/{fname}/{len}B"),
                full[..len].to_vec(),
                Reason::Truncated,
            ));
        }
    }

    // Rules, protection, actions.
    f.push(Fixture {
        name: "protect/prefix-v4".into(),
        frame: syn_v4(PROTECTED, 443),
        verdict: XDP_PASS,
        reason: Reason::Protected,
        rule: Some(("block", Outcome::Protected)),
    });
    f.push(Fixture {
        name: "protect/prefix-v6".into(),
        frame: syn_v6(PROTECTED6, 443),
        verdict: XDP_PASS,
        reason: Reason::Protected,
        rule: Some(("block6", Outcome::Protected)),
    });
    f.push(Fixture {
        name: "protect/port-22".into(),
        frame: syn_v4(BLOCKED, 22),
        verdict: XDP_PASS,
        reason: Reason::Protected,
        rule: Some(("block", Outcome::Protected)),
    });
    f.push(Fixture {
        name: "action/monitor-over-budget".into(),
        frame: syn_v4(WATCHED, 443),
        verdict: XDP_PASS,
        reason: Reason::WouldDrop,
        rule: Some(("watch", Outcome::WouldDrop)),
    });
    f.push(Fixture {
        name: "action/allow".into(),
        frame: syn_v4(OPEN, 443),
        verdict: XDP_PASS,
        reason: Reason::Admitted,
        rule: Some(("open", Outcome::Admitted)),
    });
    f.push(pass(
        "rules/no-rule-v4",
        syn_v4(NO_RULE, 443),
        Reason::NoRule,
    ));
    let mut other6 = BLOCKED6;
    other6[5] = 0x67;
    f.push(pass(
        "rules/no-rule-v6",
        syn_v6(other6, 443),
        Reason::NoRule,
    ));
    f
}

fn harness() -> &'static Mutex<Harness> {
    static H: OnceLock<Mutex<Harness>> = OnceLock::new();
    H.get_or_init(|| match Harness::new(POLICY) {
        Ok(h) => Mutex::new(h),
        Err(e) => {
            eprintln!("cannot load the XDP program (BPF is required): {e:#}");
            std::process::exit(1);
        }
    })
}

fn check(fx: &Fixture) -> Result<(), Failed> {
    let mut h = harness().lock().map_err(|_| "harness poisoned")?;
    let before_g = h.global()?;
    let before_r = RULES
        .iter()
        .map(|r| h.rule(r))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (verdict, out) = h.run(&fx.frame)?;
    let after_g = h.global()?;
    let after_r = RULES
        .iter()
        .map(|r| h.rule(r))
        .collect::<anyhow::Result<Vec<_>>>()?;

    if verdict != fx.verdict {
        return Err(format!("verdict {verdict}, expected {}", fx.verdict).into());
    }
    if verdict == XDP_PASS && out != fx.frame {
        return Err("a passed frame came back modified".into());
    }
    for reason in Reason::ALL {
        let i = reason as usize;
        let delta = after_g[i] - before_g[i];
        let want = u64::from(reason == fx.reason);
        if delta != want {
            return Err(format!(
                "global counter {} moved by {delta}, expected {want}",
                reason.name()
            )
            .into());
        }
    }
    for (ri, name) in RULES.iter().enumerate() {
        for outcome in Outcome::ALL {
            let delta = after_r[ri].get(outcome) - before_r[ri].get(outcome);
            let want = u64::from(fx.rule == Some((name, outcome)));
            if delta != want {
                return Err(format!(
                    "rule {name} counter {} moved by {delta}, expected {want}",
                    outcome.name()
                )
                .into());
            }
        }
    }
    Ok(())
}

fn main() {
    let mut args = Arguments::from_args();
    // One program and one set of counters: the deltas need one test at a time.
    args.test_threads = Some(1);
    let all = fixtures();
    assert!(all.len() >= 150, "only {} fixtures", all.len());
    // Load once, up front: a program the kernel refuses fails the run once, loudly,
    // instead of once per fixture.
    let _ = harness();
    let trials = all
        .into_iter()
        .map(|fx| Trial::test(fx.name.clone(), move || check(&fx)))
        .collect();
    libtest_mimic::run(&args, trials).exit();
}
