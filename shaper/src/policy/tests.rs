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
    // prefixes count under `wide`, the rule that covers them.
    assert_eq!(flags, vec![(8, 0, 0), (24, 1, 1), (16, 1, 0), (32, 1, 0)]);
}
