//! Semantic checks on a parsed policy. Every error found is reported, each at its place.

use std::{collections::HashMap, net::IpAddr, time::Duration};

use toml::Spanned;

use super::{
    Action, Policy, PolicyError, PolicyErrors, Prefix, Rate, Rule,
    raw::{RawPolicy, error_at},
};

/// Most rules a policy may hold (the data plane's default capacity).
pub const MAX_RULES: usize = shaper_common::maps::MAX_RULES as usize;
/// Highest rate accepted: one admission per microsecond per group.
const MAX_RATE_PER_S: u128 = 1_000_000;
const MAX_BURST: i64 = 1_000_000;
const MAX_WAIT_RANGE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(300));
/// Past every stack's last SYN retransmission (Linux's at ~67 s after the first SYN,
/// older Linux's at ~63 s), so each client's last knock still has its place.
const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(90);
/// Most clients one group may keep waiting (`max_waiting`).
const MAX_WAITING: u32 = 1_000_000;

/// Default line length of a group: twice what the budget can serve within `max_wait`
/// (clients beyond that would be forgotten before their turn), at least 16.
fn default_max_waiting(rate: Rate, burst: u64, max_wait: Duration) -> u32 {
    let servable = rate
        .per_second_ceil()
        .saturating_mul(max_wait.as_secs().max(1))
        .saturating_add(burst);
    u32::try_from(servable.saturating_mul(2))
        .unwrap_or(MAX_WAITING)
        .clamp(16, MAX_WAITING)
}

struct Checker<'a> {
    file: &'a str,
    text: &'a str,
    errors: Vec<PolicyError>,
    warnings: Vec<PolicyError>,
}

impl Checker<'_> {
    fn at(&self, start: usize, message: impl Into<String>) -> PolicyError {
        error_at(self.file, self.text, start, message.into())
    }

    fn err<T>(&mut self, span: &Spanned<T>, message: impl Into<String>) {
        let e = self.at(span.span().start, message);
        self.errors.push(e);
    }

    /// Valid, but likely not what was meant: a warning at byte `start`.
    fn warn_at(&mut self, start: usize, message: impl Into<String>) {
        let w = self.at(start, message);
        self.warnings.push(w);
    }
}

pub fn validate(file: &str, text: &str, raw: RawPolicy) -> Result<Policy, PolicyErrors> {
    let mut c = Checker {
        file,
        text,
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let (mut v4_group, mut v6_group, mut max_wait) = (24u8, 64u8, DEFAULT_MAX_WAIT);
    if let Some(d) = &raw.defaults {
        let d = d.get_ref();
        if let Some(g) = &d.ipv4_group {
            v4_group = group_len(&mut c, g, 32, "ipv4_group").unwrap_or(v4_group);
        }
        if let Some(g) = &d.ipv6_group {
            v6_group = group_len(&mut c, g, 128, "ipv6_group").unwrap_or(v6_group);
        }
        if let Some(w) = &d.max_wait {
            max_wait = wait(&mut c, w).unwrap_or(max_wait);
        }
    }

    let mut rules = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut prefixes: HashMap<Prefix, String> = HashMap::new();
    if let Some(extra) = raw.rules.get(MAX_RULES) {
        c.err(extra, format!("too many rules: at most {MAX_RULES}"));
    }
    for r in &raw.rules {
        let r = r.get_ref();
        let name = r.name.get_ref();
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            c.err(
                &r.name,
                format!("invalid rule name `{name}`: use 1-64 letters, digits, `-`, `_` or `.`"),
            );
        } else if names.contains_key(name) {
            c.err(&r.name, format!("duplicate rule name `{name}`"));
        }
        names.insert(name.clone(), rules.len());

        let prefix = match Prefix::parse(r.prefix.get_ref()) {
            Ok(p) => {
                if let Some(other) = prefixes.get(&p) {
                    c.err(
                        &r.prefix,
                        format!("prefix {p} is already used by rule `{other}`"),
                    );
                }
                prefixes.insert(p, name.clone());
                Some(p)
            }
            Err(e) => {
                c.err(&r.prefix, e);
                None
            }
        };

        let rate = parse_rate_value(&mut c, &r.rate, "rate");
        let burst = match (&r.burst, rate) {
            (Some(b), _) => {
                match *b.get_ref() {
                    n if !(0..=MAX_BURST).contains(&n) => {
                        c.err(b, format!("burst {n} is out of range 0..={MAX_BURST}"));
                        None
                    }
                    0 if rate.is_some_and(|r| r.count > 0) => {
                        c.err(b, "burst must be at least 1 when rate is above 0 (nothing could be admitted)");
                        None
                    }
                    n => u64::try_from(n).ok(),
                }
            }
            // Default: one second's worth of the rate.
            (None, Some(rt)) => Some(rt.per_second_ceil()),
            (None, None) => None,
        };

        let group = match (&r.group, prefix) {
            (Some(gs), Some(p)) => match group_len(&mut c, gs, p.max_len(), "group") {
                Some(g) if g < p.len => {
                    c.err(
                        gs,
                        format!(
                            "group /{g} is wider than the rule's prefix /{}: use a length \
                             from {} to {}",
                            p.len,
                            p.len,
                            p.max_len()
                        ),
                    );
                    None
                }
                g => g,
            },
            (Some(g), None) => group_len(&mut c, g, 128, "group"),
            // Default per family, never wider than the prefix itself.
            (None, Some(p)) => Some(if p.addr.is_ipv4() { v4_group } else { v6_group }.max(p.len)),
            (None, None) => None,
        };

        let action = match &r.action {
            None => Some(Action::Drop),
            Some(a) => match a.get_ref().parse::<Action>() {
                Ok(action) => Some(action),
                Err(e) => {
                    c.err(a, e);
                    None
                }
            },
        };

        let ceiling = match &r.ceiling {
            None => Some(None),
            Some(v) => match parse_rate_value(&mut c, v, "ceiling") {
                Some(rt) if rt.count == 0 => {
                    c.err(
                        v,
                        "ceiling must be above 0 (use rate = 0 to refuse everything)",
                    );
                    None
                }
                Some(rt) => Some(Some(rt)),
                None => None,
            },
        };

        let rule_wait = match &r.max_wait {
            None => Some(max_wait),
            Some(w) => wait(&mut c, w),
        };

        let max_waiting = match &r.max_waiting {
            None => Some(None),
            Some(q) => match u32::try_from(*q.get_ref()) {
                Ok(n) if (1..=MAX_WAITING).contains(&n) => Some(Some(n)),
                _ => {
                    c.err(
                        q,
                        format!(
                            "max_waiting {} is out of range 1..={MAX_WAITING}",
                            q.get_ref()
                        ),
                    );
                    None
                }
            },
        };

        if let (
            Some(prefix),
            Some(rate),
            Some(burst),
            Some(group),
            Some(action),
            Some(ceiling),
            Some(max_wait),
            Some(max_waiting),
        ) = (
            prefix,
            rate,
            burst,
            group,
            action,
            ceiling,
            rule_wait,
            max_waiting,
        ) {
            if action != Action::Defer {
                for key in [
                    r.max_wait.as_ref().map(|w| w.span()),
                    r.max_waiting.as_ref().map(|w| w.span()),
                ]
                .into_iter()
                .flatten()
                {
                    c.warn_at(
                        key.start,
                        format!(
                            "rule `{name}`: max_wait and max_waiting only matter for action = \"defer\""
                        ),
                    );
                }
            }
            if let IpAddr::V6(a) = prefix.addr
                && a.to_ipv4_mapped().is_some()
                && prefix.len >= 96
            {
                c.warn_at(
                    r.prefix.span().start,
                    format!(
                        "rule `{name}`: {prefix} is IPv4-mapped IPv6 and never matches (IPv4 \
                         attempts are matched as IPv4): write the IPv4 prefix"
                    ),
                );
            }
            let max_waiting =
                max_waiting.unwrap_or_else(|| default_max_waiting(rate, burst, max_wait));
            rules.push(Rule {
                name: name.clone(),
                prefix,
                rate,
                burst,
                group,
                action,
                ceiling,
                max_wait,
                max_waiting,
            });
        }
    }

    let mut protected_prefixes = Vec::new();
    let mut protected_ports = Vec::new();
    if let Some(p) = &raw.protect {
        let p = p.get_ref();
        for s in &p.prefixes {
            match Prefix::parse(s.get_ref()) {
                Ok(px) if protected_prefixes.contains(&px) => {
                    c.err(s, format!("protected prefix {px} is listed twice"));
                }
                Ok(px) => protected_prefixes.push(px),
                Err(e) => c.err(s, e),
            }
        }
        for port in &p.ports {
            match u16::try_from(*port.get_ref()) {
                Ok(n) if n > 0 => {
                    if protected_ports.contains(&n) {
                        c.err(port, format!("protected port {n} is listed twice"));
                    }
                    protected_ports.push(n);
                }
                _ => c.err(
                    port,
                    format!("port {} is out of range 1..=65535", port.get_ref()),
                ),
            }
        }
    }

    if !rules.is_empty() && !rules.iter().any(|r| matches!(r.prefix.addr, IpAddr::V6(_))) {
        c.warn_at(
            0,
            "no rule has an IPv6 prefix: IPv6 attempts are not limited (add one, e.g. \
             prefix = \"::/0\")",
        );
    }
    if c.errors.is_empty() {
        Ok(Policy {
            rules,
            protected_prefixes,
            protected_ports,
            warnings: c.warnings,
        })
    } else {
        Err(PolicyErrors(c.errors))
    }
}

fn group_len(c: &mut Checker<'_>, g: &Spanned<i64>, max: u8, field: &str) -> Option<u8> {
    match u8::try_from(*g.get_ref()) {
        Ok(n) if n <= max => Some(n),
        _ => {
            c.err(
                g,
                format!("{field} {} is out of range 0..={max}", g.get_ref()),
            );
            None
        }
    }
}

/// A rate: an integer (per second) or "N/s", "N/min", "N/h".
fn parse_rate_value(c: &mut Checker<'_>, v: &Spanned<toml::Value>, field: &str) -> Option<Rate> {
    let parsed = match v.get_ref() {
        toml::Value::Integer(n) => u64::try_from(*n)
            .map(|count| Rate {
                count,
                period_ns: 1_000_000_000,
            })
            .map_err(|_| format!("{field} must not be negative")),
        toml::Value::String(s) => parse_rate(s).map_err(|e| format!("{field}: {e}")),
        other => Err(format!(
            "{field} must be an integer (per second) or a string like \"20/s\" or \"1200/min\", not a {}",
            other.type_str()
        )),
    };
    match parsed {
        Ok(r) if u128::from(r.count) * 1_000_000_000 > MAX_RATE_PER_S * u128::from(r.period_ns) => {
            c.err(
                v,
                format!("{field} {r} is above the maximum of {MAX_RATE_PER_S}/s"),
            );
            None
        }
        Ok(r) => Some(r),
        Err(e) => {
            c.err(v, e);
            None
        }
    }
}

fn parse_rate(s: &str) -> Result<Rate, String> {
    let (n, unit) = s.split_once('/').ok_or_else(|| {
        format!("`{s}` is not a rate; write it like \"20/s\", \"1200/min\" or \"3/h\"")
    })?;
    let count: u64 = n
        .trim()
        .parse()
        .map_err(|_| format!("`{n}` in `{s}` is not a whole number"))?;
    let period_ns = match unit.trim() {
        "s" | "sec" | "second" => 1_000_000_000,
        "m" | "min" | "minute" => 60_000_000_000,
        "h" | "hour" => 3_600_000_000_000,
        u => return Err(format!("unknown rate unit `{u}` in `{s}`: use s, min or h")),
    };
    Ok(Rate { count, period_ns })
}

fn wait(c: &mut Checker<'_>, w: &Spanned<toml::Value>) -> Option<Duration> {
    let (parsed, shown) = match w.get_ref() {
        toml::Value::String(s) => (parse_duration(s), s.clone()),
        toml::Value::Integer(n) => (
            u64::try_from(*n)
                .map(Duration::from_secs)
                .map_err(|_| format!("max_wait `{n}` is out of range 1s..=300s")),
            format!("{n}s"),
        ),
        other => (
            Err(format!(
                "max_wait must be a duration like \"30s\" or whole seconds, not a {}",
                other.type_str()
            )),
            String::new(),
        ),
    };
    match parsed {
        Ok(d) if d >= MAX_WAIT_RANGE.0 && d <= MAX_WAIT_RANGE.1 => Some(d),
        Ok(_) => {
            c.err(w, format!("max_wait `{shown}` is out of range 1s..=300s"));
            None
        }
        Err(e) => {
            c.err(w, e);
            None
        }
    }
}

/// "30s", "2min", "1500ms".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s
        .find(|ch: char| !ch.is_ascii_digit())
        .ok_or_else(|| format!("`{s}` needs a unit: ms, s or min"))?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like \"30s\""))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" | "min" => n
            .checked_mul(60)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("`{s}` is too long")),
        _ => Err(format!("unknown unit `{unit}` in `{s}`: use ms, s or min")),
    }
}
