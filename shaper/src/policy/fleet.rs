//! Fleet quotas: a policy written for a whole platform, enforced by each of its N
//! servers. `[fleet] nodes = 4` (or `share = 0.25`, or `shaper run --fleet-share 1/4`)
//! gives this node its share of every rule's rate, burst and ceiling.
//!
//! The shares are exact only if the load balancer spreads each subnet's connections
//! evenly over the nodes: a subnet whose connections all land on one node gets that
//! node's share of its quota, not the platform's. Exact global quotas would need the
//! nodes to share their budgets, a round trip per SYN over budget; a share needs none.

use std::fmt;

use super::{Policy, Rate};

/// This node's share of the platform's quotas: `num / den`, in (0, 1].
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Share {
    pub num: u64,
    pub den: u64,
}

impl Share {
    /// The whole quota (a single node).
    pub const WHOLE: Share = Share { num: 1, den: 1 };

    /// One node of `nodes`.
    pub fn of_nodes(nodes: u64) -> Result<Share, String> {
        if nodes == 0 || nodes > 1_000_000 {
            return Err(format!("nodes = {nodes}: must be 1..=1000000"));
        }
        Ok(Share { num: 1, den: nodes })
    }

    /// `0.25`, `1/4` or `25%`.
    pub fn parse(s: &str) -> Result<Share, String> {
        let bad = || format!("`{s}`: a share is a fraction in (0, 1]: 0.25, 1/4 or 25%");
        let s = s.trim();
        let share = if let Some((n, d)) = s.split_once('/') {
            let n: u64 = n.trim().parse().map_err(|_| bad())?;
            let d: u64 = d.trim().parse().map_err(|_| bad())?;
            Share { num: n, den: d }
        } else if let Some(p) = s.strip_suffix('%') {
            Self::decimal(p.trim(), 100).ok_or_else(bad)?
        } else {
            Self::decimal(s, 1).ok_or_else(bad)?
        };
        share.checked().ok_or_else(bad)
    }

    /// A decimal number over `scale` (at most six decimals).
    fn decimal(s: &str, scale: u64) -> Option<Share> {
        let (int, frac) = s.split_once('.').unwrap_or((s, ""));
        if frac.len() > 6 || (int.is_empty() && frac.is_empty()) {
            return None;
        }
        let digits = |d: &str| d.is_empty() || d.bytes().all(|b| b.is_ascii_digit());
        if !digits(int) || !digits(frac) {
            return None;
        }
        let den = 10u64.pow(frac.len() as u32);
        let int: u64 = if int.is_empty() { 0 } else { int.parse().ok()? };
        let frac: u64 = if frac.is_empty() {
            0
        } else {
            frac.parse().ok()?
        };
        Some(Share {
            num: int.checked_mul(den)?.checked_add(frac)?,
            den: den.checked_mul(scale)?,
        })
    }

    /// In lowest terms, if in (0, 1].
    fn checked(self) -> Option<Share> {
        if self.num == 0 || self.den == 0 || self.num > self.den {
            return None;
        }
        let g = gcd(self.num, self.den);
        Some(Share {
            num: self.num / g,
            den: self.den / g,
        })
    }

    pub fn is_whole(self) -> bool {
        self.num == self.den
    }

    /// `rate` times the share, exactly (the period grows, the count shrinks).
    pub fn rate(self, rate: Rate) -> Rate {
        let count = u128::from(rate.count) * u128::from(self.num);
        let period = u128::from(rate.period_ns) * u128::from(self.den);
        let g = gcd128(count, period).max(1);
        Rate {
            count: u64::try_from(count / g).unwrap_or(u64::MAX),
            period_ns: u64::try_from(period / g).unwrap_or(u64::MAX),
        }
    }

    /// `n` times the share, to the nearest whole number, at least 1.
    pub fn count(self, n: u64) -> u64 {
        let scaled = (u128::from(n) * u128::from(self.num) * 2 + u128::from(self.den))
            / (2 * u128::from(self.den));
        u64::try_from(scaled).unwrap_or(u64::MAX).max(1)
    }
}

impl fmt::Display for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.num, self.den)
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn gcd128(a: u128, b: u128) -> u128 {
    if b == 0 { a } else { gcd128(b, a % b) }
}

impl Policy {
    /// What this node enforces, and its share: `over` (`shaper run --fleet-share`),
    /// else the policy's `[fleet]`, else the whole quota.
    pub fn for_node(&self, over: Option<Share>) -> (Policy, Share) {
        let share = over.or(self.fleet).unwrap_or(Share::WHOLE);
        (self.shared(share), share)
    }

    /// This policy as one node of a fleet enforces it: every rule's rate, burst and
    /// ceiling times `share` (bursts rounded, at least 1).
    pub fn shared(&self, share: Share) -> Policy {
        let mut p = self.clone();
        if share.is_whole() {
            return p;
        }
        for r in &mut p.rules {
            r.rate = share.rate(r.rate);
            r.burst = share.count(r.burst);
            r.ceiling = r.ceiling.map(|c| share.rate(c));
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::Share;
    use crate::policy::Rate;

    #[test]
    fn shares_parse_in_three_spellings_and_refuse_the_rest() {
        let quarter = Share { num: 1, den: 4 };
        for s in ["1/4", "0.25", "25%", " 2/8 ", ".25"] {
            assert_eq!(Share::parse(s), Ok(quarter), "{s}");
        }
        assert_eq!(Share::parse("1"), Ok(Share::WHOLE));
        for s in [
            "0",
            "0/4",
            "5/4",
            "1.5",
            "-1",
            "abc",
            "1/0",
            "",
            "0.1234567",
            "150%",
        ] {
            assert!(Share::parse(s).is_err(), "{s} was accepted");
        }
        assert_eq!(Share::of_nodes(3), Ok(Share { num: 1, den: 3 }));
        assert!(Share::of_nodes(0).is_err());
    }

    #[test]
    fn a_share_scales_rates_exactly_and_bursts_to_the_nearest() {
        let third = Share { num: 1, den: 3 };
        // 20/s over three nodes: 20 per 3 s (one per 150 ms), not 6.67/s rounded.
        let r = third.rate(Rate {
            count: 20,
            period_ns: 1_000_000_000,
        });
        assert_eq!((r.count, r.period_ns), (1, 150_000_000));
        assert_eq!(third.count(40), 13);
        assert_eq!(third.count(2), 1);
        assert_eq!(third.count(1), 1);
        assert_eq!(Share { num: 1, den: 4 }.count(10), 3);
    }
}
