//! The data plane's map sizes, fixed when the program is loaded, and whether a
//! compiled policy fits them (what `policy check` and every apply ask before writing).

use shaper_common::maps::{MAX_GROUPS, MAX_LINES, MAX_PREFIXES, MAX_RULES, MAX_WAITERS};

use crate::policy::Compiled;

/// The most any limit may be set to (2^24: a group table that large takes 1.5 GiB).
pub const MAX_LIMIT: u32 = 1 << 24;

/// Map sizes fixed at load time (`shaper run --max-rules`, `--max-prefixes`,
/// `--max-groups`, `--max-waiters`; the defaults fit a typical server).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Rule ids (counters and ceilings).
    pub rules: u32,
    /// Entries of each rule trie (rules plus protected prefixes).
    pub prefixes: u32,
    /// Group table slots (rounded up to a power of two at load).
    pub groups: u32,
    /// Clients waiting in line, all `defer` groups together (LRU).
    pub waiters: u32,
    /// Calendars of congested `defer` groups at once (LRU).
    pub lines: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            rules: MAX_RULES,
            prefixes: MAX_PREFIXES,
            groups: MAX_GROUPS,
            waiters: MAX_WAITERS,
            lines: MAX_LINES,
        }
    }
}

impl Capacity {
    /// Does `compiled` fit? Each rule trie holds two generations (the active policy
    /// and the one being written), so a policy may use half of its entries. The error
    /// names the limit that is short.
    pub fn check(&self, compiled: &Compiled) -> Result<(), String> {
        let per_family = self.prefixes as usize / 2;
        let short = [
            ("rules", compiled.rule_count(), self.rules as usize),
            (
                "IPv4 trie entries (rule and protected prefixes, and the blocks cached \
                 around more specific ones)",
                compiled.v4.len(),
                per_family,
            ),
            (
                "IPv6 trie entries (likewise)",
                compiled.v6.len(),
                per_family,
            ),
        ]
        .into_iter()
        .filter(|(_, need, have)| need > have)
        .map(|(what, need, have)| format!("{need} {what}, the data plane holds {have}"))
        .collect::<Vec<_>>();
        if short.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "the policy does not fit: it needs {}; raise the limits with `shaper run \
                 --max-rules N --max-prefixes N` (the maps are sized when the daemon first \
                 loads them; `shaper policy check` takes the same flags)",
                short.join("; ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Capacity;

    fn rules(n: usize, protect: bool) -> String {
        let mut t: String = (0..n)
            .map(|i| {
                format!(
                    "[[rule]]\nname = \"r{i}\"\nprefix = \"10.{}.{}.0/24\"\nrate = 1\n",
                    i / 256,
                    i % 256
                )
            })
            .collect();
        if protect {
            t.push_str("[protect]\nprefixes = [\"192.0.2.10/32\"]\n");
        }
        t
    }

    #[test]
    fn a_policy_that_needs_more_trie_entries_than_the_data_plane_holds_is_refused() {
        let cap = Capacity::default();
        let fits = crate::policy::parse("p.toml", &rules(4096, false)).expect("valid");
        assert_eq!(cap.check(&fits.compile()), Ok(()));
        // One protected prefix more: 4,097 IPv4 entries for 4,096 per generation.
        let over = crate::policy::parse("p.toml", &rules(4096, true)).expect("valid");
        let e = cap.check(&over.compile()).expect_err("over capacity");
        assert!(
            e.contains("needs 4097 IPv4 trie entries") && e.contains("holds 4096"),
            "{e}"
        );
    }
}
