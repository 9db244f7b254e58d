//! The probe cache, in the real program (BPF_PROG_TEST_RUN): a block's rule is
//! remembered for one policy epoch, never across a more specific prefix inside the
//! block, and never across a new policy.

use shaper::capacity::Capacity;
use shaper_common::{
    Outcome,
    maps::{GroupKey, family},
};
use shaper_tests::{
    packets::syn_v4,
    progrun::{Harness, XDP_DROP, XDP_PASS},
};

/// One attempt per /24 a minute from 198.18.0.0/15, except a protected host and a /28
/// whose hosts each have a budget; both lie inside /24 blocks of the wide rule.
const NESTED: &str = r#"
[[rule]]
name = "everyone"
prefix = "198.18.0.0/15"
rate = "1/min"
burst = 1
action = "drop"

[[rule]]
name = "hosts"
prefix = "198.18.6.0/28"
group = 32
rate = "1000/s"
burst = 1000

[protect]
prefixes = ["198.18.5.7"]
"#;

fn count(h: &Harness, rule: &str, o: Outcome) -> u64 {
    h.rule(rule).expect("rule counters").counts[o as usize]
}

fn verdict(h: &mut Harness, src: [u8; 4]) -> u32 {
    h.run(&syn_v4(src, 443)).expect("test run").0
}

/// The probe entry of `src`'s /24, if the program made one: (owner rule id, epoch).
fn probe_entry(h: &Harness, src: [u8; 4]) -> Option<(u32, u32)> {
    let [a, b, c, _] = src;
    h.dp.groups()
        .into_iter()
        .find(|(k, _)| {
            *k == GroupKey {
                family: family::V4,
                len: 24,
                _pad: [0; 2],
                addr: [a, b, c, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            }
        })
        .map(|(_, g)| (g.rule_id, g.epoch))
}

/// The first attempt of a /24 under `everyone` is admitted, the rest dropped.
fn first_only(h: &mut Harness, src: [u8; 4], n: usize) {
    let got: Vec<u32> = (0..n).map(|_| verdict(h, src)).collect();
    let mut want = vec![XDP_DROP; n];
    want[0] = XDP_PASS;
    assert_eq!(got, want, "{src:?}");
}

#[test]
fn a_cached_block_never_hides_a_more_specific_prefix() {
    let mut h = Harness::with_capacity(NESTED, Capacity::default()).expect("load");
    let epoch = h.dp.epoch().expect("epoch");
    // A block with nothing inside: its first attempt looks the rule up and caches it.
    first_only(&mut h, [198, 18, 9, 1], 3);
    assert_eq!(
        verdict(&mut h, [198, 18, 9, 200]),
        XDP_DROP,
        "the same group"
    );
    assert_eq!(
        probe_entry(&h, [198, 18, 9, 1]),
        Some((h.rule_id("everyone"), epoch)),
        "the clean block is cached for this epoch"
    );
    // Blocks with a more specific prefix inside: their other sources come first, then
    // the inner ones, then the others again.
    first_only(&mut h, [198, 18, 5, 1], 3);
    first_only(&mut h, [198, 18, 6, 200], 3);
    for _ in 0..3 {
        assert_eq!(verdict(&mut h, [198, 18, 5, 7]), XDP_PASS, "protected");
        assert_eq!(
            verdict(&mut h, [198, 18, 6, 3]),
            XDP_PASS,
            "its own host budget"
        );
    }
    assert_eq!(verdict(&mut h, [198, 18, 5, 1]), XDP_DROP);
    assert_eq!(verdict(&mut h, [198, 18, 6, 200]), XDP_DROP);
    for src in [[198, 18, 5, 1], [198, 18, 6, 200]] {
        let cached = probe_entry(&h, src).is_some_and(|(_, e)| e == epoch);
        assert!(
            !cached,
            "{src:?}: a block with a prefix inside is never cached"
        );
    }
    assert_eq!(count(&h, "everyone", Outcome::Admitted), 3);
    assert_eq!(count(&h, "everyone", Outcome::Dropped), 3 + 2 + 2 + 2);
    assert_eq!(count(&h, "everyone", Outcome::Protected), 3);
    assert_eq!(count(&h, "hosts", Outcome::Admitted), 3);
    assert_eq!(count(&h, "hosts", Outcome::Dropped), 0);
}

const EVERYONE: &str =
    "[[rule]]\nname = \"everyone\"\nprefix = \"198.18.0.0/15\"\nrate = \"1/min\"\nburst = 1\n";

#[test]
fn a_new_policy_moves_cached_blocks_to_their_new_rules() {
    let mut h = Harness::with_capacity(EVERYONE, Capacity::default()).expect("load");
    let policy = h.policy.clone();
    h.apply(&policy).expect("stable ids");
    for src in [[198, 18, 9, 1], [198, 18, 10, 6]] {
        first_only(&mut h, src, 2);
        let cached = probe_entry(&h, src).is_some_and(|(_, e)| e == h.dp.epoch().expect("epoch"));
        assert!(cached, "{src:?}");
    }
    // The next policy opens 198.18.9.0/24 and protects a host of the other cached block.
    let next = shaper::policy::parse(
        "next.toml",
        &format!(
            "{EVERYONE}[[rule]]\nname = \"lab\"\nprefix = \"198.18.9.0/24\"\naction = \"allow\"\nrate = 0\n\
             [protect]\nprefixes = [\"198.18.10.5\"]\n"
        ),
    )
    .expect("valid");
    let ids = h.apply(&next).expect("apply");
    assert_eq!(
        verdict(&mut h, [198, 18, 9, 1]),
        XDP_PASS,
        "now under `lab`"
    );
    assert_eq!(verdict(&mut h, [198, 18, 10, 5]), XDP_PASS, "now protected");
    assert_eq!(verdict(&mut h, [198, 18, 10, 6]), XDP_DROP, "still spent");
    let lab = h.dp.rule_counters(ids[1]).expect("counters");
    assert_eq!(lab.counts[Outcome::Admitted as usize], 1);
    // And back: `lab` goes, its block returns to `everyone`, whose group there (the
    // rule is unchanged, so is its id) is still spent.
    h.apply(&policy).expect("apply");
    for _ in 0..2 {
        assert_eq!(verdict(&mut h, [198, 18, 9, 1]), XDP_DROP);
        assert_eq!(verdict(&mut h, [198, 18, 10, 5]), XDP_DROP);
    }
}

#[test]
fn a_block_given_to_another_rule_starts_with_a_full_budget() {
    // One group per /24 (the probe length): the group is the probe entry itself.
    let first = "[[rule]]\nname = \"a\"\nprefix = \"198.18.0.0/15\"\nrate = \"1/min\"\nburst = 2\n";
    let mut h = Harness::with_capacity(first, Capacity::default()).expect("load");
    // Stable ids, as the daemon applies policies.
    let policy = h.policy.clone();
    let first_ids = h.apply(&policy).expect("apply");
    let src = [198, 18, 3, 3];
    let got: Vec<u32> = (0..4).map(|_| verdict(&mut h, src)).collect();
    assert_eq!(got, [XDP_PASS, XDP_PASS, XDP_DROP, XDP_DROP], "burst 2");
    // Another definition over the same prefix: a new rule (a fresh id), so the block's
    // group is another rule's now and starts full.
    let second = shaper::policy::parse(
        "second.toml",
        "[[rule]]\nname = \"a\"\nprefix = \"198.18.0.0/15\"\nrate = \"1/min\"\nburst = 3\n",
    )
    .expect("valid");
    let ids = h.apply(&second).expect("apply");
    assert_ne!(ids[0], first_ids[0], "a new rule id");
    let got: Vec<u32> = (0..4).map(|_| verdict(&mut h, src)).collect();
    assert_eq!(
        got,
        [XDP_PASS, XDP_PASS, XDP_PASS, XDP_DROP],
        "burst 3, from full"
    );
    assert_eq!(probe_entry(&h, src).map(|(r, _)| r), Some(ids[0]));
    // Applying the same policy again keeps the rule (same id) and its spent budget.
    h.apply(&second).expect("apply");
    assert_eq!(verdict(&mut h, src), XDP_DROP, "no new burst");
}

#[test]
fn rules_without_group_state_never_fill_the_group_table() {
    let mut h = Harness::with_capacity(
        "[[rule]]\nname = \"closed\"\nprefix = \"198.18.0.0/16\"\nrate = 0\naction = \"drop\"\n\
         [[rule]]\nname = \"open\"\nprefix = \"198.19.0.0/16\"\naction = \"allow\"\nrate = 0\n",
        Capacity::default(),
    )
    .expect("load");
    // A flood of new sources, one per /24, under each rule.
    for i in 0..200u8 {
        assert_eq!(verdict(&mut h, [198, 18, i, 1]), XDP_DROP);
        assert_eq!(verdict(&mut h, [198, 19, i, 1]), XDP_PASS);
    }
    assert_eq!(count(&h, "closed", Outcome::Dropped), 200);
    assert_eq!(count(&h, "open", Outcome::Admitted), 200);
    assert_eq!(h.dp.groups().len(), 0, "no entries for rules without state");
}
