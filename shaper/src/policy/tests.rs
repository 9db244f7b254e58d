use super::*;

fn errs(text: &str) -> Vec<String> {
    match parse("p.toml", text) {
        Ok(_) => vec![],
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    }
}

const GOOD: &str = r#"
[defaults]
ipv4_group = 24
ipv6_group = 64
max_wait = "30s"

[[rule]]
name = "everyone"
prefix = "0.0.0.0/0"
rate = 20
burst = 40
action = "defer"
ceiling = 2000

[[rule]]
name = "school-nat"
prefix = "198.51.100.0/24"
group = 24
rate = "1200/min"
action = "drop"

[[rule]]
name = "v6"
prefix = "2001:db8::/32"
rate = 5

[protect]
prefixes = ["192.0.2.10/32"]
ports = [22]
"#;

#[test]
fn design_example_parses() {
    let p = parse("p.toml", GOOD).expect("valid");
    assert_eq!(p.rules.len(), 3);
    assert_eq!(p.rules[1].rate.per_second_ceil(), 20);
    assert_eq!(p.rules[1].burst, 20, "burst defaults to one second of rate");
    assert_eq!(p.rules[2].group, 64);
    assert_eq!(p.rules[2].action, Action::Drop);
    assert_eq!(p.protected_ports, vec![22]);
}

#[test]
fn likely_mistakes_are_warnings_with_their_place() {
    let p = parse(
        "p.toml",
        "[[rule]]\nname = \"a\"\nprefix = \"10.0.0.0/8\"\nrate = 1\nmax_wait = \"30s\"\n\
         [[rule]]\nname = \"m\"\nprefix = \"::ffff:10.1.0.0/112\"\nrate = 1\n",
    )
    .expect("valid, with warnings");
    let w: Vec<String> = p.warnings.iter().map(|w| w.warning()).collect();
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(
        w[0].starts_with("p.toml:5:12: warning: rule `a`: max_wait and max_waiting only matter"),
        "{w:?}"
    );
    assert!(
        w[1].starts_with("p.toml:8:10: warning: rule `m`: ::ffff:10.1.0.0/112 is IPv4-mapped"),
        "{w:?}"
    );
    // Only IPv4 rules: IPv6 goes unlimited.
    let v4 = parse(
        "p.toml",
        "[[rule]]\nname = \"a\"\nprefix = \"10.0.0.0/8\"\nrate = 1\n",
    )
    .expect("valid");
    assert_eq!(v4.warnings.len(), 1);
    assert!(
        v4.warnings[0]
            .message
            .starts_with("no rule has an IPv6 prefix")
    );
    assert!(parse("p.toml", GOOD).expect("valid").warnings.is_empty());
}

#[test]
fn a_syntax_error_is_one_line() {
    let e = errs("[[rule.\nname = \"a\"\n");
    assert_eq!(e.len(), 1);
    assert!(!e[0].contains('\n'), "{e:?}");
    assert!(
        e[0].starts_with("p.toml:1:7: invalid table header; expected"),
        "{e:?}"
    );
}

#[test]
fn max_wait_takes_whole_seconds_or_a_duration() {
    let p = parse(
        "p.toml",
        "[defaults]\nmax_wait = 45\n[[rule]]\nname = \"a\"\nprefix = \"10.0.0.0/8\"\nrate = 1\naction = \"defer\"\n\
         [[rule]]\nname = \"b\"\nprefix = \"10.1.0.0/16\"\nrate = 1\naction = \"defer\"\nmax_wait = 60\n\
         [[rule]]\nname = \"c\"\nprefix = \"10.2.0.0/16\"\nrate = 1\naction = \"defer\"\nmax_wait = \"2min\"\n",
    )
    .expect("valid");
    let waits: Vec<u64> = p.rules.iter().map(|r| r.max_wait.as_secs()).collect();
    assert_eq!(waits, [45, 60, 120]);
}

#[test]
fn errors_name_file_line_col() {
    let e = errs("[[rule]]\nname = \"a\"\nprefix = \"10.0.0.1/24\"\nrate = 1\n");
    assert_eq!(
        e,
        vec!["p.toml:3:10: `10.0.0.1/24` has host bits set; did you mean 10.0.0.0/24?"]
    );
    let e = errs("[[rule]]\nname = \"a\"\nprefix = \"10.0.0.0/8\"\nrate = 1\nbogus = 2\n");
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with("p.toml:5:1: unknown field `bogus`"),
        "{e:?}"
    );
}

#[test]
fn rejects_bad_values() {
    let cases = [
        ("prefix = \"010.0.0.0/8\"", "leading zeros"),
        ("prefix = \"10.0.0.0/33\"", "out of range"),
        ("prefix = \"10.0.0.0/08\"", "invalid prefix length"),
        ("prefix = \"2001:db8::1/32\"", "host bits"),
        (
            "prefix = \"10.0.0.0/8\"\ngroup = 4",
            "wider than the rule's prefix",
        ),
        ("prefix = \"10.0.0.0/8\"\ngroup = 33", "out of range"),
        (
            "prefix = \"10.0.0.0/8\"\naction = \"block\"",
            "unknown action",
        ),
        ("prefix = \"10.0.0.0/8\"\nburst = 0", "at least 1"),
        ("prefix = \"10.0.0.0/8\"\nburst = -1", "out of range"),
        ("prefix = \"10.0.0.0/8\"\nmax_wait = \"0s\"", "out of range"),
        ("prefix = \"10.0.0.0/8\"\nmax_wait = \"30\"", "needs a unit"),
        ("prefix = \"10.0.0.0/8\"\nmax_wait = 0", "out of range"),
        ("prefix = \"10.0.0.0/8\"\nmax_wait = -5", "out of range"),
        (
            "prefix = \"10.0.0.0/8\"\nmax_wait = 1.5",
            "whole seconds, not a float",
        ),
        ("prefix = \"10.0.0.0/8\"\nceiling = 0", "above 0"),
    ];
    for (extra, want) in cases {
        let text = format!("[[rule]]\nname = \"a\"\nrate = 1\n{extra}\n");
        let e = errs(&text);
        assert!(e.len() == 1 && e[0].contains(want), "{extra}: {e:?}");
    }
}

#[test]
fn duplicates_are_rejected() {
    let e = errs(
        "[[rule]]\nname = \"a\"\nprefix = \"10.0.0.0/8\"\nrate = 1\n\
         [[rule]]\nname = \"a\"\nprefix = \"10.0.0.0/8\"\nrate = 1\n",
    );
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(e[0].starts_with("p.toml:6:8: duplicate rule name"));
    assert!(e[1].starts_with("p.toml:7:10: prefix 10.0.0.0/8 is already used"));
}

#[test]
fn protection_wins_over_more_specific_rules() {
    let p = parse(
        "p.toml",
        "[[rule]]\nname = \"wide\"\nprefix = \"10.0.0.0/8\"\nrate = 0\n\
         [[rule]]\nname = \"narrow\"\nprefix = \"10.1.2.0/24\"\nrate = 0\n\
         [protect]\nprefixes = [\"10.1.0.0/16\", \"10.9.9.9\"]\n",
    )
    .expect("valid");
    let c = p.compile();
    let flags: Vec<(u32, u8, u32)> =
        c.v4.iter()
            .map(|(_, l, e)| (*l, e.flags, e.rule_id))
            .collect();
    // wide: not protected; narrow (inside 10.1/16): protected; the two protected
    // prefixes count under `wide`, the rule that covers them. The /32 is longer than
    // the probe length (24): it and its /24 block are not cached, and the block gets an
    // entry of its own, a copy of `wide`'s.
    assert_eq!(
        flags,
        vec![(8, 0, 0), (24, 1, 1), (16, 1, 0), (32, 3, 0), (24, 2, 0)]
    );
    assert_eq!((c.probe_v4, c.probe_v6), (24, 64));
    assert_eq!(c.v4[4].0, [10, 9, 9, 0]);
    assert_eq!(c.v4[4].2.action, c.v4[0].2.action);
    assert_eq!(c.by_id().len(), 2);
}

#[test]
fn probe_blocks_with_a_prefix_inside_are_not_cached() {
    let p = parse(
        "p.toml",
        "[[rule]]\nname = \"everyone\"\nprefix = \"0.0.0.0/0\"\nrate = 5\n\
         [[rule]]\nname = \"lab\"\nprefix = \"198.18.5.0/24\"\nrate = 5\ngroup = 24\n\
         [[rule]]\nname = \"hosts\"\nprefix = \"198.18.6.0/28\"\nrate = 5\ngroup = 32\n\
         [[rule]]\nname = \"nat\"\nprefix = \"198.18.7.0/24\"\nrate = 5\ngroup = 32\n\
         [[rule]]\nname = \"v6\"\nprefix = \"2001:db8::/32\"\nrate = 5\ngroup = 56\n",
    )
    .expect("valid");
    let c = p.compile();
    // Two IPv4 rules group by /24 and two by /32: on a tie the shorter length wins
    // (fewer probe entries).
    assert_eq!((c.probe_v4, c.probe_v6), (24, 56));
    let p = parse(
        "p.toml",
        "[[rule]]\nname = \"everyone\"\nprefix = \"0.0.0.0/0\"\nrate = 5\n\
         [[rule]]\nname = \"lab\"\nprefix = \"198.18.5.0/24\"\nrate = 5\n\
         [[rule]]\nname = \"hosts\"\nprefix = \"198.18.6.0/28\"\nrate = 5\ngroup = 32\n\
         [protect]\nprefixes = [\"198.18.5.7\"]\n",
    )
    .expect("valid");
    let c = p.compile();
    assert_eq!(c.probe_v4, 24);
    let no_cache = |a: [u8; 4], l: u32| {
        c.v4.iter()
            .find(|(x, len, _)| *x == a && *len == l)
            .map(|(_, _, e)| e.flags & shaper_common::maps::rule_flags::NO_CACHE != 0)
    };
    // Whole blocks under one entry are cached.
    assert_eq!(no_cache([0, 0, 0, 0], 0), Some(false));
    // `lab`'s block holds a protected host; `hosts` is inside a block of `everyone`.
    assert_eq!(no_cache([198, 18, 5, 0], 24), Some(true));
    assert_eq!(no_cache([198, 18, 5, 7], 32), Some(true));
    assert_eq!(no_cache([198, 18, 6, 0], 28), Some(true));
    // The block around `hosts` got a copy of `everyone`'s entry, flagged.
    let block =
        c.v4.iter()
            .find(|(x, len, _)| *x == [198, 18, 6, 0] && *len == 24);
    let (_, _, e) = block.expect("a block entry");
    assert_eq!(e.rule_id, 0);
    assert_ne!(e.flags & shaper_common::maps::rule_flags::NO_CACHE, 0);
}

#[test]
fn fleet_gives_this_nodes_share_of_every_quota() {
    let p = parse("p.toml", &format!("{GOOD}\n[fleet]\nnodes = 4\n")).expect("valid");
    assert_eq!(p.fleet, Some(Share { num: 1, den: 4 }));
    let s = p.shared(Share { num: 1, den: 4 });
    let everyone = &s.rules[0];
    // 20/s and a burst of 40 and a ceiling of 2000/s, a quarter each.
    assert_eq!(everyone.rate.per_second_ceil(), 5);
    assert_eq!(everyone.burst, 10);
    assert_eq!(everyone.ceiling.map(Rate::per_second_ceil), Some(500));
    // 1200/min is 20/s: 5/s.
    assert_eq!(s.rules[1].rate.per_second_ceil(), 5);
    for share in ["0.25", "\"1/4\"", "\"25%\""] {
        let p = parse("p.toml", &format!("{GOOD}\n[fleet]\nshare = {share}\n")).expect(share);
        assert_eq!(p.fleet, Some(Share { num: 1, den: 4 }), "{share}");
    }
}

#[test]
fn a_bad_fleet_table_names_its_place() {
    let head = format!("{GOOD}\n[fleet]\n");
    // The line of the table's first key, and of its second.
    let (first, second) = (head.lines().count() + 1, head.lines().count() + 2);
    for (fleet, want) in [
        (
            "nodes = 0",
            format!("p.toml:{first}:9: nodes = 0: must be 1..=1000000"),
        ),
        (
            "nodes = -2",
            format!("p.toml:{first}:9: nodes = -2: must be 1..=1000000"),
        ),
        (
            "share = 1.5",
            format!("p.toml:{first}:9: `1.5`: a share is a fraction in (0, 1]"),
        ),
        (
            "share = \"2/1\"",
            format!("p.toml:{first}:9: `2/1`: a share is a fraction in (0, 1]"),
        ),
        (
            "nodes = 2\nshare = 0.5",
            format!("p.toml:{second}:9: [fleet] takes `nodes` or `share`, not both"),
        ),
    ] {
        let e = errs(&format!("{head}{fleet}\n"));
        assert!(e.iter().any(|m| m.starts_with(&want)), "{fleet}: {e:?}");
    }
}
